"""fedlora.aggregation against independent float64 references.

The references below use only the definitions: ``M = sum_k w_k B_k A_k`` formed densely by
a Python loop, and ``torch.linalg.svd`` of that dense ``M``. None of them goes through the
stacked factors, the QR route or the sign convention of the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedlora.aggregation import (
    fedavg,
    fedavg_error,
    fedex,
    fra,
    fra_truncation_error,
    fra_with_error,
    stack,
)
from fedlora.aggregation.lowrank import (
    choose_route,
    frobenius_norm_of_product,
    singular_values_of_product,
    svd_of_product,
)

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- references
def ref_weights(weights, n):
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return [x / sum(w) for x in w]


def ref_M(As, Bs, weights=None):
    w = ref_weights(weights, len(As))
    return sum(wk * (b.to(F64) @ a.to(F64)) for wk, a, b in zip(w, As, Bs, strict=True))


def ref_means(As, Bs, weights=None):
    w = ref_weights(weights, len(As))
    a = sum(wk * x.to(F64) for wk, x in zip(w, As, strict=True))
    b = sum(wk * x.to(F64) for wk, x in zip(w, Bs, strict=True))
    return a, b


def scale_of(As, Bs, weights=None):
    """Bound on |M| entries' magnitude, used to scale absolute tolerances."""
    w = ref_weights(weights, len(As))
    return sum(
        wk * float(torch.linalg.norm(a.to(F64))) * float(torch.linalg.norm(b.to(F64)))
        for wk, a, b in zip(w, As, Bs, strict=True)
    )


def close(actual, expected, *, scale, tol=1e-10):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=0, atol=tol * scale)


def well_separated(s, k, rel=1e-4):
    """Whether the best rank-k approximation is unique and well conditioned."""
    if k >= s.numel() or s[0] == 0:
        return True
    return bool(s[k - 1] - s[k] > rel * s[0]) or bool(s[k - 1] <= 1e-12 * s[0])


# ----------------------------------------------------------------------------- data
@st.composite
def layers(draw, *, equal_ranks=False, max_dim=12, max_clients=5):
    out = draw(st.integers(1, max_dim))
    inp = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_clients))
    if equal_ranks:
        ranks = [draw(st.integers(1, 4))] * n
    else:
        ranks = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    kind = draw(
        st.sampled_from(["generic", "generic", "deficient", "zero_client", "identical", "spread"])
    )
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    As = [scale * torch.randn(r, inp, generator=g, dtype=F64) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=F64) for r in ranks]
    if kind == "deficient":
        # Repeated rows of A and a zero column of B: each client's product loses rank.
        As = [torch.cat([a[:1], a[:1] * 2, a[2:]]) if a.shape[0] > 1 else a for a in As]
        Bs = [torch.cat([b[:, :-1], torch.zeros(out, 1, dtype=F64)], 1) for b in Bs]
    elif kind == "spread":
        # Clients whose updates differ by orders of magnitude: small directions still count.
        As = [a * 10.0 ** (-3 * k) for k, a in enumerate(As)]
    elif kind == "zero_client":
        As[0], Bs[0] = torch.zeros_like(As[0]), torch.zeros_like(Bs[0])
    elif kind == "identical" and len(set(ranks)) == 1:
        As, Bs = [As[0].clone() for _ in ranks], [Bs[0].clone() for _ in ranks]
    weights = draw(
        st.one_of(
            st.none(),
            st.lists(st.integers(0, 5), min_size=n, max_size=n).filter(lambda w: sum(w) > 0),
            st.lists(st.floats(0.01, 100.0), min_size=n, max_size=n),
        )
    )
    return As, Bs, weights


def random_layer(out, inp, ranks, *, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g, dtype=F64).to(dtype) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=F64).to(dtype) for r in ranks]
    return As, Bs


# ----------------------------------------------------------------------------- FedAvg / FedEx
@SETTINGS
@given(layers(equal_ranks=True))
def test_fedavg_is_weighted_mean_of_factors(case):
    As, Bs, weights = case
    a, b = fedavg(As, Bs, weights)
    a_ref, b_ref = ref_means(As, Bs, weights)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)


@SETTINGS
@given(layers(equal_ranks=True))
def test_fedex_means_and_exact_residual(case):
    As, Bs, weights = case
    a, b, residual = fedex(As, Bs, weights)
    a_ref, b_ref = ref_means(As, Bs, weights)
    M = ref_M(As, Bs, weights)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)
    assert residual.shape == M.shape
    close(b @ a + residual, M, scale=scale_of(As, Bs, weights))
    close(residual, M - b_ref @ a_ref, scale=scale_of(As, Bs, weights))


@SETTINGS
@given(layers(equal_ranks=True))
def test_fedavg_error_matches_dense(case):
    As, Bs, weights = case
    M = ref_M(As, Bs, weights)
    a_ref, b_ref = ref_means(As, Bs, weights)
    got = fedavg_error(As, Bs, weights)
    norm = float(torch.linalg.norm(M))
    assume(norm > 1e-9 * scale_of(As, Bs, weights))  # else the ratio is rounding noise
    expected = float(torch.linalg.norm(M - b_ref @ a_ref)) / norm
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9 * scale_of(As, Bs, weights) / norm)


def test_fedavg_error_factored_and_dense_routes():
    # R + r = 3*2 + 2 = 8 < 40 takes the QR route, the 6 x 5 layer the dense one.
    for out, inp in [(40, 50), (6, 5)]:
        As, Bs = random_layer(out, inp, [2, 2, 2], seed=3)
        M = ref_M(As, Bs)
        a_ref, b_ref = ref_means(As, Bs)
        expected = float(torch.linalg.norm(M - b_ref @ a_ref) / torch.linalg.norm(M))
        assert expected > 0.1  # cross terms make FedAvg visibly wrong here
        assert fedavg_error(As, Bs) == pytest.approx(expected, rel=1e-10)


def test_fedavg_error_zero_and_undefined_cases():
    As, Bs = random_layer(5, 4, [2, 2])
    zero_B = [torch.zeros_like(b) for b in Bs]
    assert fedavg_error(As, zero_B) == 0.0  # LoRA's initial state: B = 0 everywhere
    # Client 0 has B = 0, client 1 has A = 0: M = 0, but mean(B) mean(A) = B_1 A_0 / 4 != 0.
    assert fedavg_error([As[0], torch.zeros_like(As[1])], [zero_B[0], Bs[1]]) == math.inf


# ----------------------------------------------------------------------------- FLoRA stacking
@SETTINGS
@given(layers())
def test_stack_product_is_exact_with_heterogeneous_ranks(case):
    As, Bs, weights = case
    a, b = stack(As, Bs, weights)
    R = sum(x.shape[0] for x in As)
    assert a.shape == (R, As[0].shape[1]) and b.shape == (Bs[0].shape[0], R)
    close(b @ a, ref_M(As, Bs, weights), scale=scale_of(As, Bs, weights))
    # Weights live in the B blocks; A is the clients' A_k unchanged.
    assert torch.equal(a, torch.cat(As))
    w = ref_weights(weights, len(As))
    torch.testing.assert_close(b, torch.cat([wk * x for wk, x in zip(w, Bs, strict=True)], 1))


# ----------------------------------------------------------------------------- FRA-LoRA
@SETTINGS
@given(layers(), st.integers(1, 24))
def test_fra_is_best_rank_approximation(case, rank):
    As, Bs, weights = case
    M = ref_M(As, Bs, weights)
    U, S, Vh = torch.linalg.svd(M)
    scale = scale_of(As, Bs, weights)
    a, b, err = fra_with_error(As, Bs, weights, rank=rank)
    assert a.shape == (rank, M.shape[1]) and b.shape == (M.shape[0], rank)
    k = min(rank, S.numel())
    # Eckart-Young: the residual energy is exactly the discarded singular values' energy.
    residual = float(torch.linalg.norm(M - b @ a))
    assert residual == pytest.approx(float(S[k:].norm()), abs=1e-9 * scale)
    # Balanced split: B^T B = A A^T = diag(s_1..s_rank), zero-padded beyond rank(M).
    s_pad = torch.zeros(rank, dtype=F64)
    s_pad[:k] = S[:k]
    close(b.mT @ b, torch.diag(s_pad), scale=scale)
    close(a @ a.mT, torch.diag(s_pad), scale=scale)
    energy = float(S.square().sum())
    expected_err = float(S[k:].square().sum()) / energy if energy > 0 else 0.0
    assert err == pytest.approx(expected_err, abs=1e-9)
    assert fra_truncation_error(As, Bs, weights, rank=rank) == pytest.approx(err, abs=1e-12)
    if well_separated(S, k):
        close(b @ a, (U[:, :k] * S[:k]) @ Vh[:k], scale=scale, tol=1e-8)


@pytest.mark.parametrize(
    ("out", "inp", "ranks", "route"),
    [
        (40, 30, [2, 3, 1], "factored"),  # R = 6 < 30
        (8, 6, [5], "factored"),  # R = 5 < 6
        (8, 6, [2, 2, 2], "dense"),  # R = 6 = min(out, in): boundary
        (6, 8, [4, 4], "dense"),  # R = 8 > 6
    ],
)
def test_fra_both_routes_match_reference_factors(out, inp, ranks, route):
    assert choose_route(total_rank=sum(ranks), out_features=out, in_features=inp) == route
    As, Bs = random_layer(out, inp, ranks, seed=len(ranks) + out)
    weights = [1.0 + k for k in range(len(ranks))]
    M = ref_M(As, Bs, weights)
    U, S, Vh = torch.linalg.svd(M)
    rank = 3
    # Documented convention: the largest-|.| entry of each column of U is positive.
    idx = U[:, :rank].abs().argmax(0)
    sign = torch.sign(U[idx, torch.arange(rank)])
    b_ref = U[:, :rank] * sign * S[:rank].sqrt()
    a_ref = (sign * S[:rank].sqrt())[:, None] * Vh[:rank]
    a, b = fra(As, Bs, weights, rank=rank)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)
    torch.testing.assert_close(torch.linalg.svdvals(a), S[:rank].sqrt())
    torch.testing.assert_close(torch.linalg.svdvals(b), S[:rank].sqrt())


def test_fra_factored_route_never_decomposes_the_dense_matrix(monkeypatch):
    seen = []
    real_svd = torch.linalg.svd

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real_svd(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    As, Bs = random_layer(300, 200, [4, 4, 4])
    fra(As, Bs, rank=4)
    assert seen == [(12, 12)]  # only the R x R core


def test_svd_of_product_routes_agree():
    g = torch.Generator().manual_seed(7)
    p, q = torch.randn(30, 5, generator=g, dtype=F64), torch.randn(5, 20, generator=g, dtype=F64)
    c = torch.rand(5, generator=g, dtype=F64)
    uf, sf, vf = svd_of_product(p, c, q, route="factored", top=4)
    ud, sd, vd = svd_of_product(p, c, q, route="dense", top=4)
    torch.testing.assert_close(sf, sd[:5])
    assert torch.all(sd[5:] == 0)  # beyond rank(M) the dense route's values are noise: zeroed
    torch.testing.assert_close(uf, ud)
    torch.testing.assert_close(vf, vd)
    torch.testing.assert_close(
        frobenius_norm_of_product(p, c, q, route="factored"), torch.linalg.norm((p * c) @ q)
    )
    torch.testing.assert_close(singular_values_of_product(p, c, q, route="factored"), sf)


def test_fra_rank_larger_than_available_pads_with_zeros():
    As, Bs = random_layer(7, 9, [1, 2])
    a, b = fra(As, Bs, rank=6)
    assert a.shape == (6, 9) and b.shape == (7, 6)
    assert torch.all(a[3:] == 0) and torch.all(b[:, 3:] == 0)
    assert torch.all(torch.linalg.norm(a[:3], dim=1) > 0)
    close(b @ a, ref_M(As, Bs), scale=scale_of(As, Bs))
    assert fra_truncation_error(As, Bs, rank=6) == 0.0
    # rank beyond min(out, in) as well: still (out, rank) and (rank, in).
    a, b = fra(As, Bs, rank=12)
    assert a.shape == (12, 9) and b.shape == (7, 12)
    close(b @ a, ref_M(As, Bs), scale=scale_of(As, Bs))


def test_fra_keeps_small_but_real_singular_values():
    # Two orthogonal rank-1 updates with singular values 1 and 1e-6 (far above rounding).
    e = torch.eye(6, dtype=F64)
    As, Bs = [e[:1], 1e-6 * e[1:2]], [e[:, :1], e[:, 1:2]]
    a, b = fra(As, Bs, [1.0, 1.0], rank=2)
    torch.testing.assert_close(b @ a, ref_M(As, Bs), rtol=0, atol=1e-15)
    assert fra_truncation_error(As, Bs, rank=1) == pytest.approx(1e-12 / (1 + 1e-12), rel=1e-6)


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_identical_clients_are_a_fixed_point(dtype):
    a1, b1 = (x[0] for x in random_layer(16, 12, [3], seed=11, dtype=dtype))
    As, Bs, weights = [a1] * 3, [b1] * 3, [0.2, 0.5, 0.3]
    a, b = fedavg(As, Bs, weights)
    torch.testing.assert_close(a, a1)
    torch.testing.assert_close(b, b1)
    if dtype == torch.float32:
        # float64 arithmetic rounds back to the very same float32 numbers.
        assert torch.equal(a, a1) and torch.equal(b, b1)
    a, b, residual = fedex(As, Bs, weights)
    torch.testing.assert_close(a, a1)
    torch.testing.assert_close(b, b1)
    torch.testing.assert_close(residual, torch.zeros_like(residual))
    a, b = stack(As, Bs, weights)
    torch.testing.assert_close(b @ a, b1 @ a1)
    assert fedavg_error(As, Bs, weights) == pytest.approx(0.0, abs=1e-7)
    for rank in (3, 5):
        a, b = fra(As, Bs, weights, rank=rank)
        torch.testing.assert_close(b @ a, b1 @ a1)
    assert fra_truncation_error(As, Bs, weights, rank=3) == pytest.approx(0.0, abs=1e-12)
    # Below r_1 the fixed point is lost by construction: part of B_1 A_1 is discarded.
    assert fra_truncation_error(As, Bs, weights, rank=2) > 1e-3


@SETTINGS
@given(layers(equal_ranks=True), st.randoms(use_true_random=False), st.integers(1, 6))
def test_client_order_does_not_matter(case, rnd, rank):
    As, Bs, weights = case
    w = [1.0] * len(As) if weights is None else list(weights)
    perm = list(range(len(As)))
    rnd.shuffle(perm)
    pAs, pBs, pw = [As[i] for i in perm], [Bs[i] for i in perm], [w[i] for i in perm]
    scale = scale_of(As, Bs, w)
    for fn in (fedavg, stack):
        a1, b1 = fn(As, Bs, w)
        a2, b2 = fn(pAs, pBs, pw)
        close(b1 @ a1, b2 @ a2, scale=scale)
    a1, b1, r1 = fedex(As, Bs, w)
    a2, b2, r2 = fedex(pAs, pBs, pw)
    close(r1, r2, scale=scale)
    assert fedavg_error(As, Bs, w) == pytest.approx(fedavg_error(pAs, pBs, pw), abs=1e-9)
    S = torch.linalg.svdvals(ref_M(As, Bs, w))
    assume(well_separated(S, min(rank, S.numel())))
    a1, b1 = fra(As, Bs, w, rank=rank)
    a2, b2 = fra(pAs, pBs, pw, rank=rank)
    close(b1 @ a1, b2 @ a2, scale=scale, tol=1e-8)


@pytest.mark.parametrize("factor", [1e-3, 7.0, 1e6])
def test_scaling_all_weights_changes_nothing(factor):
    As, Bs = random_layer(20, 15, [2, 2, 2], seed=5)
    weights = [1.0, 3.0, 0.5]
    scaled = [factor * x for x in weights]
    for fn in (fedavg, stack):
        for x, y in zip(fn(As, Bs, weights), fn(As, Bs, scaled), strict=True):
            torch.testing.assert_close(x, y)
    for x, y in zip(fedex(As, Bs, weights), fedex(As, Bs, scaled), strict=True):
        torch.testing.assert_close(x, y)
    for x, y in zip(fra(As, Bs, weights, rank=3), fra(As, Bs, scaled, rank=3), strict=True):
        torch.testing.assert_close(x, y)
    assert fedavg_error(As, Bs, weights) == pytest.approx(fedavg_error(As, Bs, scaled))
    # ...while changing their ratios does change the result.
    assert not torch.allclose(fedavg(As, Bs, weights)[0], fedavg(As, Bs, [1.0, 1.0, 1.0])[0])


def test_zero_updates_give_zeros_without_nan():
    As = [torch.zeros(2, 6), torch.zeros(2, 6)]
    Bs = [torch.zeros(5, 2), torch.zeros(5, 2)]
    outputs = [*fedavg(As, Bs), *fedex(As, Bs), *stack(As, Bs), *fra(As, Bs, rank=3)]
    for x in outputs:
        assert torch.all(x == 0)
    assert fedavg_error(As, Bs) == 0.0 and fra_truncation_error(As, Bs, rank=1) == 0.0
    # LoRA's initialisation (B = 0, A random) is also M = 0: FRA returns zero factors.
    As = random_layer(5, 6, [2, 2], dtype=torch.float32)[0]
    a, b = fra(As, Bs, rank=2)
    assert torch.all(a == 0) and torch.all(b == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_are_preserved(dtype):
    As, Bs = random_layer(24, 20, [2, 3], seed=2, dtype=dtype)
    outs = [
        *fedavg([As[0], As[0]], [Bs[0], Bs[0]]),
        *fedex([As[0], As[0]], [Bs[0], Bs[0]]),
        *stack(As, Bs),
        *fra(As, Bs, rank=4),
    ]
    for x in outs:
        assert x.dtype == dtype and x.device == As[0].device
        assert torch.isfinite(x).all()
    # Computed in float64, then rounded once: as accurate as the output dtype allows.
    M = ref_M(As, Bs)
    U, S, Vh = torch.linalg.svd(M)
    a, b = fra(As, Bs, rank=4)
    eps = torch.finfo(dtype).eps
    close(b.to(F64) @ a.to(F64), (U[:, :4] * S[:4]) @ Vh[:4], scale=scale_of(As, Bs), tol=4 * eps)


# ----------------------------------------------------------------------------- bad input
def _layer():
    return random_layer(5, 4, [2, 2], dtype=torch.float32)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ([], [], None), r"no clients to aggregate: As and Bs are empty"),
        (lambda: (_layer()[0], _layer()[1][:1], None), "got 2 A factors but 1 B factors"),
        (
            lambda: ([torch.zeros(2, 4), torch.zeros(2, 3)], _layer()[1], None),
            "client 1: in_features 3 differs from client 0's 4",
        ),
        (
            lambda: (_layer()[0], [torch.zeros(5, 2), torch.zeros(6, 2)], None),
            "client 1: out_features 6 differs from client 0's 5",
        ),
        (
            lambda: ([torch.zeros(2, 4), torch.zeros(3, 4)], _layer()[1], None),
            r"client 1: rank of A \(3, from shape \(3, 4\)\) differs from rank of B \(2,",
        ),
        (
            lambda: ([torch.zeros(4)], [torch.zeros(5, 1)], None),
            r"client 0: A and B must be 2-D, got shapes \(4,\), \(5, 1\)",
        ),
        (
            lambda: ([torch.zeros(0, 4)], [torch.zeros(5, 0)], None),
            r"client 0: LoRA rank must be >= 1, got A of shape \(0, 4\)",
        ),
        (
            lambda: ([torch.zeros(2, 4)], [torch.zeros(5, 2, dtype=F64)], None),
            "client 0: dtype torch.float32/torch.float64 differs from torch.float32",
        ),
        (
            lambda: ([torch.full((2, 4), float("nan"))], [torch.zeros(5, 2)], None),
            "client 0: factors contain NaN or infinite values",
        ),
        (
            lambda: ([torch.zeros(2, 4)], [torch.full((5, 2), float("inf"))], None),
            "client 0: factors contain NaN or infinite values",
        ),
        (lambda: (*_layer(), [1.0]), r"got 1 weights for 2 clients"),
        (lambda: (*_layer(), [1.0, -1.0]), r"weights must be non-negative, got \[1.0, -1.0\]"),
        (
            lambda: (*_layer(), [0.0, 0.0]),
            "weights are all zero: at least one client must have a positive weight",
        ),
        (lambda: (*_layer(), [1.0, float("nan")]), r"weights must be finite, got \[1.0, nan\]"),
    ],
)
@pytest.mark.parametrize("fn", [fedavg, fedex, stack, fedavg_error, fra, fra_truncation_error])
def test_bad_input_raises_value_error(fn, make, match):
    As, Bs, weights = make()
    kwargs = {"rank": 2} if fn in (fra, fra_truncation_error) else {}
    with pytest.raises(ValueError, match=match):
        fn(As, Bs, weights, **kwargs)


@pytest.mark.parametrize("fn", [fedavg, fedex, fedavg_error])
def test_factor_averaging_rejects_unequal_ranks(fn):
    As, Bs = random_layer(5, 4, [2, 3])
    with pytest.raises(
        ValueError,
        match=r"averages factors and needs equal ranks across clients, got \(2, 3\); use stack",
    ):
        fn(As, Bs)
    stack(As, Bs)  # stacking and FRA accept them
    fra(As, Bs, rank=2)


@pytest.mark.parametrize(
    ("rank", "match"),
    [
        (0, "rank must be >= 1, got 0"),
        (-1, "rank must be >= 1, got -1"),
        (1.5, "rank must be an integer >= 1, got 1.5"),
    ],
)
def test_fra_rejects_bad_rank(rank, match):
    As, Bs = _layer()
    with pytest.raises(ValueError, match=f"^{match}$"):
        fra(As, Bs, rank=rank)
    with pytest.raises(ValueError, match=f"^{match}$"):
        fra_truncation_error(As, Bs, rank=rank)
