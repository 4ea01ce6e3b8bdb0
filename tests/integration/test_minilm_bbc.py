"""The packaged model on the packaged data: a short real federated run through the CLI."""

import json
from pathlib import Path

import pytest

from fedlora.cli import main

pytestmark = pytest.mark.integration


def test_rolora_on_minilm_and_bbc_news(tmp_path: Path):
    code = main(
        [
            "run",
            "model=minilm",
            "dataset=bbc-news",
            "max_train_examples=300",
            "max_test_examples=100",
            "max_length=48",
            "num_clients=3",
            "partition=dirichlet",
            "rounds=2",
            "local_steps=3",
            "lr=0.003",
            "method=rolora",
            f"output_dir={tmp_path}",
            "run_name=it",
            "progress=false",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "it"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained"] for r in rows] == ["", "B+head", "A+head"]
    assert rows[-1]["loss"] < rows[0]["loss"]  # the real model learns from real data
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
