"""Every method, unchanged, on tiny Llama-style and GPT-2 decoders through the round loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.outputs import RunDir, read_metrics
from fedlora.runtime import run_federated

METHODS = {
    "fedavg": [],
    "ffa": [],
    "rolora": [],
    "fra": [],
    "fedex": [],
    "flora": ["client_ranks=[2,4,3]"],
    "centralized": [],
    "schedule": ["schedule=[{method: ffa, rounds: 1}, {method: fedavg}]"],
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def llm_fed(request, tiny_llama_dir, tiny_gpt2_dir, instructions_file, tmp_path_factory):
    model = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    out = tmp_path_factory.mktemp("runs")
    overrides = [
        "task=causal-lm",
        f"model={model}",
        f"dataset={instructions_file}",
        "max_length=48",
        "num_clients=3",
        "partition=iid",
        "rounds=2",
        "local_steps=3",
        "batch_size=4",
        "eval_batch_size=8",
        "lr=0.02",
        "rank=4",
        f"output_dir={out}",
        "progress=false",
    ]
    return build_federation(load_config(None, overrides), log=silent), overrides, out


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_lowers_perplexity(llm_fed, method):
    fed, overrides, out = llm_fed
    fed.cfg = load_config(None, [*overrides, f"method={method}", *METHODS[method]])
    run_dir = RunDir(out / method)
    result = run_federated(fed, build_method(method, fed.cfg), run_dir, log=silent)
    rows = read_metrics(out / method)
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert set(r["client_perplexity"]) == {"0", "1", "2"}
        assert 0.0 <= r["accuracy"] <= 1.0  # next-token accuracy on response tokens
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    assert rows[1]["upload_bytes"] > 0
    assert not rows[1]["trained"].endswith("+head")
    # a causal LM has no classifier head: nothing but LoRA factors travels
    assert not fed.adapter.head_params and not result["state"].head
    assert (run_dir.adapter_dir / "adapter_config.json").is_file()
    config = json.loads((run_dir.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_ffa_keeps_a_and_rolora_moves_one_factor(llm_fed):
    fed, overrides, out = llm_fed
    start = fed.initial_state
    fed.cfg = load_config(None, [*overrides, "method=ffa", "rounds=1"])
    ffa = run_federated(fed, build_method("ffa", fed.cfg), RunDir(out / "ffa1"), log=silent)
    for layer in start.A:
        assert torch.equal(ffa["state"].A[layer], start.A[layer])
        assert not torch.equal(ffa["state"].B[layer], start.B[layer])
    fed.cfg = load_config(None, [*overrides, "method=rolora", "rounds=1"])
    ro = run_federated(fed, build_method("rolora", fed.cfg), RunDir(out / "ro1"), log=silent)
    assert ro["rows"][1]["trained"].startswith("B")
    for layer in start.A:
        assert torch.equal(ro["state"].A[layer], start.A[layer])


def test_saved_causal_adapter_reproduces_perplexity(tiny_llama_dir, llm_overrides, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.client import evaluate_causal

    cfg = load_config(None, [*llm_overrides, f"model={tiny_llama_dir}", "method=fedavg"])
    fed = build_federation(cfg, log=silent)
    run_dir = RunDir(tmp_path / "saved")
    result = run_federated(fed, build_method("fedavg", cfg), run_dir, log=silent)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(base, run_dir.adapter_dir)
    again = evaluate_causal(loaded, fed.test, batch_size=8)
    assert again["perplexity"] == pytest.approx(result["rows"][-1]["perplexity"], rel=1e-5)


def test_verbaliser_classification_on_a_decoder(tiny_llama_dir, tmp_path):
    overrides = [
        "task=causal-lm",
        f"model={tiny_llama_dir}",
        "dataset=bbc-news",
        "max_train_examples=60",
        "max_test_examples=15",
        "max_length=40",
        "num_clients=2",
        "rounds=1",
        "local_steps=2",
        "batch_size=4",
        "method=rolora",
        f"output_dir={tmp_path}",
    ]
    fed = build_federation(load_config(None, overrides), log=silent)
    assert fed.verbalizer == fed.dataset.label_names
    assert fed.test.class_labels is not None and len(fed.test.choice_ids) == 5
    result = run_federated(fed, build_method("rolora", fed.cfg), RunDir(tmp_path / "v"), log=silent)
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["perplexity"])


def test_bfloat16_base_keeps_float32_adapters(tiny_llama_dir, llm_overrides, tmp_path):
    cfg = load_config(
        None, [*llm_overrides, f"model={tiny_llama_dir}", "base_dtype=bfloat16", "method=fedex"]
    )
    fed = build_federation(cfg, log=silent)
    layer = next(iter(fed.adapter.lora_layers))
    assert fed.adapter.base_weight(layer).dtype == torch.bfloat16
    result = run_federated(fed, build_method("fedex", cfg), RunDir(tmp_path / "bf"), log=silent)
    for tensor in [*result["state"].A.values(), *result["state"].B.values()]:
        assert tensor.dtype == torch.float32
    assert result["rows"][-1]["perplexity"] < result["rows"][0]["perplexity"]


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("llama", {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_fc", "mlp.c_proj"}),
    ],
)
def test_lora_mlp_targets(which, expected, tiny_llama_dir, tiny_gpt2_dir, llm_overrides):
    model = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[which]
    cfg = load_config(None, [*llm_overrides, f"model={model}", "lora_mlp=true"])
    fed = build_federation(cfg, log=silent)
    layers = set(fed.adapter.lora_layers)
    found = {t for t in expected if any(name.endswith(t) for name in layers)}
    assert found == expected
    # two blocks, one LoRA layer per target; GPT-2's attention output c_proj stays frozen
    assert len(layers) == 2 * len(expected)


def test_causal_lm_config_errors(tiny_llama_dir, llm_overrides, tmp_path: Path):
    from fedlora.errors import FedLoraError

    with pytest.raises(FedLoraError, match="^config key 'lora_mlp' needs task=causal-lm$"):
        load_config(None, ["lora_mlp=true"])
    with pytest.raises(
        FedLoraError,
        match="^config key 'task' must be one of classification, causal-lm; got 'seq2seq'$",
    ):
        load_config(None, ["task=seq2seq"])
    bad = [*llm_overrides, f"model={tiny_llama_dir}", "dataset=bbc-news", "verbalizer=[a,b]"]
    with pytest.raises(FedLoraError, match="one word per label"):
        build_federation(load_config(None, bad), log=silent)


def test_fedlora_run_cli_writes_perplexity(tiny_llama_dir, llm_overrides, tmp_path):
    from fedlora.cli import main

    assert main(["run", *llm_overrides, f"model={tiny_llama_dir}", "method=fra"]) == 0
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    assert summary["base_perplexity"] == rows[0]["perplexity"]
    assert summary["final_perplexity"] == rows[-1]["perplexity"] < rows[0]["perplexity"]
