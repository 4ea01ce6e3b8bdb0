"""Clients in lockstep (``client_parallel``) against clients one after another.

For each client count K: K clients of the packaged model on BBC News (iid, one batch of
``--batch`` x ``--length`` tokens per step) each take ``--steps`` local steps, first one
after another (``train_client``, today's path), then together (``train_clients_lockstep``,
one forward and backward pass per step). Printed per K: client-steps per second of each,
their ratio, peak device memory on CUDA, and the largest difference between the two
paths' updates (dropout is switched off in the model so that they must agree).

    .venv/bin/python bench/lockstep.py                          # the CPU, 3 and 10 clients
    .venv/bin/python bench/lockstep.py --device cuda --clients 3 10   # the GPU check's rows
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import torch

    from fedlora.client import LocalTraining, train_client
    from fedlora.client.lockstep import train_clients_lockstep
    from fedlora.config import load_config
    from fedlora.federation import build_federation
    from fedlora.log import silent
    from fedlora.methods import build_method

    torch.set_num_threads(1 if args.device == "cpu" else 4)
    most = max(args.clients)
    cfg = load_config(
        None,
        [
            f"model={args.model}",
            f"device={args.device}",
            "dataset=bbc-news",
            f"num_clients={most}",
            "partition=iid",
            "method=fedavg",
            f"rank={args.rank}",
            f"batch_size={args.batch}",
            f"max_length={args.length}",
            f"max_train_examples={most * args.batch * 2 + 50}",
            "max_test_examples=8",
            "lr=0.001",
            "threads=1" if args.device == "cpu" else "threads=4",
            "progress=false",
        ],
    )
    fed = build_federation(cfg, log=silent)
    for module in fed.adapter.model.modules():  # both paths must give the same updates
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plan = build_method("fedavg", cfg).plan(1)
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def sequential(jobs, steps):
        settings = LocalTraining.from_config(cfg.replace(local_steps=steps))
        return [
            train_client(
                adapter=fed.adapter,
                state=state,
                data=data,
                plan=plan,
                settings=settings,
                client_id=cid,
                seed=0,
            )
            for cid, state, data in jobs
        ]

    def lockstep(jobs, steps):
        settings = LocalTraining.from_config(cfg.replace(local_steps=steps))
        return train_clients_lockstep(
            adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
        )

    device = torch.device(args.device)
    print(
        f"model {args.model}, rank {args.rank}, batch {args.batch} x {args.length} tokens, "
        f"{args.steps} steps per client, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ", 1 thread")
    )
    print(f"{'clients':>7} {'sequential':>14} {'lockstep':>14} {'speed-up':>9} {'max |diff|':>11}")
    for k in args.clients:
        jobs = [(cid, fed.initial_state, fed.encoded[cid].train) for cid in range(k)]
        results = {}
        for name, train in (("sequential", sequential), ("lockstep", lockstep)):
            if args.warmup:
                train(jobs, args.warmup)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            updates = train(jobs, args.steps)
            sync()
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
            results[name] = (k * args.steps / seconds, peak, updates)
        diff = max(
            float((a - b).abs().max())
            for u, v in zip(results["sequential"][2], results["lockstep"][2], strict=True)
            for kind in ("A", "B", "head")
            for a, b in zip(getattr(u, kind).values(), getattr(v, kind).values(), strict=True)
        )
        seq, lock = results["sequential"][0], results["lockstep"][0]
        memory = ""
        if cuda:
            memory = f"  peak MiB {results['sequential'][1]:.0f} / {results['lockstep'][1]:.0f}"
        print(
            f"{k:>7} {seq:>9.2f} st/s {lock:>9.2f} st/s {lock / seq:>8.2f}x {diff:>11.2e}{memory}",
            flush=True,
        )


if __name__ == "__main__":
    main()
