"""LoRA-FAIR: FedAvg of the factors, then a server-side correction of ``B``.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", arXiv 2411.14961 (ICCV 2025). Clients train ``A`` and ``B``;
the server averages them (``A_avg``, ``B_avg``) and solves Eq. 8,

    dB = argmin_dB  1 - cos(dW, (B_avg + dB) A_avg) + lam ||dB||_F,   dW = sum_k w_k B_k A_k,

(:func:`fedlora.aggregation.lora_fair`), so that the product of the averaged ``A`` with the
corrected ``B`` points like the clients' mean update (aggregation refinement), while the
regulariser keeps ``B`` near ``B_avg``. Every client starts the next round from
``A_avg`` and ``B_avg + dB`` (the paper's "Avg-Initial": the refined initialisation), with
the frozen weights unchanged; nothing is folded and nothing extra is sent, so upload and
download are FedAvg-LoRA's (and a DoRA magnitude, relative to the unchanged frozen weights,
is averaged as FedAvg-LoRA averages it).

``s_k`` (each client's LoRA scaling, ``ClientUpdate.scaling``) weighs its ``B_k`` by
``s_k / s`` as in FRA-LoRA, so ``dW`` is the mean of what the clients' adapters did; with
one rank for all clients (the paper's setting, required here) every ``s_k = s``.
``lam`` is the paper's ``lambda`` (0.01), in the units of PEFT's ``lora_B``. The paper's
``p_k`` are the clients' data shares: ``paper_weighting`` is ``num_examples``.
Diagnostics: ``fair_cosine`` (``cos(dW, B A)`` after the correction; ``agg_error`` is
the Frobenius error of the same pair), ``fair_b_cosine`` (``cos(B, B_avg)``); the two
similarities the paper's ablation of ``lambda`` reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora import aggregation
from fedlora.aggregation.fair import DEFAULT_LAMBDA
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head, aggregate_magnitude


class LoRAFAIR(LoRAMethod):
    name = "lorafair"

    def __init__(self, *, lam: float = DEFAULT_LAMBDA, train_head: bool = True) -> None:
        super().__init__(train_head=train_head)
        self.lam = lam

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_A, new_B, cosine, b_cosine = {}, {}, {}, {}
        for layer in state.A:
            s = scaling[layer]
            As = [u.A[layer] for u in updates]
            Bs = [u.scaling.get(layer, s) / s * u.B[layer] for u in updates]
            fair = aggregation.lora_fair(As, Bs, weights, lam=self.lam)
            new_A[layer], new_B[layer] = fair.A, fair.B
            cosine[layer], b_cosine[layer] = fair.cosine, fair.b_cosine
        head = aggregate_head(state, updates, weights)
        magnitude = aggregate_magnitude(state, updates, weights)
        return Aggregate(
            state=AdapterState(A=new_A, B=new_B, head=head, magnitude=magnitude),
            diagnostics={"fair_cosine": cosine, "fair_b_cosine": b_cosine},
        )
