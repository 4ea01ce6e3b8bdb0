"""DP-SGD on Flower: each client keeps its own account, the server reads the reports.

In-process, one :class:`~fedlora.privacy.accounting.FederatedPrivacy` holds every client's
accountant. On Flower the accountant is the client's own and lives with its SuperNode:

- :class:`NodeAccount` (on the SuperNode): the client's Opacus accountant, read from and
  written to the node's own disk around every round it trains
  (``<state-dir>/client-<k>/privacy.json``), so it carries over between rounds, between
  the ClientApp processes of a deployed SuperNode, and across a restart of the node. Before
  training, a client whose next round would take it past ``dp.target_epsilon`` declines
  (:class:`BudgetSpent`: the server gets a failed reply, as from an unavailable client).
  Every reply carries the client's account (:data:`REPORT_KEYS`).
- :class:`ReportedPrivacy` (on the server): the last account each client reported, in the
  server's rows under the keys the in-process runtime uses (``epsilon``, ``dp_exhausted``)
  and in its checkpoints. A client that reported its budget spent is not sampled again,
  exactly as in-process, so both runtimes sample the same clients.

A round trained twice. A server restarted from its checkpoint (``fedlora run --resume``)
repeats the round it was killed in, which a SuperNode may already have trained. The node
keeps, for its two newest rounds, the account before the round and a digest of the update
it released. A repeat that releases a bit-identical update (same start adapter, and noise
and batches seeded from ``(seed, round, client)``: ``dp.secure_mode=false``) is a copy of
the earlier release and costs nothing more: the account stays as it was. Any other repeat
(``secure_mode`` draws fresh noise) is a new release and is counted on top.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.errors import FedLoraError
from fedlora.privacy.accounting import ClientPrivacy, FederatedPrivacy, PrivacyLedger

if TYPE_CHECKING:
    from fedlora.config import DPConfig
    from fedlora.messages import ClientUpdate

# What a reply's metrics carry about the client's account.
EPSILON, STEPS, SAMPLE_RATE, EXHAUSTED = "epsilon", "dp-steps", "dp-sample-rate", "dp-exhausted"
REPORT_KEYS = (EPSILON, STEPS, SAMPLE_RATE, EXHAUSTED)
ACCOUNT_FILE = "privacy.json"
_KEEP_ROUNDS = 2  # rounds whose release is remembered: the newest can be repeated


class BudgetSpent(FedLoraError):
    """A client declines to train: one more round would exceed its privacy budget."""


def update_digest(update: ClientUpdate) -> str:
    """SHA-256 of every tensor a reply releases (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    state = update.trained_state
    for kind in ("A", "B", "head", "magnitude"):
        for name, tensor in sorted(getattr(state, kind).items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{kind}/{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NodeAccount:
    """One client's accountant on its SuperNode, persisted in ``directory``.

    ``privacy`` holds the DP-SGD settings (the server's noise, the node's own sample rate
    ``q = B / n`` over its own data) and the accountant; the file holds the accountant's
    history ``[(sigma, q, steps), ...]`` and the newest rounds' releases.
    """

    def __init__(self, *, directory: Path, client_id: int, dp: DPConfig, privacy: ClientPrivacy):
        self.path = Path(directory) / f"client-{client_id}" / ACCOUNT_FILE
        self.client_id = client_id
        self.dp = dp
        self.privacy = privacy
        self.history: list[list[float]] = []  # the account as the file holds it
        self.rounds: dict[int, dict[str, Any]] = {}  # round -> history before it, its digest
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved["mechanism"] != privacy.accountant.mechanism():
                raise FedLoraError(
                    f"{self.path} holds a {saved['mechanism']} account, this run uses "
                    f"dp.accountant={privacy.accountant_name}"
                )
            self.history = [list(h) for h in saved["history"]]
            self.rounds = {int(t): r for t, r in saved["rounds"].items()}
        self._load(self.history)

    @classmethod
    def open(
        cls,
        *,
        directory: Path,
        client_id: int,
        dp: DPConfig,
        noise_multiplier: float,
        num_examples: int,
        batch_size: int,
        steps_per_round: int,
    ) -> NodeAccount:
        privacy = ClientPrivacy(
            noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            num_examples=num_examples,
            batch_size=batch_size,
            steps_per_round=steps_per_round,
            accountant=dp.accountant,
            secure_mode=dp.secure_mode,
        )
        return cls(directory=directory, client_id=client_id, dp=dp, privacy=privacy)

    def _load(self, history: list[list[float]]) -> None:
        mechanism = self.privacy.accountant.mechanism()
        self.privacy.load_state_dict({"accountant": {"mechanism": mechanism, "history": history}})

    def _over_budget(self) -> bool:
        target = self.dp.target_epsilon
        return target is not None and self.privacy.epsilon_after_round(self.dp.delta) > target

    def trainer(self, round: int) -> Callable[..., ClientUpdate]:
        """:func:`~fedlora.privacy.dp_sgd.train_client_dp` on this account for ``round``;
        raises :class:`BudgetSpent` if the round would take the client past the target.
        Call :meth:`record` with the update it returns."""
        from fedlora.privacy.dp_sgd import train_client_dp  # Opacus' DP optimizer

        repeat = self.rounds.get(round)
        if repeat is not None and not self.dp.secure_mode:
            self._load(repeat["before"])  # the round is decided as it was the first time
        if self._over_budget():
            eps = self.privacy.epsilon(self.dp.delta)
            raise BudgetSpent(
                f"budget spent: client {self.client_id} declines to train round {round}: one "
                f"more round would take its epsilon from {eps:.4g} past "
                f"dp.target_epsilon={self.dp.target_epsilon:g}"
            )
        self._load(self.history)  # training counts on top of everything released so far
        return partial(train_client_dp, privacy=self.privacy)

    def record(self, round: int, update: ClientUpdate) -> None:
        """Keep what training ``round`` spent (unless it released a copy of an earlier
        release) and write the account, atomically."""
        digest = update_digest(update)
        repeat = self.rounds.get(round)
        if repeat is not None and repeat["digest"] == digest:
            self._load(self.history)  # the same update again: nothing new was released
            return
        before, self.history = self.history, [list(h) for h in self.privacy.accountant.history]
        self.rounds[round] = {"before": before, "digest": digest}
        for old in sorted(self.rounds)[:-_KEEP_ROUNDS]:
            del self.rounds[old]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {
            "client": self.client_id,
            "mechanism": self.privacy.accountant.mechanism(),
            "history": self.history,
            "rounds": {str(t): r for t, r in sorted(self.rounds.items())},
        }
        with tmp.open("w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def report(self) -> dict[str, float | int]:
        """The account, for a reply's metrics: epsilon at ``dp.delta``, DP-SGD steps so far,
        the sample rate, and whether the next round would exceed the target (1) or not (0)."""
        return {
            EPSILON: self.privacy.epsilon(self.dp.delta),
            STEPS: self.privacy.steps,
            SAMPLE_RATE: self.privacy.sample_rate,
            EXHAUSTED: int(self._over_budget()),
        }


@dataclass(frozen=True)
class ClientReport:
    epsilon: float
    steps: int
    sample_rate: float
    exhausted: bool


class ReportedPrivacy(PrivacyLedger):
    """The server's view of its remote clients' accounts, from their replies.

    Built from the run's plan (:func:`~fedlora.privacy.plan_for_federation`), which picks
    the noise every client trains with; each client's account is its own report. It
    answers the server as :class:`~fedlora.privacy.accounting.FederatedPrivacy` does
    (``trainable``, ``end_round``, ``state_dict``); what the rows and the summary say of
    it is written by :class:`~fedlora.privacy.accounting.PrivacyLedger`.
    """

    def __init__(self, plan: FederatedPrivacy) -> None:
        self.dp = plan.dp
        self._noise = plan.noise_multiplier
        self._describe = plan.describe()
        self.reports = {
            k: ClientReport(epsilon=0.0, steps=0, sample_rate=c.sample_rate, exhausted=False)
            for k, c in plan.clients.items()
        }
        self.exhausted: list[int] = []

    @property
    def noise_multiplier(self) -> float:
        return self._noise

    def describe(self) -> str:
        return self._describe + "; each client keeps its own accountant"

    def report(self, client_id: int, metrics: Mapping[str, Any]) -> None:
        """Take a reply's account (a reply without one changes nothing)."""
        if EPSILON not in metrics:
            return
        self.reports[client_id] = ClientReport(
            epsilon=float(metrics[EPSILON]),
            steps=int(metrics[STEPS]),
            sample_rate=float(metrics[SAMPLE_RATE]),
            exhausted=bool(metrics[EXHAUSTED]),
        )

    def trainable(self, client_ids: list[int]) -> list[int]:
        return [c for c in client_ids if c not in self.exhausted]

    def epsilons(self) -> dict[int, float]:
        return {k: r.epsilon for k, r in sorted(self.reports.items())}

    def end_round(self) -> list[int]:
        """Mark (and return) the clients that reported their next round would exceed the
        target."""
        newly = [k for k, r in sorted(self.reports.items()) if r.exhausted]
        newly = [k for k in newly if k not in self.exhausted]
        self.exhausted.extend(newly)
        return newly

    def accounts(self) -> dict[int, tuple[float, int]]:
        return {k: (r.sample_rate, r.steps) for k, r in sorted(self.reports.items())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "reports": {str(k): asdict(r) for k, r in sorted(self.reports.items())},
            "exhausted": list(self.exhausted),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "reports" not in state:
            raise FedLoraError("the checkpoint's privacy state is not a Flower run's")
        self.reports = {int(k): ClientReport(**r) for k, r in state["reports"].items()}
        self.exhausted = [int(k) for k in state["exhausted"]]
