"""A real deployment on loopback: a SuperLink and two SuperNodes started by the test, two
rounds of RoLoRA on a tiny BERT launched with ``fedlora run runtime=flower``, without and
with TLS. Every process is stopped by its id, and each step is bounded in time."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flower_procs import LocalFederation, run_bounded
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.config import load_config
from fedlora.federation import silent
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
    tmp_path: Path, args: list[str], certs: Path | None
) -> tuple[LocalFederation, str]:
    fed = LocalFederation(tmp_path, num_nodes=2, certs=certs)
    try:
        fed.start()
        if certs is not None:  # the SuperLink speaks TLS with the certificate made for it
            ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
            with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.version() is not None
        tls = [f"root_certificates={certs / 'ca.crt'}"] if certs else ["insecure=true"]
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


def test_deployment_with_tls(tiny_overrides, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    args = overrides(tiny_overrides, tmp_path / "runs")
    deploy_and_run(tmp_path, [*args, "run_name=tls"], certs=certs)
    check_run(tmp_path / "runs" / "tls")
