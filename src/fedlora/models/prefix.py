"""The frozen prefix of a transformer, computed once per example (config key ``prefix_cache``).

When LoRA and every other trained tensor sit in blocks ``L0..`` only, the embeddings and
blocks ``0..L0-1`` are a fixed function of an example's tokens, so the hidden states
entering block ``L0`` are the same in every step and round:

    h_i = f_{L0-1}( ... f_0( embed(x_i) ) )          computed once per example i
    y_i = head( f_{N-1}( ... f_{L0}(h_i) ) )         every forward pass

``h_i`` is computed the first time example ``i`` is used (in a training batch or an
evaluation) and kept; every later forward pass runs blocks ``L0..`` only. Examples a run
never draws cost nothing.

**Dropout in the embeddings and in blocks ``0..L0-1`` is off** (``p = 0``) in a model whose
prefix is cached, for the whole run: a cache holds one value per example where dropout
would draw a new mask every step. A cached run therefore equals an *uncached* run of the
same model with that dropout off (tested to 1e-5 in float32, training and evaluation);
dropout in blocks ``L0..`` and in the head is untouched.

How it runs. A :class:`Family` names, for one architecture family, the module whose output
enters block 0 (the embeddings) and the list of blocks. Filling the cache runs the model's
own forward pass and stops at block ``L0`` (a forward pre-hook takes its input). A cached
forward pass is the model's own forward pass with the embeddings' output replaced by the
cached states and the block list cut to blocks ``L0..``, so the attention masks, rotary
position embeddings, head and loss are the model's own code. A family is listed only once
its body's ``forward`` has been read for the installed transformers: it must pass the
embeddings' output to block 0 unchanged and loop over the block list without using a
block's position in it (Qwen2 indexes per-layer attention types by position: not listed).

Storage. A split's states are one ragged tensor of its real tokens (right padding is not
stored: ``sum of lengths x hidden``), in the dtype the prefix produces (the base dtype),
reserved for the whole split at its first use: on the model's device while the run's
states fit in half of the memory free there when the cache is planned, else in a
memory-mapped file in a temporary directory (removed with the :class:`FrozenPrefix`). The
log says which, and when a split spills. Held states are dropped when a weight below block
``L0`` changes in place (torch's version counters are compared before each use).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from fedlora.data.encode import Encoded
    from fedlora.models.adapter import PeftAdapter

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps the module feeding block 0 and its blocks, as
    attribute paths of the transformer body (``BertModel``, ``LlamaModel``)."""

    name: str
    model_types: tuple[str, ...]
    embeddings: str
    blocks: str


FAMILIES = (
    # BertModel/RobertaModel.forward: embeddings(...) -> encoder, which loops over encoder.layer
    Family("bert", ("bert", "roberta"), embeddings="embeddings", blocks="encoder.layer"),
    # LlamaModel/MistralModel.forward: embed_tokens(input_ids) -> one mask and rotary
    # embeddings for all blocks -> loop over layers
    Family("llama", ("llama", "mistral"), embeddings="embed_tokens", blocks="layers"),
)


def _family(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def _known() -> str:
    return ", ".join(t for f in FAMILIES for t in f.model_types)


class _Reached(Exception):
    """Raised by the pre-hook on block L0 once it holds the block's input."""


def _device_budget(device: torch.device) -> int:
    """Half of the memory free on ``device`` now (bytes)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2**30  # no way to tell: 1 GiB, then memory-mapped


class FrozenPrefix:
    """Blocks ``0..start-1`` of one PEFT model, whose outputs its splits cache.

    Built by :func:`plan_prefix_cache`; :meth:`attach` gives a split its (empty) cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        family: Family,
        start: int,
        budget_bytes: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.family = family
        self.start = start
        self.body = _body(model)
        self.embeddings: torch.nn.Module = self.body.get_submodule(family.embeddings)
        owner_path, _, self._blocks_name = family.blocks.rpartition(".")
        self._blocks_owner = self.body.get_submodule(owner_path) if owner_path else self.body
        self.blocks: torch.nn.ModuleList = getattr(self._blocks_owner, self._blocks_name)
        self.device = next(model.parameters()).device
        self.budget = _device_budget(self.device) if budget_bytes is None else budget_bytes
        self.used = 0  # bytes of states held on the device
        self.log = log or (lambda message: None)
        self._spill_dir: Path | None = None
        self._disable_dropout()

    def describe(self) -> str:
        blocks = "block 0" if self.start == 1 else f"blocks 0-{self.start - 1}"
        return (
            f"prefix cache: on: the embeddings and {blocks} of {len(self.blocks)} carry no LoRA; "
            f"the hidden states entering block {self.start} are kept per example from its "
            f"first use, on {self.device} up to {self.budget / 1e6:.0f} MB, memory-mapped "
            f"beyond; dropout in the embeddings and {blocks} is off"
        )

    def _disable_dropout(self) -> None:
        # A cache holds one value per example; dropout here would draw a new one each step.
        for part in (self.embeddings, *self.blocks[: self.start]):
            for module in part.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                if isinstance(getattr(module, "attention_dropout", None), float):
                    module.attention_dropout = 0.0  # type: ignore[assignment]  # Llama's float

    def attach(self, data: Encoded) -> Encoded:
        """``data`` carrying an empty cache of its states (filled as rows are used)."""
        return dataclasses.replace(data, prefix=PrefixStates.empty(self, data))

    def version(self) -> tuple[tuple[int, int], ...]:
        """Where the prefix's weights live and how often each was changed in place (torch's
        version counter): held states are valid while this is unchanged."""
        return tuple(
            (p.data_ptr(), p._version)
            for part in (self.embeddings, *self.blocks[: self.start])
            for p in part.parameters()
        )

    # -- computing states -----------------------------------------------------------------

    @torch.no_grad()
    def compute(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The hidden states entering block ``start`` for a batch of model inputs: the
        model's own forward pass, stopped there."""
        held: list[torch.Tensor] = []

        def take(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            held.append(args[0] if args else kwargs["hidden_states"])
            raise _Reached

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        handle = self.blocks[self.start].register_forward_pre_hook(take, with_kwargs=True)
        try:
            self.body(**inputs)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not held:
            raise RuntimeError(f"block {self.start} was not reached by the forward pass")
        return held[0].detach()

    # -- running the suffix -----------------------------------------------------------------

    @contextlib.contextmanager
    def feeding(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within: a forward pass of the model takes ``hidden`` as the input of block
        ``start`` and runs blocks ``start..`` only."""
        blocks = self.blocks

        def cached(*args: Any, **kwargs: Any) -> torch.Tensor:
            ids = args[0] if args else kwargs.get("input_ids")
            if ids is not None and tuple(ids.shape) != tuple(hidden.shape[:2]):
                raise RuntimeError(
                    f"cached states of shape {tuple(hidden.shape)} fed to a batch of {tuple(ids.shape)}"
                )
            return hidden

        self.embeddings.forward = cached  # type: ignore[method-assign]
        setattr(self._blocks_owner, self._blocks_name, torch.nn.ModuleList(blocks[self.start :]))
        try:
            yield
        finally:
            del self.embeddings.forward  # the class's forward again
            setattr(self._blocks_owner, self._blocks_name, blocks)

    # -- storage ----------------------------------------------------------------------------

    def storage(self, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``rows x width`` tensor for one split: on the device while the budget lasts,
        else memory-mapped (its pages are written as rows are filled)."""
        nbytes = rows * width * torch.empty((), dtype=dtype).element_size()
        if self.used + nbytes <= self.budget:
            self.used += nbytes
            return torch.empty((rows, width), dtype=dtype, device=self.device)
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="fedlora-prefix-"))
            weakref.finalize(self, shutil.rmtree, self._spill_dir, ignore_errors=True)
        path = self._spill_dir / f"split{len(list(self._spill_dir.iterdir()))}.bin"
        self.log(
            f"prefix cache: {rows} token states ({nbytes / 1e6:.1f} MB) memory-mapped at {path}: "
            f"the {self.budget / 1e6:.0f} MB on {self.device} are taken ({self.used / 1e6:.1f} MB)"
        )
        # numpy has no bfloat16: the file holds raw 16-bit words, viewed as the dtype.
        raw = torch.empty((), dtype=dtype).element_size()
        np_dtype = {2: np.int16, 4: np.float32, 8: np.float64}[raw]
        mapped = np.memmap(path, dtype=np_dtype, mode="w+", shape=(rows, width))
        tensor = torch.from_numpy(mapped)
        return tensor if tensor.dtype == dtype else tensor.view(dtype)


def _body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (``BertModel``, ``LlamaModel``) under a PEFT model and its head."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    body = getattr(inner, "base_model", inner)  # transformers: the body under the task head
    return cast(torch.nn.Module, body)


def _blocks(body: torch.nn.Module, family: Family) -> torch.nn.ModuleList:
    return cast(torch.nn.ModuleList, body.get_submodule(family.blocks))


@dataclass(eq=False)
class PrefixStates:
    """The cached states of one split: row ``i`` holds ``lengths[i]`` token states from
    ``starts[i]`` of ``storage`` once ``filled[i]``."""

    prefix: FrozenPrefix
    starts: torch.Tensor
    lengths: torch.Tensor
    filled: torch.Tensor
    storage: torch.Tensor | None = field(default=None, repr=False)
    version: tuple[tuple[int, int], ...] = ()

    @classmethod
    def empty(cls, prefix: FrozenPrefix, data: Encoded) -> PrefixStates:
        mask = data.attention_mask
        lengths = mask.sum(dim=1).to(torch.long)
        width = mask.shape[1] if mask.ndim == 2 else 0
        if not bool((mask == (torch.arange(width) < lengths[:, None])).all()):
            # the states of row i are its first lengths[i] positions: right padding only
            raise FedLoraError("prefix_cache needs right-padded splits; this one is not")
        starts = torch.cumsum(lengths, 0) - lengths
        return cls(prefix, starts, lengths, torch.zeros(len(lengths), dtype=torch.bool))

    @property
    def held(self) -> int:
        """Rows whose states are held."""
        return int(self.filled.sum())

    def _positions(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of real positions in a ``len(rows) x width`` batch, their storage rows)."""
        real = torch.arange(width) < self.lengths[rows][:, None]
        return real, (self.starts[rows][:, None] + torch.arange(width))[real]

    def fill(self, data: Encoded, rows: torch.Tensor) -> None:
        """Compute and keep the states of ``rows`` not yet held."""
        version = self.prefix.version()
        if version != self.version:
            # a frozen weight below block `start` changed in place: what is held is stale
            self.filled[:] = False
            self.version = version
        todo = rows[~self.filled[rows]].unique()
        if len(todo) == 0:
            return
        batch = data.batch(todo)
        device = self.prefix.device
        hidden = self.prefix.compute({k: v.to(device) for k, v in batch.items()})
        if self.storage is None:
            total = int(self.lengths.sum())
            self.storage = self.prefix.storage(total, hidden.shape[-1], hidden.dtype)
        real, where = self._positions(todo, hidden.shape[1])
        self.storage[where.to(self.storage.device)] = hidden[real.to(device)].to(
            self.storage.device
        )
        self.filled[todo] = True

    def gather(self, data: Encoded, rows: torch.Tensor) -> torch.Tensor:
        """The states of ``rows``, right-padded to the batch width of ``data.batch(rows)``
        (pad positions hold zeros: they are masked as keys, and carry no label)."""
        if len(rows) == 0:
            raise ValueError("no rows to gather")
        self.fill(data, rows)
        assert self.storage is not None
        width = max(1, int(self.lengths[rows].max()))
        real, where = self._positions(rows, width)
        device = self.prefix.device
        out = torch.zeros(
            (len(rows), width, self.storage.shape[1]), dtype=self.storage.dtype, device=device
        )
        out[real.to(device)] = self.storage[where.to(self.storage.device)].to(device)
        return out


def feed(
    model: torch.nn.Module, data: Encoded, rows: torch.Tensor
) -> contextlib.AbstractContextManager[None]:
    """Within: ``model(**data.batch(rows))`` runs on the cached states of ``rows`` (nothing
    changes for a split without a cache, or one cached for another model)."""
    states = data.prefix
    if states is None or states.prefix.model is not model:
        return contextlib.nullcontext()
    return states.prefix.feeding(states.gather(data, rows))


def lora_start(adapter: PeftAdapter, family: Family) -> int:
    """The first block holding a LoRA layer or a trained tensor (0 when the embeddings do)."""
    body = _body(adapter.model)
    lora = {id(m) for m in adapter.lora_layers.values()}
    trained = {id(p) for p in adapter.head_params.values()}

    def changes(module: torch.nn.Module) -> bool:
        return any(id(m) in lora for m in module.modules()) or any(
            p.requires_grad or id(p) in trained for p in module.parameters()
        )

    if changes(body.get_submodule(family.embeddings)):
        return 0
    blocks = _blocks(body, family)
    return next((i for i, block in enumerate(blocks) if changes(block)), len(blocks))


def plan_prefix_cache(
    adapter: PeftAdapter,
    *,
    mode: str,
    log: Callable[[str], None],
    budget_bytes: int | None = None,
) -> FrozenPrefix | None:
    """The frozen prefix to cache for ``mode`` (``auto``, ``on``, ``off``), or None.

    ``auto`` caches when it can and logs one line saying why not otherwise; ``on`` is a
    one-line error where it cannot (an unknown model family, LoRA in block 0).
    """
    if mode not in MODES:
        raise FedLoraError(
            f"config key 'prefix_cache' must be one of {', '.join(MODES)}; got '{mode}'"
        )
    if mode == "off":
        return None
    model_type = str(getattr(getattr(_body(adapter.model), "config", None), "model_type", None))
    family = _family(model_type)
    start, reason, hint = 0, None, "use prefix_cache=auto or off"
    try:
        if family is not None:
            start = lora_start(adapter, family)
            blocks = len(_blocks(_body(adapter.model), family))
    except AttributeError:
        family = None  # a model of a listed type laid out otherwise
    if family is None:
        reason = f"model type '{model_type}' has no prefix adapter (known: {_known()})"
    elif start == 0:
        reason = "LoRA starts in block 0 (or the embeddings), so no block below it is frozen"
        hint = "set layers=[...] to blocks above 0, or prefix_cache=auto"
    elif start >= blocks:
        reason = "no block carries LoRA"
    if reason is not None:
        if mode == "on":
            raise FedLoraError(f"prefix_cache=on: {reason}; {hint}")
        log(f"prefix cache: off ({reason})")
        return None
    assert family is not None
    prefix = FrozenPrefix(
        adapter.model, family=family, start=start, budget_bytes=budget_bytes, log=log
    )
    log(prefix.describe())
    return prefix
