"""The Flower app in Flower's simulation engine: parity with the in-process runtime, and
runs that survive (or stop on) a failing client."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.log import silent
from fedlora.models.adapter import BASE_DELTA_FILE
from fedlora.outputs import read_metrics

pytestmark = pytest.mark.integration

# The exact methods included: FedEx-LoRA folds a residual into the frozen weights, FLoRA
# merges its stacked factors there and restarts each client (``client_start``) at its own
# rank. One simulation runs them all, one after the other.
PARITY_RUNS = {
    "fedavg": [],
    "rolora": [],
    "fra": [],
    "fedex": [],
    "flora": ["client_ranks=[2,4,3]"],
    # stateful clients: each SuperNode keeps its client's B on disk; personal accuracy rows
    "fedsa": [],
    # client 1 above rank=4: its ranks 4, 5 come from the method state on the server
    "flexlora": ["client_ranks=[2,6,3]"],
    "hetlora": ["client_ranks=[2,6,3]", "hetlora_gamma=0.5"],
    "slora": ["slora_rounds=1"],  # round 1 sparse (values on the wire), then the switch
    "lorafair": [],
}
FOLDS_INTO_BASE = {"fedex", "flora"}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def base_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    """What the run folded into the frozen weights ({} when it folds nothing)."""
    path = run_dir / "adapter" / BASE_DELTA_FILE
    return load_file(path) if path.is_file() else {}


def assert_tensors_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(
            a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )


def comparable(row: dict) -> dict:
    """A metrics row without its timings."""
    return {k: v for k, v in row.items() if not k.startswith("time_") and k != "elapsed_s"}


def simulate(cfgs):
    from fedlora.runtime.flower.sim import run_simulations

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        return run_simulations(cfgs, log=silent)
    finally:
        # Ray is shut down when the simulation ends: no process of it is left behind.
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        gone, alive = psutil.wait_procs(left, timeout=30)
        assert not alive, f"simulation left processes: {[p.pid for p in alive]}"


def assert_same(a, b, *, where: str) -> None:
    """Equal JSON values, floats within 1e-6."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for key in b:
            assert_same(a[key], b[key], where=f"{where}.{key}")
    elif isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


def test_flower_sim_matches_inprocess(tiny_overrides, tmp_path):
    """Same config and seed: the same global adapter after 2 rounds (and the same increment
    folded into the frozen weights, for FedEx-LoRA and FLoRA), and the same metrics."""
    cfgs = {
        m: load_config(
            None,
            [
                *tiny_overrides,
                f"method={m}",
                *extra,
                f"output_dir={tmp_path}/sim",
                f"run_name={m}",
                "runtime=flower-sim",
            ],
        )
        for m, extra in PARITY_RUNS.items()
    }
    simulate(list(cfgs.values()))
    for m, cfg in cfgs.items():
        recipes.run(
            cfg.replace(runtime="inprocess", output_dir=f"{tmp_path}/inprocess"), log=silent
        )
        sim_dir, local_dir = tmp_path / "sim" / m, tmp_path / "inprocess" / m
        assert_tensors_close(adapter(sim_dir), adapter(local_dir))
        sim_delta, local_delta = base_delta(sim_dir), base_delta(local_dir)
        assert bool(local_delta) == (m in FOLDS_INTO_BASE), m
        assert_tensors_close(sim_delta, local_delta)
        sim_rows, local_rows = read_metrics(sim_dir), read_metrics(local_dir)
        assert [r["round"] for r in sim_rows] == [0, 1, 2]
        for s, loc in zip(sim_rows, local_rows, strict=True):
            assert_same(comparable(s), comparable(loc), where=f"{m} round {loc['round']}")
        summary = json.loads((sim_dir / "summary.json").read_text())
        assert summary["final_accuracy"] == pytest.approx(local_rows[-1]["accuracy"], abs=1e-6)


def test_failing_client_is_logged_and_too_few_replies_stop_the_run(tiny_overrides, tmp_path):
    """Client 1 raises in round 2 of 3. With min_clients=2 the run completes on the other
    two clients and logs the failure; with min_clients=3 it stops with a clear message and
    keeps the rounds already written."""
    base = [
        *tiny_overrides,
        "method=fedavg",
        "rounds=3",
        "eval_every=3",
        "runtime=flower-sim",
        "fail_client_round=[1,2]",
        f"output_dir={tmp_path}",
    ]
    survives = load_config(None, [*base, "min_clients=2", "run_name=survives"])
    stops = load_config(None, [*base, "min_clients=3", "run_name=stops"])
    with pytest.raises(
        FedLoraError, match=r"round 2: 2 of 3 sampled clients replied, fewer than min_clients=3"
    ):
        simulate([survives, stops])

    rows = read_metrics(tmp_path / "survives")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["clients"] for r in rows[1:]] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    (failure,) = rows[2]["failures"]
    assert failure["client"] == 1 and failure["stage"] == "train"
    assert "fail_client_round: client 1 fails in round 2" in failure["error"]
    assert "failures" not in rows[1] and "failures" not in rows[3]
    assert (tmp_path / "survives" / "summary.json").is_file()

    kept = read_metrics(tmp_path / "stops")
    assert [r["round"] for r in kept] == [0, 1]
    assert not (tmp_path / "stops" / "summary.json").exists()


def test_compare_on_flower_sim_runs_every_method_like_inprocess(tiny_overrides, tmp_path):
    """fedlora compare runtime=flower-sim: every federated method one after another on one
    simulated federation (same partition), each ending with the in-process adapter;
    centralized, which pools the data, is left out with a log line."""
    overrides = [*tiny_overrides, "methods=[fedavg,rolora,centralized]", "run_name=cmp"]
    lines: list[str] = []
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    sim = recipes.compare(
        load_config(None, [*overrides, "runtime=flower-sim", f"output_dir={tmp_path}/sim"]),
        log=lines.append,
    )
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not psutil.wait_procs(left, timeout=30)[1]
    assert list(sim) == ["fedavg", "rolora"]
    assert "centralized pools every client's data on one trainer: not run on Flower" in lines
    local = recipes.compare(
        load_config(None, [*overrides, "methods=[fedavg,rolora]", f"output_dir={tmp_path}/local"]),
        log=silent,
    )
    for m in ("fedavg", "rolora"):
        assert_tensors_close(
            adapter(tmp_path / "sim" / "cmp" / m), adapter(tmp_path / "local" / "cmp" / m)
        )
        assert sim[m]["client_train_sizes"] == local[m]["client_train_sizes"]
    table = (tmp_path / "sim" / "cmp" / "comparison.md").read_text()
    assert "| fedavg |" in table and "| rolora |" in table and "centralized" not in table


def test_flower_sim_matches_inprocess_with_dora(tiny_overrides, tmp_path):
    """adapter=dora (RoLoRA: the magnitude travels, and trains in its B rounds only): the
    simulated run ends with the in-process adapter, magnitude vectors included, and the
    same metrics rows (the bytes count the magnitude in both)."""
    overrides = [*tiny_overrides, "method=rolora", "adapter=dora", "run_name=dora"]
    cfg = load_config(None, [*overrides, "runtime=flower-sim", f"output_dir={tmp_path}/sim"])
    simulate([cfg])
    recipes.run(cfg.replace(runtime="inprocess", output_dir=f"{tmp_path}/inprocess"), log=silent)
    sim_dir, local_dir = tmp_path / "sim" / "dora", tmp_path / "inprocess" / "dora"
    sim_adapter = adapter(sim_dir)
    assert any(k.endswith("lora_magnitude_vector") for k in sim_adapter)
    assert_tensors_close(sim_adapter, adapter(local_dir))
    sim_rows, local_rows = read_metrics(sim_dir), read_metrics(local_dir)
    assert [r["round"] for r in sim_rows] == [0, 1, 2]
    for s, loc in zip(sim_rows, local_rows, strict=True):
        assert_same(comparable(s), comparable(loc), where=f"dora round {loc['round']}")


def test_flower_sim_dp_epsilons_are_the_clients_own_and_match_inprocess(tiny_overrides, tmp_path):
    """DP-SGD on Flower: each virtual SuperNode keeps its client's accountant on disk and
    reports its epsilon with every reply. With a budget that client 1 reaches after round
    3 (dp.target_epsilon=8, 2 of 3 clients per round), the simulated runs (FedAvg-LoRA and
    RoLoRA) sample the same clients as in-process, mark the same client out of budget,
    report the same per-client epsilons in every row and end with the same adapter; the
    epsilons equal Opacus' RDP accountant recomputed here from (sigma, q, steps)."""
    from opacus.accountants import RDPAccountant

    base = [
        *[o for o in tiny_overrides if not o.startswith("rounds=")],
        "rounds=4",
        "client_fraction=0.67",
        "dp.target_epsilon=8",
        "runtime=flower-sim",
    ]
    methods = ("fedavg", "rolora")
    cfgs = [
        load_config(None, [*base, f"method={m}", f"output_dir={tmp_path}/sim", f"run_name={m}"])
        for m in methods
    ]
    simulate(cfgs)
    for m, cfg in zip(methods, cfgs, strict=True):
        recipes.run(
            cfg.replace(runtime="inprocess", output_dir=f"{tmp_path}/inprocess"), log=silent
        )
        sim_dir, local_dir = tmp_path / "sim" / m, tmp_path / "inprocess" / m
        assert_tensors_close(adapter(sim_dir), adapter(local_dir))
        sim_rows, local_rows = read_metrics(sim_dir), read_metrics(local_dir)
        assert [r["round"] for r in sim_rows] == [0, 1, 2, 3, 4]
        for s, loc in zip(sim_rows, local_rows, strict=True):
            assert_same(comparable(s), comparable(loc), where=f"{m} round {loc['round']}")
        # the budget bites: client 1 is out after round 3 and is not sampled in round 4
        assert sim_rows[3]["dp_exhausted"] == [1] and 1 not in sim_rows[4]["clients"]
        assert not any("failures" in r for r in sim_rows)

        dp = json.loads((sim_dir / "summary.json").read_text())["dp"]
        local_dp = json.loads((local_dir / "summary.json").read_text())["dp"]
        for key in ("noise_multiplier", "sample_rate", "steps", "epsilon", "exhausted"):
            assert_same(dp[key], local_dp[key], where=f"{m} summary dp.{key}")
        for cid, eps in dp["epsilon"].items():
            reference = RDPAccountant()
            reference.history = [(dp["noise_multiplier"], dp["sample_rate"][cid], dp["steps"][cid])]
            assert eps == pytest.approx(reference.get_epsilon(delta=dp["delta"]), rel=1e-9)
            assert eps <= 8.0
            # the account lives with the client, on its node's disk
            saved = json.loads(
                (sim_dir / "client-state" / f"client-{cid}" / "privacy.json").read_text()
            )
            assert sum(int(n) for _, _, n in saved["history"]) == dp["steps"][cid]


def test_flower_sim_resumes_after_sigkill_with_the_nodes_accounts(tiny_overrides, tmp_path):
    """``fedlora run runtime=flower-sim`` (RoLoRA with DP-SGD, 4 rounds) SIGKILLs itself
    after round 2's row and before its checkpoint (``FEDLORA_DEBUG_KILL=metrics:2``): its
    virtual SuperNodes had trained round 2 and counted it in their accountants on disk,
    and Ray goes with the process. ``fedlora run --resume`` runs a new simulation from
    round 1's checkpoint; the nodes repeat round 2 with bit-identical releases, which cost
    no more privacy. Adapter, rows and epsilons equal the uninterrupted in-process run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [
        *[o for o in tiny_overrides if not o.startswith(("rounds=", "run_name="))],
        "rounds=4",
        "method=rolora",
        "dp.noise_multiplier=1.0",
        "progress=true",
    ]
    run_dir = tmp_path / "runs" / "k"

    def fedlora(*extra: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fedlora", "run", *extra],
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    killed = fedlora(
        *args, "runtime=flower-sim", "run_name=k", env={"FEDLORA_DEBUG_KILL": "metrics:2"}
    )
    family: set[int] = set()  # every process of the run, Ray's included
    deadline = time.monotonic() + 600
    while killed.poll() is None:
        try:
            family.update(c.pid for c in psutil.Process(killed.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        assert time.monotonic() < deadline, "the run did not reach its kill point"
        time.sleep(0.5)
    out = killed.stdout.read() if killed.stdout else ""
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    # Ray's own processes share the driver's fate (its per-node agents can take longer
    # than the test waits on a loaded machine: those are killed here, by pid)
    procs = []
    for pid in family:
        try:
            procs.append((psutil.Process(pid), psutil.Process(pid).name()))
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs([p for p, _ in procs], timeout=60)
    left = [name for p, name in procs if p in still]
    for p in still:
        p.kill()
    agents = ("ray::DashboardA", "ray::RuntimeEnv")  # process names are cut at 15 characters
    assert all(name.startswith(agents) for name in left), f"the killed run left {left}"
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]  # the kill round's row
    assert json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())["round"] == 1

    resumed = fedlora("--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming after round 1/4" in out, out[-3000:]

    recipes.run(load_config(None, [*args, "run_name=ref", "progress=false"]), log=silent)
    reference = tmp_path / "runs" / "ref"
    assert_tensors_close(adapter(run_dir), adapter(reference))
    rows, local_rows = read_metrics(run_dir), read_metrics(reference)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for s, loc in zip(rows, local_rows, strict=True):
        assert_same(comparable(s), comparable(loc), where=f"round {loc['round']}")
    dp = json.loads((run_dir / "summary.json").read_text())["dp"]
    assert dp["steps"] == {str(c): 4 * 2 for c in range(3)}  # round 2 counted once
