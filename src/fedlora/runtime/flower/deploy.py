"""``runtime=flower``: launch the fedlora Flower app on a running SuperLink.

``fedlora run CONFIG runtime=flower superlink=HOST:PORT (root_certificates=CA | insecure=true)``
does what a user would do with the ``flwr`` CLI, in a scratch directory so that nothing
of the user's Flower configuration is touched:

1. writes the Flower app (a ``pyproject.toml`` naming :data:`~fedlora.runtime.flower.app.server_app`
   and :data:`~fedlora.runtime.flower.app.client_app`: the code itself is the installed
   fedlora package, on the SuperLink's and every SuperNode's machine);
2. writes a Flower configuration (``FLWR_HOME/config.toml``) with one SuperLink connection;
3. ``flwr run`` with the resolved fedlora config as the run config key ``fedlora-config``
   (and ``fedlora-resume = true`` for ``fedlora run --resume``: the ServerApp then continues
   the run directory's checkpoint; the SuperNodes, which keep running, are found again);
4. follows the run's log (``flwr log --stream``) and asks its final status (``flwr ls``).

The ServerApp runs on the SuperLink's machine and writes the run directory there
(``output_dir`` is made absolute here, for the common case of one machine); the summary is
returned when that directory is readable from here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.log import Log, stderr_log
from fedlora.runtime.flower import codec
from fedlora.runtime.flower.app import FLOWER_RUN_FILE, RESUME_KEY, RUN_CONFIG_KEY

CONNECTION = "fedlora"

APP_PYPROJECT = f"""\
[project]
name = "fedlora-app"
version = "0.1.0"
description = "fedlora: federated LoRA fine-tuning (FedAvg-LoRA, FFA-LoRA, RoLoRA, ...)"
license = "Apache-2.0"
dependencies = []  # fedlora itself is installed where the SuperLink and SuperNodes run

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.runtime.flower.app:server_app"
clientapp = "fedlora.runtime.flower.app:client_app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = ""
{RESUME_KEY} = false
"""


def write_app(directory: Path) -> Path:
    app = directory / "fedlora-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT)
    return app


def write_flower_config(flwr_home: Path, cfg: Config) -> None:
    connection: dict[str, Any] = {"address": cfg.superlink}
    if cfg.insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(str(cfg.root_certificates)).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def _flwr() -> str:
    # The flwr CLI of this environment, beside this Python, else on PATH.
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if found is None:
        raise FedLoraError("the flwr command was not found (pip install flwr)")
    return found


def _call(
    args: list[str], env: dict[str, str], *, capture: bool, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_flwr(), *args],
            env=env,
            text=True,
            check=False,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
        )
    except subprocess.TimeoutExpired:
        raise FedLoraError(f"flwr {args[0]} did not finish within {timeout:.0f}s") from None


def _fail(what: str, proc: subprocess.CompletedProcess[str]) -> FedLoraError:
    try:  # flwr --format json reports its own errors as {"success": false, "error-message": ...}
        text = str(json.loads(proc.stdout)["error-message"])
    except (ValueError, KeyError, TypeError):
        text = (proc.stderr or "") + " " + (proc.stdout or "")
    return FedLoraError(f"{what} failed: {' '.join(text.split())[-400:]}")


def _status(run_id: int, env: dict[str, str]) -> str | None:
    """The run's status on the SuperLink (``running``, ``finished:completed``, ...); None
    when the SuperLink does not know the run."""
    listed = _call(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, capture=True
    )
    try:
        return str(json.loads(listed.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _follow(run_id: int, env: dict[str, str], cfg: Config) -> str:
    """Stream the run's log until it ends; its final status."""
    # A run cannot outlast its rounds' timeouts (plus the ServerApp's start-up).
    budget = cfg.round_timeout * (cfg.rounds + 2) + 600
    streamed = _call(
        ["log", str(run_id), CONNECTION, "--stream"], env, capture=False, timeout=budget
    )
    if streamed.returncode != 0:
        raise FedLoraError(f"flwr log for run {run_id} failed (exit {streamed.returncode})")
    status = _status(run_id, env)
    if status is None:
        raise FedLoraError(f"flwr ls for run {run_id} on SuperLink {cfg.superlink} failed")
    return status


def _still_running(cfg: Config, env: dict[str, str], log: Log) -> int | None:
    """A resumed run's Flower run, if the SuperLink still runs it (its ServerApp outlived
    the launcher that was killed): following it beats starting a second ServerApp on the
    same run directory."""
    record = Path(cfg.output_dir) / str(cfg.run_name) / FLOWER_RUN_FILE
    if not record.is_file():
        return None
    run_id = int(json.loads(record.read_text())["run_id"])
    status = _status(run_id, env)
    if status is None or status.startswith("finished"):
        return None
    log(f"flower: run {run_id} is still {status} on SuperLink {cfg.superlink}: following it")
    return run_id


def launch(cfg: Config, *, log: Log = stderr_log, resume: bool = False) -> dict[str, Any]:
    """Submit ``cfg`` as a run to ``cfg.superlink``, follow it to the end, return its summary.

    ``resume``: the ServerApp continues the run directory after its last checkpoint (run
    config key ``fedlora-resume``). If the run's previous Flower run is still running on
    the SuperLink (only its launcher died), it is followed first; if it does not complete
    (its ServerApp died too: the SuperLink marks it failed when its heartbeats stop, about
    a minute), the resumed run is submitted.
    """
    cfg = cfg.replace(output_dir=str(Path(cfg.output_dir).resolve()))
    if Path(cfg.model).exists():
        cfg = cfg.replace(model=str(Path(cfg.model).resolve()))
    with tempfile.TemporaryDirectory(prefix="fedlora-flwr-") as scratch:
        root = Path(scratch)
        app = write_app(root)
        write_flower_config(root / "flwr-home", cfg)
        env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"))
        status = None
        running = _still_running(cfg, env, log) if resume else None
        if running is not None:
            run_id, status = running, _follow(running, env, cfg)
        if status is None or "completed" not in status:
            run_config = root / "run_config.toml"
            run_config.write_text(
                tomli_w.dumps({RUN_CONFIG_KEY: codec.config_to_text(cfg), RESUME_KEY: resume})
            )
            started = _call(
                ["run", str(app), CONNECTION, "--run-config", str(run_config), "--format", "json"],
                env,
                capture=True,
            )
            try:
                run_id = int(json.loads(started.stdout)["run-id"])
            except (ValueError, KeyError, TypeError):
                raise _fail(f"flwr run on SuperLink {cfg.superlink}", started) from None
            log(
                f"flower: run {run_id} {'(resumed) ' if resume else ''}started on SuperLink "
                f"{cfg.superlink}"
            )
            status = _follow(run_id, env, cfg)
    summary_path = Path(cfg.output_dir) / str(cfg.run_name) / "summary.json"
    if "completed" not in status:
        raise FedLoraError(f"Flower run {run_id} ended with status '{status}': see its log above")
    if not summary_path.is_file():
        log(
            f"flower: run {run_id} {status}; its results are in {summary_path.parent} on the SuperLink's machine"
        )
        return {"run_id": run_id, "status": status}
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary | {"run_id": run_id, "status": status}
