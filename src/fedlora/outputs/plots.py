"""PNG plots with matplotlib (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _evaluated(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(rows: Sequence[Mapping[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    """Global and per-client accuracy per round (as the FRA-LoRA paper plots them), the
    mean personalised accuracy when clients keep models of their own (FedSA-LoRA), and
    the aggregation error per round when the method has one."""
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x, y = _evaluated(rows, "accuracy")
    ax.plot(x, y, "k-o", lw=2, ms=3, label="global (global eval set)")
    x, y = _evaluated(rows, "personal_accuracy")
    if x:  # each client's own model on its own eval split, weighted by split size
        ax.plot(x, y, "b-s", lw=2, ms=3, label="mean personalised (clients' eval splits)")
    client_ids = sorted({c for r in rows for c in (r.get("client_accuracy") or {})}, key=int)
    for cid in client_ids:
        pts = [
            (r["round"], r["client_accuracy"][cid])
            for r in rows
            if (r.get("client_accuracy") or {}).get(cid) is not None
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1, label=f"client {cid}")
    ax.set(xlabel="round", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    errors = [
        (r["round"], r["agg_error"]["mean"])
        for r in rows
        if r.get("agg_error") and r["agg_error"]["mean"] is not None
    ]
    # exact methods log rounding-level errors (~1e-16): nothing to draw
    if any(e > 1e-6 for _, e in errors):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot([e[0] for e in errors], [e[1] for e in errors], "r-o", ms=3)
        ax.set(
            xlabel="round", ylabel="agg_error ||M - X||_F / ||M||_F (mean over layers)", title=title
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "agg_error.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_comparison(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, title: str
) -> Path:
    """Global accuracy per round, one line per method (dotted, in the same colour: the
    mean personalised accuracy of a method whose clients keep models of their own)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for name, rows in runs.items():
        x, y = _evaluated(rows, "accuracy")
        (line,) = axes[0].plot(x, y, "-o", ms=3, label=name)
        px, py = _evaluated(rows, "personal_accuracy")
        if px:
            axes[0].plot(px, py, ":s", ms=3, color=line.get_color(), label=f"{name} (personal)")
        uploaded, acc = [], []
        total = 0
        for r in rows:
            total += r.get("upload_bytes") or 0
            if r.get("accuracy") is not None:
                uploaded.append(total / 1e6)
                acc.append(r["accuracy"])
        axes[1].plot(uploaded, acc, "-o", ms=3, label=name)
    axes[0].set(xlabel="round", ylabel="accuracy (global eval set)", title=title)
    axes[1].set(xlabel="MB uploaded (all clients)", ylabel="accuracy", title="accuracy vs upload")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
