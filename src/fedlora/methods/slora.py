"""SLoRA: sparse fine-tuning first, then LoRA started from the SVD of what it learned.

Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
arXiv 2308.06522. Two stages:

1. Rounds ``1..T1`` (``slora_rounds``): clients fine-tune a fixed, data-independent random
   mask ``Omega`` of each frozen weight ``W0`` (density ``d = slora_density``; the same mask
   on every client and in every round, drawn from the run's seed), with LoRA off
   (:mod:`fedlora.client.sparse`). The server averages the masked values by FedAvg,
   ``v_t = sum_k w_k v_k``, and every client folds ``Delta_t = P_Omega(v_t)`` into ``W0``
   (:attr:`~fedlora.methods.base.Aggregate.base_delta`).
2. At the end of round ``T1`` the accumulated sparse update ``Delta W = sum_t Delta_t`` is
   replaced by LoRA factors with ``s B A`` its best rank-``r`` approximation
   (:func:`fedlora.aggregation.sparse.svd_init`): the frozen weights go back to ``W0`` and
   the model holds ``W0 + s B A``. Rounds ``T1 + 1..`` are federated LoRA, FedAvg of ``A``
   and of ``B`` (:class:`~fedlora.methods.fedavg.FedAvgLoRA`).

Bytes: in stage 1 a client uploads the values at the mask only (``|Omega|`` float32 per
layer, plus the head): the mask is seeded and both sides draw it, so no index travels; the
next round's download adds the averaged values (``delta_bytes``). The switch costs nothing
extra on the wire: the new factors are the adapter every client is sent anyway, and
undoing ``Delta W`` needs only what each client already received. What the runtime counts
beyond that: the adapter is sent every round, so stage 1's downloads also carry the
untouched initial factors.

Cost: stage 1 forms one dense ``(out, in)`` increment per layer per round (to fold it, as
FedEx-LoRA's residual); the switch forms ``Delta W`` densely once and takes one
``torch.linalg.svd`` per layer (float64, ``O(out in min(out, in))``). On a client, stage 1
keeps one dense gradient per target layer during backward.

What this implementation chose where the paper (only its abstract could be read here)
does not settle it, or where fedlora differs:

- Stage 1 trains the frozen weights of the LoRA target layers (``target_modules``, e.g.
  query and value) and the classifier head (dense, FedAvg, as every method here trains
  it), not every weight of the model: only the target layers get an SVD initialisation,
  so a sparse update anywhere else would have no LoRA factor to carry it into stage 2.
- The singular values go into ``B`` and the rows of ``A`` are orthonormal at the norm of
  PEFT's initial ``lora_A`` (``A = c V_r^T``, ``B = U_r diag(sigma_r) / (c s)``), so that
  stage 2 trains from LoRA's usual scales; ``B A`` does not depend on the split.
- The switch replaces ``Delta W`` by its rank-``r`` approximation (``W0 + s B A``), the
  paper's ``Delta W ~ B A``, rather than keeping ``Delta W`` in the base weight beside it.
  What the truncation discards is reported as ``slora_discarded_energy`` (the share of
  ``||Delta W||_F^2``) in that round's row.
- One learning rate (``lr``) serves both stages.
- The aggregation error ``agg_error`` is defined on factor proposals and is not reported
  in stage 1 rounds (:func:`~fedlora.methods.base.update_error`); their fold is the exact
  masked mean (tested).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.aggregation.fra import init_row_norm
from fedlora.aggregation.sparse import (
    layer_seed,
    scatter_dense,
    sparse_fedavg,
    sparse_mask,
    svd_init_with_error,
)
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan, tensor_bytes
from fedlora.methods.base import Aggregate, LoRAMethod, aggregate_head
from fedlora.methods.fedavg import FedAvgLoRA

if TYPE_CHECKING:
    from fedlora.config import Config


class SLoRA(LoRAMethod):
    name = "slora"
    carries_magnitude = False
    magnitude_refusal = "its first stage trains the frozen weights themselves"
    folds_base = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.slora_rounds >= cfg.rounds:
            raise FedLoraError(
                f"config key 'slora_rounds' ({cfg.slora_rounds}) must be less than rounds "
                f"({cfg.rounds}): SLoRA's LoRA stage needs at least one round"
            )
        if cfg.dp.enabled:
            raise FedLoraError(
                "method slora is not supported with dp.* (DP-SGD trains LoRA factors; SLoRA's "
                "first stage trains the frozen weights)"
            )

    def __init__(
        self, *, slora_rounds: int, density: float, seed: int, train_head: bool = True
    ) -> None:
        super().__init__(train_head=train_head)
        self.slora_rounds = slora_rounds
        self.density = density
        self.seed = seed
        self.lora = FedAvgLoRA(train_head=train_head)
        # sum of the stage-1 means per layer (values at the mask); emptied at the switch
        self.accumulated: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}

    def plan(self, round: int) -> RoundPlan:
        if round <= self.slora_rounds:
            return RoundPlan(
                round=round,
                trained="W",
                train_head=self.train_head,
                method=self.name,
                mask_density=self.density,
                mask_seed=self.seed,
            )
        return RoundPlan(round=round, trained="AB", train_head=self.train_head, method=self.name)

    def mask(self, layer: str, shape: tuple[int, int]) -> torch.Tensor:
        """The flat indices of ``layer``'s mask, as every client draws them."""
        if layer not in self._masks:
            self._masks[layer] = sparse_mask(
                shape=shape, density=self.density, seed=layer_seed(self.seed, layer)
            )
        return self._masks[layer]

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        if plan.trained != "W":
            return self.lora.aggregate(
                plan=plan, state=state, updates=updates, weights=weights, scaling=scaling
            )
        head = aggregate_head(state, updates, weights)
        means = self._masked_means(state, updates, weights)
        if plan.round < self.slora_rounds:
            delta = {}
            for layer, v in means.items():
                total = self.accumulated.get(layer)
                self.accumulated[layer] = v.clone() if total is None else total.to(v) + v
                delta[layer] = self._dense(layer, state, v)
            return Aggregate(
                state=dataclasses.replace(state, head=head),
                base_delta=delta,
                delta_bytes=tensor_bytes(means.values()),  # values only: the mask is seeded
            )
        return self._switch(state=state, head=head, means=means, scaling=scaling)

    def _masked_means(
        self, state: AdapterState, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        means: dict[str, torch.Tensor] = {}
        for layer in state.A:
            sent = [u.sparse[layer] for u in updates if layer in u.sparse]
            if not sent:
                continue  # no client changed this layer
            if len(sent) != len(updates):
                raise ValueError(
                    f"layer {layer}: {len(sent)} of {len(updates)} clients sent sparse values"
                )
            means[layer] = sparse_fedavg(sent, weights)
        return means

    def _shape(self, layer: str, state: AdapterState) -> tuple[int, int]:
        return (state.B[layer].shape[0], state.A[layer].shape[1])

    def _dense(self, layer: str, state: AdapterState, values: torch.Tensor) -> torch.Tensor:
        shape = self._shape(layer, state)
        return scatter_dense(values, indices=self.mask(layer, shape), shape=shape)

    def _switch(
        self,
        *,
        state: AdapterState,
        head: dict[str, torch.Tensor],
        means: Mapping[str, torch.Tensor],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        """The last stage-1 round: ``s B A`` becomes the best rank-``r`` approximation of
        everything stage 1 learned (``Delta W``, plus the adapter's own ``s B A``, which is
        zero from PEFT's init), and the folds of the earlier rounds are undone."""
        new_A, new_B, undo, discarded = {}, {}, {}, {}
        for layer in state.A:
            before = self.accumulated.get(layer)
            mean = means.get(layer)
            parts = [v for v in (before, mean) if v is not None]
            s = float(scaling[layer])
            A, B = state.A[layer], state.B[layer]
            target = s * (B.to(torch.float64) @ A.to(torch.float64))
            if parts:
                total = parts[0] if len(parts) == 1 else parts[0].to(parts[1]) + parts[1]
                target = target + self._dense(layer, state, total).to(torch.float64)
            a, b, discarded[layer] = svd_init_with_error(
                target, rank=A.shape[0], scaling=s, a_row_norm=init_row_norm()
            )
            new_A[layer], new_B[layer] = a.to(A.dtype), b.to(B.dtype)
            if before is not None:
                undo[layer] = -self._dense(layer, state, before.to(A.device))
        self.accumulated = {}
        return Aggregate(
            state=dataclasses.replace(state, A=new_A, B=new_B, head=head),
            base_delta=undo,
            delta_bytes=0,  # the factors travel as the adapter; the undo is what clients hold
            diagnostics={"slora_discarded_energy": discarded},
        )

    # -- state: the accumulated sparse update, exactly (base64 of its float32 bytes) ------

    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulated": {
                layer: base64.b64encode(
                    v.detach().cpu().to(torch.float32).numpy().tobytes()
                ).decode("ascii")
                for layer, v in self.accumulated.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accumulated = {
            layer: torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())
            for layer, text in state.get("accumulated", {}).items()
        }
