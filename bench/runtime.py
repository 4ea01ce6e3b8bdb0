"""In-process runtime vs Flower's simulation engine on the same workload.

    .venv/bin/python bench/runtime.py [key=value ...]

Runs ``fedlora run`` twice as a child process, ``runtime=inprocess`` and
``runtime=flower-sim``, on the same workload (packaged MiniLM, BBC News, 4 clients,
5 rounds, 10 local steps, RoLoRA; every setting given on the command line) and prints,
for each, the wall time, the CPU seconds and the peak memory of the whole process tree
(the run and everything it starts: Ray's GCS, raylet and actor workers), sampled every
0.5 s with psutil. Memory is the sum of RSS (shared pages counted once per process) and
the sum of PSS (shared pages split between the processes that map them); CPU time, unlike
wall time, does not grow when other work shares the machine. Then the ratios
Flower / in-process. Extra ``key=value`` arguments override the workload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

WORKLOAD = [  # every setting spelled out: the two runs must not depend on a shared file
    "model=minilm",
    "dataset=bbc-news",
    "max_length=64",
    "num_clients=4",
    "partition=dirichlet",
    "partition_alpha=0.5",
    "rounds=5",
    "local_steps=10",
    "batch_size=16",
    "lr=0.001",
    "rank=8",
    "alpha=16",
    "method=rolora",
    "eval_every=1",
    "seed=0",
    "progress=false",
    "overwrite=true",
]


def sample_tree(root: psutil.Process, cpu: dict[int, float]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``root`` and all its descendants; records
    each process's CPU seconds (user + system) so far in ``cpu``."""
    rss = pss = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        cpu[proc.pid] = times.user + times.system
    return rss, pss


def measure(runtime: str, out: Path, extra: list[str]) -> dict[str, float]:
    cmd = [
        str(Path(sys.executable).with_name("fedlora")),
        "run",
        *WORKLOAD,
        f"output_dir={out}",
        f"run_name={runtime}",
        f"runtime={runtime}",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        rss, pss = sample_tree(root, cpu)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.5)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{runtime} failed ({proc.returncode}):\n{err[-3000:]}")
    summary = json.loads((out / runtime / "summary.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": sum(cpu.values()),
        "peak_rss_mb": peak_rss / 2**20,
        "peak_pss_mb": peak_pss / 2**20,
        "final_accuracy": summary["final_accuracy"],
    }


def main() -> None:
    extra = sys.argv[1:]
    print(f"workload: fedlora run {' '.join(WORKLOAD)} {' '.join(extra)}".rstrip(), flush=True)
    print(f"machine: {psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
        results = {rt: measure(rt, Path(tmp), extra) for rt in ("inprocess", "flower-sim")}
    print(f"load average {os.getloadavg()[0]:.1f} at end\n")
    ip, fl = results["inprocess"], results["flower-sim"]
    print(
        "| runtime | wall time (s) | CPU time, process tree (s) | peak RSS, process tree (MB) "
        "| peak PSS, process tree (MB) | final accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_pss_mb']:.0f} | {r['final_accuracy']:.4f} |"
        )
    print(
        f"\nFlower simulation / in-process: wall time x{fl['wall_s'] / ip['wall_s']:.2f}, "
        f"CPU time x{fl['cpu_s'] / ip['cpu_s']:.2f}, "
        f"peak RSS x{fl['peak_rss_mb'] / ip['peak_rss_mb']:.2f}, "
        f"peak PSS x{fl['peak_pss_mb'] / ip['peak_pss_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
