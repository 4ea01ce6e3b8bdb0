"""FRA-LoRA, FedEx-LoRA, FLoRA and schedules through the real round loop (tiny BERT)."""

from pathlib import Path

import pytest
import torch

from fedlora import recipes
from fedlora.client import LocalTraining, evaluate, train_client
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.models.adapter import apply_base_delta
from fedlora.outputs import RunDir
from fedlora.runtime import run_federated


@pytest.fixture
def fed(tiny_overrides):
    return build_federation(
        load_config(None, [*tiny_overrides, "client_ranks=[2,4,8]", "methods=[flora]"]), log=silent
    )


def test_fedex_effective_weight_is_w0_plus_scaled_mean_update(fed, tmp_path):
    fed.cfg = fed.cfg.replace(method="fedex", rounds=1)
    start = fed.reset()
    w0 = {k: fed.adapter.base_weight(k).detach().clone() for k in start.A}
    settings = LocalTraining(
        local_steps=fed.cfg.local_steps, batch_size=fed.cfg.batch_size, lr=fed.cfg.lr
    )
    method = build_method("fedex", fed.cfg)
    plan = method.plan(1)
    replies = [
        train_client(
            adapter=fed.adapter,
            state=start,
            data=fed.encoded[c].train,
            plan=plan,
            settings=settings,
            client_id=c,
            seed=fed.cfg.seed,
        )
        for c in range(3)
    ]
    weights = torch.tensor([float(u.num_examples) for u in replies], dtype=torch.float64)
    weights /= weights.sum()

    result = run_federated(
        fed, build_method("fedex", fed.cfg), RunDir(tmp_path / "fedex"), log=silent
    )
    state, s = result["state"], fed.adapter.scaling()
    for layer in start.A:
        M = sum(
            w * u.B[layer].double() @ u.A[layer].double()
            for w, u in zip(weights, replies, strict=True)
        )
        now = (
            fed.adapter.base_weight(layer).double()
            + s[layer] * state.B[layer].double() @ state.A[layer].double()
        )
        torch.testing.assert_close(now, w0[layer].double() + s[layer] * M, atol=1e-6, rtol=1e-5)
        # and FedAvg of the factors alone would not have been exact
        assert not torch.allclose(state.B[layer].double() @ state.A[layer].double(), M, atol=1e-6)


@pytest.mark.parametrize("method", ["fra", "fedex", "flora", "schedule"])
def test_methods_run_and_saved_adapter_reproduces_accuracy(tiny_overrides, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    extra = ["client_ranks=[2,4,8]"] if method == "flora" else []
    if method == "schedule":
        extra = ["schedule=[{method: fra, rounds: 1}, {method: ffa}]"]
    cfg = load_config(None, [*tiny_overrides, f"method={method}", *extra])
    summary = recipes.run(cfg, log=silent)
    rows = summary["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    if method == "schedule":
        assert [r["method"] for r in rows[1:]] == ["fra", "ffa"]
    adapter_dir = Path(cfg.output_dir) / "t" / "adapter"
    assert (adapter_dir / "base_delta.safetensors").is_file() == (method in ("fedex", "flora"))
    base = AutoModelForSequenceClassification.from_pretrained(
        summary["model_path"], num_labels=len(summary["label_names"]), ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    apply_base_delta(model, adapter_dir)
    fed = build_federation(cfg, log=silent)
    accuracy, _ = evaluate(model, fed.test, batch_size=16)
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-9)


def test_flora_clients_train_at_their_own_ranks(fed, tmp_path):
    fed.cfg = fed.cfg.replace(method="flora")
    result = run_federated(
        fed, build_method("flora", fed.cfg), RunDir(tmp_path / "flora"), log=silent
    )
    lora = fed.initial_state
    per_rank_bytes = sum(4 * (a.shape[1] + lora.B[k].shape[0]) for k, a in lora.A.items())
    head_bytes = sum(t.numel() * 4 for t in lora.head.values())
    expected = (2 + 4 + 8) * per_rank_bytes + 3 * head_bytes
    assert result["rows"][1]["upload_bytes"] == expected
    assert sorted(fed.adapter.rank_adapters) == [2, 4, 8]
