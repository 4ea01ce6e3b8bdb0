"""Method invariants on synthetic factors: fixed points, exactness, state."""

import pytest
import torch

from fedlora.config import load_config
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import METHOD_NAMES, build_method
from fedlora.methods.base import update_error

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


SCALING = 2.0


def agg_error(result, start, updates, weights):
    return update_error(
        before=start,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
        result=result,
    )


def effective(result, layer):
    """The increment a client's weight carries after aggregation: s B A + folded delta."""
    inc = SCALING * result.state.B[layer] @ result.state.A[layer]
    if layer in result.base_delta:
        inc = inc + result.base_delta[layer]
    return inc


def config_for(name: str):
    extra = []
    if name == "schedule":
        extra = ["schedule=[{method: fra, rounds: 1}, {method: ffa}]"]
    if name == "flora":
        extra = [f"alpha={SCALING * RANK}"]  # flora applies alpha / r_k itself
    if name == "hetlora":
        extra = ["hetlora_gamma=1"]  # no self-pruning: the aggregation's own fixed point
    return load_config(None, [f"rank={RANK}", *extra])


# Methods whose clients keep private parts have no global model: their fixed point is each
# client's own model (tests/methods/test_fedsa.py).
GLOBAL_MODEL_METHODS = [n for n in METHOD_NAMES if not build_method(n, config_for(n)).private]


@pytest.mark.parametrize("name", GLOBAL_MODEL_METHODS)
def test_identical_clients_are_a_fixed_point(name: str):
    method = build_method(name, config_for(name))
    start, trained = random_state(0), random_state(1)
    plan = method.plan(1)
    n = 1 if name == "centralized" else 3
    updates = [reply(k, trained, plan.trained) for k in range(n)]
    result = aggregate(method, plan, start, updates, [1.0] * n)
    errors = agg_error(result, start, updates, [1.0] * n)
    for layer in LAYERS:
        expect_A = trained.A[layer] if plan.trains_A else start.A[layer]
        expect_B = trained.B[layer] if plan.trains_B else start.B[layer]
        torch.testing.assert_close(effective(result, layer), SCALING * expect_B @ expect_A)
        if name not in ("flora", "fra", "flexlora", "schedule"):  # re-factorise or restart
            torch.testing.assert_close(result.state.A[layer], expect_A)
            torch.testing.assert_close(result.state.B[layer], expect_B)
        assert errors[layer] == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(
        result.state.head["classifier.weight"], trained.head["classifier.weight"]
    )


@pytest.mark.parametrize("name", ["fra", "fedex", "flora"])
def test_exact_and_full_rank_methods_reproduce_the_mean_update(name: str):
    method = build_method(name, config_for(name))
    updates = [reply(k, random_state(k + 1), "AB", n=k + 1) for k in range(3)]
    weights = [1.0, 2.0, 3.0]
    result = aggregate(method, method.plan(1), random_state(0), updates, weights)
    errors = agg_error(result, random_state(0), updates, weights)
    for layer in LAYERS:
        M = (
            sum(
                w * SCALING * u.B[layer] @ u.A[layer] for w, u in zip(weights, updates, strict=True)
            )
            / 6
        )
        if name == "fra":  # best rank-r approximation; its own diagnostic: discarded energy
            U, S, Vh = torch.linalg.svd(M)
            best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
            torch.testing.assert_close(effective(result, layer), best)
            share = float((S[RANK:] ** 2).sum() / (S**2).sum())
            assert result.diagnostics["fra_discarded_energy"][layer] == pytest.approx(
                share, rel=1e-9
            )
            # agg_error is every method's unit: the relative Frobenius error, sqrt(share)
            assert errors[layer] == pytest.approx(
                float(torch.linalg.norm(M - best) / torch.linalg.norm(M)), rel=1e-9
            )
            assert errors[layer] == pytest.approx(share**0.5, rel=1e-9)
        else:
            torch.testing.assert_close(effective(result, layer), M)
            assert errors[layer] == pytest.approx(0.0, abs=1e-12)


def test_schedule_switches_phase_and_keeps_it_in_state():
    cfg = load_config(
        None, ["method=schedule", "schedule=[{method: fra, rounds: 2}, {method: rolora}]"]
    )
    method = build_method("schedule", cfg)
    state = random_state(0)
    trained = []
    for t in range(1, 5):
        plan = method.plan(t)
        trained.append((plan.method, plan.trained))
        result = aggregate(method, plan, state, [reply(0, random_state(t), plan.trained)], [1.0])
        state = result.state
        if t == 2:
            saved = method.state_dict()
    assert trained == [("fra", "AB"), ("fra", "AB"), ("rolora", "B"), ("rolora", "A")]
    resumed = build_method("schedule", cfg)
    resumed.load_state_dict(saved)
    assert (resumed.plan(3).method, resumed.plan(3).trained) == ("rolora", "B")


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
            expected = (
                sum(
                    w * getattr(u, plan.trained)[layer]
                    for w, u in zip([1, 2, 3], updates, strict=True)
                )
                / 6
            )
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
    updates = [reply(k, s, "AB") for k, s in enumerate(states)]
    result = aggregate(method, plan, random_state(0), updates, [1.0, 3.0])
    errors = agg_error(result, random_state(0), updates, [1.0, 3.0])
    for layer in LAYERS:
        A = 0.25 * states[0].A[layer] + 0.75 * states[1].A[layer]
        B = 0.25 * states[0].B[layer] + 0.75 * states[1].B[layer]
        torch.testing.assert_close(result.state.A[layer], A)
        torch.testing.assert_close(result.state.B[layer], B)
        M = (
            0.25 * states[0].B[layer] @ states[0].A[layer]
            + 0.75 * states[1].B[layer] @ states[1].A[layer]
        )
        expected = (torch.linalg.norm(M - B @ A) / torch.linalg.norm(M)).item()
        assert errors[layer] == pytest.approx(expected, rel=1e-9)
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
            torch.testing.assert_close(
                r1.state.B[layer] @ r1.state.A[layer], r2.state.B[layer] @ r2.state.A[layer]
            )


def test_hybrid_hands_ffa_an_a_at_its_initial_scale():
    """FRA-LoRA's last round before FFA-LoRA puts all of sigma into B: the A that FFA-LoRA
    freezes has orthogonal rows of PEFT's initial row norm 1/sqrt(3), and s B A is still the
    best rank-r approximation; the earlier FRA rounds keep the balanced split."""
    cfg = load_config(
        None,
        [f"rank={RANK}", "method=schedule", "schedule=[{method: fra, rounds: 2}, {method: ffa}]"],
    )
    method = build_method("schedule", cfg)
    state = random_state(0)
    for t in (1, 2, 3):
        plan = method.plan(t)
        updates = [reply(k, random_state(10 * t + k), plan.trained) for k in range(3)]
        result = aggregate(method, plan, state, updates, [1.0, 1.0, 1.0])
        for layer in LAYERS:
            gram = result.state.A[layer] @ result.state.A[layer].T
            if t == 2:
                torch.testing.assert_close(gram, torch.eye(RANK, dtype=torch.float64) / 3)
                M = sum(SCALING * u.B[layer] @ u.A[layer] for u in updates) / 3
                U, S, Vh = torch.linalg.svd(M)
                torch.testing.assert_close(
                    effective(result, layer), (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
                )
            elif t == 1:
                BtB = result.state.B[layer].T @ result.state.B[layer]
                torch.testing.assert_close(gram, BtB)  # balanced
            else:  # FFA-LoRA keeps the handed-over A
                torch.testing.assert_close(gram, torch.eye(RANK, dtype=torch.float64) / 3)
        state = result.state
