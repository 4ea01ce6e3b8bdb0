"""Step time and memory of one client's training step by base precision and quantization.

Each variant runs in a fresh subprocess (peak RSS is per process) on the same batches:
build the federation (the packaged model and BBC News data), take ``--warmup`` steps,
then time ``--steps`` training steps of ``train_client``. Printed: seconds per step, peak
RSS (CPU) or peak allocated device memory (CUDA), and both as ratios to the first
variant, all from this one run.

    .venv/bin/python bench/precision.py                         # SmolLM2 on the CPU
    .venv/bin/python bench/precision.py --device cuda --variants minilm:fp32 minilm:bf16 \\
        smollm2:bf16 smollm2:int8 smollm2:nf4 --compare-cpu   # the GPU check's table

A variant is ``model:form`` with form ``fp32`` (float32 base), ``bf16`` (bfloat16 base and
bf16 autocast), ``int8`` / ``nf4`` (bitsandbytes base, float32 compute on the CPU and bf16
compute on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

FORMS = {
    "fp32": [],
    "bf16": ["base_dtype=bfloat16", "precision=bf16"],
    "int8": ["quantization=int8"],
    "nf4": ["quantization=nf4"],
}
MODELS = {
    "minilm": ["model=minilm"],
    "smollm2": ["task=causal-lm", "model=smollm2"],
}


def measure(variant: str, *, device: str, steps: int, warmup: int, batch: int, length: int) -> dict:
    import torch

    from fedlora.client import LocalTraining, train_client
    from fedlora.config import load_config
    from fedlora.federation import build_federation
    from fedlora.log import silent
    from fedlora.methods import build_method

    model, form = variant.split(":")
    extra = list(FORMS[form])
    if form in ("int8", "nf4") and device.startswith("cuda"):
        extra.append("bnb_compute_dtype=bfloat16")
    cfg = load_config(
        None,
        [
            *MODELS[model],
            *extra,
            f"device={device}",
            "dataset=bbc-news",
            "num_clients=2",
            "method=fedavg",
            f"batch_size={batch}",
            f"max_length={length}",
            "max_train_examples=200",
            "max_test_examples=8",
            "threads=1" if device == "cpu" else "threads=4",
            "progress=false",
        ],
    )
    fed = build_federation(cfg, log=silent)
    plan = build_method("fedavg", cfg).plan(1)
    data = fed.encoded[0].train

    def run(n: int) -> None:
        settings = LocalTraining.from_config(cfg.replace(local_steps=n))
        train_client(
            adapter=fed.adapter,
            state=fed.initial_state,
            data=data,
            plan=plan,
            settings=settings,
            client_id=0,
            seed=0,
        )

    if warmup:
        run(warmup)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    memory = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"variant": variant, "device": device, "s_per_step": seconds, "memory_mb": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["smollm2:fp32", "smollm2:bf16", "smollm2:int8", "smollm2:nf4"],
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument(
        "--compare-cpu",
        action="store_true",
        help="also run each variant but bf16 on the CPU (a bf16 step there is ~17x an fp32 one)",
    )
    parser.add_argument("--child-timeout", type=float, default=150.0, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    opts = dict(steps=args.steps, warmup=args.warmup, batch=args.batch, length=args.length)
    if args.child:
        variant, device = args.child.split("@")
        print(json.dumps(measure(variant, device=device, **opts)))
        return
    devices = [args.device, *(["cpu"] if args.compare_cpu and args.device != "cpu" else [])]
    results = []
    for device in devices:
        for variant in args.variants:
            if device == "cpu" and device != args.device and variant.endswith(":bf16"):
                continue
            child = [sys.executable, __file__, "--child", f"{variant}@{device}"]
            child += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            child += ["--batch", str(args.batch), "--length", str(args.length)]
            try:
                out = subprocess.run(
                    child, capture_output=True, text=True, timeout=args.child_timeout
                )
            except subprocess.TimeoutExpired:
                results.append({"variant": variant, "device": device, "error": "timed out"})
            else:
                if out.returncode != 0:
                    tail = (out.stderr.strip().splitlines() or ["?"])[-1]
                    results.append({"variant": variant, "device": device, "error": tail})
                else:
                    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("measured:", json.dumps(results[-1]), flush=True)  # survives a later kill
    print(
        f"batch {args.batch} x {args.length} tokens, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print("| variant | device | s / step | vs first | memory (MB) | vs first |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        rows = [r for r in results if r["device"] == device]
        ref = next((r for r in rows if "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"| {r['variant']} | {device} | failed: {r['error']} | | | |")
                continue
            print(
                f"| {r['variant']} | {device} | {r['s_per_step']:.3f} | {r['s_per_step'] / ref['s_per_step']:.2f}x | "
                f"{r['memory_mb']:.0f} | {r['memory_mb'] / ref['memory_mb']:.2f}x |"
            )
    if args.compare_cpu and args.device != "cpu":
        print("\n| variant | speed-up of " + args.device + " over cpu |")
        print("|---|---|")
        for v in args.variants:
            a = next(
                (
                    r
                    for r in results
                    if r["variant"] == v and r["device"] == args.device and "error" not in r
                ),
                None,
            )
            b = next(
                (
                    r
                    for r in results
                    if r["variant"] == v and r["device"] == "cpu" and "error" not in r
                ),
                None,
            )
            if a and b:
                print(f"| {v} | {b['s_per_step'] / a['s_per_step']:.1f}x |")


if __name__ == "__main__":
    main()
