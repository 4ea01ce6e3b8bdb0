"""Validation and stacking of the clients' LoRA factors of one layer.

Every aggregator in this package takes, for one layer and ``K`` clients, the factors
``As[k]`` of shape ``(r_k, in)`` and ``Bs[k]`` of shape ``(out, r_k)`` (PEFT's ``lora_A``
and ``lora_B`` weights) and optional client weights, and aggregates the update

    M = sum_k w_k B_k A_k,    w_k = weights[k] / sum_j weights[j].

This module holds the checks and the stacked form ``M = Bcat diag(w) Acat`` that they share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerFactors", "check_factors", "normalise_weights", "work_dtype"]


@dataclass(frozen=True)
class LayerFactors:
    """Validated factors of one layer, stacked and upcast to the working precision.

    ``M = b_cat @ diag(w) @ a_cat`` with ``b_cat = [B_1 .. B_K]`` of shape ``(out, R)``,
    ``a_cat = [A_1; ..; A_K]`` of shape ``(R, in)``, ``R = sum_k r_k`` and ``w`` the
    normalised client weights repeated over each client's ``r_k`` columns (shape ``(R,)``).
    """

    a_cat: Tensor
    b_cat: Tensor
    w: Tensor
    weights: tuple[float, ...]
    ranks: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def out_features(self) -> int:
        return self.b_cat.shape[0]

    @property
    def in_features(self) -> int:
        return self.a_cat.shape[1]

    @property
    def total_rank(self) -> int:
        return self.a_cat.shape[0]


def work_dtype(device: torch.device) -> torch.dtype:
    """Precision of the internal arithmetic: float64, except where the device has none.

    float64 keeps the cancellation in ``M - B A`` (FedEx residual, FedAvg error) and the
    sign choice of singular vectors far below float32 rounding; the factored route only
    touches ``(out, R)`` and ``(R, R)`` matrices, so the cost is small. MPS has no float64.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def normalise_weights(
    weights: Sequence[float] | Tensor | None, n_clients: int
) -> tuple[float, ...]:
    """Return ``w_k = weights[k] / sum_j weights[j]`` (uniform ``1/K`` when ``weights`` is None).

    Raises:
        ValueError: wrong length, a negative or non-finite weight, or all weights zero.
    """
    if n_clients < 1:
        raise ValueError("no clients to aggregate: As and Bs are empty")
    if weights is None:
        return (1.0 / n_clients,) * n_clients
    if isinstance(weights, Tensor):
        weights = weights.detach().reshape(-1).tolist()
    values = [float(x) for x in weights]
    if len(values) != n_clients:
        raise ValueError(f"got {len(values)} weights for {n_clients} clients")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"weights must be finite, got {values}")
    if any(x < 0 for x in values):
        raise ValueError(f"weights must be non-negative, got {values}")
    total = math.fsum(values)
    if total <= 0:
        raise ValueError("weights are all zero: at least one client must have a positive weight")
    return tuple(x / total for x in values)


def check_factors(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
) -> LayerFactors:
    """Validate one layer's client factors and stack them as ``Bcat diag(w) Acat``.

    Raises:
        ValueError: no clients, ``len(As) != len(Bs)``, a factor that is not a 2-D floating
            tensor, a client whose ``A`` rank differs from its ``B`` rank (or is 0), ``in``/``out``
            dimensions or dtype/device that differ across clients, non-finite values, or bad
            weights.
    """
    if len(As) != len(Bs):
        raise ValueError(f"got {len(As)} A factors but {len(Bs)} B factors")
    if len(As) == 0:
        raise ValueError("no clients to aggregate: As and Bs are empty")
    first = As[0]
    if not isinstance(first, Tensor):
        raise ValueError(f"factors must be torch tensors, got {type(first).__name__}")
    ranks = []
    for k, (a, b) in enumerate(zip(As, Bs, strict=True)):
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise ValueError(f"client {k}: factors must be torch tensors")
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"client {k}: A and B must be 2-D, got shapes {tuple(a.shape)}, {tuple(b.shape)}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(
                f"client {k}: factors must be floating point, got {a.dtype}, {b.dtype}"
            )
        if a.dtype != first.dtype or b.dtype != first.dtype:
            raise ValueError(f"client {k}: dtype {a.dtype}/{b.dtype} differs from {first.dtype}")
        if a.device != first.device or b.device != first.device:
            raise ValueError(
                f"client {k}: device {a.device}/{b.device} differs from {first.device}"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"client {k}: rank of A ({a.shape[0]}, from shape {tuple(a.shape)}) differs from "
                f"rank of B ({b.shape[1]}, from shape {tuple(b.shape)})"
            )
        if a.shape[0] < 1:
            raise ValueError(f"client {k}: LoRA rank must be >= 1, got A of shape {tuple(a.shape)}")
        if a.shape[1] != first.shape[1]:
            raise ValueError(
                f"client {k}: in_features {a.shape[1]} differs from client 0's {first.shape[1]}"
            )
        if b.shape[0] != Bs[0].shape[0]:
            raise ValueError(
                f"client {k}: out_features {b.shape[0]} differs from client 0's {Bs[0].shape[0]}"
            )
        # A NaN from one client would otherwise surface as an SVD convergence failure, or
        # silently poison the average, far from its cause.
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"client {k}: factors contain NaN or infinite values")
        ranks.append(a.shape[0])
    w_k = normalise_weights(weights, len(As))
    device = first.device
    dtype = work_dtype(device)
    w = torch.repeat_interleave(
        torch.tensor(w_k, dtype=dtype, device=device),
        torch.tensor(ranks, device=device),
    )
    return LayerFactors(
        a_cat=torch.cat([a.to(dtype) for a in As], dim=0),
        b_cat=torch.cat([b.to(dtype) for b in Bs], dim=1),
        w=w,
        weights=w_k,
        ranks=tuple(ranks),
        dtype=first.dtype,
        device=device,
    )
