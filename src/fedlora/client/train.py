"""Local training on one client: a plain PyTorch loop over ``local_steps`` optimizer steps
(or ``local_epochs`` of its data; see :class:`LocalTraining`).

Each round the client loads the global adapter it was sent, unfreezes only what the
round's :class:`~fedlora.messages.RoundPlan` trains, and builds a **fresh optimizer**
(no Adam moments carry over between rounds: the factors it would refer to may have been
replaced by aggregation, and a client need not be sampled twice in a row). The one
exception is a trainer that is a single ordinary run (the centralized baseline): the
runtime passes the optimizer state it keeps (``optimizer_state``), which is loaded before
the first step and replaced by the new state after the last. Batches are
drawn by a generator seeded from ``(seed, round, client)``, so a run is reproducible on
CPU and a client's data order does not depend on which other clients were sampled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlora.data import Encoded
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.adapter import PeftAdapter
from fedlora.models.device import autocast, model_device, to_device
from fedlora.models.prefix import feed

if TYPE_CHECKING:
    from fedlora.config import Config


@dataclass(frozen=True)
class LocalTraining:
    """What one client does in a round.

    ``local_epochs``, when set, wins over ``local_steps``: the client takes
    ``ceil(local_epochs * n / (batch_size * grad_accum_steps))`` optimizer steps on its
    ``n`` examples, so a larger client does more steps (the papers' local epochs).
    Each optimizer step accumulates ``grad_accum_steps`` mini-batches of ``batch_size``
    (effective batch ``batch_size x grad_accum_steps``). ``lr_scheduler`` (transformers'
    ``get_scheduler``: ``constant``, ``linear``, ``cosine``, with ``warmup_ratio`` of the
    steps warming up) runs over each round's steps (``lr_schedule_scope="round"``) or over
    the whole run's (``"run"``: a client's round ``t`` continues the schedule at step
    ``(t - 1) x steps``). ``max_grad_norm`` clips the norm of all trained gradients
    together before each step (outside DP; DP-SGD clips per example, ``dp.max_grad_norm``).
    """

    local_steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    local_epochs: float | None = None
    grad_accum_steps: int = 1
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    lr_schedule_scope: str = "round"
    rounds: int = 1
    max_grad_norm: float | None = None
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg: Config) -> LocalTraining:
        """The settings every runtime gives a client for ``cfg`` (``lr=null``: the method's
        default learning rate)."""
        from fedlora.methods import with_method_defaults  # the methods import this package

        return cls(
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=with_method_defaults(cfg).lr,  # type: ignore[arg-type]
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            local_epochs=cfg.local_epochs,
            grad_accum_steps=cfg.grad_accum_steps,
            lr_scheduler=cfg.lr_scheduler,
            warmup_ratio=cfg.warmup_ratio,
            lr_schedule_scope=cfg.lr_schedule_scope,
            rounds=cfg.rounds,
            max_grad_norm=cfg.max_grad_norm,
            precision=cfg.precision,
        )

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps a client with ``num_examples`` examples takes in one round."""
        if self.local_epochs is None:
            return self.local_steps
        per_step = min(self.batch_size, num_examples) * self.grad_accum_steps
        return max(1, math.ceil(self.local_epochs * num_examples / per_step))


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: LocalTraining, *, steps: int, round: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule for this round's ``steps``, positioned where it stands."""
    from transformers import get_scheduler

    scope_run = settings.lr_schedule_scope == "run"
    total = steps * settings.rounds if scope_run else steps
    scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer,
        num_warmup_steps=round_half_up(settings.warmup_ratio * total),
        num_training_steps=total,
    )
    if scope_run and round > 1:
        # Fast-forward to this round's first step (no optimizer step is taken here).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range((round - 1) * steps):
                scheduler.step()
    return scheduler


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_optimizer(
    params: list[torch.nn.Parameter], settings: LocalTraining
) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def client_seed(seed: int, round: int, client_id: int) -> int:
    return (seed * 1_000_003 + round * 10_007 + client_id) % (2**63 - 1)


def batch_indices(
    n: int, *, steps: int, batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``steps`` batches that walk through shuffled epochs of ``n`` examples."""
    batches: list[torch.Tensor] = []
    order = torch.randperm(n, generator=generator)
    cursor = 0
    size = min(batch_size, n)
    for _ in range(steps):
        if cursor + size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        batches.append(order[cursor : cursor + size])
        cursor += size
    return batches


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    params: Sequence[torch.Tensor],
    *,
    max_grad_norm: float | None,
) -> None:
    """One optimizer step from the accumulated gradients: unscale (fp16), clip, step, and
    advance the learning-rate schedule."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_client(
    *,
    adapter: PeftAdapter,
    state: AdapterState,
    data: Encoded,
    plan: RoundPlan,
    settings: LocalTraining,
    client_id: int,
    seed: int,
    optimizer_state: dict[str, Any] | None = None,
) -> ClientUpdate:
    """Train from ``state`` on ``data`` and return the trained tensors only.

    ``optimizer_state``: a dict the caller keeps across rounds for a trainer whose optimizer
    persists (empty the first time); updated in place with the optimizer's state.
    """
    if plan.trained == "W":  # SLoRA's first stage: the frozen weights, on a sparse mask
        from fedlora.client.sparse import train_sparse  # it imports this module

        return train_sparse(
            adapter=adapter,
            state=state,
            data=data,
            plan=plan,
            settings=settings,
            client_id=client_id,
            seed=seed,
        )
    adapter.set_state(state)
    params = adapter.set_trainable(
        plan.trained, head=plan.train_head, magnitude=plan.trains_magnitude
    )
    optimizer = make_optimizer(params, settings)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    steps = settings.steps_for(len(data))
    scheduler = make_scheduler(optimizer, settings, steps=steps, round=plan.round)
    accum = settings.grad_accum_steps
    generator = torch.Generator().manual_seed(client_seed(seed, plan.round, client_id))
    torch.manual_seed(client_seed(seed, plan.round, client_id))  # dropout masks
    model = adapter.model
    device = model_device(model)
    # fp16 autocast needs loss scaling (CUDA only, see models.device.check_precision)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    model.train()
    losses = []
    micro = batch_indices(
        len(data), steps=steps * accum, batch_size=settings.batch_size, generator=generator
    )
    for i, idx in enumerate(micro):
        with autocast(settings.precision, device), feed(model, data, idx):  # prefix_cache
            loss = model(**to_device(data.batch(idx), device)).loss
        scaled = loss / accum if accum > 1 else loss
        (scaler.scale(scaled) if scaler else scaled).backward()
        losses.append(loss.item())
        if (i + 1) % accum:
            continue
        optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm=settings.max_grad_norm)
    model.eval()
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(optimizer.state_dict())
    sent = adapter.get_state(plan.trained, head=plan.train_head, magnitude=plan.trains_magnitude)
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        A=sent.A,
        B=sent.B,
        head=sent.head,
        train_loss=sum(losses) / len(losses),
        scaling=adapter.scaling(),
        steps=steps,
        magnitude=sent.magnitude,  # DoRA's, when the round trained it
    )
