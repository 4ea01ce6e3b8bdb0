"""RoLoRA: alternating minimisation of the LoRA factors.

Chen, Guo, Li, Cai, "Robust Federated Finetuning of Foundation Models via Alternating
Minimization of LoRA", arXiv 2409.02346. Rounds alternate: in a ``B`` round every client
trains ``B`` with ``A`` frozen and the server sets ``B = sum_k w_k B_k``; in the next
(``A``) round every client trains ``A`` with ``B`` frozen and the server sets
``A = sum_k w_k A_k``. Because the frozen factor is shared, ``sum_k w_k B_k A = B A``
(and likewise for ``A``): the aggregation is exact, each client uploads one factor, and
both factors are learned. The first round trains ``B``: PEFT initialises ``B = 0``, so the
gradient of ``A`` would vanish.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedlora import aggregation
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head, aggregate_magnitude


class RoLoRA(LoRAMethod):
    name = "rolora"
    schedulable = True
    period = 2  # a B round, then an A round

    def __init__(self, *, train_head: bool = True) -> None:
        super().__init__(train_head=train_head)
        self.phase = "B"  # the factor the next round trains

    def plan(self, round: int) -> RoundPlan:
        return RoundPlan(
            round=round,
            trained=self.phase,  # type: ignore[arg-type]
            train_head=self.train_head,
            method=self.name,
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
        new_A, new_B = dict(state.A), dict(state.B)
        if plan.trained == "B":
            new_B = {
                k: aggregation.weighted_mean([u.B[k] for u in updates], weights) for k in state.B
            }
        else:
            new_A = {
                k: aggregation.weighted_mean([u.A[k] for u in updates], weights) for k in state.A
            }
        head = aggregate_head(state, updates, weights)
        magnitude = aggregate_magnitude(state, updates, weights)
        self.phase = "A" if plan.trained == "B" else "B"
        return Aggregate(state=AdapterState(A=new_A, B=new_B, head=head, magnitude=magnitude))

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("phase") not in ("A", "B"):
            raise FedLoraError(f"RoLoRA state has no valid phase: {dict(state)}")
        self.phase = state["phase"]
