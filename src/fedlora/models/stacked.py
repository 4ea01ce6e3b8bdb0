"""K clients' adapters on one PEFT model, stacked over a leading client dimension.

Clients in lockstep (:mod:`fedlora.client.lockstep`) run K clients' batches as one batch
of ``n_1 + ... + n_K`` rows. The frozen base runs once over all the rows; each LoRA layer
adds client ``k``'s own update to client ``k``'s rows only (Hu et al., arXiv 2106.09685,
eq. 3, with one ``(A_k, B_k)`` per row segment):

    h_i = W0 x_i + s B_k A_k dropout(x_i)        for every row i of client k

with ``A`` stacked as ``(K, r, in)`` and ``B`` as ``(K, out, r)``: one batched matmul when
the clients' segments have equal row counts, one matmul per client otherwise. The trained
head (PEFT's ``modules_to_save``) runs with client ``k``'s tensors on client ``k``'s rows.
Rows never meet in a transformer (attention, pooling and layer norm work within a row), so
client ``k``'s slice of a stacked tensor changes client ``k``'s rows only, and the gradient
of ``sum_k L_k`` in that slice is the gradient of client ``k``'s own loss ``L_k``.

Only vanilla PEFT ``lora.Linear`` layers are stacked (:func:`stack_refusal` says why a
model's are not: DoRA's magnitude, bitsandbytes layers, embedding or convolution targets).
This file, like :mod:`fedlora.models.adapter`, knows PEFT's module layout; it replaces
forward methods for the duration of :meth:`StackedAdapters.applied` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper

from fedlora.messages import AdapterState, Factor
from fedlora.models.adapter import PeftAdapter


def stack_refusal(adapter: PeftAdapter) -> str | None:
    """Why the adapters of ``adapter``'s model cannot be stacked, or None."""
    if adapter.dora:
        return "DoRA's magnitude normalises each client's own W0 + s B A"
    for name, layer in adapter.lora_layers.items():
        if type(layer) is not LoraLinear:
            return f"LoRA layer {name} is a {type(layer).__name__}, not a plain lora.Linear"
        if adapter.adapter_name in layer.lora_variant:
            return f"LoRA layer {name} has a LoRA variant"
        if layer.lora_B[adapter.adapter_name].bias is not None:
            return f"LoRA layer {name} has a LoRA bias"
    return None


class StackedAdapters:
    """The adapters of K clients (``states``, all of one rank) as stacked tensors.

    ``A[layer]`` is ``(K, r, in)``, ``B[layer]`` is ``(K, out, r)``, ``head[name]`` is
    ``(K, *shape)``; those the round trains (``trained``, ``train_head``) are leaves that
    require grad. The PEFT model must already hold the adapter of this rank
    (:meth:`PeftAdapter.set_state` of any of the states).
    """

    def __init__(
        self,
        adapter: PeftAdapter,
        states: Sequence[AdapterState],
        *,
        trained: Factor,
        train_head: bool,
    ) -> None:
        self.adapter = adapter
        self.trained = trained
        self.train_head = train_head
        self.size = len(states)
        name = adapter.adapter_name

        def stack(values: list[torch.Tensor], like: torch.Tensor, grad: bool) -> torch.Tensor:
            held = torch.stack([v.to(device=like.device, dtype=like.dtype) for v in values])
            return held.requires_grad_(grad)

        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for layer, module in adapter.lora_layers.items():
            A, B = (cast(torch.Tensor, f[name].weight) for f in (module.lora_A, module.lora_B))
            self.A[layer] = stack([s.A[layer] for s in states], A, "A" in trained)
            self.B[layer] = stack([s.B[layer] for s in states], B, "B" in trained)
        # a state without a head (none sent) trains the one the model holds, as set_state does
        self.head: dict[str, torch.Tensor] = {
            key: stack(
                [s.head.get(key, param.detach()) for s in states], param.detach(), train_head
            )
            for key, param in adapter.head_params.items()
        }

    def parameters(self) -> list[torch.Tensor]:
        """The stacked tensors that train this round (the optimizer's parameters)."""
        trained = [*self.A.values()] if "A" in self.trained else []
        trained += [*self.B.values()] if "B" in self.trained else []
        return trained + ([*self.head.values()] if self.train_head else [])

    def client_state(self, k: int, *, full: bool = False) -> AdapterState:
        """Client ``k``'s tensors: those the round trained (what it sends), or all (``full``)."""
        A = {n: t[k].detach().clone() for n, t in self.A.items()}
        B = {n: t[k].detach().clone() for n, t in self.B.items()}
        head = {n: t[k].detach().clone() for n, t in self.head.items()}
        if full:
            return AdapterState(A=A, B=B, head=head)
        return AdapterState(
            A=A if "A" in self.trained else {},
            B=B if "B" in self.trained else {},
            head=head if self.train_head else {},
        )

    @contextlib.contextmanager
    def applied(self, sizes: Sequence[int]) -> Iterator[None]:
        """Within: a forward pass of the model over a batch whose rows are the clients'
        segments of ``sizes`` rows (client 0 first) uses client ``k``'s tensors on segment
        ``k``."""
        if len(sizes) != self.size:
            raise ValueError(f"{len(sizes)} segments for {self.size} stacked adapters")
        patched: list[torch.nn.Module] = []
        try:
            for layer, module in self.adapter.lora_layers.items():
                linear = cast(LoraLinear, module)  # stack_refusal: plain lora.Linear layers
                linear.forward = self._lora_forward(  # type: ignore[method-assign]
                    linear, self.A[layer], self.B[layer], sizes
                )
                patched.append(linear)
            for wrapper, inner, keys in self._heads():
                wrapper.forward = self._head_forward(inner, keys, sizes)  # type: ignore[method-assign]
                patched.append(wrapper)
            yield
        finally:
            for done in patched:
                del done.forward  # the class's forward again

    def _lora_forward(
        self, module: LoraLinear, A: torch.Tensor, B: torch.Tensor, sizes: Sequence[int]
    ) -> Any:
        name = self.adapter.adapter_name
        dropout = module.lora_dropout[name]
        scaling = module.scaling[name]
        equal = len(set(sizes)) == 1
        rows = sum(sizes)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if x.shape[0] != rows:
                raise RuntimeError(f"a batch of {x.shape[0]} rows, {rows} in the segments")
            result = module.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            # PEFT's order: cast the input to the factors' dtype, then dropout
            h = dropout(x if x.dtype == A.dtype else x.to(A.dtype))
            if equal:  # one batched matmul over the client dimension
                per_client = h.reshape(len(sizes), -1, h.shape[-1])
                delta = torch.bmm(torch.bmm(per_client, A.transpose(1, 2)), B.transpose(1, 2))
                delta = delta.reshape(*result.shape[:-1], delta.shape[-1])
            else:
                delta = torch.cat(
                    [
                        torch.nn.functional.linear(torch.nn.functional.linear(part, A[k]), B[k])
                        for k, part in enumerate(h.split(list(sizes)))
                    ]
                )
            return (result + delta * scaling).to(dtype)

        return forward

    def _heads(self) -> list[tuple[torch.nn.Module, torch.nn.Module, dict[str, str]]]:
        """(PEFT's wrapper, the active copy it runs, that copy's parameter name -> head key)."""
        key_of = {id(p): key for key, p in self.adapter.head_params.items()}
        heads = []
        for module in self.adapter.model.modules():
            if not isinstance(module, ModulesToSaveWrapper):
                continue
            inner = cast(torch.nn.Module, module.modules_to_save[self.adapter.adapter_name])
            keys = {n: key_of[id(p)] for n, p in inner.named_parameters() if id(p) in key_of}
            if keys:
                heads.append((cast(torch.nn.Module, module), inner, keys))
        return heads

    def _head_forward(
        self, inner: torch.nn.Module, keys: Mapping[str, str], sizes: Sequence[int]
    ) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            outs = [
                torch.func.functional_call(
                    inner, {n: self.head[key][k] for n, key in keys.items()}, (part, *args), kwargs
                )
                for k, part in enumerate(x.split(list(sizes)))
            ]
            return torch.cat(outs)

        return forward


def client_losses(
    model: torch.nn.Module, logits: torch.Tensor, labels: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``(K,)``: each client's loss on its segment of ``logits`` (client ``k``'s rows are the
    ``len(labels[k])`` after those of clients ``0..k-1``), computed as the model computes it
    for a batch of that client alone: transformers' ``ForCausalLMLoss`` (token labels, the
    mean over the segment's labelled tokens) or ``ForSequenceClassificationLoss``."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    losses = []
    start = 0
    for y in labels:
        part = logits[start : start + len(y)]
        start += len(y)
        y = y.to(part.device)
        if y.ndim == 2:  # token labels: a causal LM; the segment's own width
            width = y.shape[1]
            losses.append(
                base.loss_function(
                    logits=part[:, :width], labels=y, vocab_size=base.config.vocab_size
                )
            )
        else:
            losses.append(ForSequenceClassificationLoss(y, part, base.config))
    if start != len(logits):
        raise RuntimeError(f"{len(logits)} rows of logits, {start} labelled")
    return torch.stack(losses)
