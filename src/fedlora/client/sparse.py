"""SLoRA's first stage on a client: sparse fine-tuning of the frozen weights.

Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
arXiv 2308.06522, stage 1. The round's :class:`~fedlora.messages.RoundPlan` (``trained="W"``)
names a density ``d`` and a seed; every client draws the same random mask ``Omega`` over
each LoRA target layer's frozen weight ``W0`` (:func:`fedlora.aggregation.sparse.sparse_mask`)
and trains only those entries, as the masked increment

    W = W0 + P_Omega(v),     v in R^{|Omega|} (zero at the start of the round),

with LoRA out of the way: the factors are frozen at the global adapter, whose ``B`` is
PEFT's zero init in this stage, so ``s B A = 0``. The gradient of ``v`` is the gradient of
``W`` at the mask (``dL/dv = P_Omega^T dL/dW``), read off ``W.grad`` before each optimizer
step; the optimizer holds ``v`` (and the head) only, so its state is ``|Omega|`` entries
per layer and weight decay acts on the increment ``v``, not on ``W0``. The client replies
with ``v`` per layer (:attr:`~fedlora.messages.ClientUpdate.sparse`, float32) and, if the
round trains it, the head; the frozen weights are restored to ``W0`` before it returns
(the server's aggregate is folded into them, like every other increment).

The loop is :func:`fedlora.client.train.train_client`'s (same batches from the same
seeded generator, gradient accumulation, schedule, clipping, autocast, the frozen-prefix
cache), with ``v`` in place of the factors. Cost beyond LoRA training: one dense gradient
per target weight during backward. Not supported here: an optimizer that persists across
rounds (the centralized baseline's) and DP-SGD (``config`` refuses ``dp.*`` with SLoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.aggregation.sparse import layer_seed, sparse_mask
from fedlora.client.train import (
    LocalTraining,
    batch_indices,
    client_seed,
    make_optimizer,
    make_scheduler,
    optimizer_step,
)
from fedlora.data import Encoded
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.adapter import PeftAdapter
from fedlora.models.device import autocast, model_device, to_device
from fedlora.models.prefix import feed


@dataclass
class _MaskedWeight:
    """One layer's frozen weight seen in ``(out, in)`` orientation, its mask and ``v``."""

    weight: torch.Tensor  # the module's parameter (GPT-2's Conv1D holds it as (in, out))
    transposed: bool
    rows: torch.Tensor
    cols: torch.Tensor
    original: torch.Tensor  # W0 at the mask, as held
    values: torch.nn.Parameter  # v, float32

    def oriented(self, t: torch.Tensor) -> torch.Tensor:
        return t.T if self.transposed else t

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        self.oriented(self.weight)[self.rows, self.cols] = (
            self.original.to(torch.float32) + values
        ).to(self.weight.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        self.oriented(self.weight)[self.rows, self.cols] = self.original
        self.weight.grad = None
        self.weight.requires_grad_(False)


def _masked_weights(adapter: PeftAdapter, plan: RoundPlan) -> dict[str, _MaskedWeight]:
    masked: dict[str, _MaskedWeight] = {}
    for layer, module in adapter.lora_layers.items():
        weight = adapter.base_weight(layer)
        # transformers' Conv1D (GPT-2) stores (in, out); the mask is drawn over (out, in)
        transposed = type(module.get_base_layer()).__name__ == "Conv1D"
        out_features, in_features = weight.T.shape if transposed else weight.shape
        flat = sparse_mask(
            shape=(out_features, in_features),
            density=plan.mask_density,
            seed=layer_seed(plan.mask_seed, layer),
        ).to(weight.device)
        rows, cols = flat // in_features, flat % in_features
        view = weight.T if transposed else weight
        masked[layer] = _MaskedWeight(
            weight=weight,
            transposed=transposed,
            rows=rows,
            cols=cols,
            original=view[rows, cols].detach().clone(),
            values=torch.nn.Parameter(
                torch.zeros(flat.numel(), dtype=torch.float32, device=weight.device)
            ),
        )
    return masked


def train_sparse(
    *,
    adapter: PeftAdapter,
    state: AdapterState,
    data: Encoded,
    plan: RoundPlan,
    settings: LocalTraining,
    client_id: int,
    seed: int,
) -> ClientUpdate:
    """Sparse fine-tuning of the target layers' frozen weights at the round's mask (and of
    the head, if the plan trains it); returns the values ``v`` per layer and the head."""
    adapter.set_state(state)
    head_params = adapter.set_trainable(plan.trained, head=plan.train_head)  # factors frozen
    masked = _masked_weights(adapter, plan)
    for m in masked.values():
        m.weight.requires_grad_(True)
    params = [*(m.values for m in masked.values()), *head_params]
    optimizer = make_optimizer(params, settings)
    steps = settings.steps_for(len(data))
    scheduler = make_scheduler(optimizer, settings, steps=steps, round=plan.round)
    accum = settings.grad_accum_steps
    generator = torch.Generator().manual_seed(client_seed(seed, plan.round, client_id))
    torch.manual_seed(client_seed(seed, plan.round, client_id))  # dropout masks
    model = adapter.model
    device = model_device(model)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    model.train()
    losses: list[float] = []
    micro = batch_indices(
        len(data), steps=steps * accum, batch_size=settings.batch_size, generator=generator
    )
    try:
        for i, idx in enumerate(micro):
            # the frozen-prefix cache stays valid: every weight trained here is in a LoRA block
            with autocast(settings.precision, device), feed(model, data, idx):
                loss = model(**to_device(data.batch(idx), device)).loss
            scaled = loss / accum if accum > 1 else loss
            (scaler.scale(scaled) if scaler else scaled).backward()
            losses.append(loss.item())
            if (i + 1) % accum:
                continue
            for m in masked.values():
                # dL/dv = dL/dW at the mask; W's own gradient is not needed past this point
                grad = m.weight.grad
                m.values.grad = (
                    m.oriented(grad)[m.rows, m.cols].to(torch.float32)
                    if grad is not None
                    else torch.zeros_like(m.values)
                )
                m.weight.grad = None
            optimizer_step(
                optimizer, scheduler, scaler, params, max_grad_norm=settings.max_grad_norm
            )
            for m in masked.values():
                m.write(m.values.detach())
        sparse = {layer: m.values.detach().clone() for layer, m in masked.items()}
    finally:
        model.eval()
        for m in masked.values():
            m.restore()
    sent = adapter.get_state(plan.trained, head=plan.train_head)
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        head=sent.head,
        train_loss=sum(losses) / len(losses),
        scaling=adapter.scaling(),
        steps=steps,
        sparse=sparse,
    )
