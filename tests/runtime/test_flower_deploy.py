"""A real deployment on loopback: a SuperLink and SuperNodes started by the test, two
rounds of RoLoRA on a tiny BERT launched with ``fedlora run runtime=flower``: two
SuperNodes without TLS; three with TLS, one of which is killed during round 2. Every
process is stopped by its id, and each step is bounded in time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from flower_procs import LocalFederation, run_bounded
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.config import load_config
from fedlora.log import silent
from fedlora.outputs import read_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 900.0  # a ClientApp process per message: ~10-60 s each on a busy 2-core box


def overrides(tiny_overrides: list[str], out: Path) -> list[str]:
    return [
        *tiny_overrides,
        "num_clients=2",
        "method=rolora",
        "eval_every=2",
        "head=frozen",
        f"output_dir={out}",
        "round_timeout=300",
        "progress=true",
    ]


def deploy_and_run(
    tmp_path: Path,
    args: list[str],
    certs: Path | None,
    *,
    num_nodes: int = 2,
    meanwhile: Callable[[LocalFederation, threading.Event], None] | None = None,
) -> tuple[LocalFederation, str]:
    """Start the federation, run ``fedlora run`` on it (``meanwhile(fed, finished)`` runs
    in a thread beside it), stop every process."""
    fed = LocalFederation(tmp_path, num_nodes=num_nodes, certs=certs)
    finished = threading.Event()
    side = None if meanwhile is None else threading.Thread(target=meanwhile, args=(fed, finished))
    try:
        fed.start()
        if certs is not None:  # the SuperLink speaks TLS with the certificate made for it
            ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
            with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.version() is not None
        tls = [f"root_certificates={certs / 'ca.crt'}"] if certs else ["insecure=true"]
        if side is not None:
            side.start()
        done = run_bounded(
            [
                str(Path(sys.executable).parent / "fedlora"),
                "run",
                *args,
                "runtime=flower",
                f"superlink={fed.address}",
                *tls,
            ],
            env=fed.env,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
        )
        fed.snapshot()
    finally:
        finished.set()
        if side is not None and side.is_alive():
            side.join(timeout=30)
        left = fed.stop()
    assert not left, f"processes still alive after stop: {left}"
    assert done.returncode == 0, done.stdout[-4000:]
    return fed, done.stdout


def check_run(run_dir: Path) -> None:
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["trained"] for r in rows[1:]] == ["B", "A"]
    assert all(r["clients"] == [0, 1] for r in rows[1:])
    assert set(rows[0]["client_accuracy"]) == set(rows[2]["client_accuracy"]) == {"0", "1"}
    assert rows[1]["accuracy"] is None and rows[2]["accuracy"] is not None
    assert not any("failures" in r for r in rows)
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_deployment_without_tls_matches_inprocess(tiny_overrides, tmp_path):
    args = overrides(tiny_overrides, tmp_path / "runs")
    _, out = deploy_and_run(tmp_path, [*args, "run_name=deployed"], certs=None)
    assert "round 2/2" in out
    check_run(tmp_path / "runs" / "deployed")
    # The same config in-process gives the same adapter: the SuperNodes rebuilt the same
    # partitions and model from the config the server sent them.
    recipes.run(load_config(None, [*args, "run_name=inprocess"]), log=silent)
    deployed = load_file(tmp_path / "runs" / "deployed" / "adapter" / "adapter_model.safetensors")
    local = load_file(tmp_path / "runs" / "inprocess" / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == local.keys()
    for key in local:
        torch.testing.assert_close(deployed[key], local[key], atol=1e-6, rtol=0)


def written_rows(run_dir: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl that is still being written."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def received_train(node_log: str, round: int) -> re.Match[str] | None:
    """Where a SuperNode's log says it pulled round ``round``'s train message (Flower logs
    ``[RUN <id>, ROUND <t>]`` then ``Receiving: train message`` for each message it pulls;
    the strategy sets a message's group to its round)."""
    return re.search(rf"\[RUN \d+, ROUND {round}\][^\n]*\n[^\n]*Receiving: train message", node_log)


class KillDuringRound:
    """Once SuperNode ``node``'s log shows it received round ``round``'s train message,
    SIGKILL it and its processes, and record what the run had written at that moment; then
    note when that round's row is written. Fails if the run ends before the message came."""

    def __init__(self, run_dir: Path, *, node: int, round: int) -> None:
        self.run_dir, self.node, self.round = run_dir, node, round
        self.killed: list[int] = []
        self.left: list[int] | None = None  # processes of the node still alive after the kill
        self.rounds_at_kill: list[int] | None = None  # metrics rows written when it was killed
        self.run_ended_before_kill: bool | None = None
        self.log_after_receipt: str | None = None  # the node's log from the message on
        self.seconds_to_row: float | None = None
        self.error: BaseException | None = None

    def __call__(self, fed: LocalFederation, finished: threading.Event) -> None:
        try:
            node_log = fed.workdir / f"supernode{self.node}.log"
            while not received_train(node_log.read_text(errors="replace"), self.round):
                if finished.wait(0.2):
                    raise RuntimeError(
                        f"the run ended before SuperNode {self.node} got round {self.round}"
                    )
            self.killed = fed.kill_node(self.node)
            killed_at = time.monotonic()
            self.run_ended_before_kill = finished.is_set()
            self.rounds_at_kill = [r["round"] for r in written_rows(self.run_dir)]
            text = node_log.read_text(errors="replace")  # final: the node is dead
            receipt = received_train(text, self.round)
            assert receipt is not None
            self.log_after_receipt = text[receipt.end() :]
            time.sleep(1.0)  # a ClientApp orphaned by the kill would still be alive now
            self.left = fed.processes_of_node(self.node)
            while not any(r["round"] == self.round for r in written_rows(self.run_dir)):
                if finished.wait(0.5):
                    return
            self.seconds_to_row = time.monotonic() - killed_at
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def test_deployment_with_tls_survives_a_vanishing_supernode(tiny_overrides, tmp_path):
    """Three SuperNodes over TLS, min_clients=2. As soon as SuperNode 2's log shows it has
    received round 2's train message, it and every process under it are SIGKILLed: the
    test checks that this happened before it replied and before round 2's row was written.
    Nothing of it survives; the SuperLink declares it offline after two missed heartbeats
    (~60 s at Flower's 30 s interval) and answers for it with a NODE_UNAVAILABLE error,
    well before round_timeout=150: round 2 is trained by clients 0 and 1 only and logs
    client 2's failure, and the run completes."""
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    args = [
        *overrides(tiny_overrides, tmp_path / "runs"),
        "num_clients=3",
        "min_clients=2",
        "round_timeout=150",
        "run_name=tls",
    ]
    run_dir = tmp_path / "runs" / "tls"
    kill = KillDuringRound(run_dir, node=2, round=2)
    fed, out = deploy_and_run(tmp_path, args, certs=certs, num_nodes=3, meanwhile=kill)
    assert kill.error is None, repr(kill.error)
    assert kill.killed and kill.left == [], (kill.killed, kill.left)
    assert fed.processes_of_node(2) == []
    # The kill landed mid-run, in round 2: the node held round 2's instruction and had not
    # answered it, round 1's row was the last one written, and the run was still going.
    assert kill.run_ended_before_kill is False
    assert kill.rounds_at_kill == [0, 1], kill.rounds_at_kill
    assert kill.log_after_receipt is not None
    assert "Sending: train message" not in kill.log_after_receipt, kill.log_after_receipt
    assert kill.seconds_to_row is not None and kill.seconds_to_row < 150

    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["trained"] for r in rows[1:]] == ["B", "A"]
    assert [r["clients"] for r in rows[1:]] == [[0, 1, 2], [0, 1]]
    assert set(rows[0]["client_accuracy"]) == {"0", "1", "2"}
    assert set(rows[2]["client_accuracy"]) == {"0", "1"}  # only online SuperNodes evaluate
    assert rows[1]["accuracy"] is None and rows[2]["accuracy"] is not None
    assert "failures" not in rows[0] and "failures" not in rows[1]
    (failure,) = rows[2]["failures"]
    assert failure["client"] == 2 and failure["stage"] == "train"
    assert "Node Unavailable" in failure["error"]
    logged = [line for line in out.splitlines() if "client 2 failed in train: " in line]
    assert logged and all("Node Unavailable" in line for line in logged), out[-4000:]
    assert "round 2/2" in out and "1 failed" in out
    assert (run_dir / "summary.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    print(f"killed {kill.killed}; round 2 written {kill.seconds_to_row:.0f}s after the kill")


def serverapp_processes(fed: LocalFederation) -> list[psutil.Process]:
    """The SuperLink's ServerApp processes (``flwr-serverapp``): the server of a run."""
    found = []
    for child in psutil.Process(fed.procs[0].pid).children(recursive=True):
        try:
            if any("flwr-serverapp" in arg for arg in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_deployment_resumes_after_the_server_side_is_killed(tiny_overrides, tmp_path):
    """Four rounds of RoLoRA on two SuperNodes. Once round 2's row is in metrics.jsonl, the
    server side is SIGKILLed: the ``fedlora run runtime=flower`` process (and its ``flwr
    log``) and the run's ServerApp process on the SuperLink, which holds the server's
    state. ``fedlora run --resume RUN_DIR`` waits until the SuperLink has marked that run
    failed (its heartbeats stopped), submits a new run whose ServerApp starts from the
    checkpoint and finds the SuperNodes again; the SuperNodes run throughout. The run ends
    with the adapter of the same run left alone (in-process: the uninterrupted deployment
    equals it, test above) and with every round's row."""
    args = [
        *[o for o in overrides(tiny_overrides, tmp_path / "runs") if not o.startswith("rounds=")],
        "rounds=4",
        "eval_every=1",
    ]
    run_dir = tmp_path / "runs" / "killed"
    fed = LocalFederation(tmp_path, num_nodes=2)
    fedlora = str(Path(sys.executable).parent / "fedlora")
    try:
        fed.start()
        launcher = subprocess.Popen(
            [fedlora, "run", *args, "run_name=killed", "runtime=flower"]
            + [f"superlink={fed.address}", "insecure=true"],
            env=fed.env,
            cwd=tmp_path,
            stdout=(tmp_path / "launcher.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        while 2 not in [r["round"] for r in written_rows(run_dir)]:
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 2 was not written in time"
            time.sleep(0.5)
        servers = serverapp_processes(fed)
        assert len(servers) == 1, servers
        doomed = [launcher.pid, *(c.pid for c in psutil.Process(launcher.pid).children(True))]
        for pid in [*doomed, servers[0].pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=30)
        assert launcher.returncode == -signal.SIGKILL  # killed, not finished
        psutil.wait_procs([servers[0]], timeout=30)
        assert not (run_dir / "summary.json").exists()
        rows_at_kill = [r["round"] for r in written_rows(run_dir)]
        assert max(rows_at_kill) < 4, rows_at_kill

        resumed = run_bounded(
            [fedlora, "run", "--resume", str(run_dir)],
            env=fed.env,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
        )
        fed.snapshot()
        assert all(p.poll() is None for p in fed.procs[1:]), "a SuperNode stopped"
    finally:
        left = fed.stop()
    assert not left, f"processes still alive after stop: {left}"
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "(resumed) started on SuperLink" in resumed.stdout, resumed.stdout[-4000:]
    after = int(re.search(r"resuming after round (\d)/4", resumed.stdout).group(1))  # type: ignore[union-attr]
    assert after >= 2 and f"round {after + 1}/4 trained" in resumed.stdout

    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["trained"] for r in rows[1:]] == ["B", "A", "B", "A"]
    assert not any("failures" in r for r in rows)
    recipes.run(load_config(None, [*args, "run_name=inprocess"]), log=silent)
    deployed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    local = load_file(tmp_path / "runs" / "inprocess" / "adapter" / "adapter_model.safetensors")
    assert deployed.keys() == local.keys()
    for key in local:
        torch.testing.assert_close(deployed[key], local[key], atol=1e-6, rtol=0)
    local_rows = read_metrics(tmp_path / "runs" / "inprocess")
    for r, loc in zip(rows, local_rows, strict=True):
        assert r["accuracy"] == pytest.approx(loc["accuracy"], abs=1e-6)
