"""LoRA-FAIR as a method: the per-layer correction, its diagnostics, its key, its error."""

import dataclasses

import pytest
import torch

from fedlora import aggregation
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import build_method
from fedlora.methods.base import update_error

LAYERS = {"l0": (10, 8), "l1": (6, 12)}  # out, in
RANK = 3
SCALING = 2.0


def start_state(seed: int = 0) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(
        A={
            k: 0.3 * torch.randn(RANK, i, generator=g, dtype=torch.float64)
            for k, (o, i) in LAYERS.items()
        },
        B={
            k: 0.05 * torch.randn(o, RANK, generator=g, dtype=torch.float64)
            for k, (o, i) in LAYERS.items()
        },
        head={"classifier.weight": torch.randn(2, 4, generator=g, dtype=torch.float64)},
    )


def replies(start: AdapterState, seed: int, k: int = 3, drift: float = 0.3) -> list[ClientUpdate]:
    """Clients that started from ``start`` and each moved it (a round's replies)."""
    g = torch.Generator().manual_seed(seed)

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t + drift * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype)

    return [
        ClientUpdate(
            client_id=c,
            num_examples=10 + 5 * c,
            A={layer: moved(a) for layer, a in start.A.items()},
            B={layer: moved(b) for layer, b in start.B.items()},
            head={name: moved(h) for name, h in start.head.items()},
        )
        for c in range(k)
    ]


def aggregate(method, start, updates, weights):
    return method.aggregate(
        plan=method.plan(1),
        state=start,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
    )


def errors(result, start, updates, weights):
    return update_error(
        before=start,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
        result=result,
    )


def test_each_layer_is_lora_fair_with_the_configured_lambda():
    method = build_method("lorafair", load_config(None, [f"rank={RANK}", "fair_lambda=0.05"]))
    assert method.plan(1).trained == "AB" and method.state_dict() == {}
    start = start_state()
    updates = replies(start, seed=1)
    weights = [float(u.num_examples) for u in updates]
    result = aggregate(method, start, updates, weights)
    assert not result.base_delta and result.delta_bytes == 0  # nothing folded, nothing extra
    for layer in LAYERS:
        fair = aggregation.lora_fair(
            [u.A[layer] for u in updates], [u.B[layer] for u in updates], weights, lam=0.05
        )
        torch.testing.assert_close(result.state.A[layer], fair.A)
        torch.testing.assert_close(result.state.B[layer], fair.B)
        assert fair.iterations > 0
        assert result.diagnostics["fair_cosine"][layer] == fair.cosine
        assert result.diagnostics["fair_b_cosine"][layer] == fair.b_cosine
    head = sum(w * u.head["classifier.weight"] for w, u in zip(weights, updates, strict=True))
    torch.testing.assert_close(result.state.head["classifier.weight"], head / sum(weights))


@pytest.mark.parametrize("seed", range(5))
def test_agg_error_is_below_fedavgs_on_the_same_replies(seed):
    cfg = load_config(None, [f"rank={RANK}"])
    start = start_state(seed)
    updates = replies(start, seed=100 + seed)
    weights = [float(u.num_examples) for u in updates]
    fair = errors(
        aggregate(build_method("lorafair", cfg), start, updates, weights), start, updates, weights
    )
    avg = errors(
        aggregate(build_method("fedavg", cfg), start, updates, weights), start, updates, weights
    )
    for layer in LAYERS:
        assert fair[layer] < avg[layer]


def test_client_order_does_not_matter():
    method = build_method("lorafair", load_config(None, [f"rank={RANK}"]))
    start = start_state()
    updates = replies(start, seed=2, k=4)
    weights = [float(u.num_examples) for u in updates]
    r1 = aggregate(method, start, updates, weights)
    r2 = aggregate(method, start, updates[::-1], weights[::-1])
    for layer in LAYERS:
        torch.testing.assert_close(r1.state.A[layer], r2.state.A[layer])
        torch.testing.assert_close(r1.state.B[layer], r2.state.B[layer])


def test_what_counts_is_what_each_clients_adapter_did():
    """A client whose adapter had scaling 2s and B_k / 2 proposed the same s_k B_k A_k as one
    with scaling s and B_k: the server weighs B_k by s_k / s, so the result is the same."""
    method = build_method("lorafair", load_config(None, [f"rank={RANK}"]))
    start = start_state()
    updates = replies(start, seed=3)
    halved = dataclasses.replace(
        updates[1],
        B={layer: b / 2 for layer, b in updates[1].B.items()},
        scaling=dict.fromkeys(LAYERS, 2 * SCALING),
    )
    weights = [1.0, 1.0, 1.0]
    plain = aggregate(method, start, updates, weights)
    rescaled = aggregate(method, start, [updates[0], halved, updates[2]], weights)
    for layer in LAYERS:
        torch.testing.assert_close(plain.state.B[layer], rescaled.state.B[layer])


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf"])
def test_bad_lambda_is_one_line(value):
    with pytest.raises(FedLoraError) as info:
        load_config(None, ["method=lorafair", f"fair_lambda={value}"])
    assert "config key 'fair_lambda' must be a finite number >= 0" in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_lambda_on_the_command_line_exits_2(capsys, tiny_overrides):
    code = main(["run", *tiny_overrides, "method=lorafair", "fair_lambda=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedlora: error: ") and "\n" not in err
    assert "'fair_lambda' must be a finite number >= 0" in err
