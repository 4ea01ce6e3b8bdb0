"""HetLoRA: zero-pad heterogeneous ranks, sparsity-weighted mean, truncate, self-prune.

Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024, arXiv 2401.06432. Client ``k`` trains a LoRA adapter of
rank ``r_k`` (``client_ranks``). Each round:

1. distribution by truncation: client ``k`` starts from the leading ``r_k`` ranks of the
   global modules, ``A[:r_k]``, ``B[:, :r_k]``;
2. rank self-pruning: with the decay factor ``gamma`` (``hetlora_gamma``) the tail is the
   ranks ``floor(gamma r_k) .. r_k - 1``; if its norm ``||B_tail||_F ||A_tail||_F``
   (:func:`fedlora.aggregation.tail_norm`) is smaller after local training than in the
   modules the client was sent, the client prunes them: ``r_k <- floor(gamma r_k)``
   (never below 1), from this round's reply on;
3. sparsity-weighted aggregation: the replies are zero-padded to the server's rank ``R``
   and averaged with ``p_k = ||Delta W_k||_F / sum_j ||Delta W_j||_F``,
   ``Delta W_k = s_k B_k A_k`` (:func:`fedlora.aggregation.sparsity_weights`,
   :func:`fedlora.aggregation.hetlora`).

``R = max(rank, max_k r_k)`` is fixed for the run (pruned ranks then receive zeros), and
the global adapter, what the model evaluates and saves, is its leading ``rank`` ranks; the
ranks beyond, which only clients of a higher rank receive, are method state as in
:mod:`fedlora.methods.flexlora` (none when ``rank >= max_k r_k``, the paper's setting
``rank = r_max``). With ``weighting=method`` (the default) ``p_k`` is the paper's; another
``weighting`` multiplies it (``p_k`` proportional to ``w_k ||Delta W_k||_F``).

Deviations, each documented where it is implemented:

- the local regulariser ``lambda * tail_norm`` is **not** applied: clients train the plain
  loss, because the client training loop (``fedlora.client.train``) has no hook for a
  method's loss term; the pruning rule itself is the paper's, but without the regulariser
  the tail rarely shrinks, so clients prune less often than in the paper;
- the pruning decision is taken by the server from the module it sent and the one the
  client returned (the same two tensors the paper's client compares, so the same decision);
  the client therefore uploads the unpruned rank in the round it prunes;
- ``||Delta W_k||_F`` is taken over the whole adapter (all LoRA layers of the client), one
  weight per client, as the paper's notation (one ``Delta W_k`` per client) and two
  reimplementations read it;
- factors travel in the global adapter's scaling: a reply's ``B_k`` is weighed by
  ``s_k / s`` before padding and a start's ``B`` divided by it, so that a client's start has
  the increment of the global's leading ranks whatever PEFT's ``alpha / r_k``. With
  ``client_alpha=proportional`` (every scaling equal) this is the paper's rule literally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora import aggregation
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import RANKS_REFUSAL, Aggregate, LoRAMethod, aggregate_head
from fedlora.methods.flexlora import ServerFactors, rank_scaling


class HetLoRA(LoRAMethod):
    name = "hetlora"
    takes_client_ranks = True
    # Fig. 2b: the weights are the sparsity weights alone, no n_k
    paper_weighting = "uniform"
    carries_magnitude = False
    magnitude_refusal = RANKS_REFUSAL

    def __init__(
        self,
        *,
        client_ranks: Sequence[int] | None,
        rank: int,
        gamma: float = 0.99,
        client_alpha: str = "fixed",
        seed: int = 0,
        train_head: bool = True,
    ) -> None:
        super().__init__(train_head=train_head)
        self.initial_ranks = list(client_ranks) if client_ranks else None
        self.rank = rank
        self.gamma = gamma
        self.client_alpha = client_alpha
        self.seed = seed
        self.pruned: dict[int, int] = {}  # client -> its rank after self-pruning
        top = max([rank, *(self.initial_ranks or [])])
        self.server = ServerFactors(rank=rank, top=top, seed=seed)

    def rank_of(self, client_id: int) -> int:
        """The client's current rank (its ``client_ranks`` entry until it prunes)."""
        if client_id in self.pruned:
            return self.pruned[client_id]
        return self.initial_ranks[client_id] if self.initial_ranks else self.rank

    def client_start(self, state: AdapterState, *, client_id: int, plan: RoundPlan) -> AdapterState:
        """The global modules truncated at the client's current rank."""
        r = self.rank_of(client_id)
        ratio = rank_scaling(r, rank=self.rank, client_alpha=self.client_alpha)
        return self.server.start(state, rank=r, ratio=ratio)

    def _self_prune(self, sent: AdapterState, reply: ClientUpdate) -> int:
        """The rank client ``reply.client_id`` keeps: ``floor(gamma r)`` if its tail norm
        fell during local training, else ``r``."""
        r = next(iter(reply.A.values())).shape[0]
        before = sum(
            float(aggregation.tail_norm(sent.A[k], sent.B[k], gamma=self.gamma)) for k in sent.A
        )
        after = sum(
            float(aggregation.tail_norm(reply.A[k], reply.B[k], gamma=self.gamma)) for k in sent.A
        )
        return aggregation.pruned_rank(r, gamma=self.gamma) if after < before else r

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        kept: dict[int, int] = {}
        for u in updates:
            sent = self.client_start(state, client_id=u.client_id, plan=plan)
            if next(iter(u.A.values())).shape[0] != next(iter(sent.A.values())).shape[0]:
                raise FedLoraError(
                    f"client {u.client_id} replied at rank {next(iter(u.A.values())).shape[0]}, "
                    f"but was sent rank {next(iter(sent.A.values())).shape[0]}"
                )
            kept[u.client_id] = self._self_prune(sent, u)
        # each reply as the client would have sent it after pruning, in the global scaling
        As: dict[str, list[torch.Tensor]] = {k: [] for k in state.A}
        Bs: dict[str, list[torch.Tensor]] = {k: [] for k in state.A}
        norms = []
        for u in updates:
            squares = 0.0
            for layer in state.A:
                a, b = aggregation.truncate(u.A[layer], u.B[layer], rank=kept[u.client_id])
                b = u.scaling.get(layer, scaling[layer]) / scaling[layer] * b
                As[layer].append(a)
                Bs[layer].append(b)
                # ||Delta W_k|| = s_k ||B_k A_k|| = s ||(s_k / s) B_k A_k||
                squares += (scaling[layer] * aggregation.lora_norm(a, b)) ** 2
            norms.append(math.sqrt(squares))
        p = aggregation.sparsity_weights(norms, weights)
        top_A, top_B = {}, {}
        for layer in state.A:
            top_A[layer], top_B[layer] = aggregation.hetlora(
                As[layer], Bs[layer], p, rank=self.server.top
            )
        A, B = self.server.keep(top_A, top_B)
        self.pruned.update(kept)
        # the head is no part of the paper (its models have none): FedAvg with the weights
        head = aggregate_head(state, updates, weights)
        return Aggregate(state=AdapterState(A=A, B=B, head=head))

    def state_dict(self) -> dict[str, Any]:
        ranks = {str(c): r for c, r in sorted(self.pruned.items())}
        return {"ranks": ranks, **self.server.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, Mapping):
            raise FedLoraError(f"HetLoRA state has no client ranks: {dict(state)}")
        self.pruned = {int(c): int(r) for c, r in ranks.items()}
        self.server.load_state_dict(state)
