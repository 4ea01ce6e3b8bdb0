"""FlexLoRA's and HetLoRA's aggregation math against dense float64 references."""

import pytest
import torch

from fedlora import aggregation


def factors(ranks, out, in_, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, in_, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=dtype) for r in ranks]
    return As, Bs


def dense_mean(As, Bs, weights):
    total = sum(weights)
    return sum(w / total * B @ A for w, A, B in zip(weights, As, Bs, strict=True))


def best_rank(M, r):
    U, S, Vh = torch.linalg.svd(M)
    return (U[:, :r] * S[:r]) @ Vh[:r]


# (out, in): sum of ranks 10 >= min(out, in) takes the dense SVD, 10 < 20 the factored one
@pytest.mark.parametrize("shape", [(9, 11), (20, 30)])
def test_flexlora_leading_ranks_are_the_best_approximation_at_every_rank(shape):
    out, in_ = shape
    As, Bs = factors([2, 3, 5], out, in_)
    weights = [1.0, 2.0, 3.0]
    R = 6
    A, B = aggregation.flexlora(As, Bs, weights, rank=R)
    assert A.shape == (R, in_) and B.shape == (out, R)
    M = dense_mean(As, Bs, weights)
    for r in range(1, R + 1):
        a, b = aggregation.truncate(A, B, rank=r)
        torch.testing.assert_close(b @ a, best_rank(M, r), rtol=1e-10, atol=1e-10)
    # the authors' split: A has orthonormal rows, B holds the singular values
    torch.testing.assert_close(A @ A.T, torch.eye(R, dtype=A.dtype), rtol=0, atol=1e-12)
    S = torch.linalg.svdvals(M)[:R]
    torch.testing.assert_close(torch.linalg.vector_norm(B, dim=0), S, rtol=1e-10, atol=1e-12)


def test_flexlora_pads_ranks_beyond_rank_of_m_with_trainable_rows():
    As, Bs = factors([2], 8, 10)
    g = torch.Generator().manual_seed(0)
    A, B = aggregation.flexlora(As, Bs, rank=4, generator=g)
    torch.testing.assert_close(B @ A, Bs[0] @ As[0], rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(B[:, 2:]) == 0
    assert bool((A[2:].abs().sum(dim=1) > 0).all())  # training can use them


def test_flexlora_does_not_depend_on_client_order():
    As, Bs = factors([2, 4, 3], 12, 10, seed=3)
    w = [3.0, 1.0, 2.0]
    A1, B1 = aggregation.flexlora(As, Bs, w, rank=5)
    A2, B2 = aggregation.flexlora(As[::-1], Bs[::-1], w[::-1], rank=5)
    torch.testing.assert_close(A1, A2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(B1, B2, rtol=1e-9, atol=1e-9)


def test_hetlora_is_the_weighted_mean_of_zero_padded_factors():
    ranks, out, in_ = [2, 4, 3], 7, 6
    As, Bs = factors(ranks, out, in_, seed=1)
    weights = [0.5, 0.2, 0.3]
    A, B = aggregation.hetlora(As, Bs, weights, rank=5)
    # reference: pad by hand, then the plain weighted sums
    ref_A = torch.zeros(5, in_, dtype=torch.float64)
    ref_B = torch.zeros(out, 5, dtype=torch.float64)
    for w, a, b, r in zip(weights, As, Bs, ranks, strict=True):
        ref_A[:r] += w * a
        ref_B[:, :r] += w * b
    torch.testing.assert_close(A, ref_A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B, ref_B, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(A[4:]) == 0 and torch.count_nonzero(B[:, 4:]) == 0
    # not exact: the cross terms of factor averaging remain
    assert torch.linalg.norm(B @ A - dense_mean(As, Bs, weights)) > 0.1


def test_hetlora_of_identical_clients_is_the_client_and_order_free():
    As, Bs = factors([3], 5, 4)
    A, B = aggregation.hetlora(As * 3, Bs * 3, [1.0, 2.0, 3.0], rank=3)
    torch.testing.assert_close(A, As[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B, Bs[0], rtol=1e-12, atol=1e-12)
    As, Bs = factors([2, 4, 3], 5, 4, seed=2)
    w = [1.0, 2.0, 4.0]
    one = aggregation.hetlora(As, Bs, w, rank=4)
    other = aggregation.hetlora(As[::-1], Bs[::-1], w[::-1], rank=4)
    for x, y in zip(one, other, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_hetlora_refuses_a_client_above_the_padded_rank():
    As, Bs = factors([2, 5], 5, 4)
    with pytest.raises(ValueError, match="exceed the padded rank 4"):
        aggregation.hetlora(As, Bs, rank=4)


def test_pad_and_truncate_keep_the_product_and_check_ranks():
    (A,), (B,) = factors([3], 6, 5)
    a, b = aggregation.zero_pad(A, B, rank=5)
    torch.testing.assert_close(b @ a, B @ A, rtol=0, atol=0)
    back = aggregation.truncate(a, b, rank=3)
    assert torch.equal(back[0], A) and torch.equal(back[1], B)
    with pytest.raises(ValueError, match="cannot truncate a rank-3 pair to rank 4"):
        aggregation.truncate(A, B, rank=4)
    with pytest.raises(ValueError, match="cannot zero-pad a rank-3 pair to rank 2"):
        aggregation.zero_pad(A, B, rank=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        aggregation.truncate(A, B, rank=0)


def test_sparsity_weights_follow_the_increments_norms():
    As, Bs = factors([2, 4, 3], 9, 8, seed=4)
    norms = [aggregation.lora_norm(A, B) for A, B in zip(As, Bs, strict=True)]
    dense = [float(torch.linalg.norm(B @ A)) for A, B in zip(As, Bs, strict=True)]
    assert norms == pytest.approx(dense, rel=1e-12)
    p = aggregation.sparsity_weights(norms)
    assert p == pytest.approx([d / sum(dense) for d in dense], rel=1e-12)
    # other weights multiply the paper's: p_k proportional to w_k ||dW_k||
    q = aggregation.sparsity_weights(norms, [1.0, 2.0, 0.0])
    assert q == pytest.approx(
        [dense[0] / (dense[0] + 2 * dense[1]), 2 * dense[1] / (dense[0] + 2 * dense[1]), 0.0]
    )
    assert aggregation.sparsity_weights([0.0, 0.0], [1.0, 3.0]) == pytest.approx((0.25, 0.75))
    with pytest.raises(ValueError, match="finite and >= 0"):
        aggregation.sparsity_weights([1.0, -1.0])


def test_tail_norm_is_the_product_of_the_tail_norms_and_regularises_only_the_tail():
    (A,), (B,) = factors([8], 6, 5)
    A.requires_grad_(True)
    B.requires_grad_(True)
    t = aggregation.tail_norm(A, B, gamma=0.75)  # tail: ranks 6 and 7
    expected = torch.linalg.norm(B[:, 6:].detach()) * torch.linalg.norm(A[6:].detach())
    assert t.item() == pytest.approx(expected.item(), rel=1e-12)
    t.backward()
    assert torch.count_nonzero(A.grad[:6]) == 0 and torch.count_nonzero(B.grad[:, :6]) == 0
    assert torch.count_nonzero(A.grad[6:]) > 0 and torch.count_nonzero(B.grad[:, 6:]) > 0
    assert aggregation.tail_norm(A, B, gamma=1.0).item() == 0.0  # no tail


@pytest.mark.parametrize(
    ("rank", "gamma", "expected"),
    [(8, 0.99, 7), (2, 0.99, 1), (1, 0.5, 1), (10, 0.5, 5), (100, 0.29, 29), (6, 1.0, 6)],
)
def test_pruned_rank_is_floor_gamma_r_never_below_one(rank, gamma, expected):
    assert aggregation.pruned_rank(rank, gamma=gamma) == expected


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_pruned_rank_refuses_gamma_outside_0_1(gamma):
    with pytest.raises(ValueError, match="gamma must be in"):
        aggregation.pruned_rank(4, gamma=gamma)


def test_results_keep_the_input_dtype():
    As, Bs = factors([2, 3], 6, 5, dtype=torch.float32)
    for fn in (aggregation.flexlora, aggregation.hetlora):
        A, B = fn(As, Bs, rank=3)
        assert A.dtype == B.dtype == torch.float32
