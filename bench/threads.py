"""How fast is one client training step and one evaluation batch at 1 and 2 torch threads?

    .venv/bin/python bench/threads.py [--steps 20] [--model minilm] [--max-length 64]

Prints seconds per training step (batch 16) and per evaluation batch (64) for each thread
count and the ratio, on the packaged MiniLM and BBC News. On a 2-core machine the answer
decides the default of the config key ``threads``; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(
        None, [f"model={args.model}", f"max_length={args.max_length}", "progress=false"]
    )
    fed = build_federation(cfg, log=silent)
    model, data = fed.adapter.model, fed.encoded[0].train
    print(
        f"cores: {os.cpu_count()}, model {args.model}, max_length {args.max_length}, load {os.getloadavg()[0]:.2f}"
    )
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        opt = torch.optim.AdamW(fed.adapter.set_trainable("AB", head=True), lr=1e-4)
        model.train()
        times = []
        for step in range(args.steps + 2):
            idx = torch.arange(step * 16, step * 16 + 16) % len(data)
            t0 = time.perf_counter()
            model(**data.batch(idx)).loss.backward()
            opt.step()
            opt.zero_grad()
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - t0)
        model.eval()
        evals = []
        with torch.no_grad():
            for step in range(5):
                batch = fed.test.batch(torch.arange(step * 64, step * 64 + 64))
                batch.pop("labels")
                t0 = time.perf_counter()
                model(**batch)
                evals.append(time.perf_counter() - t0)
        results[threads] = (sorted(times)[len(times) // 2], sorted(evals)[len(evals) // 2])
        print(
            f"threads={threads}: train step {results[threads][0]:.3f} s, eval batch {results[threads][1]:.3f} s (medians)"
        )
    print(
        f"speed-up of 2 threads over 1: train {results[1][0] / results[2][0]:.2f}x, "
        f"eval {results[1][1] / results[2][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
