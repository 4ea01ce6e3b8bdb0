"""The one place that knows PEFT's parameter names.

PEFT names a factor ``base_model.model.<layer>.lora_A.default.weight`` in
``named_parameters()`` and ``<layer>.lora_A.weight`` in a saved adapter; the sequence
classification head sits in a ``modules_to_save`` wrapper. A DoRA adapter (PEFT
``use_dora=True``) adds ``<layer>.lora_magnitude_vector.default.weight`` (saved as
``<layer>.lora_magnitude_vector``), one ``(out,)`` vector per layer. :class:`PeftAdapter`
maps all of that to :class:`~fedlora.messages.AdapterState` (layer name -> ``A``, ``B``,
``magnitude``; head name -> tensor) and back, so methods, runtimes and the Flower app never
see PEFT keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from fedlora.messages import AdapterState, Factor

_PREFIX = "base_model.model."


class PeftAdapter:
    """A PEFT LoRA model seen as a set of named factors that can be swapped in and out."""

    def __init__(self, peft_model: Any, *, client_alpha: str = "fixed") -> None:
        self.model = peft_model
        self.client_alpha = client_alpha
        self.adapter_name = "default"
        self.lora_layers: dict[str, LoraLayer] = {
            name.removeprefix(_PREFIX): module
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)
        }
        self.rank = int(peft_model.peft_config["default"].r)
        # DoRA (Liu et al., arXiv 2402.09353): a trainable magnitude vector per layer
        self.dora = bool(getattr(peft_model.peft_config["default"], "use_dora", False))
        self._exact: dict[str, torch.Tensor] = {}  # float32 folded weights of a bf16 base
        self.rank_adapters: dict[int, str] = {self.rank: "default"}
        self.head_params = self._head_params("default")

    def _head_params(self, adapter_name: str) -> dict[str, torch.nn.Parameter]:
        mark = f".modules_to_save.{adapter_name}."
        return {
            name.removeprefix(_PREFIX).replace(mark, "."): param
            for name, param in self.model.named_parameters()
            if mark in name
        }

    def use_rank(self, rank: int) -> None:
        """Activate the adapter of rank ``rank``, adding one (PEFT ``add_adapter``) if needed.

        Clients of different ranks (FLoRA) share the one base model: each rank gets its own
        named PEFT adapter, and only the active one takes part in the forward pass. Its
        ``lora_alpha`` is the global one (``client_alpha=fixed``: scaling ``alpha / rank``)
        or scaled with the rank (``proportional``: ``alpha * rank / r``, so the scaling is
        the global adapter's ``alpha / r`` at every rank, the FLoRA authors' convention).
        """
        if rank not in self.rank_adapters:
            name = f"rank{rank}"
            default = self.model.peft_config["default"]
            alpha = default.lora_alpha
            if self.client_alpha == "proportional":
                alpha = default.lora_alpha * rank / self.rank
            config = dataclasses.replace(default, r=rank, lora_alpha=alpha)
            self.model.add_adapter(name, config)
            self.rank_adapters[rank] = name
        name = self.rank_adapters[rank]
        if name != self.adapter_name:
            self.model.set_adapter(name)
            self.adapter_name = name
            self.head_params = self._head_params(name)

    # -- the adapter as messages ---------------------------------------------------------

    def _A(self, layer: str) -> torch.nn.Parameter:
        return cast(torch.nn.Parameter, self.lora_layers[layer].lora_A[self.adapter_name].weight)

    def _B(self, layer: str) -> torch.nn.Parameter:
        return cast(torch.nn.Parameter, self.lora_layers[layer].lora_B[self.adapter_name].weight)

    def _m(self, layer: str) -> torch.nn.Parameter:
        """DoRA's magnitude vector ``m`` of ``layer``, shape ``(out,)``: the layer computes
        ``diag(m / ||W0 + s B A||_row) (W0 + s B A) x`` (the norm of each output row, as PEFT's
        ``DoraLinearLayer`` takes it on the ``(out, in)`` weight)."""
        module = self.lora_layers[layer].lora_magnitude_vector[self.adapter_name]
        return cast(torch.nn.Parameter, module.weight)

    def scaling(self) -> dict[str, float]:
        return {k: float(m.scaling[self.adapter_name]) for k, m in self.lora_layers.items()}

    def get_state(
        self, trained: Factor = "AB", *, head: bool = True, magnitude: bool = True
    ) -> AdapterState:
        """Copies of the factors named by ``trained`` (and of the head, if ``head``; and of
        DoRA's magnitude vectors, if ``magnitude`` and the adapter is a DoRA one)."""
        A = {k: self._A(k).detach().clone() for k in self.lora_layers} if "A" in trained else {}
        B = {k: self._B(k).detach().clone() for k in self.lora_layers} if "B" in trained else {}
        heads = {k: p.detach().clone() for k, p in self.head_params.items()} if head else {}
        mags = (
            {k: self._m(k).detach().clone() for k in self.lora_layers}
            if magnitude and self.dora
            else {}
        )
        return AdapterState(A=A, B=B, head=heads, magnitude=mags)

    @torch.no_grad()
    def set_state(self, state: AdapterState) -> None:
        """Load ``state`` into the adapter whose rank matches it (see :meth:`use_rank`)."""
        if state.A:
            self.use_rank(next(iter(state.A.values())).shape[0])
        elif state.B:
            self.use_rank(next(iter(state.B.values())).shape[1])
        for layer, value in state.A.items():
            self._A(layer).copy_(value)
        for layer, value in state.B.items():
            self._B(layer).copy_(value)
        for name, value in state.head.items():
            self.head_params[name].copy_(value)
        if state.magnitude and not self.dora:
            raise ValueError("a DoRA magnitude vector was sent to a plain LoRA adapter")
        if self.dora and state.A and state.B and not state.magnitude:
            # a method bug, not user input: the model would silently keep the last m it held
            raise ValueError(
                "a DoRA adapter was given factors without magnitude vectors (a method whose "
                "aggregate drops them must set carries_magnitude = False)"
            )
        for layer, value in state.magnitude.items():
            self._m(layer).copy_(value)

    def set_trainable(
        self, trained: Factor, *, head: bool, magnitude: bool | None = None
    ) -> list[torch.nn.Parameter]:
        """Freeze everything but the factors (and head) a round trains; return those.

        ``magnitude``: whether DoRA's magnitude vectors train (None: when ``B`` does, the
        default of :attr:`~fedlora.messages.RoundPlan.train_magnitude`); ignored for LoRA.
        """
        train_m = "B" in trained if magnitude is None else magnitude
        params: list[torch.nn.Parameter] = []
        for layer in self.lora_layers:
            pairs = [("A", self._A(layer)), ("B", self._B(layer))]
            if self.dora:
                # PEFT leaves m trainable; a frozen factor must not collect gradients either
                pairs.append(("m", self._m(layer)))
            for factor, param in pairs:
                on = train_m if factor == "m" else factor in trained
                param.requires_grad_(on)
                if on:
                    params.append(param)
        for param in self.head_params.values():
            param.requires_grad_(head)
            if head:
                params.append(param)
        return params

    # -- the frozen weight -----------------------------------------------------------------

    def base_weight(self, layer: str) -> torch.Tensor:
        return cast(torch.Tensor, self.lora_layers[layer].get_base_layer().weight)

    def exact_base(self, layer: str) -> torch.Tensor:
        """The frozen weight as aggregation made it: float32, even when the model holds it in
        bfloat16 (what checkpoints save, so that a resumed run folds onto the same value)."""
        return self._exact.get(layer, self.base_weight(layer))

    @torch.no_grad()
    def set_base(self, layer: str, weight: torch.Tensor) -> None:
        """Set a frozen weight (as :meth:`exact_base` returned it, or the pretrained one)."""
        held = self.base_weight(layer)
        held.copy_(weight.to(device=held.device, dtype=held.dtype))
        if held.dtype == torch.float32:
            self._exact.pop(layer, None)
        else:
            self._exact[layer] = weight.to(device=held.device, dtype=torch.float32).clone()

    @torch.no_grad()
    def add_to_base(self, layer: str, delta: torch.Tensor) -> None:
        """``W0 += delta`` with ``delta`` of shape ``(out, in)``.

        transformers' ``Conv1D`` (GPT-2) stores its weight transposed, ``(in, out)``. A base
        held in bfloat16 cannot take a small increment (rounding to bf16 would drop most of
        it every round): the sum is kept in float32 (:meth:`exact_base`) and the held weight
        is its rounding, so the rounding never accumulates.
        """
        base = self.lora_layers[layer].get_base_layer()
        held = cast(torch.Tensor, base.weight)
        if held.dtype == torch.float32:
            _fold(base, delta)
            return
        exact = self._exact.get(layer)
        if exact is None:
            exact = held.detach().to(torch.float32).clone()
        oriented = delta.T if type(base).__name__ == "Conv1D" else delta
        exact.add_(oriented.to(device=exact.device, dtype=torch.float32))
        self._exact[layer] = exact
        held.copy_(exact.to(held.dtype))

    # -- on disk ---------------------------------------------------------------------------

    def save(
        self, directory: str | Path, state: AdapterState, base_delta: dict[str, torch.Tensor]
    ) -> None:
        """Write ``state`` as a standard PEFT adapter (``PeftModel.from_pretrained`` loads it).

        Methods that fold increments into the frozen weights (FedEx-LoRA, FLoRA) leave a
        ``base_delta.safetensors`` beside it (layer name -> ``(out, in)`` increment);
        :func:`apply_base_delta` adds it to a freshly loaded base model. A DoRA adapter's
        magnitude vectors are saved by PEFT with it (``lora_magnitude_vector``).
        """
        self.set_state(state)
        self.model.save_pretrained(str(directory), selected_adapters=["default"])
        if base_delta:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in base_delta.items()},
                str(Path(directory) / BASE_DELTA_FILE),
            )


BASE_DELTA_FILE = "base_delta.safetensors"


@torch.no_grad()
def apply_base_delta(model: torch.nn.Module, adapter_dir: str | Path) -> bool:
    """Add a saved ``base_delta.safetensors`` to the frozen weights of ``model`` (a PEFT
    model or its base). Returns False when the adapter has none."""
    path = Path(adapter_dir) / BASE_DELTA_FILE
    if not path.is_file():
        return False
    modules = dict(model.named_modules())
    for layer, delta in load_file(str(path)).items():
        module = modules.get(layer) or modules.get(_PREFIX + layer)
        if module is None:
            raise KeyError(f"layer {layer} of {path} not in the model")
        _fold(module.get_base_layer() if hasattr(module, "get_base_layer") else module, delta)
    return True


def _fold(base: torch.nn.Module, delta: torch.Tensor) -> None:
    # transformers' Conv1D (GPT-2) stores its weight transposed, (in, out).
    if type(base).__name__ == "Conv1D":
        delta = delta.T
    weight = cast(torch.Tensor, base.weight)
    weight.add_(delta.to(dtype=weight.dtype, device=weight.device))
