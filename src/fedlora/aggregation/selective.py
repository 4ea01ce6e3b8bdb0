"""Selective aggregation: the server averages the shared factor only (FedSA-LoRA).

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025 (arXiv 2410.01463). Every client ``k`` trains both factors
of each LoRA layer but sends only ``A_k`` (shape ``(r, in)``); the server sets

    A = sum_k w_k A_k,        w_k = n_k / sum_j n_j

and ``B_k`` (shape ``(out, r)``) stays with client ``k``, so after the round client ``k``'s
layer carries the increment ``s B_k A``. No ``B`` is an argument here: it never reaches the
server. The weights are FedAvg's example counts, as in the authors' FederatedScope code
(its client average weighs each client by its training-set size).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedlora.aggregation.lora_math import weighted_mean

__all__ = ["fedsa", "personal_increment"]


def fedsa(As: Sequence[Tensor], weights: Sequence[float] | Tensor | None) -> Tensor:
    """The shared ``A = sum_k w_k A_k`` of one layer (weights normalised to sum to 1).

    Raises:
        ValueError: no clients, shapes that differ, non-finite values or bad weights
            (see :func:`fedlora.aggregation.weighted_mean`).
    """
    return weighted_mean(As, weights)


def personal_increment(A: Tensor, B_k: Tensor, *, scaling: float) -> Tensor:
    """Client ``k``'s increment to the frozen weight after a round, ``s B_k A`` (its own
    ``B_k`` on the shared ``A``), shape ``(out, in)``: what its personalised model adds."""
    return scaling * (B_k @ A)
