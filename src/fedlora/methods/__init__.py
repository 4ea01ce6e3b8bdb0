"""Federated LoRA methods by name. Add a method: a class with ``plan`` / ``aggregate`` /
``state_dict`` / ``load_state_dict`` (see :mod:`fedlora.methods.base`) and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedlora.errors import FedLoraError

from fedlora.methods.base import Aggregate, Method
from fedlora.methods.centralized import Centralized
from fedlora.methods.fedavg import FedAvgLoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.rolora import RoLoRA

if TYPE_CHECKING:
    from fedlora.config import Config

METHODS: dict[str, Callable[..., Method]] = {
    "fedavg": FedAvgLoRA,
    "ffa": FFALoRA,
    "rolora": RoLoRA,
    "centralized": Centralized,
}
METHOD_NAMES = tuple(METHODS)


def build_method(name: str, cfg: Config) -> Method:
    """A fresh method object (its state at round 0) for ``cfg``."""
    if name not in METHODS:
        raise FedLoraError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    return METHODS[name](train_head=cfg.head == "train")


__all__ = ["Aggregate", "Method", "METHODS", "METHOD_NAMES", "build_method"]
