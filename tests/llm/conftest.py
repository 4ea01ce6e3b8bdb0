"""Tiny decoders built from configs (no download) and a small instruction file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _texts() -> list[str]:
    from fedlora.data import load_text_dataset

    data = load_text_dataset(name="bbc-news", max_train_examples=60, max_test_examples=5)
    return data.train.text


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-token byte-level BPE trained on BBC articles, with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_texts(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tok.save_pretrained(path)
    return path


def _save(model: torch.nn.Module, tokenizer_dir: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(config), tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=600,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(config), tiny_tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def instructions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 instruction records from BBC articles: the topic and the first words."""
    from fedlora.data import load_text_dataset

    data = load_text_dataset(name="bbc-news", max_train_examples=40, max_test_examples=5)
    path = tmp_path_factory.mktemp("instr") / "bbc.jsonl"
    with path.open("w") as f:
        for text, label in zip(data.train.text, data.train.labels, strict=True):
            words = text.split()
            record = {
                "instruction": "What is the topic?",
                "input": " ".join(words[1:25]),
                "output": data.label_names[label],
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def llm_overrides(instructions_file: Path, tmp_path: Path) -> list[str]:
    return [
        "task=causal-lm",
        f"dataset={instructions_file}",
        "max_length=48",
        "num_clients=3",
        "partition=iid",
        "rounds=2",
        "local_steps=2",
        "batch_size=4",
        "eval_batch_size=8",
        "lr=0.01",
        "rank=4",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=t",
        "progress=false",
    ]
