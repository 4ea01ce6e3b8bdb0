"""The in-process runtime: the round loop, with every client in one process.

One base model serves all clients: a client's state is the adapter it is sent, swapped
into the model before it trains, so K clients cost one model plus K adapters. A round:

1. ``plan = method.plan(t)``: what clients train (``A``, ``B`` or both, and the head);
2. sample ``max(1, round(client_fraction * K))`` clients (seeded);
3. each sampled client trains from the global adapter and replies with the trained tensors;
4. ``method.aggregate(...)`` combines the replies into the new global adapter (and any
   increment folded into the frozen weights, FedEx-LoRA's residual);
5. evaluate the global model on the global eval set and on every client's eval split.

Round 0 evaluates the starting model before any training.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from fedlora.client import LocalTraining, evaluate_split, train_client
from fedlora.federation import Federation, Log, stderr_log
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import Method
from fedlora.models.device import model_device
from fedlora.outputs import RunDir
from fedlora.outputs.run_dir import read_metrics
from fedlora.runtime.checkpoint import Checkpoint, capture, debug_kill, restore, save_checkpoint
from fedlora.runtime.rows import eval_due
from fedlora.runtime.server import apply_round

if TYPE_CHECKING:
    from fedlora.privacy import FederatedPrivacy


def sample_clients(client_ids: list[int], fraction: float, rng: random.Random) -> list[int]:
    count = max(1, round(fraction * len(client_ids)))
    return sorted(rng.sample(client_ids, count))


def evaluate_global(fed: Federation) -> dict[str, Any]:
    """Global eval set and every client's eval split; causal-LM data adds perplexity."""
    size = fed.cfg.eval_batch_size
    precision = fed.cfg.precision
    row: dict[str, Any] = evaluate_split(
        fed.adapter.model, fed.test, batch_size=size, precision=precision
    )
    per_client = {
        cid: evaluate_split(fed.adapter.model, splits.eval, batch_size=size, precision=precision)
        for cid, splits in fed.encoded.items()
    }
    row["client_accuracy"] = {cid: m["accuracy"] for cid, m in per_client.items()}
    if "perplexity" in row:
        row["client_perplexity"] = {cid: m["perplexity"] for cid, m in per_client.items()}
    return row


def _ppl(row: dict[str, Any]) -> str:
    return f"  perplexity {row['perplexity']:.3f}" if row.get("perplexity") is not None else ""


def _train_round(
    fed: Federation,
    method: Method,
    plan: RoundPlan,
    starts: dict[int, AdapterState],
    privacy: FederatedPrivacy | None = None,
    optimizers: dict[int, dict[str, Any]] | None = None,
) -> list[ClientUpdate]:
    cfg = fed.cfg
    settings = LocalTraining.from_config(cfg)
    if method.pools_clients:
        # Same total steps as the sampled clients together, on their pooled data.
        steps = sum(settings.steps_for(len(fed.encoded[cid].train)) for cid in starts)
        settings = replace(settings, local_steps=steps, local_epochs=None)
        jobs = [(0, next(iter(starts.values())), fed.pooled_train)]
    else:
        jobs = [(cid, start, fed.encoded[cid].train) for cid, start in starts.items()]
    if method.keeps_optimizer:
        # one ordinary run: one optimizer and one learning-rate schedule for all its rounds
        settings = replace(settings, lr_schedule_scope="run")
    updates = []
    for cid, start, data in jobs:
        train = train_client if privacy is None else privacy.trainer(cid)  # DP wraps the trainer
        kept = (
            optimizers.setdefault(cid, {})
            if method.keeps_optimizer and optimizers is not None
            else None
        )
        update = train(
            adapter=fed.adapter,
            state=start,
            data=data,
            plan=plan,
            settings=settings,
            client_id=cid,
            seed=cfg.seed,
            optimizer_state=kept,
        )
        update.check_finite()
        updates.append(update)
        debug_kill("train", plan.round)
    return updates


def run_federated(
    fed: Federation,
    method: Method,
    run_dir: RunDir,
    *,
    log: Log = stderr_log,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds of ``method``; write metrics, adapter and plots.

    A checkpoint is saved after every round (:mod:`fedlora.runtime.checkpoint`); with
    ``resume`` the loop continues after the checkpoint's round, ``metrics.jsonl`` already
    cut back to it.
    """
    cfg = fed.cfg
    state = fed.reset()
    scaling = fed.adapter.scaling()
    rng = random.Random(cfg.seed)
    client_ids = [c.client_id for c in fed.clients]
    start = time.perf_counter()
    tag = f"[{method.label}]"
    base_total: dict[str, torch.Tensor] = {}  # what has been folded into the frozen weights
    pending_delta_bytes = 0
    optimizers: dict[int, dict[str, Any]] = {}  # trainers that keep theirs (centralized)
    privacy: FederatedPrivacy | None = None
    if cfg.dp.enabled:
        from fedlora.privacy import plan_for_federation  # Opacus loads only for DP runs

        privacy = plan_for_federation(fed, pools_clients=method.pools_clients)
        log(f"{tag} {privacy.describe()}")

    def checkpoint(t: int) -> None:
        save_checkpoint(
            run_dir.path,
            capture(
                round=t,
                state=state,
                method=method,
                rng=rng,
                base_total=base_total,
                base_weight=fed.adapter.exact_base,
                pending_delta_bytes=pending_delta_bytes,
                privacy=privacy,
                optimizers=optimizers,
            ),
        )
        debug_kill("checkpoint", t)

    if resume is not None:
        rng = restore(resume, adapter=fed.adapter, method=method, privacy=privacy)
        device = model_device(fed.adapter.model)  # a checkpoint is read onto the CPU
        state = resume.state.to(device)
        base_total = {k: v.to(device) for k, v in resume.base_total.items()}
        pending_delta_bytes = resume.pending_delta_bytes
        optimizers = dict(resume.optimizers)
        rows = read_metrics(run_dir.path)
        log(f"{tag} resuming after round {resume.round}/{cfg.rounds}")
    else:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"round": 0, "method": method.name, "trained": "", "clients": []}
        row |= evaluate_global(fed)
        row |= {"upload_bytes": 0, "download_bytes": 0, "time_eval_s": time.perf_counter() - t0}
        row |= privacy.metrics() if privacy else {}
        run_dir.log_metrics(row)
        log(
            f"{tag} round 0/{cfg.rounds}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
            + _ppl(row)
        )
        rows = [row]
        checkpoint(0)

    for t in range(len(rows), cfg.rounds + 1):
        pool = client_ids if privacy is None else privacy.trainable(client_ids)
        if not pool:
            log(f"{tag} every client has spent its privacy budget: stopping after round {t - 1}")
            break
        plan = method.plan(t)
        sampled = sample_clients(pool, cfg.client_fraction, rng)
        download = (state.nbytes() + pending_delta_bytes) * len(sampled)

        t0 = time.perf_counter()
        starts = {cid: method.client_start(state, client_id=cid, plan=plan) for cid in sampled}
        updates = _train_round(fed, method, plan, starts, privacy, optimizers)
        t_train = time.perf_counter() - t0

        t0 = time.perf_counter()
        result, row = apply_round(
            method=method,
            plan=plan,
            state=state,
            starts=starts,
            updates=updates,
            weighting=cfg.weighting,
            scaling=scaling,
            adapter=fed.adapter,
            base_total=base_total,
            download_bytes=download,
            clients=sampled,  # centralized replies as one trainer for all of them
        )
        pending_delta_bytes = result.delta_bytes
        state = result.state
        t_agg = time.perf_counter() - t0

        if privacy is not None:
            for cid in privacy.end_round() if t < cfg.rounds else []:
                log(
                    f"{tag} client {cid} stops training: one more round would exceed "
                    f"dp.target_epsilon={cfg.dp.target_epsilon:g}"
                )
            row |= privacy.metrics()
        t0 = time.perf_counter()
        due = eval_due(t, every=cfg.eval_every, rounds=cfg.rounds)
        row |= evaluate_global(fed) if due else {"accuracy": None, "loss": None}
        row |= {
            "time_train_s": t_train,
            "time_aggregate_s": t_agg,
            "time_eval_s": time.perf_counter() - t0,
            "elapsed_s": time.perf_counter() - start,
        }
        run_dir.log_metrics(row)
        debug_kill("metrics", t)
        checkpoint(t)
        rows.append(row)
        acc = f"accuracy {row['accuracy']:.4f}{_ppl(row)}" if due else "accuracy -"
        log(
            f"{tag} round {t}/{cfg.rounds} trained {plan.trained:<2} {acc}  "
            f"train loss {row['train_loss']:.4f}  up {row['upload_bytes'] / 1e6:.3f} MB  "
            f"{row['elapsed_s']:.0f}s"
            + (f"  epsilon <= {max(row['epsilon'].values()):.3f}" if privacy else "")
        )
    method_state = method.state_dict()
    fed.adapter.save(run_dir.adapter_dir, state, base_total)
    return {
        "rows": rows,
        "state": state,
        "method_state": method_state,
        "privacy": privacy.summary() if privacy else None,
        "wall_time_s": time.perf_counter() - start,
    }
