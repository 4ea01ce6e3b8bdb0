"""The centralized baseline: every client's training data pooled on one trainer.

Not a federated method but the reference the papers compare against: one "client" holds
the union of all clients' training sets and takes, per round, as many steps as all
sampled clients together would (same total number of optimisation steps). It trains as
one ordinary run: the runtime pools the data (:attr:`pools_clients`) and keeps the one
optimizer's state from round to round (:attr:`keeps_optimizer`), so Adam's moments and
bias correction continue instead of restarting at full step size every round.
Aggregation of a single reply is the reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod

if TYPE_CHECKING:
    from fedlora.config import Config


class Centralized(LoRAMethod):
    name = "centralized"
    pools_clients = True
    keeps_optimizer = True
    # One trainer takes all the clients' steps in a row: 5e-3 was unstable on SST-2 (the
    # FRA-LoRA comparison), 2e-3 the best of {1e-3, 2e-3, 5e-3} on the clients' held-out
    # splits (docs/results.md).
    default_lr = 2e-3

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        # `compare` on Flower leaves it out of `methods` itself (with a log line)
        if cfg.method == cls.name and cfg.runtime != "inprocess":
            raise FedLoraError(
                "method 'centralized' pools every client's data on one trainer: it runs with "
                "runtime=inprocess only"
            )

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        (update,) = updates
        head = dict(update.head) if update.head else dict(state.head)
        magnitude = dict(update.magnitude) if update.magnitude else dict(state.magnitude)
        return Aggregate(
            state=AdapterState(A=dict(update.A), B=dict(update.B), head=head, magnitude=magnitude)
        )
