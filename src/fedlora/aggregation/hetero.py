"""Aggregation across clients of different LoRA ranks: FlexLoRA and HetLoRA.

Client ``k`` holds ``A_k`` of shape ``(r_k, in)`` and ``B_k`` of shape ``(out, r_k)``; the
ranks ``r_k`` differ. The server keeps one pair of factors at a rank ``R >= max_k r_k`` and
sends client ``k`` its leading ``r_k`` ranks (:func:`truncate`). The two methods differ in
what the server's factors are:

- FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
  Tasks and Client Resources", NeurIPS 2024, arXiv:2402.11505): the truncated SVD of the
  weighted mean of the full increments, ``M = sum_k w_k B_k A_k`` (:func:`flexlora`). Its
  leading ``r_k`` ranks are the best rank-``r_k`` approximation of ``M``, so one
  decomposition per layer serves every client.
- HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
  Models", EMNLP 2024, arXiv:2401.06432): the weighted mean of the factors zero-padded to
  ``R`` (:func:`hetlora`), with sparsity weights ``p_k`` proportional to ``||B_k A_k||_F``
  (:func:`sparsity_weights`), and clients that prune their own rank (:func:`tail_norm`,
  :func:`pruned_rank`).

Functions over one layer's factors, no modules; float64 arithmetic where the device has it,
results in the input dtype on the input device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.aggregation.factors import check_factors, normalise_weights, work_dtype
from fedlora.aggregation.fra import fra_with_error
from fedlora.aggregation.lowrank import frobenius_norm_of_product

__all__ = [
    "flexlora",
    "hetlora",
    "lora_norm",
    "pruned_rank",
    "sparsity_weights",
    "tail_norm",
    "truncate",
    "zero_pad",
]


def _rank(rank: int, *, name: str = "rank") -> int:
    try:
        value = operator.index(rank)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {rank!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_pair(A: Tensor, B: Tensor) -> int:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"A (r, in) and B (out, r) must share r, got shapes {tuple(A.shape)}, {tuple(B.shape)}"
        )
    return A.shape[0]


def truncate(A: Tensor, B: Tensor, *, rank: int) -> tuple[Tensor, Tensor]:
    """The leading ``rank`` ranks of a LoRA pair: ``(A[:rank], B[:, :rank])``.

    HetLoRA's distribution to a client of rank ``r_k`` (Cho et al., arXiv:2401.06432, Fig. 2c),
    and FlexLoRA's: for factors in SVD order (:func:`flexlora`), ``B[:, :r] A[:r]`` is the best
    rank-``r`` approximation of ``B A`` (Eckart-Young), which is what FlexLoRA sends a client
    of rank ``r`` (Bai et al., arXiv:2402.11505).

    Raises:
        ValueError: ``rank`` < 1 or larger than the pair's rank, or mismatched factors.
    """
    rank = _rank(rank)
    have = _check_pair(A, B)
    if rank > have:
        raise ValueError(f"cannot truncate a rank-{have} pair to rank {rank}")
    return A[:rank], B[:, :rank]


def zero_pad(A: Tensor, B: Tensor, *, rank: int) -> tuple[Tensor, Tensor]:
    """``A`` with zero rows and ``B`` with zero columns up to ``rank``; ``B A`` unchanged.

    HetLoRA's padding of a client's modules to the server's rank before aggregation
    (Cho et al., arXiv:2401.06432, Fig. 2a).

    Raises:
        ValueError: ``rank`` smaller than the pair's rank, or mismatched factors.
    """
    rank = _rank(rank)
    have = _check_pair(A, B)
    if rank < have:
        raise ValueError(f"cannot zero-pad a rank-{have} pair to rank {rank}")
    a = A.new_zeros(rank, A.shape[1])
    b = B.new_zeros(B.shape[0], rank)
    a[:have] = A
    b[:, :have] = B
    return a, b


def flexlora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """FlexLoRA's server factors: the truncated SVD of the mean full-size increment.

        M = sum_k w_k B_k A_k = U diag(sigma) V^T,
        A = V_R^T,   B = U_R diag(sigma_R)        (R = rank),

    so that ``truncate(A, B, rank=r)`` gives ``B_r A_r = U_r diag(sigma_r) V_r^T``, the best
    rank-``r`` approximation of ``M``, for every ``r <= R``: FlexLoRA's redistribution
    (Bai et al., arXiv:2402.11505: the server averages ``W_k = B_k A_k`` with
    ``w_k = n_k / n`` and sends each client the SVD truncated at its own rank). The singular
    values go into ``B`` and ``A`` keeps orthonormal rows, as in the authors' code
    (FederatedScope, branch FlexLoRA, ``fed_utils/adaptive_peft.py``). ``M`` is never formed
    when ``sum_k r_k < min(out, in)``: the SVD comes from the stacked factors
    (:func:`fedlora.aggregation.fra_with_error`).

    If ``rank`` exceeds the rank ``k`` of ``M``, ``B``'s last ``rank - k`` columns are zero
    and, with a ``generator``, ``A``'s last rows are fresh random directions as PEFT draws
    ``lora_A`` (training can then use them; ``B A`` is the same).

    Raises:
        ValueError: ``rank < 1``, invalid factors or weights (see ``check_factors``).
    """
    a, b, _ = fra_with_error(As, Bs, weights, rank=rank, a_row_norm=1.0, generator=generator)
    return a, b


def hetlora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    rank: int,
) -> tuple[Tensor, Tensor]:
    """HetLoRA's aggregation: the weighted mean of the factors zero-padded to ``rank``.

        A = sum_k p_k pad(A_k),   B = sum_k p_k pad(B_k)

    (Cho et al., arXiv:2401.06432, Fig. 2a-b; ``p_k`` normalised here, the paper's
    sparsity weights are :func:`sparsity_weights`). Rank ``j`` of the result is the mean of
    the clients that have it, each other client counting as zero. Like FedAvg of factors it
    is not ``sum_k p_k B_k A_k`` (cross terms).

    Raises:
        ValueError: a client rank above ``rank``, invalid factors or weights.
    """
    rank = _rank(rank)
    f = check_factors(As, Bs, weights)
    if max(f.ranks) > rank:
        raise ValueError(f"client ranks {f.ranks} exceed the padded rank {rank}")
    work = f.a_cat.dtype
    a = torch.zeros(rank, f.in_features, dtype=work, device=f.device)
    b = torch.zeros(f.out_features, rank, dtype=work, device=f.device)
    for p, A, B in zip(f.weights, As, Bs, strict=True):
        r = A.shape[0]
        a[:r] += p * A.to(work)
        b[:, :r] += p * B.to(work)
    return a.to(f.dtype), b.to(f.dtype)


def lora_norm(A: Tensor, B: Tensor) -> float:
    """``||B A||_F`` from the factors (QR of the thin factors; no ``out x in`` matrix)."""
    _check_pair(A, B)
    work = work_dtype(A.device)
    ones = torch.ones(A.shape[0], dtype=work, device=A.device)
    return float(frobenius_norm_of_product(B.to(work), ones, A.to(work)))


def sparsity_weights(
    norms: Sequence[float], weights: Sequence[float] | Tensor | None = None
) -> tuple[float, ...]:
    """HetLoRA's sparsity-weighted aggregation weights.

        p_k = w_k ||Delta W_k||_F / sum_j w_j ||Delta W_j||_F

    with ``norms[k] = ||Delta W_k||_F``, ``Delta W_k = B_k A_k`` the client's reconstructed
    increment (Cho et al., arXiv:2401.06432, Fig. 2b: weights ``||S_k|| / Z``). The paper's
    rule is ``w_k = 1`` (the default); other ``weights`` (e.g. ``n_k``) multiply it. A
    client whose increment is larger, i.e. whose LoRA is less sparse, weighs more. When every
    weighted norm is zero (nothing to tell the clients apart) the result is ``w`` normalised.

    Raises:
        ValueError: a negative or non-finite norm, or bad weights (``normalise_weights``).
    """
    w = normalise_weights(weights, len(norms))
    values = [float(x) for x in norms]
    if not all(math.isfinite(x) and x >= 0 for x in values):
        raise ValueError(f"norms must be finite and >= 0, got {values}")
    scaled = [w_k * x for w_k, x in zip(w, values, strict=True)]
    total = math.fsum(scaled)
    if total == 0.0:
        return w
    return tuple(x / total for x in scaled)


def _tail_start(rank: int, gamma: float) -> int:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    # the epsilon keeps products such as 0.29 * 100 = 28.999... at the rank they denote
    return math.floor(gamma * rank + 1e-9)


def pruned_rank(rank: int, *, gamma: float) -> int:
    """HetLoRA's rank after one self-pruning step: ``max(1, floor(gamma r))``.

    The decay factor ``gamma`` in (0, 1] both marks the tail that is regularised and pruned
    (ranks ``floor(gamma r) .. r - 1``) and sets how far a prune goes (Cho et al.,
    arXiv:2401.06432, rank self-pruning). ``gamma = 1``: nothing is ever pruned.
    Rank 1 is kept: a client with no LoRA would send nothing.
    """
    rank = _rank(rank)
    return max(1, _tail_start(rank, gamma))


def tail_norm(A: Tensor, B: Tensor, *, gamma: float) -> Tensor:
    """``||B_tail||_F ||A_tail||_F`` over the ranks HetLoRA would prune.

        t = floor(gamma r),   tail_norm = ||B[:, t:]||_F ||A[t:]||_F

    HetLoRA's rank self-pruning (Cho et al., arXiv:2401.06432): clients add
    ``lambda * tail_norm`` to their local loss, and prune to ``floor(gamma r)`` when the tail
    norm after local training is smaller than that of the modules the server sent. The paper's
    exact norm was read through secondary sources (the primary text was not retrievable here):
    the product of the two factors' Frobenius norms, an upper bound of ``||B_tail A_tail||_F``,
    as two independent reimplementations take it. A 0-dim tensor, differentiable (the
    regulariser); 0 when the tail is empty (``gamma = 1``).

    Raises:
        ValueError: ``gamma`` outside (0, 1], or mismatched factors.
    """
    r = _check_pair(A, B)
    t = _tail_start(r, gamma)
    return torch.linalg.matrix_norm(B[:, t:]) * torch.linalg.matrix_norm(A[t:])
