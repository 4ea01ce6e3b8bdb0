"""Federated LoRA methods by name, and the checks of a config that only they can make.

Add a method: a subclass of :class:`~fedlora.methods.base.LoRAMethod` that overrides what
differs (``aggregate`` always; ``plan``, ``client_start``, ``state_dict`` where needed;
``check_config`` and the declared attributes for what it cannot run with), one entry in
:data:`METHODS` and one in :data:`CLASSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedlora.errors import FedLoraError
from fedlora.methods.base import Aggregate, LoRAMethod
from fedlora.methods.centralized import Centralized
from fedlora.methods.fedavg import FedAvgLoRA
from fedlora.methods.fedex import FedExLoRA
from fedlora.methods.fedsa import FedSALoRA
from fedlora.methods.ffa import FFALoRA
from fedlora.methods.flexlora import FlexLoRA
from fedlora.methods.flora import FLoRA
from fedlora.methods.fra import FRALoRA
from fedlora.methods.hetlora import HetLoRA
from fedlora.methods.lorafair import LoRAFAIR
from fedlora.methods.rolora import RoLoRA
from fedlora.methods.schedule import Schedule
from fedlora.methods.slora import SLoRA

if TYPE_CHECKING:
    from fedlora.config import Config


def _head(cfg: Config) -> bool:
    # a causal LM has no classifier head (PEFT CAUSAL_LM saves none)
    return cfg.head == "train" and cfg.task == "classification"


def _schedule(cfg: Config) -> Schedule:
    phases: list[tuple[LoRAMethod, int | None]] = []
    end = 0  # the last round of the phase being built
    specs = cfg.schedule or []
    for i, spec in enumerate(specs):
        end += spec.rounds or 0
        freezes_A_next = i + 1 < len(specs) and specs[i + 1].method == "ffa"
        if spec.method == "fra":
            # the round that hands A to FFA-LoRA gives it A at its initial scale
            method: LoRAMethod = FRALoRA(
                rank=cfg.rank,
                seed=cfg.seed,
                hand_over_round=end if freezes_A_next else None,
                train_head=_head(cfg),
            )
        else:
            method = build_method(spec.method, cfg)
        phases.append((method, spec.rounds))
    return Schedule(phases)


METHODS: dict[str, Callable[[Config], LoRAMethod]] = {
    "fedavg": lambda cfg: FedAvgLoRA(train_head=_head(cfg)),
    "ffa": lambda cfg: FFALoRA(train_head=_head(cfg)),
    "rolora": lambda cfg: RoLoRA(train_head=_head(cfg)),
    "fra": lambda cfg: FRALoRA(rank=cfg.rank, seed=cfg.seed, train_head=_head(cfg)),
    "fedex": lambda cfg: FedExLoRA(train_head=_head(cfg)),
    "flora": lambda cfg: FLoRA(
        client_ranks=cfg.client_ranks, rank=cfg.rank, seed=cfg.seed, train_head=_head(cfg)
    ),
    "flexlora": lambda cfg: FlexLoRA(
        client_ranks=cfg.client_ranks,
        rank=cfg.rank,
        client_alpha=cfg.client_alpha,
        seed=cfg.seed,
        train_head=_head(cfg),
    ),
    "hetlora": lambda cfg: HetLoRA(
        client_ranks=cfg.client_ranks,
        rank=cfg.rank,
        gamma=cfg.hetlora_gamma,
        client_alpha=cfg.client_alpha,
        seed=cfg.seed,
        train_head=_head(cfg),
    ),
    "lorafair": lambda cfg: LoRAFAIR(lam=cfg.fair_lambda, train_head=_head(cfg)),
    "slora": lambda cfg: SLoRA(
        slora_rounds=cfg.slora_rounds,
        density=cfg.slora_density,
        seed=cfg.seed,
        train_head=_head(cfg),
    ),
    "fedsa": lambda cfg: FedSALoRA(train_head=_head(cfg)),
    "centralized": lambda cfg: Centralized(train_head=_head(cfg)),
    "schedule": _schedule,
}
METHOD_NAMES = tuple(METHODS)
CLASSES: dict[str, type[LoRAMethod]] = {
    cls.name: cls
    for cls in (
        FedAvgLoRA,
        FFALoRA,
        RoLoRA,
        FRALoRA,
        FedExLoRA,
        FLoRA,
        FlexLoRA,
        HetLoRA,
        LoRAFAIR,
        SLoRA,
        FedSALoRA,
        Centralized,
        Schedule,
    )
}


def check_config(cfg: Config) -> None:
    """What :func:`fedlora.config.load_config` cannot know: the method names, each used
    method's own :meth:`~fedlora.methods.base.LoRAMethod.check_config`, the rules between
    methods and other keys, and whether ``dp.target_epsilon`` can be reached at all.

    Every entry that runs something calls it (the CLI, :mod:`fedlora.recipes`, the server,
    Flower's apps) before anything is written; a bad config raises one line.
    """
    for name in [cfg.method, *cfg.methods]:
        if name not in CLASSES:
            raise FedLoraError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    phases = [p.method for p in cfg.schedule or []]
    schedulable = [n for n, c in CLASSES.items() if c.schedulable]
    for i, name in enumerate(phases):
        if name not in schedulable:
            raise FedLoraError(
                f"schedule phase {i + 1}: method '{name}' cannot be scheduled "
                f"(allowed: {', '.join(schedulable)})"
            )
    used = [CLASSES[n] for n in dict.fromkeys([cfg.method, *cfg.methods, *phases])]
    for method in used:
        method.check_config(cfg)
    if cfg.client_ranks is not None:
        ranked = [n for n, c in CLASSES.items() if c.takes_client_ranks]
        if not any(m.takes_client_ranks for m in used):
            raise FedLoraError(
                f"config key 'client_ranks' needs a method with per-client ranks ({', '.join(ranked)})"
            )
        if len(cfg.client_ranks) != cfg.num_clients or min(cfg.client_ranks) < 1:
            raise FedLoraError(
                f"config key 'client_ranks' must list one rank >= 1 per client ({cfg.num_clients}), "
                f"got {cfg.client_ranks}"
            )
    folding = sorted(m.name for m in used if m.folds_base)
    if cfg.quantization != "none" and folding:
        raise FedLoraError(
            f"method {', '.join(folding)} folds increments into the frozen weights, which a "
            f"quantized ({cfg.quantization}) base cannot hold exactly: use quantization=none, "
            "or a method that keeps its update in the adapter (fedavg, ffa, rolora, fra)"
        )
    if cfg.adapter == "dora":
        # the magnitude is relative to ||W0 + s B A||: the method says whether it can carry it
        for method in used:
            if not method.carries_magnitude:
                raise FedLoraError(
                    f"adapter=dora cannot run with method {method.name}: "
                    f"{method.magnitude_refusal}; use adapter=lora"
                )
    if cfg.dp.target_epsilon is not None:
        # Imported here: Opacus is only loaded by runs that ask for a privacy budget.
        from fedlora.privacy.accounting import check_target_reachable

        check_target_reachable(
            target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta, accountant=cfg.dp.accountant
        )


def with_method_defaults(cfg: Config) -> Config:
    """``cfg`` with every per-method default filled in (``lr=null``: the method's
    ``default_lr``), so that what ``config.yaml`` records is what ran."""
    if cfg.lr is None:
        cfg = cfg.replace(lr=build_method(cfg.method, cfg).default_lr)
    return cfg


def build_method(name: str, cfg: Config) -> LoRAMethod:
    """A fresh method object (its state at round 0) for ``cfg``."""
    if name not in METHODS:
        raise FedLoraError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
    return METHODS[name](cfg)


Method = LoRAMethod  # the name the runtimes use

__all__ = [
    "Aggregate",
    "LoRAMethod",
    "Method",
    "METHODS",
    "METHOD_NAMES",
    "CLASSES",
    "build_method",
    "check_config",
    "with_method_defaults",
]
