"""LoRA-FAIR: a server-side residual on the averaged ``B`` (aggregation refinement).

LoRA-FAIR (Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation
and Initialization Refinement", arXiv:2411.14961, ICCV 2025) keeps FedAvg's ``A`` and adds
to FedAvg's ``B`` the correction ``dB`` that best aligns the product with the clients'
mean product, while staying close to the average (the paper's Eq. 8):

    dB = argmin_dB  S(dW, (B_avg + dB) A_avg) + lam ||dB||,     dW = sum_k w_k B_k A_k.

All the work is done in ``(out, r)`` and ``(r, r)`` matrices: the ``out x in`` mean
update ``dW`` is never formed (see :func:`lora_fair`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.aggregation.factors import check_factors
from fedlora.aggregation.lora_math import _weighted_means
from fedlora.aggregation.lowrank import frobenius_norm_of_product

__all__ = ["FairCorrection", "lora_fair"]

DEFAULT_LAMBDA = 0.01  # the paper's lambda (its experiments and its ablation's default)
DEFAULT_MAX_ITER = 200


@dataclass(frozen=True)
class FairCorrection:
    """The result of :func:`lora_fair` for one layer.

    ``A`` is ``A_avg``, ``B`` is ``B_avg + dB`` (input dtype and device). ``cosine`` is
    ``cos(dW, B A)`` after the correction, ``cosine_fedavg`` the same for FedAvg's
    ``B_avg A_avg``, ``b_cosine`` is ``cos(B, B_avg)`` (how far the next round's start moved:
    the two similarities the paper's ablation of ``lam`` reports), ``b_shift`` is
    ``||dB||_F / ||B_avg||_F`` and ``iterations`` the L-BFGS iterations taken (0: ``dB = 0``
    was already optimal). Cosines of a zero matrix are 1 against zero and 0 otherwise.
    """

    A: Tensor
    B: Tensor
    cosine: float
    cosine_fedavg: float
    b_cosine: float
    b_shift: float
    iterations: int


def _cosine(inner: float, norm_x: float, norm_y: float) -> float:
    if norm_x == 0.0 or norm_y == 0.0:
        return 1.0 if norm_x == norm_y else 0.0
    return inner / (norm_x * norm_y)


def lora_fair(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    lam: float = DEFAULT_LAMBDA,
    max_iter: int = DEFAULT_MAX_ITER,
) -> FairCorrection:
    """LoRA-FAIR's corrected factors ``(A_avg, B_avg + dB)`` for one layer.

    With ``A_avg = sum_k w_k A_k``, ``B_avg = sum_k w_k B_k`` and ``dW = sum_k w_k B_k A_k``
    (Bian et al., arXiv:2411.14961, Eq. 8, with ``S`` the cosine dissimilarity):

        dB = argmin_dB  1 - <dW, X>_F / (||dW||_F ||X||_F) + lam ||dB||_F,
        X  = (B_avg + dB) A_avg.

    The cosine term is scale-free, so it fixes only the direction of ``X``; ``lam ||dB||``
    picks, among the near-best directions, the ``B`` closest to ``B_avg`` (the paper's
    "initialization refinement": clients start the next round from ``A_avg`` and
    ``B_avg + dB``, which keeps the averaged information). ``lam = 0`` leaves the scale to
    the solver's path from ``dB = 0``.

    How it is solved, without an ``out x in`` matrix: with the thin QR ``A_avg^T = Q R``,
    ``||X||_F = ||(B_avg + dB) R^T||_F`` and ``<dW, X>_F = <G, B_avg + dB>_F`` where
    ``G = sum_k w_k B_k (A_k A_avg^T)`` has shape ``(out, r)``; ``||dW||_F`` comes from the
    QR of the stacked factors (:func:`~fedlora.aggregation.lowrank.frobenius_norm_of_product`).
    Setup costs ``O((out + in) R^2)`` for ``R = sum_k r_k``, each objective and gradient
    evaluation ``O(out r^2)``. The objective is minimised over ``dB / ||B_avg||_F`` (a
    scale-free variable) by L-BFGS with a strong-Wolfe line search from ``dB = 0``, with the
    gradient in closed form; at ``dB = 0``, where ``||dB||`` has no gradient, ``dB = 0`` is
    returned when it is stationary, i.e. when the cosine term's gradient there is no longer
    than ``lam`` (its subgradient condition; identical clients give a zero gradient).
    Arithmetic is float64 (see :func:`~fedlora.aggregation.factors.work_dtype`).

    Deviations from the paper, on purpose:

    - The paper solves Eq. 8 with SGD on the server (a fork of the authors' code in the
      index: 1000 steps at lr 0.01). A fixed SGD step is not scale-free here (the cosine
      term's gradient grows as ``1 / ||B_avg A_avg||``), so this solves the same objective
      to a stationary point with L-BFGS instead.
    - ``S`` is the cosine of the two matrices as wholes (``<X, Y>_F / (||X||_F ||Y||_F)``, the
      similarity the paper reports); the fork's code averages the cosines of the columns.
      The regulariser is ``lam ||dB||_F`` as Eq. 8 writes it (the fork squares the norm).
    - When ``dW = 0`` or ``B_avg A_avg = 0`` the cosine is undefined there: ``dB = 0``.

    Returns:
        A :class:`FairCorrection`; ``A`` and ``B`` in the input dtype, on the input device.

    Raises:
        ValueError: ranks differ across clients, invalid factors or weights, ``lam`` not a
            finite number >= 0, or ``max_iter`` < 1.
    """
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    f = check_factors(As, Bs, weights)
    a, b = _weighted_means(f, method="lora_fair")
    work = a.dtype
    eps = torch.finfo(work).eps
    m = float(frobenius_norm_of_product(f.b_cat, f.w, f.a_cat))
    # <dW, X> = sum_k w_k <B_k A_k, B' A_avg> = <sum_k w_k B_k (A_k A_avg^T), B'>
    g = (f.b_cat * f.w) @ (f.a_cat @ a.mT)
    r_t = torch.linalg.qr(a.mT, mode="r").R.mT  # ||B' A_avg|| = ||B' R^T||
    s = r_t @ r_t.mT  # A_avg A_avg^T
    sigma = float(torch.linalg.matrix_norm(b))
    n0 = float(torch.linalg.matrix_norm(b @ r_t))
    cosine_fedavg = _cosine(float((g * b).sum()), m, n0)

    def cosine_and_grad(bp: Tensor) -> tuple[float, Tensor]:
        """``cos(dW, B' A_avg)`` and its gradient in ``B'``."""
        n = torch.linalg.matrix_norm(bp @ r_t)
        inner = (g * bp).sum()
        grad = (g - (inner / n.square()) * (bp @ s)) / (m * n)
        return float(inner / (m * n)), grad

    def result(dB: Tensor, iterations: int) -> FairCorrection:
        bp = b + dB
        n = float(torch.linalg.matrix_norm(bp @ r_t))
        shift = float(torch.linalg.matrix_norm(dB))
        return FairCorrection(
            A=a.to(f.dtype),
            B=bp.to(f.dtype),
            cosine=_cosine(float((g * bp).sum()), m, n),
            cosine_fedavg=cosine_fedavg,
            b_cosine=_cosine(float((bp * b).sum()), float(torch.linalg.matrix_norm(bp)), sigma),
            b_shift=shift / sigma if sigma > 0 else 0.0,
            iterations=iterations,
        )

    zero = torch.zeros_like(b)
    if m == 0.0 or n0 == 0.0:
        return result(zero, 0)
    # In the variable D = dB / sigma the cosine term's gradient is scale-free; the
    # regulariser's (sub)gradient is lam * sigma * D / ||D||.
    g0 = sigma * cosine_and_grad(b)[1]
    if float(torch.linalg.matrix_norm(g0)) <= max(lam * sigma, math.sqrt(eps)):
        return result(zero, 0)

    d = torch.zeros_like(b)
    optimizer = torch.optim.LBFGS(
        [d],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=eps,
        tolerance_change=eps,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> float:
        cos, grad = cosine_and_grad(b + sigma * d)
        norm_d = torch.linalg.matrix_norm(d)
        # ||D|| has no gradient at 0; its subgradient 0 lets the first step follow the
        # cosine term, which the check above made longer than lam.
        reg_grad = d / norm_d if float(norm_d) > 0 else torch.zeros_like(d)
        d.grad = -sigma * grad + lam * sigma * reg_grad
        return 1.0 - cos + lam * sigma * float(norm_d)

    with torch.no_grad():
        optimizer.step(closure)  # type: ignore[arg-type]
    iterations = int(optimizer.state[d].get("n_iter", 1))
    return result(sigma * d.detach(), iterations)
