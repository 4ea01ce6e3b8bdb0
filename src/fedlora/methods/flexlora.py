"""FlexLoRA: average the clients' full-size increments, send each the SVD at its own rank.

Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv 2402.11505. Client ``k``
trains a LoRA adapter of its own rank ``r_k`` (``client_ranks``). The server forms the
weighted mean of the full increments and its SVD,

    M = sum_k w_k s_k B_k A_k = U diag(sigma) V^T,    w_k = n_k / n,

and client ``k`` starts the next round from the SVD truncated at its rank,

    s_k B_k A_k = U_{r_k} diag(sigma_{r_k}) V_{r_k}^T   (A_k = V_{r_k}^T, orthonormal rows),

the best rank-``r_k`` approximation of ``M``. ``s_k`` is the scaling client ``k``'s adapter
had (``ClientUpdate.scaling``; PEFT's ``alpha / r_k`` with ``client_alpha=fixed``, the
authors' setting: their code divides by ``16 / r_k``). One decomposition per layer per
round serves every client (:func:`fedlora.aggregation.flexlora`, from the stacked factors:
no ``out x in`` matrix while ``sum_k r_k < min(out, in)``): the server keeps the SVD at
``R = max(rank, max_k r_k)`` in SVD order, and a client's start is its leading ``r_k``
ranks. The frozen weights are never changed.

Deviations, all forced by the global adapter being a LoRA adapter of rank ``rank`` (the
one the model evaluates and ``adapter/`` saves):

- the paper's global model is the full ``W0 + M``; here it is ``W0 + U_r diag(sigma_r)
  V_r^T`` (``r = rank``): ``agg_error`` reports what that truncation leaves out (0 when
  ``rank >= rank(M)``, e.g. ``rank >= sum_k r_k``);
- ranks ``rank .. R - 1`` of the server's SVD, which only clients of a higher rank receive,
  are method state (saved in the checkpoint, and so in ``summary.json``'s
  ``method_state``, as base64 safetensors); with ``rank >= max_k r_k`` there are none;
- round 1 starts every client from the leading ``r_k`` ranks of one seeded initial adapter
  at rank ``R`` (PEFT's: ``B = 0``, Kaiming-uniform ``A``), where the paper lets each
  client initialise its own LoRA (the same distribution);
- when ``rank(M) < R`` the missing ranks get fresh random ``A`` rows (seeded by
  ``(seed, round)``) and zero ``B`` columns, so that training can use them.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedlora import aggregation
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import RANKS_REFUSAL, Aggregate, LoRAMethod, aggregate_head
from fedlora.methods.flora import kaiming_uniform_A


def rank_scaling(rank_k: int, *, rank: int, client_alpha: str) -> float:
    """``s_k / s``: the scaling of a client adapter of rank ``rank_k`` over the global one's,
    as :meth:`fedlora.models.adapter.PeftAdapter.use_rank` sets them (``fixed``: every
    adapter has ``alpha``, so ``(alpha / r_k) / (alpha / rank)``; ``proportional``: 1)."""
    return rank / rank_k if client_alpha == "fixed" else 1.0


class ServerFactors:
    """The server's factors at rank ``top >= rank``: the global adapter (ranks ``0 .. rank-1``,
    what the model holds) plus the ranks beyond it that only clients of a higher rank get.

    Both heterogeneous-rank methods keep their factors in order of importance (FlexLoRA: SVD
    order; HetLoRA: the padded ranks), so that a client's start is a prefix
    (:func:`fedlora.aggregation.truncate`). The ranks beyond ``rank`` start as PEFT's
    initial adapter (Kaiming-uniform ``A`` seeded by ``seed``, ``B = 0``).
    """

    def __init__(self, *, rank: int, top: int, seed: int) -> None:
        self.rank, self.top, self.seed = rank, top, seed
        self.tail_A: dict[str, torch.Tensor] = {}
        self.tail_B: dict[str, torch.Tensor] = {}

    def full(self, state: AdapterState) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every layer's factors at rank ``top``."""
        if self.top == self.rank:
            return dict(state.A), dict(state.B)
        if not self.tail_A:
            g = torch.Generator().manual_seed(self.seed * 1_000_003)
            extra = self.top - self.rank
            for layer, a in state.A.items():
                self.tail_A[layer] = kaiming_uniform_A(extra, a.shape[1], generator=g).to(a.dtype)
                self.tail_B[layer] = torch.zeros(state.B[layer].shape[0], extra, dtype=a.dtype)
        A = {k: torch.cat([a, self.tail_A[k].to(a)], dim=0) for k, a in state.A.items()}
        B = {k: torch.cat([b, self.tail_B[k].to(b)], dim=1) for k, b in state.B.items()}
        return A, B

    def keep(
        self, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Hold ``A``, ``B`` (rank ``top``): return the global adapter's ranks, keep the rest."""
        if self.top > self.rank:
            self.tail_A = {k: a[self.rank :].clone() for k, a in A.items()}
            self.tail_B = {k: b[:, self.rank :].clone() for k, b in B.items()}
        return (
            {k: a[: self.rank] for k, a in A.items()},
            {k: b[:, : self.rank] for k, b in B.items()},
        )

    def start(self, state: AdapterState, *, rank: int, ratio: float) -> AdapterState:
        """The leading ``rank`` ranks, ``B`` divided by ``ratio = s_k / s`` so that the
        client's increment ``s_k B_k A_k`` is the server's ``s B_r A_r``."""
        A, B = self.full(state)
        out_A, out_B = {}, {}
        for layer in A:
            out_A[layer], b = aggregation.truncate(A[layer], B[layer], rank=rank)
            out_B[layer] = b / ratio if ratio != 1.0 else b
        return AdapterState(A=out_A, B=out_B, head=dict(state.head))

    def state_dict(self) -> dict[str, Any]:
        if not self.tail_A:
            return {}
        tensors = {f"A/{k}": v.detach().cpu().contiguous() for k, v in self.tail_A.items()}
        tensors |= {f"B/{k}": v.detach().cpu().contiguous() for k, v in self.tail_B.items()}
        return {"tail": base64.b64encode(save_tensors(tensors)).decode("ascii")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tail_A, self.tail_B = {}, {}
        if "tail" not in state:
            return
        if self.top == self.rank:
            raise FedLoraError("the checkpoint holds ranks beyond `rank`, but no client has one")
        for key, value in load_tensors(base64.b64decode(state["tail"])).items():
            factor, _, layer = key.partition("/")
            (self.tail_A if factor == "A" else self.tail_B)[layer] = value


class FlexLoRA(LoRAMethod):
    name = "flexlora"
    takes_client_ranks = True
    carries_magnitude = False
    magnitude_refusal = RANKS_REFUSAL

    def __init__(
        self,
        *,
        client_ranks: Sequence[int] | None,
        rank: int,
        client_alpha: str = "fixed",
        seed: int = 0,
        train_head: bool = True,
    ) -> None:
        super().__init__(train_head=train_head)
        self.client_ranks = list(client_ranks) if client_ranks else None
        self.rank = rank
        self.client_alpha = client_alpha
        self.seed = seed
        self.server = ServerFactors(
            rank=rank, top=max([rank, *(self.client_ranks or [])]), seed=seed
        )

    def rank_of(self, client_id: int) -> int:
        return self.client_ranks[client_id] if self.client_ranks else self.rank

    def client_start(self, state: AdapterState, *, client_id: int, plan: RoundPlan) -> AdapterState:
        """The server's SVD truncated at the client's rank (its best approximation of ``M``)."""
        r = self.rank_of(client_id)
        ratio = rank_scaling(r, rank=self.rank, client_alpha=self.client_alpha)
        return self.server.start(state, rank=r, ratio=ratio)

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + plan.round * 10_007)
        top_A, top_B = {}, {}
        for layer in state.A:
            s = scaling[layer]
            As = [u.A[layer] for u in updates]
            # the SVD of M / s: the clients' B_k weighed by s_k / s, so s B A = M
            Bs = [u.scaling.get(layer, s) / s * u.B[layer] for u in updates]
            top_A[layer], top_B[layer] = aggregation.flexlora(
                As, Bs, weights, rank=self.server.top, generator=generator
            )
        A, B = self.server.keep(top_A, top_B)
        head = aggregate_head(state, updates, weights)
        return Aggregate(state=AdapterState(A=A, B=B, head=head))

    def state_dict(self) -> dict[str, Any]:
        return self.server.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict(state)
