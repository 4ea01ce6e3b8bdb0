"""What a federated LoRA method is: two questions and explicit state.

A method answers (1) what do the sampled clients train this round (:meth:`Method.plan`,
Flower's ``configure_train``) and (2) how are their replies combined
(:meth:`Method.aggregate`, Flower's ``aggregate_train``). Anything that must survive a
round (RoLoRA's phase, a schedule's switch) lives in :meth:`Method.state_dict`.
Methods never touch PEFT, modules or devices: they map messages to messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedlora.messages import AdapterState, ClientUpdate, RoundPlan


@dataclass(frozen=True)
class Aggregate:
    """The server's result for one round.

    ``base_delta`` holds per-layer dense increments (shape ``(out, in)``, already including
    the LoRA ``scaling``) that every client folds into its frozen weight (FedEx-LoRA's
    residual); empty for methods whose result is all in the factors. ``agg_error`` is the
    per-layer relative aggregation error (0.0 for exact methods). ``delta_bytes`` is what
    delivering ``base_delta`` costs per client on the wire, in the form the method would
    send it (a dense residual, or stacked factors): it is counted in the next round's
    download on top of the adapter state.
    """

    state: AdapterState
    base_delta: Mapping[str, torch.Tensor] = field(default_factory=dict)
    agg_error: Mapping[str, float] = field(default_factory=dict)
    delta_bytes: int = 0


class Method(Protocol):
    name: str

    def plan(self, round: int) -> RoundPlan: ...

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class PerClientStart(Protocol):
    """Optional: a method whose clients do not all start from the global adapter
    (FLoRA: each client restarts a fresh adapter at its own rank)."""

    def client_start(
        self, state: AdapterState, *, client_id: int, plan: RoundPlan
    ) -> AdapterState: ...


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_k w_k t_k / sum_k w_k`` (the head and any other plainly averaged tensor)."""
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weights, tensors, strict=True):
        out.add_(t, alpha=w / total)
    return out


def aggregate_head(
    state: AdapterState, updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FedAvg of the classifier head when clients trained it; else the head unchanged."""
    if not updates or not updates[0].head:
        return dict(state.head)
    return {name: weighted_mean([u.head[name] for u in updates], weights) for name in state.head}


def uniform_zero_error(state: AdapterState) -> dict[str, float]:
    return dict.fromkeys(state.A, 0.0)
