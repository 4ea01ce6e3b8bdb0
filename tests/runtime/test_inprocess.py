"""The round loop on a tiny BERT and real BBC articles."""

import json
from pathlib import Path

import pytest
import torch

from fedlora import recipes
from fedlora.client import LocalTraining, evaluate, train_client
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.outputs import RunDir, read_metrics
from fedlora.runtime import run_federated


@pytest.fixture
def fed(tiny_overrides):
    return build_federation(load_config(None, tiny_overrides), log=silent)


def run(fed, name: str, tmp_path: Path, **changes):
    fed.cfg = fed.cfg.replace(method=name, **changes)
    return run_federated(fed, build_method(name, fed.cfg), RunDir(tmp_path / name), log=silent)


def test_the_server_checks_the_config_it_is_handed(fed, tmp_path):
    """Library callers reach the server with a Config of their own: the methods check it."""
    fed.cfg = fed.cfg.replace(client_ranks=[2, 4, 8])  # loads: only the methods know better
    with pytest.raises(FedLoraError, match="'client_ranks' needs a method with per-client ranks"):
        run(fed, "fedavg", tmp_path)


def lora_bytes(state, factor: str) -> int:
    return sum(t.numel() * t.element_size() for t in getattr(state, factor).values())


def test_metrics_rows_and_fields(fed, tmp_path):
    result = run(fed, "fedavg", tmp_path)
    rows = read_metrics(tmp_path / "fedavg")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows == json.loads(json.dumps(result["rows"]))
    for r in rows:
        assert {
            "round",
            "method",
            "trained",
            "accuracy",
            "loss",
            "client_accuracy",
            "upload_bytes",
            "download_bytes",
        } <= set(r)
        assert set(r["client_accuracy"]) == {"0", "1", "2"}
        assert 0.0 <= r["accuracy"] <= 1.0
    assert rows[0]["upload_bytes"] == 0 and rows[1]["trained"] == "AB+head"
    assert rows[1]["agg_error"]["mean"] > 0  # fedavg's cross terms on non-identical clients


def test_ffa_never_changes_a_and_uploads_one_factor(fed, tmp_path):
    start = fed.initial_state
    result = run(fed, "ffa", tmp_path, head="frozen")
    for layer in start.A:
        assert torch.equal(result["state"].A[layer], start.A[layer])
        assert not torch.equal(result["state"].B[layer], start.B[layer])
    for row in result["rows"][1:]:
        assert row["upload_bytes"] == 3 * lora_bytes(start, "B")
        assert row["download_bytes"] == 3 * start.nbytes()


def test_rolora_changes_only_the_factor_it_trained(fed, tmp_path):
    start = fed.initial_state
    one = run(fed, "rolora", tmp_path / "one", rounds=1, head="frozen")["state"]
    two = run(fed, "rolora", tmp_path / "two", rounds=2, head="frozen")
    for layer in start.A:
        assert torch.equal(one.A[layer], start.A[layer])  # round 1 trains B
        assert not torch.equal(one.B[layer], start.B[layer])
        assert torch.equal(two["state"].B[layer], one.B[layer])  # round 2 trains A
        assert not torch.equal(two["state"].A[layer], one.A[layer])
    assert [r["trained"] for r in two["rows"][1:]] == ["B", "A"]
    assert two["rows"][2]["upload_bytes"] == 3 * lora_bytes(start, "A")


def test_head_policy_frozen_keeps_the_head(fed, tmp_path):
    result = run(fed, "fedavg", tmp_path, head="frozen")
    for name, value in fed.initial_state.head.items():
        assert torch.equal(result["state"].head[name], value)


def test_clients_with_identical_data_and_seed_return_identical_updates(fed):
    plan = build_method("fedavg", fed.cfg).plan(1)
    settings = LocalTraining(local_steps=2, batch_size=8, lr=0.01)
    data = fed.encoded[0].train
    ups = [
        train_client(
            adapter=fed.adapter,
            state=fed.initial_state,
            data=data,
            plan=plan,
            settings=settings,
            client_id=0,
            seed=0,
        )
        for _ in range(2)
    ]
    for layer in ups[0].A:
        assert torch.equal(ups[0].A[layer], ups[1].A[layer])
        assert torch.equal(ups[0].B[layer], ups[1].B[layer])
        assert not torch.equal(ups[0].B[layer], fed.initial_state.B[layer])
    # and their FedAvg is that same update: the sent adapter plus the common change
    method = build_method("fedavg", fed.cfg)
    agg = method.aggregate(
        plan=plan,
        state=fed.initial_state,
        updates=ups,
        weights=[1, 1],
        scaling=fed.adapter.scaling(),
    )
    for layer in ups[0].A:
        torch.testing.assert_close(
            agg.state.B[layer] @ agg.state.A[layer], ups[0].B[layer] @ ups[0].A[layer]
        )


def test_same_seed_same_run(tiny_overrides, tmp_path):
    a = recipes.run(load_config(None, [*tiny_overrides, f"output_dir={tmp_path}/a"]), log=silent)
    b = recipes.run(load_config(None, [*tiny_overrides, f"output_dir={tmp_path}/b"]), log=silent)
    assert [r["accuracy"] for r in a["rows"]] == [r["accuracy"] for r in b["rows"]]
    assert [r["train_loss"] for r in a["rows"][1:]] == [r["train_loss"] for r in b["rows"][1:]]


def test_saved_adapter_loads_with_peft_and_reproduces_accuracy(tiny_overrides, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(None, [*tiny_overrides, "method=rolora"])
    summary = recipes.run(cfg, log=silent)
    run_dir = Path(cfg.output_dir) / "t"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "plots/accuracy.png",
    ):
        assert (run_dir / name).is_file(), name
    base = AutoModelForSequenceClassification.from_pretrained(
        summary["model_path"], num_labels=len(summary["label_names"]), ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    fed = build_federation(cfg, log=silent)  # same data, same tokenisation
    accuracy, _ = evaluate(model, fed.test, batch_size=16)
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final_accuracy"] == summary["final_accuracy"]


def run_counting_steps(fed, name: str, tmp_path: Path, **changes):
    """Run ``name`` and count the optimizer steps (any optimizer's ``step()``) taken in each
    round, i.e. between one round's aggregation and the previous one's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    fed.cfg = fed.cfg.replace(method=name, **changes)
    method = build_method(name, fed.cfg)
    steps = [0]
    per_round: list[int] = []
    aggregate = method.aggregate

    def counted(*args, **kwargs):
        per_round.append(steps[0] - sum(per_round))
        return aggregate(*args, **kwargs)

    method.aggregate = counted
    handle = register_optimizer_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    try:
        result = run_federated(fed, method, RunDir(tmp_path / name), log=silent)
    finally:
        handle.remove()
    assert sum(per_round) == steps[0]  # no step after the last aggregation
    return result, per_round


@pytest.mark.parametrize(("client_fraction", "sampled"), [(1.0, 3), (0.67, 2)])
def test_centralized_pools_data_with_same_total_steps(fed, tmp_path, client_fraction, sampled):
    local_steps, rounds = fed.cfg.local_steps, fed.cfg.rounds
    result, steps = run_counting_steps(
        fed, "centralized", tmp_path, client_fraction=client_fraction
    )
    clients = [r["clients"] for r in result["rows"][1:]]
    assert [len(c) for c in clients] == [sampled] * rounds
    # One trainer takes, each round, local_steps for each sampled client...
    assert steps == [local_steps * sampled] * rounds
    assert result["rows"][1]["upload_bytes"] == fed.initial_state.nbytes()  # one reply
    assert len(fed.pooled_train) == sum(len(fed.encoded[c.client_id].train) for c in fed.clients)
    # ...which is what the federated clients take together, round by round.
    fedavg, fedavg_steps = run_counting_steps(
        fed, "fedavg", tmp_path, client_fraction=client_fraction
    )
    assert [r["clients"] for r in fedavg["rows"][1:]] == clients  # the same sampler
    assert fedavg_steps == steps


def test_client_fraction_samples_clients(fed, tmp_path):
    result = run(fed, "fedavg", tmp_path, client_fraction=0.34, rounds=3)
    assert all(len(r["clients"]) == 1 for r in result["rows"][1:])


def test_existing_results_are_not_overwritten(tiny_overrides, tmp_path):
    from fedlora.errors import FedLoraError

    cfg = load_config(None, tiny_overrides)
    recipes.run(cfg, log=silent)
    metrics = (Path(cfg.output_dir) / "t" / "metrics.jsonl").read_text()
    with pytest.raises(FedLoraError, match="already holds results"):
        recipes.run(cfg, log=silent)
    assert (Path(cfg.output_dir) / "t" / "metrics.jsonl").read_text() == metrics
