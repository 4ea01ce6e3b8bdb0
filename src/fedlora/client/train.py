"""Local training on one client: a plain PyTorch loop over ``local_steps`` mini-batches.

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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlora.data import Encoded
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.adapter import PeftAdapter

if TYPE_CHECKING:
    from fedlora.config import Config


@dataclass(frozen=True)
class LocalTraining:
    local_steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0

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
        )


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
    adapter.set_state(state)
    params = adapter.set_trainable(plan.trained, head=plan.train_head)
    optimizer = make_optimizer(params, settings)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    generator = torch.Generator().manual_seed(client_seed(seed, plan.round, client_id))
    torch.manual_seed(client_seed(seed, plan.round, client_id))  # dropout masks
    model = adapter.model
    model.train()
    losses = []
    for idx in batch_indices(
        len(data), steps=settings.local_steps, batch_size=settings.batch_size, generator=generator
    ):
        loss = model(**data.batch(idx)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(optimizer.state_dict())
    sent = adapter.get_state(plan.trained, head=plan.train_head)
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        A=sent.A,
        B=sent.B,
        head=sent.head,
        train_loss=sum(losses) / len(losses),
        scaling=adapter.scaling(),
        steps=len(losses),
    )
