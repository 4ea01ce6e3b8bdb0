"""Framework overhead: fedlora's round loop against a bare PyTorch + PEFT loop.

1. Time. The same client training steps (same model, data, batches, optimizer, number
   of clients, rounds and local steps) run twice: through ``run_federated`` (sampling,
   adapter swaps, aggregation, metrics, per-round checkpoints) and in a bare loop
   (load the global LoRA tensors, AdamW steps, average the tensors). **Evaluation is
   excluded** from the federated time (its ``time_eval_s`` are subtracted); the bare loop
   does none. Reported as wall time and as this process's CPU time (``time.process_time``):
   on a shared machine the CPU-time ratio is the steadier of the two.
2. Memory. Peak RSS of a one-round run with 100 virtual clients against 1 client (each in
   a fresh subprocess, same data and model): clients are adapters, not models.

    .venv/bin/python bench/overhead.py [--clients 10] [--rounds 2] [--local-steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedlora.client.train import batch_indices, client_seed
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.outputs import RunDir
from fedlora.runtime import inprocess, run_federated

BASE = ["model=minilm", "dataset=bbc-news", "max_length=64", "batch_size=16", "lr=0.001"]
BASE += ["method=fedavg", "partition=iid", "rank=8", "threads=1", "progress=false"]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def federated(fed, tmp: Path, name: str) -> tuple[float, float]:
    """(wall, cpu) seconds of ``run_federated`` minus its evaluations (timed by wrapping
    ``evaluate_global``, in wall and CPU time alike)."""
    spent = [0.0, 0.0]
    evaluate_global = inprocess.evaluate_global

    def timed(fed_):
        w, c = _clock()
        out = evaluate_global(fed_)
        spent[0] += time.perf_counter() - w
        spent[1] += time.process_time() - c
        return out

    inprocess.evaluate_global = timed
    try:
        wall0, cpu0 = _clock()
        run_federated(fed, build_method("fedavg", fed.cfg), RunDir(tmp / name), log=silent)
        wall1, cpu1 = _clock()
    finally:
        inprocess.evaluate_global = evaluate_global
    return wall1 - wall0 - spent[0], cpu1 - cpu0 - spent[1]


def bare(fed) -> tuple[float, float]:
    """The same steps in plain PyTorch + PEFT: named parameters, AdamW, mean of tensors."""
    cfg = fed.cfg
    model = fed.adapter.model
    fed.reset()
    trainable = {
        n: p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n
    }
    global_state = {n: p.detach().clone() for n, p in trainable.items()}
    wall0, cpu0 = _clock()
    for t in range(1, cfg.rounds + 1):
        replies = []
        for cid, splits in fed.encoded.items():
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(global_state[n])
                    p.requires_grad_(True)
            opt = torch.optim.AdamW(trainable.values(), lr=cfg.lr)
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, t, cid))
            model.train()
            for idx in batch_indices(
                len(splits.train), steps=cfg.local_steps, batch_size=cfg.batch_size, generator=gen
            ):
                model(**splits.train.batch(idx)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            replies.append({n: p.detach().clone() for n, p in trainable.items()})
        global_state = {n: torch.stack([r[n] for r in replies]).mean(0) for n in trainable}
    wall1, cpu1 = _clock()
    return wall1 - wall0, cpu1 - cpu0


def memory_child(clients: int) -> None:
    """One round with ``clients`` clients; print peak RSS in MB."""
    cfg = load_config(
        None,
        [*BASE, f"num_clients={clients}", "rounds=1", "local_steps=1", "max_train_examples=1000"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        fed = build_federation(cfg, log=silent)
        run_federated(fed, build_method("fedavg", cfg), RunDir(Path(tmp) / "r"), log=silent)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(clients: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(clients)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-child", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    cfg = load_config(
        None,
        [
            *BASE,
            f"num_clients={args.clients}",
            f"rounds={args.rounds}",
            f"local_steps={args.local_steps}",
            "eval_every=1000",  # only round 0 and the last round are evaluated
            "max_test_examples=64",
        ],
    )
    fed = build_federation(cfg, log=silent)
    print(
        f"MiniLM, BBC News, {args.clients} clients x {args.local_steps} local steps x "
        f"{args.rounds} rounds, batch {cfg.batch_size}, rank {cfg.rank}, 1 thread; "
        f"best of {args.repeats} (evaluation excluded)"
    )
    fed_times, bare_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so load changes hit both alike
            bare_times.append(bare(fed))
            fed_times.append(federated(fed, Path(tmp), f"run{i}"))
    fw, fc = min(t[0] for t in fed_times), min(t[1] for t in fed_times)
    bw, bc = min(t[0] for t in bare_times), min(t[1] for t in bare_times)
    print(f"  bare PyTorch+PEFT loop : wall {bw:8.2f} s   cpu {bc:8.2f} s")
    print(f"  fedlora run_federated  : wall {fw:8.2f} s   cpu {fc:8.2f} s")
    print(
        f"  overhead (fedlora/bare): wall {fw / bw:8.3f}     cpu {fc / bc:8.3f}   (target <= 1.05)"
    )
    if not args.skip_memory:
        one, hundred = peak_rss(1), peak_rss(100)
        print(
            f"peak RSS, one round, 1 step per client: 1 client {one:.0f} MB, 100 clients "
            f"{hundred:.0f} MB, ratio {hundred / one:.3f} (target <= 1.5)"
        )


if __name__ == "__main__":
    main()
