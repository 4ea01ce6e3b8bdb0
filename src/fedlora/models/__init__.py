"""Pretrained models with PEFT LoRA, and their adapters as named factors."""

from fedlora.models.adapter import PeftAdapter
from fedlora.models.loading import (
    LoRASettings,
    attach_lora,
    detect_target_modules,
    load_classifier,
    resolve_model,
)

__all__ = [
    "PeftAdapter",
    "LoRASettings",
    "attach_lora",
    "detect_target_modules",
    "load_classifier",
    "resolve_model",
]
