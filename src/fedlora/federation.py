"""Set up a federation once: data loaded, split among clients and tokenised, one model.

Everything here is built once per run (or once per ``fedlora compare``, shared by all
methods): tokenisation happens here and never again per round. Clients are not objects
holding models: a client is its data; its state is the adapter it is sent each round.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.config import Config
from fedlora.data import (
    ClientData,
    Encoded,
    TextDataset,
    TextExamples,
    describe_clients,
    encode,
    load_text_dataset,
    partition_clients,
)
from fedlora.data.causal import encode_causal, is_causal_source, load_causal_dataset
from fedlora.errors import FedLoraError
from fedlora.log import Log, stderr_log
from fedlora.messages import AdapterState
from fedlora.models import LoRASettings, PeftAdapter, load_classifier
from fedlora.models.causal_lm import load_causal_lm
from fedlora.models.device import check_precision, resolve_device
from fedlora.models.loading import ModelSettings
from fedlora.models.prefix import FrozenPrefix, plan_prefix_cache


@dataclass(frozen=True)
class ClientSplits:
    train: Encoded
    eval: Encoded


@dataclass
class Federation:
    """The data of every client, the global eval set, and the one shared model."""

    cfg: Config
    dataset: TextDataset
    clients: list[ClientData]
    encoded: dict[int, ClientSplits]
    test: Encoded
    adapter: PeftAdapter
    tokenizer: object
    model_path: str
    initial_state: AdapterState
    initial_base: dict[str, torch.Tensor]
    verbalizer: list[str] | None = None  # causal-lm on classification data: a word per label
    prefix: FrozenPrefix | None = None  # prefix_cache: the frozen blocks whose outputs splits keep

    @property
    def num_labels(self) -> int:
        return len(self.dataset.label_names)

    def encode(self, examples: TextExamples) -> Encoded:
        encoded = encode_split(self.cfg, self.tokenizer, examples, verbalizer=self.verbalizer)
        return self.prefix.attach(encoded) if self.prefix is not None else encoded

    def eval_counts(self) -> dict[str, Any]:
        """What one evaluation covers, for the metrics row: the global eval set's size and
        each client's eval split's (clients without one, ``max_client_eval_examples=0``,
        are not evaluated and not listed)."""
        return {
            "eval_examples": len(self.test),
            "client_eval_examples": {
                cid: len(s.eval) for cid, s in self.encoded.items() if len(s.eval)
            },
        }

    @functools.cached_property
    def pooled_train(self) -> Encoded:
        """All clients' training data on one trainer (the centralized baseline)."""
        return self.encode(_pool(self.clients))

    def reset(self) -> AdapterState:
        """Back to the starting model (used between methods in ``fedlora compare``)."""
        with torch.no_grad():
            for layer, weight in self.initial_base.items():
                self.adapter.set_base(layer, weight)
        self.adapter.set_state(self.initial_state)
        return self.initial_state.clone()


def _pool(clients: list[ClientData]) -> TextExamples:
    text = [t for c in clients for t in c.train.text]
    labels = [y for c in clients for y in c.train.labels]
    pairs = None
    if clients[0].train.text_pair is not None:
        pairs = [p for c in clients for p in (c.train.text_pair or [])]
    return TextExamples(text=text, labels=labels, text_pair=pairs)


def lora_settings(cfg: Config) -> LoRASettings:
    """The LoRA adapter a config asks for (the server and every client build the same one)."""
    return LoRASettings(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        layers=cfg.layers,
        train_head=cfg.head == "train",
        dora=cfg.adapter == "dora",
    )


def encode_split(
    cfg: Config, tokenizer: object, examples: TextExamples, *, verbalizer: list[str] | None
) -> Encoded:
    """Tokenise a split for ``cfg.task`` (response-only labels for causal-lm)."""
    if cfg.task == "causal-lm":
        return encode_causal(
            tokenizer,
            examples,
            max_length=cfg.max_length,
            chat_template=cfg.chat_template,
            verbalizer=verbalizer,
        )
    return encode(tokenizer, examples, max_length=cfg.max_length)


def _verbalizer(cfg: Config, dataset: TextDataset, generative: bool) -> list[str] | None:
    if cfg.task != "causal-lm" or generative:
        return None
    words = cfg.verbalizer or dataset.label_names
    if len(words) != len(dataset.label_names):
        raise FedLoraError(
            f"config key 'verbalizer' needs one word per label ({len(dataset.label_names)}: "
            f"{', '.join(dataset.label_names)}), got {len(words)}"
        )
    return list(words)


def model_settings(cfg: Config) -> ModelSettings:
    """Where and in what form the base model lives; checks the device is here (a one-line
    error before any data is loaded)."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    return ModelSettings(
        device=str(device),
        base_dtype=cfg.base_dtype,
        quantization=cfg.quantization,
        double_quant=cfg.bnb_double_quant,
        compute_dtype=cfg.bnb_compute_dtype,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def build_federation(
    cfg: Config, *, log: Log = stderr_log, encode_clients: Collection[int] | None = None
) -> Federation:
    """Data, partition, model and tokenised splits of a run.

    ``encode_clients``: the clients whose splits are tokenised now (None: all). A Flower
    SuperNode holds one client: it passes none and tokenises its own with
    :meth:`Federation.encode` (the same tokenisation).
    """
    torch.set_num_threads(cfg.threads)
    settings = model_settings(cfg)
    generative = cfg.task == "causal-lm" and is_causal_source(
        cfg.dataset, cfg.data_dir, encoding=cfg.encoding
    )
    if generative:
        dataset = load_causal_dataset(
            cfg.dataset,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            test_fraction=cfg.test_fraction,
            max_train_examples=cfg.max_train_examples,
            max_test_examples=cfg.max_test_examples,
            encoding=cfg.encoding,
        )
    else:
        dataset = load_text_dataset(
            name=cfg.dataset,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            test_fraction=cfg.test_fraction,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            group_column=cfg.group_column,
            max_train_examples=cfg.max_train_examples,
            max_test_examples=cfg.max_test_examples,
            encoding=cfg.encoding,
            eval_split=cfg.eval_split,
        )
    log(
        f"data: {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} eval examples, "
        f"{len(dataset.label_names)} labels"
    )
    clients = partition_clients(
        dataset.train,
        num_clients=cfg.num_clients,
        partition=cfg.partition,
        partition_alpha=cfg.partition_alpha,
        dominant_fraction=cfg.dominant_fraction,
        eval_fraction=cfg.eval_fraction,
        max_eval_examples=cfg.max_client_eval_examples,
        seed=cfg.seed,
    )
    log(describe_clients(clients, dataset.label_names))
    lora = lora_settings(cfg)
    verbalizer = _verbalizer(cfg, dataset, generative)
    if cfg.task == "causal-lm":
        model, tokenizer, path = load_causal_lm(
            cfg.model, lora=lora, seed=cfg.seed, mlp=cfg.lora_mlp, settings=settings
        )
    else:
        model, tokenizer, path = load_classifier(
            cfg.model,
            num_labels=len(dataset.label_names),
            lora=lora,
            seed=cfg.seed,
            settings=settings,
        )
    adapter = PeftAdapter(model, client_alpha=cfg.client_alpha)
    if not adapter.lora_layers:
        raise FedLoraError("no LoRA layers were created: check target_modules and layers")
    log(
        f"model: {cfg.model} ({path}), LoRA rank {cfg.rank} on {len(adapter.lora_layers)} layers, "
        f"{adapter.get_state().nbytes() / 1e6:.3f} MB adapter"
    )

    prefix = plan_prefix_cache(adapter, mode=cfg.prefix_cache, log=log)

    def enc(examples: TextExamples) -> Encoded:
        encoded = encode_split(cfg, tokenizer, examples, verbalizer=verbalizer)
        return prefix.attach(encoded) if prefix is not None else encoded

    encoded = {
        c.client_id: ClientSplits(train=enc(c.train), eval=enc(c.eval))
        for c in clients
        if encode_clients is None or c.client_id in encode_clients
    }
    initial = adapter.get_state()
    initial_base = {k: adapter.base_weight(k).detach().clone() for k in adapter.lora_layers}
    return Federation(
        cfg=cfg,
        dataset=dataset,
        clients=clients,
        encoded=encoded,
        test=enc(dataset.test),
        adapter=adapter,
        tokenizer=tokenizer,
        model_path=path,
        initial_state=initial,
        initial_base=initial_base,
        verbalizer=verbalizer,
        prefix=prefix,
    )
