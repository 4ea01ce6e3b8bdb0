"""SLoRA (fedlora.methods.slora, fedlora.client.sparse): the plan, stage 1's masked FedAvg
folded into the frozen weights, the switch to LoRA from the SVD of the accumulated sparse
update, bytes, state, and the sparse client trainer on a tiny BERT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedlora import recipes
from fedlora.aggregation.fra import init_row_norm
from fedlora.aggregation.sparse import layer_seed, mask_size, sparse_mask
from fedlora.client import LocalTraining, train_client
from fedlora.client import sparse as client_sparse
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import build_method, check_config
from fedlora.methods.base import update_error
from fedlora.outputs import read_metrics

LAYERS = {"l0": (6, 5), "l1": (4, 7)}  # out, in
RANK = 3
SCALING = 2.0
DENSITY = 0.4


def method(slora_rounds: int = 2, seed: int = 5):
    cfg = load_config(
        None,
        [
            f"rank={RANK}",
            "method=slora",
            f"slora_rounds={slora_rounds}",
            f"slora_density={DENSITY}",
            f"seed={seed}",
        ],
    )
    return build_method("slora", cfg)


def init_state() -> AdapterState:
    """PEFT's start: A random, B zero (LoRA contributes nothing in stage 1)."""
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(RANK, i, generator=g) for k, (o, i) in LAYERS.items()}
    B = {k: torch.zeros(o, RANK) for k, (o, i) in LAYERS.items()}
    head = {"classifier.weight": torch.randn(2, 5, generator=g)}
    return AdapterState(A=A, B=B, head=head)


def mask(layer: str, seed: int = 5) -> np.ndarray:
    return sparse_mask(shape=LAYERS[layer], density=DENSITY, seed=layer_seed(seed, layer)).numpy()


def reply(cid: int, gen_seed: int, n: int = 10, seed: int = 5) -> ClientUpdate:
    g = torch.Generator().manual_seed(gen_seed)
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        head={"classifier.weight": torch.randn(2, 5, generator=g)},
        sparse={k: torch.randn(len(mask(k, seed)), generator=g) for k in LAYERS},
    )


def aggregate(m, round_, state, updates, weights):
    return m.aggregate(
        plan=m.plan(round_),
        state=state,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
    )


def dense(layer: str, values: np.ndarray) -> np.ndarray:
    out = np.zeros(LAYERS[layer][0] * LAYERS[layer][1])
    out[mask(layer)] = values
    return out.reshape(LAYERS[layer])


def test_plan_is_sparse_for_slora_rounds_then_lora():
    m = method(slora_rounds=2)
    plans = [m.plan(t) for t in (1, 2, 3, 4)]
    assert [p.trained for p in plans] == ["W", "W", "AB", "AB"]
    assert plans[0].mask_density == DENSITY and plans[0].mask_seed == 5
    assert not plans[0].trains_A and not plans[0].trains_B


def test_stage1_folds_the_masked_weighted_mean_and_leaves_the_factors():
    m, start = method(), init_state()
    updates = [reply(k, 10 + k, n=k + 1) for k in range(3)]
    weights = [1.0, 2.0, 3.0]
    result = aggregate(m, 1, start, updates, weights)
    for layer in LAYERS:
        expected = sum(
            w * dense(layer, u.sparse[layer].double().numpy())
            for w, u in zip(weights, updates, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(result.base_delta[layer].numpy(), expected, atol=1e-6)
        assert torch.equal(result.state.A[layer], start.A[layer])
        assert torch.equal(result.state.B[layer], start.B[layer])
    head = sum(w * u.head["classifier.weight"] for w, u in zip(weights, updates, strict=True)) / 6
    torch.testing.assert_close(result.state.head["classifier.weight"], head)
    # only the averaged values are owed to the next download: the mask is seeded
    assert result.delta_bytes == 4 * sum(len(mask(k)) for k in LAYERS)
    # agg_error is defined on factor proposals: not reported for sparse ones
    weights_ = [1.0] * 3
    assert (
        update_error(
            before=start,
            updates=updates,
            weights=weights_,
            scaling=dict.fromkeys(LAYERS, SCALING),
            result=result,
        )
        == {}
    )


def test_identical_clients_are_a_fixed_point_of_stage1():
    m, start = method(), init_state()
    same = reply(0, 3)
    updates = [
        ClientUpdate(client_id=k, num_examples=10, head=same.head, sparse=same.sparse)
        for k in range(3)
    ]
    result = aggregate(m, 1, start, updates, [1.0, 1.0, 1.0])
    for layer in LAYERS:
        np.testing.assert_allclose(
            result.base_delta[layer].numpy(), dense(layer, same.sparse[layer].numpy()), atol=1e-7
        )
    torch.testing.assert_close(
        result.state.head["classifier.weight"], same.head["classifier.weight"]
    )


def run_stage1(m, start, rounds, order=(0, 1, 2)):
    """Rounds 1..rounds of stage 1 with fixed replies; returns the results."""
    results = []
    for t in range(1, rounds + 1):
        updates = [reply(k, 100 * t + k, n=k + 2) for k in order]
        weights = [float(k + 2) for k in order]
        results.append(aggregate(m, t, start, updates, weights))
    return results


def test_the_switch_starts_lora_from_the_svd_of_the_accumulated_update():
    """After T1 rounds: s B A is the best rank-r approximation of Delta W = sum_t Delta_t
    (float64 reference), and what was folded into the base sums to zero (W0 is back)."""
    m, start = method(slora_rounds=3), init_state()
    results = run_stage1(m, start, 3)
    switch = results[-1]
    assert switch.delta_bytes == 0
    for layer in LAYERS:
        total = np.zeros(LAYERS[layer])
        for t in range(1, 4):
            updates = [reply(k, 100 * t + k, n=k + 2) for k in range(3)]
            w = np.array([2.0, 3.0, 4.0])
            v = sum(wk * u.sparse[layer].double().numpy() for wk, u in zip(w, updates, strict=True))
            total += dense(layer, v / w.sum())
        u, sigma, vh = np.linalg.svd(total, full_matrices=False)
        best = (u[:, :RANK] * sigma[:RANK]) @ vh[:RANK]
        A, B = switch.state.A[layer], switch.state.B[layer]
        np.testing.assert_allclose((SCALING * B.double() @ A.double()).numpy(), best, atol=1e-5)
        np.testing.assert_allclose(
            (A @ A.T).double().numpy(), init_row_norm() ** 2 * np.eye(RANK), atol=1e-6
        )
        share = (sigma[RANK:] ** 2).sum() / (sigma**2).sum()
        assert switch.diagnostics["slora_discarded_energy"][layer] == pytest.approx(share, rel=1e-5)
        folded = sum(r.base_delta[layer] for r in results if layer in r.base_delta)
        assert float(folded.abs().max()) == 0.0  # exactly: the undo is the same float sum
    assert m.plan(4).trained == "AB"
    assert m.accumulated == {}  # nothing kept after the switch


def test_client_order_does_not_matter():
    a = run_stage1(method(), init_state(), 2, order=(0, 1, 2))
    b = run_stage1(method(), init_state(), 2, order=(2, 0, 1))
    for ra, rb in zip(a, b, strict=True):
        for layer in LAYERS:
            torch.testing.assert_close(ra.state.A[layer], rb.state.A[layer], atol=1e-6, rtol=0)
            torch.testing.assert_close(ra.state.B[layer], rb.state.B[layer], atol=1e-6, rtol=0)
            if layer in ra.base_delta:
                torch.testing.assert_close(ra.base_delta[layer], rb.base_delta[layer])


def test_state_survives_a_checkpoint_mid_stage1():
    """The accumulated update goes through JSON exactly; a resumed method switches to the
    same factors as one left alone."""
    start = init_state()
    left_alone = run_stage1(method(slora_rounds=3), start, 3)[-1]
    first = method(slora_rounds=3)
    run_stage1(first, start, 2)
    resumed = method(slora_rounds=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for layer in LAYERS:
        assert torch.equal(resumed.accumulated[layer], first.accumulated[layer])
    updates = [reply(k, 300 + k, n=k + 2) for k in range(3)]
    switched = aggregate(resumed, 3, start, updates, [2.0, 3.0, 4.0])
    for layer in LAYERS:
        assert torch.equal(switched.state.A[layer], left_alone.state.A[layer])
        assert torch.equal(switched.state.B[layer], left_alone.state.B[layer])
        assert torch.equal(switched.base_delta[layer], left_alone.base_delta[layer])


def test_stage2_is_fedavg_of_the_factors():
    m, start = method(slora_rounds=1), init_state()
    g = torch.Generator().manual_seed(9)
    updates = [
        ClientUpdate(
            client_id=k,
            num_examples=5,
            A={n: torch.randn(RANK, i, generator=g) for n, (o, i) in LAYERS.items()},
            B={n: torch.randn(o, RANK, generator=g) for n, (o, i) in LAYERS.items()},
            head=dict(start.head),
        )
        for k in range(2)
    ]
    result = aggregate(m, 2, start, updates, [1.0, 3.0])
    for layer in LAYERS:
        torch.testing.assert_close(
            result.state.A[layer], (updates[0].A[layer] + 3 * updates[1].A[layer]) / 4
        )
        torch.testing.assert_close(
            result.state.B[layer], (updates[0].B[layer] + 3 * updates[1].B[layer]) / 4
        )
    assert not result.base_delta


def test_reply_bytes_count_the_sparse_values():
    u = reply(0, 1)
    head_bytes = 2 * 5 * 4
    assert u.nbytes() == head_bytes + 4 * sum(len(mask(k)) for k in LAYERS)


# -- the sparse client trainer on a tiny BERT ----------------------------------------------


@pytest.fixture
def federation(tiny_overrides):
    cfg = load_config(
        None, [*tiny_overrides, "method=slora", "rounds=3", "slora_density=0.05", "lr=0.05"]
    )
    return cfg, build_federation(cfg, log=silent)


def test_clients_train_only_the_servers_mask_and_give_the_frozen_weights_back(
    federation, monkeypatch
):
    """Each client's trained weight is W0 + P_Omega(v) on the mask the server draws (the
    same for every client, of the configured density); after the round the model holds
    W0 again, and the LoRA factors never moved."""
    cfg, fed = federation
    m = build_method("slora", cfg)
    state = fed.reset()
    w0 = {layer: fed.adapter.base_weight(layer).detach().clone() for layer in state.A}
    trained: dict[str, torch.Tensor] = {}
    restore = client_sparse._MaskedWeight.restore

    def snapshot(self):  # the trained weight, just before the client puts W0 back
        name = next(n for n in state.A if fed.adapter.base_weight(n) is self.weight)
        trained[name] = self.weight.detach().clone()
        restore(self)

    monkeypatch.setattr(client_sparse._MaskedWeight, "restore", snapshot)
    plan = m.plan(1)
    settings = LocalTraining.from_config(cfg)
    for cid in (0, 1):
        update = train_client(
            adapter=fed.adapter,
            state=state,
            data=fed.encoded[cid].train,
            plan=plan,
            settings=settings,
            client_id=cid,
            seed=cfg.seed,
        )
        assert not update.A and not update.B and update.head
        for layer in state.A:
            out_f, in_f = w0[layer].shape
            idx = m.mask(layer, (out_f, in_f))
            assert update.sparse[layer].numel() == mask_size(out_f * in_f, 0.05) == idx.numel()
            assert float(update.sparse[layer].abs().max()) > 0  # it trained
            expected = w0[layer].clone().reshape(-1)
            expected[idx] += update.sparse[layer]
            torch.testing.assert_close(trained[layer], expected.reshape(out_f, in_f))
            changed = (trained[layer] != w0[layer]).reshape(-1).nonzero().squeeze(1)
            assert set(changed.tolist()) <= set(idx.tolist())
            assert torch.equal(fed.adapter.base_weight(layer), w0[layer])  # W0 is back
        after = fed.adapter.get_state()
        for layer in state.A:
            assert torch.equal(after.A[layer], state.A[layer])
            assert torch.equal(after.B[layer], state.B[layer])


def test_a_run_switches_to_lora_from_the_svd_init(tiny_overrides, tmp_path):
    """rounds=3, slora_rounds=2: two sparse rounds (values-only uploads), the switch, one
    LoRA round; the frozen weights end where they started (base_delta all zeros)."""
    cfg = load_config(
        None,
        [*tiny_overrides, "method=slora", "rounds=3", "slora_rounds=2", "slora_density=0.05"],
    )
    recipes.run(cfg, log=silent)
    run = tmp_path / "runs" / "t"
    rows = read_metrics(run)
    assert [r["trained"] for r in rows[1:]] == ["W+head", "W+head", "AB+head"]
    fed = build_federation(cfg, log=silent)
    state = fed.reset()
    values = sum(mask_size(fed.adapter.base_weight(n).numel(), 0.05) for n in state.A)
    head = sum(t.numel() for t in state.head.values())
    clients = len(rows[1]["clients"])
    assert rows[1]["upload_bytes"] == clients * 4 * (values + head)
    assert rows[2]["download_bytes"] == clients * (state.nbytes() + 4 * values)
    assert rows[3]["download_bytes"] == clients * state.nbytes()  # the switch sends factors
    assert "agg_error" not in rows[1] and "agg_error" not in rows[2] and "agg_error" in rows[3]
    assert set(rows[2]["slora_discarded_energy"]["layers"]) == set(state.A)
    for delta in load_file(run / "adapter" / "base_delta.safetensors").values():
        assert float(delta.abs().max()) == 0.0
    assert rows[-1]["accuracy"] is not None


def test_the_flower_codec_carries_the_sparse_values_and_the_mask_plan():
    from fedlora.runtime.flower import codec

    u = reply(3, 1)
    back = codec.content_to_update(codec.update_to_content(u))
    assert back.sparse.keys() == u.sparse.keys()
    for layer in LAYERS:
        assert torch.equal(back.sparse[layer], u.sparse[layer])
    assert back.nbytes() == u.nbytes()
    plan = method().plan(1)
    ins = codec.Instruction(config="", label_names=[], state=init_state(), base_delta={}, plan=plan)
    assert codec.content_to_instruction(codec.instruction_to_content(ins)).plan == plan
    no_sparse = ClientUpdate(client_id=0, num_examples=1, head=u.head)
    assert codec.content_to_update(codec.update_to_content(no_sparse)).sparse == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["slora_density=0"], "config key 'slora_density' must be in (0, 1], got 0.0"),
        (["slora_density=1.01"], "config key 'slora_density' must be in (0, 1], got 1.01"),
        (["slora_rounds=0"], "config key 'slora_rounds' must be >= 1, got 0"),
        (["rounds=2", "slora_rounds=2"], "SLoRA's LoRA stage needs at least one round"),
        (["quantization=int8"], "method slora folds increments into the frozen weights"),
        (["dp.noise_multiplier=1.0"], "method slora is not supported with dp.*"),
    ],
)
def test_bad_slora_config_is_one_line(overrides, message):
    from fedlora.errors import FedLoraError

    with pytest.raises(FedLoraError) as info:
        check_config(load_config(None, ["method=slora", *overrides]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_stage1_with_the_frozen_prefix_cache_equals_it_without(
    tiny_overrides, no_dropout_bert_dir, tmp_path, monkeypatch
):
    """LoRA (and so SLoRA's sparse stage) in block 1 only: block 0's outputs are cached,
    the sparse trainer runs on them, and without dropout the run is the uncached run."""
    fed_from_cache = []
    original_feed = client_sparse.feed

    def feed(model, data, rows):
        fed_from_cache.append(data.prefix is not None)
        return original_feed(model, data, rows)

    monkeypatch.setattr(client_sparse, "feed", feed)
    adapters = {}
    for mode in ("on", "off"):
        fed_from_cache.clear()
        cfg = load_config(
            None,
            [
                *tiny_overrides,
                f"model={no_dropout_bert_dir}",
                "layers=[1]",
                f"prefix_cache={mode}",
                "method=slora",
                "slora_rounds=1",
                "slora_density=0.1",
                f"output_dir={tmp_path / mode}",
            ],
        )
        recipes.run(cfg, log=silent)
        assert fed_from_cache and all(fed_from_cache) == (mode == "on")
        adapters[mode] = load_file(tmp_path / mode / "t" / "adapter" / "adapter_model.safetensors")
    assert adapters["on"].keys() == adapters["off"].keys()
    for key, value in adapters["off"].items():
        torch.testing.assert_close(adapters["on"][key], value, atol=1e-5, rtol=0)
