"""FFA-LoRA: freeze ``A`` at its random initialisation, train and average only ``B``.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024.
With ``A`` shared and fixed, ``sum_k w_k B_k A = (sum_k w_k B_k) A`` exactly, so the
aggregation is exact and each client uploads one factor per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, aggregate_head, uniform_zero_error, weighted_mean


class FFALoRA:
    name = "ffa"

    def __init__(self, *, train_head: bool = True) -> None:
        self.train_head = train_head

    def plan(self, round: int) -> RoundPlan:
        return RoundPlan(round=round, trained="B", train_head=self.train_head, method=self.name)

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_B = {layer: weighted_mean([u.B[layer] for u in updates], weights) for layer in state.B}
        head = aggregate_head(state, updates, weights)
        new_state = AdapterState(A=dict(state.A), B=new_B, head=head)
        return Aggregate(state=new_state, agg_error=uniform_zero_error(state))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
