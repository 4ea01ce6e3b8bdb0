"""task=causal-lm on Flower's simulation engine: every federated method on tiny decoders
ends with the in-process adapter (and the same folded increments and metrics rows,
perplexity per client included); the packaged SmolLM2 runs a round the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.config import load_config
from fedlora.log import silent
from fedlora.models.adapter import BASE_DELTA_FILE
from fedlora.outputs import read_metrics

pytestmark = pytest.mark.integration

# Every method that runs federated (centralized pools the data on one trainer: in-process
# only). "-gpt2": GPT-2's Conv1D keeps its weight transposed, which folding must respect;
# "verbalizer": classification data on a decoder (a word per label).
RUNS = {
    "fedavg": [],
    "ffa": [],
    "rolora": [],
    "fra": [],
    "fedex": [],
    "flora": ["client_ranks=[2,4,3]"],
    "schedule": ["schedule=[{method: ffa, rounds: 1}, {method: fedavg}]"],
    "fedex-gpt2": ["method=fedex"],
    "verbalizer": [
        "method=rolora",
        "dataset=bbc-news",
        "max_train_examples=60",
        "max_test_examples=15",
    ],
}


def saved(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    path = run_dir / "adapter" / name
    return load_file(path) if path.is_file() else {}


def assert_same_run(sim_dir: Path, local_dir: Path, *, where: str) -> None:
    """Same adapter and folded increments (1e-6), same rows (timings aside) and summary."""
    for name in ("adapter_model.safetensors", BASE_DELTA_FILE):
        a, b = saved(sim_dir, name), saved(local_dir, name)
        assert a.keys() == b.keys(), where
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=f"{where} {key}")
    sim_rows, local_rows = read_metrics(sim_dir), read_metrics(local_dir)
    assert [r["round"] for r in sim_rows] == [r["round"] for r in local_rows], where
    for s, loc in zip(sim_rows, local_rows, strict=True):
        s = {k: v for k, v in s.items() if not k.startswith("time_") and k != "elapsed_s"}
        loc = {k: v for k, v in loc.items() if not k.startswith("time_") and k != "elapsed_s"}
        assert s.keys() == loc.keys(), where
        assert set(s["client_perplexity"]) == {"0", "1", "2"}, where
        for key, value in loc.items():
            if isinstance(value, dict):
                assert s[key].keys() == value.keys(), (where, key)
                for c, v in value.items():
                    assert s[key][c] == pytest.approx(v, abs=1e-6), (where, key, c)
            elif isinstance(value, float):
                assert s[key] == pytest.approx(value, abs=1e-6), (where, key)
            else:
                assert s[key] == value, (where, key)
    summary = json.loads((sim_dir / "summary.json").read_text())
    local = json.loads((local_dir / "summary.json").read_text())
    for key in ("base_perplexity", "final_perplexity"):
        assert summary[key] == pytest.approx(local[key], abs=1e-6), (where, key)


def test_every_method_on_flower_sim_matches_inprocess(
    tiny_llama_dir, tiny_gpt2_dir, llm_overrides, tmp_path
):
    from fedlora.runtime.flower.sim import run_simulations

    cfgs = {}
    for name, extra in RUNS.items():
        model = tiny_gpt2_dir if name.endswith("gpt2") else tiny_llama_dir
        method = [] if any(e.startswith("method=") for e in extra) else [f"method={name}"]
        cfgs[name] = load_config(
            None,
            [
                *llm_overrides,
                f"model={model}",
                *method,
                *extra,
                "runtime=flower-sim",
                f"output_dir={tmp_path}/sim",
                f"run_name={name}",
            ],
        )
    run_simulations(list(cfgs.values()), log=silent)
    for name, cfg in cfgs.items():
        recipes.run(
            cfg.replace(runtime="inprocess", output_dir=f"{tmp_path}/inprocess"), log=silent
        )
        assert_same_run(tmp_path / "sim" / name, tmp_path / "inprocess" / name, where=name)
    assert saved(tmp_path / "sim" / "fedex-gpt2", BASE_DELTA_FILE)  # it did fold


def test_smollm2_round_on_flower_sim_matches_inprocess(instructions_file, tmp_path):
    """The packaged SmolLM2-135M-Instruct: each virtual SuperNode builds it (from the
    cached conversion) and trains its partition; one round of RoLoRA ends as in-process."""
    from fedlora.models.causal_lm import smollm2_dir
    from fedlora.runtime.flower.sim import run_simulation

    smollm2_dir()  # the first call converts the GGUF (about a minute)
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
        "eval_batch_size=4",
        "lr=1e-3",
        "layers=[28,29]",
        "method=rolora",
        "run_name=smol",
        "progress=false",
    ]
    cfg = load_config(None, [*overrides, "runtime=flower-sim", f"output_dir={tmp_path}/sim"])
    run_simulation(cfg, log=silent)
    recipes.run(load_config(None, [*overrides, f"output_dir={tmp_path}/inprocess"]), log=silent)
    sim_dir, local_dir = tmp_path / "sim" / "smol", tmp_path / "inprocess" / "smol"
    a = saved(sim_dir, "adapter_model.safetensors")
    b = saved(local_dir, "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 8  # q_proj, v_proj x A, B x blocks 28, 29
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    sim_rows, local_rows = read_metrics(sim_dir), read_metrics(local_dir)
    for s, loc in zip(sim_rows, local_rows, strict=True):
        assert s["perplexity"] == pytest.approx(loc["perplexity"], abs=1e-6)
        assert s["client_perplexity"].keys() == loc["client_perplexity"].keys() == {"0", "1"}
        for c, v in loc["client_perplexity"].items():
            assert s["client_perplexity"][c] == pytest.approx(v, abs=1e-6)
