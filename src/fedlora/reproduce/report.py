"""``fedlora report RUNS_DIR``: paper-style tables and plots from finished runs.

Every directory under ``RUNS_DIR`` holding ``config.yaml``, ``metrics.jsonl`` and
``summary.json`` is a run. Runs whose configs differ only in ``seed`` (and in where they
were written) form one row: accuracy is reported as mean ± sample standard deviation over
the seeds, as the papers do. The columns are the config keys that vary between rows.
Writes ``report.md``, ``accuracy_per_round.png`` (mean global accuracy per round, one line
per row) and ``accuracy_vs_upload.png`` (against cumulative megabytes uploaded by all
clients).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.outputs import best_row, read_metrics

# Where or how a run was written, not what it computed.
_IGNORED = {"seed", "output_dir", "run_name", "overwrite", "progress", "threads"}
# The settings a reader of a paper-style table needs, printed above it when all runs share them.
_SHOWN = (
    "model",
    "dataset",
    "method",
    "num_clients",
    "partition",
    "rank",
    "layers",
    "rounds",
    "local_steps",
    "local_epochs",
    "eval_split",
    "batch_size",
    "lr",
    "max_train_examples",
)


@dataclass(frozen=True)
class Run:
    path: Path
    config: Mapping[str, Any]
    summary: Mapping[str, Any]
    rows: Sequence[Mapping[str, Any]]

    @property
    def upload_per_round(self) -> float:
        trained = [r for r in self.rows if r["round"] > 0]
        return sum(r["upload_bytes"] for r in trained) / max(1, len(trained))


def find_runs(root: str | Path) -> list[Run]:
    runs = []
    for summary in sorted(Path(root).rglob("summary.json")):
        path = summary.parent
        if not (path / "config.yaml").is_file():
            continue
        runs.append(
            Run(
                path=path,
                config=yaml.safe_load((path / "config.yaml").read_text()),
                summary=json.loads(summary.read_text()),
                rows=read_metrics(path),
            )
        )
    if not runs:
        raise FedLoraError(f"no finished runs (summary.json + config.yaml) under {root}")
    return runs


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config with the keys it predates at their defaults: a run written before a
    key existed ran as that key's default does (keys are added without changing what an
    existing config computes), so it is not a difference between rows."""
    defaults = Config().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in config}, **config}


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def group_runs(runs: Sequence[Run]) -> tuple[list[str], list[tuple[dict[str, Any], list[Run]]]]:
    """Rows of runs equal but for the seed, and the config keys that tell rows apart."""
    keys = sorted({k for r in runs for k in r.config} - _IGNORED)
    configs = [_with_defaults(dict(r.config)) for r in runs]
    varying = [k for k in keys if len({_key(c.get(k)) for c in configs}) > 1]
    groups: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run, config in zip(runs, configs, strict=True):
        ident = {k: config.get(k) for k in varying}
        groups.setdefault(_key(ident), (ident, []))[1].append(run)
    return varying, list(groups.values())


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """``81.23 ± 0.45`` (percent), or just the mean for one seed."""
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}"


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "–" if value is None else str(value)


def report_table(runs: Sequence[Run]) -> str:
    varying, groups = group_runs(runs)
    header = [*varying, "seeds", "final acc. (%)", "best acc. (%)", "upload / round (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ident, members in groups:
        final = [r.summary["final_accuracy"] for r in members]
        # from the metrics, after round 0 (summaries written before that rule counted it)
        best = [best_row(r.rows)["accuracy"] for r in members]
        upload = statistics.fmean(r.upload_per_round for r in members) / 1e6
        cells = [_cell(ident[k]) for k in varying]
        cells += [str(len(members)), mean_std(final), mean_std(best), f"{upload:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(ident: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in ident.items()) or "all runs"


def _mean_curve(members: Sequence[Run]) -> tuple[list[int], list[float], list[float]]:
    """Rounds evaluated in every seed, mean accuracy, and mean cumulative MB uploaded."""
    per_run = []
    for run in members:
        cumulative, points = 0, {}
        for row in run.rows:
            cumulative += row["upload_bytes"]
            if row.get("accuracy") is not None:
                points[row["round"]] = (row["accuracy"], cumulative / 1e6)
        per_run.append(points)
    rounds = sorted(set.intersection(*(set(p) for p in per_run)))
    acc = [statistics.fmean(p[t][0] for p in per_run) for t in rounds]
    mb = [statistics.fmean(p[t][1] for p in per_run) for t in rounds]
    return rounds, acc, mb


def plot_report(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, groups = group_runs(runs)
    curves = [(_label(ident), *_mean_curve(members)) for ident, members in groups]
    written = []
    for name, xlabel, pick in (
        ("accuracy_per_round.png", "round", lambda c: c[1]),
        ("accuracy_vs_upload.png", "uploaded by all clients (MB, cumulative)", lambda c: c[3]),
    ):
        fig, ax = plt.subplots(figsize=(7.0, 4.2))
        for curve in curves:
            ax.plot(pick(curve), curve[2], "-o", ms=2, lw=1.2, label=curve[0])
        ax.set(xlabel=xlabel, ylabel="global accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=1 + len(curves) // 10)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def write_report(root: str | Path, *, title: str | None = None) -> str:
    """Write ``report.md`` and the two plots into ``root``; return the markdown."""
    root = Path(root)
    runs = find_runs(root)
    first = runs[0].config
    heading = title or (
        f"{root.name}: {first.get('dataset')}, model {first.get('model')}, {len(runs)} runs"
    )
    varying, _ = group_runs(runs)
    # local_epochs, when set, is what ran: local_steps was ignored (fedlora.client.train)
    hidden = {"local_steps"} if first.get("local_epochs") is not None else set()
    shown = [k for k in _SHOWN if first.get(k) is not None and k not in {*varying, *hidden}]
    shared = [f"{k}={_cell(first[k])}" for k in shown]
    text = f"# {heading}\n\nShared by every run: {', '.join(shared)}.\n\n{report_table(runs)}\n"
    (root / "report.md").write_text(text)
    plot_report(runs, root)
    return text
