"""Pure aggregation math for federated LoRA (one layer at a time, no nn.Module, no I/O).

For ``K`` clients with ``A_k`` of shape ``(r_k, in)``, ``B_k`` of shape ``(out, r_k)`` and
normalised weights ``w_k``, the clients' average update is ``M = sum_k w_k B_k A_k``.

- :func:`fedavg`: weighted means of ``A`` and of ``B`` (FedIT / FedAvg-LoRA).
- :func:`fedex`: the same means plus the dense residual ``M - B A`` (FedEx-LoRA).
- :func:`stack`: rank-``sum_k r_k`` factors with ``B A = M`` exactly (FLoRA).
- :func:`fra`, :func:`fra_with_error`: best rank-``r`` approximation of ``M`` (FRA-LoRA).
- :func:`lora_fair`: the means, with ``B`` corrected so that ``B A`` aligns with ``M``
  (LoRA-FAIR).
- :func:`flexlora`, :func:`hetlora`, :func:`truncate`, :func:`zero_pad`,
  :func:`sparsity_weights`, :func:`tail_norm`, :func:`pruned_rank`, :func:`lora_norm`:
  clients of different ranks (FlexLoRA's SVD redistribution; HetLoRA's zero-padding,
  sparsity weights and rank self-pruning).
- :func:`fedsa`, :func:`personal_increment`: the mean of the shared ``A`` only, each
  client's ``B_k`` kept by the client (FedSA-LoRA).
- :func:`weighted_mean`: the plain weighted mean of one tensor per client (a factor
  trained against a shared frozen partner, the head).
- :func:`relative_update_error`: ``||M - X||_F / ||M||_F`` of what the model holds after
  aggregation, the error every method reports (``agg_error``).
- :func:`client_drift`: how far the clients' increments spread around their mean
  (``client_drift`` in the metrics).
- :func:`fedavg_error` (FedAvg's case of it), :func:`fra_truncation_error` (the share of
  ``||M||_F^2`` FRA-LoRA discards; ``fra_discarded_energy`` in the metrics).
"""

from fedlora.aggregation.error import client_drift, relative_update_error
from fedlora.aggregation.factors import LayerFactors, check_factors, normalise_weights
from fedlora.aggregation.fair import FairCorrection, lora_fair
from fedlora.aggregation.fra import fra, fra_truncation_error, fra_with_error
from fedlora.aggregation.hetero import (
    flexlora,
    hetlora,
    lora_norm,
    pruned_rank,
    sparsity_weights,
    tail_norm,
    truncate,
    zero_pad,
)
from fedlora.aggregation.lora_math import fedavg, fedavg_error, fedex, stack, weighted_mean
from fedlora.aggregation.selective import fedsa, personal_increment

__all__ = [
    "FairCorrection",
    "LayerFactors",
    "check_factors",
    "client_drift",
    "fedavg",
    "fedavg_error",
    "fedex",
    "fedsa",
    "flexlora",
    "fra",
    "fra_truncation_error",
    "fra_with_error",
    "hetlora",
    "lora_fair",
    "lora_norm",
    "normalise_weights",
    "personal_increment",
    "pruned_rank",
    "relative_update_error",
    "sparsity_weights",
    "stack",
    "tail_norm",
    "truncate",
    "weighted_mean",
    "zero_pad",
]
