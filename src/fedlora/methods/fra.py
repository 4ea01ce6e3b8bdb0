"""FRA-LoRA: aggregate the full-rank average increment, re-factorise it at rank ``r``.

Trautmann, Hales, Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning",
arXiv 2501.06332. Clients train both factors; the server forms (implicitly, through the
factors) the average weight increment and keeps its best rank-``r`` approximation:

    M = sum_k w_k s_k B_k A_k = U diag(sigma) V^T,
    B = U_r diag(sqrt(sigma_r)) / sqrt(s),   A = diag(sqrt(sigma_r)) V_r^T / sqrt(s),

so that ``s B A`` is the truncated SVD of ``M``. ``s_k = alpha / r_k`` is each client's
LoRA ``scaling``: it is applied before aggregating, so the SVD acts on the increments
actually added to the weights, and divided out after (evenly between the factors, keeping
them balanced) so that the global adapter's own scaling ``s`` reproduces ``M_r``.
Clients restart each round from these factors with a fresh optimizer (as in every
method here), so no optimizer moment refers to the replaced factors.
``agg_error`` is the truncation error ``sum_{i>r} sigma_i^2 / sum_i sigma_i^2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, aggregate_head


class FRALoRA:
    name = "fra"

    def __init__(self, *, rank: int, train_head: bool = True) -> None:
        self.rank = rank
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
            s = scaling[layer]
            As = [u.A[layer] for u in updates]
            Bs = [s * u.B[layer] for u in updates]
            A, B, errors[layer] = aggregation.fra_with_error(As, Bs, weights, rank=self.rank)
            root = math.sqrt(s)
            new_A[layer], new_B[layer] = A / root, B / root
        head = aggregate_head(state, updates, weights)
        return Aggregate(state=AdapterState(A=new_A, B=new_B, head=head), agg_error=errors)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
