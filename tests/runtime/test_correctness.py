"""Issue-11 corrections at the level where they live: the centralized baseline as one
ordinary run, FLoRA's per-client scaling read from PEFT, the best round, the one-phase
evaluation warning, DP's secure mode, and the metrics' aggregation error."""

import json
import math

import pytest
import torch

from fedlora import recipes
from fedlora.client import LocalTraining, train_client
from fedlora.client.train import batch_indices, client_seed
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.methods.base import Aggregate
from fedlora.outputs import RunDir, best_row, read_metrics
from fedlora.privacy import ClientPrivacy, train_client_dp
from fedlora.runtime import run_federated
from fedlora.runtime.checkpoint import load_checkpoint
from fedlora.runtime.rows import round_row


@pytest.fixture
def fed(tiny_overrides):
    return build_federation(load_config(None, [*tiny_overrides, "method=centralized"]), log=silent)


def test_centralized_is_one_ordinary_run_with_one_optimizer(fed, tmp_path):
    """Two rounds of the baseline equal one AdamW run over the same batches; with a fresh
    optimizer per round (the old behaviour) Adam's bias correction restarts and they differ."""
    cfg = fed.cfg
    result = run_federated(
        fed, build_method("centralized", cfg), RunDir(tmp_path / "c"), log=silent
    )

    adapter = fed.adapter
    adapter.set_state(fed.initial_state)
    params = adapter.set_trainable("AB", head=True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = fed.pooled_train
    steps = cfg.local_steps * cfg.num_clients  # the sampled clients' steps, pooled
    taken = 0
    for t in range(1, cfg.rounds + 1):
        seed = client_seed(cfg.seed, t, 0)
        torch.manual_seed(seed)
        adapter.model.train()
        for idx in batch_indices(
            len(data),
            steps=steps,
            batch_size=cfg.batch_size,
            generator=torch.Generator().manual_seed(seed),
        ):
            adapter.model(**data.batch(idx)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            taken += 1
    adapter.model.eval()
    reference = adapter.get_state()
    for layer in reference.A:
        torch.testing.assert_close(
            result["state"].A[layer], reference.A[layer], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            result["state"].B[layer], reference.B[layer], rtol=1e-5, atol=1e-6
        )
    rows = read_metrics(tmp_path / "c")
    assert sum(rows[t]["local_steps"]["0"] for t in (1, 2)) == taken == 12
    # the optimizer the checkpoint keeps has taken every step
    ckpt = load_checkpoint(tmp_path / "c")
    assert {float(s["step"]) for s in ckpt.optimizers[0]["state"].values()} == {12.0}


def test_centralized_resumes_with_its_optimizer(fed, tmp_path):
    full = run_federated(
        fed, build_method("centralized", fed.cfg), RunDir(tmp_path / "full"), log=silent
    )
    fed.cfg = fed.cfg.replace(rounds=1)
    cut = RunDir(tmp_path / "cut")
    run_federated(fed, build_method("centralized", fed.cfg), cut, log=silent)
    fed.cfg = fed.cfg.replace(rounds=2)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt.round == 1 and ckpt.optimizers
    resumed = run_federated(fed, build_method("centralized", fed.cfg), cut, log=silent, resume=ckpt)
    for layer in full["state"].A:
        assert torch.equal(resumed["state"].A[layer], full["state"].A[layer])
        assert torch.equal(resumed["state"].B[layer], full["state"].B[layer])


@pytest.mark.parametrize("client_alpha", ["fixed", "proportional"])
def test_flora_weighs_each_client_by_the_scaling_peft_gave_it(tiny_overrides, client_alpha):
    ranks = [2, 4, 8]
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "method=flora",
            f"client_ranks={ranks}",
            f"client_alpha={client_alpha}",
            "alpha=16",
            "rank=4",
        ],
    )
    fed = build_federation(cfg, log=silent)
    method = build_method("flora", cfg)
    plan = method.plan(1)
    settings = LocalTraining.from_config(cfg)
    updates, peft_scalings = [], []
    for cid in range(3):
        start = method.client_start(fed.initial_state, client_id=cid, plan=plan)
        updates.append(
            train_client(
                adapter=fed.adapter,
                state=start,
                data=fed.encoded[cid].train,
                plan=plan,
                settings=settings,
                client_id=cid,
                seed=cfg.seed,
            )
        )
        # read straight from PEFT's module: the scaling the client's forward pass used
        name = fed.adapter.adapter_name
        peft_scalings.append(
            {k: float(m.scaling[name]) for k, m in fed.adapter.lora_layers.items()}
        )
    expected = [16 / r for r in ranks] if client_alpha == "fixed" else [16 / 4] * 3
    for s_k, e in zip(peft_scalings, expected, strict=True):
        assert list(s_k.values()) == pytest.approx([e] * len(s_k))
    weights = [float(u.num_examples) for u in updates]
    result = method.aggregate(
        plan=plan,
        state=fed.initial_state,
        updates=updates,
        weights=weights,
        scaling=fed.adapter.scaling(),
    )
    total = sum(weights)
    for layer in fed.initial_state.A:
        dense = sum(
            (w / total) * s[layer] * u.B[layer].double() @ u.A[layer].double()
            for w, s, u in zip(weights, peft_scalings, updates, strict=True)
        )
        torch.testing.assert_close(result.base_delta[layer].double(), dense, rtol=1e-5, atol=1e-7)


def test_best_accuracy_never_counts_round_0(tiny_overrides, tmp_path):
    rows = [
        {"round": 0, "accuracy": 0.9},
        {"round": 1, "accuracy": 0.5},
        {"round": 2, "accuracy": None},
    ]
    assert best_row(rows)["round"] == 1
    # a run that cannot learn (lr ~ 0): its accuracy stays at round 0's, and the best round
    # is still one after training started
    summary = recipes.run(
        load_config(None, [*tiny_overrides, "method=fedavg", "lr=1e-12"]), log=silent
    )
    assert summary["best_round"] >= 1
    assert summary["best_accuracy"] == pytest.approx(summary["rows"][0]["accuracy"], abs=0.05)


def test_rolora_with_an_even_eval_every_warns_in_one_line(tiny_overrides):
    lines: list[str] = []
    recipes.run(
        load_config(None, [*tiny_overrides, "method=rolora", "eval_every=2"]), log=lines.append
    )
    warnings = [line for line in lines if line.startswith("warning: eval_every=2")]
    assert len(warnings) == 1 and "sees one phase only" in warnings[0]
    lines.clear()
    recipes.run(
        load_config(None, [*tiny_overrides, "method=rolora", "eval_every=1", "overwrite=true"]),
        log=lines.append,
    )
    assert not [line for line in lines if line.startswith("warning:")]


def dp_update(fed, *, secure: bool, seed: int = 0):
    data = fed.encoded[0].train
    privacy = ClientPrivacy(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        num_examples=len(data),
        batch_size=8,
        steps_per_round=2,
        secure_mode=secure,
    )
    plan = build_method("fedavg", fed.cfg).plan(1)
    return train_client_dp(
        adapter=fed.adapter,
        state=fed.initial_state,
        data=data,
        plan=plan,
        settings=LocalTraining(local_steps=2, batch_size=8, lr=0.01),
        client_id=0,
        seed=seed,
        privacy=privacy,
    )


def test_dp_secure_mode_runs_and_is_not_reproducible_from_the_config(fed):
    plain = [dp_update(fed, secure=False) for _ in range(2)]
    secure = [dp_update(fed, secure=True) for _ in range(2)]
    layer = next(iter(fed.initial_state.A))
    assert torch.equal(plain[0].B[layer], plain[1].B[layer])  # simulation: reproducible
    assert not torch.equal(secure[0].B[layer], secure[1].B[layer])  # deployment: not
    assert all(torch.isfinite(u.B[layer]).all() for u in secure)
    assert load_config(None, ["dp.noise_multiplier=1.0", "dp.secure_mode=true"]).dp.secure_mode


def test_an_undefined_aggregation_error_is_null_in_json_and_says_why(tmp_path):
    from fedlora.messages import AdapterState, ClientUpdate, RoundPlan

    plan = RoundPlan(round=1, trained="AB", train_head=False, method="fedavg")
    zero = AdapterState(A={"l": torch.zeros(2, 3)}, B={"l": torch.zeros(4, 2)})
    row = round_row(
        plan=plan,
        clients=[0],
        updates=[ClientUpdate(client_id=0, num_examples=1, train_loss=0.1, steps=1)],
        download_bytes=0,
        result=Aggregate(state=zero),
        errors={"l": math.inf, "m": 0.5},
    )
    run_dir = RunDir(tmp_path / "r")
    run_dir.log_metrics(row)
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "Infinity" not in text  # strict JSON
    written = json.loads(text)
    assert written["agg_error"]["layers"] == {"l": None, "m": 0.5}
    assert written["agg_error"]["mean"] is None
    assert (
        "mean update is zero but the aggregate is not, in layers l"
        in written["agg_error"]["undefined"]
    )


def test_every_method_logs_the_relative_frobenius_error(tiny_overrides, tmp_path):
    """agg_error in metrics is ||M - X|| / ||M||: ~0 for exact methods, > 0 for FedAvg."""
    for name, exact in (("fedavg", False), ("rolora", True), ("fedex", True), ("fra", False)):
        cfg = load_config(None, [*tiny_overrides, f"method={name}", f"run_name={name}"])
        summary = recipes.run(cfg, log=silent)
        errors = [r["agg_error"]["max"] for r in summary["rows"][1:]]
        # clients on different data never propose the same increment
        assert all(r["client_drift"]["mean"] > 1e-3 for r in summary["rows"][1:]), name
        if exact:
            assert max(errors) < 1e-5, (name, errors)
        else:
            assert min(errors) > 1e-4, (name, errors)
        if name == "fra":  # its own diagnostic, in its own unit, under its own name
            row = summary["rows"][1]
            for layer, share in row["fra_discarded_energy"]["layers"].items():
                assert row["agg_error"]["layers"][layer] == pytest.approx(
                    math.sqrt(share), rel=1e-4
                )
