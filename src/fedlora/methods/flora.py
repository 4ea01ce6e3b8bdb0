"""FLoRA: stack the clients' factors, merge the exact sum into the base, restart.

Wang, Shen, Yang, Zhu, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", arXiv 2409.05976. Client ``k`` trains a LoRA adapter
of its own rank ``r_k`` (``client_ranks``). The server stacks the factors,

    B = [w_1 s_1 B_1, ..., w_K s_K B_K],   A = [A_1; ...; A_K],   B A = sum_k w_k s_k B_k A_k,

an exact aggregate of rank ``sum_k r_k`` whatever the ranks, and sends the stacked factors
to every client, which merges ``B A`` into its frozen weight and **restarts** its own
adapter for the next round: ``A_k`` freshly random (Kaiming-uniform as PEFT initialises
it, seeded by ``(seed, round, client)``), ``B_k = 0``. This is the paper's choice (rather
than truncating the stack to each client's rank with FRA): it is exact, and its cost is
the merge, a dense ``out x in`` add per layer per round on each client, plus a download of
``sum_k r_k (out + in)`` numbers per layer.

``s_k`` is the scaling client ``k``'s adapter actually had, as PEFT set it and the client
reported it (``ClientUpdate.scaling``), never recomputed here. With ``client_alpha=fixed``
every client has the same ``alpha``, so ``s_k = alpha / r_k`` and a rank-2 client's
factors weigh 4x a rank-8 client's; ``client_alpha=proportional`` is the FLoRA authors'
convention (their code sets ``lora_alpha = 2 r_k``): ``alpha_k = alpha r_k / rank``, so
every client has the scaling ``alpha / rank`` whatever its rank. The weights ``w_k`` are
the authors' ``p_k = n_k / n`` with ``weighting=num_examples``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan, tensor_bytes
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head


def kaiming_uniform_A(rank: int, in_features: int, *, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default init of ``lora_A``: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-b, b),
    ``b = 1 / sqrt(in)``."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


class FLoRA(LoRAMethod):
    name = "flora"
    takes_client_ranks = True
    folds_base = True
    carries_magnitude = False
    magnitude_refusal = (
        "it merges the stacked factors into the frozen weights, so the magnitude vector no "
        "longer scales the weight the clients trained"
    )

    def __init__(
        self,
        *,
        client_ranks: Sequence[int] | None,
        rank: int,
        seed: int,
        train_head: bool = True,
    ) -> None:
        super().__init__(train_head=train_head)
        self.client_ranks = list(client_ranks) if client_ranks else None
        self.rank = rank
        self.seed = seed

    def rank_of(self, client_id: int) -> int:
        return self.client_ranks[client_id] if self.client_ranks else self.rank

    def client_start(self, state: AdapterState, *, client_id: int, plan: RoundPlan) -> AdapterState:
        """A fresh adapter at the client's rank (all previous rounds live in the base)."""
        r = self.rank_of(client_id)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + plan.round * 10_007 + client_id)
        A = {
            k: kaiming_uniform_A(r, a.shape[1], generator=g).to(a.dtype) for k, a in state.A.items()
        }
        B = {k: torch.zeros(b.shape[0], r, dtype=b.dtype) for k, b in state.B.items()}
        return AdapterState(A=A, B=B, head=dict(state.head))

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        delta, sent = {}, 0
        for layer in state.A:
            As = [u.A[layer] for u in updates]
            # each client's own scaling, as its adapter had it, applied before stacking
            Bs = [u.scaling.get(layer, scaling[layer]) * u.B[layer] for u in updates]
            A, B = aggregation.stack(As, Bs, weights)
            delta[layer] = B @ A
            sent += tensor_bytes([A, B])
        head = aggregate_head(state, updates, weights)
        # The global adapter restarts too: B = 0, so the model is the merged base.
        fresh = AdapterState(
            A=dict(state.A), B={k: torch.zeros_like(b) for k, b in state.B.items()}, head=head
        )
        return Aggregate(state=fresh, base_delta=delta, delta_bytes=sent)
