"""Devices, autocast precision, the base model's dtype and quantized bases (QLoRA), on the
CPU: what a GPU run does, checked where CI can run it (a GPU check is bench/gpu_check.sh)."""

import json

import pytest
import torch

from fedlora.client import LocalTraining, train_client
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method, check_config


def run_state(overrides):
    cfg = load_config(None, overrides)
    fed = build_federation(cfg, log=silent)
    from fedlora.outputs import RunDir
    from fedlora.runtime import run_federated

    out = run_federated(
        fed,
        build_method(cfg.method, cfg),
        RunDir(cfg.output_dir + "/" + str(cfg.run_name)),
        log=silent,
    )
    return fed, out["state"]


def test_an_explicit_device_and_the_default_give_the_same_adapter(tiny_overrides):
    from fedlora.models.device import resolve_device

    here = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == here  # CUDA when there is one (bench/gpu_check.sh), else CPU
    without = [o for o in tiny_overrides if not o.startswith("device=")]
    _, explicit = run_state([*without, f"device={here.type}", "run_name=explicit"])
    _, default = run_state([*without, "run_name=auto"])
    for layer in explicit.A:
        assert torch.equal(explicit.A[layer], default.A[layer])
        assert torch.equal(explicit.B[layer], default.B[layer])


def test_a_device_that_is_not_here_is_one_line_before_any_data(tiny_overrides, monkeypatch):
    import fedlora.federation as federation

    def no_data(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("data was loaded before the device was checked")

    monkeypatch.setattr(federation, "load_text_dataset", no_data)
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        expected = f"device=cuda:99: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
    else:
        expected = "device=cuda:99: torch sees no CUDA device on this machine"
    for device, message in (
        ("cuda:99", expected),
        ("gpu", "config key 'device' must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
    ):
        with pytest.raises(FedLoraError) as info:
            build_federation(load_config(None, [*tiny_overrides, f"device={device}"]), log=silent)
        assert str(info.value) == message


def test_fp16_needs_cuda(tiny_overrides):
    with pytest.raises(FedLoraError) as info:
        cfg = load_config(None, [*tiny_overrides, "precision=fp16", "device=cpu"])
        build_federation(cfg, log=silent)
    assert (
        str(info.value)
        == "precision=fp16 needs a CUDA device (this run is on cpu); use precision=bf16"
    )


def forward_dtypes(fed):
    """dtype of a frozen base projection's output and of the head's logits, during training."""
    seen = {}
    layer = next(iter(fed.adapter.lora_layers.values()))

    def record(module, inputs, output):  # returns None: the output stays as it is
        seen.setdefault("base", output.dtype)

    h1 = layer.get_base_layer().register_forward_hook(record)
    cfg = fed.cfg
    plan = build_method("fedavg", cfg).plan(1)
    update = train_client(
        adapter=fed.adapter,
        state=fed.initial_state,
        data=fed.encoded[0].train,
        plan=plan,
        settings=LocalTraining.from_config(cfg),
        client_id=0,
        seed=0,
    )
    h1.remove()
    return seen, update


def test_bf16_autocast_computes_in_bf16_and_keeps_factors_float32(tiny_overrides):
    fed = build_federation(load_config(None, [*tiny_overrides, "precision=bf16"]), log=silent)
    seen, update = forward_dtypes(fed)
    assert seen["base"] == torch.bfloat16
    assert {t.dtype for t in [*update.A.values(), *update.B.values(), *update.head.values()]} == {
        torch.float32
    }
    assert all(torch.isfinite(t).all() for t in update.B.values())


def test_a_bfloat16_base_for_classification_keeps_lora_and_the_head_float32(tiny_overrides):
    fed = build_federation(load_config(None, [*tiny_overrides, "base_dtype=bfloat16"]), log=silent)
    layer = next(iter(fed.adapter.lora_layers))
    assert fed.adapter.base_weight(layer).dtype == torch.bfloat16
    seen, update = forward_dtypes(fed)
    assert seen["base"] == torch.bfloat16
    assert {t.dtype for t in [*update.A.values(), *update.B.values(), *update.head.values()]} == {
        torch.float32
    }


@pytest.mark.parametrize(
    ("quantization", "layer_type"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")]
)
def test_quantized_base_trains_float32_lora(tiny_overrides, quantization, layer_type):
    cfg = load_config(None, [*tiny_overrides, f"quantization={quantization}", "method=rolora"])
    fed = build_federation(cfg, log=silent)
    base = next(iter(fed.adapter.lora_layers.values())).get_base_layer()
    assert type(base).__name__ == layer_type
    _, update = forward_dtypes(fed)
    start = fed.initial_state
    assert all(u.dtype == torch.float32 for u in update.B.values())
    assert any(not torch.equal(update.B[k], start.B[k]) for k in update.B)  # it trained
    assert all(torch.isfinite(u).all() for u in update.B.values())


def test_a_folding_method_on_a_quantized_base_is_refused():
    with pytest.raises(FedLoraError) as info:
        check_config(load_config(None, ["quantization=nf4", "method=fedex"]))
    assert str(info.value).startswith(
        "method fedex folds increments into the frozen weights, which a quantized (nf4) base "
        "cannot hold exactly"
    )


def test_quantization_without_bitsandbytes_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(FedLoraError) as info:
        load_config(None, ["quantization=int8"])
    assert (
        str(info.value) == "quantization=int8 needs bitsandbytes (pip install bitsandbytes==0.50.2)"
    )


def test_gradient_checkpointing_gives_the_same_update(tiny_overrides):
    _, plain = run_state([*tiny_overrides, "run_name=plain", "rounds=1"])
    _, checkpointed = run_state(
        [*tiny_overrides, "run_name=ckpt", "rounds=1", "gradient_checkpointing=true"]
    )
    for layer in plain.B:
        torch.testing.assert_close(checkpointed.B[layer], plain.B[layer], rtol=1e-5, atol=1e-7)


def test_the_smollm2_cache_never_keeps_the_gguf_quantization_config(tmp_path):
    from fedlora.models.causal_lm import _drop_gguf_quantization

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}})
    )
    _drop_gguf_quantization(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}
    _drop_gguf_quantization(config)  # idempotent
    assert json.loads(config.read_text()) == {"model_type": "llama"}


def test_a_bfloat16_base_folds_without_losing_increments(tiny_overrides, tmp_path):
    """FedEx-LoRA on a bfloat16 base: the folded sum is kept in float32 and the held weight
    is its rounding, so the increments never round away (adding a small increment to a bf16
    weight directly lost most of it every round)."""
    from fedlora.outputs import RunDir
    from fedlora.runtime import run_federated

    cfg = load_config(None, [*tiny_overrides, "base_dtype=bfloat16", "method=fedex", "rounds=3"])
    fed = build_federation(cfg, log=silent)
    run_federated(fed, build_method("fedex", cfg), RunDir(tmp_path / "bf"), log=silent)
    from safetensors.torch import load_file

    total = load_file(str(tmp_path / "bf" / "adapter" / "base_delta.safetensors"))
    for layer, delta in total.items():
        exact = fed.initial_base[layer].float() + delta
        torch.testing.assert_close(fed.adapter.exact_base(layer), exact, rtol=0, atol=1e-6)
        assert torch.equal(
            fed.adapter.base_weight(layer), fed.adapter.exact_base(layer).to(torch.bfloat16)
        )
        assert float(delta.abs().max()) > 0
