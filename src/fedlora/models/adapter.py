"""The one place that knows PEFT's parameter names.

PEFT names a factor ``base_model.model.<layer>.lora_A.default.weight`` in
``named_parameters()`` and ``<layer>.lora_A.weight`` in a saved adapter; the sequence
classification head sits in a ``modules_to_save`` wrapper. :class:`PeftAdapter` maps all
of that to :class:`~fedlora.messages.AdapterState` (layer name -> ``A``, ``B``; head
name -> tensor) and back, so methods, runtimes and the Flower app never see PEFT keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from fedlora.messages import AdapterState, Factor

_PREFIX = "base_model.model."
_HEAD_MARK = ".modules_to_save.default."


class PeftAdapter:
    """A PEFT LoRA model seen as a set of named factors that can be swapped in and out."""

    def __init__(self, peft_model: Any) -> None:
        self.model = peft_model
        self.adapter_name = "default"
        self.lora_layers: dict[str, LoraLayer] = {
            name.removeprefix(_PREFIX): module
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)
        }
        self.head_params: dict[str, torch.nn.Parameter] = {
            name.removeprefix(_PREFIX).replace(_HEAD_MARK, "."): param
            for name, param in peft_model.named_parameters()
            if _HEAD_MARK in name
        }

    # -- the adapter as messages ---------------------------------------------------------

    def _A(self, layer: str) -> torch.nn.Parameter:
        return self.lora_layers[layer].lora_A[self.adapter_name].weight

    def _B(self, layer: str) -> torch.nn.Parameter:
        return self.lora_layers[layer].lora_B[self.adapter_name].weight

    def scaling(self) -> dict[str, float]:
        return {k: float(m.scaling[self.adapter_name]) for k, m in self.lora_layers.items()}

    def get_state(self, trained: Factor = "AB", *, head: bool = True) -> AdapterState:
        """Copies of the factors named by ``trained`` (and of the head, if ``head``)."""
        A = {k: self._A(k).detach().clone() for k in self.lora_layers} if "A" in trained else {}
        B = {k: self._B(k).detach().clone() for k in self.lora_layers} if "B" in trained else {}
        heads = {k: p.detach().clone() for k, p in self.head_params.items()} if head else {}
        return AdapterState(A=A, B=B, head=heads)

    @torch.no_grad()
    def set_state(self, state: AdapterState) -> None:
        for layer, value in state.A.items():
            self._A(layer).copy_(value)
        for layer, value in state.B.items():
            self._B(layer).copy_(value)
        for name, value in state.head.items():
            self.head_params[name].copy_(value)

    def set_trainable(self, trained: Factor, *, head: bool) -> list[torch.nn.Parameter]:
        """Freeze everything but the factors (and head) a round trains; return those."""
        params: list[torch.nn.Parameter] = []
        for layer in self.lora_layers:
            for factor, param in (("A", self._A(layer)), ("B", self._B(layer))):
                param.requires_grad_(factor in trained)
                if factor in trained:
                    params.append(param)
        for param in self.head_params.values():
            param.requires_grad_(head)
            if head:
                params.append(param)
        return params

    # -- the frozen weight -----------------------------------------------------------------

    def base_weight(self, layer: str) -> torch.Tensor:
        return self.lora_layers[layer].get_base_layer().weight

    @torch.no_grad()
    def add_to_base(self, layer: str, delta: torch.Tensor) -> None:
        """``W0 += delta`` with ``delta`` of shape ``(out, in)``.

        transformers' ``Conv1D`` (GPT-2) stores its weight transposed, ``(in, out)``.
        """
        base = self.lora_layers[layer].get_base_layer()
        weight = base.weight
        if type(base).__name__ == "Conv1D":
            delta = delta.T
        weight.add_(delta.to(dtype=weight.dtype, device=weight.device))

    # -- on disk ---------------------------------------------------------------------------

    def save(self, directory: str | Path, state: AdapterState) -> None:
        """Write ``state`` as a standard PEFT adapter (``PeftModel.from_pretrained`` loads it)."""
        self.set_state(state)
        self.model.save_pretrained(str(directory))
