"""The two jobs behind the CLI: ``run`` one method, ``compare`` several on the same setup."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.config import Config, config_from_dict, read_yaml
from fedlora.errors import FedLoraError
from fedlora.federation import Federation, Log, build_federation, stderr_log
from fedlora.methods import LoRAMethod, build_method, with_method_defaults
from fedlora.outputs import RunDir, best_row, plot_comparison, plot_run
from fedlora.runtime import run_federated
from fedlora.runtime.checkpoint import load_checkpoint, truncate_metrics


def default_run_name(cfg: Config, kind: str) -> str:
    return f"{kind}-{cfg.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _summarise(
    cfg: Config, fed: Federation, result: dict[str, Any], run_dir: RunDir
) -> dict[str, Any]:
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


def warn_one_phase(cfg: Config, method: LoRAMethod, log: Log) -> None:
    """One line when evaluation only ever sees one phase of a periodic method (RoLoRA with
    an even ``eval_every`` is evaluated after ``A`` rounds only)."""
    if method.period > 1 and cfg.eval_every % method.period == 0:
        log(
            f"warning: eval_every={cfg.eval_every} is a multiple of {method.label}'s period "
            f"({method.period} rounds), so evaluation sees one phase only; use an "
            f"eval_every that is not (eval_every=1 sees every round)"
        )


def run_method(
    cfg: Config,
    fed: Federation,
    run_dir: RunDir,
    *,
    log: Log,
    rounds: Callable[..., dict[str, Any]] = run_federated,
) -> dict[str, Any]:
    """One method on an already built federation; writes everything into ``run_dir``.

    ``rounds`` runs the rounds (``run_federated``'s contract): the in-process loop, or the
    Flower ServerApp's (:mod:`fedlora.runtime.flower.app`).
    """
    run_dir.write_config(cfg)
    method = build_method(cfg.method, cfg)
    warn_one_phase(cfg, method, log)
    result = rounds(fed, method, run_dir, log=log)
    summary = _summarise(cfg, fed, result, run_dir)
    run_dir.write_summary(summary)
    plot_run(result["rows"], run_dir.plots_dir, title=f"{cfg.method} on {fed.dataset.name}")
    summary["rows"] = result["rows"]
    return summary


def run(cfg: Config, *, log: Log = stderr_log) -> dict[str, Any]:
    cfg = with_method_defaults(cfg)
    if cfg.runtime != "inprocess":
        from fedlora.runtime.flower import run_on_flower  # Flower is imported only when used

        cfg = cfg.replace(run_name=cfg.run_name or default_run_name(cfg, cfg.method))
        summary = run_on_flower(cfg, log=log)
        path = Path(cfg.output_dir) / str(cfg.run_name)
    else:
        run_dir = RunDir(
            Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg, cfg.method)),
            overwrite=cfg.overwrite,
        )
        fed = build_federation(cfg, log=log)
        summary = run_method(cfg, fed, run_dir, log=log)
        path = run_dir.path
    if "final_accuracy" in summary:  # a deployed run's summary may live on another machine
        log(
            f"done: final accuracy {summary['final_accuracy']:.4f} "
            f"(best {summary['best_accuracy']:.4f} at round {summary['best_round']}), "
            f"upload {summary['total_upload_bytes'] / 1e6:.2f} MB, "
            f"{summary['wall_time_s']:.0f}s -> {path}"
        )
    return summary


def resume(path: str | Path, *, log: Log = stderr_log) -> dict[str, Any]:
    """Continue the in-process run in ``path`` after its last checkpoint (``fedlora run
    --resume``): the config is read back from ``config.yaml``, ``metrics.jsonl`` is cut back
    to the checkpoint's round, and the rounds after it run as they would have."""
    run_dir = RunDir.reopen(path)
    summary_path = run_dir.path / "summary.json"
    if summary_path.is_file():
        log(f"{run_dir.path} already finished: nothing to resume")
        return json.loads(summary_path.read_text())
    cfg = config_from_dict(read_yaml(run_dir.path / "config.yaml"))
    if cfg.runtime != "inprocess":
        raise FedLoraError("--resume continues in-process runs only (runtime=inprocess)")
    ckpt = load_checkpoint(run_dir.path)
    truncate_metrics(run_dir.metrics_path, None if ckpt is None else ckpt.round)
    fed = build_federation(cfg, log=log)
    method = build_method(cfg.method, cfg)
    result = run_federated(fed, method, run_dir, log=log, resume=ckpt)
    summary = _summarise(cfg, fed, result, run_dir)
    run_dir.write_summary(summary)
    plot_run(result["rows"], run_dir.plots_dir, title=f"{cfg.method} on {fed.dataset.name}")
    log(f"done: final accuracy {summary['final_accuracy']:.4f} -> {run_dir.path}")
    return summary | {"rows": result["rows"]}


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | final accuracy | best accuracy (round) | upload total (MB) | upload per round (MB) | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} ({s['best_round']}) | "
            f"{s['total_upload_bytes'] / 1e6:.2f} | {s['total_upload_bytes'] / 1e6 / s['rounds']:.3f} | "
            f"{s['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


def compare(cfg: Config, *, log: Log = stderr_log) -> dict[str, dict[str, Any]]:
    """Every method in ``cfg.methods`` on the same data, partition, seed and starting model:
    in-process, or one after another on one simulated Flower federation
    (``runtime=flower-sim``)."""
    if cfg.runtime == "flower":
        raise FedLoraError(
            "fedlora compare runs in-process or on Flower's simulation engine "
            "(runtime=inprocess or flower-sim); on a deployment run one method at a time: "
            "fedlora run ... method=<name> runtime=flower"
        )
    root = Path(cfg.output_dir) / (cfg.run_name or default_run_name(cfg, "compare"))
    methods = list(cfg.methods)
    if cfg.runtime == "flower-sim":
        if "centralized" in methods:
            log("centralized pools every client's data on one trainer: not run on Flower")
            methods.remove("centralized")
        if not methods:
            raise FedLoraError("no federated method left to compare on Flower")
        from fedlora.runtime.flower.sim import run_simulations  # Flower loads only when used

        cfgs = [
            with_method_defaults(cfg.replace(method=m, output_dir=str(root), run_name=m))
            for m in methods
        ]
        summaries = dict(zip(methods, run_simulations(cfgs, log=log), strict=True))
    else:
        run_dirs = {m: RunDir(root / m, overwrite=cfg.overwrite) for m in methods}
        fed = build_federation(cfg, log=log)
        summaries = {}
        for method in methods:
            method_cfg = with_method_defaults(cfg.replace(method=method, run_name=None))
            fed.cfg = method_cfg
            summaries[method] = run_method(method_cfg, fed, run_dirs[method], log=log)
    fed_name = next(iter(summaries.values()))["dataset"]
    table = comparison_table(summaries)
    work = (
        f"{cfg.local_epochs:g} local epochs"
        if cfg.local_epochs is not None
        else f"{cfg.local_steps} local steps"
    )
    header = (
        f"# fedlora compare: {fed_name}, model {cfg.model}, {cfg.num_clients} clients "
        f"({cfg.partition} partition), {cfg.rounds} rounds x {work}, "
        f"rank {cfg.rank}, seed {cfg.seed}\n\n"
    )
    (root / "comparison.md").write_text(header + table + "\n")
    plot_comparison(
        {m: s["rows"] for m, s in summaries.items()},
        root / "comparison.png",
        title=f"{fed_name}, {cfg.num_clients} clients",
    )
    print(header + table, flush=True)
    log(f"wrote {root / 'comparison.md'} and {root / 'comparison.png'}")
    return summaries
