"""A method that changes over rounds: a list of phases, each a method for some rounds.

The FRA-LoRA paper (Trautmann, Hales, Volk, arXiv 2501.06332) proposes a hybrid:
full-rank aggregation in the first rounds, where it converges faster, then FFA-LoRA.
In the config::

    method: schedule
    schedule:
      - {method: fra, rounds: 5}
      - {method: ffa}            # the last phase runs to the end

A phase continues from the global adapter the previous phase left (FFA-LoRA then keeps
the ``A`` that FRA produced frozen: the FRA phase's last round factorises with ``A`` at
PEFT's initial scale, see :class:`~fedlora.methods.fra.FRALoRA`). Which phase is active, and how many of its rounds
have run, is part of :meth:`state_dict`, with each phase's own state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod

if TYPE_CHECKING:
    from fedlora.config import Config


class Schedule(LoRAMethod):
    name = "schedule"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Which methods may be phases is theirs to say (:attr:`LoRAMethod.schedulable`,
        checked by :func:`fedlora.methods.check_config` for every phase)."""
        if not cfg.schedule:
            raise FedLoraError(
                "method 'schedule' needs config key 'schedule': a list of {method, rounds} phases"
            )

    def __init__(self, phases: Sequence[tuple[LoRAMethod, int | None]]) -> None:
        super().__init__()
        self.phases = list(phases)
        self.index = 0
        self.rounds_in_phase = 0

    @property
    def label(self) -> str:
        return ">".join(f"{m.name}:{n}" if n else m.name for m, n in self.phases)

    @property
    def paper_weighting(self) -> str:  # type: ignore[override]
        return self.current.paper_weighting

    @property
    def default_lr(self) -> float:  # type: ignore[override]
        return self.phases[0][0].default_lr

    @property
    def period(self) -> int:  # type: ignore[override]
        periods = [m.period for m, _ in self.phases]
        return max(periods)

    @property
    def current(self) -> LoRAMethod:
        return self.phases[self.index][0]

    def plan(self, round: int) -> RoundPlan:
        method, length = self.phases[self.index]
        if (
            length is not None
            and self.rounds_in_phase >= length
            and self.index + 1 < len(self.phases)
        ):
            self.index += 1
            self.rounds_in_phase = 0
        return self.current.plan(round)

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        result = self.current.aggregate(
            plan=plan, state=state, updates=updates, weights=weights, scaling=scaling
        )
        self.rounds_in_phase += 1
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.index,
            "rounds_in_phase": self.rounds_in_phase,
            "phases": [m.state_dict() for m, _ in self.phases],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["phase"])
        self.rounds_in_phase = int(state["rounds_in_phase"])
        for (method, _), sub in zip(self.phases, state["phases"], strict=True):
            method.load_state_dict(sub)
