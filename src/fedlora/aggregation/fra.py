"""FRA-LoRA: the best rank-``r`` approximation of the clients' average update.

FRA-LoRA (Trautmann, Hales, Volk, arXiv:2501.06332): the server replaces factor averaging
by the truncated SVD of ``M = sum_k w_k B_k A_k`` (Eckart-Young: the best rank-``r``
approximation in Frobenius norm), computed from the stacked factors without forming ``M``
when that is cheaper (see :mod:`fedlora.aggregation.lowrank`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import check_factors
from fedlora.aggregation.lowrank import singular_values_of_product, svd_of_product

__all__ = [
    "assemble_factors",
    "fra",
    "fra_truncation_error",
    "fra_with_error",
    "init_row_norm",
]


def _check_rank(rank: int) -> int:
    try:
        value = operator.index(rank)
    except TypeError:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}") from None
    if value < 1:
        raise ValueError(f"rank must be >= 1, got {value}")
    return value


def _discarded_share(s: Tensor, rank: int) -> float:
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        return 0.0
    return float(energy[rank:].sum()) / total


def init_row_norm() -> float:
    """Expected row norm of PEFT's default ``lora_A`` init, ``U(-1/sqrt(in), 1/sqrt(in))``:
    ``sqrt(in * (1 / in) / 3) = 1 / sqrt(3)``, whatever ``in`` is."""
    return 1.0 / math.sqrt(3.0)


def fra_with_error(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
    a_row_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """FRA-LoRA factors and their truncation error from one SVD.

    With ``M = sum_k w_k B_k A_k = U diag(s) V^T`` (``s`` decreasing) and ``r = rank``:

        B = U_r diag(sqrt(s_r)),   A = diag(sqrt(s_r)) V_r^T,
        B A = argmin_{rank(X) <= r} ||M - X||_F                  (Eckart-Young),
        err = sum_{i > r} s_i^2 / sum_i s_i^2                    (0.0 when M = 0),

    (Trautmann, Hales, Volk, FRA-LoRA, arXiv:2501.06332). How the singular values are split
    between the factors does not change ``B A``, only how clients train from them:

    - ``a_row_norm=None`` (default): evenly, ``B = U_r diag(sqrt(s_r))``,
      ``A = diag(sqrt(s_r)) V_r^T``, balanced factors with ``B^T B = A A^T = diag(s_r)``;
    - ``a_row_norm=c``: all into ``B``, ``A = c V_r^T`` (orthogonal rows of norm ``c``),
      ``B = U_r diag(s_r) / c``. With ``c = init_row_norm()`` the rows of ``A`` have the
      scale of PEFT's initial ``A``: what FFA-LoRA expects of the ``A`` it then freezes
      (the balanced split would hand it rows of norm ``sqrt(s_i)``, whatever that is).

    Route: if ``R = sum_k r_k < min(out, in)`` the SVD comes from QR factorisations of the
    stacked factors and an ``R x R`` core, never forming the ``out x in`` matrix ``M``;
    otherwise from ``torch.linalg.svd`` of the dense ``M``. Arithmetic is float64 (see
    :func:`~fedlora.aggregation.factors.work_dtype`), the outputs are cast back to the
    input dtype and stay on the input device.

    Determinism: each column of ``U`` is signed so that its largest-magnitude entry is
    positive, so identical inputs give identical factors whichever route is taken (up to
    rounding, and except for exact ties in magnitude or repeated singular values, where the
    factors are not unique but ``B A`` still is). Singular values below the rounding level
    ``s_1 max(out, in, R) eps`` count as zero.

    Args:
        As: per client ``A_k`` of shape ``(r_k, in)``; ranks may differ.
        Bs: per client ``B_k`` of shape ``(out, r_k)``.
        weights: non-negative client weights, normalised here; None means uniform.
        rank: rank of the result. If it exceeds the rank ``k`` of ``M``, the shapes stay
            ``(out, rank)`` and ``(rank, in)``: ``B``'s last ``rank - k`` columns are zero
            and, with a ``generator``, ``A``'s last rows are fresh random directions drawn
            as PEFT draws ``lora_A`` (``U(-1/sqrt(in), 1/sqrt(in))``); the product is the
            same, but the gradient of those ``B`` columns is not zero, so training can use
            them. Without a generator those rows are zero too: ``(B_j, A_j) = (0, 0)`` is a
            stationary point that no gradient leaves.
        a_row_norm: see the split above.
        generator: the random stream for padded rows of ``A``.

    Returns:
        ``(A, B, err)`` with ``A`` of shape ``(rank, in)``, ``B`` of shape ``(out, rank)``.

    Raises:
        ValueError: ``rank < 1``, or invalid factors or weights (see ``check_factors``).
    """
    rank = _check_rank(rank)
    _check_row_norm(a_row_norm)
    f = check_factors(As, Bs, weights)
    u, s, vh = svd_of_product(f.b_cat, f.w, f.a_cat, top=rank)
    a, b = assemble_factors(
        u, s, vh, rank=rank, a_row_norm=a_row_norm, generator=generator, dtype=f.dtype
    )
    return a, b, _discarded_share(s, rank)


def _check_row_norm(a_row_norm: float | None) -> None:
    if a_row_norm is not None and not a_row_norm > 0:
        raise ValueError(f"a_row_norm must be > 0, got {a_row_norm}")


def assemble_factors(
    u: Tensor,
    s: Tensor,
    vh: Tensor,
    *,
    rank: int,
    a_row_norm: float | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """FRA-LoRA's ``(A, B)`` from the leading singular triplets of ``M``.

    ``u`` (``(out, k)``), ``s`` (all singular values, decreasing, noise already zeroed) and
    ``vh`` (``(k, in)``) with ``k <= rank``, in the working precision; see
    :func:`fra_with_error` for the split and the padding. Shared by the per-layer and the
    batched route (:mod:`fedlora.aggregation.batched`) so that both split, pad and draw
    from ``generator`` identically. Returns factors cast to ``dtype``, on ``u``'s device.
    """
    out_features, in_features, device = u.shape[0], vh.shape[1], u.device
    kept = int((s[: u.shape[1]] > 0).sum())  # singular values zeroed as noise are padding
    b = torch.zeros(out_features, rank, dtype=s.dtype, device=device)
    a = torch.zeros(rank, in_features, dtype=s.dtype, device=device)
    if a_row_norm is None:
        root = s[:kept].sqrt()
        b[:, :kept] = u[:, :kept] * root
        a[:kept] = root[:, None] * vh[:kept]
    else:
        b[:, :kept] = u[:, :kept] * (s[:kept] / a_row_norm)
        a[:kept] = a_row_norm * vh[:kept]
    if generator is not None and kept < rank:
        bound = 1.0 / math.sqrt(in_features)
        fresh = torch.rand(rank - kept, in_features, generator=generator, dtype=torch.float64)
        a[kept:] = ((fresh * 2 - 1) * bound).to(device=device, dtype=a.dtype)
    return a.to(dtype), b.to(dtype)


def fra(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
) -> tuple[Tensor, Tensor]:
    """FRA-LoRA aggregation: ``B A`` is the best rank-``rank`` approximation of ``M``.

        M = sum_k w_k B_k A_k = U diag(s) V^T,
        B = U_r diag(sqrt(s_r)),   A = diag(sqrt(s_r)) V_r^T

    (Trautmann, Hales, Volk, arXiv:2501.06332). Returns ``(A, B)`` of shapes
    ``(rank, in)`` and ``(out, rank)``; see :func:`fra_with_error` for the route, the
    precision, the sign convention and zero padding when ``rank`` exceeds ``rank(M)``.
    """
    a, b, _ = fra_with_error(As, Bs, weights, rank=rank)
    return a, b


def fra_truncation_error(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
) -> float:
    """Share of ``||M||_F^2`` that FRA-LoRA discards at ``rank``.

        err = sum_{i > rank} s_i^2 / sum_i s_i^2 = ||M - B A||_F^2 / ||M||_F^2

    with ``s`` the singular values of ``M = sum_k w_k B_k A_k`` (0.0 when ``M = 0``).
    Computes singular values only; use :func:`fra_with_error` when the factors are needed too.
    """
    rank = _check_rank(rank)
    f = check_factors(As, Bs, weights)
    return _discarded_share(singular_values_of_product(f.b_cat, f.w, f.a_cat), rank)
