"""Benchmark: FRA-LoRA aggregation through the factored route against a dense SVD.

The dense baseline is what one writes without the factored route: form
``M = sum_k w_k B_k A_k`` (one ``out x in`` GEMM over the stacked factors), take the full
``torch.linalg.svd`` and keep the leading ``r`` triplets. ``fedlora.aggregation.fra`` instead
works on QR factors of the stacked ``(out, R)`` / ``(in, R)`` matrices and an ``R x R`` core.

    python bench/aggregation.py                 # 4096 x 4096, K in {3, 10, 50}, r in {2, 8, 16}
    python bench/aggregation.py --quick         # small sanity run (seconds)

``--llm`` times one FRA-LoRA server round at LLM scale instead, today's per-layer route
(``fra_with_error`` layer after layer, what ``FRALoRA.aggregate`` called) against the batched
route (``fra_batched``: layers of equal shape as one batch, big QRs in float32; also with
``qr_dtype=float64``, to tell batching from precision), all in one run, 2 torch threads
unless ``--threads`` says otherwise. The last columns: the largest ``||X_batched -
X_per-layer||_F / ||M||_F`` over the layers (``X = B A``) and the 1-minute load average:

    python bench/aggregation.py --llm           # 7B shapes, 10 clients, rank 16
    python bench/aggregation.py --llm --blocks 2    # the same shapes, 2 blocks (quick)
    python bench/aggregation.py --llm --profile     # and where the batched time goes
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

from fedlora.aggregation import fra, fra_with_error
from fedlora.aggregation.batched import fra_batched

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


# A 7B Llama block's LoRA targets, (out, in): attention 4096 x 4096, MLP 11008 x 4096 and back.
LLAMA_7B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}


def llm_round(shapes: list[tuple[int, int]], *, n_clients: int, rank: int, seed: int):
    """Distinct client factors for every layer (no layer reuses another's tensors)."""
    g = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for out, inp in shapes:
        As.append([torch.randn(rank, inp, generator=g) / inp**0.5 for _ in range(n_clients)])
        Bs.append([0.01 * torch.randn(out, rank, generator=g) for _ in range(n_clients)])
    weights = (1.0 + torch.rand(n_clients, generator=g)).tolist()
    return As, Bs, weights


def per_layer_route(As, Bs, weights, *, rank: int):
    g = torch.Generator().manual_seed(0)
    return [
        fra_with_error(a, b, weights, rank=rank, generator=g) for a, b in zip(As, Bs, strict=True)
    ]


def batched_route(As, Bs, weights, *, rank: int, qr_dtype: torch.dtype | None = None):
    g = torch.Generator().manual_seed(0)
    return fra_batched(As, Bs, weights, rank=rank, generator=g, qr_dtype=qr_dtype)


def product_norm(Bs: list[Tensor], As: list[Tensor]) -> Tensor:
    """``||[B_1 .. B_n] [A_1; ..; A_n]||_F`` in float64 without forming the product."""
    r_b = torch.linalg.qr(torch.cat(Bs, 1).double(), mode="r")[1]
    r_a = torch.linalg.qr(torch.cat(As, 0).double().mT, mode="r")[1]
    return torch.linalg.matrix_norm(r_b @ r_a.mT)


def run_llm(args: argparse.Namespace) -> None:
    cases = [
        ("q,v", [LLAMA_7B["q_proj"], LLAMA_7B["v_proj"]]),
        ("all 7", list(LLAMA_7B.values())),
    ]
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), FRA-LoRA round: "
        f"{args.llm_clients} clients, rank {args.llm_rank}, float32 factors, "
        f"median of {args.llm_reps} runs after one warm-up"
    )
    print()
    print(
        "| targets | layers | per-layer s | batched, f64 QR s | batched s | speed-up "
        "| ms/layer (batched) | max diff / norm M (Frobenius) | load avg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    profiles = []
    for label, block in cases:
        shapes = block * args.blocks
        As, Bs, weights = llm_round(
            shapes, n_clients=args.llm_clients, rank=args.llm_rank, seed=args.seed
        )
        t_old, old = median_ms(
            partial(per_layer_route, As, Bs, weights, rank=args.llm_rank),
            reps=args.llm_reps,
            warmup=1,
        )
        t_f64, _ = median_ms(
            partial(batched_route, As, Bs, weights, rank=args.llm_rank, qr_dtype=torch.float64),
            reps=args.llm_reps,
            warmup=1,
        )
        t_new, new = median_ms(
            partial(batched_route, As, Bs, weights, rank=args.llm_rank),
            reps=args.llm_reps,
            warmup=1,
        )
        # ||X_new - X_old||_F / ||M||_F per layer (the unit of tests/aggregation/test_batched.py),
        # no out x in matrix formed: with QRs B = Q_b R_b and A^T = Q_a R_a (float64),
        # ||B A||_F = ||R_b R_a^T||_F.
        total = sum(weights)
        diff = max(
            float(
                product_norm([b1, -b2], [a1, a2])
                / product_norm([w / total * b for w, b in zip(weights, B_l, strict=True)], A_l)
            )
            for (a1, b1, _), (a2, b2, _), A_l, B_l in zip(old, new, As, Bs, strict=True)
        )
        print(
            f"| {label} | {len(shapes)} | {t_old / 1e3:.2f} | {t_f64 / 1e3:.2f} | {t_new / 1e3:.2f} "
            f"| {t_old / t_new:.2f}x | {t_new / len(shapes):.1f} | {diff:.1e} "
            f"| {os.getloadavg()[0]:.1f} |",
            flush=True,
        )
        if args.profile:  # where the batched route's time goes (self CPU time per kernel)
            with torch.profiler.profile() as prof:
                batched_route(As, Bs, weights, rank=args.llm_rank)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
            profiles.append(f"{label}, {len(shapes)} layers, one batched call:\n{table}")
        del As, Bs, old, new
    for text in profiles:
        print()
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1; 2 with --llm)"
    )
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
    parser.add_argument("--llm", action="store_true", help="one round at 7B scale (see above)")
    parser.add_argument("--blocks", type=int, default=32, help="--llm: transformer blocks")
    parser.add_argument("--llm-clients", type=int, default=10, help="--llm: clients")
    parser.add_argument("--llm-rank", type=int, default=16, help="--llm: LoRA rank")
    parser.add_argument("--llm-reps", type=int, default=3, help="--llm: timed runs per route")
    parser.add_argument(
        "--profile", action="store_true", help="--llm: also profile one batched call per case"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads or (2 if args.llm else 1))
    if args.llm:
        run_llm(args)
        return
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
