"""What a SuperNode holds: its client's data and the model it trains, built from the config.

A SuperNode is one client, ``partition-id`` in its node config (Flower's simulation engine
sets it). Its data is either

- its own file, ``data-path`` in the node config (an organisation's local data: labelled
  ``.csv``/``.tsv``/``.jsonl`` or a directory, read like ``dataset``; for ``task=causal-lm``
  also instruction JSONL or plain text, read like a causal ``dataset``), split into train
  and eval with ``eval_fraction``; class labels are mapped to the run's label names; or
- partition ``partition-id`` of the run's ``dataset``, rebuilt deterministically from the
  config by the in-process runtime's own setup (:func:`fedlora.federation.build_federation`:
  the same data, partition, model and tokenisation), of which the node tokenises only its
  own partition.

The model (a classifier, or a causal LM for ``task=causal-lm``) is built from the same seed
as the server's, so both start from the same weights. Building is cached per process:
Flower's simulation engine reuses its Ray actors across rounds and clients, while a
deployed SuperNode starts a fresh ClientApp process per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.config import Config
from fedlora.data import Encoded, TextDataset, TextExamples, load_text_dataset
from fedlora.data.causal import is_causal_source, load_causal_dataset
from fedlora.errors import FedLoraError
from fedlora.federation import (
    ClientSplits,
    Federation,
    build_federation,
    encode_split,
    lora_settings,
    model_settings,
)
from fedlora.log import silent
from fedlora.messages import AdapterState
from fedlora.models import PeftAdapter, load_classifier
from fedlora.models.causal_lm import load_causal_lm
from fedlora.models.prefix import plan_prefix_cache


@dataclass
class LocalModel:
    """The PEFT model of a process and the pretrained weights under its LoRA layers."""

    adapter: PeftAdapter
    initial_base: dict[str, torch.Tensor]
    folded: bool = False
    # the adapter as built (same seed as the server's): the private part a stateful
    # client (FedSA-LoRA) holds before it first trains
    initial_state: AdapterState | None = None

    @torch.no_grad()
    def set_base(self, base_delta: Mapping[str, torch.Tensor]) -> None:
        """Frozen weights = pretrained + what the server has folded in so far (FedEx-LoRA)."""
        if not base_delta and not self.folded:
            return
        for layer, weight in self.initial_base.items():
            self.adapter.set_base(layer, weight)
            if layer in base_delta:
                self.adapter.add_to_base(layer, base_delta[layer])
        self.folded = bool(base_delta)


@dataclass(frozen=True)
class LocalClient:
    client_id: int
    model: LocalModel
    train: Encoded
    eval: Encoded


# One entry per process (a process serves one run): config text (+ data path) -> built state.
_PARTITIONED: dict[str, tuple[Federation, LocalModel]] = {}
_OWN_DATA: dict[tuple[str, str, int], LocalClient] = {}


def local_client(
    cfg: Config, *, config_text: str, node_config: Mapping[str, Any], label_names: list[str]
) -> LocalClient:
    if "partition-id" not in node_config:
        raise FedLoraError(
            "this SuperNode has no partition-id in its node config "
            "(start it with --node-config 'partition-id=<client id> ...')"
        )
    client_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    if "device" in node_config:
        # a SuperNode computes where its own machine can: --node-config "... device=cuda:1"
        cfg = cfg.replace(device=str(node_config["device"]))
        config_text = f"{config_text}\n# device: {cfg.device}"
    data_path = node_config.get("data-path")
    if data_path:
        key = (config_text, str(data_path), client_id)
        if key not in _OWN_DATA:
            _OWN_DATA.clear()
            _OWN_DATA[key] = _own_data_client(cfg, Path(str(data_path)), client_id, label_names)
        return _OWN_DATA[key]
    if config_text not in _PARTITIONED:
        _PARTITIONED.clear()
        fed = build_federation(cfg, log=silent, encode_clients=())  # each its own, below
        _PARTITIONED[config_text] = (
            fed,
            LocalModel(fed.adapter, fed.initial_base, initial_state=fed.initial_state),
        )
    fed, model = _PARTITIONED[config_text]
    held = {c.client_id: c for c in fed.clients}
    if client_id not in held:
        raise FedLoraError(
            f"partition-id {client_id} is not a client of this run (num_clients={cfg.num_clients})"
        )
    if list(fed.dataset.label_names) != list(label_names):
        raise FedLoraError(
            "this SuperNode's copy of the data set has other labels than the server's"
        )
    if client_id not in fed.encoded:  # a simulation actor may serve several clients
        own = held[client_id]
        fed.encoded[client_id] = ClientSplits(
            train=fed.encode(own.train), eval=fed.encode(own.eval)
        )
    splits = fed.encoded[client_id]
    return LocalClient(client_id, model, splits.train, splits.eval)


def _relabel(
    examples: TextExamples, local: list[str], names: list[str], path: Path
) -> TextExamples:
    """Local label ids -> the run's label ids, by name (or by index for integer labels)."""
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for name in local:
        if name in index:
            ids.append(index[name])
        elif name.isdigit() and int(name) < len(names):
            ids.append(int(name))
        else:
            raise FedLoraError(f"{path}: label '{name}' is not one of the run's labels {names}")
    return TextExamples(
        text=examples.text,
        labels=[ids[y] for y in examples.labels],
        text_pair=examples.text_pair,
        groups=examples.groups,
    )


def _own_data_client(cfg: Config, path: Path, client_id: int, names: list[str]) -> LocalClient:
    """A client of its own file: data split with ``eval_fraction``, the model and the
    tokenisation of ``cfg.task`` (as :func:`~fedlora.federation.build_federation` builds
    them)."""
    if not path.exists():
        raise FedLoraError(f"data-path {path} of this SuperNode does not exist")
    if cfg.eval_fraction <= 0:
        raise FedLoraError("a SuperNode with its own data-path needs eval_fraction > 0")
    torch.set_num_threads(cfg.threads)
    generative = cfg.task == "causal-lm" and is_causal_source(str(path), encoding=cfg.encoding)
    data: TextDataset
    if generative:
        data = load_causal_dataset(
            str(path), seed=cfg.seed, test_fraction=cfg.eval_fraction, encoding=cfg.encoding
        )
        train, held_out = data.train, data.test
    else:
        data = load_text_dataset(
            name=str(path),
            seed=cfg.seed,
            test_fraction=cfg.eval_fraction,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            encoding=cfg.encoding,
        )
        train = _relabel(data.train, data.label_names, names, path)
        held_out = _relabel(data.test, data.label_names, names, path)
    settings = model_settings(cfg)
    if cfg.task == "causal-lm":
        model, tokenizer, _ = load_causal_lm(
            cfg.model, lora=lora_settings(cfg), seed=cfg.seed, mlp=cfg.lora_mlp, settings=settings
        )
    else:
        model, tokenizer, _ = load_classifier(
            cfg.model,
            num_labels=len(names),
            lora=lora_settings(cfg),
            seed=cfg.seed,
            settings=settings,
        )
    # classification data on a decoder: a word per label, the run's (as build_federation)
    verbalizer = None if generative or cfg.task != "causal-lm" else list(cfg.verbalizer or names)
    adapter = PeftAdapter(model, client_alpha=cfg.client_alpha)
    initial = {k: adapter.base_weight(k).detach().clone() for k in adapter.lora_layers}
    prefix = plan_prefix_cache(adapter, mode=cfg.prefix_cache, log=silent)  # as build_federation

    def enc(examples: TextExamples) -> Encoded:
        encoded = encode_split(cfg, tokenizer, examples, verbalizer=verbalizer)
        return prefix.attach(encoded) if prefix is not None else encoded

    return LocalClient(
        client_id=client_id,
        model=LocalModel(adapter, initial, initial_state=adapter.get_state()),
        train=enc(train),
        eval=enc(held_out),
    )
