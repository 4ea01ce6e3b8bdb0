"""The frozen-prefix cache (``prefix_cache``): a cached run equals an uncached run of the same
model with dropout off in the cached blocks (float32, 1e-5), in training and evaluation,
for a tiny BERT-family classifier and a tiny Llama-family decoder; ``auto`` falls back where
it cannot cache and ``on`` is a one-line error there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.client import LocalTraining, evaluate_split, train_client
from fedlora.data import Encoded
from fedlora.data.causal import IGNORE_INDEX, CausalEncoded
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, RoundPlan
from fedlora.models import LoRASettings, PeftAdapter, attach_lora
from fedlora.models.prefix import FrozenPrefix, plan_prefix_cache

VOCAB, HIDDEN, BLOCKS = 100, 32, 3


def _classifier(model_type: str, layers: list[int] | None, dropout: float = 0.1) -> PeftAdapter:
    """A 3-block BERT or RoBERTa classifier with dropout everywhere, LoRA on ``layers``."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    config_cls, model_cls = {
        "bert": (BertConfig, BertForSequenceClassification),
        "roberta": (RobertaConfig, RobertaForSequenceClassification),
    }[model_type]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=3,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    lora = LoRASettings(
        rank=4, alpha=8, dropout=0.1, layers=layers, target_modules=["query", "value"]
    )
    return PeftAdapter(attach_lora(model_cls(config), lora, seed=0))


def _decoder(model_type: str, layers: list[int] | None, dropout: float = 0.1) -> PeftAdapter:
    """A 3-block Llama or Mistral decoder with attention dropout, LoRA on ``layers``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[model_type]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    lora = LoRASettings(
        rank=4, alpha=8, dropout=0.1, layers=layers, target_modules=["q_proj", "v_proj"]
    )
    return PeftAdapter(attach_lora(model_cls(config), lora, seed=0, task_type="CAUSAL_LM"))


def _lengths(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 21, (n,), generator=torch.Generator().manual_seed(seed))


def _ids_and_mask(lengths: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(
        5, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed)
    )
    return torch.where(mask.bool(), ids, torch.ones_like(ids)), mask  # pad id 1


def _classification_data(n: int = 40, seed: int = 0) -> Encoded:
    lengths = _lengths(n, seed)
    ids, mask = _ids_and_mask(lengths, seed + 1)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 2))
    return Encoded(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=None)


def _causal_data(n: int = 40, seed: int = 0) -> CausalEncoded:
    lengths = _lengths(n, seed)
    ids, mask = _ids_and_mask(lengths, seed + 1)
    prompt = lengths // 2  # the second half of each row is its response
    positions = torch.arange(ids.shape[1])
    response = (positions >= prompt[:, None]) & mask.bool()
    labels = torch.where(response, ids, torch.full_like(ids, IGNORE_INDEX))
    return CausalEncoded(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        token_type_ids=None,
        answer_pos=prompt - 1,
    )


def _prefix_dropout_off(adapter: PeftAdapter, embeddings: str, blocks: str, start: int) -> None:
    """The reference model: dropout off in the embeddings and blocks 0..start-1, set here
    independently of fedlora.models.prefix."""
    body = adapter.model.get_base_model().base_model
    parts = [body.get_submodule(embeddings), *body.get_submodule(blocks)[:start]]
    for part in parts:
        for module in part.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0


def _train(adapter: PeftAdapter, data: Encoded, *, steps: int = 4) -> tuple[AdapterState, float]:
    plan = RoundPlan(round=1, method="fedavg", trained="AB", train_head=True)
    settings = LocalTraining(local_steps=steps, batch_size=8, lr=0.05)
    update = train_client(
        adapter=adapter,
        state=adapter.get_state(),
        data=data,
        plan=plan,
        settings=settings,
        client_id=0,
        seed=3,
    )
    return adapter.get_state(), update.train_loss


def _assert_states_close(a: AdapterState, b: AdapterState) -> None:
    for name in a.A:
        torch.testing.assert_close(a.A[name], b.A[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.B[name], b.B[name], rtol=1e-5, atol=1e-5)
    for name in a.head:
        torch.testing.assert_close(a.head[name], b.head[name], rtol=1e-5, atol=1e-5)


def _max_change(a: AdapterState, b: AdapterState) -> float:
    return max(float((a.B[k] - b.B[k]).abs().max()) for k in a.B)


CASES = [
    ("bert", _classifier, _classification_data, "embeddings", "encoder.layer"),
    ("roberta", _classifier, _classification_data, "embeddings", "encoder.layer"),
    ("llama", _decoder, _causal_data, "embed_tokens", "layers"),
    ("mistral", _decoder, _causal_data, "embed_tokens", "layers"),
]


@pytest.mark.parametrize(("model_type", "build", "make_data", "embeddings", "blocks"), CASES)
@pytest.mark.parametrize("start", [1, 2])
def test_cached_run_equals_uncached_run_with_prefix_dropout_off(
    model_type, build, make_data, embeddings, blocks, start
):
    layers = list(range(start, BLOCKS))
    data = make_data()
    held = make_data(n=16, seed=7)

    reference = build(model_type, layers)
    _prefix_dropout_off(reference, embeddings, blocks, start)
    before = reference.get_state()
    ref_state, ref_loss = _train(reference, data)
    ref_eval = evaluate_split(reference.model, held, batch_size=4)

    cached = build(model_type, layers)
    logged: list[str] = []
    prefix = plan_prefix_cache(cached, mode="on", log=logged.append)
    assert isinstance(prefix, FrozenPrefix) and prefix.start == start
    assert "dropout" in logged[0]
    train_data, held_data = prefix.attach(data), prefix.attach(held)
    state, loss = _train(cached, train_data)
    metrics = evaluate_split(cached.model, held_data, batch_size=4)

    assert _max_change(ref_state, before) > 1e-3  # it trained: equality is not trivial
    _assert_states_close(state, ref_state)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for key, value in ref_eval.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert held_data.prefix is not None and held_data.prefix.held == len(held)
    assert train_data.prefix is not None and 0 < train_data.prefix.held <= 4 * 8


def test_prefix_dropout_matters_so_the_comparison_can_fail():
    """With dropout left on below block 1, an uncached run differs from the cached one."""
    data = _classification_data()
    uncached = _classifier("bert", [1, 2], dropout=0.3)
    cached = _classifier("bert", [1, 2], dropout=0.3)
    prefix = plan_prefix_cache(cached, mode="on", log=lambda m: None)
    assert prefix is not None
    a, _ = _train(uncached, data)
    b, _ = _train(cached, prefix.attach(data))
    assert max(float((a.B[k] - b.B[k]).abs().max()) for k in a.B) > 1e-4


def test_held_states_are_the_hidden_states_entering_block_start():
    """Independent reference: transformers' own ``output_hidden_states`` (entry ``L0`` is
    the input of block ``L0``), one example at a time, dropout off (eval mode)."""
    adapter = _classifier("bert", [2])
    prefix = plan_prefix_cache(adapter, mode="auto", log=lambda m: None)
    assert prefix is not None and prefix.start == 2
    data = prefix.attach(_classification_data(n=12))
    states = data.prefix
    assert states is not None
    rows = torch.tensor([3, 0, 7])
    got = states.gather(data, rows)
    adapter.model.eval()
    body = adapter.model.get_base_model().base_model
    for j, i in enumerate(rows.tolist()):
        n = int(data.attention_mask[i].sum())
        with torch.no_grad():
            out = body(
                input_ids=data.input_ids[i : i + 1, :n],
                attention_mask=data.attention_mask[i : i + 1, :n],
                output_hidden_states=True,
            )
        torch.testing.assert_close(got[j, :n], out.hidden_states[2][0], rtol=1e-5, atol=1e-5)
        assert not got[j, n:].any()  # padding is not stored
    assert states.held == 3


def test_memory_mapped_states_give_the_same_run(tmp_path: Path):
    data, held = _causal_data(), _causal_data(n=16, seed=7)
    in_memory = _decoder("llama", [1, 2])
    prefix = plan_prefix_cache(in_memory, mode="on", log=lambda m: None)
    assert prefix is not None
    state, _ = _train(in_memory, prefix.attach(data))
    metrics = evaluate_split(in_memory.model, prefix.attach(held), batch_size=4)

    mapped = _decoder("llama", [1, 2])
    logged: list[str] = []
    spilled = plan_prefix_cache(mapped, mode="on", log=logged.append, budget_bytes=0)
    assert spilled is not None
    train_data = spilled.attach(data)
    state_mapped, _ = _train(mapped, train_data)
    metrics_mapped = evaluate_split(mapped.model, spilled.attach(held), batch_size=4)
    assert any("memory-mapped" in line for line in logged)
    assert train_data.prefix is not None and train_data.prefix.storage is not None
    assert train_data.prefix.storage.device.type == "cpu" and spilled.used == 0
    _assert_states_close(state_mapped, state)
    assert metrics_mapped == pytest.approx(metrics, rel=1e-6)


def test_a_changed_prefix_weight_empties_the_cache():
    adapter = _classifier("bert", [1, 2], dropout=0.0)
    prefix = plan_prefix_cache(adapter, mode="on", log=lambda m: None)
    assert prefix is not None
    data = prefix.attach(_classification_data(n=8))
    assert data.prefix is not None
    rows = torch.arange(8)
    before = data.prefix.gather(data, rows).clone()
    with torch.no_grad():
        prefix.embeddings.word_embeddings.weight.mul_(2.0)
    after = data.prefix.gather(data, rows)
    assert (after - before).abs().max() > 1e-3
    fresh = plan_prefix_cache(adapter, mode="on", log=lambda m: None)
    assert fresh is not None
    again = fresh.attach(data)
    assert again.prefix is not None
    torch.testing.assert_close(after, again.prefix.gather(again, rows))


def test_auto_is_off_when_block_0_has_lora_and_on_is_an_error():
    adapter = _classifier("bert", None)  # LoRA on every block
    logged: list[str] = []
    assert plan_prefix_cache(adapter, mode="auto", log=logged.append) is None
    assert logged == [
        "prefix cache: off (LoRA starts in block 0 (or the embeddings), so no block below it is frozen)"
    ]
    with pytest.raises(FedLoraError, match="prefix_cache=on: LoRA starts in block 0"):
        plan_prefix_cache(adapter, mode="on", log=logged.append)
    assert plan_prefix_cache(_classifier("bert", [1]), mode="off", log=logged.append) is None


def test_auto_falls_back_for_a_model_family_it_does_not_know():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2))
    lora = LoRASettings(rank=4, alpha=8, layers=[2], target_modules=["c_attn"])
    adapter = PeftAdapter(attach_lora(gpt2, lora, seed=0, task_type="CAUSAL_LM"))
    logged: list[str] = []
    assert plan_prefix_cache(adapter, mode="auto", log=logged.append) is None
    assert len(logged) == 1 and "model type 'gpt2' has no prefix adapter" in logged[0]
    with pytest.raises(FedLoraError, match="prefix_cache=on: model type 'gpt2'"):
        plan_prefix_cache(adapter, mode="on", log=logged.append)


def test_bad_prefix_cache_values_are_one_line_errors():
    from fedlora.config import load_config

    with pytest.raises(
        FedLoraError, match="config key 'prefix_cache' must be one of auto, on, off"
    ):
        load_config(None, ["prefix_cache=maybe"])
    with pytest.raises(FedLoraError, match="prefix_cache=on needs LoRA above block 0"):
        load_config(None, ["prefix_cache=on"])
    with pytest.raises(FedLoraError, match="prefix_cache=on needs LoRA above block 0"):
        load_config(None, ["prefix_cache=on", "layers=[0,3]"])
    assert load_config(None, ["prefix_cache=on", "layers=[3,4,5]"]).prefix_cache == "on"
    with pytest.raises(FedLoraError, match="'prefix_cache' must be one of"):
        plan_prefix_cache(_classifier("bert", [1]), mode="yes", log=lambda m: None)


def test_federation_splits_carry_the_cache(no_dropout_bert_dir: Path, tmp_path: Path):
    """build_federation wires it: with no dropout anywhere, a cached federation trains and
    evaluates exactly like an uncached one (every split, the pooled one too)."""
    from fedlora.config import load_config
    from fedlora.federation import build_federation

    overrides = [
        f"model={no_dropout_bert_dir}",
        "dataset=bbc-news",
        "max_train_examples=60",
        "max_test_examples=12",
        "max_length=24",
        "num_clients=2",
        "partition=iid",
        "layers=[1]",
        "rank=4",
        "device=cpu",
    ]
    logged: list[str] = []
    cached = build_federation(
        load_config(None, [*overrides, "prefix_cache=auto"]), log=logged.append
    )
    plain = build_federation(
        load_config(None, [*overrides, "prefix_cache=off"]), log=lambda m: None
    )
    assert cached.prefix is not None and plain.prefix is None
    assert any(line.startswith("prefix cache: on") for line in logged)
    for fed in (cached, plain):
        assert (fed.test.prefix is not None) == (fed is cached)
        assert (fed.pooled_train.prefix is not None) == (fed is cached)
    results = []
    for fed in (cached, plain):
        state, loss = _train(fed.adapter, fed.encoded[1].train, steps=3)
        results.append((state, loss, evaluate_split(fed.adapter.model, fed.test, batch_size=5)))
    _assert_states_close(results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    assert results[0][2] == pytest.approx(results[1][2], rel=1e-5)
