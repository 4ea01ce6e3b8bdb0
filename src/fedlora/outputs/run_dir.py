"""A run's directory: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``adapter/``, ``plots/``.

A run never writes into a directory that holds another run's results unless asked to
(``overwrite=true``), metrics are appended and flushed one round at a time, and JSON files
are replaced atomically (written to a temporary file, then renamed), so an interrupted or
failed run leaves every file it had finished intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import Config, dump_config
from fedlora.errors import FedLoraError


def _clean(value: Any) -> Any:
    """JSON without NaN: a metric that was not computed is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The evaluated round of highest accuracy after training started.

    Round 0 is the untrained model: it stays in the metrics as the baseline but is never
    "best" (a run that does not learn would otherwise report its starting accuracy).
    Raises FedLoraError when no round after 0 was evaluated.
    """
    trained = [r for r in rows if r["round"] > 0 and r.get("accuracy") is not None]
    if not trained:
        raise FedLoraError("no round after round 0 was evaluated: no best accuracy")
    return max(trained, key=lambda r: r["accuracy"])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FedLoraError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _holds_results(path: Path) -> bool:
    """Anything but what a run that stopped before its first metrics row leaves behind
    (its ``config.yaml``, an empty ``metrics.jsonl`` and, deployed on Flower, the id of its
    Flower run: e.g. a bad data file), which a rerun under the same name may replace."""
    entries = {p.name for p in path.iterdir()}
    if not entries <= {"config.yaml", "metrics.jsonl", "flower-run.json"}:
        return True
    metrics = path / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


class RunDir:
    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and _holds_results(self.path):
            if not overwrite:
                raise FedLoraError(
                    f"run directory {self.path} already holds results; "
                    "choose another run_name or set overwrite=true"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")

    @classmethod
    def reopen(cls, path: str | Path) -> RunDir:
        """An existing run's directory, kept as it is (``fedlora run --resume``)."""
        run_dir = cls.__new__(cls)
        run_dir.path = Path(path)
        if not (run_dir.path / "config.yaml").is_file():
            raise FedLoraError(f"{run_dir.path} is not a run directory (no config.yaml)")
        run_dir.metrics_path = run_dir.path / "metrics.jsonl"
        return run_dir

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def plots_dir(self) -> Path:
        path = self.path / "plots"
        path.mkdir(exist_ok=True)
        return path

    def write_config(self, cfg: Config) -> None:
        dump_config(cfg, self.path / "config.yaml")

    def log_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)
