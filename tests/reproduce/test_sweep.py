"""``fedlora sweep``: the grid, deterministic names, skipping finished and resuming
interrupted runs."""

import json

import pytest

from fedlora.cli import main
from fedlora.errors import FedLoraError
from fedlora.reproduce.sweep import grid_points, parse_grid, point_name, sweep


def test_grid_is_a_cartesian_product_with_stable_names():
    grid = parse_grid(["method=fedavg,rolora", "layers=[3,4,5],[0,1]"])
    assert grid == {"method": ["fedavg", "rolora"], "layers": ["[3,4,5]", "[0,1]"]}
    points = grid_points(grid)
    assert len(points) == 4 and points[1] == {"method": "fedavg", "layers": "[0,1]"}
    assert point_name(points[0]) == "method-fedavg_layers-3.4.5"
    with pytest.raises(FedLoraError):
        parse_grid(["rank"])


def test_sweep_runs_skips_finished_and_resumes_interrupted(tiny_overrides, tmp_path):
    logs: list[str] = []
    grid = {"method": ["fedavg", "rolora"]}
    paths = sweep(None, tiny_overrides, grid, log=logs.append)
    assert [p.name for p in paths] == ["method-fedavg", "method-rolora"]
    assert all((p / "summary.json").is_file() for p in paths)
    first = (paths[0] / "summary.json").stat().st_mtime_ns

    before = json.loads((paths[1] / "summary.json").read_text())
    (paths[1] / "summary.json").unlink()  # as if killed after its last checkpoint
    logs.clear()
    sweep(None, tiny_overrides, grid, log=logs.append)
    assert any("method-fedavg: finished, skipped" in m for m in logs)
    assert any("method-rolora: interrupted, resuming" in m for m in logs)
    assert (paths[0] / "summary.json").stat().st_mtime_ns == first
    after = json.loads((paths[1] / "summary.json").read_text())
    for key in ("final_accuracy", "best_accuracy", "total_upload_bytes", "method_state"):
        assert after[key] == before[key]


def test_cli_sweep_rejects_a_bad_grid_value_before_running(tiny_overrides, capsys, tmp_path):
    assert main(["sweep", *tiny_overrides, "--grid", "rank=2,0"]) == 2
    err = capsys.readouterr().err
    assert err == "fedlora: error: config key 'rank' must be >= 1, got 0\n", err
    runs = tmp_path / "runs"  # tiny_overrides' output_dir: not even rank=2 ran
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())
