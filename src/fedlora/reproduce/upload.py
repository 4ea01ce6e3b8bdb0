"""Upload per client per round, computed exactly from a model config (RoLoRA paper, Table 6).

No weights are downloaded: the model is built from its config on the ``meta`` device
(shapes only, no memory), and the LoRA factors' sizes follow from the shapes of the target
layers. A factor of a layer ``W`` of shape ``(out, in)`` at rank ``r`` is
``A: (r, in)`` and ``B: (out, r)``; a client uploads what it trained:

- FedAvg-LoRA (and FRA-LoRA, FedEx-LoRA, FLoRA): ``A`` and ``B``, ``r (in + out)`` per layer;
- FFA-LoRA: ``B`` only, ``r out``;
- RoLoRA: ``B`` on odd rounds, ``A`` on even rounds (``r out`` or ``r in``).

The trainable classifier head is not counted (the papers count LoRA parameters); add
:func:`head_parameters` for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.errors import FedLoraError

FACTORS = {
    "fedavg": ("AB",),
    "fra": ("AB",),
    "fedex": ("AB",),
    "flora": ("AB",),
    "ffa": ("B",),
    "rolora": ("B", "A"),  # round 1 trains B, round 2 trains A, ...
}


@dataclass(frozen=True)
class Upload:
    """What one client uploads in one round (per phase for RoLoRA)."""

    method: str
    rank: int
    layers: int  # LoRA layers (target modules x blocks)
    parameters: tuple[int, ...]  # per round of the method's cycle
    bytes_per_parameter: int

    @property
    def mean_parameters(self) -> float:
        return sum(self.parameters) / len(self.parameters)

    @property
    def mean_bytes(self) -> float:
        return self.mean_parameters * self.bytes_per_parameter


def lora_shapes(
    config: Any, *, target_modules: Sequence[str], layers: Sequence[int] | None = None
) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every ``nn.Linear`` named by ``target_modules`` (suffix match, as
    PEFT does), in the transformer blocks ``layers`` (all blocks when None)."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    shapes = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        block = re.search(r"\.layer\.(\d+)\.", name)
        if block is None or (layers is not None and int(block.group(1)) not in layers):
            continue
        shapes[name] = (module.out_features, module.in_features)
    if layers is not None:
        blocks = config.num_hidden_layers
        missing = sorted(b for b in set(layers) if not 0 <= b < blocks)
        if missing:
            raise FedLoraError(
                f"the model has transformer blocks 0-{blocks - 1}; no block {missing}"
            )
    return shapes


def upload_per_round(
    config: Any,
    *,
    method: str,
    rank: int,
    target_modules: Sequence[str] = ("query", "value"),
    layers: Sequence[int] | None = None,
    bytes_per_parameter: int = 4,
) -> Upload:
    shapes = lora_shapes(config, target_modules=target_modules, layers=layers)
    per_phase = []
    for trained in FACTORS[method]:
        total = 0
        for out_features, in_features in shapes.values():
            total += rank * in_features if "A" in trained else 0
            total += out_features * rank if "B" in trained else 0
        per_phase.append(total)
    return Upload(
        method=method,
        rank=rank,
        layers=len(shapes),
        parameters=tuple(per_phase),
        bytes_per_parameter=bytes_per_parameter,
    )


def roberta_large_config() -> Any:
    """RoBERTa-Large's published sizes (``roberta-large/config.json``), built locally."""
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=50265,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
        type_vocab_size=1,
    )


def upload_table(
    config: Any,
    *,
    methods: Sequence[str] = ("fedavg", "ffa", "rolora"),
    ranks: Sequence[int] = (1, 2, 4, 8),
    target_modules: Sequence[str] = ("query", "value"),
    layers: Sequence[int] | None = None,
) -> str:
    """Markdown: parameters and MB (10^6 bytes, float32) uploaded per client per round."""
    lines = [
        "| method | rank | LoRA layers | parameters / client / round | MB / client / round |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        for rank in ranks:
            up = upload_per_round(
                config, method=method, rank=rank, target_modules=target_modules, layers=layers
            )
            params = " or ".join(f"{p:,}" for p in sorted(set(up.parameters)))
            lines.append(
                f"| {method} | {rank} | {up.layers} | {params} | {up.mean_bytes / 1e6:.4f} |"
            )
    return "\n".join(lines)
