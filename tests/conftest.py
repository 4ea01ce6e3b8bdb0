"""Shared fixtures: a tiny BERT built from a config (no download) and small real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with the packaged MiniLM tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.models import resolve_model

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm")[0])
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def no_dropout_bert_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: a batched forward then equals per-example forwards,
    and equal gradients mean equal steps."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_bert_dir)
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, config=config).save_pretrained(
        path
    )
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


@pytest.fixture
def tiny_overrides(tiny_bert_dir: Path, tmp_path: Path) -> list[str]:
    """A fast federated run: tiny BERT, 150 real BBC articles, 3 clients, 2 rounds."""
    return [
        f"model={tiny_bert_dir}",
        "dataset=bbc-news",
        "max_train_examples=150",
        "max_test_examples=40",
        "max_length=32",
        "num_clients=3",
        "partition=iid",
        "rounds=2",
        "local_steps=2",
        "batch_size=8",
        "lr=0.01",
        "rank=4",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=t",
        "progress=false",
        # bench/gpu_check.sh runs the tests with the device set to a GPU
        f"device={os.environ.get('FEDLORA_TEST_DEVICE', 'cpu')}",
    ]
