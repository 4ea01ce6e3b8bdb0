"""How does DP noise in the clients' factors reach the aggregated weight increment?

    .venv/bin/python bench/dp_noise.py [--clients 3] [--dim 384] [--rank 8] [--draws 5]

Each client's trained factors are a clean value plus Gaussian noise of standard deviation
``sigma`` per entry (what DP-SGD leaves in a factor it trains); a factor a round does not
train is sent without noise. Every method's own ``aggregate`` combines the replies, and
the script prints the Frobenius norm of the noise that reaches the global increment,

    E(sigma) = || s B(sigma) A(sigma) + base_delta(sigma) - (same at sigma = 0) ||_F ,

averaged over ``--draws`` noise draws, and the log-log slope of ``E`` between consecutive
``sigma``: 1 when the noise enters linearly (``N_B A``), 2 when the product of two noises
(``N_B N_A``) dominates. No model, no data: seconds on one core.
"""

from __future__ import annotations

import argparse
import math

import torch

from fedlora.config import load_config
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import METHOD_NAMES, build_method

SIGMAS = (0.001, 0.01, 0.1, 1.0)
LAYER = "layer"


def increment(
    method_name: str,
    *,
    clean: list[tuple[torch.Tensor, torch.Tensor]],
    start: AdapterState,
    sigma: float,
    rank: int,
    generator: torch.Generator,
) -> torch.Tensor:
    name, _, phase = method_name.partition(":")  # "rolora:A": RoLoRA's A round
    cfg = load_config(None, [f"rank={rank}", "head=frozen", f"method={name}"])
    method = build_method(name, cfg)
    if phase:
        method.load_state_dict({"phase": phase})
    plan = method.plan(1)
    scaling = {LAYER: cfg.alpha / rank}
    updates = []
    for k, (A_k, B_k) in enumerate(clean):

        def noisy(t: torch.Tensor) -> torch.Tensor:
            return t + sigma * torch.randn(t.shape, generator=generator, dtype=t.dtype)

        updates.append(
            ClientUpdate(
                client_id=k,
                num_examples=1,
                A={LAYER: noisy(A_k)} if plan.trains_A else {},
                B={LAYER: noisy(B_k)} if plan.trains_B else {},
            )
        )
    result = method.aggregate(
        plan=plan, state=start, updates=updates, weights=[1.0] * len(updates), scaling=scaling
    )
    W = scaling[LAYER] * result.state.B[LAYER] @ result.state.A[LAYER]
    return W + result.base_delta.get(LAYER, torch.zeros_like(W))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--methods", default="fedavg,ffa,rolora,rolora:A,fra")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d, r = args.dim, args.rank
    # A mid-training state: A ~ PEFT's Kaiming-uniform scale, B already away from 0.
    A0 = (torch.rand(r, d, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
    B0 = 0.01 * torch.randn(d, r, generator=g, dtype=torch.float64)
    start = AdapterState(A={LAYER: A0}, B={LAYER: B0})
    clean = [
        (
            A0 + 0.001 * torch.randn(r, d, generator=g, dtype=torch.float64),
            B0 + 0.001 * torch.randn(d, r, generator=g, dtype=torch.float64),
        )
        for _ in range(args.clients)
    ]
    methods = [m for m in args.methods.split(",") if m.partition(":")[0] in METHOD_NAMES]
    print(
        f"{args.clients} clients, layer {d}x{d}, rank {r}, {args.draws} draws; "
        f"E(sigma) = ||noise in the aggregated increment||_F"
    )
    print("| method | " + " | ".join(f"E({s:g})" for s in SIGMAS) + " | slope (last two) |")
    print("|---|" + "---|" * (len(SIGMAS) + 1))
    for name in methods:
        kw = dict(clean=clean, start=start, rank=r)
        ref = increment(name, sigma=0.0, generator=g, **kw)
        errors = []
        for sigma in SIGMAS:
            norms = [
                float((increment(name, sigma=sigma, generator=g, **kw) - ref).norm())
                for _ in range(args.draws)
            ]
            errors.append(sum(norms) / len(norms))
        slope = math.log(errors[-1] / errors[-2]) / math.log(SIGMAS[-1] / SIGMAS[-2])
        print(f"| {name} | " + " | ".join(f"{e:.3g}" for e in errors) + f" | {slope:.2f} |")


if __name__ == "__main__":
    main()
