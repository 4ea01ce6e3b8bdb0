"""FRA-LoRA over many layers at once: one batched factorisation per group of equal shapes.

For every layer, with ``M = p diag(c) q^T``, ``p = [B_1 .. B_K]`` (``(out, R)``),
``q = [A_1; ..; A_K]^T`` (``(in, R)``) and ``c`` the client weights repeated over each
client's rank, FRA-LoRA (Trautmann, Hales, Volk, arXiv:2501.06332) keeps the truncated SVD
of ``M`` (Eckart-Young). As in :mod:`fedlora.aggregation.lowrank`, ``M`` is never formed:

    p = Q_p R_p,  q = Q_q R_q  (Householder QR),   K = R_p diag(c) R_q^T,
    K^T K = V' S^2 V'^T,   V_r = Q_q V'_r,   M V_r = U_r S_r W^T  (thin SVD),
    B A = U_r S_r (V_r W)^T = M V_r V_r^T.

What differs from the per-layer route (:func:`fedlora.aggregation.fra_with_error`):

- Layers of equal ``(out, in, R)``, dtype and device are stacked and decomposed by one
  batched call of each kernel (``torch.geqrf``, ``torch.linalg.eigh``, ``torch.ormqr``,
  ``torch.linalg.svd``), in chunks that bound the memory.
- Precision: for float32 (or 16-bit) factors the two big QRs, ``Q_q V'_r`` and ``M V_r``
  run in float32, the ``R x R`` core and the thin SVD in float64. Householder QR is
  normwise backward stable, so the result is the exact truncation of some ``M + E`` with
  ``||E||_F`` a few ``eps32 ||M||_F``; the truncation amplifies it by its condition
  number ``s_r / (s_r - s_{r+1})``. Measured (``tests/aggregation/test_batched.py`` states
  the tolerance): ``||B A - M_r||_F / ||M||_F`` of 2 to 4 eps32 when the kept singular
  values stand apart; for random clients at 7B shapes up to 35 eps32 (condition up to
  1400) and 530 eps32 (6e-5) on a layer whose s_16 and s_17 nearly tie (condition 14600).
  The per-layer float64 route is at 0.3 eps32 everywhere, the rounding of its output.
  ``qr_dtype=torch.float64`` restores that (batched, the QRs about twice as long). Float64
  factors are always decomposed in float64.
- The core's singular values and right vectors come from the eigendecomposition of
  ``K^T K`` (under half the time of the ``R x R`` SVD here): squaring only loses values below
  ``sqrt(R eps64) s_1``, which the certificate below keeps out of the kept directions, and
  the kept triplets are recomputed from ``M V_r``.
- ``Q_q`` is applied through its reflectors on the smaller of the two dimensions only; the
  other side comes from ``M V_r``, whose SVD also makes ``B^T B = A A^T`` exact.
- A layer goes to the per-layer float64 route when float32 cannot decide what that route
  decides: when its ``min(rank, R)``-th singular value is not above ``2^10 nu``, with
  ``nu = eps (||p||_F ||q diag(c)||_F + ||p diag(c)||_F ||q||_F)`` (or the eigensolver's
  ``sqrt(R eps64) s_1``) bounding the noise in ``s`` (``M`` numerically rank-deficient
  within the kept directions, where the float64 route pads with seeded random rows, or
  ``M`` a small difference of large products); when ``R >= min(out, in)`` (its dense
  route); or when the factors are not finite (its checks then raise their message).

The split of the singular values, the padding and the draws from ``generator`` are those of
the per-layer route (:func:`fedlora.aggregation.fra.assemble_factors`), in the order of the
layers, so a padded layer receives the same random rows either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import check_factors, normalise_weights, work_dtype
from fedlora.aggregation.fra import (
    _check_rank,
    _check_row_norm,
    _discarded_share,
    assemble_factors,
)
from fedlora.aggregation.lowrank import _fix_signs, svd_of_product

__all__ = ["fra_batched"]

# A kept singular value must exceed the float32 noise bound ``nu`` by this factor: then its
# float32 value is within 0.1% of the float64 one and far above the float64 route's zero
# threshold, so both routes keep the same directions (and pad the same rows).
_CERTIFY = 2.0**10
# Largest stack of factors decomposed in one call (bytes, in the QR precision): the batched
# kernels loop over the batch anyway, so chunking costs nothing and bounds the memory.
_CHUNK_BYTES = 256 * 2**20

_Key = tuple[int, int, int, torch.dtype, torch.device]
_Triplets = tuple[Tensor, Tensor, Tensor]


def _group_key(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> _Key | None:
    """``(out, in, R, dtype, device)`` of valid factors, None if ``check_factors`` objects.

    Only what stacking needs, without touching the values; anything odd goes to
    ``check_factors``, which owns the error messages (finiteness is checked on the stack).
    """
    if len(As) != len(Bs) or len(As) == 0:
        return None
    a0, b0 = As[0], Bs[0]
    if not (isinstance(a0, Tensor) and isinstance(b0, Tensor)) or not a0.is_floating_point():
        return None
    total = 0
    for a, b in zip(As, Bs, strict=True):
        if not (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.ndim == 2
            and b.ndim == 2
            and a.dtype == b.dtype == a0.dtype
            and a.device == b.device == a0.device
            and a.shape[0] == b.shape[1] >= 1
            and a.shape[1] == a0.shape[1]
            and b.shape[0] == b0.shape[0]
        ):
            return None
        total += a.shape[0]
    return (b0.shape[0], a0.shape[1], total, a0.dtype, a0.device)


def _qr_dtype(dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    # Float64 factors keep float64; narrower ones are decomposed in float32 (see above).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stack(
    layers: Sequence[int],
    As: Sequence[Sequence[Tensor]],
    Bs: Sequence[Sequence[Tensor]],
    weights: Sequence[float] | Tensor | None,
    *,
    key: _Key,
    qr_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``p`` ``(n, out, R)``, ``q`` ``(n, in, R)`` in ``qr_dtype``, ``c`` ``(n, R)`` float64."""
    out_features, in_features, total, _, device = key
    n = len(layers)
    # Layouts that copy each client's factor without transposing it (A_k's rows, B_k's
    # columns): q is then column-major as LAPACK wants, p is transposed once by geqrf.
    p = torch.empty(n, out_features, total, dtype=qr_dtype, device=device)
    q = torch.empty(n, total, in_features, dtype=qr_dtype, device=device)
    c = torch.empty(n, total, dtype=work_dtype(device), device=device)
    for j, layer in enumerate(layers):
        a_l, b_l = As[layer], Bs[layer]
        # One cat per factor and layer: per-client slice copies cost more than the data.
        if a_l[0].dtype == qr_dtype:
            torch.cat(list(a_l), dim=0, out=q[j])
            torch.cat(list(b_l), dim=1, out=p[j])
        else:
            q[j] = torch.cat(list(a_l), dim=0)
            p[j] = torch.cat(list(b_l), dim=1)
        w = normalise_weights(weights, len(a_l))
        ranks = torch.tensor([a.shape[0] for a in a_l], device=device)
        c[j] = torch.repeat_interleave(torch.tensor(w, dtype=c.dtype, device=device), ranks)
    return p, q.mT, c


def _decompose(left: Tensor, right: Tensor, c: Tensor, *, rank: int) -> tuple[_Triplets, Tensor]:
    """Leading triplets of ``M = left diag(c) right^T`` for a stack of layers.

    ``left`` ``(n, m, R)``, ``right`` ``(n, k, R)``; returns ``(U (n, m, t), S (n, R),
    V (n, k, t))`` in float64 with ``t = min(rank, R)``, ``S[:, :t]`` from the Rayleigh-Ritz
    step and the rest from the core, and which layers are certified (see module docstring).
    """
    work, total = c.dtype, c.shape[-1]
    top = min(rank, total)
    refl_l, _ = torch.geqrf(left)
    # `right` is not needed after its QR (M V_r below uses R_r): factorise it in place when
    # it is column-major already, saving geqrf's copy of it.
    if right.mT.is_contiguous():
        tau_r = right.new_empty(right.shape[0], total)
        refl_r, tau_r = torch.geqrf(right, out=(right, tau_r))
    else:
        refl_r, tau_r = torch.geqrf(right)
    r_l = refl_l[..., :total, :].triu().to(work)
    r_r = refl_r[..., :total, :].triu().to(work)
    r_rc = r_r * c[:, None, :]
    core = (r_l * c[:, None, :]) @ r_r.mT
    # Finite factors can still overflow float32 in the QR; such a layer goes to float64.
    finite = torch.isfinite(core).flatten(1).all(dim=1)
    core = torch.where(finite[:, None, None], core, torch.zeros_like(core))
    # Right singular vectors and values of the core from the eigendecomposition of its
    # Gram matrix (a third of the time of an R x R SVD here). Squaring costs accuracy only
    # for s_i below sqrt(R eps64) s_1, which the certificate below excludes from the kept
    # directions; the kept triplets are recomputed from M V_r anyway.
    lam, vecs = torch.linalg.eigh(core.mT @ core)
    s = lam.flip(-1).clamp_min(0).sqrt()
    vh_core = vecs.flip(-1).mT
    eps = torch.finfo(left.dtype).eps
    fro = torch.linalg.matrix_norm
    nu = eps * (fro(r_l) * fro(r_rc) + fro(r_l * c[:, None, :]) * fro(r_r))
    nu = torch.maximum(nu, (total * torch.finfo(work).eps) ** 0.5 * s[:, 0])
    ok = finite & torch.isfinite(nu) & (s[:, top - 1] > _CERTIFY * nu)
    # V_r = Q_r V'_r through the reflectors: O(k R t), never the (k, R) matrix Q_r.
    padded = right.new_zeros(right.shape[0], right.shape[1], top)
    padded[:, :total] = vh_core[:, :top].mT.to(right.dtype)
    v = torch.ormqr(refl_r, tau_r, padded)
    # M V_r = left diag(c) R_r^T V'_r (right^T Q_r = R_r^T): one thin GEMM in the QR
    # precision (its rounding is within nu); the float64 SVD of M V_r gives U and rotates V
    # so that (U, S, V) are the singular triplets of B A = M V_r V_r^T itself.
    z = r_rc.mT @ vh_core[:, :top].mT
    mv = (left @ z.to(left.dtype)).to(work)
    u, s_top, w_h = torch.linalg.svd(mv, full_matrices=False)
    v = v.to(work) @ w_h.mT
    s = torch.cat([s_top, s[:, top:]], dim=-1)
    return (u, s, v), ok


def fra_batched(
    As: Sequence[Sequence[Tensor]],
    Bs: Sequence[Sequence[Tensor]],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
    a_row_norm: float | None = None,
    generator: torch.Generator | None = None,
    qr_dtype: torch.dtype | None = None,
) -> list[tuple[Tensor, Tensor, float]]:
    """FRA-LoRA factors and truncation errors of many layers, batched by shape.

    For each layer ``l`` (``As[l][k]`` of shape ``(r_k, in_l)``, ``Bs[l][k]`` of shape
    ``(out_l, r_k)``, the same client weights for every layer):

        M_l = sum_k w_k B_k A_k = U diag(s) V^T,   B_l A_l = U_r diag(s_r) V_r^T,
        err_l = sum_{i > r} s_i^2 / sum_i s_i^2

    (Trautmann, Hales, Volk, arXiv:2501.06332). The result is, layer by layer,
    ``fra_with_error(As[l], Bs[l], weights, rank=rank, a_row_norm=a_row_norm,
    generator=generator)`` called in the order of the layers (same split, same padded
    rows from the same ``generator`` draws), to the precision stated in the module
    docstring: float32 rounding for float32 factors, not bit for bit.

    ``qr_dtype`` sets the precision of the big QRs: None (default) is float32 for float32
    and 16-bit factors and float64 for float64 ones; ``torch.float64`` gives the per-layer
    route's accuracy (batched, about twice the QR time).

    Returns:
        One ``(A, B, err)`` per layer, in the input order, in the input dtype and device.

    Raises:
        ValueError: ``len(As) != len(Bs)``, ``rank < 1``, ``a_row_norm <= 0``, a
            ``qr_dtype`` other than float32/float64, or a layer's
            factors or the weights are invalid (the message of ``check_factors``).
    """
    rank = _check_rank(rank)
    _check_row_norm(a_row_norm)
    if qr_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"qr_dtype must be None, torch.float32 or torch.float64, got {qr_dtype}")
    if len(As) != len(Bs):
        raise ValueError(f"got A factors for {len(As)} layers but B factors for {len(Bs)}")
    triplets: list[_Triplets | None] = [None] * len(As)
    groups: dict[_Key, list[int]] = {}
    for layer, (a_l, b_l) in enumerate(zip(As, Bs, strict=True)):
        key = _group_key(a_l, b_l)
        if key is not None and key[2] < min(key[0], key[1]):
            groups.setdefault(key, []).append(layer)
    for key, layers in groups.items():
        out_features, in_features, total, dtype, _ = key
        work_qr = _qr_dtype(dtype, qr_dtype)
        per_layer = (out_features + in_features) * total * torch.finfo(work_qr).bits // 8
        size = max(1, _CHUNK_BYTES // per_layer)
        for start in range(0, len(layers), size):
            chunk = layers[start : start + size]
            p, q, c = _stack(chunk, As, Bs, weights, key=key, qr_dtype=work_qr)
            # NaN and inf survive a sum (a finite sum that overflows only costs a fallback):
            # such layers are left to check_factors below, which names the client.
            finite = torch.isfinite(p.sum(dim=(1, 2)) + q.sum(dim=(1, 2)))
            if not bool(finite.all()):
                keep = finite.nonzero().flatten().tolist()
                chunk, p, q, c = [chunk[j] for j in keep], p[keep], q[keep], c[keep]
                if not chunk:
                    continue
            if in_features <= out_features:  # reflectors applied on the smaller side
                (u, s, v), ok = _decompose(p, q, c, rank=rank)
            else:
                (v, s, u), ok = _decompose(q, p, c, rank=rank)
            for j, layer in enumerate(chunk):
                if bool(ok[j]):
                    triplets[layer] = (u[j], s[j], v[j].mT)
    results = []
    for layer, found in enumerate(triplets):
        if found is None:  # the per-layer float64 route, with its checks and messages
            f = check_factors(As[layer], Bs[layer], weights)
            u_l, s_l, vh_l = svd_of_product(f.b_cat, f.w, f.a_cat, top=rank)
        else:
            u_l, s_l, vh_l = found
            u_l, vh_l = _fix_signs(u_l, vh_l)
        a, b = assemble_factors(
            u_l,
            s_l,
            vh_l,
            rank=rank,
            a_row_norm=a_row_norm,
            generator=generator,
            dtype=As[layer][0].dtype,
        )
        results.append((a, b, _discarded_share(s_l, rank)))
    return results
