"""``fedlora sweep CONFIG --grid key=v1,v2 ...``: one run per point of a cartesian grid.

Every point is the config plus one value per grid key, run into
``output_dir/<sweep name>/<point name>`` where the point's name is made from its values
(``method-rolora_rank-2_seed-0``), so the same grid always maps to the same directories.
A point whose directory holds a ``summary.json`` is finished and skipped; one with a
``config.yaml`` but no summary was interrupted and is resumed from its last checkpoint;
so re-running the same command after a crash (or a ``kill -9``) finishes the sweep.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

from fedlora import recipes
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.log import Log, stderr_log
from fedlora.methods import check_config


def _split_values(raw: str) -> list[str]:
    """``1,2,4`` -> three values; commas inside brackets stay (``[3,4,5],[0,1]``: two)."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    if any(not v.strip() for v in values):
        raise FedLoraError(f"grid values '{raw}' hold an empty value")
    return [v.strip() for v in values]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["method=fedavg,rolora", "rank=1,2"]`` -> ``{"method": [...], "rank": [...]}``."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FedLoraError(f"grid '{item}' is not of the form key=v1,v2,...")
        if key in grid:
            raise FedLoraError(f"grid key '{key}' given twice")
        grid[key] = _split_values(raw)
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product, in the order the keys and values were given."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, str]) -> str:
    """A directory name from a point's values: ``{"method": "ffa", "layers": "[3,4]"}`` ->
    ``method-ffa_layers-3.4``."""
    parts = []
    for key, value in point.items():
        clean = re.sub(r"[^A-Za-z0-9.+-]+", ".", value.replace(",", ".")).strip(".")
        parts.append(f"{key}-{clean or 'none'}")
    return "_".join(parts) or "base"


def sweep(
    config: str | None,
    overrides: Sequence[str],
    grid: dict[str, list[str]],
    *,
    log: Log = stderr_log,
) -> list[Path]:
    """Run (or resume, or skip) every point; return the run directories in grid order."""
    base = load_config(config, list(overrides))
    name = base.run_name or (Path(config).stem if config else "sweep")
    root = Path(base.output_dir) / name
    points = grid_points(grid)
    for point in points:  # validate every point before the first run starts
        check_config(load_config(config, [*overrides, *(f"{k}={v}" for k, v in point.items())]))
    paths = []
    for i, point in enumerate(points, 1):
        path = root / point_name(point)
        paths.append(path)
        tag = f"sweep {i}/{len(points)} {path.name}"
        if (path / "summary.json").is_file():
            log(f"{tag}: finished, skipped")
            continue
        if (path / "config.yaml").is_file():
            log(f"{tag}: interrupted, resuming")
            recipes.resume(path, log=log)
            continue
        log(f"{tag}: running")
        extra = [f"{k}={v}" for k, v in point.items()]
        cfg = load_config(config, [*overrides, *extra])
        # A directory without config.yaml never got past setup: start it over.
        cfg = cfg.replace(output_dir=str(root), run_name=path.name, overwrite=True)
        recipes.run(cfg, log=log)
    return paths
