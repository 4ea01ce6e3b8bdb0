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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan, tensor_bytes
from fedlora.methods.base import Aggregate, aggregate_head, uniform_zero_error


def kaiming_uniform_A(rank: int, in_features: int, *, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default init of ``lora_A``: ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-b, b),
    ``b = 1 / sqrt(in)``."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


class FLoRA:
    name = "flora"

    def __init__(
        self,
        *,
        client_ranks: Sequence[int] | None,
        rank: int,
        alpha: float,
        seed: int,
        train_head: bool = True,
    ) -> None:
        self.client_ranks = list(client_ranks) if client_ranks else None
        self.rank = rank
        self.alpha = alpha
        self.seed = seed
        self.train_head = train_head

    def rank_of(self, client_id: int) -> int:
        return self.client_ranks[client_id] if self.client_ranks else self.rank

    def plan(self, round: int) -> RoundPlan:
        return RoundPlan(round=round, trained="AB", train_head=self.train_head, method=self.name)

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
            # each client's own scaling alpha / r_k, applied before stacking
            Bs = [self.alpha / u.A[layer].shape[0] * u.B[layer] for u in updates]
            A, B = aggregation.stack(As, Bs, weights)
            delta[layer] = B @ A
            sent += tensor_bytes([A, B])
        head = aggregate_head(state, updates, weights)
        # The global adapter restarts too: B = 0, so the model is the merged base.
        fresh = AdapterState(
            A=dict(state.A), B={k: torch.zeros_like(b) for k, b in state.B.items()}, head=head
        )
        return Aggregate(
            state=fresh, base_delta=delta, agg_error=uniform_zero_error(state), delta_bytes=sent
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
