"""The two jobs behind the CLI: ``run`` one method, ``compare`` several on the same setup."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlora.config import Config, config_from_dict, read_yaml
from fedlora.errors import FedLoraError
from fedlora.federation import Federation, build_federation
from fedlora.log import Log, stderr_log
from fedlora.methods import build_method, check_config, with_method_defaults
from fedlora.outputs import RunDir, plot_comparison
from fedlora.outputs.summary import warn_one_phase, write_results
from fedlora.runtime import run_federated
from fedlora.runtime.checkpoint import load_checkpoint, truncate_metrics


def default_run_name(cfg: Config, kind: str) -> str:
    return f"{kind}-{cfg.dataset.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_method(cfg: Config, fed: Federation, run_dir: RunDir, *, log: Log) -> dict[str, Any]:
    """One method in-process on an already built federation; writes everything into
    ``run_dir`` (the Flower ServerApp does the same around its rounds:
    :func:`fedlora.runtime.flower.app.serve`)."""
    run_dir.write_config(cfg)
    method = build_method(cfg.method, cfg)
    warn_one_phase(cfg, method, log)
    result = run_federated(fed, method, run_dir, log=log)
    return write_results(cfg, fed, result, run_dir)


def run(cfg: Config, *, log: Log = stderr_log) -> dict[str, Any]:
    check_config(cfg)
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
    """Continue the run in ``path`` after its last checkpoint (``fedlora run --resume``):
    the config is read back from ``config.yaml``, ``metrics.jsonl`` is cut back to the
    checkpoint's round, and the rounds after it run as they would have.

    In-process runs continue in this process; a ``runtime=flower-sim`` run continues in a
    new simulation, a ``runtime=flower`` run as a new Flower run on its SuperLink whose
    ServerApp starts from the checkpoint (the SuperNodes keep running throughout; see
    :func:`fedlora.runtime.flower.run_on_flower`).
    """
    run_dir = RunDir.reopen(path)
    summary_path = run_dir.path / "summary.json"
    if summary_path.is_file():
        log(f"{run_dir.path} already finished: nothing to resume")
        return json.loads(summary_path.read_text())
    cfg = config_from_dict(read_yaml(run_dir.path / "config.yaml"))
    check_config(cfg)
    if cfg.runtime != "inprocess":
        from fedlora.runtime.flower import run_on_flower  # Flower is imported only when used

        if cfg.runtime == "flower-sim":  # the simulation's ServerApp runs here: this directory
            cfg = cfg.replace(
                output_dir=str(run_dir.path.resolve().parent), run_name=run_dir.path.name
            )
        return run_on_flower(cfg, log=log, resume=True)
    ckpt = load_checkpoint(run_dir.path)
    truncate_metrics(run_dir.metrics_path, None if ckpt is None else ckpt.round)
    fed = build_federation(cfg, log=log)
    method = build_method(cfg.method, cfg)
    result = run_federated(fed, method, run_dir, log=log, resume=ckpt)
    summary = write_results(cfg, fed, result, run_dir)
    log(f"done: final accuracy {summary['final_accuracy']:.4f} -> {run_dir.path}")
    return summary


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
    check_config(cfg)
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
