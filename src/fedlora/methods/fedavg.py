"""FedAvg-LoRA (FedIT): average ``A`` and ``B`` separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT),
arXiv 2305.05644. The server computes ``A = sum_k w_k A_k`` and ``B = sum_k w_k B_k``;
the resulting update ``B A`` differs from the mean update ``M = sum_k w_k B_k A_k``
by the cross terms, which :func:`fedlora.aggregation.fedavg_error` reports as
``||M - B A||_F / ||M||_F`` (the error the FRA-LoRA paper decomposes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, aggregate_head


class FedAvgLoRA:
    name = "fedavg"

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
        new_A, new_B, errors = {}, {}, {}
        for layer in state.A:
            As = [u.A[layer] for u in updates]
            Bs = [u.B[layer] for u in updates]
            new_A[layer], new_B[layer] = aggregation.fedavg(As, Bs, weights)
            errors[layer] = aggregation.fedavg_error(As, Bs, weights)
        head = aggregate_head(state, updates, weights)
        return Aggregate(state=AdapterState(A=new_A, B=new_B, head=head), agg_error=errors)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
