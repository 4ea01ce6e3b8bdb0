"""Simulation throughput: client training steps per second and seconds per round, for 3, 20
and 50 clients, LoRA on all blocks and on the top half, with and without the frozen-prefix
cache (``prefix_cache``, issue 15 item 1) and the cheaper evaluation (item 2), as ratios
against today's path, all from one run.

    .venv/bin/python bench/throughput.py [--clients 3 20 50] [--rounds 1] [--steps 1]

Setup: the packaged MiniLM (6 blocks) on SST-2 (``--data-dir``, GLUE layout), a seeded
``--train`` example subsample split iid among the clients, ``--test`` global eval
examples, each client's eval split as a run makes it (``eval_fraction=0.1``, at most
``max_client_eval_examples=200``). A round is what the in-process runtime does with every
client sampled: each client trains ``--steps`` steps of batch 16 from the same global
adapter (aggregation is left out: it is the same work in every variant), then the global
eval set and every client's eval split are evaluated. Round 0 evaluates first, as a run
does (which fills the eval splits' caches); the table is the mean of rounds 1..``--rounds``.
Times are CPU seconds of this process (``time.process_time``, one torch thread by
default): on a machine shared with other jobs, wall time mostly measures the others.

Variants, one model per (clients, LoRA placement), each with fresh caches: ``today`` (no
cache; evaluation in consecutive batches of ``eval_batch_size`` rows, the loop before
issue 15), ``+cache`` (item 1, in training and evaluation; a training row is computed in
full the first time it is drawn, so with few steps per client the training part gains
nothing yet), ``+eval`` (item 2: length-sorted batches under a token budget, no KV cache),
``+both``, and ``+both, warm``: every training row's states computed before round 1 (its
CPU time in ``fill s``), i.e. training once each row has been drawn once, the steady state
of a longer run. With LoRA on all blocks the cache does not apply (``prefix_cache=auto``
is off), so only ``+eval`` runs. With the cache the prefix's dropout is off in every
variant of that model (a ``p = 0`` dropout costs about what a ``p = 0.1`` one does).

A second table times one evaluation of the whole SST-2 dev set (872 examples, the size of
the issue's runs) per variant, twice: the first ``+cache`` evaluation fills the cache, the
second uses it; ``vs today`` compares second passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import torch

from fedlora.client import LocalTraining, train_client
from fedlora.client.evaluate import eval_batches
from fedlora.client.evaluate import evaluate as evaluate_new
from fedlora.config import load_config
from fedlora.data import Encoded
from fedlora.federation import Federation, build_federation
from fedlora.log import silent
from fedlora.messages import RoundPlan
from fedlora.models.device import model_device, to_device
from fedlora.models.prefix import feed


def clock() -> float:
    # CPU seconds of this process: with one torch thread, the work done, whatever else the
    # machine runs (wall time on a shared machine mostly measures the other processes)
    return time.process_time()


@torch.no_grad()
def evaluate_today(model: torch.nn.Module, data: Encoded, *, batch_size: int) -> None:
    """The evaluation loop before issue 15: consecutive rows, ``batch_size`` at a time."""
    model.eval()
    device = model_device(model)
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = to_device(data.batch(idx), device)
        labels = batch.pop("labels")
        with feed(model, data, idx):
            logits = model(**batch).logits.float()
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()


def splits(fed: Federation, cached: bool) -> tuple[dict[int, tuple[Encoded, Encoded]], Encoded]:
    """Every split without a cache, or each with a fresh empty one."""

    def fresh(data: Encoded) -> Encoded:
        bare = dataclasses.replace(data, prefix=None)
        return fed.prefix.attach(bare) if cached and fed.prefix is not None else bare

    clients = {cid: (fresh(s.train), fresh(s.eval)) for cid, s in fed.encoded.items()}
    return clients, fresh(fed.test)


def one_variant(
    fed: Federation, *, cached: bool, new_eval: bool, rounds: int, steps: int, warm: bool = False
) -> dict[str, float]:
    clients, test = splits(fed, cached)
    fill_s = 0.0
    if warm:  # every training row's states computed before round 1 (timed on its own)
        t0 = clock()
        for train, _ in clients.values():
            if train.prefix is not None:  # in length-sorted batches, as evaluation fills
                lengths = train.attention_mask.sum(dim=1)
                for rows in eval_batches(lengths, budget=64 * int(lengths.max())):
                    train.prefix.fill(train, rows)
        fill_s = clock() - t0
    settings = LocalTraining(local_steps=steps, batch_size=16, lr=1e-3)
    model, size = fed.adapter.model, fed.cfg.eval_batch_size

    def evaluate_all() -> float:
        t0 = clock()
        for data in [test, *(e for _, e in clients.values())]:
            if len(data):
                if new_eval:
                    evaluate_new(model, data, batch_size=size)
                else:
                    evaluate_today(model, data, batch_size=size)
        return clock() - t0

    evaluate_all()  # round 0
    train_s = eval_s = 0.0
    for t in range(1, rounds + 1):
        plan = RoundPlan(round=t, method="fedavg", trained="AB", train_head=True)
        t0 = clock()
        for cid, (train, _) in clients.items():
            train_client(
                adapter=fed.adapter,
                state=fed.initial_state,
                data=train,
                plan=plan,
                settings=settings,
                client_id=cid,
                seed=0,
            )
        train_s += clock() - t0
        eval_s += evaluate_all()
    total_steps = rounds * steps * len(clients)
    return {
        "steps_per_s": total_steps / train_s,
        "round_s": (train_s + eval_s) / rounds,
        "train_s": train_s / rounds,
        "eval_s": eval_s / rounds,
        "fill_s": fill_s,
    }


def eval_table(args: argparse.Namespace) -> None:
    """CPU seconds of one evaluation of the whole SST-2 dev set (872 examples), each variant
    twice (in the order ABAB), the second filling no cache."""
    print("\n| LoRA | evaluation of the SST-2 dev set | CPU s (1st) | CPU s (2nd) | vs today |")
    print("|---|---|---|---|---|")
    for label, layers in {"all blocks": None, "top half (3-5)": "[3,4,5]"}.items():
        overrides = [
            "model=minilm",
            "dataset=sst2",
            f"data_dir={args.data_dir}",
            "max_train_examples=300",
            f"threads={args.threads}",
            "device=cpu",
            *([f"layers={layers}"] if layers else []),
        ]
        fed = build_federation(load_config(None, overrides), log=silent)
        model, size = fed.adapter.model, fed.cfg.eval_batch_size
        variants = [("today", False, False), ("+eval", False, True)]
        if fed.prefix is not None:
            variants += [("+cache", True, False), ("+both", True, True)]
        tests = {name: splits(fed, cached)[1] for name, cached, _ in variants}
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        evaluate_new(model, tests["today"], batch_size=size)  # warm-up
        for _ in range(2):
            for name, _, new_eval in variants:
                t0 = clock()
                if new_eval:
                    evaluate_new(model, tests[name], batch_size=size)
                else:
                    evaluate_today(model, tests[name], batch_size=size)
                times[name].append(clock() - t0)
        for name, _, _ in variants:
            first, second = times[name]
            print(
                f"| {label} | {name} | {first:.2f} | {second:.2f} | "
                f"{times['today'][1] / second:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 20, 50])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="local steps per client")
    parser.add_argument("--train", type=int, default=1000, help="training examples in all")
    parser.add_argument("--test", type=int, default=100, help="global eval examples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default="../shared/data/glue")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    print(
        f"# {os.cpu_count()} cores, {args.threads} torch thread(s), load average at start "
        f"{os.getloadavg()[0]:.2f}; MiniLM (6 blocks) on SST-2, {args.train} train / "
        f"{args.test} global eval examples, {args.steps} step(s) of 16 per client and round, "
        f"CPU seconds of this process, mean of rounds 1..{args.rounds}"
    )
    print(
        "| LoRA | clients | variant | steps/s | s/round | train s | eval s | fill s | "
        "steps/s vs today | s/round vs today |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    placements = {"all blocks": None, "top half (3-5)": "[3,4,5]"}
    for label, layers in placements.items():
        for k in args.clients:
            overrides = [
                "model=minilm",
                "dataset=sst2",
                f"data_dir={args.data_dir}",
                f"max_train_examples={args.train}",
                f"max_test_examples={args.test}",
                f"num_clients={k}",
                "partition=iid",
                f"threads={args.threads}",
                "device=cpu",
                "progress=false",
                *([f"layers={layers}"] if layers else []),
            ]
            fed = build_federation(load_config(None, overrides), log=silent)
            # (name, cache, new evaluation, train caches filled before round 1)
            variants = [("today", False, False, False), ("+eval", False, True, False)]
            if fed.prefix is not None:
                variants[1:1] = [("+cache", True, False, False)]
                variants += [("+both", True, True, False), ("+both, warm", True, True, True)]
            # a warm-up step: the first forward pass of a process is slower
            one_variant(fed, cached=False, new_eval=True, rounds=1, steps=1)
            base: dict[str, Any] = {}
            for name, cached, new_eval, warm in variants:
                r = one_variant(
                    fed,
                    cached=cached,
                    new_eval=new_eval,
                    rounds=args.rounds,
                    steps=args.steps,
                    warm=warm,
                )
                base = base or r
                print(
                    f"| {label} | {k} | {name} | {r['steps_per_s']:.2f} | {r['round_s']:.2f} | "
                    f"{r['train_s']:.2f} | {r['eval_s']:.2f} | {r['fill_s']:.2f} | "
                    f"{r['steps_per_s'] / base['steps_per_s']:.2f}x | "
                    f"{base['round_s'] / r['round_s']:.2f}x |",
                    flush=True,
                )
    eval_table(args)
    print(
        f"# load average at end {os.getloadavg()[0]:.2f}; "
        f"wall time {time.perf_counter() - wall:.0f} s"
    )


if __name__ == "__main__":
    main()
