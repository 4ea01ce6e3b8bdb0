"""DP-SGD on a client: per-example clipping, noise, and Opacus' wrapper not leaking."""

import pytest
import torch

from fedlora.client import LocalTraining
from fedlora.config import DPConfig, load_config
from fedlora.data import Encoded
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, RoundPlan
from fedlora.methods import METHOD_NAMES, build_method
from fedlora.outputs import RunDir, read_metrics
from fedlora.privacy import ClientPrivacy, train_client_dp
from fedlora.runtime import run_federated


@pytest.fixture
def fed(no_dropout_bert_dir, tiny_overrides):
    return build_federation(
        load_config(None, [*tiny_overrides, f"model={no_dropout_bert_dir}"]), log=silent
    )


def first_rows(data: Encoded, n: int) -> Encoded:
    return Encoded(
        input_ids=data.input_ids[:n],
        attention_mask=data.attention_mask[:n],
        labels=data.labels[:n],
        token_type_ids=None if data.token_type_ids is None else data.token_type_ids[:n],
    )


def nonzero_start(state: AdapterState, dtype: torch.dtype) -> AdapterState:
    """PEFT starts with B = 0, which makes every gradient of A zero: start elsewhere."""
    g = torch.Generator().manual_seed(1)
    return AdapterState(
        A={k: v.to(dtype) for k, v in state.A.items()},
        B={k: (0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in state.B.items()},
        head={k: v.to(dtype) for k, v in state.head.items()},
    )


PLAN = RoundPlan(round=1, trained="AB", train_head=True, method="fedavg")


def one_full_batch_step(fed, state, data, *, noise: float, clip: float, seed: int):
    """One DP-SGD step with SGD(lr=1) on all of ``data`` (q = 1: no sampling randomness)."""
    n = len(data)
    privacy = ClientPrivacy(
        noise_multiplier=noise, max_grad_norm=clip, num_examples=n, batch_size=n, steps_per_round=1
    )
    update = train_client_dp(
        adapter=fed.adapter,
        state=state,
        data=data,
        plan=PLAN,
        settings=LocalTraining(local_steps=1, batch_size=n, lr=1.0, optimizer="sgd"),
        client_id=0,
        seed=seed,
        privacy=privacy,
    )
    assert privacy.steps == 1 and privacy.sample_rate == 1.0
    return update


def flat(update) -> torch.Tensor:
    return torch.cat(
        [t.flatten() for t in [*update.A.values(), *update.B.values(), *update.head.values()]]
    )


def test_every_per_sample_gradient_is_clipped_before_noise(fed):
    """With zero noise, the DP step is the mean of per-example clipped gradients computed
    one example at a time (float64)."""
    fed.adapter.model.double()
    data = first_rows(fed.encoded[0].train, 10)
    state = nonzero_start(fed.initial_state, torch.float64)

    # Reference: a plain loop, one example per backward pass.
    adapter, model = fed.adapter, fed.adapter.model
    adapter.set_state(state)
    params = adapter.set_trainable("AB", head=True)
    model.train()
    grads = []
    for i in range(len(data)):
        model.zero_grad(set_to_none=True)
        model(**data.batch(torch.tensor([i]))).loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gs)) for gs in grads])
    clip = float(norms.median())  # some examples are clipped, others are not
    assert (norms > clip).any() and (norms < clip).any()
    # Opacus' factor has a 1e-6 stabiliser in the denominator; the reference uses it too.
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    mean_clipped = [
        sum(f * gs[j] for f, gs in zip(factors, grads, strict=True)) / len(data)
        for j in range(len(params))
    ]
    mean_raw = [sum(gs[j] for gs in grads) / len(data) for j in range(len(params))]
    with torch.no_grad():
        for p, g in zip(params, mean_clipped, strict=True):
            p.sub_(g)
    expected = adapter.get_state("AB", head=True)
    with torch.no_grad():
        for p, g_clip, g_raw in zip(params, mean_clipped, mean_raw, strict=True):
            p.add_(g_clip).sub_(g_raw)
    unclipped = adapter.get_state("AB", head=True)

    update = one_full_batch_step(fed, state, data, noise=0.0, clip=clip, seed=0)

    for kind in ("A", "B", "head"):
        for name, value in getattr(expected, kind).items():
            got = getattr(update, kind)[name]
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-12)
    # the comparison can fail: without clipping the step is measurably different
    assert (flat(update) - flat(unclipped)).abs().max() > 1e-4


def test_noise_is_added_two_seeds_give_different_updates(fed):
    data = first_rows(fed.encoded[0].train, 10)
    state = nonzero_start(fed.initial_state, torch.float32)
    clip, sigma, n = 0.05, 1.0, len(data)
    quiet = [
        flat(one_full_batch_step(fed, state, data, noise=0.0, clip=clip, seed=s)) for s in (0, 1)
    ]
    noisy = [
        flat(one_full_batch_step(fed, state, data, noise=sigma, clip=clip, seed=s)) for s in (0, 1)
    ]
    # Without noise (and q = 1) the seed changes nothing; with noise it changes everything.
    torch.testing.assert_close(quiet[0], quiet[1])
    diff = noisy[0] - noisy[1]
    assert (diff != 0).float().mean() > 0.99
    # Two independent draws of N(0, sigma^2 C^2) / n differ with std sqrt(2) sigma C / n.
    ratio = float(diff.std()) / (2**0.5 * sigma * clip / n)
    assert 0.85 < ratio < 1.15, ratio
    # and each noisy update is the noise-free one plus that noise
    ratio0 = float((noisy[0] - quiet[0]).std()) / (sigma * clip / n)
    assert 0.85 < ratio0 < 1.15, ratio0


def test_rolora_with_dp_runs_four_rounds_with_epsilon_strictly_increasing(fed, tmp_path):
    fed.cfg = fed.cfg.replace(method="rolora", rounds=4, dp=DPConfig(noise_multiplier=1.0))
    result = run_federated(fed, build_method("rolora", fed.cfg), RunDir(tmp_path), log=silent)
    rows = read_metrics(tmp_path)
    assert [r["trained"] for r in rows[1:]] == ["B+head", "A+head", "B+head", "A+head"]
    for cid in ("0", "1", "2"):
        eps = [r["epsilon"][cid] for r in rows]
        assert eps[0] == 0.0
        assert all(b > a for a, b in zip(eps[:-1], eps[1:], strict=True)), eps
    assert result["privacy"]["steps"] == {0: 8, 1: 8, 2: 8}
    # Opacus' wrapper was removed after every client's round: nothing leaks into the shared model.
    model = fed.adapter.model
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")


DP_METHODS = ["fedavg", "ffa", "rolora", "fra", "fedex", "centralized"]


@pytest.mark.parametrize("name", DP_METHODS)
def test_dp_trains_every_method(fed, tmp_path, name):
    assert name in METHOD_NAMES
    fed.cfg = fed.cfg.replace(method=name, rounds=1, dp=DPConfig(noise_multiplier=1.0))
    result = run_federated(fed, build_method(name, fed.cfg), RunDir(tmp_path), log=silent)
    dp = result["privacy"]
    expected_ids = {0} if name == "centralized" else {0, 1, 2}
    assert set(dp["steps"]) == expected_ids
    assert all(steps > 0 for steps in dp["steps"].values())
    assert all(0 < eps < float("inf") for eps in dp["epsilon"].values())
    # the global adapter moved (every method trains B in its first round)
    changed = [not torch.equal(result["state"].B[k], v) for k, v in fed.initial_state.B.items()]
    assert any(changed)
