"""fedlora.aggregation.batched.fra_batched against the per-layer route and a dense float64 SVD.

The reference is the definition: ``M = sum_k w_k B_k A_k`` formed densely in float64 by a
Python loop and its ``torch.linalg.svd`` truncated at ``r`` (Eckart-Young), independent of
QR, stacking and the sign convention.

Tolerance for float32 factors (the two big QRs run in float32, the core in float64):

    ||X - M_r||_F <= eps32 (4 + 0.15 kappa) ||M||_F,   kappa = s_r / (s_r - s_{r+1}),

with ``X = B A`` and ``eps32 = 2^-23``. Why: Householder QR is normwise backward stable, so
the float32 route returns the exact truncation of ``M + E`` with ``||E||_F`` a few
``eps32 ||M||_F`` (the route hands layers whose product cancels to float64, see the
module); to first order, truncating at ``r`` amplifies ``E`` by the condition number
``kappa`` of the rank-``r`` truncation. Measured: 2.2 to 3.4 eps32 on the cases below
(kappa from 1 to about 260) and on layers of 512 to 16384 rows; on the random clients of
``bench/aggregation.py --llm`` (64 + 224 layers of 7B shapes) 3.7 to 35 eps32 where kappa
is below 1400 and 530 eps32 (6e-5) on one MLP layer whose s_16 and s_17 nearly tie
(kappa 14600), everywhere at most 0.61 of this tolerance. For
comparison: the per-layer float64 route is at 0.3 eps32 (the rounding of its float32
output), a dense float32 SVD at about 80 eps32, and a half-ulp random perturbation of the
float32 inputs moves the reference itself by about 0.7 eps32.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.aggregation import fra_with_error
from fedlora.aggregation.batched import fra_batched
from fedlora.aggregation.fra import init_row_norm

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
FRO = torch.linalg.norm


def ref_truncation(As, Bs, weights, rank):
    """``(M, M_r, S)`` from a dense float64 SVD of ``M = sum_k w_k B_k A_k``."""
    w = [1.0] * len(As) if weights is None else list(weights)
    M = sum(wk / sum(w) * (b.to(F64) @ a.to(F64)) for wk, a, b in zip(w, As, Bs, strict=True))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return M, (U[:, :rank] * S[:rank]) @ Vh[:rank], S


def federated_layer(out, inp, n_clients, r, *, seed, spread=1.0, dtype=torch.float32):
    """Clients that trained from one global adapter: ``A_k = A_g + spread dA_k`` (same for B).

    ``spread=1`` gives independent clients (a flat spectrum of ``M``); small spreads give a
    dominant rank-``r`` part, as after a round of local training from a common start.
    """
    g = torch.Generator().manual_seed(seed)
    a_g = torch.randn(r, inp, generator=g, dtype=F64) / inp**0.5
    b_g = 0.01 * torch.randn(out, r, generator=g, dtype=F64)
    As = [
        a_g + spread * torch.randn(r, inp, generator=g, dtype=F64) / inp**0.5
        for _ in range(n_clients)
    ]
    Bs = [
        b_g + spread * 0.01 * torch.randn(out, r, generator=g, dtype=F64) for _ in range(n_clients)
    ]
    return [a.to(dtype) for a in As], [b.to(dtype) for b in Bs]


def truncation_condition(S, rank):
    """``s_r / (s_r - s_{r+1})``: how much truncating at ``rank`` amplifies a perturbation."""
    if rank >= S.numel() or S[rank - 1] <= 1e-12 * S[0]:
        return 1.0
    return float(S[rank - 1] / (S[rank - 1] - S[rank]))


def float32_tolerance(S, rank):
    return EPS32 * (4 + 0.15 * truncation_condition(S, rank)) * float(S.norm())


def assert_at_float32_rounding(a, b, err, As, Bs, weights, rank):
    M, M_r, S = ref_truncation(As, Bs, weights, rank)
    X = b.to(F64) @ a.to(F64)
    norm = float(FRO(M))
    assert float(FRO(X - M_r)) <= float32_tolerance(S, rank)
    # Eckart-Young: the residual is the optimal one to float32 rounding.
    assert float(FRO(M - X)) <= float(FRO(M - M_r)) + 4 * EPS32 * norm
    share = float(S[rank:].square().sum() / S.square().sum())
    assert err == pytest.approx(share, abs=4 * EPS32)


# ----------------------------------------------------------------------------- float32 accuracy
@pytest.mark.parametrize(
    ("out", "inp", "n_clients", "r", "spread"),
    [
        (1024, 1024, 10, 16, 1.0),  # flat spectrum: s_16 / (s_16 - s_17) about 80
        (512, 2048, 10, 16, 1.0),  # wide layer: reflectors applied on the out side
        (2048, 512, 3, 8, 1.0),  # tall layer, R = 24 > rank
        (1024, 1024, 10, 16, 0.1),  # clients near a common adapter: a dominant rank-16 part
    ],
)
def test_float32_factors_match_float64_reference(out, inp, n_clients, r, spread):
    As, Bs = federated_layer(out, inp, n_clients, r, seed=out + inp, spread=spread)
    weights = [1.0 + k for k in range(n_clients)]
    ((a, b, err),) = fra_batched([As], [Bs], weights, rank=16)
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == (16, inp) and b.shape == (out, 16)
    assert_at_float32_rounding(a, b, err, As, Bs, weights, 16)
    # Balanced split as per layer: B^T B = A A^T = diag(s_r).
    bb, aa = b.to(F64).mT @ b.to(F64), a.to(F64) @ a.to(F64).mT
    scale = float(bb.diagonal().max())
    torch.testing.assert_close(bb, aa, rtol=0, atol=16 * EPS32 * scale)
    assert float((bb - torch.diag(bb.diagonal())).abs().max()) <= 16 * EPS32 * scale


def test_float64_qrs_give_the_per_layer_accuracy_on_float32_factors():
    As, Bs = federated_layer(1024, 1024, 10, 16, seed=16)  # kappa about 80
    ((a, b, err),) = fra_batched([As], [Bs], rank=16, qr_dtype=F64)
    a_ref, b_ref, err_ref = fra_with_error(As, Bs, rank=16)
    M, M_r, _ = ref_truncation(As, Bs, None, 16)
    # Both are the float64 truncation rounded once to float32 (about 0.3 eps32).
    for x in (b @ a, b_ref @ a_ref):
        assert float(FRO(x.to(F64) - M_r)) <= EPS32 * float(FRO(M))
    assert err == pytest.approx(err_ref, abs=1e-12)


def test_float64_factors_equal_the_per_layer_route():
    As, Bs = federated_layer(300, 200, 4, 5, seed=1, dtype=F64)
    ((a, b, err),) = fra_batched([As], [Bs], [1.0, 2.0, 3.0, 4.0], rank=6)
    a_ref, b_ref, err_ref = fra_with_error(As, Bs, [1.0, 2.0, 3.0, 4.0], rank=6)
    assert a.dtype == F64
    # Same sign convention, same split: the factors themselves agree, not only B A.
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-12)
    assert err == pytest.approx(err_ref, abs=1e-12)


def test_bfloat16_factors_come_back_in_bfloat16():
    As, Bs = federated_layer(256, 128, 3, 4, seed=2, dtype=torch.bfloat16)
    ((a, b, _),) = fra_batched([As], [Bs], rank=4)
    assert a.dtype == b.dtype == torch.bfloat16
    M, M_r, _ = ref_truncation(As, Bs, None, 4)
    bf16 = torch.finfo(torch.bfloat16).eps
    assert float(FRO(b.to(F64) @ a.to(F64) - M_r)) <= 4 * bf16 * float(FRO(M))


# ----------------------------------------------------------------------------- grouping, order
def test_unequal_shapes_are_grouped_and_returned_in_order():
    shapes = [  # (out, in, client ranks): interleaved so that a wrong grouping shows
        (96, 64, [4, 4, 4]),
        (64, 96, [4, 4, 4]),
        (96, 64, [4, 4, 4]),
        (96, 64, [2, 6, 4]),  # same R = 12 as layer 0, other split of the weights
        (96, 64, [3, 3, 3]),  # other R
        (8, 6, [4, 4, 4]),  # R >= min(out, in): the dense per-layer route
        (64, 96, [4, 4, 4]),
    ]
    layers = []
    for j, (out, inp, ranks) in enumerate(shapes):
        g = torch.Generator().manual_seed(j)
        As = [torch.randn(r, inp, generator=g) for r in ranks]
        Bs = [torch.randn(out, r, generator=g) for r in ranks]
        layers.append((As, Bs))
    weights = [1.0, 2.0, 5.0]
    results = fra_batched([x[0] for x in layers], [x[1] for x in layers], weights, rank=4)
    assert len(results) == len(shapes)
    for (As, Bs), (a, b, err), (out, inp, _) in zip(layers, results, shapes, strict=True):
        assert a.shape == (4, inp) and b.shape == (out, 4)
        assert_at_float32_rounding(a, b, err, As, Bs, weights, 4)


def test_client_order_does_not_matter():
    As, Bs = federated_layer(512, 384, 5, 8, seed=3)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    ((a1, b1, e1),) = fra_batched([As], [Bs], weights, rank=8)
    perm = [3, 0, 4, 2, 1]
    ((a2, b2, e2),) = fra_batched(
        [[As[k] for k in perm]], [[Bs[k] for k in perm]], [weights[k] for k in perm], rank=8
    )
    _, _, S = ref_truncation(As, Bs, weights, 8)
    diff = b1.to(F64) @ a1.to(F64) - b2.to(F64) @ a2.to(F64)
    assert float(FRO(diff)) <= 2 * float32_tolerance(S, 8)  # each within it of M_r
    assert e1 == pytest.approx(e2, abs=4 * EPS32)


def test_identical_clients_are_a_fixed_point():
    g = torch.Generator().manual_seed(4)
    a0, b0 = torch.randn(6, 200, generator=g), torch.randn(300, 6, generator=g)
    ((a, b, err),) = fra_batched([[a0] * 3], [[b0] * 3], rank=6)
    M = b0.to(F64) @ a0.to(F64)
    assert float(FRO(b.to(F64) @ a.to(F64) - M)) <= 8 * EPS32 * float(FRO(M))
    assert err == pytest.approx(0.0, abs=4 * EPS32)


# ----------------------------------------------------------------------------- padding, split
def per_layer(layers, weights, *, rank, a_row_norm=None, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return [
        fra_with_error(As, Bs, weights, rank=rank, a_row_norm=a_row_norm, generator=g)
        for As, Bs in layers
    ]


def batched(layers, weights, *, rank, a_row_norm=None, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return fra_batched(
        [x[0] for x in layers],
        [x[1] for x in layers],
        weights,
        rank=rank,
        a_row_norm=a_row_norm,
        generator=g,
    )


def padding_layers():
    """Layers 0 and 2 need padding at rank 8 (R = 4 < 8, and rank(M) = 3 with R = 9),
    layer 1 does not: the generator's draws must land on the same layers as per layer."""
    g = torch.Generator().manual_seed(5)
    short = (
        [torch.randn(2, 64, generator=g) for _ in range(2)],
        [torch.randn(80, 2, generator=g) for _ in range(2)],
    )
    full = federated_layer(80, 64, 4, 4, seed=6)
    a0, b0 = torch.randn(3, 64, generator=g), torch.randn(80, 3, generator=g)
    deficient = ([a0, a0, a0], [b0, 2 * b0, b0])  # M = (4/3) b0 a0: rank 3, R = 9
    return [short, full, deficient]


def test_padding_draws_the_same_rows_from_the_generator():
    layers, weights = padding_layers(), None
    for got, want in zip(
        batched(layers, weights, rank=8, seed=11),
        per_layer(layers, weights, rank=8, seed=11),
        strict=True,
    ):
        a, b, err = got
        a_ref, b_ref, err_ref = want
        kept = int((torch.linalg.norm(b_ref, dim=0) > 0).sum())
        # The fresh rows of A (beyond rank(M)) are the per-layer route's, bit for bit.
        assert torch.equal(a[kept:], a_ref[kept:])
        assert torch.all(b[:, kept:] == 0)
        scale = float(FRO(b_ref.to(F64) @ a_ref.to(F64)))
        diff = b.to(F64) @ a.to(F64) - b_ref.to(F64) @ a_ref.to(F64)
        assert float(FRO(diff)) <= 8 * EPS32 * scale
        assert err == pytest.approx(err_ref, abs=4 * EPS32)
    kept = [
        int((torch.linalg.norm(b, dim=0) > 0).sum()) for _, b, _ in batched(layers, None, rank=8)
    ]
    assert kept == [4, 8, 3]


def test_hand_over_split_puts_sigma_into_b():
    As, Bs = federated_layer(256, 192, 4, 4, seed=7)
    ((a, b, err),) = fra_batched([As], [Bs], rank=4, a_row_norm=init_row_norm())
    gram = a.to(F64) @ a.to(F64).mT
    torch.testing.assert_close(gram, torch.eye(4, dtype=F64) / 3, rtol=0, atol=16 * EPS32)
    assert_at_float32_rounding(a, b, err, As, Bs, None, 4)


# ----------------------------------------------------------------------------- fallbacks
def test_cancelling_clients_are_decomposed_in_float64():
    """M a 1e-4 fraction of the clients' products: float32 QRs would carry an error of
    about 1e4 eps32 relative to M, so the layer must take the float64 route."""
    g = torch.Generator().manual_seed(8)
    a0 = torch.randn(8, 256, generator=g)
    b0, db = torch.randn(384, 8, generator=g), torch.randn(384, 8, generator=g)
    As, Bs = [a0, a0], [b0, -b0 + 1e-4 * db]
    ((a, b, err),) = fra_batched([As], [Bs], rank=8)
    a_ref, b_ref, err_ref = fra_with_error(As, Bs, rank=8)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref) and err == err_ref
    M, M_r, _ = ref_truncation(As, Bs, None, 8)
    assert float(FRO(b.to(F64) @ a.to(F64) - M_r)) <= 8 * EPS32 * float(FRO(M))


def test_zero_update_gives_zero_factors():
    As = [torch.randn(4, 50) for _ in range(2)]
    Bs = [torch.zeros(60, 4) for _ in range(2)]  # LoRA's initial B
    ((a, b, err),) = fra_batched([As], [Bs], rank=4)
    assert torch.all(a == 0) and torch.all(b == 0) and err == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_rejected_with_the_client(bad):
    As, Bs = federated_layer(64, 48, 3, 4, seed=9)
    Bs[1] = Bs[1].clone()
    Bs[1][5, 2] = bad
    with pytest.raises(ValueError, match="client 1: factors contain NaN"):
        fra_batched([As, As], [federated_layer(64, 48, 3, 4, seed=10)[1], Bs], rank=4)


def test_bad_arguments_are_rejected():
    As, Bs = federated_layer(64, 48, 2, 4, seed=12)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        fra_batched([As], [Bs], rank=0)
    with pytest.raises(ValueError, match="a_row_norm must be > 0"):
        fra_batched([As], [Bs], rank=2, a_row_norm=0.0)
    with pytest.raises(ValueError, match="B factors for 2"):
        fra_batched([As], [Bs, Bs], rank=2)
    with pytest.raises(ValueError, match="got 3 weights for 2 clients"):
        fra_batched([As], [Bs], [1.0, 1.0, 1.0], rank=2)
    with pytest.raises(ValueError, match="qr_dtype must be"):
        fra_batched([As], [Bs], rank=2, qr_dtype=torch.float16)
    with pytest.raises(ValueError, match="rank of A"):
        fra_batched([As], [[Bs[0][:, :3], Bs[1]]], rank=2)


def test_never_decomposes_a_dense_matrix(monkeypatch):
    seen = []
    for name in ("svd", "eigh"):
        real = getattr(torch.linalg, name)

        def spy(x, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, tuple(x.shape)))
            return _real(x, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    layers = [federated_layer(300, 200, 3, 4, seed=s) for s in (13, 14)]
    fra_batched([x[0] for x in layers], [x[1] for x in layers], rank=4)
    # One batched call for the R x R cores, one for the (out, rank) Rayleigh-Ritz step.
    assert seen == [("eigh", (2, 12, 12)), ("svd", (2, 300, 4))]


# ----------------------------------------------------------------------------- the method
def test_fra_method_equals_the_per_layer_loop():
    from fedlora.messages import AdapterState, ClientUpdate
    from fedlora.methods.fra import FRALoRA

    shapes = {"q": (128, 96), "v": (128, 96), "up": (160, 96), "down": (96, 160)}
    g = torch.Generator().manual_seed(15)
    state = AdapterState(
        A={k: torch.randn(4, i, generator=g) for k, (o, i) in shapes.items()},
        B={k: torch.randn(o, 4, generator=g) for k, (o, i) in shapes.items()},
        head={},
    )
    updates = []
    for cid in range(3):
        A = {k: torch.randn(4, i, generator=g) for k, (o, i) in shapes.items()}
        B = {k: torch.randn(o, 4, generator=g) for k, (o, i) in shapes.items()}
        A["q"] = state.A["q"]  # identical clients in one layer: rank(M) = 4 < rank 6
        B["q"] = state.B["q"]
        scaling = {k: 2.0 if cid == 1 else 1.0 for k in shapes}  # client 1 had twice alpha
        updates.append(
            ClientUpdate(client_id=cid, num_examples=10, A=A, B=B, head={}, scaling=scaling)
        )
    method = FRALoRA(rank=6, seed=3)
    plan = method.plan(2)
    result = method.aggregate(
        plan=plan,
        state=state,
        updates=updates,
        weights=[1.0, 2.0, 3.0],
        scaling=dict.fromkeys(shapes, 1.0),
    )
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 2 * 10_007)
    for layer in shapes:
        As = [u.A[layer] for u in updates]
        Bs = [u.scaling[layer] * u.B[layer] for u in updates]
        a_ref, b_ref, err_ref = fra_with_error(As, Bs, [1.0, 2.0, 3.0], rank=6, generator=generator)
        a, b = result.state.A[layer], result.state.B[layer]
        kept = int((torch.linalg.norm(b_ref, dim=0) > 0).sum())
        assert torch.equal(a[kept:], a_ref[kept:])  # same padded rows, same layer order
        assert_at_float32_rounding(
            a, b, result.diagnostics["fra_discarded_energy"][layer], As, Bs, [1.0, 2.0, 3.0], 6
        )
        assert result.diagnostics["fra_discarded_energy"][layer] == pytest.approx(
            err_ref, abs=4 * EPS32
        )
    assert list(result.state.A) == list(shapes)
