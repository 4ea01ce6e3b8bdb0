"""The end of a run, in every runtime: ``summary.json`` and the plots.

:func:`write_results` turns a finished run's result (what
:meth:`fedlora.runtime.server.Server.finish` returns) into ``summary.json`` and
``plots/``; the in-process recipes and the Flower ServerApp both call it, so a run
directory looks the same whichever runtime wrote it. :func:`warn_one_phase` is the one
line a run logs before its first round when its evaluation schedule can only ever see one
phase of a periodic method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlora.config import Config
from fedlora.outputs.plots import plot_run
from fedlora.outputs.run_dir import RunDir, best_row

if TYPE_CHECKING:
    from collections.abc import Callable

    from fedlora.federation import Federation
    from fedlora.methods import LoRAMethod


def summarise(
    cfg: Config, fed: Federation, result: dict[str, Any], run_dir: RunDir
) -> dict[str, Any]:
    """The ``summary.json`` object of a finished run."""
    rows = result["rows"]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    best = best_row(rows)  # over the rounds after training started, never round 0
    return {
        "method": cfg.method,
        "model": cfg.model,
        "model_path": fed.model_path,
        "dataset": fed.dataset.name,
        "label_names": fed.dataset.label_names,
        "num_clients": cfg.num_clients,
        # Flower runs report the sizes the SuperNodes hold (their own data, if they have it).
        "client_train_sizes": result.get("client_train_sizes")
        or {c.client_id: len(c.train) for c in fed.clients},
        "client_eval_sizes": {c.client_id: len(c.eval) for c in fed.clients},
        "eval_size": len(fed.test),
        "rounds": cfg.rounds,
        "final_accuracy": evaluated[-1]["accuracy"],
        "final_loss": evaluated[-1]["loss"],
        # causal-lm: the global model's perplexity before training and at the end
        **(
            {
                "base_perplexity": rows[0]["perplexity"],
                "final_perplexity": evaluated[-1]["perplexity"],
            }
            if "perplexity" in rows[0]
            else {}
        ),
        # stateful clients (FedSA-LoRA): each client's own model on its own eval split
        **(
            {"final_personal_accuracy": evaluated[-1]["personal_accuracy"]}
            if "personal_accuracy" in evaluated[-1]
            else {}
        ),
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "total_upload_bytes": sum(r["upload_bytes"] for r in rows),
        "total_download_bytes": sum(r["download_bytes"] for r in rows),
        "adapter_bytes": result["state"].nbytes(),
        "method_state": result["method_state"],
        # Enough to recompute each client's epsilon with Opacus (docs/privacy.md).
        **({"dp": result["privacy"]} if result.get("privacy") else {}),
        "wall_time_s": result["wall_time_s"],
        "adapter_dir": str(run_dir.adapter_dir),
    }


def write_results(
    cfg: Config, fed: Federation, result: dict[str, Any], run_dir: RunDir
) -> dict[str, Any]:
    """Write ``summary.json`` and the plots of a finished run; the summary, with the
    metrics rows under ``rows`` (not written to ``summary.json``: they are in
    ``metrics.jsonl``)."""
    summary = summarise(cfg, fed, result, run_dir)
    run_dir.write_summary(summary)
    plot_run(result["rows"], run_dir.plots_dir, title=f"{cfg.method} on {fed.dataset.name}")
    return summary | {"rows": result["rows"]}


def warn_one_phase(cfg: Config, method: LoRAMethod, log: Callable[[str], None]) -> None:
    """One line when evaluation only ever sees one phase of a periodic method (RoLoRA with
    an even ``eval_every`` is evaluated after ``A`` rounds only)."""
    if method.period > 1 and cfg.eval_every % method.period == 0:
        log(
            f"warning: eval_every={cfg.eval_every} is a multiple of {method.label}'s period "
            f"({method.period} rounds), so evaluation sees one phase only; use an "
            f"eval_every that is not (eval_every=1 sees every round)"
        )
