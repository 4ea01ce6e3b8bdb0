"""Federated LoRA methods by name.

Add a method: a class with ``plan`` / ``aggregate`` / ``state_dict`` / ``load_state_dict``
(see :mod:`fedlora.methods.base`) and one entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedlora.errors import FedLoraError
from fedlora.methods.base import Aggregate, Method
from fedlora.methods.centralized import Centralized
from fedlora.methods.fedavg import FedAvgLoRA
from fedlora.methods.fedex import FedExLoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.fra import FRALoRA
from fedlora.methods.rolora import RoLoRA
from fedlora.methods.schedule import Schedule

if TYPE_CHECKING:
    from fedlora.config import Config


def _head(cfg: Config) -> bool:
    # a causal LM has no classifier head (PEFT CAUSAL_LM saves none)
    return cfg.head == "train" and cfg.task == "classification"


METHODS: dict[str, Callable[[Config], Method]] = {
    "fedavg": lambda cfg: FedAvgLoRA(train_head=_head(cfg)),
    "ffa": lambda cfg: FFALoRA(train_head=_head(cfg)),
    "rolora": lambda cfg: RoLoRA(train_head=_head(cfg)),
    "fra": lambda cfg: FRALoRA(rank=cfg.rank, train_head=_head(cfg)),
    "fedex": lambda cfg: FedExLoRA(train_head=_head(cfg)),
    "flora": lambda cfg: FLoRA(
        client_ranks=cfg.client_ranks,
        rank=cfg.rank,
        alpha=cfg.alpha,
        seed=cfg.seed,
        train_head=_head(cfg),
    ),
    "centralized": lambda cfg: Centralized(train_head=_head(cfg)),
    "schedule": lambda cfg: Schedule(
        [(build_method(p.method, cfg), p.rounds) for p in cfg.schedule or []]
    ),
}
METHOD_NAMES = tuple(METHODS)


def build_method(name: str, cfg: Config) -> Method:
    """A fresh method object (its state at round 0) for ``cfg``."""
    if name not in METHODS:
        raise FedLoraError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    return METHODS[name](cfg)


__all__ = ["Aggregate", "Method", "METHODS", "METHOD_NAMES", "build_method"]
