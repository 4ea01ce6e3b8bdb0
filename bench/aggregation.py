"""Benchmark: FRA-LoRA aggregation through the factored route against a dense SVD.

The dense baseline is what one writes without the factored route: form
``M = sum_k w_k B_k A_k`` (one ``out x in`` GEMM over the stacked factors), take the full
``torch.linalg.svd`` and keep the leading ``r`` triplets. ``fedlora.aggregation.fra`` instead
works on QR factors of the stacked ``(out, R)`` / ``(in, R)`` matrices and an ``R x R`` core.

    python bench/aggregation.py                 # 4096 x 4096, K in {3, 10, 50}, r in {2, 8, 16}
    python bench/aggregation.py --quick         # small sanity run (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from fedlora.aggregation import fra

T = TypeVar("T")


def dense_fra(As: list[Tensor], Bs: list[Tensor], weights: list[float], *, rank: int):
    """Baseline: dense ``M``, full SVD, truncation; same dtype as the inputs (float32)."""
    w = torch.tensor(weights, dtype=As[0].dtype)
    w = w / w.sum()
    b_cat = torch.cat([wk * b for wk, b in zip(w, Bs, strict=True)], dim=1)
    m = b_cat @ torch.cat(As, dim=0)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root, m


def reference_product(As: list[Tensor], Bs: list[Tensor], weights: list[float], *, rank: int):
    """Best rank-``rank`` approximation of ``M`` from a float64 dense SVD, and ``max |M|``."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    m = sum(wk * (b.double() @ a.double()) for wk, a, b in zip(w, As, Bs, strict=True))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], m.abs().max()


def median_ms(fn: Callable[[], T], *, reps: int, warmup: int) -> tuple[float, T]:
    """Median wall time in ms over ``reps`` runs, and the last run's result."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), result


def make_layer(*, dim: int, n_clients: int, rank: int, seed: int):
    # LoRA-like magnitudes: A ~ N(0, 1/in) as PEFT initialises it, B small after training.
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(rank, dim, generator=g) / dim**0.5 for _ in range(n_clients)]
    Bs = [0.01 * torch.randn(dim, rank, generator=g) for _ in range(n_clients)]
    weights = (1.0 + torch.rand(n_clients, generator=g)).tolist()  # e.g. data set sizes
    return As, Bs, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="512 x 512, K in {3, 10}, r in {2, 8}")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of the factored route")
    parser.add_argument("--dense-reps", type=int, default=1, help="timed runs of the dense SVD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, nargs="+", help="override the K values")
    parser.add_argument("--ranks", type=int, nargs="+", help="override the r values")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also compare both results with a float64 dense SVD (slow: about 2x a dense run)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dim, clients, ranks = 4096, [3, 10, 50], [2, 8, 16]
    if args.quick:
        dim, clients, ranks = 512, [3, 10], [2, 8]
    clients, ranks = args.clients or clients, args.ranks or ranks
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), layer {dim} x {dim}, float32 inputs, "
        f"median of {args.reps} (factored) / {args.dense_reps} (dense) runs"
    )
    print()
    header = "|  K |  r |   R | factored ms |  dense ms | speed-up | max abs diff / max abs M |"
    rule = "|---:|---:|----:|------------:|----------:|---------:|-------------------------:|"
    if args.reference:
        header += " factored vs f64 | dense vs f64 |"
        rule += "----------------:|-------------:|"
    print(header)
    print(rule)
    for n_clients in clients:
        for rank in ranks:
            As, Bs, weights = make_layer(dim=dim, n_clients=n_clients, rank=rank, seed=args.seed)
            t_fact, (a_f, b_f) = median_ms(
                partial(fra, As, Bs, weights, rank=rank), reps=args.reps, warmup=1
            )
            t_dense, (a_d, b_d, m) = median_ms(
                partial(dense_fra, As, Bs, weights, rank=rank), reps=args.dense_reps, warmup=0
            )
            diff = float((b_f @ a_f - b_d @ a_d).abs().max() / m.abs().max())
            row = (
                f"| {n_clients:2d} | {rank:2d} | {n_clients * rank:3d} | {t_fact:11.1f} "
                f"| {t_dense:9.0f} | {t_dense / t_fact:7.0f}x | {diff:24.1e} |"
            )
            if args.reference:
                ref, scale = reference_product(As, Bs, weights, rank=rank)
                for a, b in ((a_f, b_f), (a_d, b_d)):
                    err = float((b.double() @ a.double() - ref).abs().max() / scale)
                    row += f" {err:15.1e} |" if a is a_f else f" {err:12.1e} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
