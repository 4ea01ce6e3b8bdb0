"""The in-process runtime: every client in one process, the round loop in one function.

One base model serves all clients: a client's state is the adapter it is sent, swapped
into the model before it trains, so K clients cost one model plus K adapters. The server's
half of a round (plan, sampling, aggregation, folding, bytes, rows, checkpoints) is
:class:`fedlora.runtime.server.Server`; this module trains the sampled clients and
evaluates:

1. ``start = server.begin_round(t)``: the plan, the sampled clients, each one's start;
2. each sampled client trains from its start (:func:`fedlora.client.train_client`);
3. ``row = server.finish_round(start, updates)``: the new global adapter;
4. evaluate the global model on the global eval set and on every client's eval split,
   and ``server.end_round(row, evaluation)``.

Round 0 evaluates the starting model before any training.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedlora.client import LocalTraining, evaluate_split, train_client
from fedlora.client.lockstep import train_in_lockstep
from fedlora.client.state import ClientStore, evaluate_personal
from fedlora.federation import Federation
from fedlora.log import Log, stderr_log
from fedlora.messages import ClientUpdate
from fedlora.methods import Method
from fedlora.outputs import RunDir
from fedlora.runtime.checkpoint import Checkpoint, debug_kill
from fedlora.runtime.rows import personal_row
from fedlora.runtime.server import RoundStart, Server, sample_clients

if TYPE_CHECKING:
    from fedlora.privacy import FederatedPrivacy

__all__ = ["evaluate_global", "run_federated", "sample_clients"]


def evaluate_global(fed: Federation, store: ClientStore | None = None) -> dict[str, Any]:
    """Global eval set and every client's eval split; causal-LM data adds perplexity.
    With stateful clients (``store``) each client's own model on its eval split too."""
    size = fed.cfg.eval_batch_size
    precision = fed.cfg.precision
    row: dict[str, Any] = evaluate_split(
        fed.adapter.model, fed.test, batch_size=size, precision=precision
    )
    per_client = {
        cid: evaluate_split(fed.adapter.model, splits.eval, batch_size=size, precision=precision)
        for cid, splits in fed.encoded.items()
        if len(splits.eval)  # max_client_eval_examples=0: clients are not evaluated
    }
    row |= fed.eval_counts()
    row["client_accuracy"] = {cid: m["accuracy"] for cid, m in per_client.items()}
    if "perplexity" in row:
        row["client_perplexity"] = {cid: m["perplexity"] for cid, m in per_client.items()}
    if store is not None:
        splits = {cid: s.eval for cid, s in fed.encoded.items()}
        personal = evaluate_personal(
            adapter=fed.adapter,
            store=store,
            splits=splits,
            evaluate=lambda data: evaluate_split(
                fed.adapter.model, data, batch_size=size, precision=precision
            ),
        )
        row |= personal_row(personal, {cid: len(d) for cid, d in splits.items()})
    return row


def _train_round(
    fed: Federation,
    method: Method,
    start: RoundStart,
    privacy: FederatedPrivacy | None,
    optimizers: dict[int, dict[str, Any]],
    store: ClientStore | None = None,
) -> list[ClientUpdate]:
    cfg, plan, starts = fed.cfg, start.plan, start.starts
    settings = LocalTraining.from_config(cfg)
    if method.pools_clients:
        # Same total steps as the sampled clients together, on their pooled data.
        steps = sum(settings.steps_for(len(fed.encoded[cid].train)) for cid in starts)
        settings = replace(settings, local_steps=steps, local_epochs=None)
        jobs = [(0, next(iter(starts.values())), fed.pooled_train)]
    else:
        jobs = [(cid, state, fed.encoded[cid].train) for cid, state in starts.items()]
    if method.keeps_optimizer:
        # one ordinary run: one optimizer and one learning-rate schedule for all its rounds
        settings = replace(settings, lr_schedule_scope="run")
    if cfg.client_parallel > 1 and privacy is None and store is None and not method.keeps_optimizer:
        # groups of client_parallel clients train in lockstep: one forward and backward pass
        # per step, each client's own update (fedlora.client.lockstep)
        updates = train_in_lockstep(
            adapter=fed.adapter,
            jobs=jobs,
            plan=plan,
            settings=settings,
            seed=cfg.seed,
            group_size=cfg.client_parallel,
        )
        for update in updates:
            update.check_finite()
        debug_kill("train", plan.round)
        return updates
    updates = []
    for cid, state, data in jobs:
        train = train_client if privacy is None else privacy.trainer(cid)  # DP wraps the trainer
        if store is not None:  # the client's own private part in, only the shared part out
            train = store.trainer(train)
        kept = optimizers.setdefault(cid, {}) if method.keeps_optimizer else None
        update = train(
            adapter=fed.adapter,
            state=state,
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
    """Run ``cfg.rounds`` rounds of ``method``; write metrics, checkpoints and the adapter.

    With ``resume`` the loop continues after the checkpoint's round.
    """
    cfg = fed.cfg
    privacy: FederatedPrivacy | None = None
    if cfg.dp.enabled:
        from fedlora.privacy import plan_for_federation  # Opacus loads only for DP runs

        privacy = plan_for_federation(fed, pools_clients=method.pools_clients)
        log(f"[{method.label}] {privacy.describe()}")
    server = Server(
        fed=fed, method=method, run_dir=run_dir, log=log, privacy=privacy, resume=resume
    )
    if server.needs_round_zero:
        t0 = time.perf_counter()
        first = evaluate_global(fed, server.client_store)
        server.end_round(server.start_row() | {"time_eval_s": time.perf_counter() - t0}, first)
    for t in server.rounds():
        start = server.begin_round(t)
        if start is None:
            break
        updates = _train_round(fed, method, start, privacy, server.optimizers, server.client_store)
        row = server.finish_round(start, updates)
        t0 = time.perf_counter()
        evaluation = evaluate_global(fed, server.client_store) if server.eval_due(t) else None
        row["time_eval_s"] = time.perf_counter() - t0
        server.end_round(row, evaluation)
    return server.finish()
