"""The centralized baseline: every client's training data pooled on one trainer.

Not a federated method but the reference the papers compare against: one "client" holds
the union of all clients' training sets and takes, per round, as many steps as all
sampled clients together would (same total number of optimisation steps). The runtime
does the pooling (:attr:`pools_clients`); aggregation of a single reply is the reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, uniform_zero_error


class Centralized:
    name = "centralized"
    pools_clients = True

    def __init__(self, *, train_head: bool = True) -> None:
        self.train_head = train_head

    def plan(self, round: int) -> RoundPlan:
        return RoundPlan(round=round, trained="AB", train_head=self.train_head, method=self.name)

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        (update,) = updates
        head = dict(update.head) if update.head else dict(state.head)
        new_state = AdapterState(A=dict(update.A), B=dict(update.B), head=head)
        return Aggregate(state=new_state, agg_error=uniform_zero_error(state))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
