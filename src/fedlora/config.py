"""Run configuration: a YAML file plus ``key=value`` overrides, validated on load.

:class:`Config` is one frozen pydantic model made of sections (:class:`ModelSection`,
:class:`DataSection`, :class:`FederationSection`, :class:`TrainingSection`,
:class:`PrivacySection`, :class:`OutputSection`, :class:`FlowerSection`): the keys stay
flat (``rank=4``, ``cfg.rank``) except ``dp``, a nested :class:`DPConfig` addressed as
``dp.delta=1e-5``. Choices are ``Literal`` types and bounds are declared on the fields;
rules that span fields are ``model_validator`` s of the section (or of :class:`Config`,
when they span sections). :data:`SECTIONS` says which keys belong to which section, under
the heading of ``docs/configuration.md`` that documents them.

Any bad key or value raises :class:`~fedlora.errors.FedLoraError` with one line naming the
key (pydantic's ``ValidationError`` is translated); the CLI prints it and exits 2.

This module imports nothing else of fedlora: what only a method knows (method names,
schedules, client ranks, what a method cannot run with) is checked by the methods
themselves, :func:`fedlora.methods.check_config`, which every entry that runs something
calls after loading.
"""

from __future__ import annotations

import codecs
import difflib
import importlib.util
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from fedlora.errors import FedLoraError

T = TypeVar("T")

# --- how YAML values become field values -------------------------------------------------


def _integer(value: Any) -> Any:
    # refused, not rounded: YAML's `true` and `1.5` are not counts
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise PydanticCustomError("int_type", "not an integer")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "not a number")
    return float(value) if isinstance(value, int) else value


def _word(value: Any) -> Any:
    if value is None:
        # an override `key=none` parses as null; a string key cannot be null, so it
        # means the word (`quantization=none`; elsewhere a bad choice names it)
        return "none"
    return _text(value)


def _text(value: Any) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 reads on/off (and yes/no, true/false) as booleans; a string key means
        # the word its choices use (`prefix_cache=on`; elsewhere a bad choice names it)
        return "on" if value else "off"
    return str(value) if isinstance(value, (int, float)) else value


def _listed(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]  # `layers=5` or `target_modules=query` mean a one-element list
    return value


Integer = Annotated[T, BeforeValidator(_integer)]
Number = Annotated[T, BeforeValidator(_number)]
Word = Annotated[T, BeforeValidator(_word)]  # a string or a choice; null is the word "none"
Text = Annotated[str | None, BeforeValidator(_text)]  # a string or null
Flag = Annotated[bool, Strict()]
Listed = Annotated[T, BeforeValidator(_listed)]

Runtime = Literal["inprocess", "flower-sim", "flower"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# True while a section validates: a section inside it (dp, a schedule phase) then leaves its
# errors to pydantic, which files them under their key (`dp.delta`), for the outer one to report.
_validating: ContextVar[bool] = ContextVar("_validating", default=False)


class _Section(BaseModel):
    """A frozen group of keys; constructing one validates it (one-line errors)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    doc_title: ClassVar[str] = ""  # its heading in docs/configuration.md
    key_prefix: ClassVar[str] = ""  # how its keys are written when it is built alone

    def __init__(self, **values: Any) -> None:
        if _validating.get():
            super().__init__(**values)
            return
        token = _validating.set(True)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise FedLoraError(one_line(exc, type(self))) from None
        finally:
            _validating.reset(token)

    @classmethod
    def validated(cls, values: Any) -> Self:
        """``model_validate`` with :class:`~fedlora.errors.FedLoraError` for its errors."""
        token = _validating.set(True)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise FedLoraError(one_line(exc, cls)) from None
        finally:
            _validating.reset(token)


# --- the sections ------------------------------------------------------------------------


class ModelSection(_Section):
    """Model and LoRA, where and how the base computes, decoder LLMs (``task=causal-lm``)."""

    doc_title = "Model and LoRA"

    model: Word[str] = "minilm"
    rank: Integer[int] = Field(default=8, ge=1)
    alpha: Number[float] = Field(default=16.0, gt=0)
    lora_dropout: Number[float] = Field(default=0.0, ge=0, lt=1)
    adapter: Word[Literal["lora", "dora"]] = "lora"  # dora: PEFT use_dora, a magnitude per layer
    target_modules: Listed[list[Word[str]] | None] = None
    layers: Listed[list[Integer[int]] | None] = None
    head: Word[Literal["train", "frozen"]] = "train"
    device: Word[str] = "auto"
    precision: Word[Literal["fp32", "bf16", "fp16"]] = "fp32"
    base_dtype: Word[Literal["float32", "bfloat16"]] = "float32"
    quantization: Word[Literal["none", "int8", "nf4", "fp4"]] = "none"
    bnb_double_quant: Flag = True
    bnb_compute_dtype: Word[Literal["float32", "bfloat16", "float16"]] = "float32"
    gradient_checkpointing: Flag = False
    # keep the hidden states below the first LoRA block per example (fedlora.models.prefix)
    prefix_cache: Word[Literal["auto", "on", "off"]] = "auto"
    task: Word[Literal["classification", "causal-lm"]] = "classification"
    lora_mlp: Flag = False
    chat_template: Flag = True
    verbalizer: Listed[list[Word[str]] | None] = None

    @field_validator("layers")
    @classmethod
    def _block_indices(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError(f"must be a non-empty list of block indices >= 0, got {layers}")
        return layers

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, targets: list[str] | None) -> list[str] | None:
        if targets is not None and not targets:
            raise ValueError("must not be an empty list")
        return targets

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps; got '{device}'")
        return device

    @model_validator(mode="after")
    def _check_model(self) -> Self:
        if self.prefix_cache == "on" and (self.layers is None or 0 in self.layers):
            raise FedLoraError(
                "prefix_cache=on needs LoRA above block 0, so that the blocks below it are "
                f"frozen: set layers=[...] without 0 (got layers={self.layers})"
            )
        if self.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise FedLoraError(
                f"quantization={self.quantization} needs bitsandbytes (pip install bitsandbytes==0.50.2)"
            )
        if self.task != "causal-lm":
            for name, default in (("lora_mlp", False), ("verbalizer", None)):
                if getattr(self, name) != default:
                    raise FedLoraError(f"config key '{name}' needs task=causal-lm")
        return self


class DataSection(_Section):
    doc_title = "Data"

    dataset: Word[str] = "bbc-news"
    data_dir: Text = None
    text_column: Text = None
    text_pair_column: Text = None
    label_column: Word[str] = "label"
    group_column: Text = None
    encoding: Word[str] = "utf-8"
    test_fraction: Number[float] = Field(default=0.2, ge=0, lt=1)
    eval_fraction: Number[float] = Field(default=0.1, ge=0, lt=1)
    max_client_eval_examples: Integer[int | None] = Field(default=200, ge=0)
    max_train_examples: Integer[int | None] = Field(default=None, gt=0)
    max_test_examples: Integer[int | None] = Field(default=None, gt=0)
    # test: a local GLUE task's labelled test.tsv (final figures only)
    eval_split: Word[Literal["dev", "test"]] = "dev"
    max_length: Integer[int] = Field(default=128, gt=0)

    @field_validator("encoding")
    @classmethod
    def _text_encoding(cls, encoding: str) -> str:
        """Fail at load, not after the model is built: ``codecs.lookup`` finds
        bytes-to-bytes codecs too (``rot13``, ``zlib``), which ``str.encode`` refuses."""
        try:
            codecs.lookup(encoding)
            "a".encode(encoding)
        except (LookupError, UnicodeError):
            raise ValueError(
                f"must name a text encoding (e.g. utf-8, latin-1, cp1252, utf-16), got '{encoding}'"
            ) from None
        return encoding


class Phase(_Section):
    """One phase of ``method: schedule``: ``method`` for ``rounds`` rounds (None: to the end)."""

    method: Word[str]
    rounds: Integer[int | None] = Field(default=None, ge=1)


class FederationSection(_Section):
    """Clients, partition, sampling, the method and its own keys."""

    doc_title = "Federation"

    num_clients: Integer[int] = Field(default=3, gt=0)
    partition: Word[Literal["iid", "dirichlet", "imbalanced", "natural"]] = "dirichlet"
    partition_alpha: Number[float] = Field(default=0.5, gt=0)
    # 1.0 is a client holding only its dominant class; 0 would give it none of it.
    dominant_fraction: Number[float] = Field(default=0.8, gt=0, le=1)
    client_fraction: Number[float] = Field(default=1.0, gt=0, le=1)
    weighting: Word[Literal["method", "uniform", "num_examples"]] = "method"
    method: Word[str] = "rolora"
    methods: Listed[list[Word[str]]] = Field(
        default_factory=lambda: ["fedavg", "ffa", "rolora", "fra", "centralized"]
    )
    rounds: Integer[int] = Field(default=10, gt=0)
    runtime: Word[Runtime] = "inprocess"
    client_ranks: Listed[list[Integer[int]] | None] = None
    client_alpha: Word[Literal["fixed", "proportional"]] = "fixed"
    hetlora_gamma: Number[float] = Field(default=0.99, gt=0, le=1)  # HetLoRA's rank decay (1: none)
    fair_lambda: Number[float] = Field(
        default=0.01, ge=0, allow_inf_nan=False
    )  # LoRA-FAIR's lambda
    schedule: list[Phase] | None = None
    slora_rounds: Integer[int] = Field(default=2, ge=1)  # SLoRA's stage 1: sparse fine-tuning
    slora_density: Number[float] = Field(default=0.01, gt=0, le=1)  # share of entries it trains

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("must name at least one method")
        return methods

    @model_validator(mode="after")
    def _check_schedule(self) -> Self:
        phases = self.schedule or []
        for i, phase in enumerate(phases[:-1]):
            if phase.rounds is None:
                raise FedLoraError(
                    f"schedule phase {i + 1} ({phase.method}) needs 'rounds' (only the last may omit it)"
                )
        return self


class TrainingSection(_Section):
    doc_title = "Client training"

    local_steps: Integer[int] = Field(default=10, gt=0)
    batch_size: Integer[int] = Field(default=16, gt=0)
    # None: the method's default (fedlora.methods.with_method_defaults)
    lr: Number[float | None] = Field(default=None, gt=0)
    optimizer: Word[Literal["adamw", "adam", "sgd"]] = "adamw"
    weight_decay: Number[float] = Field(default=0.0, ge=0)
    local_epochs: Number[float | None] = Field(default=None, gt=0)  # wins over local_steps when set
    grad_accum_steps: Integer[int] = Field(default=1, gt=0)
    lr_scheduler: Word[Literal["constant", "linear", "cosine"]] = "constant"
    warmup_ratio: Number[float] = Field(default=0.0, ge=0, lt=1)
    lr_schedule_scope: Word[Literal["round", "run"]] = "round"
    max_grad_norm: Number[float | None] = Field(default=None, gt=0)
    # sampled clients trained together in lockstep (1: one by one)
    client_parallel: Integer[int] = Field(default=1, ge=1)


class DPConfig(_Section):
    """Example-level DP-SGD on every client (``docs/privacy.md``); off unless a noise
    multiplier or a target epsilon is given, never both. Whether a target can be reached
    at all is checked with the accountant (:func:`fedlora.methods.check_config`)."""

    noise_multiplier: Number[float | None] = Field(default=None, ge=0)
    target_epsilon: Number[float | None] = Field(default=None, gt=0)
    delta: Number[float] = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: Number[float] = Field(default=1.0, gt=0)
    accountant: Word[Literal["rdp", "prv"]] = "rdp"
    secure_mode: Flag = False

    key_prefix = "dp."

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @model_validator(mode="after")
    def _one_budget(self) -> Self:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise FedLoraError(
                "give dp.noise_multiplier or dp.target_epsilon, not both "
                "(the target picks the noise)"
            )
        return self


class PrivacySection(_Section):
    doc_title = "dp"

    dp: DPConfig = Field(default_factory=lambda: DPConfig())


class OutputSection(_Section):
    doc_title = "Evaluation and outputs"

    eval_every: Integer[int] = Field(default=1, gt=0)
    eval_batch_size: Integer[int] = Field(default=64, gt=0)
    seed: Integer[int] = 0
    threads: Integer[int] = Field(default=1, gt=0)
    output_dir: Word[str] = "runs"
    run_name: Text = None
    overwrite: Flag = False
    progress: Flag = True


class FlowerSection(_Section):
    """``runtime=flower-sim`` / ``flower`` (docs/deployment.md)."""

    doc_title = "Flower runtimes"

    min_clients: Integer[int] = Field(default=1, gt=0)
    round_timeout: Number[float] = Field(default=600.0, gt=0)
    sim_actors: Integer[int] = Field(default=1, gt=0)
    sim_gpus: Number[float] = Field(default=0.0, ge=0)  # GPU share per ClientApp actor
    superlink: Text = None
    root_certificates: Text = None
    insecure: Flag = False
    fail_client_round: Listed[list[Integer[int]] | None] = None  # test hook: [client, round]

    @field_validator("fail_client_round")
    @classmethod
    def _client_and_round(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(value) != 2:
            raise ValueError(f"must be [client, round], got {value}")
        return value


# Bases in reverse: pydantic lists inherited fields from the last base to the first, so
# keys (and config.yaml) read model, data, federation, training, dp, outputs, Flower.
class Config(
    FlowerSection,
    OutputSection,
    PrivacySection,
    TrainingSection,
    FederationSection,
    DataSection,
    ModelSection,
):
    """All settings of one federated run. Defaults are the packaged demo (MiniLM, BBC News)."""

    doc_title = ""

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated again."""
        return Config.validated({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested values (``dp`` and schedule phases as dicts), as ``config.yaml``."""
        return self.model_dump()

    @model_validator(mode="after")
    def _check_across_sections(self) -> Self:
        dp = self.dp.enabled
        if self.eval_split != "dev" and self.task != "classification":
            raise FedLoraError("config key 'eval_split' needs task=classification (GLUE tasks)")
        if self.task == "causal-lm" and self.max_length < 2:
            raise FedLoraError(
                f"config key 'max_length' must be >= 2 for causal-lm, got {self.max_length}"
            )
        if self.runtime == "flower-sim" and self.device.startswith("cuda") and not self.sim_gpus:
            raise FedLoraError(
                f"device={self.device} on flower-sim needs sim_gpus > 0 (a GPU share per actor: "
                "Ray hides the GPUs from actors that asked for none)"
            )
        if self.precision == "fp16" and dp:
            raise FedLoraError(
                "precision=fp16 is not supported with dp.* (no loss scaling of per-example gradients); use precision=bf16"
            )
        if dp:  # DP-SGD's steps are what the accountant counts, and it clips per example
            for key, default in (("local_epochs", None), ("grad_accum_steps", 1)):
                if getattr(self, key) != default:
                    raise FedLoraError(f"config key '{key}' is not supported with dp.*")
            if self.max_grad_norm is not None:
                raise FedLoraError(
                    "config key 'max_grad_norm' is not supported with dp.* "
                    "(DP-SGD clips per example: dp.max_grad_norm)"
                )
        self._check_client_parallel()
        self._check_flower()
        if self.adapter == "dora" and dp:
            # Opacus has no per-example gradient for PEFT's DoRA magnitude, and DoRA's
            # forward passes an identity batch through the hooked lora_A/lora_B layers.
            raise FedLoraError("adapter=dora is not supported with dp.* (DP-SGD): use adapter=lora")
        if dp and self.task != "classification":
            # Refused rather than ignored: a run must never look private when it is not. The
            # causal-LM loss averages over the batch's tokens, so an example's gradient would
            # depend on the other examples' lengths and the clipping bound would not hold.
            raise FedLoraError(
                "dp.* (DP-SGD) runs with task=classification only: a causal-LM loss averages "
                f"over the batch's tokens, so per-example clipping would not bound an example (got task={self.task})"
            )
        return self

    def _check_client_parallel(self) -> None:
        """Clients in lockstep (fedlora.client.lockstep): what they cannot honour is refused
        here; what one method or round cannot (ranks, step counts, SLoRA's sparse rounds)
        trains one client after another at run time."""
        if self.client_parallel == 1:
            return
        refusals = (
            (
                self.runtime != "inprocess",
                f"runtime={self.runtime} (a ClientApp trains one client)",
            ),
            (self.dp.enabled, "dp.* (DP-SGD clips and noises each client's per-example gradients)"),
            (
                self.precision == "fp16",
                "precision=fp16 (one loss scaler would skip every client's step)",
            ),
            (self.adapter != "lora", f"adapter={self.adapter} (DoRA's norm is per client)"),
            (
                self.quantization != "none",
                f"quantization={self.quantization} (PEFT's bitsandbytes LoRA layers are not stacked)",
            ),
        )
        for refused, what in refusals:
            if refused:
                raise FedLoraError(f"config key 'client_parallel' > 1 is not supported with {what}")

    def _check_flower(self) -> None:
        sampled = max(1, round(self.client_fraction * self.num_clients))
        if self.min_clients > sampled:
            raise FedLoraError(
                f"config key 'min_clients' ({self.min_clients}) is more than the {sampled} clients "
                "sampled per round (client_fraction x num_clients)"
            )
        if self.runtime != "flower":
            return
        if not self.superlink:
            raise FedLoraError("runtime=flower needs superlink=HOST:PORT (the SuperLink's address)")
        if (self.root_certificates is None) == (not self.insecure):
            raise FedLoraError(
                "runtime=flower needs exactly one of root_certificates=<CA certificate> (TLS) "
                "or insecure=true (no TLS)"
            )
        if self.root_certificates is not None and not Path(self.root_certificates).is_file():
            raise FedLoraError(f"root_certificates file not found: {self.root_certificates}")


_SECTION_CLASSES: tuple[type[_Section], ...] = (
    ModelSection,
    DataSection,
    FederationSection,
    TrainingSection,
    PrivacySection,
    OutputSection,
    FlowerSection,
)
# Heading in docs/configuration.md -> the keys documented under it (dp's as `dp.<key>`).
SECTIONS: dict[str, tuple[str, ...]] = {
    s.doc_title: tuple(s.model_fields) for s in _SECTION_CLASSES if s is not PrivacySection
} | {PrivacySection.doc_title: tuple(f"dp.{k}" for k in DPConfig.model_fields)}


# --- one line per error ------------------------------------------------------------------

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}
# What a bound means, where the bound alone does not say it.
_BOUND_HINTS = {
    "max_client_eval_examples": "0: no per-client evaluation",
    "hetlora_gamma": "1: no rank pruning",
}


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``dp: DPConfig``, ``schedule: list[Phase] | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_at(model: type[BaseModel], path: tuple[int | str, ...]) -> FieldInfo | None:
    owner: type[BaseModel] | None = model
    field = None
    for part in path:
        if isinstance(part, int):
            continue
        if owner is None or part not in owner.model_fields:
            return None
        field = owner.model_fields[part]
        owner = _model_in(field.annotation)
    return field


def _choices(annotation: Any) -> list[str]:
    return [str(a) for a in get_args(annotation) if a is not type(None)]


_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # pydantic's names for Field's bounds


def _bounds(field: FieldInfo | None, error: ErrorDetails) -> str:
    """``>= 1``, ``in (0, 1]``, ``a finite number >= 0``: the field's declared bounds."""
    metadata = field.metadata if field is not None else []
    value = {name: getattr(m, name) for m in metadata for name in _OPS if hasattr(m, name)}
    if not value:  # a bound pydantic knows but the field does not show
        value = {k: v for k, v in (error.get("ctx") or {}).items() if k in _OPS}
    low = next((k for k in ("gt", "ge") if k in value), None)
    high = next((k for k in ("lt", "le") if k in value), None)
    if low is not None and high is not None:
        left = "(" if low == "gt" else "["
        right = ")" if high == "lt" else "]"
        return f"in {left}{value[low]:g}, {value[high]:g}{right}"
    finite = any(getattr(m, "allow_inf_nan", True) is False for m in metadata)
    text = " ".join(f"{_OPS[k]} {v:g}" for k, v in value.items())
    return f"a finite number {text}" if finite else text


def _message(error: ErrorDetails, model: type[BaseModel]) -> str:
    loc = error["loc"]
    kind, value = error["type"], error["input"]
    prefix = getattr(model, "key_prefix", "")
    key = prefix + ".".join(str(p) for p in loc if not isinstance(p, int))
    if kind == "extra_forbidden":
        parent = _field_at(model, loc[:-1])
        owner = model if len(loc) == 1 else _model_in(parent.annotation) if parent else None
        known = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown config key '{key}' ({hint}known keys: {', '.join(known)})"
    field = _field_at(model, loc)
    if kind == "literal_error":
        choices = _choices(field.annotation) if field is not None else []
        return f"config key '{key}' must be one of {', '.join(choices)}; got '{value}'"
    if kind in (
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "finite_number",
    ):
        note = f" ({_BOUND_HINTS[key]})" if key in _BOUND_HINTS else ""
        return f"config key '{key}' must be {_bounds(field, error)}{note}, got {value}"
    if kind in _TYPE_WORDS:
        return f"config key '{key}' must be {_TYPE_WORDS[kind]}, got {value!r}"
    if kind == "missing":
        return f"config key '{key}' is required"
    if kind == "value_error":
        return f"config key '{key}' {(error.get('ctx') or {}).get('error', error['msg'])}"
    return f"config key '{key}': {error['msg']}"


def one_line(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first of pydantic's errors as one line naming the key (unknown keys first)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    return _message(errors[0], model).replace("\n", " ")


# --- loading -----------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["rank=4", "dp.delta=1e-5", "layers=[3,4,5]"]`` -> nested dict, values parsed as YAML."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FedLoraError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise FedLoraError(f"override '{item}': value is not valid YAML") from None
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FedLoraError(f"override '{item}' conflicts with another override of '{part}'")
        node[leaf] = value
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FedLoraError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise FedLoraError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FedLoraError(f"config file {path} must hold a mapping of keys to values")
    return data


# Defaults that differ by task, applied where neither the file nor an override sets the key.
# A causal LM costs ~10x a MiniLM step per token on a CPU (SmolLM2-135M: one step of
# 16 x 128 tokens took over a minute here, one evaluation ~1 s per example): these keep a
# first run to a few minutes (docs/configuration.md, "Defaults").
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal-lm": {
        "batch_size": 4,
        "max_length": 64,
        "max_test_examples": 100,
        "max_client_eval_examples": 25,
    },
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults (the task's, see :data:`TASK_DEFAULTS`), then the YAML file at ``path``,
    then ``key=value`` overrides. Method-specific rules are not checked here:
    :func:`fedlora.methods.check_config`."""
    values = read_yaml(path) if path is not None else {}
    values = _merge(values, parse_overrides(overrides or []))
    task = values.get("task", Config.model_fields["task"].default)
    if isinstance(task, str):
        values = {**TASK_DEFAULTS.get(task, {}), **values}
    return Config.validated(values)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved as ``config.yaml`` (validated like any other)."""
    return Config.validated(values)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
