"""FRA-LoRA: aggregate the full-rank average increment, re-factorise it at rank ``r``.

Trautmann, Hales, Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning",
arXiv 2501.06332. Clients train both factors; the server forms (implicitly, through the
factors) the average weight increment and keeps its best rank-``r`` approximation:

    M = sum_k w_k s_k B_k A_k = U diag(sigma) V^T,   s B A = U_r diag(sigma_r) V_r^T,

with ``s_k`` the scaling each client's adapter had (``ClientUpdate.scaling``) and ``s``
the global adapter's. The SVD is taken of ``M / s`` (the clients' ``B_k`` weighed by
``s_k / s``), so the factors need no rescaling afterwards. The singular values are split
evenly (``B = U_r diag(sqrt(sigma_r / s))``, ``A = diag(sqrt(sigma_r / s)) V_r^T``), except
in the round that hands ``A`` to a phase that freezes it (FFA-LoRA in the paper's hybrid
schedule, ``hand_over_round``): there ``A = V_r^T / sqrt(3)``, orthogonal rows at the
scale of PEFT's initial ``A``, and ``B`` takes all of ``sigma``. When ``rank(M) < r`` the
missing rows of ``A`` are fresh random directions seeded by ``(seed, round)`` (their ``B``
columns are zero, so ``B A`` is unchanged and training can still use them).
Clients restart each round from these factors with a fresh optimizer (as in every
method here), so no optimizer moment refers to the replaced factors.
``diagnostics["fra_discarded_energy"]`` is ``sum_{i>r} sigma_i^2 / sum_i sigma_i^2``;
``agg_error`` (every method's unit) is its square root.
All layers are aggregated by one call of :func:`fedlora.aggregation.batched.fra_batched`,
which decomposes layers of equal shape as one batch (float32 QRs for float32 adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.aggregation.batched import fra_batched
from fedlora.aggregation.fra import init_row_norm
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head, aggregate_magnitude


def _relative_b(update: ClientUpdate, layer: str, scaling: float) -> Tensor:
    """``(s_k / s) B_k``: the client's ``B`` on the global adapter's scale (no copy at 1)."""
    ratio = update.scaling.get(layer, scaling) / scaling
    return update.B[layer] if ratio == 1.0 else ratio * update.B[layer]


class FRALoRA(LoRAMethod):
    name = "fra"
    schedulable = True

    def __init__(
        self,
        *,
        rank: int,
        seed: int = 0,
        hand_over_round: int | None = None,
        train_head: bool = True,
    ) -> None:
        super().__init__(train_head=train_head)
        self.rank = rank
        self.seed = seed
        self.hand_over_round = hand_over_round

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_A, new_B, discarded = {}, {}, {}
        row_norm = init_row_norm() if plan.round == self.hand_over_round else None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + plan.round * 10_007)
        layers = list(state.A)
        As = [[u.A[layer] for u in updates] for layer in layers]
        Bs = [[_relative_b(u, layer, scaling[layer]) for u in updates] for layer in layers]
        # One call for all layers: layers of equal shape are decomposed as one batch, and
        # padded rows are drawn from `generator` in the order of `layers`, as per layer.
        results = fra_batched(
            As, Bs, weights, rank=self.rank, a_row_norm=row_norm, generator=generator
        )
        for layer, (a, b, err) in zip(layers, results, strict=True):
            new_A[layer], new_B[layer], discarded[layer] = a, b, err
        head = aggregate_head(state, updates, weights)
        magnitude = aggregate_magnitude(state, updates, weights)
        return Aggregate(
            state=AdapterState(A=new_A, B=new_B, head=head, magnitude=magnitude),
            diagnostics={"fra_discarded_energy": discarded},
        )
