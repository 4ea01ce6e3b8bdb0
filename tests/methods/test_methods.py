"""Method invariants on synthetic factors: fixed points, exactness, state."""

import pytest
import torch

from fedlora.config import load_config
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import METHOD_NAMES, build_method

LAYERS = {"l0": (6, 5), "l1": (4, 7)}  # out, in
RANK = 3


def random_state(seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(RANK, i, generator=g, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    B = {k: torch.randn(o, RANK, generator=g, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    head = {"classifier.weight": torch.randn(2, 5, generator=g, dtype=torch.float64)}
    return AdapterState(A=A, B=B, head=head)


def reply(cid: int, state: AdapterState, trained: str, n: int = 10) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        A=dict(state.A) if "A" in trained else {},
        B=dict(state.B) if "B" in trained else {},
        head=dict(state.head),
    )


def aggregate(method, plan, state, updates, weights):
    return method.aggregate(
        plan=plan, state=state, updates=updates, weights=weights, scaling=dict.fromkeys(LAYERS, 2.0)
    )


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_identical_clients_are_a_fixed_point(name: str):
    method = build_method(name, load_config())
    start, trained = random_state(0), random_state(1)
    plan = method.plan(1)
    n = 1 if name == "centralized" else 3
    result = aggregate(method, plan, start, [reply(k, trained, plan.trained) for k in range(n)], [1.0] * n)
    for layer in LAYERS:
        expect_A = trained.A[layer] if plan.trains_A else start.A[layer]
        expect_B = trained.B[layer] if plan.trains_B else start.B[layer]
        torch.testing.assert_close(result.state.A[layer], expect_A)
        torch.testing.assert_close(result.state.B[layer], expect_B)
        assert result.agg_error[layer] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(result.state.head["classifier.weight"], trained.head["classifier.weight"])


def test_ffa_trains_only_b_and_keeps_a():
    method = build_method("ffa", load_config())
    start = random_state(0)
    for t in range(1, 4):
        plan = method.plan(t)
        assert plan.trained == "B"
        result = aggregate(method, plan, start, [reply(0, random_state(t), "B")], [1.0])
        for layer in LAYERS:
            assert torch.equal(result.state.A[layer], start.A[layer])


def test_rolora_alternates_and_changes_only_trained_factor():
    method = build_method("rolora", load_config())
    state = random_state(0)
    seen = []
    for t in range(1, 5):
        plan = method.plan(t)
        seen.append(plan.trained)
        updates = [reply(k, random_state(10 * t + k), plan.trained) for k in range(3)]
        result = aggregate(method, plan, state, updates, [1.0, 2.0, 3.0])
        frozen = "A" if plan.trained == "B" else "B"
        for layer in LAYERS:
            assert torch.equal(getattr(result.state, frozen)[layer], getattr(state, frozen)[layer])
            trained_factor = getattr(result.state, plan.trained)[layer]
            expected = sum(w * getattr(u, plan.trained)[layer] for w, u in zip([1, 2, 3], updates)) / 6
            torch.testing.assert_close(trained_factor, expected)
        state = result.state
    assert seen == ["B", "A", "B", "A"]


def test_rolora_phase_survives_state_dict():
    cfg = load_config()
    method = build_method("rolora", cfg)
    plan = method.plan(1)
    aggregate(method, plan, random_state(0), [reply(0, random_state(1), "B")], [1.0])
    restored = build_method("rolora", cfg)
    restored.load_state_dict(method.state_dict())
    assert restored.plan(2).trained == "A"


def test_fedavg_averages_factors_separately_and_reports_cross_term_error():
    method = build_method("fedavg", load_config())
    states = [random_state(s) for s in (1, 2)]
    plan = method.plan(1)
    result = aggregate(method, plan, random_state(0), [reply(k, s, "AB") for k, s in enumerate(states)], [1.0, 3.0])
    for layer in LAYERS:
        A = 0.25 * states[0].A[layer] + 0.75 * states[1].A[layer]
        B = 0.25 * states[0].B[layer] + 0.75 * states[1].B[layer]
        torch.testing.assert_close(result.state.A[layer], A)
        torch.testing.assert_close(result.state.B[layer], B)
        M = 0.25 * states[0].B[layer] @ states[0].A[layer] + 0.75 * states[1].B[layer] @ states[1].A[layer]
        expected = (torch.linalg.norm(M - B @ A) / torch.linalg.norm(M)).item()
        assert result.agg_error[layer] == pytest.approx(expected, rel=1e-9)
        assert expected > 0.01


def test_client_order_does_not_matter():
    for name in ("fedavg", "ffa", "rolora"):
        method_a, method_b = build_method(name, load_config()), build_method(name, load_config())
        start = random_state(0)
        plan = method_a.plan(1)
        ups = [reply(k, random_state(k + 1), plan.trained, n=5 + k) for k in range(3)]
        w = [u.num_examples for u in ups]
        r1 = aggregate(method_a, plan, start, ups, w)
        r2 = aggregate(method_b, method_b.plan(1), start, ups[::-1], w[::-1])
        for layer in LAYERS:
            torch.testing.assert_close(r1.state.B[layer] @ r1.state.A[layer], r2.state.B[layer] @ r2.state.A[layer])
