"""Run configuration: a YAML file plus ``key=value`` overrides, validated on load.

Every key is a field of :class:`Config` (nested sections such as ``dp`` are frozen
dataclasses of their own, addressed on the command line as ``dp.delta=1e-5``).
An unknown key or a bad value raises :class:`~fedlora.errors.FedLoraError` with a
one-line message; the CLI prints it and exits non-zero. ``docs/configuration.md``
documents each key.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin

import yaml

from fedlora.errors import FedLoraError

OPTIMIZERS = ("adamw", "adam", "sgd")
PARTITIONS = ("iid", "dirichlet", "imbalanced", "natural")
WEIGHTINGS = ("method", "uniform", "num_examples")
CLIENT_ALPHAS = ("fixed", "proportional")
LR_SCHEDULERS = ("constant", "linear", "cosine")
LR_SCOPES = ("round", "run")
HEAD_POLICIES = ("train", "frozen")
RUNTIMES = ("inprocess", "flower-sim", "flower")
TASKS = ("classification", "causal-lm")
BASE_DTYPES = ("float32", "bfloat16")
PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PREFIX_CACHE_MODES = ("auto", "on", "off")  # fedlora.models.prefix
FOLDING_METHODS = ("fedex", "flora", "slora")  # add increments to the frozen weights
HETERO_RANK_METHODS = ("flora", "flexlora", "hetlora")  # take client_ranks
EVAL_SPLITS = ("dev", "test")
ADAPTERS = ("lora", "dora")  # dora: PEFT use_dora, a magnitude vector per layer


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of ``method: schedule``: ``method`` for ``rounds`` rounds (None: to the end)."""

    method: str
    rounds: int | None = None


SCHEDULABLE = ("fedavg", "ffa", "rolora", "fra", "fedex")


ACCOUNTANTS = ("rdp", "prv")


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Example-level DP-SGD on every client (``docs/privacy.md``); off unless a noise
    multiplier or a target epsilon is given, never both."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    secure_mode: bool = False

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise FedLoraError(
                "give dp.noise_multiplier or dp.target_epsilon, not both "
                "(the target picks the noise)"
            )
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise FedLoraError(
                f"config key 'dp.noise_multiplier' must be >= 0, got {self.noise_multiplier}"
            )
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise FedLoraError(
                f"config key 'dp.target_epsilon' must be > 0, got {self.target_epsilon}"
            )
        if not 0.0 < self.delta < 1.0:
            raise FedLoraError(f"config key 'dp.delta' must be in (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise FedLoraError(
                f"config key 'dp.max_grad_norm' must be > 0, got {self.max_grad_norm}"
            )
        if self.accountant not in ACCOUNTANTS:
            raise FedLoraError(
                f"config key 'dp.accountant' must be one of {', '.join(ACCOUNTANTS)}; got '{self.accountant}'"
            )
        if self.target_epsilon is not None:
            # Imported here: Opacus is only loaded by runs that ask for a privacy budget.
            from fedlora.privacy.accounting import check_target_reachable

            check_target_reachable(
                target_epsilon=self.target_epsilon, delta=self.delta, accountant=self.accountant
            )


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings of one federated run. Defaults are the packaged demo (MiniLM, BBC News)."""

    # Model and LoRA
    model: str = "minilm"
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    adapter: str = "lora"
    target_modules: list[str] | None = None
    layers: list[int] | None = None
    head: str = "train"
    # Where and how the base model computes (docs/configuration.md, "Device and precision")
    device: str = "auto"
    precision: str = "fp32"
    base_dtype: str = "float32"
    quantization: str = "none"
    bnb_double_quant: bool = True
    bnb_compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    prefix_cache: str = "auto"  # keep the hidden states below the first LoRA block per example
    # Decoder LLMs (task=causal-lm; docs/llm.md)
    task: str = "classification"
    lora_mlp: bool = False
    chat_template: bool = True
    verbalizer: list[str] | None = None
    # Data
    dataset: str = "bbc-news"
    data_dir: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    group_column: str | None = None
    encoding: str = "utf-8"
    test_fraction: float = 0.2
    eval_fraction: float = 0.1
    max_client_eval_examples: int | None = 200
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    eval_split: str = "dev"  # test: a local GLUE task's labelled test.tsv (final figures only)
    max_length: int = 128
    # Federation
    num_clients: int = 3
    partition: str = "dirichlet"
    partition_alpha: float = 0.5
    dominant_fraction: float = 0.8
    client_fraction: float = 1.0
    weighting: str = "method"
    method: str = "rolora"
    methods: list[str] = dataclasses.field(
        default_factory=lambda: ["fedavg", "ffa", "rolora", "fra", "centralized"]
    )
    rounds: int = 10
    runtime: str = "inprocess"
    client_ranks: list[int] | None = None
    client_alpha: str = "fixed"
    hetlora_gamma: float = 0.99  # HetLoRA's decay factor: rank self-pruning (1: none)
    fair_lambda: float = 0.01  # lorafair: the weight of ||dB|| (LoRA-FAIR's lambda)
    schedule: list[Phase] | None = None
    slora_rounds: int = 2  # slora: rounds of sparse fine-tuning before LoRA (its stage 1)
    slora_density: float = 0.01  # slora: share of each target weight's entries it trains
    # Client training
    local_steps: int = 10
    batch_size: int = 16
    lr: float | None = None  # None: the method's default (fedlora.methods.with_method_defaults)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    local_epochs: float | None = None  # wins over local_steps when set
    grad_accum_steps: int = 1
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    lr_schedule_scope: str = "round"
    max_grad_norm: float | None = None
    client_parallel: int = 1  # sampled clients trained together in lockstep (1: one by one)
    # Differential privacy (nested: dp.noise_multiplier=1.0, dp.target_epsilon=3, ...)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    # Evaluation and outputs
    eval_every: int = 1
    eval_batch_size: int = 64
    seed: int = 0
    threads: int = 1
    output_dir: str = "runs"
    run_name: str | None = None
    overwrite: bool = False
    progress: bool = True
    # Flower runtimes (runtime=flower-sim / flower); see docs/deployment.md
    min_clients: int = 1
    round_timeout: float = 600.0
    sim_actors: int = 1
    sim_gpus: float = 0.0  # flower-sim: GPU share per ClientApp actor (Flower client_resources)
    superlink: str | None = None
    root_certificates: str | None = None
    insecure: bool = False
    fail_client_round: list[int] | None = None  # test hook: [client, round] raises there

    def __post_init__(self) -> None:
        _check_values(self)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise FedLoraError(f"config key '{name}' must be > 0, got {value}")


def _choice(cfg: Config, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise FedLoraError(
            f"config key '{name}' must be one of {', '.join(choices)}; got '{value}'"
        )


def _check_values(cfg: Config) -> None:
    # Imported here: the method registry imports modules that import this one.
    from fedlora.methods import METHOD_NAMES

    if cfg.rank < 1:
        raise FedLoraError(f"config key 'rank' must be >= 1, got {cfg.rank}")
    _positive(cfg, "alpha", "num_clients", "rounds", "local_steps", "batch_size", "lr")
    _positive(cfg, "eval_every", "eval_batch_size", "threads", "max_length", "partition_alpha")
    _positive(cfg, "max_train_examples", "max_test_examples")
    if cfg.max_client_eval_examples is not None and cfg.max_client_eval_examples < 0:
        raise FedLoraError(
            "config key 'max_client_eval_examples' must be >= 0 (0: no per-client evaluation), "
            f"got {cfg.max_client_eval_examples}"
        )
    for name in ("test_fraction", "eval_fraction", "lora_dropout"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise FedLoraError(f"config key '{name}' must be in [0, 1), got {value}")
    # 1.0 is a client holding only its dominant class; 0 would give it none of it.
    if not 0.0 < cfg.dominant_fraction <= 1.0:
        raise FedLoraError(
            f"config key 'dominant_fraction' must be in (0, 1], got {cfg.dominant_fraction}"
        )
    _check_encoding(cfg)
    if not 0.0 < cfg.client_fraction <= 1.0:
        raise FedLoraError(
            f"config key 'client_fraction' must be in (0, 1], got {cfg.client_fraction}"
        )
    if cfg.weight_decay < 0:
        raise FedLoraError(f"config key 'weight_decay' must be >= 0, got {cfg.weight_decay}")
    _choice(cfg, "optimizer", OPTIMIZERS)
    _choice(cfg, "partition", PARTITIONS)
    _choice(cfg, "eval_split", EVAL_SPLITS)
    if cfg.eval_split != "dev" and cfg.task != "classification":
        raise FedLoraError("config key 'eval_split' needs task=classification (GLUE tasks)")
    _choice(cfg, "weighting", WEIGHTINGS)
    _choice(cfg, "client_alpha", CLIENT_ALPHAS)
    _check_training_controls(cfg)
    _check_device_options(cfg)
    _choice(cfg, "head", HEAD_POLICIES)
    _choice(cfg, "runtime", RUNTIMES)
    _check_flower_options(cfg)
    _check_task_options(cfg)
    for method in [cfg.method, *cfg.methods]:
        if method not in METHOD_NAMES:
            raise FedLoraError(f"unknown method '{method}' (known: {', '.join(METHOD_NAMES)})")
    if not cfg.methods:
        raise FedLoraError("config key 'methods' must name at least one method")
    _check_method_options(cfg)
    _check_adapter(cfg)
    if cfg.layers is not None and (not cfg.layers or min(cfg.layers) < 0):
        raise FedLoraError(
            f"config key 'layers' must be a non-empty list of block indices >= 0, got {cfg.layers}"
        )
    if cfg.target_modules is not None and not cfg.target_modules:
        raise FedLoraError("config key 'target_modules' must not be an empty list")
    if cfg.dp.enabled and cfg.task != "classification":
        # Refused rather than ignored: a run must never look private when it is not. The
        # causal-LM loss averages over the batch's tokens, so an example's gradient would
        # depend on the other examples' lengths and the clipping bound would not hold.
        raise FedLoraError(
            "dp.* (DP-SGD) runs with task=classification only: a causal-LM loss averages "
            f"over the batch's tokens, so per-example clipping would not bound an example (got task={cfg.task})"
        )


def _check_encoding(cfg: Config) -> None:
    """Fail at load, not after the model is built, on a codec the data files cannot be
    read with: ``codecs.lookup`` finds bytes-to-bytes codecs too (``rot13``, ``zlib``),
    which ``str.encode`` refuses (``b"".decode`` would not: it skips the lookup)."""
    try:
        codecs.lookup(cfg.encoding)
        "a".encode(cfg.encoding)
    except (LookupError, UnicodeError):
        raise FedLoraError(
            f"config key 'encoding' must name a text encoding (e.g. utf-8, latin-1, cp1252, "
            f"utf-16), got '{cfg.encoding}'"
        ) from None


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_device_options(cfg: Config) -> None:
    if not _DEVICE.fullmatch(cfg.device):
        raise FedLoraError(
            f"config key 'device' must be auto, cpu, cuda, cuda:N or mps; got '{cfg.device}'"
        )
    _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "quantization", QUANTIZATIONS)
    _choice(cfg, "bnb_compute_dtype", COMPUTE_DTYPES)
    _choice(cfg, "prefix_cache", PREFIX_CACHE_MODES)
    if cfg.prefix_cache == "on" and (cfg.layers is None or 0 in cfg.layers):
        raise FedLoraError(
            "prefix_cache=on needs LoRA above block 0, so that the blocks below it are frozen: "
            f"set layers=[...] without 0 (got layers={cfg.layers})"
        )
    if cfg.sim_gpus < 0:
        raise FedLoraError(f"config key 'sim_gpus' must be >= 0, got {cfg.sim_gpus}")
    if cfg.runtime == "flower-sim" and cfg.device.startswith("cuda") and cfg.sim_gpus == 0:
        raise FedLoraError(
            f"device={cfg.device} on flower-sim needs sim_gpus > 0 (a GPU share per actor: "
            "Ray hides the GPUs from actors that asked for none)"
        )
    if cfg.precision == "fp16" and cfg.dp.enabled:
        raise FedLoraError(
            "precision=fp16 is not supported with dp.* (no loss scaling of per-example gradients); use precision=bf16"
        )
    if cfg.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise FedLoraError(
            f"quantization={cfg.quantization} needs bitsandbytes (pip install bitsandbytes==0.50.2)"
        )
    if cfg.quantization == "none":
        return
    phases = [p.method for p in cfg.schedule or []]
    folding = sorted({cfg.method, *cfg.methods, *phases} & set(FOLDING_METHODS))
    if folding:
        raise FedLoraError(
            f"method {', '.join(folding)} folds increments into the frozen weights, which a "
            f"quantized ({cfg.quantization}) base cannot hold exactly: use quantization=none, "
            "or a method that keeps its update in the adapter (fedavg, ffa, rolora, fra)"
        )


def _check_training_controls(cfg: Config) -> None:
    _positive(cfg, "local_epochs", "grad_accum_steps", "max_grad_norm")
    _choice(cfg, "lr_scheduler", LR_SCHEDULERS)
    _choice(cfg, "lr_schedule_scope", LR_SCOPES)
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise FedLoraError(f"config key 'warmup_ratio' must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.dp.enabled:
        # DP-SGD's steps are what the accountant counts, and it clips per example itself.
        for key, default in (
            ("local_epochs", None),
            ("grad_accum_steps", 1),
            ("max_grad_norm", None),
        ):
            if getattr(cfg, key) != default:
                hint = (
                    " (DP-SGD clips per example: dp.max_grad_norm)"
                    if key == "max_grad_norm"
                    else ""
                )
                raise FedLoraError(f"config key '{key}' is not supported with dp.*{hint}")
    _check_client_parallel(cfg)


def _check_client_parallel(cfg: Config) -> None:
    """Clients in lockstep (fedlora.client.lockstep): what they cannot honour is refused here;
    what one method or round cannot (ranks, step counts, SLoRA's sparse rounds) trains one
    client after another at run time."""
    if isinstance(cfg.client_parallel, bool) or not isinstance(cfg.client_parallel, int):
        raise FedLoraError(
            f"config key 'client_parallel' must be an integer >= 1, got {cfg.client_parallel!r}"
        )
    if cfg.client_parallel < 1:
        raise FedLoraError(f"config key 'client_parallel' must be >= 1, got {cfg.client_parallel}")
    if cfg.client_parallel == 1:
        return
    refusals = (
        (cfg.runtime != "inprocess", f"runtime={cfg.runtime} (a ClientApp trains one client)"),
        (cfg.dp.enabled, "dp.* (DP-SGD clips and noises each client's per-example gradients)"),
        (
            cfg.precision == "fp16",
            "precision=fp16 (one loss scaler would skip every client's step)",
        ),
        (cfg.adapter != "lora", f"adapter={cfg.adapter} (DoRA's norm is per client)"),
        (
            cfg.quantization != "none",
            f"quantization={cfg.quantization} (PEFT's bitsandbytes LoRA layers are not stacked)",
        ),
    )
    for refused, what in refusals:
        if refused:
            raise FedLoraError(f"config key 'client_parallel' > 1 is not supported with {what}")


def _check_method_options(cfg: Config) -> None:
    used = {cfg.method, *cfg.methods}
    if not 0.0 <= cfg.fair_lambda < float("inf"):  # also refuses nan
        raise FedLoraError(
            f"config key 'fair_lambda' must be a finite number >= 0, got {cfg.fair_lambda}"
        )
    if cfg.client_ranks is not None:
        if not used & set(HETERO_RANK_METHODS):
            raise FedLoraError(
                "config key 'client_ranks' needs a method with per-client ranks "
                f"({', '.join(HETERO_RANK_METHODS)})"
            )
        if len(cfg.client_ranks) != cfg.num_clients or min(cfg.client_ranks) < 1:
            raise FedLoraError(
                f"config key 'client_ranks' must list one rank >= 1 per client ({cfg.num_clients}), "
                f"got {cfg.client_ranks}"
            )
    if not 0.0 < cfg.hetlora_gamma <= 1.0:  # also refuses nan
        raise FedLoraError(
            f"config key 'hetlora_gamma' must be in (0, 1] (1: no rank pruning), got {cfg.hetlora_gamma}"
        )
    if "schedule" in used and not cfg.schedule:
        raise FedLoraError(
            "method 'schedule' needs config key 'schedule': a list of {method, rounds} phases"
        )
    for i, phase in enumerate(cfg.schedule or []):
        if phase.method not in SCHEDULABLE:
            raise FedLoraError(
                f"schedule phase {i + 1}: method '{phase.method}' cannot be scheduled "
                f"(allowed: {', '.join(SCHEDULABLE)})"
            )
        last = i == len(cfg.schedule or []) - 1
        if phase.rounds is None and not last:
            raise FedLoraError(
                f"schedule phase {i + 1} ({phase.method}) needs 'rounds' (only the last may omit it)"
            )
        if phase.rounds is not None and phase.rounds < 1:
            raise FedLoraError(f"schedule phase {i + 1} ({phase.method}): rounds must be >= 1")
    _check_slora(cfg, used)


def _check_slora(cfg: Config, used: set[str]) -> None:
    if cfg.slora_rounds < 1:
        raise FedLoraError(f"config key 'slora_rounds' must be >= 1, got {cfg.slora_rounds}")
    if not 0.0 < cfg.slora_density <= 1.0:  # also refuses nan
        raise FedLoraError(f"config key 'slora_density' must be in (0, 1], got {cfg.slora_density}")
    if "slora" not in used:
        return
    if cfg.slora_rounds >= cfg.rounds:
        raise FedLoraError(
            f"config key 'slora_rounds' ({cfg.slora_rounds}) must be less than rounds "
            f"({cfg.rounds}): SLoRA's LoRA stage needs at least one round"
        )
    if cfg.dp.enabled:
        raise FedLoraError(
            "method slora is not supported with dp.* (DP-SGD trains LoRA factors; SLoRA's "
            "first stage trains the frozen weights)"
        )


def _check_adapter(cfg: Config) -> None:
    """DoRA needs a method whose frozen weights stay the pretrained ones (the magnitude is
    relative to ``||W0 + s B A||``; a fold changes ``W0`` under it): the method's own
    ``carries_magnitude`` says whether it does."""
    from fedlora.methods import build_method

    _choice(cfg, "adapter", ADAPTERS)
    if cfg.adapter == "lora":
        return
    if cfg.dp.enabled:
        # Opacus has no per-example gradient for PEFT's DoRA magnitude, and DoRA's forward
        # passes an identity batch through the hooked lora_A/lora_B layers.
        raise FedLoraError("adapter=dora is not supported with dp.* (DP-SGD): use adapter=lora")
    phases = [p.method for p in cfg.schedule or []]
    for name in dict.fromkeys([cfg.method, *cfg.methods, *phases]):
        method = build_method(name, cfg)
        if not method.carries_magnitude:
            raise FedLoraError(
                f"adapter=dora cannot run with method {name}: {method.magnitude_refusal}; "
                "use adapter=lora"
            )


def _check_flower_options(cfg: Config) -> None:
    _positive(cfg, "min_clients", "round_timeout", "sim_actors")
    sampled = max(1, round(cfg.client_fraction * cfg.num_clients))
    if cfg.min_clients > sampled:
        raise FedLoraError(
            f"config key 'min_clients' ({cfg.min_clients}) is more than the {sampled} clients "
            "sampled per round (client_fraction x num_clients)"
        )
    if cfg.fail_client_round is not None and len(cfg.fail_client_round) != 2:
        raise FedLoraError(
            f"config key 'fail_client_round' must be [client, round], got {cfg.fail_client_round}"
        )
    if cfg.runtime == "inprocess":
        return
    if cfg.method == "centralized":
        raise FedLoraError(
            "method 'centralized' pools every client's data on one trainer: it runs with "
            "runtime=inprocess only"
        )
    if cfg.runtime == "flower":
        if not cfg.superlink:
            raise FedLoraError("runtime=flower needs superlink=HOST:PORT (the SuperLink's address)")
        if (cfg.root_certificates is None) == (not cfg.insecure):
            raise FedLoraError(
                "runtime=flower needs exactly one of root_certificates=<CA certificate> (TLS) "
                "or insecure=true (no TLS)"
            )
        if cfg.root_certificates is not None and not Path(cfg.root_certificates).is_file():
            raise FedLoraError(f"root_certificates file not found: {cfg.root_certificates}")


def _check_task_options(cfg: Config) -> None:
    _choice(cfg, "task", TASKS)
    _choice(cfg, "base_dtype", BASE_DTYPES)
    if cfg.task == "causal-lm":
        if cfg.max_length < 2:
            raise FedLoraError(
                f"config key 'max_length' must be >= 2 for causal-lm, got {cfg.max_length}"
            )
        return
    for name, default in (("lora_mlp", False), ("verbalizer", None)):
        if getattr(cfg, name) != default:
            raise FedLoraError(f"config key '{name}' needs task=causal-lm")


# --- loading -----------------------------------------------------------------------------


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (the subset of types Config uses)."""
    origin = get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [a for a in options if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `layers=5` or `target_modules=query` mean a one-element list
        if not isinstance(value, list):
            raise FedLoraError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if origin is Literal:
        if value not in get_args(annotation):
            raise FedLoraError(
                f"config key '{key}' must be one of {get_args(annotation)}, got {value!r}"
            )
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise FedLoraError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(cast(type, annotation), value, prefix=f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise FedLoraError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedLoraError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedLoraError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            # an override `key=none` parses as null; a string key cannot be null, so it
            # means the word (`quantization=none`; elsewhere a bad choice names it)
            return "none"
        if isinstance(value, bool):
            # YAML 1.1 reads on/off (and yes/no, true/false) as booleans; a string key means
            # the word its choices use (`prefix_cache=on`; elsewhere a bad choice names it)
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise FedLoraError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if annotation is Any:
        return value
    raise TypeError(f"unsupported annotation for '{key}': {annotation}")  # a bug, not user input


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FedLoraError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


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
    then ``key=value`` overrides."""
    values = read_yaml(path) if path is not None else {}
    values = _merge(values, parse_overrides(overrides or []))
    task = values.get("task", Config.task)
    if isinstance(task, str):
        values = {**TASK_DEFAULTS.get(task, {}), **values}
    return _build(Config, values)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved as ``config.yaml`` (validated like any other)."""
    return _build(Config, values)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
