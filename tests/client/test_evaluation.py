"""Evaluation that costs less than training: length-sorted batches under a token budget
(halved on out-of-memory), results equal to a one-example-at-a-time reference, and the
per-client eval subsample (``max_client_eval_examples``: seeded, bounded, 0 = none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.client import evaluate, evaluate_split
from fedlora.client.evaluate import eval_batches
from fedlora.config import load_config
from fedlora.data import Encoded, TextExamples, partition_clients
from fedlora.errors import FedLoraError
from fedlora.models import LoRASettings, PeftAdapter, attach_lora


def _model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    lora = LoRASettings(rank=4, alpha=8, target_modules=["query", "value"])
    model = PeftAdapter(attach_lora(BertForSequenceClassification(config), lora, seed=0)).model
    # B = 0 at PEFT's init: move it so that LoRA takes part in the outputs
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _data(n: int = 37, seed: int = 0) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (n,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(5, 100, (n, width), generator=g) * mask
    labels = torch.randint(0, 3, (n,), generator=g)
    return Encoded(input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=None)


def test_batches_are_longest_first_within_the_budget_and_cover_every_row_once():
    lengths = _data().attention_mask.sum(dim=1)
    budget = 4 * int(lengths.max())
    batches = eval_batches(lengths, budget=budget)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert lengths[rows].tolist() == sorted(lengths.tolist(), reverse=True)
    for batch in batches:
        assert len(batch) * int(lengths[batch].max()) <= budget
    assert len(batches) < len(lengths) / 4  # short rows share batches: fewer than 4 a batch
    assert [len(b) for b in eval_batches(torch.tensor([50, 3]), budget=10)] == [1, 1]


def test_evaluation_equals_one_example_at_a_time():
    """Reference: each example alone (no padding), cross-entropy and argmax by hand."""
    model, data = _model(), _data()
    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for i in range(len(data)):
            n = int(data.attention_mask[i].sum())
            logits = model(
                input_ids=data.input_ids[i : i + 1, :n],
                attention_mask=data.attention_mask[i : i + 1, :n],
            ).logits.double()
            label = int(data.labels[i])
            losses.append(float(torch.logsumexp(logits[0], 0) - logits[0, label]))
            hits.append(int(logits[0].argmax()) == label)
    accuracy, loss = evaluate(model, data, batch_size=4)
    assert accuracy == sum(hits) / len(hits)
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_out_of_memory_halves_the_batch_and_evaluates_every_row(monkeypatch):
    model, data = _model(), _data()
    expected = evaluate_split(model, data, batch_size=16)
    seen: list[int] = []
    forward = model.forward

    def small_memory(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        seen.append(rows)
        if rows > 3:
            raise torch.OutOfMemoryError("test: batch too large")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", small_memory)
    got = evaluate_split(model, data, batch_size=16)
    assert got == pytest.approx(expected, rel=1e-6)
    assert max(seen) > 3 and sum(r for r in seen if r <= 3) == len(data)


def _examples(n: int) -> TextExamples:
    return TextExamples(text=[f"row {i}" for i in range(n)], labels=[i % 3 for i in range(n)])


def test_client_eval_subsample_is_seeded_and_bounded_and_0_turns_it_off():
    data = _examples(3000)
    capped = partition_clients(data, num_clients=3, eval_fraction=0.1, max_eval_examples=40, seed=1)
    again = partition_clients(data, num_clients=3, eval_fraction=0.1, max_eval_examples=40, seed=1)
    other = partition_clients(data, num_clients=3, eval_fraction=0.1, max_eval_examples=40, seed=2)
    uncapped = partition_clients(data, num_clients=3, eval_fraction=0.1, seed=1)
    off = partition_clients(data, num_clients=3, eval_fraction=0.1, max_eval_examples=0, seed=1)
    assert [len(c.eval) for c in capped] == [40, 40, 40]
    assert [len(c.eval) for c in uncapped] == [100, 100, 100]  # eval_fraction alone
    assert [c.eval.text for c in capped] == [c.eval.text for c in again]
    assert [c.eval.text for c in capped] != [c.eval.text for c in other]
    assert [len(c.eval) for c in off] == [0, 0, 0]
    for cut, whole in ((capped, uncapped), (off, uncapped)):
        for a, b in zip(cut, whole, strict=True):  # what is not evaluated trains
            assert sorted(a.train.text + a.eval.text) == sorted(b.train.text + b.eval.text)


def test_max_client_eval_examples_accepts_0_and_refuses_negatives():
    assert load_config(None, ["max_client_eval_examples=0"]).max_client_eval_examples == 0
    assert load_config(None, ["max_client_eval_examples=null"]).max_client_eval_examples is None
    with pytest.raises(FedLoraError, match="'max_client_eval_examples' must be >= 0"):
        load_config(None, ["max_client_eval_examples=-1"])


def test_federation_reports_what_an_evaluation_covers(tiny_overrides):
    from fedlora.federation import build_federation
    from fedlora.log import silent

    fed = build_federation(
        load_config(None, [*tiny_overrides, "max_client_eval_examples=3"]), log=silent
    )
    assert fed.eval_counts() == {"eval_examples": 40, "client_eval_examples": {0: 3, 1: 3, 2: 3}}
    off = build_federation(
        load_config(None, [*tiny_overrides, "max_client_eval_examples=0"]), log=silent
    )
    assert off.eval_counts() == {"eval_examples": 40, "client_eval_examples": {}}
    assert all(len(s.eval) == 0 for s in off.encoded.values())


def test_rows_say_what_was_evaluated_on_how_many_examples(tiny_overrides, tmp_path: Path):
    from fedlora.cli import main

    assert main(["run", *tiny_overrides, "max_client_eval_examples=0", "method=fedavg"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").open()]
    for row in rows:
        assert row["eval_examples"] == 40
        assert row["client_eval_examples"] == {}
        assert not row.get("client_accuracy")  # no client was evaluated
