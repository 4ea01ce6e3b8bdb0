"""Causal-LM data: response-only labels, prompt formats, verbaliser accuracy, perplexity."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fedlora.client import evaluate_causal
from fedlora.data import TextExamples
from fedlora.data.causal import (
    IGNORE_INDEX,
    encode_causal,
    is_causal_source,
    load_causal_dataset,
)
from fedlora.errors import FedLoraError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_response_only_labels_plain_prompt(tok):
    ex = TextExamples(text=["Name a sport."], labels=[0], text_pair=["football"])
    enc = encode_causal(tok, ex, max_length=64, chat_template=False)
    prompt = ids(tok, "### Instruction:\nName a sport.\n\n### Response:\n")
    response = ids(tok, "football") + [tok.eos_token_id]
    assert enc.input_ids[0].tolist() == prompt + response
    assert enc.labels[0].tolist() == [IGNORE_INDEX] * len(prompt) + response
    assert enc.attention_mask[0].tolist() == [1] * (len(prompt) + len(response))
    assert int(enc.answer_pos[0]) == len(prompt) - 1


def test_response_only_labels_chat_template(tok):
    ex = TextExamples(text=["Hi", "Name a sport."], labels=[0, 0], text_pair=["Hello", "football"])
    enc = encode_causal(tok, ex, max_length=64, chat_template=True)
    # the tests' template: <|user|>{content}</s> then <|assistant|>{answer}</s>
    prompt = ids(tok, "<|user|>Name a sport.</s><|assistant|>")
    response = ids(tok, "football</s>")
    row = enc.input_ids[1][enc.attention_mask[1].bool()].tolist()
    assert row == prompt + response
    labels = enc.labels[1].tolist()
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) : len(row)] == response
    # the shorter first row is right-padded, padding never labelled
    n0 = int(enc.attention_mask[0].sum())
    assert n0 < len(row) and set(enc.labels[0, n0:].tolist()) == {IGNORE_INDEX}
    assert tok.decode([t for t in enc.labels[0].tolist() if t != IGNORE_INDEX]) == "Hello</s>"
    # batches trim the all-padding columns, labels included
    batch = enc.batch(torch.tensor([0]))
    assert batch["labels"].shape == (1, n0)


def test_long_prompt_loses_its_middle(tok):
    article = " ".join(["word"] * 200)
    ex = TextExamples(text=[f"Topic?\n\n{article}"], labels=[0], text_pair=["sport"])
    enc = encode_causal(tok, ex, max_length=32, chat_template=False)
    row = enc.input_ids[0].tolist()
    assert len(row) == 32
    response = ids(tok, "sport") + [tok.eos_token_id]
    assert row[-len(response) :] == response  # the whole short response survives
    full_prompt = ids(tok, f"### Instruction:\nTopic?\n\n{article}\n\n### Response:\n")
    kept = 32 - len(response)
    tail = min(16, kept // 2)  # the end of the prompt (its turn marker) is kept
    assert row[:kept] == full_prompt[: kept - tail] + full_prompt[-tail:]


def test_plain_text_documents_are_all_response(tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first document here\n\nsecond one\n\n\nthird")
    assert is_causal_source(str(path))
    data = load_causal_dataset(str(path), test_fraction=0.34)
    assert len(data.train) + len(data.test) == 3 and set(data.train.text) == {""}
    enc = encode_causal(tok, data.train, max_length=64)
    for i in range(len(enc)):
        n = int(enc.attention_mask[i].sum())
        assert enc.labels[i, :n].tolist() == enc.input_ids[i, :n].tolist()


def test_instruction_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"instruction": f"Q{i}", "input": "ctx" if i % 2 else "", "output": f"A{i}"}
        for i in range(5)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert is_causal_source(str(path))
    data = load_causal_dataset(str(path), test_fraction=0.2, seed=1)
    every = {
        u: r
        for split in (data.train, data.test)
        for u, r in zip(split.text, split.text_pair, strict=True)
    }
    assert every["Q1\n\nctx"] == "A1" and every["Q2"] == "A2" and len(every) == 5
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"q": 1}))
    with pytest.raises(
        FedLoraError,
        match=rf"^{re.escape(str(path))}, line 2: needs the fields instruction and output$",
    ):
        load_causal_dataset(str(path))
    classification = tmp_path / "c.jsonl"
    classification.write_text(json.dumps({"text": "a", "label": 1}))
    assert not is_causal_source(str(classification))


def _hand_scores(model, tok, users, words):
    """Each example alone (no padding, no batching): the next-token logits after the
    prompt at the first token of each word's response."""
    firsts = [ids(tok, w)[0] for w in words]
    chosen = []
    for user in users:
        prompt = tok(f"### Instruction:\n{user}\n\n### Response:\n")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        chosen.append(int(torch.argmax(logits[firsts])))
    return chosen


def test_verbaliser_accuracy_equals_hand_computation(llama, tok):
    words = ["business", "sport", "tech"]
    texts = [
        "Shares fell sharply",
        "The striker scored twice",
        "A new phone",
        "Rates rose",
        "Cup final tonight",
        "Chips get faster",
        "Profits up",
        "A long long story",
    ]
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    ex = TextExamples(text=texts, labels=labels)
    enc = encode_causal(tok, ex, max_length=128, chat_template=False, verbalizer=words)
    users = [f"{t}\nAnswer with one of: business, sport, tech." for t in texts]
    assert int(enc.attention_mask.sum(1).max()) < 128  # nothing was cut
    chosen = _hand_scores(llama, tok, users, words)
    expected = sum(c == y for c, y in zip(chosen, labels, strict=True)) / len(labels)
    got = evaluate_causal(llama, enc, batch_size=3)["accuracy"]
    assert got == pytest.approx(expected)
    # and the labels really matter: flipping them changes the accuracy the same way
    flipped = TextExamples(text=texts, labels=chosen)
    enc_f = encode_causal(tok, flipped, max_length=128, chat_template=False, verbalizer=words)
    assert evaluate_causal(llama, enc_f, batch_size=3)["accuracy"] == 1.0


def test_verbaliser_words_need_distinct_first_tokens(tok):
    ex = TextExamples(text=["x"], labels=[0])
    with pytest.raises(
        FedLoraError,
        match=r"^verbalizer words \['same', 'same'\] must start with different tokens ",
    ):
        encode_causal(tok, ex, max_length=16, chat_template=False, verbalizer=["same", "same"])


def test_perplexity_equals_exp_mean_response_nll(llama, tok):
    users = ["Name a sport.", "What is the topic?\n\nShares fell in London.", "Say hi"]
    answers = ["football", "business", "hello there, how are you"]
    ex = TextExamples(text=users, labels=[0, 0, 0], text_pair=answers)
    enc = encode_causal(tok, ex, max_length=64, chat_template=True)
    nll, count = 0.0, 0
    for user, answer in zip(users, answers, strict=True):
        prompt = ids(tok, f"<|user|>{user}</s><|assistant|>")
        response = ids(tok, f"{answer}</s>")
        seq = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(llama(input_ids=seq).logits[0].double(), dim=-1)
        for j, token in enumerate(response):
            nll -= float(logp[len(prompt) + j - 1, token])
            count += 1
    metrics = evaluate_causal(llama, enc, batch_size=2)
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the model's own training loss on one batch is the same mean over response tokens
    with torch.no_grad():
        loss = llama(**enc.batch(torch.arange(3))).loss
    assert float(loss) == pytest.approx(nll / count, rel=1e-4)
