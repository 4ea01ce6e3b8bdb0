"""Reproducing the papers: sweeps over a grid, paper-style reports, and the RoLoRA paper's
linear-model analysis and upload table. See ``configs/papers/`` and ``docs/results.md``."""

from fedlora.reproduce.report import write_report
from fedlora.reproduce.sweep import grid_points, parse_grid, point_name, sweep
from fedlora.reproduce.upload import upload_per_round

__all__ = [
    "grid_points",
    "parse_grid",
    "point_name",
    "sweep",
    "upload_per_round",
    "write_report",
]
