"""The one aggregation-error unit, weighted means, and FRA-LoRA's split and padding,
against dense float64 references."""

import math

import pytest
import torch

from fedlora.aggregation import client_drift, fra_with_error, relative_update_error, weighted_mean
from fedlora.aggregation.fra import init_row_norm


def factors(seed: int, ranks, out=9, inp=7):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, inp, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in ranks]
    return As, Bs


def dense_mean(As, Bs, weights, scalings):
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return sum(w[k] * scalings[k] * Bs[k] @ As[k] for k in range(len(As)))


@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 3, 2)])
def test_relative_update_error_matches_dense_reference(ranks):
    As, Bs = factors(0, ranks)
    weights, scalings = [1.0, 2.0, 5.0], [4.0, 1.5, 2.0]
    g = torch.Generator().manual_seed(9)
    A, B = (
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(9, 3, generator=g, dtype=torch.float64),
    )
    M = dense_mean(As, Bs, weights, scalings)
    expected = float(torch.linalg.norm(M - 2.5 * B @ A) / torch.linalg.norm(M))
    got = relative_update_error(As, Bs, weights, scalings=scalings, A=A, B=B, scaling=2.5)
    assert got == pytest.approx(expected, rel=1e-12)
    folded = torch.randn(9, 7, generator=g, dtype=torch.float64)
    expected = float(torch.linalg.norm(M - 2.5 * B @ A - folded) / torch.linalg.norm(M))
    got = relative_update_error(
        As, Bs, weights, scalings=scalings, A=A, B=B, scaling=2.5, folded=folded
    )
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 3, 2)])
def test_client_drift_matches_dense_reference(ranks):
    As, Bs = factors(3, ranks, out=40, inp=30)
    weights, scalings = [1.0, 2.0, 5.0], [4.0, 1.5, 2.0]
    M = dense_mean(As, Bs, weights, scalings)
    w = [x / sum(weights) for x in weights]
    spread = sum(
        w[k] * float(torch.linalg.norm(scalings[k] * Bs[k] @ As[k] - M)) ** 2 for k in range(3)
    )
    expected = math.sqrt(spread) / float(torch.linalg.norm(M))
    assert client_drift(As, Bs, weights, scalings=scalings) == pytest.approx(expected, rel=1e-12)
    # float32 factors are upcast: the same spread to float32 rounding
    got32 = client_drift(
        [a.float() for a in As], [b.float() for b in Bs], weights, scalings=scalings
    )
    assert got32 == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spread", [1e-2, 1e-4, 1e-6])
def test_client_drift_of_clients_near_a_common_adapter_is_accurate(spread):
    # the Gram identity subtracts two nearly equal sums: its ratio stays within 1e-8 absolute
    g = torch.Generator().manual_seed(5)
    A = torch.randn(4, 30, generator=g, dtype=torch.float64)
    B = torch.randn(40, 4, generator=g, dtype=torch.float64)
    Bs = [B + spread * torch.randn(40, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    P = [b @ A for b in Bs]
    M = sum(P) / 5
    gaps = [float(torch.linalg.norm(p - M)) ** 2 for p in P]
    expected = math.sqrt(sum(gaps) / 5) / float(torch.linalg.norm(M))
    got = client_drift([A] * 5, Bs, None, scalings=[1.0] * 5)
    assert got == pytest.approx(expected, abs=1e-8)


def test_client_drift_is_zero_for_equal_clients_and_undefined_when_they_cancel():
    As, Bs = factors(4, (2,))
    assert client_drift(As * 3, Bs * 3, None, scalings=[2.0] * 3) == pytest.approx(0.0, abs=1e-7)
    # two opposite increments: the mean is 0 but the clients are not
    assert math.isinf(client_drift(As * 2, [Bs[0], -Bs[0]], None, scalings=[1.0, 1.0]))
    zeros = [torch.zeros(9, 2, dtype=torch.float64)] * 2
    assert client_drift(As * 2, zeros, None, scalings=[1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="got 1 scalings for 2 clients"):
        client_drift(As * 2, Bs * 2, None, scalings=[1.0])


def test_relative_update_error_is_zero_for_the_exact_mean_and_says_when_undefined():
    As, Bs = factors(1, (2, 2))
    M = dense_mean(As, Bs, [1.0, 1.0], [2.0, 2.0])
    zero_A, zero_B = torch.zeros(2, 7, dtype=torch.float64), torch.zeros(9, 2, dtype=torch.float64)
    exact = relative_update_error(
        As, Bs, None, scalings=[2.0, 2.0], A=zero_A, B=zero_B, scaling=1.0, folded=M
    )
    assert exact == pytest.approx(0.0, abs=1e-14)
    zeros = [torch.zeros(9, 2, dtype=torch.float64)] * 2
    assert (
        relative_update_error(As, zeros, None, scalings=[1, 1], A=zero_A, B=zero_B, scaling=1.0)
        == 0.0
    )
    # no client proposed an update, but the aggregate holds one: no relative error exists
    assert math.isinf(
        relative_update_error(As, zeros, None, scalings=[1, 1], A=As[0], B=Bs[0], scaling=1.0)
    )
    with pytest.raises(ValueError, match="got 1 scalings for 2 clients"):
        relative_update_error(As, Bs, None, scalings=[1.0], A=zero_A, B=zero_B, scaling=1.0)


def test_weighted_mean_validates_weights_like_every_aggregator():
    ts = [torch.ones(3), 3 * torch.ones(3)]
    torch.testing.assert_close(weighted_mean(ts, [1.0, 3.0]), 2.5 * torch.ones(3))
    torch.testing.assert_close(weighted_mean(ts, None), 2.0 * torch.ones(3))
    with pytest.raises(ValueError, match="weights are all zero"):
        weighted_mean(ts, [0.0, 0.0])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        weighted_mean(ts, [2.0, -1.0])
    with pytest.raises(ValueError, match="got 1 weights for 2 clients"):
        weighted_mean(ts, [1.0])
    with pytest.raises(ValueError, match="client 1: tensor contains NaN"):
        weighted_mean([torch.ones(3), torch.tensor([1.0, float("nan"), 0.0])], None)


def test_fra_split_balanced_and_init_scale_keep_the_product():
    As, Bs = factors(2, (3, 3))
    M = dense_mean(As, Bs, [1.0, 2.0], [1.0, 1.0])
    U, S, Vh = torch.linalg.svd(M)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    a, b, _ = fra_with_error(As, Bs, [1.0, 2.0], rank=4)
    torch.testing.assert_close(b @ a, best)
    # balanced: B^T B = A A^T = diag(sigma_r)
    torch.testing.assert_close(b.T @ b, torch.diag(S[:4]))
    torch.testing.assert_close(a @ a.T, torch.diag(S[:4]))
    c = init_row_norm()
    a, b, _ = fra_with_error(As, Bs, [1.0, 2.0], rank=4, a_row_norm=c)
    torch.testing.assert_close(b @ a, best)
    # all of sigma in B; A's rows orthogonal at PEFT's initial scale 1/sqrt(3)
    torch.testing.assert_close(a @ a.T, c**2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(b.T @ b, torch.diag(S[:4] ** 2) / c**2)


def test_fra_pads_missing_rank_with_random_rows_of_a_and_zero_columns_of_b():
    As, Bs = factors(3, (1, 1))  # rank(M) <= 2 < 5
    M = dense_mean(As, Bs, [1.0, 1.0], [1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    a, b, err = fra_with_error(As, Bs, rank=5, generator=g)
    torch.testing.assert_close(b @ a, M)
    assert err == 0.0
    assert torch.count_nonzero(b[:, 2:]) == 0
    # the padded rows are fresh directions drawn like PEFT's lora_A, not zeros: the gradient
    # of their B columns (grad_W @ A_j^T) is not zero, so training can use them
    assert bool((a[2:].abs().sum(dim=1) > 0).all())
    assert float(a[2:].abs().max()) <= 1 / math.sqrt(7)
    again, _, _ = fra_with_error(As, Bs, rank=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, a)  # seeded
    zero_pad, _, _ = fra_with_error(As, Bs, rank=5)
    assert torch.count_nonzero(zero_pad[2:]) == 0  # no generator: the old zero padding
