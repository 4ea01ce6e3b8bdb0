"""DoRA's magnitude vector under every method: averaged like the head where the round
trains it, unchanged where it does not, refused where the method folds into the base;
and a short real run (in-process) with ``adapter=dora``."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.log import silent
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import METHOD_NAMES, build_method, check_config
from fedlora.methods.base import update_error
from fedlora.outputs import read_metrics

LAYERS = {"l0": (6, 5), "l1": (4, 7)}  # out, in
RANK = 3
SCALING = 2.0


def config_for(name: str, *extra: str):
    more = list(extra)
    if name == "schedule":
        more.append("schedule=[{method: fra, rounds: 1}, {method: ffa}]")
    if name == "flora":
        more.append(f"alpha={SCALING * RANK}")
    return load_config(None, [f"rank={RANK}", f"method={name}", *more])


def carries(name: str) -> bool:
    return build_method(name, config_for(name)).carries_magnitude


DORA_METHODS = [n for n in METHOD_NAMES if carries(n)]
# the methods whose server averages the magnitude (FedSA-LoRA keeps it with each client:
# tests/methods/test_fedsa.py checks that it never leaves one)
AVERAGED = [n for n in DORA_METHODS if "magnitude" not in build_method(n, config_for(n)).private]
REFUSED = [n for n in METHOD_NAMES if not carries(n)]


def random_state(seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return AdapterState(
        A={k: torch.randn(RANK, i, generator=g, dtype=f64) for k, (o, i) in LAYERS.items()},
        B={k: torch.randn(o, RANK, generator=g, dtype=f64) for k, (o, i) in LAYERS.items()},
        head={"classifier.weight": torch.randn(2, 5, generator=g, dtype=f64)},
        magnitude={k: torch.rand(o, generator=g, dtype=f64) + 0.5 for k, (o, i) in LAYERS.items()},
    )


def reply(cid: int, state: AdapterState, plan, n: int = 10) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        A=dict(state.A) if plan.trains_A else {},
        B=dict(state.B) if plan.trains_B else {},
        head=dict(state.head),
        magnitude=dict(state.magnitude) if plan.trains_magnitude else {},
    )


def aggregate(method, plan, state, updates, weights):
    return method.aggregate(
        plan=plan,
        state=state,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
    )


def test_the_methods_that_fold_into_the_base_are_the_refused_ones():
    assert {"fedex", "flora"} <= set(REFUSED)
    assert {"fedavg", "ffa", "rolora", "fra", "centralized", "schedule"} <= set(DORA_METHODS)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_methods_give_one_line_naming_them(name):
    with pytest.raises(FedLoraError) as info:
        check_config(config_for(name, "adapter=dora"))
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"adapter=dora cannot run with method {name}:")


@pytest.mark.parametrize("name", AVERAGED)
def test_magnitude_is_the_weighted_mean_when_trained_else_unchanged(name):
    """Two rounds (RoLoRA's B round trains m, its A round does not), against a float64
    reference ``m = sum_k w_k m_k / sum_k w_k`` written out per element."""
    method = build_method(name, config_for(name, "adapter=dora"))
    state = random_state(0)
    for t in (1, 2):
        plan = method.plan(t)
        n = 1 if name == "centralized" else 3
        clients = [random_state(10 * t + k) for k in range(n)]
        weights = [1.0, 2.0, 4.0][:n]
        updates = [reply(k, c, plan) for k, c in enumerate(clients)]
        result = aggregate(method, plan, state, updates, weights)
        assert set(result.state.magnitude) == set(LAYERS), (
            f"method {name} declares carries_magnitude but its aggregate drops DoRA's magnitude: "
            "put magnitude=aggregate_magnitude(state, updates, weights) in its AdapterState, or "
            "set carries_magnitude = False"
        )
        for layer, (out, _) in LAYERS.items():
            got = result.state.magnitude[layer]
            if plan.trains_magnitude:
                ref = torch.tensor(
                    [
                        sum(
                            w * float(c.magnitude[layer][i])
                            for w, c in zip(weights, clients, strict=True)
                        )
                        / sum(weights)
                        for i in range(out)
                    ],
                    dtype=torch.float64,
                )
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(got, state.magnitude[layer])
        state = result.state
    assert name != "rolora" or [method.plan(3).trained] == ["B"]


def test_rolora_trains_the_magnitude_with_b_only():
    method = build_method("rolora", config_for("rolora", "adapter=dora"))
    plans = []
    for t in (1, 2, 3, 4):
        plan = method.plan(t)
        plans.append((plan.trained, plan.trains_magnitude))
        aggregate(method, plan, random_state(0), [reply(0, random_state(t), plan)], [1.0])
    assert plans == [("B", True), ("A", False), ("B", True), ("A", False)]


@pytest.mark.parametrize("name", AVERAGED)
def test_identical_clients_keep_their_magnitude_and_order_does_not_matter(name):
    method = build_method(name, config_for(name, "adapter=dora"))
    plan = method.plan(1)
    trained = random_state(1)
    n = 1 if name == "centralized" else 3
    same = aggregate(
        method, plan, random_state(0), [reply(k, trained, plan) for k in range(n)], [1.0] * n
    )
    for layer in LAYERS:
        torch.testing.assert_close(same.state.magnitude[layer], trained.magnitude[layer])
    if n == 1:
        return
    ups = [reply(k, random_state(k + 5), plan, n=3 + k) for k in range(3)]
    w = [float(u.num_examples) for u in ups]
    one = build_method(name, config_for(name, "adapter=dora"))
    other = build_method(name, config_for(name, "adapter=dora"))
    r1 = aggregate(one, one.plan(1), random_state(0), ups, w)
    r2 = aggregate(other, other.plan(1), random_state(0), ups[::-1], w[::-1])
    for layer in LAYERS:
        torch.testing.assert_close(r1.state.magnitude[layer], r2.state.magnitude[layer])


def merged(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """DoRA's weight, eq. 5 of Liu et al. (2024): ``m * V / ||V||_row``, ``V = W0 + s B A``."""
    V = W0 + SCALING * B @ A
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


def test_rolora_is_exact_in_the_direction_part_only():
    """What ``docs/configuration.md`` says "exact" means with DoRA: in a RoLoRA B round the
    aggregate's ``V = W0 + s B A`` is the mean of the clients' (and ``agg_error``, the factor
    error, is 0), but the merged weight ``m V / ||V||`` is not the mean of theirs."""
    method = build_method("rolora", config_for("rolora", "adapter=dora"))
    plan = method.plan(1)
    start = random_state(0)
    clients = [
        AdapterState(A=start.A, B=c.B, head=c.head, magnitude=c.magnitude)
        for c in (random_state(1), random_state(2))
    ]
    weights = [1.0, 3.0]
    updates = [reply(k, c, plan) for k, c in enumerate(clients)]
    result = aggregate(method, plan, start, updates, weights)
    errors = update_error(
        before=start,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
        result=result,
    )
    g = torch.Generator().manual_seed(9)
    for layer, (out, inp) in LAYERS.items():
        assert errors[layer] == pytest.approx(0.0, abs=1e-12)
        W0 = torch.randn(out, inp, generator=g, dtype=torch.float64)
        V = W0 + SCALING * result.state.B[layer] @ result.state.A[layer]
        V_mean = sum(
            w * (W0 + SCALING * c.B[layer] @ c.A[layer])
            for w, c in zip(weights, clients, strict=True)
        ) / sum(weights)
        torch.testing.assert_close(V, V_mean)
        got = merged(
            W0, result.state.A[layer], result.state.B[layer], result.state.magnitude[layer]
        )
        mean = sum(
            w * merged(W0, c.A[layer], c.B[layer], c.magnitude[layer])
            for w, c in zip(weights, clients, strict=True)
        ) / sum(weights)
        assert float((got - mean).norm() / mean.norm()) > 1e-3


# -- a real run ---------------------------------------------------------------------------


def run(tiny_overrides, tmp_path: Path, name: str, *extra: str) -> Path:
    cfg = load_config(
        None,
        [*tiny_overrides, "method=rolora", f"output_dir={tmp_path}", f"run_name={name}", *extra],
    )
    recipes.run(cfg, log=silent)
    return tmp_path / name


def test_inprocess_dora_run_trains_the_magnitude_and_counts_its_bytes(tiny_overrides, tmp_path):
    """RoLoRA with DoRA on the tiny BERT: the run finishes, the saved PEFT adapter holds a
    trained magnitude per layer, and the bytes differ from the same run with LoRA by exactly
    the magnitude vectors: uploaded in the B round only, downloaded every round."""
    dora = run(tiny_overrides, tmp_path, "dora", "adapter=dora")
    lora = run(tiny_overrides, tmp_path, "lora")
    saved = load_file(dora / "adapter" / "adapter_model.safetensors")
    mags = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    assert mags and not any(
        k.endswith("lora_magnitude_vector")
        for k in load_file(lora / "adapter" / "adapter_model.safetensors")
    )
    # m was trained: it left PEFT's init ||W0||_row (which the LoRA run's base still has)
    from fedlora.federation import build_federation

    fed = build_federation(load_config(None, [*tiny_overrides, "adapter=dora"]), log=silent)
    init = fed.initial_state.magnitude
    assert len(init) == len(mags)
    for layer, m in init.items():
        key = f"base_model.model.{layer}.lora_magnitude_vector"
        assert not torch.equal(saved[key], m)
    m_bytes = sum(m.numel() * m.element_size() for m in init.values())
    rows_d, rows_l = read_metrics(dora), read_metrics(lora)
    assert [r["trained"] for r in rows_d[1:]] == [r["trained"] for r in rows_l[1:]]
    assert rows_d[1]["trained"].startswith("B") and rows_d[2]["trained"].startswith("A")
    clients = 3  # every client trains every round (client_fraction=1)
    assert all(len(r["clients"]) == clients for r in rows_d[1:])
    assert rows_d[1]["upload_bytes"] - rows_l[1]["upload_bytes"] == clients * m_bytes
    assert rows_d[2]["upload_bytes"] == rows_l[2]["upload_bytes"]  # A round: m stays
    for rd, rl in zip(rows_d[1:], rows_l[1:], strict=True):
        assert rd["download_bytes"] - rl["download_bytes"] == clients * m_bytes
        assert 0.0 <= rd["accuracy"] <= 1.0
        assert rd["train_loss"] == rd["train_loss"]  # finite, not NaN
