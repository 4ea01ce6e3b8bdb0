"""PeftAdapter: PEFT keys, trainability, folding into frozen weights (Linear and Conv1D)."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

from fedlora.errors import FedLoraError
from fedlora.models import LoRASettings, PeftAdapter, attach_lora, detect_target_modules


def tiny_gpt2():
    cfg = GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0
    )
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(cfg)


def tiny_bert():
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def test_target_detection_and_layers():
    assert detect_target_modules(tiny_gpt2()) == ["c_attn"]
    adapter = PeftAdapter(
        attach_lora(tiny_bert(), LoRASettings(rank=2, alpha=4, layers=[1, 2]), seed=0)
    )
    assert sorted(adapter.lora_layers) == [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (1, 2) for m in ("query", "value")
    ]
    assert set(adapter.head_params) == {"classifier.weight", "classifier.bias"}
    state = adapter.get_state()
    layer = next(iter(state.A))
    assert state.A[layer].shape == (2, 16) and state.B[layer].shape == (16, 2)
    assert adapter.scaling()[layer] == 2.0


def test_bad_layers_and_targets():
    with pytest.raises(FedLoraError, match=r"^layers \[7\] out of range: the model has 3 blocks$"):
        attach_lora(tiny_bert(), LoRASettings(rank=2, alpha=4, layers=[7]), seed=0)
    with pytest.raises(
        FedLoraError,
        match=r"^target module\(s\) \['q_proj'\] not found in model BertForSequenceClassification$",
    ):
        attach_lora(tiny_bert(), LoRASettings(rank=2, alpha=4, target_modules=["q_proj"]), seed=0)


def test_set_trainable_only_named_factors():
    adapter = PeftAdapter(attach_lora(tiny_bert(), LoRASettings(rank=2, alpha=4), seed=0))
    params = adapter.set_trainable("B", head=False)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
    assert len(params) == len(trainable)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_add_to_base_uses_out_in_orientation(build):
    """After folding delta (out, in), the base layer maps x to x W0^T + x delta^T (+ bias):
    for GPT-2's Conv1D, whose weight is stored (in, out), too."""
    adapter = PeftAdapter(attach_lora(build(), LoRASettings(rank=2, alpha=4), seed=0))
    layer = next(iter(adapter.lora_layers))
    base = adapter.lora_layers[layer].get_base_layer()
    in_f, out_f = adapter.get_state().A[layer].shape[1], adapter.get_state().B[layer].shape[0]
    x = torch.randn(5, in_f)
    before = base(x)
    delta = torch.randn(out_f, in_f)
    adapter.add_to_base(layer, delta)
    torch.testing.assert_close(base(x), before + x @ delta.T)


def test_state_roundtrip_and_rank_switching():
    adapter = PeftAdapter(attach_lora(tiny_bert(), LoRASettings(rank=2, alpha=4), seed=0))
    state = adapter.get_state()
    other = state.clone()
    for t in (*other.A.values(), *other.B.values()):
        t.add_(1.0)
    adapter.set_state(other)
    for k in state.A:
        torch.testing.assert_close(adapter.get_state().A[k], other.A[k])
    # a rank-3 state activates a second adapter; the rank-2 one is untouched
    layer = next(iter(state.A))
    r3 = type(state)(
        A={k: torch.zeros(3, v.shape[1]) for k, v in state.A.items()},
        B={k: torch.ones(v.shape[0], 3) for k, v in state.B.items()},
        head=dict(state.head),
    )
    adapter.set_state(r3)
    assert adapter.adapter_name == "rank3" and adapter.get_state().A[layer].shape[0] == 3
    adapter.set_state(state)
    assert adapter.adapter_name == "default"
    torch.testing.assert_close(adapter.get_state().B[layer], state.B[layer])


class _Block(torch.nn.Module):
    def __init__(self, hidden: int, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            setattr(self, name, torch.nn.Linear(hidden, hidden))


class _Unlisted(torch.nn.Module):
    """A model type no table lists, with its own module names."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(model_type="home-made", hidden_size=8)
        self.blocks = torch.nn.ModuleList([_Block(8, names) for _ in range(2)])
        self.classifier = torch.nn.Linear(8, 3)


def test_targets_of_architectures_no_table_lists():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    # DistilBERT is not in PEFT's table: its q_lin/v_lin are found among its modules
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    )
    assert detect_target_modules(distil) == ["q_lin", "v_lin"]
    assert detect_target_modules(_Unlisted(("wq", "wk", "wv", "wo"))) == ["wq", "wv"]
    with pytest.raises(FedLoraError) as info:
        detect_target_modules(_Unlisted(("proj_in", "proj_out")))
    message = str(info.value)
    # the error names this model's own modules, not a suggestion for another architecture
    assert message == (
        "cannot find the attention query/value projections of model type 'home-made'; "
        "set target_modules to some of its linear layers: classifier, proj_in, proj_out"
    )
