"""Pure aggregation math for federated LoRA (one layer at a time, no nn.Module, no I/O).

For ``K`` clients with ``A_k`` of shape ``(r_k, in)``, ``B_k`` of shape ``(out, r_k)`` and
normalised weights ``w_k``, the clients' average update is ``M = sum_k w_k B_k A_k``.

- :func:`fedavg`: weighted means of ``A`` and of ``B`` (FedIT / FedAvg-LoRA).
- :func:`fedex`: the same means plus the dense residual ``M - B A`` (FedEx-LoRA).
- :func:`stack`: rank-``sum_k r_k`` factors with ``B A = M`` exactly (FLoRA).
- :func:`fra`, :func:`fra_with_error`: best rank-``r`` approximation of ``M`` (FRA-LoRA).
- :func:`fedavg_error`, :func:`fra_truncation_error`: diagnostics of both approximations.
"""

from fedlora.aggregation.factors import LayerFactors, check_factors, normalise_weights
from fedlora.aggregation.fra import fra, fra_truncation_error, fra_with_error
from fedlora.aggregation.lora_math import fedavg, fedavg_error, fedex, stack

__all__ = [
    "LayerFactors",
    "check_factors",
    "fedavg",
    "fedavg_error",
    "fedex",
    "fra",
    "fra_truncation_error",
    "fra_with_error",
    "normalise_weights",
    "stack",
]
