"""DoRA adapters (``adapter=dora``, PEFT ``use_dora=True``): the magnitude vector as a
message, the layer's forward against the paper's formula in float64, what a round trains,
the saved adapter, and the keys it is refused with."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from fedlora.client import LocalTraining, train_client
from fedlora.config import load_config
from fedlora.data import Encoded
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import check_config
from fedlora.models import LoRASettings, PeftAdapter, attach_lora


def tiny_bert(seed: int = 0):
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed: int = 0):
    cfg = GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0
    )
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(cfg)


def dora_adapter(build=tiny_bert, *, dora: bool = True) -> PeftAdapter:
    return PeftAdapter(attach_lora(build(), LoRASettings(rank=2, alpha=4, dora=dora), seed=0))


def random_state(adapter: PeftAdapter, seed: int) -> AdapterState:
    """Factors and magnitudes far from PEFT's init (B = 0, m = ||W0||_row)."""
    g = torch.Generator().manual_seed(seed)
    start = adapter.get_state()
    return AdapterState(
        A={k: torch.randn(v.shape, generator=g) for k, v in start.A.items()},
        B={k: torch.randn(v.shape, generator=g) for k, v in start.B.items()},
        head=start.head,
        magnitude={k: torch.rand(v.shape, generator=g) + 0.5 for k, v in start.magnitude.items()},
    )


def dense_base(adapter: PeftAdapter, layer: str) -> torch.Tensor:
    """W0 as ``(out, in)``, float64 (GPT-2's Conv1D stores it ``(in, out)``)."""
    base = adapter.lora_layers[layer].get_base_layer()
    w = base.weight.detach().double()
    return w.T if type(base).__name__ == "Conv1D" else w


def test_magnitude_is_one_vector_per_layer_and_round_trips():
    adapter = dora_adapter()
    state = adapter.get_state()
    assert set(state.magnitude) == set(adapter.lora_layers)
    for layer, m in state.magnitude.items():
        # PEFT's init: B = 0, so m = ||W0||_row and the model is the pretrained one
        torch.testing.assert_close(m, dense_base(adapter, layer).norm(dim=1).float())
    new = random_state(adapter, 1)
    adapter.set_state(new)
    got = adapter.get_state()
    for layer in new.magnitude:
        assert torch.equal(got.magnitude[layer], new.magnitude[layer])
    assert got.nbytes() == state.nbytes()  # the magnitude is counted in the state's bytes
    assert got.nbytes() - dataclass_without_magnitude(got).nbytes() == 4 * sum(
        m.numel() for m in got.magnitude.values()
    )
    assert adapter.get_state(magnitude=False).magnitude == {}


def dataclass_without_magnitude(state: AdapterState) -> AdapterState:
    return AdapterState(A=state.A, B=state.B, head=state.head)


def test_plain_lora_has_no_magnitude_and_refuses_one():
    adapter = dora_adapter(dora=False)
    assert not adapter.dora and adapter.get_state().magnitude == {}
    with pytest.raises(ValueError, match="plain LoRA adapter"):
        adapter.set_state(random_state(dora_adapter(), 0))


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_layer_forward_equals_float64_dora_formula(build):
    """W' = m * (W0 + s B A) / ||W0 + s B A||_row (Liu et al. 2024, eq. 5; the norm of each
    output row, as the authors' code and PEFT take it), computed densely in float64."""
    adapter = dora_adapter(build)
    state = random_state(adapter, 2)
    adapter.set_state(state)
    adapter.model.eval()
    s = adapter.scaling()
    for layer, module in adapter.lora_layers.items():
        W0 = dense_base(adapter, layer)
        V = W0 + s[layer] * state.B[layer].double() @ state.A[layer].double()
        W = state.magnitude[layer].double()[:, None] * V / V.norm(dim=1, keepdim=True)
        bias = module.get_base_layer().bias.detach().double()
        x = torch.randn(5, W0.shape[1], dtype=torch.float64)
        with torch.no_grad():
            got = module(x.float())
        torch.testing.assert_close(got.double(), x @ W.T + bias, atol=1e-5, rtol=1e-5)


def test_dora_differs_from_lora_with_the_same_factors():
    """The test above can fail: the same (A, B) without the magnitude is another function."""
    dora, lora = dora_adapter(), dora_adapter(dora=False)
    state = random_state(dora, 2)
    dora.set_state(state)
    lora.set_state(AdapterState(A=state.A, B=state.B, head=state.head))
    layer = next(iter(dora.lora_layers))
    x = torch.randn(4, state.A[layer].shape[1])
    with torch.no_grad():
        assert not torch.allclose(dora.lora_layers[layer](x), lora.lora_layers[layer](x))


@pytest.mark.parametrize(
    ("trained", "train_magnitude", "expect_m"),
    [("A", None, False), ("B", None, True), ("AB", None, True), ("AB", False, False)],
)
def test_trainable_set_follows_the_plan(trained, train_magnitude, expect_m):
    adapter = dora_adapter()
    plan = RoundPlan(
        round=1, trained=trained, train_head=False, method="x", train_magnitude=train_magnitude
    )
    assert plan.trains_magnitude is expect_m  # None resolves to "with B"
    params = adapter.set_trainable(plan.trained, head=False, magnitude=plan.trains_magnitude)
    on = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert len(params) == len(on)
    n_layers = len(adapter.lora_layers)
    assert sum("lora_magnitude_vector" in n for n in on) == (n_layers if expect_m else 0)
    assert sum("lora_A" in n for n in on) == (n_layers if "A" in trained else 0)
    assert sum("lora_B" in n for n in on) == (n_layers if "B" in trained else 0)
    assert on <= {n for n in on if "lora_" in n}


def tiny_data(n: int = 12, length: int = 6) -> Encoded:
    g = torch.Generator().manual_seed(0)
    return Encoded(
        input_ids=torch.randint(1, 50, (n, length), generator=g),
        attention_mask=torch.ones(n, length, dtype=torch.long),
        labels=torch.randint(0, 3, (n,), generator=g),
        token_type_ids=None,
    )


@pytest.mark.parametrize("trained", ["A", "B"])
def test_a_round_sends_and_changes_the_magnitude_only_when_it_trains_it(trained):
    adapter = dora_adapter()
    start = random_state(adapter, 3)
    plan = RoundPlan(round=1, trained=trained, train_head=False, method="rolora")
    update = train_client(
        adapter=adapter,
        state=start,
        data=tiny_data(),
        plan=plan,
        settings=LocalTraining(local_steps=3, batch_size=4, lr=0.05),
        client_id=0,
        seed=0,
    )
    held = adapter.get_state()
    if trained == "B":
        assert set(update.magnitude) == set(start.magnitude)
        for layer, m in update.magnitude.items():
            assert not torch.equal(m, start.magnitude[layer])  # it trained
            assert torch.equal(m, held.magnitude[layer])
    else:
        assert update.magnitude == {}
        for layer, m in held.magnitude.items():
            assert torch.equal(m, start.magnitude[layer])  # frozen in an A round
    assert update.nbytes() == update.trained_state.nbytes()


def test_saved_adapter_loads_in_peft_with_the_magnitude(tmp_path: Path):
    adapter = dora_adapter()
    state = random_state(adapter, 4)
    adapter.save(tmp_path, state, {})
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    assert loaded.peft_config["default"].use_dora
    again = PeftAdapter(loaded)
    got = again.get_state()
    for layer, m in state.magnitude.items():
        assert torch.equal(got.magnitude[layer], m)
        assert torch.equal(got.A[layer], state.A[layer]) and torch.equal(
            got.B[layer], state.B[layer]
        )
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    adapter.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, adapter.model(input_ids=ids).logits
        )


# -- on the wire and in checkpoints ------------------------------------------------------


def test_flower_records_carry_the_magnitude_and_the_plan_flag():
    pytest.importorskip("flwr")
    from fedlora.runtime.flower import codec

    adapter = dora_adapter()
    state = random_state(adapter, 5)
    plan = RoundPlan(round=2, trained="A", train_head=False, method="rolora")
    ins = codec.Instruction(
        config="x: 1\n", label_names=["a"], state=state, base_delta={}, plan=plan
    )
    back = codec.content_to_instruction(codec.instruction_to_content(ins))
    assert back.plan == plan and back.plan.trains_magnitude is False
    for layer, m in state.magnitude.items():
        assert torch.equal(back.state.magnitude[layer], m)
    assert back.state.nbytes() == state.nbytes()
    update = ClientUpdate(
        client_id=1, num_examples=3, B=dict(state.B), magnitude=dict(state.magnitude)
    )
    got = codec.content_to_update(codec.update_to_content(update))
    assert got.magnitude.keys() == state.magnitude.keys() and got.A == {}
    for layer, m in state.magnitude.items():
        assert torch.equal(got.magnitude[layer], m)
    assert got.nbytes() == update.nbytes()


def test_checkpoint_round_trips_the_magnitude(tmp_path: Path):
    import random

    from fedlora.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    state = random_state(dora_adapter(), 6)
    save_checkpoint(
        tmp_path,
        Checkpoint(
            round=1,
            state=state,
            method_state={},
            rng_state=random.Random(0).getstate(),
            base_total={},
            base={},
        ),
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    for layer, m in state.magnitude.items():
        assert torch.equal(loaded.state.magnitude[layer], m)


def test_a_dora_adapter_refuses_factors_without_a_magnitude():
    """A method that drops the magnitude fails loudly instead of the model keeping the last
    client's trained m."""
    adapter = dora_adapter()
    state = adapter.get_state()
    with pytest.raises(ValueError, match="carries_magnitude = False"):
        adapter.set_state(AdapterState(A=state.A, B=state.B, head=state.head))


# -- configuration ------------------------------------------------------------------------


def test_adapter_key_choices():
    assert load_config(None, []).adapter == "lora"
    assert load_config(None, ["adapter=dora", "method=rolora"]).adapter == "dora"
    with pytest.raises(
        FedLoraError, match=r"^config key 'adapter' must be one of lora, dora; got 'vera'$"
    ):
        load_config(None, ["adapter=vera"])


@pytest.mark.parametrize(
    ("overrides", "method"),
    [
        (["method=fedex"], "fedex"),
        (["method=flora"], "flora"),
        (["method=rolora", "methods=[fedavg,fedex]"], "fedex"),
        (["method=schedule", "schedule=[{method: fra, rounds: 1}, {method: fedex}]"], "fedex"),
    ],
)
def test_dora_is_refused_with_a_method_that_folds_into_the_base(overrides, method):
    with pytest.raises(FedLoraError) as info:
        check_config(load_config(None, ["adapter=dora", *overrides]))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"adapter=dora cannot run with method {method}: it ")
    assert "into the frozen weights" in message


def test_dora_is_refused_with_dp():
    with pytest.raises(FedLoraError, match=r"^adapter=dora is not supported with dp\.\*"):
        load_config(None, ["adapter=dora", "dp.noise_multiplier=1.0"])


def test_cli_exits_2_on_dora_with_fedex(capsys, tiny_overrides):
    from fedlora.cli import main

    code = main(["run", *tiny_overrides, "adapter=dora", "method=fedex"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("fedlora: error: adapter=dora cannot run with method fedex"), err
