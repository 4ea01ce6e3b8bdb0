"""Clients in lockstep (config key ``client_parallel``): a group of sampled clients trains
together, one forward and one backward pass per local step over their concatenated
batches, with the same updates as training them one after another.

Each client keeps everything :func:`fedlora.client.train_client` gives it: its batches
(drawn from its own generator seeded by ``(seed, round, client)``), its step count, its
learning-rate schedule, gradient accumulation and clipping. Only the arithmetic is shared:

- **Forward.** The group's micro-batches are one batch, the frozen base runs once over all
  of its rows, and each LoRA layer and the head apply client ``k``'s own tensors to client
  ``k``'s rows (:class:`fedlora.models.stacked.StackedAdapters`: ``A`` stacked as
  ``(K, r, in)``, ``B`` as ``(K, out, r)``).
- **Backward.** The loss is ``sum_k L_k``, each ``L_k`` computed on client ``k``'s rows as the
  model computes it on a batch of that client alone (the mean over its rows or labelled
  tokens). Client ``k``'s slice of a stacked tensor reaches no other client's rows, so its
  gradient there is ``grad L_k``.
- **Step.** One optimizer over the stacked tensors, with the run's hyper-parameters. Adam(W)
  and SGD are element-wise, and the group's clients share the step count and so the
  learning rate of every step (groups are formed that way), so each slice takes exactly
  the step the client's own ``torch.optim.AdamW`` takes (Loshchilov & Hutter, arXiv
  1711.05101, Algorithm 2: ``m``, ``v`` and their bias correction are per element).
  ``max_grad_norm`` clips each client's gradients by that client's own norm, as
  ``torch.nn.utils.clip_grad_norm_`` does for one client.

Why not ``torch.func.vmap`` over the model with stacked parameters: transformers' forward
builds attention masks with data-dependent control flow, which ``vmap`` refuses (seen with
torch 2.13 / transformers 5.23 on the tiny BERT), and the frozen-prefix cache feeds states
through a replaced forward; a concatenated batch runs the model's own forward unchanged
and gives the base the same single matmul over all rows.

Not bit-identical: the base's matmuls run over more rows (another summation order), so an
update equals the sequential one to float rounding (tested to 1e-5 in float32 without
dropout). With dropout on, the group draws its masks from one stream (seeded by its first
client), not each client's own: the same distribution, other draws.

What trains one after another instead (:func:`lockstep_refusal`; docs/configuration.md):
a group of one, SLoRA's sparse rounds (``trained == "W"``), fp16 (one gradient scaler would
skip every client's step when one overflows), DoRA and LoRA layers other than a plain
``lora.Linear``. Clients are grouped by step count and rank first, so clients with
different ``local_epochs`` steps or ranks (FLoRA, FlexLoRA, HetLoRA) train in separate
groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fedlora.client.train import (
    LocalTraining,
    batch_indices,
    client_seed,
    make_optimizer,
    make_scheduler,
    train_client,
)
from fedlora.data import Encoded
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.adapter import PeftAdapter
from fedlora.models.device import autocast, model_device, to_device
from fedlora.models.stacked import StackedAdapters, client_losses, stack_refusal

Job = tuple[int, AdapterState, Encoded]  # (client id, the adapter it starts from, its data)


def lockstep_refusal(adapter: PeftAdapter, plan: RoundPlan, settings: LocalTraining) -> str | None:
    """Why this round's clients train one after another instead, or None."""
    if plan.trained == "W":
        return "SLoRA's sparse rounds train the frozen weights, not stacked factors"
    if settings.precision == "fp16":
        return "one fp16 gradient scaler would skip every client's step when one overflows"
    return stack_refusal(adapter)


def train_in_lockstep(
    *,
    adapter: PeftAdapter,
    jobs: Sequence[Job],
    plan: RoundPlan,
    settings: LocalTraining,
    seed: int,
    group_size: int,
) -> list[ClientUpdate]:
    """Every job's update, in the order of ``jobs``: clients of equal step count and rank in
    groups of up to ``group_size`` trained together (:func:`train_clients_lockstep`), the rest
    (and every client of a round :func:`lockstep_refusal` refuses) by :func:`train_client`."""
    refused = lockstep_refusal(adapter, plan, settings) is not None
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, state, data) in enumerate(jobs):
        groups.setdefault((settings.steps_for(len(data)), _rank(state)), []).append(i)
    updates: dict[int, ClientUpdate] = {}
    for members in groups.values():
        for at in range(0, len(members), group_size):
            chunk = members[at : at + group_size]
            if refused or len(chunk) == 1:
                for i in chunk:
                    cid, state, data = jobs[i]
                    updates[i] = train_client(
                        adapter=adapter,
                        state=state,
                        data=data,
                        plan=plan,
                        settings=settings,
                        client_id=cid,
                        seed=seed,
                    )
                continue
            trained = train_clients_lockstep(
                adapter=adapter,
                jobs=[jobs[i] for i in chunk],
                plan=plan,
                settings=settings,
                seed=seed,
            )
            updates.update(zip(chunk, trained, strict=True))
    return [updates[i] for i in range(len(jobs))]


def _rank(state: AdapterState) -> int:
    if state.A:
        return int(next(iter(state.A.values())).shape[0])
    return int(next(iter(state.B.values())).shape[1]) if state.B else 0


def train_clients_lockstep(
    *,
    adapter: PeftAdapter,
    jobs: Sequence[Job],
    plan: RoundPlan,
    settings: LocalTraining,
    seed: int,
) -> list[ClientUpdate]:
    """Train ``jobs`` (clients of one rank and one step count) together; each update is the
    one :func:`train_client` returns for that client, to float rounding."""
    reason = lockstep_refusal(adapter, plan, settings)
    if reason is not None:
        raise ValueError(f"these clients cannot train in lockstep: {reason}")
    steps = {settings.steps_for(len(data)) for _, _, data in jobs}
    if len(steps) != 1 or len({_rank(state) for _, state, _ in jobs}) != 1:
        raise ValueError("clients in lockstep need one step count and one rank")
    (step_count,) = steps
    cids = [cid for cid, _, _ in jobs]
    datas = [data for _, _, data in jobs]
    adapter.set_state(jobs[0][1])  # the adapter of the group's rank, as train_client sets it
    adapter.set_trainable(plan.trained, head=plan.train_head, magnitude=plan.trains_magnitude)
    stack = StackedAdapters(
        adapter, [state for _, state, _ in jobs], trained=plan.trained, train_head=plan.train_head
    )
    params = stack.parameters()
    optimizer = make_optimizer(params, settings)  # type: ignore[arg-type]  # leaves, not Parameters
    scheduler = make_scheduler(optimizer, settings, steps=step_count, round=plan.round)
    accum = settings.grad_accum_steps
    micro = [
        batch_indices(
            len(data),
            steps=step_count * accum,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(client_seed(seed, plan.round, cid)),
        )
        for cid, data in zip(cids, datas, strict=True)
    ]
    torch.manual_seed(client_seed(seed, plan.round, cids[0]))  # dropout masks: one stream
    model = adapter.model
    device = model_device(model)
    model.train()
    losses: list[torch.Tensor] = []
    for i in range(step_count * accum):
        rows = [batches[i] for batches in micro]
        parts = [data.batch(idx) for data, idx in zip(datas, rows, strict=True)]
        inputs = _concat(parts)
        sizes = [len(idx) for idx in rows]
        with (
            autocast(settings.precision, device),
            _feed(model, datas, rows, width=inputs["input_ids"].shape[1]),
            stack.applied(sizes),
        ):
            logits = model(**to_device(inputs, device)).logits
            per_client = client_losses(model, logits, [p["labels"] for p in parts])
        total = per_client.sum()
        (total / accum if accum > 1 else total).backward()
        losses.append(per_client.detach())
        if (i + 1) % accum:
            continue
        if settings.max_grad_norm is not None:
            clip_per_client(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    # the model holds the last client's trained adapter, as after train_client
    last = stack.client_state(len(jobs) - 1, full=True)
    adapter.set_state(AdapterState(A=last.A, B=last.B, head=last.head or jobs[-1][1].head))
    mean_loss = torch.stack(losses).to(torch.float64).mean(dim=0).tolist()
    scaling = adapter.scaling()
    updates = []
    for k, (cid, data) in enumerate(zip(cids, datas, strict=True)):
        sent = stack.client_state(k)
        updates.append(
            ClientUpdate(
                client_id=cid,
                num_examples=len(data),
                A=sent.A,
                B=sent.B,
                head=sent.head,
                train_loss=float(mean_loss[k]),
                scaling=scaling,
                steps=step_count,
            )
        )
    return updates


@torch.no_grad()
def clip_per_client(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each client's slice (dim 0) of the
    stacked ``params`` on its own: the norm of all of a client's gradients together, the
    factor ``min(1, max_norm / (norm + 1e-6))``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(
        [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1
    )  # (K, tensors)
    total = torch.linalg.vector_norm(norms, dim=1)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))


def _concat(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The clients' model inputs as one batch, right-padded to the widest (padding is
    masked, so a row's real positions compute what they compute in its own batch)."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        if key == "labels":
            continue
        out[key] = torch.cat(
            [torch.nn.functional.pad(p[key], (0, width - p[key].shape[1])) for p in parts]
        )
    return out


@contextlib.contextmanager
def _feed(
    model: torch.nn.Module, datas: Sequence[Encoded], rows: Sequence[torch.Tensor], *, width: int
) -> Iterator[None]:
    """The frozen-prefix cache (:mod:`fedlora.models.prefix`) for the concatenated batch:
    each client's cached states, right-padded with zeros to ``width`` (masked positions),
    fed as one."""
    cached = [d.prefix is not None and d.prefix.prefix.model is model for d in datas]
    if not any(cached):
        yield
        return
    if not all(cached):
        raise RuntimeError("clients in lockstep with and without a prefix cache")
    held = []
    for data, idx in zip(datas, rows, strict=True):
        assert data.prefix is not None
        states = data.prefix.gather(data, idx)
        held.append(torch.nn.functional.pad(states, (0, 0, 0, width - states.shape[1])))
    prefix = datas[0].prefix
    assert prefix is not None
    with prefix.prefix.feeding(torch.cat(held)):
        yield
