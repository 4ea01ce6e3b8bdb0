"""Clients in lockstep (``client_parallel``): K clients trained in one forward and backward
pass per step give the updates each gets trained alone (``train_client``), to 1e-5 in
float32 on the tiny BERT without dropout; a run with ``client_parallel=3`` ends where the
one-by-one run does; what lockstep cannot honour is refused or trained one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.client import LocalTraining, train_client
from fedlora.client import lockstep as lockstep_module
from fedlora.client.lockstep import (
    clip_per_client,
    lockstep_refusal,
    train_clients_lockstep,
    train_in_lockstep,
)
from fedlora.config import load_config
from fedlora.data import Encoded
from fedlora.errors import FedLoraError
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, RoundPlan
from fedlora.methods import build_method
from fedlora.models.stacked import StackedAdapters, client_losses
from fedlora.outputs import RunDir
from fedlora.runtime import run_federated

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def fed(no_dropout_bert_dir, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, f"model={no_dropout_bert_dir}"])
    return build_federation(cfg, log=silent)


def start(fed, seed: int) -> AdapterState:
    """A client's start: the initial adapter with B (and the head) moved off zero, so both
    factors have gradients from the first step and every client starts elsewhere."""
    g = torch.Generator().manual_seed(seed)
    s = fed.initial_state

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t + 0.05 * torch.randn(t.shape, generator=g).to(t.device)

    return AdapterState(
        A={k: moved(v) for k, v in s.A.items()},
        B={k: moved(v) for k, v in s.B.items()},
        head={k: moved(v) for k, v in s.head.items()},
    )


def rows(data: Encoded, n: int) -> Encoded:
    """The first ``n`` examples of a split."""
    ttids = None if data.token_type_ids is None else data.token_type_ids[:n]
    return dataclasses.replace(
        data,
        input_ids=data.input_ids[:n],
        attention_mask=data.attention_mask[:n],
        labels=data.labels[:n],
        token_type_ids=ttids,
    )


def jobs_of(fed, datas=None):
    return [
        (cid, start(fed, 100 + cid), fed.encoded[cid].train if datas is None else datas[cid])
        for cid in sorted(fed.encoded)
    ]


def sequential(fed, jobs, plan, settings, seed=0):
    return [
        train_client(
            adapter=fed.adapter,
            state=state,
            data=data,
            plan=plan,
            settings=settings,
            client_id=cid,
            seed=seed,
        )
        for cid, state, data in jobs
    ]


def assert_same_updates(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.client_id == e.client_id and g.num_examples == e.num_examples
        assert g.steps == e.steps and g.scaling == e.scaling
        for kind in ("A", "B", "head", "magnitude", "sparse"):
            assert set(getattr(g, kind)) == set(getattr(e, kind)), kind
            for name, t in getattr(e, kind).items():
                torch.testing.assert_close(getattr(g, kind)[name], t, **TOL)
        assert g.train_loss == pytest.approx(e.train_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("trained", "optimizer"), [("AB", "adamw"), ("B", "adamw"), ("A", "adamw"), ("AB", "sgd")]
)
def test_lockstep_equals_each_client_trained_alone(fed, trained, optimizer):
    """AdamW, the default; SGD, whose step scales with the gradient (Adam's hardly does, so
    it would hide a client's loss weighted by anything but 1)."""
    plan = RoundPlan(round=2, trained=trained, train_head=True, method="t")
    lr = 0.5 if optimizer == "sgd" else 0.02
    settings = LocalTraining(
        local_steps=3, batch_size=8, lr=lr, optimizer=optimizer, weight_decay=0.01
    )
    jobs = jobs_of(fed)
    expected = sequential(fed, jobs, plan, settings)
    got = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
    )
    assert_same_updates(got, expected)
    for e, (_, s, _) in zip(expected, jobs, strict=True):  # the round moved what it trains
        moved = {k for k in ("A", "B") if k in trained}
        assert set(k for k in ("A", "B") if getattr(e, k)) == moved
        layer = next(iter(s.A))
        for k in moved:
            assert not torch.allclose(getattr(e, k)[layer], getattr(s, k)[layer], atol=1e-4)


def test_lockstep_follows_every_training_control(fed):
    """Gradient accumulation, per-client clipping (active), a warmed-up cosine schedule,
    weight decay, Adam, and a client smaller than a batch (unequal row segments)."""
    plan = RoundPlan(round=3, trained="AB", train_head=True, method="t")
    settings = LocalTraining(
        local_steps=3,
        batch_size=8,
        lr=0.05,
        optimizer="adam",
        weight_decay=0.1,
        grad_accum_steps=2,
        lr_scheduler="cosine",
        warmup_ratio=0.3,
        lr_schedule_scope="run",
        rounds=4,
        max_grad_norm=0.05,
    )
    datas = {cid: s.train for cid, s in fed.encoded.items()}
    datas[1] = rows(datas[1], 5)  # 5 rows per batch where the others have 8
    jobs = jobs_of(fed, datas)
    expected = sequential(fed, jobs, plan, settings)
    got = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
    )
    assert_same_updates(got, expected)


def test_lockstep_on_the_frozen_prefix_cache(no_dropout_bert_dir, tiny_overrides):
    cfg = load_config(
        None, [*tiny_overrides, f"model={no_dropout_bert_dir}", "layers=[1]", "prefix_cache=on"]
    )
    fed = build_federation(cfg, log=silent)
    assert all(s.train.prefix is not None for s in fed.encoded.values())
    plan = RoundPlan(round=1, trained="AB", train_head=True, method="t")
    settings = LocalTraining(local_steps=2, batch_size=8, lr=0.02)
    datas = {cid: s.train for cid, s in fed.encoded.items()}
    datas[2] = rows(datas[2], 6)
    datas[2] = fed.prefix.attach(datas[2])  # type: ignore[union-attr]
    jobs = jobs_of(fed, datas)
    expected = sequential(fed, jobs, plan, settings)
    got = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
    )
    assert_same_updates(got, expected)


def test_identical_clients_and_client_order(fed):
    """Three copies of one client give three copies of its own update; the updates of a
    group do not depend on the order its clients come in."""
    plan = RoundPlan(round=1, trained="AB", train_head=True, method="t")
    settings = LocalTraining(local_steps=2, batch_size=8, lr=0.02)
    job = jobs_of(fed)[0]
    alone = sequential(fed, [job], plan, settings)
    same = train_clients_lockstep(
        adapter=fed.adapter, jobs=[job, job, job], plan=plan, settings=settings, seed=0
    )
    assert_same_updates(same, alone * 3)
    jobs = jobs_of(fed)
    forward = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
    )
    backward = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs[::-1], plan=plan, settings=settings, seed=0
    )
    assert_same_updates(backward[::-1], forward)


def test_stacked_forward_is_each_clients_dense_layer(fed):
    """Float64 reference: a LoRA layer under ``applied`` computes W0 x + b0 + s B_k A_k x on
    client k's rows (eq. 3 of the LoRA paper, dense), for equal and unequal segments; the
    logits equal each client's own forward pass."""
    adapter = fed.adapter
    states = [start(fed, 7 + k) for k in range(3)]
    adapter.set_state(states[0])
    stack = StackedAdapters(adapter, states, trained="AB", train_head=True)
    layer = next(iter(adapter.lora_layers))
    module = adapter.lora_layers[layer]
    W0 = module.base_layer.weight.detach().double()
    b0 = module.base_layer.bias.detach().double()
    s = adapter.scaling()[layer]
    for sizes in ([2, 2, 2], [1, 3, 2]):
        x = torch.randn(sum(sizes), 5, W0.shape[1], device=W0.device)
        with torch.no_grad(), stack.applied(sizes):
            y = module(x).double()
        x64, at = x.double(), 0
        for k, n in enumerate(sizes):
            A, B = states[k].A[layer].double(), states[k].B[layer].double()
            dense = x64[at : at + n] @ (W0 + s * B @ A).T + b0
            torch.testing.assert_close(y[at : at + n], dense, rtol=1e-5, atol=1e-5)
            at += n
    data = fed.encoded[0].train
    idx = [torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, 9)]
    parts = [data.batch(i) for i in idx]
    device = W0.device  # bench/gpu_check.sh runs the tests on a GPU
    parts = [{k: v.to(device) for k, v in p.items()} for p in parts]
    inputs = lockstep_module._concat(parts)
    with torch.no_grad(), stack.applied([len(i) for i in idx]):
        logits = adapter.model(**inputs).logits
        losses = client_losses(adapter.model, logits, [p["labels"] for p in parts])
    at = 0
    for k, p in enumerate(parts):
        adapter.set_state(states[k])
        with torch.no_grad():
            own = adapter.model(**p)
        torch.testing.assert_close(logits[at : at + len(idx[k])], own.logits, **TOL)
        torch.testing.assert_close(losses[k], own.loss, **TOL)
        at += len(idx[k])


def test_clipping_per_client_is_torchs_clip_on_each_slice():
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(3, 4, 2, requires_grad=True), torch.zeros(3, 5, requires_grad=True)]
    for p, scale in zip(params, (1.0, 0.01), strict=True):
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=torch.float64).float()
    params[0].grad[2] *= 1e-4  # client 2's norm is under the bound: left as it is
    expected = []
    for k in range(3):
        own = [torch.nn.Parameter(p.detach()[k].clone()) for p in params]
        for o, p in zip(own, params, strict=True):
            o.grad = p.grad[k].clone()
        torch.nn.utils.clip_grad_norm_(own, 0.5)
        expected.append([o.grad for o in own])
    before = params[0].grad[2].clone()
    clip_per_client(params, 0.5)
    for k in range(3):
        for p, e in zip(params, expected[k], strict=True):
            torch.testing.assert_close(p.grad[k], e, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(params[0].grad[2], before)


# -- grouping and what trains one by one -------------------------------------------------


def spy_groups(monkeypatch):
    groups: list[list[int]] = []
    real = lockstep_module.train_clients_lockstep

    def spy(**kwargs):
        groups.append([cid for cid, _, _ in kwargs["jobs"]])
        return real(**kwargs)

    monkeypatch.setattr(lockstep_module, "train_clients_lockstep", spy)
    return groups


def test_groups_have_one_step_count_and_one_rank(fed, monkeypatch):
    """local_epochs gives clients of 5 and 20 examples different step counts, a rank-2
    client cannot share stacked factors with rank-4 ones: each trains in its own group,
    and every update equals the one-by-one one."""
    groups = spy_groups(monkeypatch)
    plan = RoundPlan(round=1, trained="AB", train_head=True, method="t")
    settings = LocalTraining(local_steps=1, batch_size=8, lr=0.02, local_epochs=1.0)
    train = fed.encoded[0].train
    rank2 = AdapterState(
        A={k: 0.1 * torch.randn(2, v.shape[1]) for k, v in fed.initial_state.A.items()},
        B={k: 0.1 * torch.randn(v.shape[0], 2) for k, v in fed.initial_state.B.items()},
        head=dict(fed.initial_state.head),
    )
    jobs = [
        (0, start(fed, 1), rows(train, 16)),  # 2 steps
        (1, start(fed, 2), rows(train, 5)),  # 1 step
        (2, start(fed, 3), rows(train, 14)),  # 2 steps
        (3, rank2, rows(train, 16)),  # 2 steps, rank 2
        (4, start(fed, 4), rows(train, 15)),  # 2 steps
        (5, rank2, rows(train, 12)),  # 2 steps, rank 2
    ]
    got = train_in_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0, group_size=2
    )
    assert groups == [[0, 2], [3, 5]]  # then client 4 alone (a group of one), client 1 alone
    assert_same_updates(got, sequential(fed, jobs, plan, settings))
    assert got[3].A[next(iter(got[3].A))].shape[0] == 2


def test_rounds_lockstep_cannot_stack_train_one_by_one(fed, monkeypatch):
    groups = spy_groups(monkeypatch)
    sparse = RoundPlan(round=1, trained="W", train_head=True, method="slora", mask_density=0.1)
    settings = LocalTraining(local_steps=1, batch_size=8, lr=0.02)
    assert "SLoRA" in str(lockstep_refusal(fed.adapter, sparse, settings))
    fp16 = dataclasses.replace(settings, precision="fp16")
    plan = RoundPlan(round=1, trained="AB", train_head=True, method="t")
    assert "scaler" in str(lockstep_refusal(fed.adapter, plan, fp16))
    assert lockstep_refusal(fed.adapter, plan, settings) is None
    jobs = jobs_of(fed)
    got = train_in_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=sparse, settings=settings, seed=0, group_size=3
    )
    assert groups == [] and all(u.sparse for u in got)
    assert_same_updates(got, sequential(fed, jobs, sparse, settings))
    with pytest.raises(ValueError, match="SLoRA"):
        train_clients_lockstep(
            adapter=fed.adapter, jobs=jobs, plan=sparse, settings=settings, seed=0
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("client_parallel=0", "config key 'client_parallel' must be >= 1, got 0"),
        (
            "runtime=flower-sim",
            "config key 'client_parallel' > 1 is not supported with runtime=flower-sim "
            "(a ClientApp trains one client)",
        ),
        (
            "dp.noise_multiplier=1",
            "config key 'client_parallel' > 1 is not supported with dp.* (DP-SGD clips and "
            "noises each client's per-example gradients)",
        ),
        (
            "precision=fp16",
            "config key 'client_parallel' > 1 is not supported with precision=fp16 (one loss "
            "scaler would skip every client's step)",
        ),
        (
            "adapter=dora",
            "config key 'client_parallel' > 1 is not supported with adapter=dora (DoRA's norm "
            "is per client)",
        ),
    ],
)
def test_what_lockstep_cannot_honour_is_refused_in_one_line(override, message):
    overrides = (
        [override] if override.startswith("client_parallel") else ["client_parallel=2", override]
    )
    with pytest.raises(FedLoraError) as info:
        load_config(None, overrides)
    assert str(info.value) == message
    assert load_config(None, ["client_parallel=4"]).client_parallel == 4
    assert load_config(None, []).client_parallel == 1


# -- whole runs --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fedavg", "rolora"])
def test_a_run_in_lockstep_ends_where_the_one_by_one_run_does(
    no_dropout_bert_dir, tiny_overrides, tmp_path, method, monkeypatch
):
    overrides = [*tiny_overrides, f"model={no_dropout_bert_dir}", f"method={method}"]
    one = build_federation(load_config(None, overrides), log=silent)
    three = build_federation(load_config(None, [*overrides, "client_parallel=3"]), log=silent)
    a = run_federated(one, build_method(method, one.cfg), RunDir(tmp_path / "one"), log=silent)
    groups = spy_groups(monkeypatch)
    b = run_federated(
        three, build_method(method, three.cfg), RunDir(tmp_path / "three"), log=silent
    )
    assert groups == [[0, 1, 2]] * three.cfg.rounds  # every round's clients in one group
    for kind in ("A", "B", "head"):
        for name, t in getattr(a["state"], kind).items():
            torch.testing.assert_close(getattr(b["state"], kind)[name], t, **TOL)
    for ra, rb in zip(a["rows"][1:], b["rows"][1:], strict=True):
        assert ra["local_steps"] == rb["local_steps"]
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-9)
