"""SLoRA's server math: the seeded random mask, FedAvg over it, and the SVD initialisation.

Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
arXiv 2308.06522. Stage 1 fine-tunes a fixed random subset ``Omega`` of the entries of a
frozen weight ``W0`` of shape ``(out, in)``, the same subset on every client:
``|Omega| = max(1, round(d * out * in))`` entries for a density ``d`` in ``(0, 1]``, drawn
from a seed that the server and the clients share (:func:`sparse_mask`), so only the
values at the mask travel. Client ``k`` sends the values ``v_k`` (shape ``(|Omega|,)``) of
its increment ``P_Omega(v_k)``; the server's update of round ``t`` is FedAvg over the mask,

    v_t = sum_k w_k v_k,      Delta_t = P_Omega(v_t)     (zero off the mask),

(:func:`sparse_fedavg`, :func:`scatter_dense`), and after ``T1`` rounds the accumulated
sparse update is ``Delta W = sum_t Delta_t``. Stage 2 starts LoRA from its truncated SVD
(:func:`svd_init`): with ``Delta W = U diag(sigma) V^T`` and the LoRA scaling ``s``,

    s B A = U_r diag(sigma_r) V_r^T       (the best rank-r approximation, Eckart-Young).

Pure functions over one layer; float64 inside (:func:`~fedlora.aggregation.factors.work_dtype`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import work_dtype
from fedlora.aggregation.lora_math import weighted_mean

__all__ = [
    "layer_seed",
    "mask_size",
    "scatter_dense",
    "sparse_fedavg",
    "sparse_mask",
    "svd_init",
    "svd_init_with_error",
]


def layer_seed(seed: int, layer: str) -> int:
    """The mask seed of one layer: the run's ``seed`` mixed with a stable hash of the
    layer's name (CRC-32, not Python's salted ``hash``), so it does not depend on the order
    in which a process lists its layers."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer.encode("utf-8"))) % (2**63 - 1)


def mask_size(numel: int, density: float) -> int:
    """``max(1, round(density * numel))`` (half up): how many entries a mask holds."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if numel < 1:
        raise ValueError(f"a mask needs at least one entry to choose from, got {numel}")
    return max(1, min(numel, int(math.floor(density * numel + 0.5))))


def sparse_mask(*, shape: tuple[int, int], density: float, seed: int) -> Tensor:
    """The flat indices (row-major over ``shape = (out, in)``, sorted, int64, on the CPU)
    of a data-independent random mask of :func:`mask_size` entries: the first entries of a
    random permutation drawn by ``torch.Generator().manual_seed(seed)``. The same
    ``(shape, density, seed)`` gives the same mask in every process (SLoRA's random mask,
    shared by all clients).
    """
    out_features, in_features = shape
    numel = int(out_features) * int(in_features)
    k = mask_size(numel, density)
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(numel, generator=generator)[:k]
    return torch.sort(chosen).values


def sparse_fedavg(values: Sequence[Tensor], weights: Sequence[float] | Tensor | None) -> Tensor:
    """FedAvg of the clients' values on a shared mask: ``v = sum_k w_k v_k``.

    Every client's increment is zero off the mask, so the mean of the dense increments is
    ``P_Omega(v)``: averaging the value vectors is exact, with no dense matrix.

    Raises:
        ValueError: no clients, value vectors of different lengths (different masks), or
            bad weights (see :func:`~fedlora.aggregation.weighted_mean`).
    """
    if any(v.dim() != 1 for v in values):
        raise ValueError("sparse values must be 1-D (one value per masked entry)")
    return weighted_mean(values, weights)


def scatter_dense(values: Tensor, *, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """``P_Omega(values)``: the dense ``(out, in)`` matrix with ``values`` at the flat
    ``indices`` and zeros elsewhere (dtype and device of ``values``)."""
    if values.shape != indices.shape:
        raise ValueError(
            f"{values.numel()} values for a mask of {indices.numel()} entries (a different mask?)"
        )
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    dense[indices.to(values.device)] = values
    return dense.reshape(shape)


def svd_init_with_error(
    delta: Tensor, *, rank: int, scaling: float, a_row_norm: float
) -> tuple[Tensor, Tensor, float]:
    """LoRA factors ``(A, B)`` with ``s B A`` the best rank-``rank`` approximation of
    ``delta`` (shape ``(out, in)``), and the share of ``||delta||_F^2`` it discards.

    With ``delta = U diag(sigma) V^T`` (``torch.linalg.svd`` of the dense matrix, float64):

        A = c V_r^T,     B = U_r diag(sigma_r) / (c s),     so   s B A = U_r diag(sigma_r) V_r^T,
        err = sum_{i > r} sigma_i^2 / sum_i sigma_i^2        (0.0 when delta = 0),

    ``c = a_row_norm``: the rows of ``A`` are orthogonal with norm ``c``, the singular values
    go into ``B``. With ``c`` the row norm of PEFT's initial ``lora_A``
    (:func:`~fedlora.aggregation.fra.init_row_norm`) LoRA then trains as from its usual start
    (``A`` at its initial scale, ``B`` small); a direction in which ``delta`` has no energy
    gets ``B``'s column zero and a non-zero row of ``A`` (PEFT's own ``B = 0`` start), never
    the stationary point ``(0, 0)`` that an even ``sqrt(sigma)`` split would give it.

    Singular values below ``sigma_1 max(out, in) eps`` count as zero. Each pair
    ``(u_i, v_i)`` is signed so that ``v_i``'s largest-magnitude entry is positive
    (identical inputs, identical factors). A ``rank`` above ``min(out, in)`` pads ``A`` and
    ``B`` with zeros. Cost: one dense SVD, ``O(out in min(out, in))``.

    Returns:
        ``(A, B, err)``, ``A`` of shape ``(rank, in)`` and ``B`` of shape ``(out, rank)``,
        in ``delta``'s dtype and device.

    Raises:
        ValueError: ``rank < 1``, ``scaling <= 0``, ``a_row_norm <= 0``, a non-finite
            ``delta``, or ``delta`` not 2-D.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not scaling > 0 or not a_row_norm > 0:
        raise ValueError(f"scaling and a_row_norm must be > 0, got {scaling}, {a_row_norm}")
    if delta.dim() != 2:
        raise ValueError(f"delta must be a matrix (out, in), got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta contains NaN or infinite values")
    out_features, in_features = delta.shape
    work = delta.to(work_dtype(delta.device))
    u, sigma, vh = torch.linalg.svd(work, full_matrices=False)
    if sigma.numel() and float(sigma[0]) > 0:
        noise = float(sigma[0]) * max(out_features, in_features) * torch.finfo(work.dtype).eps
        sigma = torch.where(sigma > noise, sigma, torch.zeros_like(sigma))
    # sign of each pair from its row of V^T, defined even where sigma_i = 0
    pivot = vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vh.gather(1, pivot)).squeeze(1)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u, vh = u * signs, vh * signs[:, None]
    kept = min(rank, sigma.numel())
    a = torch.zeros(rank, in_features, dtype=work.dtype, device=work.device)
    b = torch.zeros(out_features, rank, dtype=work.dtype, device=work.device)
    a[:kept] = a_row_norm * vh[:kept]
    b[:, :kept] = u[:, :kept] * (sigma[:kept] / (a_row_norm * scaling))
    energy = sigma.square()
    total = float(energy.sum())
    discarded = float(energy[kept:].sum()) / total if total > 0 else 0.0
    return a.to(delta.dtype), b.to(delta.dtype), discarded


def svd_init(
    delta: Tensor, *, rank: int, scaling: float, a_row_norm: float
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of :func:`svd_init_with_error`, without the discarded share."""
    a, b, _ = svd_init_with_error(delta, rank=rank, scaling=scaling, a_row_norm=a_row_norm)
    return a, b
