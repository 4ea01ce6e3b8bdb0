"""Client training controls: local epochs, gradient accumulation, learning-rate schedules
(transformers' functions, checked against their formulas) and gradient clipping."""

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedlora.client import LocalTraining, train_client
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import RoundPlan


@pytest.fixture
def fed(no_dropout_bert_dir, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, f"model={no_dropout_bert_dir}"])
    return build_federation(cfg, log=silent)


PLAN = RoundPlan(round=1, trained="B", train_head=True, method="ffa")


def train(fed, settings, plan=PLAN, data=None):
    data = fed.encoded[0].train if data is None else data
    return train_client(
        adapter=fed.adapter,
        state=fed.initial_state,
        data=data,
        plan=plan,
        settings=settings,
        client_id=0,
        seed=0,
    )


def test_local_epochs_win_over_local_steps_and_count_each_clients_steps():
    settings = LocalTraining(local_steps=3, batch_size=8, lr=0.01, local_epochs=2.0)
    assert settings.steps_for(45) == math.ceil(2.0 * 45 / 8) == 12
    assert settings.steps_for(5) == 2  # a batch never exceeds the client's data
    assert LocalTraining(local_steps=3, batch_size=8, lr=0.01).steps_for(45) == 3


def test_local_epochs_in_a_run_are_recorded_per_client(tiny_overrides):
    from fedlora import recipes

    cfg = load_config(None, [*tiny_overrides, "partition=dirichlet", "local_epochs=1", "rounds=1"])
    summary = recipes.run(cfg, log=silent)
    row = summary["rows"][1]
    sizes = summary["client_train_sizes"]
    assert row["local_steps"] == {cid: math.ceil(n / 8) for cid, n in sizes.items()}
    assert len(set(row["local_steps"].values())) > 1  # unequal clients, unequal work


def test_gradient_accumulation_equals_one_larger_batch(fed):
    one = train(fed, LocalTraining(local_steps=1, batch_size=8, lr=0.5, optimizer="sgd"))
    two = train(
        fed, LocalTraining(local_steps=1, batch_size=4, lr=0.5, optimizer="sgd", grad_accum_steps=2)
    )
    for layer in one.B:
        torch.testing.assert_close(two.B[layer], one.B[layer], rtol=1e-5, atol=1e-6)
    assert two.steps == one.steps == 1


def recorded_lrs(fn):
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
    )
    try:
        fn()
    finally:
        handle.remove()
    return lrs


@pytest.mark.parametrize("scope", ["round", "run"])
def test_cosine_schedule_with_warmup_follows_its_formula(fed, scope):
    lr, steps, rounds = 0.01, 5, 2
    settings = LocalTraining(
        local_steps=steps,
        batch_size=4,
        lr=lr,
        lr_scheduler="cosine",
        warmup_ratio=0.2,
        lr_schedule_scope=scope,
        rounds=rounds,
    )
    got = []
    for t in (1, 2):
        plan = RoundPlan(round=t, trained="B", train_head=True, method="ffa")
        got += recorded_lrs(lambda plan=plan: train(fed, settings, plan=plan))
    total = steps * rounds if scope == "run" else steps
    warm = round(0.2 * total)

    def expected(i):  # transformers' cosine with linear warmup, written out
        if i < warm:
            return lr * i / max(1, warm)
        progress = (i - warm) / max(1, total - warm)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    index = list(range(steps * rounds)) if scope == "run" else [*range(steps), *range(steps)]
    assert got == pytest.approx([expected(i) for i in index], rel=1e-9, abs=1e-12)


def test_max_grad_norm_clips_the_whole_update(fed):
    clip = 1e-3
    before = fed.initial_state
    update = train(
        fed, LocalTraining(local_steps=1, batch_size=8, lr=1.0, optimizer="sgd", max_grad_norm=clip)
    )
    moved = torch.sqrt(
        sum(((update.B[k] - before.B[k]) ** 2).sum() for k in update.B)
        + sum(((update.head[k] - before.head[k]) ** 2).sum() for k in update.head)
    )
    assert float(moved) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("local_epochs=0", "config key 'local_epochs' must be > 0, got 0.0"),
        ("grad_accum_steps=0", "config key 'grad_accum_steps' must be > 0, got 0"),
        (
            "lr_scheduler=step",
            "config key 'lr_scheduler' must be one of constant, linear, cosine; got 'step'",
        ),
        ("warmup_ratio=1.0", "config key 'warmup_ratio' must be in [0, 1), got 1.0"),
        (
            "lr_schedule_scope=epoch",
            "config key 'lr_schedule_scope' must be one of round, run; got 'epoch'",
        ),
        ("max_grad_norm=0", "config key 'max_grad_norm' must be > 0, got 0.0"),
    ],
)
def test_bad_training_controls_are_one_line(override, message):
    with pytest.raises(FedLoraError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_training_controls_dp_cannot_count_are_refused_with_dp():
    with pytest.raises(FedLoraError) as info:
        load_config(None, ["dp.noise_multiplier=1", "max_grad_norm=1"])
    assert str(info.value) == (
        "config key 'max_grad_norm' is not supported with dp.* (DP-SGD clips per example: dp.max_grad_norm)"
    )
    with pytest.raises(
        FedLoraError, match=r"^config key 'local_epochs' is not supported with dp\.\*$"
    ):
        load_config(None, ["dp.noise_multiplier=1", "local_epochs=2"])
