"""``runtime=flower-sim``: the fedlora Flower app in Flower's simulation engine.

``num_clients`` virtual SuperNodes (``partition-id`` 0..K-1) run the ClientApp in
``sim_actors`` Ray actors (one CPU each, each with its own copy of the model and data);
the ServerApp runs in a thread of this process. Nothing is downloaded (telemetry and
dependency installation are off, see :mod:`fedlora.runtime.flower`) and no SuperLink
process is started: Ray is shut down when the run ends.

``output_dir`` is made absolute here: the virtual SuperNodes resolve the run directory
(where, by default, each keeps its client's state: its DP accountant) as the server does.
A resumed simulation (``fedlora run --resume``) is a new simulation whose ServerApp starts
from the run directory's checkpoint, its SuperNodes from their state on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation as flower_run_simulation

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.log import Log, stderr_log
from fedlora.runtime.flower.app import client_app, serve


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources: one CPU per ClientApp actor and ``sim_gpus`` of a GPU each (Flower's
    ``client_resources``); Ray is given the GPUs torch sees when any share is asked for."""
    import torch

    gpus = torch.cuda.device_count() if cfg.sim_gpus > 0 else 0
    if cfg.sim_gpus > 0 and gpus == 0:
        raise FedLoraError(f"sim_gpus={cfg.sim_gpus:g}: torch sees no CUDA device on this machine")
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": float(cfg.sim_gpus)},
        "init_args": {"num_cpus": cfg.sim_actors, "num_gpus": gpus, "include_dashboard": False},
    }


def run_simulation(cfg: Config, *, log: Log = stderr_log, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` in the simulation engine and return the run's summary; ``resume``:
    continue its run directory after the last checkpoint."""
    return run_simulations([cfg], log=log, resume=resume)[0]


def run_simulations(
    cfgs: Sequence[Config], *, log: Log = stderr_log, resume: bool = False
) -> list[dict[str, Any]]:
    """Several runs one after the other on one simulated federation (one Ray start).

    The configs must agree on ``num_clients`` and ``sim_actors``; a run that fails stops
    the rest (the run directories of the finished runs are complete on disk).
    """
    cfgs = [c.replace(output_dir=str(Path(c.output_dir).resolve())) for c in cfgs]
    first = cfgs[0]
    if any((c.num_clients, c.sim_actors) != (first.num_clients, first.sim_actors) for c in cfgs):
        raise FedLoraError("runs in one simulation must agree on num_clients and sim_actors")
    summaries: list[dict[str, Any]] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        for cfg in cfgs:
            summaries.append(serve(grid, cfg, log=log, resume=resume))

    flower_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=first.num_clients,
        backend_config=backend_config(first),  # type: ignore[arg-type]
    )
    if len(summaries) != len(cfgs):  # the engine swallowed an error of the ServerApp
        raise FedLoraError(f"the simulation stopped after {len(summaries)} of {len(cfgs)} runs")
    return summaries
