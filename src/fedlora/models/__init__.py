"""Pretrained models with PEFT LoRA, and their adapters as named factors."""

from fedlora.models.adapter import PeftAdapter
from fedlora.models.loading import (
    TARGET_MODULES,
    LoRASettings,
    attach_lora,
    detect_target_modules,
    load_classifier,
    resolve_model,
)

__all__ = [
    "PeftAdapter",
    "LoRASettings",
    "TARGET_MODULES",
    "attach_lora",
    "detect_target_modules",
    "load_classifier",
    "resolve_model",
]
