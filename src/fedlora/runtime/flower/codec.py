"""fedlora's messages as Flower records, and back.

An :class:`~fedlora.messages.AdapterState` (or the trained part of a
:class:`~fedlora.messages.ClientUpdate`) becomes one ``ArrayRecord`` keyed
``A/<layer>``, ``B/<layer>``, ``head/<name>`` and, for a DoRA adapter, ``magnitude/<layer>``
(its magnitude vector); dense increments of the frozen weights
(FedEx-LoRA's residual) travel in a second record keyed by layer. The keys carry fedlora's
layer names, never PEFT's parameter names.

Flower's ``Array`` serialises through numpy, and numpy has no bfloat16. A bf16 tensor is
therefore sent as its raw 16-bit pattern (an ``int16`` numpy array) in an ``Array`` whose
``dtype`` says ``"bfloat16"``, and viewed back as bf16 on arrival: lossless, two bytes per
element on the wire, and never silently upcast. Every other dtype round-trips through numpy
as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.config import Config, config_from_dict
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import check_config

BF16 = "bfloat16"
_KINDS = ("A", "B", "head", "magnitude")


def tensor_to_array(tensor: torch.Tensor) -> Array:
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        bits = Array.from_numpy_ndarray(t.view(torch.int16).numpy())
        return Array(dtype=BF16, shape=bits.shape, stype=bits.stype, data=bits.data)
    return Array.from_numpy_ndarray(t.numpy())


def array_to_tensor(array: Array) -> torch.Tensor:
    values = np.array(array.numpy(), copy=True)  # np.load's result may be read-only
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if array.dtype == BF16 else tensor


def state_to_record(state: AdapterState) -> ArrayRecord:
    """``A``, ``B``, ``head`` and ``magnitude`` tensors (any of them may be empty) as one
    record."""
    record = ArrayRecord()
    for kind in _KINDS:
        for name, tensor in getattr(state, kind).items():
            record[f"{kind}/{name}"] = tensor_to_array(tensor)
    return record


def record_to_state(record: ArrayRecord) -> AdapterState:
    parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
    for key, array in record.items():
        kind, sep, name = key.partition("/")
        if not sep or kind not in parts:
            raise ValueError(f"unexpected array '{key}' in an adapter record")
        parts[kind][name] = array_to_tensor(array)
    return AdapterState(
        A=parts["A"], B=parts["B"], head=parts["head"], magnitude=parts["magnitude"]
    )


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = tensor_to_array(tensor)
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {name: array_to_tensor(array) for name, array in record.items()}


# -- the messages of one round -------------------------------------------------------------
#
# Server -> client: ``adapter`` (the state to start from), ``base_delta`` (the increments
# folded into the frozen weights so far, only for methods that fold any) and ``fedlora``
# (the run's resolved config as YAML, the label names, and for training the round plan).
# Client -> server: ``update`` (the trained tensors only) and ``metrics``; in SLoRA's sparse
# stage also ``sparse`` (per layer, the values at the seeded mask). The round plan's fields
# (SLoRA's ``mask_density`` and ``mask_seed`` among them) travel as ``plan.<field>``.


@dataclass(frozen=True)
class Instruction:
    config: str  # the run's Config as YAML: the server is the one source of settings
    label_names: list[str]
    state: AdapterState
    base_delta: dict[str, torch.Tensor]
    plan: RoundPlan | None  # None: evaluate
    # DP-SGD: the noise every client trains with (the server picks it for dp.target_epsilon)
    noise_multiplier: float | None = None


def instruction_to_content(ins: Instruction) -> RecordDict:
    fields: dict[str, Any] = {"config": ins.config, "label-names": list(ins.label_names)}
    if ins.plan is not None:
        fields |= {
            f"plan.{f.name}": getattr(ins.plan, f.name) for f in dataclasses.fields(ins.plan)
        }
    if ins.noise_multiplier is not None:
        fields["dp.noise-multiplier"] = float(ins.noise_multiplier)
    content = RecordDict({"adapter": state_to_record(ins.state), "fedlora": ConfigRecord(fields)})
    if ins.base_delta:
        content["base_delta"] = tensors_to_record(ins.base_delta)
    return content


def content_to_instruction(content: RecordDict) -> Instruction:
    fields = content.config_records["fedlora"]
    plan_fields: dict[str, Any] = {
        k.removeprefix("plan."): v for k, v in fields.items() if k.startswith("plan.")
    }
    delta = content.array_records.get("base_delta")
    noise = fields.get("dp.noise-multiplier")
    return Instruction(
        config=str(fields["config"]),
        label_names=[str(n) for n in fields["label-names"]],  # type: ignore[union-attr]
        state=record_to_state(content.array_records["adapter"]),
        base_delta=record_to_tensors(delta) if delta is not None else {},
        plan=RoundPlan(**plan_fields) if plan_fields else None,
        noise_multiplier=None if noise is None else float(noise),  # type: ignore[arg-type]
    )


def update_to_content(update: ClientUpdate) -> RecordDict:
    trained = update.trained_state
    metrics = MetricRecord(
        {
            "client-id": update.client_id,
            "num-examples": update.num_examples,
            "train-loss": float(update.train_loss),
            "steps": update.steps,
        }
    )
    scaling = ConfigRecord({k: float(v) for k, v in update.scaling.items()})
    content = RecordDict(
        {"update": state_to_record(trained), "metrics": metrics, "scaling": scaling}
    )
    if update.sparse:  # SLoRA's first stage: the values at the seeded mask, per layer
        content["sparse"] = tensors_to_record(update.sparse)
    return content


def content_to_update(content: RecordDict) -> ClientUpdate:
    metrics = content.metric_records["metrics"]
    trained = record_to_state(content.array_records["update"])
    sparse = content.array_records.get("sparse")
    return ClientUpdate(
        client_id=int(metrics["client-id"]),  # type: ignore[arg-type]
        num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        A=trained.A,
        B=trained.B,
        head=trained.head,
        train_loss=float(metrics["train-loss"]),  # type: ignore[arg-type]
        scaling={k: float(v) for k, v in content.config_records["scaling"].items()},  # type: ignore[arg-type]
        steps=int(metrics["steps"]),  # type: ignore[arg-type]
        magnitude=trained.magnitude,
        sparse=record_to_tensors(sparse) if sparse is not None else {},
    )


def config_to_text(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


@functools.lru_cache(maxsize=4)
def text_to_config(text: str) -> Config:
    """The config a server sent, validated again on arrival like any config (and checked by
    the methods); a ClientApp decodes the same text every round, hence the cache."""
    cfg = config_from_dict(yaml.safe_load(text) or {})
    check_config(cfg)
    return cfg
