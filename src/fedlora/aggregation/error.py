"""The aggregation error every method reports: what the global adapter holds against the
exact mean of the clients' updates.

For one layer, client ``k`` proposes the increment ``s_k B_k A_k`` (``s_k`` the LoRA
``scaling`` its adapter actually had). The exact mean update is

    M = sum_k w_k s_k B_k A_k,

and after aggregation the model holds ``X = s B A + D`` (``s B A`` the global adapter, ``D``
whatever the method folded into the frozen weight this round: FedEx-LoRA's residual,
FLoRA's merged stack). The error is

    agg_error = ||M - X||_F / ||M||_F,

one unit for every method: 0 for the exact ones (up to rounding), the relative cross-term
error for FedAvg-LoRA, ``sqrt`` of the discarded energy share for FRA-LoRA.

Beside it, the clients' drift: how far their increments spread around that mean,

    client_drift = sqrt(sum_k w_k ||s_k B_k A_k - M||_F^2) / ||M||_F,

0 when every client proposed the same increment (computed from two R x R Gram products per
layer, no out x in matrix); it grows as the clients' data (and their
local epochs away from the global model) pull them apart. Beside ``agg_error`` it tells
what the server lost in combining the clients from how far apart the clients were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import LayerFactors, check_factors
from fedlora.aggregation.lowrank import frobenius_norm_of_product

__all__ = ["client_drift", "relative_update_error"]


def _mean_coefficients(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None,
    scalings: Sequence[float],
) -> tuple[LayerFactors, Tensor]:
    """The stacked factors and the coefficient ``w_k s_k`` of each column, ``M = Bcat
    diag(c) Acat``."""
    f = check_factors(As, Bs, weights)
    if len(scalings) != len(f.ranks):
        raise ValueError(f"got {len(scalings)} scalings for {len(f.ranks)} clients")
    per_column = torch.repeat_interleave(
        torch.tensor([float(s) for s in scalings], dtype=f.w.dtype, device=f.device),
        torch.tensor(f.ranks, device=f.device),
    )
    return f, f.w * per_column


def relative_update_error(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    scalings: Sequence[float],
    A: Tensor,
    B: Tensor,
    scaling: float,
    folded: Tensor | None = None,
) -> float:
    """``||M - X||_F / ||M||_F`` with ``M = sum_k w_k s_k B_k A_k`` and ``X = s B A + folded``.

    Without ``folded``, ``M - X = [Bcat, B] diag(w s, -s) [Acat; A]`` is a product of thin
    factors, so both norms come from QR factorisations of the stacked factors and an
    ``(R + r) x (R + r)`` core: no ``out x in`` matrix is formed (for ``R + r`` below
    ``min(out, in)``). With a dense ``folded`` increment of shape ``(out, in)`` (the method
    already formed it) the difference is formed densely. Arithmetic is float64.

    Returns:
        The relative error; ``0.0`` when ``M = 0`` and ``X = 0``; ``math.inf`` when ``M = 0``
        but ``X`` is not: the aggregate then holds an update that no client proposed, which
        no relative error can express (the metrics file writes it as ``null``).

    Raises:
        ValueError: invalid factors or weights (see ``check_factors``), or a ``scalings``
            list whose length is not the number of clients.
    """
    f, c_mean = _mean_coefficients(As, Bs, weights, scalings)
    work = f.w.dtype
    norm = float(frobenius_norm_of_product(f.b_cat, c_mean, f.a_cat))
    a, b = A.to(work), B.to(work)
    if folded is None:
        p = torch.cat([f.b_cat, b], dim=1)
        c = torch.cat(
            [c_mean, torch.full((b.shape[1],), -float(scaling), dtype=work, device=f.device)]
        )
        q = torch.cat([f.a_cat, a], dim=0)
        error = float(frobenius_norm_of_product(p, c, q))
    else:
        diff = (f.b_cat * c_mean) @ f.a_cat - float(scaling) * (b @ a) - folded.to(work)
        error = float(torch.linalg.matrix_norm(diff))
    if norm == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / norm


def client_drift(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    scalings: Sequence[float],
) -> float:
    """``sqrt(sum_k w_k ||P_k - M||_F^2) / ||M||_F`` with ``P_k = s_k B_k A_k`` and
    ``M = sum_k w_k P_k`` (``w`` normalised to sum to 1).

    From ``sum_k w_k ||P_k - M||^2 = sum_k w_k ||P_k||^2 - ||M||^2`` and one ``R x R``
    matrix, ``H = (Bcat^T Bcat) * (Acat Acat^T)`` (elementwise): ``||M||^2 = c^T H c`` and
    ``||P_k||^2 = s_k^2 1^T H_kk 1``, so a layer costs two Gram products and no
    ``out x in`` matrix, about what :func:`relative_update_error` costs. Arithmetic is
    float64; the subtraction leaves the ratio accurate to about ``sqrt(eps64) = 1.5e-8``
    absolute, far below the drifts that matter.

    Returns:
        The relative spread; ``0.0`` when every ``P_k`` is 0, ``math.inf`` when the clients'
        increments cancel to ``M = 0`` (``||M||^2`` within ``1e3`` eps of
        ``sum_k w_k ||P_k||^2``) without being 0 (the metrics file writes ``null``).

    Raises:
        ValueError: as :func:`relative_update_error`.
    """
    f, c = _mean_coefficients(As, Bs, weights, scalings)
    h = (f.b_cat.mT @ f.b_cat) * (f.a_cat @ f.a_cat.mT)
    mean_sq = float(c @ h @ c)
    own_sq = 0.0  # sum_k w_k ||P_k||^2
    start = 0
    for r, w, s in zip(f.ranks, f.weights, scalings, strict=True):
        own_sq += w * float(s) ** 2 * float(h[start : start + r, start : start + r].sum())
        start += r
    if mean_sq <= 1e3 * torch.finfo(c.dtype).eps * own_sq:
        return 0.0 if own_sq == 0.0 else math.inf
    return math.sqrt(max(own_sq - mean_sq, 0.0) / mean_sq)
