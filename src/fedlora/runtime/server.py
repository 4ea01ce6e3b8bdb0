"""The server of a federated run, one object for every runtime.

:class:`Server` owns everything the server knows: the global adapter, the method and its
state, the client sampler's RNG, what has been folded into the frozen weights, the bytes
owed to the next download, the DP accountants a simulation keeps for its clients, the
metrics rows and the checkpoint. A round is two calls:

``begin_round(t) -> RoundStart``
    the method's plan, the sampled clients and the adapter each is sent;
``finish_round(start, updates) -> row``
    weigh the replies, aggregate, fold what the method folds, load the new global adapter,
    and build the round's metrics row (bytes, steps, the aggregation error);

then ``end_round(row, evaluation)`` adds the evaluation and timings, writes the row and the
checkpoint and prints the progress line. A runtime is a loop that calls these and trains
the clients (:mod:`fedlora.runtime.inprocess`) or a Flower strategy that translates them to
and from messages (:mod:`fedlora.runtime.flower.strategy`); neither holds server logic.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlora.client.state import ClientStore, shared_part
from fedlora.federation import Federation
from fedlora.log import Log
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import Aggregate, LoRAMethod, check_config
from fedlora.methods.base import client_weights, update_measures
from fedlora.models.device import model_device
from fedlora.outputs import RunDir
from fedlora.outputs.run_dir import read_metrics
from fedlora.runtime.checkpoint import Checkpoint, capture, debug_kill, restore, save_checkpoint
from fedlora.runtime.rows import eval_due, progress_line, round_row, start_row

if TYPE_CHECKING:
    from fedlora.privacy import FederatedPrivacy, ReportedPrivacy


def sample_clients(client_ids: Sequence[int], fraction: float, rng: random.Random) -> list[int]:
    """``max(1, round(fraction * K))`` clients, seeded, sorted."""
    count = max(1, round(fraction * len(client_ids)))
    return sorted(rng.sample(list(client_ids), count))


@dataclass(frozen=True)
class RoundStart:
    """What the server decided at the start of a round.

    ``starts[c]`` is the adapter client ``c`` trains from (the global one, unless the method
    restarts clients from their own: FLoRA), without the parts clients keep themselves
    (:attr:`~fedlora.methods.base.LoRAMethod.private`); ``download_bytes`` what sending it costs in
    all, the method's communication cost (the adapter plus last round's folded increment,
    in the form the method sends it, per sampled client).
    """

    plan: RoundPlan
    clients: list[int]
    starts: dict[int, AdapterState]
    download_bytes: int
    started: float  # perf_counter() when the round began


class Server:
    """One federated run's server: ``begin_round`` / ``finish_round`` / ``end_round``.

    ``privacy``: the clients' DP accountants when this process keeps them (in-process),
    or what remote clients report of their own (Flower: ``ReportedPrivacy``); a sampled
    pool then leaves out clients whose budget is spent. ``resume``: continue
    after a checkpoint's round, ``metrics.jsonl`` already cut back to it.
    """

    def __init__(
        self,
        *,
        fed: Federation,
        method: LoRAMethod,
        run_dir: RunDir,
        log: Log,
        privacy: FederatedPrivacy | ReportedPrivacy | None = None,
        resume: Checkpoint | None = None,
    ) -> None:
        check_config(fed.cfg)  # library callers reach here with a Config of their own
        self.fed = fed
        self.cfg = fed.cfg
        self.method = method
        self.run_dir = run_dir
        self.log = log
        self.privacy = privacy
        self.tag = f"[{method.label}]"
        self.client_ids = list(range(self.cfg.num_clients))
        self.state = fed.reset()
        self.scaling = fed.adapter.scaling()
        self.rng = random.Random(self.cfg.seed)
        self.base_total: dict[str, torch.Tensor] = {}  # everything folded into the base
        self.pending_delta_bytes = 0  # last round's increment, owed to the next download
        self.optimizers: dict[int, dict[str, Any]] = {}  # trainers that keep theirs
        self.rows: list[dict[str, Any]] = []
        self.train_sizes: dict[int, int] = {}  # what remote clients report holding
        self.started = time.perf_counter()
        # Stateful clients' private parts (FedSA-LoRA's B), when this process holds them
        # (in-process); on Flower each SuperNode keeps its own and this store stays empty.
        self.client_store: ClientStore | None = None
        if method.private:
            self.client_store = ClientStore(self.state, private=method.private)
        if resume is not None:
            self.rng = restore(resume, adapter=fed.adapter, method=method, privacy=privacy)
            device = model_device(fed.adapter.model)  # a checkpoint is read onto the CPU
            self.state = resume.state.to(device)
            self.base_total = {k: v.to(device) for k, v in resume.base_total.items()}
            self.pending_delta_bytes = resume.pending_delta_bytes
            self.optimizers = dict(resume.optimizers)
            self.rows = read_metrics(run_dir.path)
            if self.client_store is not None:
                self.client_store.load_state_dict(
                    {k: v.to(device) for k, v in resume.clients.items()}
                )
            log(f"{self.tag} resuming after round {resume.round}/{self.cfg.rounds}")

    # -- the rounds ---------------------------------------------------------------------

    @property
    def needs_round_zero(self) -> bool:
        return not self.rows

    def rounds(self) -> Iterator[int]:
        """The rounds still to run."""
        return iter(range(len(self.rows), self.cfg.rounds + 1))

    def eval_due(self, round: int) -> bool:
        return eval_due(round, every=self.cfg.eval_every, rounds=self.cfg.rounds)

    def begin_round(self, round: int) -> RoundStart | None:
        """Plan and sample round ``round``; None when no client can train any more."""
        pool = self.client_ids if self.privacy is None else self.privacy.trainable(self.client_ids)
        if not pool:
            self.log(
                f"{self.tag} every client has spent its privacy budget: "
                f"stopping after round {round - 1}"
            )
            return None
        plan = self.method.plan(round)
        sampled = sample_clients(pool, self.cfg.client_fraction, self.rng)
        private = self.method.private  # what stays with the clients is never sent
        starts = {
            cid: shared_part(
                self.method.client_start(self.state, client_id=cid, plan=plan), private
            )
            for cid in sampled
        }
        sent = shared_part(self.state, private).nbytes()
        return RoundStart(
            plan=plan,
            clients=sampled,
            starts=starts,
            download_bytes=(sent + self.pending_delta_bytes) * len(sampled),
            started=time.perf_counter(),
        )

    def finish_round(self, start: RoundStart, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Aggregate the replies (any order) into the next global adapter; the round's row
        without its evaluation (:meth:`end_round` adds it)."""
        t_train = time.perf_counter() - start.started
        updates = sorted(updates, key=lambda u: u.client_id)  # the result is order-free
        t0 = time.perf_counter()
        result, row = self._aggregate(start, updates)
        self.pending_delta_bytes = result.delta_bytes
        self.state = result.state
        row["time_train_s"] = t_train
        row["time_aggregate_s"] = time.perf_counter() - t0
        if self.privacy is not None:
            last = start.plan.round == self.cfg.rounds
            for cid in [] if last else self.privacy.end_round():
                self.log(
                    f"{self.tag} client {cid} stops training: one more round would exceed "
                    f"dp.target_epsilon={self.cfg.dp.target_epsilon:g}"
                )
            row |= self.privacy.metrics()
        return row

    def _aggregate(
        self, start: RoundStart, updates: Sequence[ClientUpdate]
    ) -> tuple[Aggregate, dict[str, Any]]:
        method, plan, before = self.method, start.plan, self.state
        weights = client_weights(updates, self.cfg.weighting, method)
        result = method.aggregate(
            plan=plan, state=before, updates=updates, weights=weights, scaling=self.scaling
        )
        adapter = self.fed.adapter
        for layer, delta in result.base_delta.items():
            adapter.add_to_base(layer, delta)
            total = self.base_total.get(layer)
            self.base_total[layer] = delta.clone() if total is None else total + delta
        adapter.set_state(result.state)
        # a trainer for every sampled client replies as one (centralized): list them all
        replied = {u.client_id for u in updates}
        clients = start.clients if method.pools_clients else sorted(replied)
        # private parts: no global update to compare against (LoRAMethod.private)
        errors, drift = (
            ({}, {})
            if method.private
            else update_measures(
                before=before,
                starts=start.starts,
                updates=updates,
                weights=weights,
                scaling=self.scaling,
                result=result,
            )
        )
        row = round_row(
            plan=plan,
            clients=clients,
            updates=updates,
            download_bytes=start.download_bytes,
            result=result,
            errors=errors,
            drift=drift,
        )
        return result, row

    def start_row(self) -> dict[str, Any]:
        """Round 0's row before its evaluation: nothing trained, nothing sent."""
        row = start_row(self.method.name)
        return row | (self.privacy.metrics() if self.privacy else {})

    def end_round(self, row: dict[str, Any], evaluation: Mapping[str, Any] | None) -> None:
        """Add the evaluation (None: not due this round) and write the row, then the
        checkpoint (the commit point of the round), then the progress line."""
        t = row["round"]
        row |= dict(evaluation) if evaluation is not None else {"accuracy": None, "loss": None}
        if t > 0:
            row["elapsed_s"] = time.perf_counter() - self.started
        self.run_dir.log_metrics(row)
        debug_kill("metrics", t)
        self.rows.append(row)
        save_checkpoint(
            self.run_dir.path,
            capture(
                round=t,
                state=self.state,
                method=self.method,
                rng=self.rng,
                base_total=self.base_total,
                base_weight=self.fed.adapter.exact_base,
                pending_delta_bytes=self.pending_delta_bytes,
                privacy=self.privacy,
                optimizers=self.optimizers,
                clients=None if self.client_store is None else self.client_store.state_dict(),
            ),
        )
        debug_kill("checkpoint", t)
        line = progress_line(self.tag, row, rounds=self.cfg.rounds)
        if row.get("perplexity") is not None:
            line += f"  perplexity {row['perplexity']:.3f}"
        if row.get("personal_accuracy") is not None:  # stateful clients' own models
            line += f"  personal accuracy {row['personal_accuracy']:.4f}"
        if self.privacy is not None and row.get("epsilon"):
            line += f"  epsilon <= {max(row['epsilon'].values()):.3f}"
        self.log(line)

    def finish(self) -> dict[str, Any]:
        """Save the final adapter (and what was folded into the base); the run's result."""
        self.fed.adapter.save(self.run_dir.adapter_dir, self.state, self.base_total)
        return {
            "rows": self.rows,
            "state": self.state,
            "method_state": self.method.state_dict(),
            "privacy": self.privacy.summary() if self.privacy else None,
            "wall_time_s": time.perf_counter() - self.started,
            "client_train_sizes": dict(sorted(self.train_sizes.items())),
        }
