"""FedEx-LoRA: FedAvg of the factors plus the exact residual, folded into the base weight.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models", arXiv 2410.09432. With ``A = sum_k w_k A_k`` and
``B = sum_k w_k B_k``, the residual of the average update is

    R = sum_k w_k B_k A_k - B A,

and every client sets ``W0 <- W0 + s R`` (``s`` the LoRA scaling), so that its effective
weight ``W0 + s B A`` equals ``W0_prev + s sum_k w_k B_k A_k`` exactly. The residual is
dense (``out x in`` per layer): delivering it costs a full-size matrix per layer per round,
counted in the download. :class:`~fedlora.models.adapter.PeftAdapter` folds it with the
orientation right for ``nn.Linear`` and GPT-2's ``Conv1D``. The paper's code averages
uniformly over clients (``mean(0)`` over clients in its ``fed_agg.py``): its
``paper_weighting`` is ``uniform``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan, tensor_bytes
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head, aggregate_magnitude


class FedExLoRA(LoRAMethod):
    name = "fedex"
    schedulable = True
    folds_base = True
    paper_weighting = "uniform"
    carries_magnitude = False
    magnitude_refusal = (
        "it folds its residual into the frozen weights, so the magnitude vector no longer "
        "scales the weight the clients trained"
    )

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_A, new_B, delta = {}, {}, {}
        for layer in state.A:
            As = [u.A[layer] for u in updates]
            Bs = [u.B[layer] for u in updates]
            new_A[layer], new_B[layer], residual = aggregation.fedex(As, Bs, weights)
            delta[layer] = scaling[layer] * residual
        head = aggregate_head(state, updates, weights)
        magnitude = aggregate_magnitude(state, updates, weights)
        return Aggregate(
            state=AdapterState(A=new_A, B=new_B, head=head, magnitude=magnitude),
            base_delta=delta,
            delta_bytes=tensor_bytes(delta.values()),
        )
