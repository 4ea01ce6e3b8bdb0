"""Where a run computes: the device, the autocast precision, the base model's dtype and a
quantized base (QLoRA, through bitsandbytes).

``device=auto`` is CUDA when torch sees a GPU, then Apple's ``mps``, else the CPU. The
model, every batch, evaluation and the aggregation math run there; what crosses a process
boundary (Flower messages, checkpoints, saved adapters) is moved to the CPU at that
boundary only. ``precision`` is autocast for forward and backward (``bf16``, ``fp16`` with
a gradient scaler); LoRA factors, optimizer state, client updates and aggregation stay
float32 (aggregation works in float64 wherever the device has it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from fedlora.errors import FedLoraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``name`` denotes on this machine; a one-line error if it is not here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise FedLoraError("device=mps: this machine has no Apple MPS device")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise FedLoraError(f"device={name}: torch sees no CUDA device on this machine")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise FedLoraError(
                f"device={name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    raise FedLoraError(f"config key 'device' must be auto, cpu, cuda, cuda:N or mps; got '{name}'")


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast needs a gradient scaler and fast half matmuls: CUDA only."""
    if precision == "fp16" and device.type != "cuda":
        raise FedLoraError(
            f"precision=fp16 needs a CUDA device (this run is on {device.type}); use precision=bf16"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` for ``bf16`` / ``fp16``; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST[precision]):
        yield


def quantization_config(
    quantization: str, *, double_quant: bool, compute_dtype: str, skip_modules: list[str]
) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``int8``, ``nf4`` or ``fp4`` (None: ``none``).

    ``skip_modules`` stay unquantized (the classification head, which every client trains).
    """
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        llm_int8_skip_modules=skip_modules,
    )
