"""A Flower strategy that asks a fedlora method its two questions.

:class:`FedLoRAStrategy` implements Flower's ``Strategy`` by delegation, with no
aggregation rule of its own:

- ``configure_train``: ``method.plan(t)`` says what clients train; the clients are sampled
  exactly as in-process (:func:`~fedlora.runtime.inprocess.sample_clients`, same seed);
  each sampled client's SuperNode gets the adapter to start from.
- ``aggregate_train``: failed or missing replies are logged and dropped; if at least
  ``min_clients`` replied, ``method.aggregate(...)`` combines the rest (sorted by client,
  so the result does not depend on the order replies arrive in).
- ``configure_evaluate`` / ``aggregate_evaluate``: every SuperNode evaluates the global
  adapter on its own eval split (``client_accuracy``); the replies also tell which
  SuperNode holds which client (its ``partition-id``).
- :meth:`evaluate_global` (Flower's ``evaluate_fn``): the server evaluates the global
  adapter on the global eval set and writes the round's row to ``metrics.jsonl``.

Flower's ``Strategy.start`` runs the rounds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.client import evaluate
from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.federation import Federation, Log
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import Method
from fedlora.models.device import model_device
from fedlora.outputs import RunDir
from fedlora.runtime.flower import codec
from fedlora.runtime.inprocess import sample_clients
from fedlora.runtime.rows import eval_due, progress_line, start_row
from fedlora.runtime.server import apply_round


class FedLoRAStrategy(Strategy):
    def __init__(self, *, method: Method, fed: Federation, run_dir: RunDir, log: Log) -> None:
        self.method = method
        self.fed = fed  # the server's model (global evaluation, folded increments) and eval set
        self.cfg: Config = fed.cfg
        self.run_dir = run_dir
        self.log = log
        self.tag = f"[{method.label}]"
        self.config_text = codec.config_to_text(self.cfg)
        self.scaling = fed.adapter.scaling()
        self.device = model_device(fed.adapter.model)
        self.state: AdapterState = fed.initial_state.clone()
        self.base_total: dict[str, torch.Tensor] = {}  # folded into the frozen weights so far
        self.pending_delta_bytes = 0  # last round's increment, in the form the method sends it
        self.rng = random.Random(self.cfg.seed)
        self.nodes: dict[int, int] = {}  # client id -> SuperNode id
        self.outbox: list[Message] = []  # this stage's messages (the grid sets their ids)
        self.train_sizes: dict[int, int] = {}
        self.rows: list[dict[str, Any]] = []
        self.row: dict[str, Any] = start_row(method.name)
        self.failures: list[dict[str, Any]] = []
        self.plan: RoundPlan | None = None
        self.sampled: list[int] = []
        self.started = time.perf_counter()
        self.clock = self.started

    def summary(self) -> None:
        self.log(
            f"{self.tag} Flower strategy: {self.cfg.num_clients} clients, "
            f"client_fraction {self.cfg.client_fraction}, min_clients {self.cfg.min_clients}, "
            f"round timeout {self.cfg.round_timeout:.0f}s"
        )

    # -- SuperNodes ---------------------------------------------------------------------

    def connect(self, grid: Grid) -> None:
        """Wait (up to ``round_timeout``) until ``num_clients`` SuperNodes are connected."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while len(list(grid.get_node_ids())) < self.cfg.num_clients:
            if time.monotonic() > deadline:
                raise FedLoraError(
                    f"only {len(list(grid.get_node_ids()))} of num_clients={self.cfg.num_clients} "
                    f"SuperNodes connected within round_timeout={self.cfg.round_timeout:.0f}s"
                )
            time.sleep(0.5)

    def _client_of(self, node_id: int) -> int | None:
        return next((c for c, n in self.nodes.items() if n == node_id), None)

    def _node_of(self, reply: Message) -> int:
        """The SuperNode a reply is about. The error reply the SuperLink makes for an
        offline SuperNode (``NODE_UNAVAILABLE``) comes from the SuperLink itself: find the
        message it answers."""
        wanted = reply.metadata.reply_to_message_id
        sent = next((m for m in self.outbox if wanted and m.metadata.message_id == wanted), None)
        return reply.metadata.src_node_id if sent is None else sent.metadata.dst_node_id

    def _instruction(self, state: AdapterState, plan: RoundPlan | None) -> codec.Instruction:
        return codec.Instruction(
            config=self.config_text,
            label_names=list(self.fed.dataset.label_names),
            state=state,
            base_delta=self.base_total,
            plan=plan,
        )

    def _fail(self, client: int | None, stage: str, error: str) -> None:
        self.failures.append({"client": client, "stage": stage, "error": error})
        self.log(f"{self.tag} client {client} failed in {stage}: {error}")

    # -- training -----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # ``arrays`` encodes ``self.state``; the state itself is kept because some methods
        # (FLoRA) start each client from its own adapter (``client_start``).
        self.row, self.failures = {}, []
        self.plan = plan = self.method.plan(server_round)
        self.sampled = sample_clients(
            list(range(self.cfg.num_clients)), self.cfg.client_fraction, self.rng
        )
        self.starts: dict[int, AdapterState] = {}
        # Counted as in-process (the method's communication cost), not as this runtime's
        # wire: a message carries the client's start (FLoRA: a fresh adapter made from a
        # seed) and the whole folded total (a fresh ClientApp process remembers nothing).
        per_client = self.state.nbytes() + self.pending_delta_bytes
        messages, self.download = [], 0
        for cid in self.sampled:
            if cid not in self.nodes:
                self._fail(cid, "train", "no connected SuperNode holds this client")
                continue
            start = self.method.client_start(self.state, client_id=cid, plan=plan)
            self.starts[cid] = start
            content = codec.instruction_to_content(self._instruction(start, plan))
            self.download += per_client
            messages.append(
                Message(
                    content=content,
                    dst_node_id=self.nodes[cid],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        self.clock = time.perf_counter()
        self.outbox = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.plan is not None
        t_train = time.perf_counter() - self.clock
        answered: set[int | None] = set()
        updates: list[ClientUpdate] = []
        for reply in replies:
            cid = self._client_of(self._node_of(reply))
            answered.add(cid)
            if reply.has_error():
                self._fail(cid, "train", str(reply.error.reason))
                continue
            try:
                # messages arrive on the CPU; the server aggregates on its own device
                update = codec.content_to_update(reply.content).to(self.device)
                update.check_finite()
            except (FedLoraError, KeyError, ValueError) as exc:
                self._fail(cid, "train", str(exc))
                continue
            updates.append(update)
        for cid in self.sampled:
            if cid in self.nodes and cid not in answered:
                self._fail(
                    cid, "train", f"no reply within round_timeout={self.cfg.round_timeout:.0f}s"
                )
        if len(updates) < self.cfg.min_clients:
            detail = "; ".join(f"client {f['client']}: {f['error']}" for f in self.failures)
            raise FedLoraError(
                f"round {server_round}: {len(updates)} of {len(self.sampled)} sampled clients "
                f"replied, fewer than min_clients={self.cfg.min_clients} ({detail}); run stopped, "
                f"metrics.jsonl keeps rounds 0-{server_round - 1}"
            )
        updates.sort(key=lambda u: u.client_id)
        for u in updates:
            self.train_sizes[u.client_id] = u.num_examples

        t0 = time.perf_counter()
        result, self.row = apply_round(
            method=self.method,
            plan=self.plan,
            state=self.state,
            starts=self.starts,
            updates=updates,
            weighting=self.cfg.weighting,
            scaling=self.scaling,
            adapter=self.fed.adapter,
            base_total=self.base_total,
            download_bytes=self.download,
        )
        self.pending_delta_bytes = result.delta_bytes
        self.state = result.state
        t_agg = time.perf_counter() - t0

        self.row |= {"time_train_s": t_train, "time_aggregate_s": t_agg}
        self.clock = time.perf_counter()
        metrics = MetricRecord({"train-loss": self.row["train_loss"], "clients": len(updates)})
        return codec.state_to_record(self.state), metrics

    # -- evaluation ---------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not eval_due(server_round, every=self.cfg.eval_every, rounds=self.cfg.rounds):
            return []
        content = codec.instruction_to_content(self._instruction(self.state, None))
        # Every connected SuperNode, known or not: a SuperNode that (re)connected is found here.
        self.outbox = [
            Message(
                content=content,
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                group_id=str(server_round),
            )
            for node in grid.get_node_ids()
        ]
        return self.outbox

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        if not eval_due(server_round, every=self.cfg.eval_every, rounds=self.cfg.rounds):
            return None
        accuracy: dict[int, float] = {}
        seen: dict[int, int] = {}  # client id -> SuperNode id, from this round's replies
        for reply in replies:
            node = self._node_of(reply)
            if reply.has_error():
                self._fail(self._client_of(node), "evaluate", str(reply.error.reason))
                continue
            metrics = reply.content.metric_records["metrics"]
            cid = int(metrics["client-id"])  # type: ignore[arg-type]
            if not 0 <= cid < self.cfg.num_clients:
                raise FedLoraError(
                    f"a SuperNode holds client (partition-id) {cid}, but num_clients="
                    f"{self.cfg.num_clients}: give each SuperNode a partition-id below num_clients"
                )
            if seen.setdefault(cid, node) != node:
                raise FedLoraError(
                    f"two SuperNodes hold client (partition-id) {cid}: give each its own partition-id"
                )
            self.train_sizes.setdefault(cid, int(metrics["num-train-examples"]))  # type: ignore[arg-type]
            accuracy[cid] = float(metrics["accuracy"])  # type: ignore[arg-type]
        self.nodes.update(seen)
        self.row["client_accuracy"] = dict(sorted(accuracy.items()))
        return MetricRecord({"clients": len(accuracy)})

    def evaluate_round_zero(self, grid: Grid) -> None:
        """Round 0 on the clients: ``Strategy.start`` evaluates only on the server before round 1."""
        self.clock = time.perf_counter()
        replies = grid.send_and_receive(
            self.configure_evaluate(0, codec.state_to_record(self.state), ConfigRecord(), grid),
            timeout=self.cfg.round_timeout,
        )
        self.aggregate_evaluate(0, replies)
        missing = sorted(set(range(self.cfg.num_clients)) - set(self.nodes))
        if len(self.nodes) < self.cfg.min_clients:
            raise FedLoraError(
                f"round 0: only clients {sorted(self.nodes)} answered, fewer than "
                f"min_clients={self.cfg.min_clients}; missing clients {missing}"
            )

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the global eval set on the server; ends the round's row."""
        due = eval_due(server_round, every=self.cfg.eval_every, rounds=self.cfg.rounds)
        row = self.row
        if due:
            acc, loss = evaluate(
                self.fed.adapter.model,
                self.fed.test,
                batch_size=self.cfg.eval_batch_size,
                precision=self.cfg.precision,
            )
            row |= {"accuracy": acc, "loss": loss}
        else:
            row |= {"accuracy": None, "loss": None}
        if self.failures:
            row["failures"] = self.failures
        row["time_eval_s"] = time.perf_counter() - self.clock
        if server_round > 0:
            row["elapsed_s"] = time.perf_counter() - self.started
        self.run_dir.log_metrics(row)
        self.rows.append(row)
        self.log(progress_line(self.tag, row, rounds=self.cfg.rounds))
        self.row, self.failures = {}, []
        return MetricRecord({"accuracy": acc, "loss": loss}) if due else None
