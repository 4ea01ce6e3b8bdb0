"""``fedlora run --resume``: a run killed with SIGKILL (after a round, or in the middle of
one) and resumed ends with the same adapter, bit for bit, and the same metrics (timings
aside) as the same run left alone.

The kills are real ``kill -9``s: either the process sends itself SIGKILL at a named point
(``FEDLORA_DEBUG_KILL=<point>:<round>``, see :func:`fedlora.runtime.checkpoint.debug_kill`),
or the test kills it as soon as ``metrics.jsonl`` shows a round, wherever it then is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedlora.runtime.checkpoint import truncate_metrics

TIMINGS = ("time_train_s", "time_aggregate_s", "time_eval_s", "elapsed_s")


def fedlora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def written_rounds(run: Path) -> list[int]:
    """The rounds of the complete rows in ``metrics.jsonl`` (a killed run may leave a cut
    last line)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [
        json.loads(line)["round"] for line in text.splitlines(keepends=True) if line.endswith("\n")
    ]


def checkpoint_round(run: Path) -> int | None:
    """The round of the last committed checkpoint (None: not even round 0's)."""
    index = run / "checkpoint" / "checkpoint.json"
    return json.loads(index.read_text())["round"] if index.is_file() else None


def assert_resumed_the_rest(
    resumed: subprocess.CompletedProcess, *, after: int, reference: Path
) -> None:
    """``--resume`` continued after checkpoint ``after`` and trained every round the
    uninterrupted run trained after it (not "already finished", not nothing)."""
    assert resumed.returncode == 0, resumed.stderr
    assert "already finished" not in resumed.stderr, resumed.stderr
    rounds = json.loads((reference / "summary.json").read_text())["rounds"]
    assert f"resuming after round {after}/{rounds}" in resumed.stderr, resumed.stderr
    last = written_rounds(reference)[-1]
    assert after < last  # there was something left to do
    trained = [t for t in range(1, rounds + 1) if f" round {t}/{rounds} trained " in resumed.stderr]
    assert trained == list(range(after + 1, last + 1)), resumed.stderr


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert metrics(resumed) == metrics(reference)
    for name in ("adapter_model.safetensors", "base_delta.safetensors"):
        ref = reference / "adapter" / name
        if not ref.exists():
            continue
        got, want = load_file(str(resumed / "adapter" / name)), load_file(str(ref))
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype
            assert got[key].equal(want[key]), key  # bit for bit
    summary = json.loads((resumed / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("final_accuracy", "best_accuracy", "total_upload_bytes", "method_state"):
        assert summary[key] == expected[key]


@pytest.fixture
def overrides(tiny_overrides: list[str]) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith(("rounds=", "run_name="))] + [
        "rounds=4",
        "lora_dropout=0.1",  # dropout masks must be reproduced too
        "client_fraction=0.67",  # and the client sampler
    ]


@pytest.mark.parametrize(
    ("method", "kill"),
    [
        ("rolora", "train:2"),  # mid-round: one client trained, nothing aggregated
        ("rolora", "metrics:3"),  # round 3's row written, its checkpoint not
        ("fedex", "train:3"),  # FedEx-LoRA folds residuals into the frozen weights
        ("fedavg+dp", "train:3"),  # DP-SGD: the accountants' history must carry over
    ],
)
def test_resume_after_sigkill_equals_uninterrupted(overrides, tmp_path, method, kill):
    runs = tmp_path / "runs"
    args = [*overrides, f"method={method}"]
    if method == "fedavg+dp":
        args = [*overrides, "method=fedavg", "dp.target_epsilon=8"]  # + budget stops
    done = fedlora("run", *args, "run_name=ref")
    assert done.returncode == 0, done.stderr
    point, kill_round = kill.split(":")[0], int(kill.split(":")[1])
    assert kill_round <= written_rounds(runs / "ref")[-1]  # a round the run trains

    killed = fedlora("run", *args, "run_name=k", env={"FEDLORA_DEBUG_KILL": kill})
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it reached the kill point
    assert not (runs / "k" / "summary.json").exists()
    # What the kill left: the checkpoint of the round before, and that round's row (plus,
    # killed after its row, the kill round's own row, which the resume must drop).
    assert checkpoint_round(runs / "k") == kill_round - 1
    expected_rows = kill_round + 1 if point == "metrics" else kill_round
    assert written_rounds(runs / "k") == list(range(expected_rows))

    resumed = fedlora("run", "--resume", str(runs / "k"))
    assert_resumed_the_rest(resumed, after=kill_round - 1, reference=runs / "ref")
    assert_same_run(runs / "k", runs / "ref")

    again = fedlora("run", "--resume", str(runs / "k"))  # a finished run stays as it is
    assert again.returncode == 0 and "already finished: nothing to resume" in again.stderr
    assert "resuming after round" not in again.stderr
    assert_same_run(runs / "k", runs / "ref")


def test_resume_after_external_kill_minus_9(overrides, tmp_path):
    """The test sends SIGKILL as soon as round 1 is in the metrics, wherever the run is,
    and checks that the kill landed before the run's end."""
    runs = tmp_path / "runs"
    args = [*overrides, "method=rolora", "rounds=6"]
    assert fedlora("run", *args, "run_name=ref").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora", "run", *args, "run_name=k"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while 1 not in written_rounds(runs / "k"):
            assert proc.poll() is None, f"the run exited ({proc.returncode}) before round 1"
            assert time.monotonic() < deadline, "round 1 was not written within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished before the signal
    assert not (runs / "k" / "summary.json").exists()
    at_kill = checkpoint_round(runs / "k")
    assert at_kill is not None and at_kill < 6, at_kill
    assert max(written_rounds(runs / "k")) < 6

    resumed = fedlora("run", "--resume", str(runs / "k"))
    assert_resumed_the_rest(resumed, after=at_kill, reference=runs / "ref")
    assert_same_run(runs / "k", runs / "ref")


def test_truncate_drops_partial_and_later_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": t, "accuracy": 0.5} for t in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "acc')
    assert truncate_metrics(path, 2) == rows[:3]
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert truncate_metrics(path, None) == [] and path.read_text() == ""
