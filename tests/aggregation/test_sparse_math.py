"""SLoRA's math (fedlora.aggregation.sparse) against float64 references written from the
paper's definitions (Babakniya et al., arXiv 2308.06522): the seeded mask, FedAvg over
it, and the truncated-SVD initialisation of LoRA."""

import numpy as np
import pytest
import torch

from fedlora.aggregation.fra import init_row_norm
from fedlora.aggregation.sparse import (
    layer_seed,
    mask_size,
    scatter_dense,
    sparse_fedavg,
    sparse_mask,
    svd_init,
    svd_init_with_error,
)


@pytest.mark.parametrize(
    ("shape", "density", "expected"),
    [((6, 5), 0.1, 3), ((6, 5), 1.0, 30), ((6, 5), 1e-6, 1), ((384, 384), 0.01, 1475)],
)
def test_mask_has_the_configured_density(shape, density, expected):
    numel = shape[0] * shape[1]
    assert mask_size(numel, density) == expected == max(1, int(np.floor(density * numel + 0.5)))
    idx = sparse_mask(shape=shape, density=density, seed=7)
    assert idx.dtype == torch.int64 and idx.numel() == expected
    assert torch.equal(idx, torch.unique(idx))  # sorted, no repeats
    assert int(idx.min()) >= 0 and int(idx.max()) < numel


def test_mask_is_a_function_of_its_seed_only():
    a = sparse_mask(shape=(40, 30), density=0.2, seed=3)
    assert torch.equal(a, sparse_mask(shape=(40, 30), density=0.2, seed=3))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, sparse_mask(shape=(40, 30), density=0.2, seed=3))
    assert not torch.equal(a, sparse_mask(shape=(40, 30), density=0.2, seed=4))
    # data-independent and spread out: a uniform draw covers every row of a tall matrix
    rows = sparse_mask(shape=(40, 30), density=0.5, seed=0) // 30
    assert set(rows.tolist()) == set(range(40))


def test_layer_seeds_differ_per_layer_and_per_run_seed():
    names = [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    ]
    seeds = {layer_seed(s, n) for s in (0, 1) for n in names}
    assert len(seeds) == 4
    assert layer_seed(0, names[0]) == layer_seed(0, names[0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_is_refused(density):
    with pytest.raises(ValueError, match="density"):
        mask_size(10, density)


def dense_reference(values: np.ndarray, idx: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape[0] * shape[1])
    out[idx] = values
    return out.reshape(shape)


def test_sparse_fedavg_is_the_mean_of_the_dense_increments():
    """mean_k P_Omega(v_k) == P_Omega(sum_k w_k v_k), in float64, weights normalised."""
    shape = (7, 9)
    idx = sparse_mask(shape=shape, density=0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(idx.numel(), generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    expected = sum(
        w * dense_reference(v.numpy(), idx.numpy(), shape)
        for w, v in zip(weights, values, strict=True)
    ) / sum(weights)
    got = scatter_dense(sparse_fedavg(values, weights), indices=idx, shape=shape)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-15)
    # off the mask nothing: the increment touches exactly the masked entries
    off = np.ones(shape[0] * shape[1], dtype=bool)
    off[idx.numpy()] = False
    assert not got.reshape(-1).numpy()[off].any()
    # client order does not matter
    order = [2, 0, 1]
    permuted = sparse_fedavg([values[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(permuted, sparse_fedavg(values, weights), rtol=1e-15, atol=1e-15)


def test_sparse_fedavg_refuses_values_of_different_masks():
    with pytest.raises(ValueError):
        sparse_fedavg([torch.zeros(3), torch.zeros(4)], None)
    with pytest.raises(ValueError):
        scatter_dense(torch.zeros(3), indices=torch.arange(4), shape=(2, 2))


@pytest.mark.parametrize(("out", "inp", "rank"), [(12, 8, 3), (5, 20, 4), (6, 6, 6)])
def test_svd_init_is_the_best_rank_r_approximation(out, inp, rank):
    """s B A == U_r diag(sigma_r) V_r^T (numpy's SVD in float64), A = c V_r^T."""
    g = torch.Generator().manual_seed(out * 100 + inp)
    delta = torch.randn(out, inp, generator=g, dtype=torch.float64)
    s, c = 2.0, init_row_norm()
    A, B, discarded = svd_init_with_error(delta, rank=rank, scaling=s, a_row_norm=c)
    assert A.shape == (rank, inp) and B.shape == (out, rank) and A.dtype == torch.float64
    u, sigma, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
    best = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
    np.testing.assert_allclose((s * B @ A).numpy(), best, atol=1e-12)
    # the rows of A: orthogonal, norm c (PEFT's initial lora_A row norm)
    np.testing.assert_allclose((A @ A.T).numpy(), c**2 * np.eye(rank), atol=1e-12)
    share = float((sigma[rank:] ** 2).sum() / (sigma**2).sum())
    assert discarded == pytest.approx(share, rel=1e-10, abs=1e-15)
    a2, b2 = svd_init(delta, rank=rank, scaling=s, a_row_norm=c)
    assert torch.equal(a2, A) and torch.equal(b2, B)  # deterministic


def test_svd_init_of_a_low_rank_delta_keeps_a_trainable():
    """A delta of rank 1 < r: the product is exact, the extra directions have B = 0 and a
    non-zero row of A (PEFT's B = 0 start), never the stationary point (0, 0)."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(8, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 6, generator=g, dtype=torch.float64
    )
    A, B = svd_init(delta, rank=3, scaling=0.5, a_row_norm=0.7)
    torch.testing.assert_close(0.5 * B @ A, delta, rtol=0, atol=1e-12)
    assert float(B[:, 1:].abs().max()) == 0.0
    np.testing.assert_allclose(A.norm(dim=1).numpy(), [0.7, 0.7, 0.7], rtol=1e-12)
    zero_A, zero_B, share = svd_init_with_error(
        torch.zeros(4, 5, dtype=torch.float64), rank=2, scaling=1.0, a_row_norm=0.5
    )
    assert share == 0.0 and float(zero_B.abs().max()) == 0.0
    np.testing.assert_allclose(zero_A.norm(dim=1).numpy(), [0.5, 0.5], rtol=1e-12)


def test_svd_init_pads_a_rank_above_the_matrix_size():
    delta = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    A, B = svd_init(delta, rank=4, scaling=1.0, a_row_norm=1.0)
    assert A.shape == (4, 2) and B.shape == (3, 4)
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-12)


def test_svd_init_refuses_bad_input():
    with pytest.raises(ValueError, match="rank"):
        svd_init(torch.zeros(2, 2), rank=0, scaling=1.0, a_row_norm=1.0)
    with pytest.raises(ValueError, match="scaling"):
        svd_init(torch.zeros(2, 2), rank=1, scaling=0.0, a_row_norm=1.0)
    with pytest.raises(ValueError, match="NaN"):
        svd_init(torch.full((2, 2), float("nan")), rank=1, scaling=1.0, a_row_norm=1.0)
