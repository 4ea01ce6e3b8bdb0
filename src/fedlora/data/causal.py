"""Causal-LM data: instruction JSONL and plain text, prompts, response-only labels.

Examples stay :class:`TextExamples` so that splitting and partitioning keep their one
code path: ``text`` is the user's turn (the instruction, then the optional input),
``text_pair`` is the response the model learns, and every label is 0. Plain text has an
empty prompt, so the whole document is the "response". Classification data sets (BBC
News, GLUE, ...) are turned into prompts whose response is the label's word (the
*verbaliser*) by :func:`encode_causal`.

Tokens get label ``-100`` (ignored by the loss) outside the response: the loss and the
perplexity are over response tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.data.encode import Encoded, pad_token_id
from fedlora.data.sources import TextDataset, TextExamples, read_text
from fedlora.errors import FedLoraError

IGNORE_INDEX = -100  # the label HF's causal-LM loss (and ours) skips
RESPONSE_LABEL = "text"  # the one "class" of generative data, for the partition code
PROMPT_TAIL = 16  # prompt tokens kept at its end when a long prompt is cut (the turn marker)


def is_causal_source(name: str, data_dir: str | None = None, *, encoding: str = "utf-8") -> bool:
    """Whether ``name`` is generative data: a ``.txt`` file, a folder of ``.txt`` files,
    or a JSONL file whose records have ``instruction`` and ``output``.

    Only the first line is read, and undecodable bytes are replaced there: this only
    sniffs the format, and the loader that follows reports a wrong ``encoding``.
    """
    path = Path(data_dir, name) if data_dir and not Path(name).exists() else Path(name)
    if path.is_dir():
        return any(path.rglob("*.txt"))
    if path.suffix == ".txt":
        return True
    if path.suffix in (".jsonl", ".json") and path.is_file():
        try:
            with path.open(encoding=encoding, errors="replace") as f:
                first = next((line for line in f if line.strip()), "")
        except LookupError:
            return False  # not a codec: the loader that follows says so
        try:
            record = json.loads(first.lstrip("\ufeff"))  # as read_text, ignore a UTF-8 BOM
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and {"instruction", "output"} <= set(record)
    return False


def load_causal_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    encoding: str = "utf-8",
) -> TextDataset:
    """Instruction JSONL (``instruction``, optional ``input``, ``output``) or plain text
    (a ``.txt`` file with documents separated by blank lines, or a folder of ``.txt``
    files, one document each), split at random into train and eval by ``seed``.

    Every file is decoded with ``encoding``; a byte it cannot decode stops the run with
    the file, offset and key to set, rather than training on replacement characters."""
    path = Path(data_dir, name) if data_dir and not Path(name).exists() else Path(name)
    if not path.exists():
        raise FedLoraError(f"data file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        examples = _read_jsonl(path, encoding)
    else:
        examples = _read_text(path, encoding)
    if len(examples) < 2:
        raise FedLoraError(f"{path}: need at least 2 examples, found {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    n_test = min(len(examples) - 1, max(1, round(test_fraction * len(examples))))
    test, train = examples.select(order[:n_test]), examples.select(order[n_test:])
    if max_train_examples is not None:
        train = train.select(range(min(max_train_examples, len(train))))
    if max_test_examples is not None:
        test = test.select(range(min(max_test_examples, len(test))))
    return TextDataset(name=path.stem, label_names=[RESPONSE_LABEL], train=train, test=test)


def _read_jsonl(path: Path, encoding: str) -> TextExamples:
    users, responses = [], []
    for number, line in enumerate(read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise FedLoraError(f"{path}, line {number}: not valid JSON") from None
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise FedLoraError(f"{path}, line {number}: needs the fields instruction and output")
        extra = str(record.get("input") or "").strip()
        users.append(str(record["instruction"]).strip() + (f"\n\n{extra}" if extra else ""))
        responses.append(str(record["output"]).strip())
    return TextExamples(text=users, labels=[0] * len(users), text_pair=responses)


def _read_text(path: Path, encoding: str) -> TextExamples:
    def decoded(file: Path) -> str:
        # read_text keeps the file's line ends; documents are split on blank lines in any.
        return read_text(file, encoding).replace("\r\n", "\n").replace("\r", "\n")

    if path.is_dir():
        docs = [decoded(p).strip() for p in sorted(path.rglob("*.txt"))]
    else:
        docs = [d.strip() for d in decoded(path).split("\n\n")]
    docs = [d for d in docs if d]
    return TextExamples(text=[""] * len(docs), labels=[0] * len(docs), text_pair=docs)


# ---------------------------------------------------------------- prompts


def verbalize(examples: TextExamples, words: Sequence[str]) -> TextExamples:
    """Classification examples as prompts whose response is the label's word."""
    choices = ", ".join(words)
    pairs: list[str | None] = (
        list(examples.text_pair) if examples.text_pair else [None] * len(examples)
    )
    users = [
        (t if p is None else f"{t}\n{p}") + f"\nAnswer with one of: {choices}."
        for t, p in zip(examples.text, pairs, strict=True)
    ]
    return TextExamples(
        text=users, labels=list(examples.labels), text_pair=[words[y] for y in examples.labels]
    )


def format_turns(tokenizer: Any, user: str, response: str, *, chat: bool) -> tuple[str, str]:
    """(prompt, response) strings whose concatenation is the training text.

    With ``chat`` the tokenizer's chat template renders a user turn and an assistant turn;
    the response string is what the template adds after the generation prompt (the
    answer and its end-of-turn marker). Without it an Alpaca-style layout is used and the
    caller appends eos. An empty ``user`` (plain text) has no prompt at all.
    """
    if not user:
        return "", response
    if chat:
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, response
    return f"### Instruction:\n{user}\n\n### Response:\n", response


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class CausalEncoded(Encoded):
    """An :class:`Encoded` split for causal LMs: ``labels`` are per token, ``-100`` outside
    the response. For verbalised classification data, ``class_labels`` and ``choice_ids``
    (the first token of each label word) score the label words at ``answer_pos`` (the
    last prompt token, whose logits predict the response's first token)."""

    answer_pos: torch.Tensor
    class_labels: torch.Tensor | None = None
    choice_ids: torch.Tensor | None = None

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model keyword arguments (with token ``labels``), cut to the batch's longest row."""
        mask = self.attention_mask[indices]
        width = max(1, int(mask.sum(dim=1).max())) if len(mask) else 1
        return {
            "input_ids": self.input_ids[indices, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[indices, :width],
        }


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a pair to ``max_length`` tokens, keeping at least ``min(len(response),
    max_length // 2)`` response tokens. A long prompt loses tokens from its middle: its
    start (instruction) and its last ``PROMPT_TAIL`` tokens (the turn marker) stay."""
    room = max_length - min(len(response), max(1, max_length // 2))
    if len(prompt) > room:
        tail = min(PROMPT_TAIL, room // 2)
        prompt = prompt[: room - tail] + (prompt[-tail:] if tail else [])
    return prompt, response[: max_length - len(prompt)]


def encode_causal(
    tokenizer: Any,
    examples: TextExamples,
    *,
    max_length: int,
    chat_template: bool = True,
    verbalizer: Sequence[str] | None = None,
) -> CausalEncoded:
    """Tokenise prompts and responses once; labels are the response tokens only.

    ``verbalizer`` (one word per label) marks ``examples`` as classification data. The
    chat template is used when ``chat_template`` is set and the tokenizer has one.
    """
    if max_length < 2:
        raise FedLoraError(f"max_length must be at least 2 for causal-lm, got {max_length}")
    chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
    eos = [] if chat or tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    source = verbalize(examples, verbalizer) if verbalizer is not None else examples
    responses_in = source.text_pair or [""] * len(source)
    turns = [
        format_turns(tokenizer, u, r, chat=chat)
        for u, r in zip(source.text, responses_in, strict=True)
    ]
    # A chat-rendered prompt carries its special tokens; a plain one gets the tokenizer's
    # own (e.g. Llama's BOS). Plain documents (empty prompt) start the response with them.
    prompt_ids = _tokenize(tokenizer, [p for p, _ in turns], special=not chat)
    plain_doc = [p == "" for p, _ in turns]
    response_ids = [
        ids + eos
        for ids in _tokenize(tokenizer, [r for _, r in turns], special=False, begin=plain_doc)
    ]
    rows = [_fit(p, r, max_length) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max((len(p) + len(r) for p, r in rows), default=1)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        labels[i, len(p) : n] = torch.tensor(r, dtype=torch.long)
        mask[i, :n] = 1
    answer_pos = torch.tensor([len(p) - 1 for p, _ in rows], dtype=torch.long)
    class_labels = choice_ids = None
    if verbalizer is not None:
        class_labels = torch.tensor(examples.labels, dtype=torch.long)
        choice_ids = _choice_ids(tokenizer, verbalizer, chat=chat)
    return CausalEncoded(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        token_type_ids=None,
        answer_pos=answer_pos,
        class_labels=class_labels,
        choice_ids=choice_ids,
    )


def _tokenize(
    tokenizer: Any, texts: list[str], *, special: bool, begin: list[bool] | None = None
) -> list[list[int]]:
    """Token ids of each text; ``begin[i]`` adds the special tokens to text ``i``."""
    if not texts:
        return []
    flags = begin if begin is not None else [special] * len(texts)
    out: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):
        idx = [i for i, f in enumerate(flags) if f == flag and texts[i]]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
            for i, row in zip(idx, ids, strict=True):
                out[i] = list(row)
    return out


def _choice_ids(tokenizer: Any, words: Sequence[str], *, chat: bool) -> torch.Tensor:
    """The first response token of each label word, tokenised exactly as in training."""
    firsts = []
    for word in words:
        _, response = format_turns(tokenizer, "x", word, chat=chat)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not ids:
            raise FedLoraError(f"verbalizer word {word!r} has no tokens")
        firsts.append(int(ids[0]))
    if len(set(firsts)) != len(firsts):
        raise FedLoraError(
            f"verbalizer words {list(words)} must start with different tokens "
            "(accuracy scores each word's first token); set verbalizer=[...]"
        )
    return torch.tensor(firsts, dtype=torch.long)
