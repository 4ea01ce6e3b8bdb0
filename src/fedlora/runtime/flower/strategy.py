"""A Flower strategy over the fedlora server: it only moves messages.

:class:`FedLoRAStrategy` implements Flower's ``Strategy`` by delegation to a
:class:`~fedlora.runtime.server.Server`, with no server logic of its own:

- ``configure_train``: ``server.begin_round(t)`` plans and samples (same seed, same
  clients as in-process); each sampled client's SuperNode gets the adapter to start from.
- ``aggregate_train``: failed or missing replies are logged and dropped; if at least
  ``min_clients`` replied, ``server.finish_round`` aggregates the rest.
- ``configure_evaluate`` / ``aggregate_evaluate``: every SuperNode evaluates the global
  adapter on its own eval split (``client_accuracy``); the replies also tell which
  SuperNode holds which client (its ``partition-id``).
- :meth:`evaluate_global`: the server evaluates the global adapter on the global eval set
  and ``server.end_round`` writes the round's row and checkpoint.

:meth:`FedLoRAStrategy.start` runs the rounds still to run: all of them, or those after
the checkpoint of a resumed run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.client import evaluate_split
from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.federation import Federation
from fedlora.log import Log
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.device import model_device
from fedlora.runtime.flower import codec
from fedlora.runtime.rows import personal_row
from fedlora.runtime.server import RoundStart, Server

if TYPE_CHECKING:
    from fedlora.privacy import ReportedPrivacy

# What a SuperNode's evaluation reply may carry, per client.
EVAL_METRICS = ("accuracy", "loss", "perplexity")


class FedLoRAStrategy(Strategy):
    """Flower's ``Strategy`` over a fedlora :class:`~fedlora.runtime.server.Server`: it only
    turns the server's decisions into messages and the replies back."""

    def __init__(self, *, server: Server, privacy: ReportedPrivacy | None = None) -> None:
        self.server = server
        # DP-SGD: the server's privacy object, which the clients' replies report to
        self.privacy = privacy
        self.fed: Federation = server.fed  # the server's model and global eval set
        self.cfg: Config = server.cfg
        self.log: Log = server.log
        self.tag = server.tag
        self.config_text = codec.config_to_text(self.cfg)
        self.device = model_device(self.fed.adapter.model)
        self.nodes: dict[int, int] = {}  # client id -> SuperNode id
        self.outbox: list[Message] = []  # this stage's messages (the grid sets their ids)
        self.current: RoundStart | None = None
        self.row: dict[str, Any] = {}
        self.failures: list[dict[str, Any]] = []
        self.clock = time.perf_counter()

    @property
    def state(self) -> AdapterState:
        return self.server.state

    def summary(self) -> None:
        self.log(
            f"{self.tag} Flower strategy: {self.cfg.num_clients} clients, "
            f"client_fraction {self.cfg.client_fraction}, min_clients {self.cfg.min_clients}, "
            f"round timeout {self.cfg.round_timeout:.0f}s"
        )

    def start(self, *, grid: Grid, **_: Any) -> None:  # type: ignore[override]
        """The rounds still to run (all of them, or those after a resumed checkpoint): each
        a training stage, an evaluation stage on the SuperNodes, and the server's global
        evaluation, as Flower's ``Strategy.start`` runs them."""
        timeout = self.cfg.round_timeout
        if self.server.needs_round_zero:
            self.evaluate_round_zero(grid)
            self.evaluate_global(0)
        else:
            self.find_nodes(grid)
        for t in self.server.rounds():
            messages = self.configure_train(t, ArrayRecord(), ConfigRecord(), grid)
            if self.current is None:
                break  # no client can train any more
            self.aggregate_train(t, grid.send_and_receive(messages, timeout=timeout))
            messages = self.configure_evaluate(t, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_evaluate(t, grid.send_and_receive(messages, timeout=timeout))
            self.evaluate_global(t)

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
            base_delta=self.server.base_total,
            plan=plan,
            noise_multiplier=None if self.privacy is None else self.privacy.noise_multiplier,
        )

    def _fail(self, client: int | None, stage: str, error: str) -> None:
        self.failures.append({"client": client, "stage": stage, "error": error})
        self.log(f"{self.tag} client {client} failed in {stage}: {error}")

    # -- training -----------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.row, self.failures = {}, []
        self.current = start = self.server.begin_round(server_round)
        if start is None:
            return []
        messages = []
        for cid in start.clients:
            if cid not in self.nodes:
                self._fail(cid, "train", "no connected SuperNode holds this client")
                continue
            content = codec.instruction_to_content(self._instruction(start.starts[cid], start.plan))
            messages.append(
                Message(
                    content=content,
                    dst_node_id=self.nodes[cid],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        self.outbox = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = self.current
        assert start is not None
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
            if self.privacy is not None:  # the client's own account, with its reply
                self.privacy.report(update.client_id, reply.content.metric_records["metrics"])
            self.server.train_sizes[update.client_id] = update.num_examples
        for cid in start.clients:
            if cid in self.nodes and cid not in answered:
                self._fail(
                    cid, "train", f"no reply within round_timeout={self.cfg.round_timeout:.0f}s"
                )
        if len(updates) < self.cfg.min_clients:
            detail = "; ".join(f"client {f['client']}: {f['error']}" for f in self.failures)
            raise FedLoraError(
                f"round {server_round}: {len(updates)} of {len(start.clients)} sampled clients "
                f"replied, fewer than min_clients={self.cfg.min_clients} ({detail}); run stopped, "
                f"metrics.jsonl keeps rounds 0-{server_round - 1}"
            )
        self.row = self.server.finish_round(start, updates)
        self.clock = time.perf_counter()
        metrics = MetricRecord({"train-loss": self.row["train_loss"], "clients": len(updates)})
        return codec.state_to_record(self.state), metrics

    # -- evaluation ---------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.server.eval_due(server_round):
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
        if not self.server.eval_due(server_round):
            return None
        per_client: dict[int, dict[str, float]] = {}
        counts: dict[int, int] = {}  # what each client evaluated on
        personal: dict[int, dict[str, float]] = {}  # stateful clients' own models
        sizes: dict[int, int] = {}
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
            self.server.train_sizes.setdefault(cid, int(metrics["num-train-examples"]))  # type: ignore[arg-type]
            if int(metrics["num-examples"]):  # type: ignore[arg-type]
                per_client[cid] = {k: float(metrics[k]) for k in EVAL_METRICS if k in metrics}  # type: ignore[arg-type]
                counts[cid] = int(metrics["num-examples"])  # type: ignore[arg-type]
            if self.privacy is not None:
                self.privacy.report(cid, metrics)
            sizes[cid] = int(metrics["num-examples"])  # type: ignore[arg-type]
            if "personal-accuracy" in metrics:
                personal[cid] = {"accuracy": float(metrics["personal-accuracy"])}  # type: ignore[arg-type]
        self.nodes.update(seen)
        clients = dict(sorted(per_client.items()))
        self.row["eval_examples"] = len(self.fed.test)
        self.row["client_eval_examples"] = dict(sorted(counts.items()))
        self.row["client_accuracy"] = {c: m["accuracy"] for c, m in clients.items()}
        if any("perplexity" in m for m in clients.values()):
            self.row["client_perplexity"] = {c: m["perplexity"] for c, m in clients.items()}
        if personal:
            self.row |= personal_row(personal, sizes)
        return MetricRecord({"clients": len(clients)})

    def find_nodes(self, grid: Grid) -> None:
        """Which SuperNode holds which client: every connected SuperNode evaluates the
        global adapter and says its ``partition-id``."""
        self.clock = time.perf_counter()
        self.row, self.failures = {}, []
        replies = grid.send_and_receive(
            self.configure_evaluate(0, ArrayRecord(), ConfigRecord(), grid),
            timeout=self.cfg.round_timeout,
        )
        self.aggregate_evaluate(0, replies)
        missing = sorted(set(range(self.cfg.num_clients)) - set(self.nodes))
        if len(self.nodes) < self.cfg.min_clients:
            raise FedLoraError(
                f"only clients {sorted(self.nodes)} answered, fewer than "
                f"min_clients={self.cfg.min_clients}; missing clients {missing}"
            )

    def evaluate_round_zero(self, grid: Grid) -> None:
        """Round 0 on the clients (and where each client is); its row is ended by
        :meth:`evaluate_global`."""
        self.find_nodes(grid)
        self.row = self.server.start_row() | self.row

    def evaluate_global(self, server_round: int, arrays: ArrayRecord | None = None) -> None:
        """The global eval set on the server; ends the round's row."""
        evaluation = None
        if self.server.eval_due(server_round):
            evaluation = evaluate_split(
                self.fed.adapter.model,
                self.fed.test,
                batch_size=self.cfg.eval_batch_size,
                precision=self.cfg.precision,
            )
        row = self.row
        if self.failures:
            row["failures"] = self.failures
        row["time_eval_s"] = time.perf_counter() - self.clock
        self.server.end_round(row, evaluation)
        self.row, self.failures = {}, []
