"""Checkpoints after every round, so ``fedlora run --resume RUN_DIR`` continues a killed run.

A checkpoint is everything the next round depends on: the global adapter (factors, head
and a DoRA adapter's magnitude vectors), the frozen weights that aggregation changed (FedEx-LoRA, FLoRA fold increments into
them), their running sum (saved with the final adapter), the method's state (RoLoRA's
phase, a schedule's switch), the client-sampling RNG, the DP accountants, the optimizer state of a trainer that keeps one across rounds (the
centralized baseline), the private parts that stateful clients keep between rounds
(FedSA-LoRA's ``B``, held by the in-process runtime's server process), and the round.
Federated client training needs nothing else: its batches and dropout are seeded from
``(seed, round, client)`` and its optimizer is fresh every round.

On disk, in ``RUN_DIR/checkpoint/``: ``round-<t>.safetensors`` (the tensors) and
``checkpoint.json`` (the rest, naming the tensor file). Both are written to a temporary
name and renamed; renaming ``checkpoint.json`` is the commit point, so a kill at any moment
leaves the previous complete checkpoint in place. The frozen weights are saved as they
are, not recomputed as ``W0 + sum(deltas)``: floating-point addition is not associative,
and the resumed run must match an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState

CHECKPOINT_DIR = "checkpoint"
INDEX = "checkpoint.json"
_GROUPS = ("A", "B", "head", "magnitude", "base_total", "base", "optim", "clients")


@dataclass(frozen=True)
class Checkpoint:
    """The server's state at the end of ``round`` (0: before any training)."""

    round: int
    state: AdapterState
    method_state: dict[str, Any]
    rng_state: Any  # random.Random.getstate() of the client sampler
    base_total: dict[str, torch.Tensor]  # sum of the increments folded into the base
    base: dict[str, torch.Tensor]  # the frozen weights of those layers, exactly
    pending_delta_bytes: int = 0
    privacy: dict[str, Any] | None = None
    optimizers: dict[int, dict[str, Any]] = field(default_factory=dict)  # client -> state_dict
    # the private parts stateful clients keep (FedSA-LoRA's B), ClientStore.state_dict()
    clients: dict[str, torch.Tensor] = field(default_factory=dict)


def _split_optimizers(
    optimizers: dict[int, dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dicts as safetensors tensors plus a JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for cid, sd in optimizers.items():
        scalars: dict[str, dict[str, Any]] = {}
        for idx, values in sd["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{cid}/{idx}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[str(cid)] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def _join_optimizers(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    optimizers: dict[int, dict[str, Any]] = {
        int(cid): {"state": {}, "param_groups": m["param_groups"]} for cid, m in meta.items()
    }
    for cid, m in meta.items():
        for idx, values in m["scalars"].items():
            optimizers[int(cid)]["state"].setdefault(int(idx), {}).update(values)
    for key, value in tensors.items():
        cid, idx, name = key.split("/", 2)
        optimizers[int(cid)]["state"].setdefault(int(idx), {})[name] = value
    return optimizers


def _tuples(value: Any) -> Any:
    """JSON turned ``random.getstate()``'s tuples into lists: turn them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(run_path: Path, ckpt: Checkpoint) -> None:
    directory = Path(run_path) / CHECKPOINT_DIR
    directory.mkdir(exist_ok=True)
    groups = {
        "A": ckpt.state.A,
        "B": ckpt.state.B,
        "head": ckpt.state.head,
        "magnitude": ckpt.state.magnitude,
        "base_total": ckpt.base_total,
        "base": ckpt.base,
        "clients": ckpt.clients,
    }
    optim_tensors, optim_meta = _split_optimizers(ckpt.optimizers)
    groups["optim"] = optim_tensors
    tensors = {  # to the CPU here, at the boundary: the run itself keeps them on its device
        f"{group}/{name}": t.detach().cpu().contiguous()
        for group, values in groups.items()
        for name, t in values.items()
    }
    name = f"round-{ckpt.round:05d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / name)
    index = {
        "round": ckpt.round,
        "tensors": name,
        "method_state": ckpt.method_state,
        "rng_state": ckpt.rng_state,
        "pending_delta_bytes": ckpt.pending_delta_bytes,
        "privacy": ckpt.privacy,
        "optimizers": optim_meta,
    }
    tmp = directory / (INDEX + ".tmp")
    with tmp.open("w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / INDEX)
    for old in directory.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run_path: Path) -> Checkpoint | None:
    """The last committed checkpoint of a run, or None if it never finished round 0."""
    index_path = Path(run_path) / CHECKPOINT_DIR / INDEX
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    flat = load_file(str(index_path.parent / index["tensors"]))
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _GROUPS}
    for key, tensor in flat.items():
        group, _, name = key.partition("/")
        groups[group][name] = tensor
    return Checkpoint(
        round=int(index["round"]),
        state=AdapterState(
            A=groups["A"], B=groups["B"], head=groups["head"], magnitude=groups["magnitude"]
        ),
        method_state=index["method_state"],
        rng_state=_tuples(index["rng_state"]),
        base_total=groups["base_total"],
        base=groups["base"],
        pending_delta_bytes=int(index["pending_delta_bytes"]),
        privacy=index["privacy"],
        optimizers=_join_optimizers(groups["optim"], index.get("optimizers", {})),
        clients=groups["clients"],
    )


def truncate_metrics(metrics_path: Path, last_round: int | None) -> list[dict[str, Any]]:
    """Keep the rows of rounds up to ``last_round`` (None: none), dropping a partial last
    line or rows written after the checkpoint; rewrite the file atomically."""
    kept: list[dict[str, Any]] = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill: nothing after it was committed
            if last_round is not None and row["round"] <= last_round:
                kept.append(row)
    if last_round is not None and [r["round"] for r in kept] != list(range(last_round + 1)):
        raise FedLoraError(f"{metrics_path} does not hold rounds 0..{last_round} of its checkpoint")
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, metrics_path)
    return kept


def restore_rng(ckpt: Checkpoint) -> random.Random:
    rng = random.Random()
    rng.setstate(ckpt.rng_state)
    return rng


def debug_kill(point: str, round: int) -> None:
    """Test hook: ``FEDLORA_DEBUG_KILL=<point>:<round>`` sends this process SIGKILL (as
    ``kill -9`` would) when it reaches ``point`` in ``round``. Points: ``train`` (mid-round,
    after the first client trained), ``metrics`` (after the round's metrics row, before its
    checkpoint), ``checkpoint`` (after the checkpoint)."""
    if os.environ.get("FEDLORA_DEBUG_KILL") == f"{point}:{round}":
        os.kill(os.getpid(), signal.SIGKILL)


def capture(
    *,
    round: int,
    state: AdapterState,
    method: Any,
    rng: random.Random,
    base_total: dict[str, torch.Tensor],
    base_weight: Any,
    pending_delta_bytes: int,
    privacy: Any | None,
    optimizers: dict[int, dict[str, Any]] | None = None,
    clients: dict[str, torch.Tensor] | None = None,
) -> Checkpoint:
    """The loop's state at the end of ``round`` (``base_weight(layer)`` reads a frozen weight)."""
    return Checkpoint(
        round=round,
        state=state,
        method_state=method.state_dict(),
        rng_state=rng.getstate(),
        base_total=dict(base_total),
        base={k: base_weight(k) for k in base_total},
        pending_delta_bytes=pending_delta_bytes,
        privacy=privacy.state_dict() if privacy is not None else None,
        optimizers=dict(optimizers or {}),
        clients=dict(clients or {}),
    )


@torch.no_grad()
def restore(ckpt: Checkpoint, *, adapter: Any, method: Any, privacy: Any | None) -> random.Random:
    """Put the model, the method and the accountants back as they were; return the sampler."""
    for layer, weight in ckpt.base.items():
        adapter.set_base(layer, weight)
    adapter.set_state(ckpt.state)
    method.load_state_dict(ckpt.method_state)
    if privacy is not None:
        if ckpt.privacy is None:
            raise FedLoraError("the checkpoint holds no privacy state, but this run uses DP")
        privacy.load_state_dict(ckpt.privacy)
    return restore_rng(ckpt)
