"""What a federated LoRA method is: two questions and explicit state.

A method answers (1) what do the sampled clients train this round (:meth:`LoRAMethod.plan`,
Flower's ``configure_train``) and (2) how are their replies combined
(:meth:`LoRAMethod.aggregate`, Flower's ``aggregate_train``). Anything that must survive a
round (RoLoRA's phase, a schedule's switch) lives in :meth:`LoRAMethod.state_dict`.
Methods never touch PEFT, modules or devices: they map messages to messages.

:class:`LoRAMethod` declares every hook a runtime may use, with its default, so a method
file holds only what differs and no runtime probes a method with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, Factor, RoundPlan

if TYPE_CHECKING:
    from fedlora.config import Config

# Why a method whose clients have adapters of different ranks cannot carry DoRA.
RANKS_REFUSAL = (
    "its clients train adapters of different ranks, and PEFT keeps one magnitude vector "
    "per rank adapter"
)


@dataclass(frozen=True)
class Aggregate:
    """The server's result for one round.

    ``base_delta`` holds per-layer dense increments (shape ``(out, in)``, already including
    the LoRA ``scaling``) that every client folds into its frozen weight (FedEx-LoRA's
    residual); empty for methods whose result is all in the factors. ``delta_bytes`` is what
    delivering ``base_delta`` costs per client on the wire, in the form the method would
    send it (a dense residual, or stacked factors): it is counted in the next round's
    download on top of the adapter state. ``diagnostics`` holds a method's own per-layer
    figures under their own names (FRA-LoRA's ``fra_discarded_energy``); the aggregation
    error that every method reports is computed from the result by :func:`update_error`.
    """

    state: AdapterState
    base_delta: Mapping[str, torch.Tensor] = field(default_factory=dict)
    delta_bytes: int = 0
    diagnostics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class LoRAMethod:
    """Base of every method: the defaults of each hook a runtime may call.

    Attributes:
        name: the ``method=`` name.
        trained: what clients train in every round (a method whose plan changes overrides
            :meth:`plan`).
        pools_clients: the runtime pools every client's data on one trainer (centralized).
        keeps_optimizer: the client's optimizer state carries over from round to round
            (one ordinary training run: the centralized baseline). Federated clients build
            a fresh optimizer every round.
        paper_weighting: the client weights of the method's paper (``weighting=method``):
            ``num_examples`` (FedAvg's ``n_k / n``) or ``uniform`` (``1 / K``); see
            ``docs/configuration.md`` for what each paper states.
        default_lr: the learning rate of ``lr=null`` (the default), chosen from measured runs
            (``docs/configuration.md``, "Defaults").
        period: rounds after which the method's plan repeats (RoLoRA: 2, a ``B`` and an
            ``A`` round); an ``eval_every`` that is a multiple of it sees one phase only.
        carries_magnitude: the method can run a DoRA adapter (``adapter=dora``): its
            ``aggregate`` averages the magnitude vectors (:func:`aggregate_magnitude`) and it
            never changes the frozen weights, to whose ``||W0 + s B A||`` the magnitude is
            relative. False for the methods that fold increments into them (FedEx-LoRA,
            FLoRA); :func:`fedlora.methods.check_config` refuses those with DoRA. Clients train the magnitude in the
            rounds that train ``B`` (:attr:`~fedlora.messages.RoundPlan.train_magnitude`).
        private: the parts of the adapter (kinds of :class:`~fedlora.messages.AdapterState`:
            ``"B"``, ``"head"``, ``"magnitude"``) that each client keeps across rounds and
            never sends (FedSA-LoRA: everything but ``A``). Clients of such a method are
            stateful (:mod:`fedlora.client.state`): each trains from the global shared part
            with its own private part swapped in, the server sends and receives the shared
            part only, every evaluation adds each client's personalised accuracy, and no
            ``agg_error`` is reported (there is no global model whose update could be
            compared with the clients').
        takes_client_ranks: clients may have adapters of their own ranks (``client_ranks``:
            FLoRA, FlexLoRA, HetLoRA).
        folds_base: the method adds increments to the frozen weights (FedEx-LoRA's residual,
            FLoRA's merge, SLoRA's first stage), which a quantized base cannot hold exactly.
        schedulable: the method can be a phase of ``method: schedule``.

    What else a method cannot run with, it refuses in :meth:`check_config`;
    :func:`fedlora.methods.check_config` asks every method a config uses.
    """

    name: str = ""
    trained: Factor = "AB"
    pools_clients: bool = False
    keeps_optimizer: bool = False
    paper_weighting: str = "num_examples"
    period: int = 1
    default_lr: float = 3e-3
    carries_magnitude: bool = True
    magnitude_refusal: str = ""  # why not, when carries_magnitude is False
    private: tuple[str, ...] = ()
    takes_client_ranks: bool = False
    folds_base: bool = False
    schedulable: bool = False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse, with a one-line :class:`~fedlora.errors.FedLoraError`, a config this
        method cannot run (called for every method ``cfg`` uses); by default nothing."""

    def __init__(self, *, train_head: bool = True) -> None:
        self.train_head = train_head

    @property
    def label(self) -> str:
        """How logs and plots name the method (a schedule lists its phases)."""
        return self.name

    def plan(self, round: int) -> RoundPlan:
        return RoundPlan(
            round=round, trained=self.trained, train_head=self.train_head, method=self.name
        )

    def client_start(self, state: AdapterState, *, client_id: int, plan: RoundPlan) -> AdapterState:
        """The adapter client ``client_id`` starts from: the global one, unless the method
        restarts clients from their own (FLoRA)."""
        return state

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def aggregate_head(
    state: AdapterState, updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FedAvg of the classifier head when clients trained it; else the head unchanged."""
    if not updates or not updates[0].head:
        return dict(state.head)
    return {
        name: aggregation.weighted_mean([u.head[name] for u in updates], weights)
        for name in state.head
    }


def aggregate_magnitude(
    state: AdapterState, updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """DoRA's magnitude vectors: their weighted mean when clients trained them (as the head),
    else the global ones unchanged (plain LoRA: empty).

    ``m = sum_k w_k m_k`` per layer. The merged weight ``m / ||V||_row * V`` (``V = W0 + s B A``)
    is not linear in ``m`` and ``V`` together, so even where the factor part is exact the
    merged weight is not the mean of the clients' (docs/configuration.md, "DoRA").
    """
    if not updates or not updates[0].magnitude:
        return dict(state.magnitude)
    return {
        name: aggregation.weighted_mean([u.magnitude[name] for u in updates], weights)
        for name in state.magnitude
    }


def client_weights(
    updates: Sequence[ClientUpdate], weighting: str, method: LoRAMethod
) -> list[float]:
    """Each reply's weight in the average: its example count, or 1 (``weighting``;
    ``method`` takes the method's paper convention, :attr:`LoRAMethod.paper_weighting`)."""
    rule = method.paper_weighting if weighting == "method" else weighting
    return [float(u.num_examples) if rule == "num_examples" else 1.0 for u in updates]


def update_error(
    *,
    before: AdapterState,
    starts: Mapping[int, AdapterState] | None = None,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    scaling: Mapping[str, float],
    result: Aggregate,
) -> dict[str, float]:
    """Per layer, ``||M - X||_F / ||M||_F`` (:func:`fedlora.aggregation.relative_update_error`).

    ``M = sum_k w_k s_k B_k A_k`` is the exact mean of the clients' products, a factor a
    client did not train being the one it started from (``starts[client]``, default
    ``before``), ``s_k`` the scaling its adapter had (``ClientUpdate.scaling``, default the
    global ``scaling``); ``X = s B A + base_delta`` is what the model holds after the round.
    The same quantity for every method, computed from the result rather than claimed by it.
    Not defined (``{}``, no ``agg_error`` in the row) when the clients proposed sparse
    increments of the frozen weights instead of factors (SLoRA's first stage).
    """
    errors: dict[str, float] = {}
    if any(u.sparse for u in updates):
        return errors
    for layer in before.A:
        As, Bs, scalings = _proposed(layer, before, starts, updates, scaling)
        errors[layer] = aggregation.relative_update_error(
            As,
            Bs,
            weights,
            scalings=scalings,
            A=result.state.A[layer],
            B=result.state.B[layer],
            scaling=scaling[layer],
            folded=result.base_delta.get(layer),
        )
    return errors


def update_measures(
    *,
    before: AdapterState,
    starts: Mapping[int, AdapterState] | None = None,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    scaling: Mapping[str, float],
    result: Aggregate,
) -> tuple[dict[str, float], dict[str, float]]:
    """A round's :func:`update_error` and :func:`update_drift`, per layer."""
    errors = update_error(
        before=before,
        starts=starts,
        updates=updates,
        weights=weights,
        scaling=scaling,
        result=result,
    )
    return errors, update_drift(
        before=before, starts=starts, updates=updates, weights=weights, scaling=scaling
    )


def update_drift(
    *,
    before: AdapterState,
    starts: Mapping[int, AdapterState] | None = None,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    scaling: Mapping[str, float],
) -> dict[str, float]:
    """Per layer, the clients' drift ``sqrt(sum_k w_k ||P_k - M||_F^2) / ||M||_F``
    (:func:`fedlora.aggregation.client_drift`), from the same ``P_k = s_k B_k A_k`` as
    :func:`update_error`; ``{}`` where that is not defined, and with one client (no spread)."""
    if len(updates) < 2 or any(u.sparse for u in updates):
        return {}
    drift: dict[str, float] = {}
    for layer in before.A:
        As, Bs, scalings = _proposed(layer, before, starts, updates, scaling)
        drift[layer] = aggregation.client_drift(As, Bs, weights, scalings=scalings)
    return drift


def _proposed(
    layer: str,
    before: AdapterState,
    starts: Mapping[int, AdapterState] | None,
    updates: Sequence[ClientUpdate],
    scaling: Mapping[str, float],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """Each client's ``A_k``, ``B_k`` and scaling for ``layer``: a factor it did not train
    is the one it started from."""
    As: list[torch.Tensor] = []
    Bs: list[torch.Tensor] = []
    scalings: list[float] = []
    for u in updates:
        start = (starts or {}).get(u.client_id, before)
        As.append(u.A[layer] if layer in u.A else start.A[layer])
        Bs.append(u.B[layer] if layer in u.B else start.B[layer])
        scalings.append(u.scaling.get(layer, scaling[layer]))
    return As, Bs, scalings
