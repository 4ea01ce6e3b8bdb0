"""Factor-space aggregators: FedAvg of factors, FedEx-LoRA, FLoRA stacking.

For one layer and ``K`` clients with ``A_k`` of shape ``(r_k, in)``, ``B_k`` of shape
``(out, r_k)`` and normalised weights ``w_k``, the update the clients jointly propose is

    M = sum_k w_k B_k A_k.

FedAvg of the factors (FedIT) does not reproduce it, ``mean(B) mean(A) != M`` in general;
FedEx-LoRA keeps the difference as a dense residual, FLoRA stacks the factors so that the
product is exact. All functions return tensors in the input dtype, on the input device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import LayerFactors, check_factors, normalise_weights, work_dtype
from fedlora.aggregation.lowrank import frobenius_norm_of_product

__all__ = ["fedavg", "fedavg_error", "fedex", "stack", "weighted_mean"]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor | None) -> Tensor:
    """``sum_k w_k t_k`` with ``w_k = weights[k] / sum_j weights[j]`` (uniform when None).

    The plain FedAvg of tensors of one shape: a factor that every client trained from the
    same frozen partner (FFA-LoRA's and RoLoRA's ``B``, RoLoRA's ``A``) and the head.
    Accumulates in the working precision, returns the input dtype.

    Raises:
        ValueError: no tensors, shapes that differ, non-finite values, or bad weights
            (wrong length, negative, non-finite, all zero; see ``normalise_weights``).
    """
    if len(tensors) == 0:
        raise ValueError("no clients to aggregate: the list of tensors is empty")
    w = normalise_weights(weights, len(tensors))
    first = tensors[0]
    work = work_dtype(first.device)
    out = torch.zeros(first.shape, dtype=work, device=first.device)
    for k, (w_k, t) in enumerate(zip(w, tensors, strict=True)):
        if t.shape != first.shape:
            raise ValueError(
                f"client {k}: shape {tuple(t.shape)} differs from {tuple(first.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"client {k}: tensor contains NaN or infinite values")
        out.add_(t.to(work), alpha=w_k)
    return out.to(first.dtype)


def _weighted_means(f: LayerFactors, *, method: str) -> tuple[Tensor, Tensor]:
    """``(sum_k w_k A_k, sum_k w_k B_k)`` in the working precision; needs equal ranks."""
    if len(set(f.ranks)) != 1:
        raise ValueError(
            f"{method} averages factors and needs equal ranks across clients, got {f.ranks}; "
            "use stack or fra for heterogeneous ranks"
        )
    n_clients, r = len(f.ranks), f.ranks[0]
    w = torch.tensor(f.weights, dtype=f.w.dtype, device=f.device)
    a = torch.einsum("k,kri->ri", w, f.a_cat.reshape(n_clients, r, f.in_features))
    b = torch.einsum("k,okr->or", w, f.b_cat.reshape(f.out_features, n_clients, r))
    return a, b


def fedavg(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """FedAvg of the LoRA factors (FedIT / FedAvg-LoRA).

        A = sum_k w_k A_k,   B = sum_k w_k B_k

    (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
    arXiv:2305.05644; McMahan et al., arXiv:1602.05629). ``B A`` differs from
    ``M = sum_k w_k B_k A_k`` by the cross terms; :func:`fedavg_error` measures by how much.

    Returns:
        ``(A, B)`` of shapes ``(r, in)`` and ``(out, r)``.

    Raises:
        ValueError: ranks differ across clients, or invalid factors or weights.
    """
    f = check_factors(As, Bs, weights)
    a, b = _weighted_means(f, method="fedavg")
    return a.to(f.dtype), b.to(f.dtype)


def fedex(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FedEx-LoRA: averaged factors plus the exact residual of the average update.

        A = sum_k w_k A_k,   B = sum_k w_k B_k,   residual = sum_k w_k B_k A_k - B A

    (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
    Efficient Fine-Tuning of Foundation Models", arXiv:2410.09432). Folding the residual
    into the frozen weight makes ``W0 + residual + B A = W0 + M`` exact. The residual is in
    the units of ``B A``: multiply it by the adapter's ``scaling`` before adding it to ``W0``.

    ``residual`` is computed in float64 against the returned (already cast) ``A`` and ``B``,
    so ``B @ A + residual == M`` holds to the rounding of the output dtype.

    Returns:
        ``(A, B, residual)`` with ``residual`` dense of shape ``(out, in)``.

    Raises:
        ValueError: ranks differ across clients, or invalid factors or weights.
    """
    f = check_factors(As, Bs, weights)
    a, b = _weighted_means(f, method="fedex")
    a, b = a.to(f.dtype), b.to(f.dtype)
    work = f.a_cat.dtype
    # One matmul over [Bcat diag(w), -B] [Acat; A] so M and B A are never rounded apart.
    p = torch.cat([f.b_cat * f.w, -b.to(work)], dim=1)
    q = torch.cat([f.a_cat, a.to(work)], dim=0)
    return a, b, (p @ q).to(f.dtype)


def stack(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """FLoRA stacking: factors of rank ``R = sum_k r_k`` whose product is exactly ``M``.

        B = [w_1 B_1, ..., w_K B_K],   A = [A_1; ...; A_K],   B A = sum_k w_k B_k A_k

    (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
    Low-Rank Adaptations", arXiv:2409.05976). Ranks may differ across clients. The weights
    go into the ``B`` blocks so that ``A`` is the clients' ``A_k`` unchanged (LoRA starts
    ``B`` at zero, so ``B`` is the factor that carries each client's update magnitude).

    Returns:
        ``(A, B)`` of shapes ``(R, in)`` and ``(out, R)``.
    """
    f = check_factors(As, Bs, weights)
    return f.a_cat.to(f.dtype), (f.b_cat * f.w).to(f.dtype)


def fedavg_error(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
) -> float:
    """Relative error of FedAvg on the factors against the exact average update.

        err = ||M - B A||_F / ||M||_F,   M = sum_k w_k B_k A_k,   A, B = weighted means

    ``M - B A = [Bcat, B] diag(w, -1) [Acat; A]`` is a product of thin factors, so both
    norms come from :func:`~fedlora.aggregation.lowrank.frobenius_norm_of_product` without
    forming an ``out x in`` matrix when ``R + r < min(out, in)``.

    Returns 0.0 when ``M = 0`` and ``B A = 0``; ``math.inf`` when ``M = 0`` but FedAvg's
    product is not (the factor average then invents an update no client proposed).

    Raises:
        ValueError: ranks differ across clients, or invalid factors or weights.
    """
    f = check_factors(As, Bs, weights)
    a, b = _weighted_means(f, method="fedavg_error")
    p = torch.cat([f.b_cat, b], dim=1)
    c = torch.cat([f.w, -torch.ones(b.shape[1], dtype=f.w.dtype, device=f.device)])
    q = torch.cat([f.a_cat, a], dim=0)
    error = float(frobenius_norm_of_product(p, c, q))
    norm = float(frobenius_norm_of_product(f.b_cat, f.w, f.a_cat))
    if norm == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / norm
