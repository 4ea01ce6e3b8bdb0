"""SVD and Frobenius norm of a matrix given as a product of thin factors.

All functions take ``p`` of shape ``(out, R)``, ``c`` of shape ``(R,)`` and ``q`` of shape
``(R, in)`` and describe ``M = p diag(c) q`` without requiring it to be formed. When
``R < min(out, in)`` ("factored" route), with reduced QR decompositions ``p = Q_p R_p`` and
``q^T = Q_q R_q``,

    M = Q_p (R_p diag(c) R_q^T) Q_q^T,

so ``M`` has the singular values of the ``R x R`` core ``R_p diag(c) R_q^T = U' S V'^T`` and
the singular vectors ``U = Q_p U'``, ``V = Q_q V'`` (Q_p, Q_q have orthonormal columns).
That costs ``O((out + in) R^2)`` instead of the ``O(out in min(out, in))`` of a dense SVD.
Otherwise ("dense" route) ``M`` is formed and decomposed with ``torch.linalg.svd``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Route",
    "choose_route",
    "frobenius_norm_of_product",
    "singular_values_of_product",
    "svd_of_product",
]

Route = Literal["auto", "factored", "dense"]


def choose_route(*, total_rank: int, out_features: int, in_features: int) -> Route:
    """``"factored"`` when ``total_rank < min(out_features, in_features)``, else ``"dense"``."""
    return "factored" if total_rank < min(out_features, in_features) else "dense"


def _resolve(route: Route, p: Tensor, q: Tensor) -> Route:
    if route == "auto":
        return choose_route(total_rank=p.shape[1], out_features=p.shape[0], in_features=q.shape[1])
    if route not in ("factored", "dense"):
        raise ValueError(f"route must be 'auto', 'factored' or 'dense', got {route!r}")
    return route


def _zero_noise(s: Tensor, *, out_features: int, in_features: int, total_rank: int) -> Tensor:
    # Singular values below the rounding level of the largest one carry no information but
    # differ between routes; zeroing them makes rank-deficient inputs give exact zeros
    # (the tolerance torch.linalg.matrix_rank uses by default, with R counted as a dimension).
    if s.numel() == 0:
        return s
    tol = s.max() * max(out_features, in_features, total_rank) * torch.finfo(s.dtype).eps
    return torch.where(s > tol, s, torch.zeros_like(s))


def _fix_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    # Singular vectors are defined up to a joint sign flip of (u_i, v_i). Making the entry of
    # largest magnitude of each u_i positive (the first such entry on exact ties) turns the
    # output into a function of M alone, so both routes and repeated calls agree.
    if u.shape[1] == 0:
        return u, vh
    idx = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(u, 0, idx)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


def _triangular_factor(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Householder QR ``x = Q R`` kept as reflectors: ``(reflectors, tau, R)``."""
    reflectors, tau = torch.geqrf(x)
    return reflectors, tau, reflectors[: min(x.shape)].triu()


def _apply_q(reflectors: Tensor, tau: Tensor, x: Tensor) -> Tensor:
    # Multiplying by the thin Q through its reflectors (LAPACK ormqr) costs O(m R k) and
    # never builds the (m, R) matrix Q, which would cost as much as the QR itself.
    padded = x.new_zeros(reflectors.shape[0], x.shape[1])
    padded[: x.shape[0]] = x
    return torch.ormqr(reflectors, tau, padded)


def svd_of_product(
    p: Tensor, c: Tensor, q: Tensor, *, top: int | None = None, route: Route = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """Leading singular triplets of ``M = p diag(c) q`` with deterministic signs.

    Returns ``(U, S, V^T)`` where ``S`` holds all singular values available on the route,
    decreasing (``min(out, in, R)`` factored, ``min(out, in)`` dense; the extra ones are
    zero), values below ``s_max * max(out, in, R) * eps`` set to zero, and ``U``, ``V^T``
    only the first ``top`` of them (all when ``top`` is None), since forming the rest
    through ``Q_p`` and ``Q_q`` would dominate the cost. Signs: the largest-magnitude entry
    of every column of ``U`` is positive (``V`` flipped with it).
    """
    out_features, total_rank = p.shape
    in_features = q.shape[1]
    if _resolve(route, p, q) == "factored":
        refl_p, tau_p, r_p = _triangular_factor(p)
        refl_q, tau_q, r_q = _triangular_factor(q.mT)
        u_core, s, vh_core = torch.linalg.svd((r_p * c) @ r_q.mT, full_matrices=False)
        k = s.numel() if top is None else min(top, s.numel())
        u = _apply_q(refl_p, tau_p, u_core[:, :k])
        vh = _apply_q(refl_q, tau_q, vh_core[:k].mT).mT
    else:
        u, s, vh = torch.linalg.svd((p * c) @ q, full_matrices=False)
        k = s.numel() if top is None else min(top, s.numel())
        u, vh = u[:, :k], vh[:k]
    s = _zero_noise(s, out_features=out_features, in_features=in_features, total_rank=total_rank)
    u, vh = _fix_signs(u, vh)
    return u, s, vh


def singular_values_of_product(p: Tensor, c: Tensor, q: Tensor, *, route: Route = "auto") -> Tensor:
    """Singular values of ``M = p diag(c) q`` (decreasing, noise zeroed as in svd_of_product)."""
    out_features, total_rank = p.shape
    in_features = q.shape[1]
    if _resolve(route, p, q) == "factored":
        r_p = _triangular_factor(p)[2]
        r_q = _triangular_factor(q.mT)[2]
        s = torch.linalg.svdvals((r_p * c) @ r_q.mT)
    else:
        s = torch.linalg.svdvals((p * c) @ q)
    return _zero_noise(s, out_features=out_features, in_features=in_features, total_rank=total_rank)


def frobenius_norm_of_product(p: Tensor, c: Tensor, q: Tensor, *, route: Route = "auto") -> Tensor:
    """``||p diag(c) q||_F`` as a 0-dim tensor.

    Factored route: ``||M||_F = ||R_p diag(c) R_q^T||_F``. Unlike the trace identity
    ``||M||_F^2 = <p^T p, diag(c) q q^T diag(c)>``, whose rounding error is
    ``sqrt(eps) ||p|| ||q||`` after the square root, this is accurate to ``eps ||p|| ||q||``,
    which matters when ``M`` is a small difference of two products (FedAvg's error).
    """
    if _resolve(route, p, q) == "factored":
        r_p = _triangular_factor(p)[2]
        r_q = _triangular_factor(q.mT)[2]
        return torch.linalg.matrix_norm((r_p * c) @ r_q.mT)
    return torch.linalg.matrix_norm((p * c) @ q)
