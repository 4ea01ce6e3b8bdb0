"""Privacy accounting: one Opacus accountant per client, kept for the whole run.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) on a client
with ``n`` examples samples each example into a batch independently with probability
``q = B / n`` (Poisson sampling, ``B`` = ``batch_size``), clips each per-example gradient to
``C`` = ``max_grad_norm`` and adds ``N(0, sigma^2 C^2)`` to their sum. Each such step is one
application of the subsampled Gaussian mechanism with parameters ``(sigma, q)``; the
client's accountant composes all of its steps, over every round it trained in:

    epsilon_k(delta) = Accountant([(sigma, q_k, T_k)]).get_epsilon(delta)

with ``T_k`` its DP-SGD steps so far. The accountant is Opacus' ``RDPAccountant`` (Mironov,
"Renyi Differential Privacy", 2017) or ``PRVAccountant`` (Gopi, Lee, Wutschitz, "Numerical
Composition of Differential Privacy", NeurIPS 2021). Its state is the list of
``(sigma, q, steps)`` it has seen, which :meth:`ClientPrivacy.state_dict` exports, so a
resumed run continues each client's account instead of starting from zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from fedlora.config import DPConfig
    from fedlora.messages import ClientUpdate

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
# Opacus' own ceiling in get_noise_multiplier: a target that needs more noise is unreachable.
MAX_NOISE_MULTIPLIER = 1e6


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise FedLoraError(f"unknown accountant '{name}' (known: {', '.join(ACCOUNTANTS)})")
    return ACCOUNTANTS[name]()


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """``epsilon`` at ``delta`` of everything ``accountant`` has seen (0 before any step).

    Zero noise gives no privacy: ``inf`` (Opacus' PRV accountant would overflow on it).
    """
    if not accountant.history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in accountant.history):
        return math.inf
    # Opacus warns when the optimal RDP order sits at the end of its grid; the bound is
    # still valid, only looser, and the warning would repeat every round.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def check_target_reachable(*, target_epsilon: float, delta: float, accountant: str) -> None:
    """Reject a budget no noise can meet, before any data is loaded.

    With the largest noise Opacus searches (``sigma = 1e6``) and a single step at ``q = 1``
    the account is at its floor: for RDP that floor is the conversion term
    ``min_alpha (log(1/delta) - log alpha) / (alpha - 1) + log(1 - 1/alpha)`` (about 0.10
    at ``delta = 1e-5``), which no amount of noise lowers.
    """
    probe = make_accountant(accountant)
    probe.history = [(MAX_NOISE_MULTIPLIER, 1.0, 1)]
    floor = epsilon_of(probe, delta)
    if floor > target_epsilon:
        raise FedLoraError(
            f"dp.target_epsilon={target_epsilon:g} is unreachable at dp.delta={delta:g} with the "
            f"{accountant} accountant: even noise_multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon "
            f"{floor:.3g} (raise the target{' or use dp.accountant=prv' if accountant == 'rdp' else ''})"
        )


def noise_for_target(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest ``sigma`` (to Opacus' tolerance 0.01 in epsilon) whose account after
    ``steps`` steps at rate ``sample_rate`` stays within ``target_epsilon``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except ValueError:
            raise FedLoraError(
                f"dp.target_epsilon={target_epsilon:g} is unreachable for {steps} DP-SGD steps at "
                f"sample rate {sample_rate:.4g}: it needs noise_multiplier > {MAX_NOISE_MULTIPLIER:g} "
                "(raise the target, or lower rounds, local_steps or batch_size)"
            ) from None


class ClientPrivacy:
    """One client's DP-SGD settings and its accountant, which lives as long as the run.

    The wrapped model and the DP optimizer are rebuilt every round (the trainable factor
    changes between RoLoRA rounds, and Opacus cannot follow a ``requires_grad`` change);
    this object is what carries over.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        num_examples: int,
        batch_size: int,
        steps_per_round: int,
        accountant: str = "rdp",
        secure_mode: bool = False,
    ) -> None:
        if num_examples < 1:
            raise FedLoraError("a client with no training examples cannot run DP-SGD")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.num_examples = num_examples
        # Poisson sampling at q = B/n draws B examples per step in expectation; Opacus
        # averages by this expected size, never by the realised one (which is private).
        self.expected_batch_size = min(batch_size, num_examples)
        self.sample_rate = self.expected_batch_size / num_examples
        self.steps_per_round = steps_per_round
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self.accountant = make_accountant(accountant)
        self._epsilon_cache: dict[tuple[int, float], float] = {}

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far, over all rounds."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def step_hook(self) -> Callable[[Any], None]:
        """Opacus' accounting hook for a ``DPOptimizer``: one accountant step per noisy step."""
        return self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)

    def epsilon(self, delta: float) -> float:
        key = (self.steps, delta)
        if key not in self._epsilon_cache:
            self._epsilon_cache[key] = epsilon_of(self.accountant, delta)
        return self._epsilon_cache[key]

    def epsilon_after_round(self, delta: float) -> float:
        """What ``epsilon`` would be after one more round of ``steps_per_round`` steps."""
        probe = make_accountant(self.accountant_name)
        probe.load_state_dict(self.accountant.state_dict())
        for _ in range(self.steps_per_round):
            probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return epsilon_of(probe, delta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": {
                "mechanism": self.accountant.mechanism(),
                "history": [list(h) for h in self.accountant.history],
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the account of a saved run (same client, same settings)."""
        saved = state["accountant"]
        if saved["mechanism"] != self.accountant.mechanism():
            raise FedLoraError(
                f"saved privacy state uses the {saved['mechanism']} accountant, "
                f"this run uses {self.accountant.mechanism()}"
            )
        self.accountant.load_state_dict(
            {"mechanism": saved["mechanism"], "history": [tuple(h) for h in saved["history"]]}
        )
        self._epsilon_cache.clear()


class PrivacyLedger:
    """What the server writes of its clients' privacy, however it learns it: the rows'
    ``epsilon`` and ``dp_exhausted`` and the ``summary.json`` ``dp`` object. A holder of
    accountants (:class:`FederatedPrivacy`, in process) or of the clients' reports
    (:class:`~fedlora.privacy.remote.ReportedPrivacy`, on Flower) says what each client has
    spent; the shape of what is written is this class's, once."""

    dp: DPConfig
    exhausted: list[int]

    @property
    def noise_multiplier(self) -> float:
        raise NotImplementedError

    def epsilons(self) -> dict[int, float]:
        raise NotImplementedError

    def accounts(self) -> dict[int, tuple[float, int]]:
        """Per client id: its sampling rate and the DP-SGD steps it has taken."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` fields: ``epsilon`` per client and who is out of budget."""
        return {"epsilon": self.epsilons(), "dp_exhausted": sorted(self.exhausted)}

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` ``dp`` object: enough to recompute every client's epsilon."""
        accounts = self.accounts()
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.dp.delta,
            "accountant": self.dp.accountant,
            "max_grad_norm": self.dp.max_grad_norm,
            "target_epsilon": self.dp.target_epsilon,
            "sample_rate": {k: rate for k, (rate, _) in accounts.items()},
            "steps": {k: steps for k, (_, steps) in accounts.items()},
            "epsilon": self.epsilons(),
            "exhausted": sorted(self.exhausted),
            "state": self.state_dict(),
        }


class FederatedPrivacy(PrivacyLedger):
    """Every client's :class:`ClientPrivacy`, the run's budget, and who has spent it.

    With ``dp.target_epsilon`` the noise is chosen once, before round 1, for the planned
    steps of the client that needs the most: ``sigma`` grows with both ``q`` and the step
    count, so one ``sigma`` computed at ``max_k q_k`` and the most planned steps keeps
    every client within the target (clients with smaller ``q_k`` end below it). A client
    whose next round would take it past the target is not trained again.
    """

    def __init__(
        self, dp: DPConfig, clients: Mapping[int, ClientPrivacy], *, pooled: bool = False
    ) -> None:
        self.dp = dp
        self.clients = dict(clients)
        self.pooled = pooled  # one accountant (id 0) for the centralized baseline's pool
        self.exhausted: list[int] = []

    @classmethod
    def plan(
        cls,
        dp: DPConfig,
        *,
        num_examples: Mapping[int, int],
        batch_size: int,
        steps_per_round: Mapping[int, int],
        planned_rounds: Mapping[int, int],
        pooled: bool = False,
    ) -> FederatedPrivacy:
        """Accountants for clients of the given sizes; ``sigma`` from the target if one is set."""
        sigma = dp.noise_multiplier
        if sigma is None:
            assert dp.target_epsilon is not None  # DPConfig guarantees one of the two
            worst = max(
                num_examples, key=lambda k: min(batch_size, num_examples[k]) / num_examples[k]
            )
            sigma = noise_for_target(
                target_epsilon=dp.target_epsilon,
                delta=dp.delta,
                sample_rate=min(batch_size, num_examples[worst]) / num_examples[worst],
                steps=max(steps_per_round[k] * planned_rounds[k] for k in num_examples),
                accountant=dp.accountant,
            )
        clients = {
            k: ClientPrivacy(
                noise_multiplier=sigma,
                max_grad_norm=dp.max_grad_norm,
                num_examples=n,
                batch_size=batch_size,
                steps_per_round=steps_per_round[k],
                accountant=dp.accountant,
                secure_mode=dp.secure_mode,
            )
            for k, n in num_examples.items()
        }
        return cls(dp, clients, pooled=pooled)

    @property
    def noise_multiplier(self) -> float:
        return next(iter(self.clients.values())).noise_multiplier

    def trainer(self, client_id: int) -> Callable[..., ClientUpdate]:
        """A drop-in for :func:`~fedlora.client.train_client`: DP-SGD with this client's
        noise, clipping bound, sample rate and accountant."""
        from fedlora.privacy.dp_sgd import train_client_dp  # dp_sgd imports this module

        return partial(train_client_dp, privacy=self.clients[client_id])

    def describe(self) -> str:
        """One log line: the noise and what it was chosen for."""
        rates = ", ".join(f"{k}: {c.sample_rate:.4g}" for k, c in self.clients.items())
        budget = (
            f"target epsilon {self.dp.target_epsilon:g}"
            if self.dp.target_epsilon is not None
            else "no target epsilon"
        )
        return (
            f"DP-SGD: noise_multiplier {self.noise_multiplier:.4g}, max_grad_norm "
            f"{self.dp.max_grad_norm:g}, delta {self.dp.delta:g}, {self.dp.accountant} accountant, "
            f"{budget}; sample rate per client {{{rates}}}"
        )

    def trainable(self, client_ids: list[int]) -> list[int]:
        """The clients that may still be sampled (all of them without a target)."""
        if self.pooled:
            return [] if 0 in self.exhausted else client_ids
        return [c for c in client_ids if c not in self.exhausted]

    def epsilons(self) -> dict[int, float]:
        return {k: c.epsilon(self.dp.delta) for k, c in self.clients.items()}

    def end_round(self) -> list[int]:
        """Mark (and return) the clients that one more round would take past the target."""
        target = self.dp.target_epsilon
        if target is None:
            return []
        newly = [
            k
            for k, c in self.clients.items()
            if k not in self.exhausted and c.epsilon_after_round(self.dp.delta) > target
        ]
        self.exhausted.extend(newly)
        return newly

    def accounts(self) -> dict[int, tuple[float, int]]:
        return {k: (c.sample_rate, c.steps) for k, c in self.clients.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "clients": {k: c.state_dict() for k, c in self.clients.items()},
            "exhausted": list(self.exhausted),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = {int(k): v for k, v in state["clients"].items()}
        if set(saved) != set(self.clients):
            raise FedLoraError(
                f"saved privacy state covers clients {sorted(saved)}, this run has {sorted(self.clients)}"
            )
        for k, client in self.clients.items():
            client.load_state_dict(saved[k])
        self.exhausted = [int(k) for k in state["exhausted"]]
