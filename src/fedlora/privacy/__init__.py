"""Example-level differential privacy for every client: DP-SGD with Opacus.

DP wraps the client trainer instead of changing any method: :meth:`FederatedPrivacy.trainer`
gives the runtime a drop-in for :func:`~fedlora.client.train_client`, and each client's
accountant lives in :class:`ClientPrivacy` for the whole run. On Flower each client keeps
its own accountant on its SuperNode (:class:`NodeAccount`) and the server reads what the
clients report (:class:`ReportedPrivacy`, :mod:`fedlora.privacy.remote`). See
``docs/privacy.md``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedlora.privacy.accounting import (
    ClientPrivacy,
    FederatedPrivacy,
    check_target_reachable,
    epsilon_of,
    make_accountant,
    noise_for_target,
)
from fedlora.privacy.dp_sgd import poisson_batches, train_client_dp
from fedlora.privacy.remote import BudgetSpent, NodeAccount, ReportedPrivacy

if TYPE_CHECKING:
    from fedlora.federation import Federation


def plan_for_federation(fed: Federation, *, pools_clients: bool) -> FederatedPrivacy:
    """Accountants for a federation's clients (or for the pooled data of ``centralized``).

    Planned rounds per client: ``rounds`` when every client is sampled; with
    ``client_fraction < 1`` the expected number, ``ceil(rounds * m / K)`` with ``m`` the
    clients sampled per round. A client sampled more often than that runs out of budget
    early and is not trained again.
    """
    cfg = fed.cfg
    per_round = max(1, round(cfg.client_fraction * len(fed.clients)))  # as sample_clients
    if pools_clients:
        sizes = {0: len(fed.pooled_train)}
        steps = {0: cfg.local_steps * per_round}
        rounds = {0: cfg.rounds}
    else:
        sizes = {cid: len(splits.train) for cid, splits in fed.encoded.items()}
        steps = dict.fromkeys(sizes, cfg.local_steps)
        rounds = dict.fromkeys(sizes, math.ceil(cfg.rounds * per_round / len(sizes)))
    return FederatedPrivacy.plan(
        cfg.dp,
        num_examples=sizes,
        batch_size=cfg.batch_size,
        steps_per_round=steps,
        planned_rounds=rounds,
        pooled=pools_clients,
    )


__all__ = [
    "BudgetSpent",
    "ClientPrivacy",
    "FederatedPrivacy",
    "check_target_reachable",
    "epsilon_of",
    "make_accountant",
    "NodeAccount",
    "noise_for_target",
    "plan_for_federation",
    "poisson_batches",
    "ReportedPrivacy",
    "train_client_dp",
]
