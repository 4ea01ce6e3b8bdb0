"""fedlora on Flower: the same methods and client training as a Flower app.

``runtime=flower-sim`` runs the app in Flower's simulation engine (Ray) on this machine;
``runtime=flower`` launches it on a running SuperLink and its SuperNodes. Importing this
package switches off Flower's telemetry and its per-run dependency installation (both
need the internet) unless the environment says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

# Read by flwr when it is first imported: set before any flwr import below.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from fedlora.config import Config  # noqa: E402
from fedlora.log import Log, stderr_log  # noqa: E402


def run_on_flower(cfg: Config, *, log: Log = stderr_log, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on Flower (``cfg.runtime`` is ``flower-sim`` or ``flower``); the summary.

    ``resume`` (``fedlora run --resume``): continue the run directory
    ``output_dir/run_name`` after its last checkpoint, in a new simulation
    (``flower-sim``) or as a new Flower run on the SuperLink (``flower``; a run whose
    ServerApp is still running there is followed instead of started twice).
    """
    if cfg.runtime == "flower-sim":
        from fedlora.runtime.flower.sim import run_simulation

        return run_simulation(cfg, log=log, resume=resume)
    from fedlora.runtime.flower.deploy import launch

    return launch(cfg, log=log, resume=resume)


__all__ = ["run_on_flower"]
