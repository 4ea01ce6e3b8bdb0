"""FedAvg-LoRA (FedIT): average ``A`` and ``B`` separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (FedIT),
arXiv 2305.05644. The server computes ``A = sum_k w_k A_k`` and ``B = sum_k w_k B_k``;
the resulting update ``s B A`` differs from the mean update ``M = sum_k w_k s B_k A_k``
by the cross terms, which every round's ``agg_error`` reports as
``||M - s B A||_F / ||M||_F`` (:func:`fedlora.methods.base.update_error`; the error the
FRA-LoRA paper decomposes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head, aggregate_magnitude


class FedAvgLoRA(LoRAMethod):
    name = "fedavg"
    schedulable = True

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_A, new_B = {}, {}
        for layer in state.A:
            As = [u.A[layer] for u in updates]
            Bs = [u.B[layer] for u in updates]
            new_A[layer], new_B[layer] = aggregation.fedavg(As, Bs, weights)
        head = aggregate_head(state, updates, weights)
        magnitude = aggregate_magnitude(state, updates, weights)
        return Aggregate(state=AdapterState(A=new_A, B=new_B, head=head, magnitude=magnitude))
