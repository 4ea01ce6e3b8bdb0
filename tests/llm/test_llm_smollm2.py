"""The packaged SmolLM2-135M-Instruct (GGUF, converted once and cached) runs a few steps."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.outputs import RunDir
from fedlora.runtime import run_federated

pytestmark = pytest.mark.integration


def test_smollm2_rolora_few_steps(instructions_file, tmp_path):
    from fedlora.models.causal_lm import smollm2_dir

    path = smollm2_dir()  # the first call converts the GGUF (about a minute)
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    overrides = [
        "task=causal-lm",
        "model=smollm2",
        f"dataset={instructions_file}",
        "max_train_examples=12",
        "max_test_examples=4",
        "max_length=64",
        "num_clients=2",
        "partition=iid",
        "eval_fraction=0.2",
        "rounds=1",
        "local_steps=1",
        "batch_size=2",
        "lr=1e-3",
        "layers=[28,29]",
        "method=rolora",
        f"output_dir={tmp_path}",
    ]
    cfg = load_config(None, overrides)
    fed = build_federation(cfg, log=silent)
    assert fed.tokenizer.chat_template  # SmolLM2's chat template came through the GGUF
    assert type(fed.adapter.model.base_model.model).__name__ == "LlamaForCausalLM"
    assert len(fed.adapter.lora_layers) == 4  # q_proj, v_proj in blocks 28 and 29
    result = run_federated(fed, build_method("rolora", cfg), RunDir(tmp_path / "r"), log=silent)
    first, last = result["rows"][0], result["rows"][-1]
    # an instruction-tuned model already answers these fairly well: a low base perplexity
    assert 1.0 < first["perplexity"] < 100.0
    assert math.isfinite(last["perplexity"]) and last["perplexity"] != first["perplexity"]
    assert all(t.dtype == torch.float32 for t in result["state"].B.values())
