"""Accuracy and mean cross-entropy of a model on an encoded split (and perplexity, for
causal-LM data).

Evaluation costs forward passes only: no gradients are recorded (``torch.no_grad``), a
decoder keeps no key-value cache, and the batches are as large as memory allows rather
than the training batch: rows are taken longest first and a batch holds at most
``batch_size x`` (the split's longest row) tokens, so short rows travel in larger batches
with little padding (a batch never holds more tokens than ``batch_size`` rows of the
longest row would). On a device that runs out of memory the budget halves and the batch
is retried. A split that carries a frozen-prefix cache (:mod:`fedlora.models.prefix`) runs
the blocks above it only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

from fedlora.data import Encoded
from fedlora.data.causal import IGNORE_INDEX, CausalEncoded
from fedlora.models.device import autocast, model_device, to_device
from fedlora.models.prefix import feed

# Logits held at once while scoring a causal-LM batch (batch x length x vocabulary).
_LOGITS_BUDGET = 2**25


def evaluate_split(
    model: torch.nn.Module, data: Encoded, *, batch_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """``accuracy`` and ``loss`` on any split, plus ``perplexity`` on causal-LM data."""
    if isinstance(data, CausalEncoded):
        return evaluate_causal(model, data, batch_size=batch_size, precision=precision)
    accuracy, loss = evaluate(model, data, batch_size=batch_size, precision=precision)
    return {"accuracy": accuracy, "loss": loss}


def eval_batches(lengths: torch.Tensor, *, budget: int) -> list[torch.Tensor]:
    """Row indices in batches, longest rows first, each batch at most ``budget`` padded
    tokens (rows x its longest row) and one row at least."""
    order = torch.argsort(lengths, descending=True, stable=True)
    batches, i = [], 0
    while i < len(order):
        width = max(1, int(lengths[order[i]]))
        batches.append(order[i : i + max(1, budget // width)])
        i += len(batches[-1])
    return batches


def _over_batches(
    data: Encoded,
    *,
    batch_size: int,
    max_tokens: int | None,
    score: Callable[[torch.Tensor], tuple[float, ...]],
) -> list[float]:
    """Sum of ``score(rows)`` over the split in :func:`eval_batches` of ``batch_size x``
    the longest row (at most ``max_tokens``); when the device runs out of memory the
    budget halves and the rows not yet scored are batched again."""
    lengths = data.attention_mask.sum(dim=1)
    budget = batch_size * max(1, int(lengths.max()))
    if max_tokens is not None:
        budget = min(budget, max_tokens)
    pending = deque(eval_batches(lengths, budget=budget))
    totals: list[float] = []
    while pending:
        rows = pending.popleft()
        try:
            part = score(rows)
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            budget = max(1, budget // 2)
            rest = torch.cat([rows, *pending])
            pending = deque(rest[b] for b in eval_batches(lengths[rest], budget=budget))
            continue
        totals = [a + b for a, b in zip(totals, part, strict=True)] if totals else list(part)
    return totals


@torch.no_grad()
def evaluate_causal(
    model: torch.nn.Module, data: CausalEncoded, *, batch_size: int, precision: str = "fp32"
) -> dict[str, float]:
    """Response-token loss, perplexity and accuracy of a causal LM.

    ``loss`` = mean negative log-likelihood over all response tokens of the split
    (``-1/N sum_t log p(x_t | x_<t)``), ``perplexity = exp(loss)``. ``accuracy`` is, for
    verbalised classification data, the share of examples whose label word's first token
    has the highest next-token logit among the label words after the prompt; otherwise
    the share of response tokens that are the argmax next token (teacher forcing).
    """
    n = len(data)
    nan = float("nan")
    if n == 0:
        return {"accuracy": nan, "loss": nan, "perplexity": nan}
    model.eval()
    device = model_device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 2**16)

    def score(idx: torch.Tensor) -> tuple[float, ...]:
        batch = to_device(data.batch(idx), device)
        with autocast(precision, device), feed(model, data, idx):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).logits.float()
        # position t predicts token t + 1
        pred, target = logits[:, :-1], batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(pred[keep], target[keep], reduction="sum").item()
        hits = int((pred[keep].argmax(-1) == target[keep]).sum())
        correct = 0
        if data.class_labels is not None and data.choice_ids is not None:
            at = logits[torch.arange(len(idx), device=device), data.answer_pos[idx].to(device)]
            chosen = at[:, data.choice_ids.to(device)].argmax(-1)
            correct = int((chosen == data.class_labels[idx].to(device)).sum())
        return nll, int(keep.sum()), hits, correct

    nll, tokens, hits, correct = _over_batches(
        data, batch_size=batch_size, max_tokens=_LOGITS_BUDGET // vocab, score=score
    )
    loss = nll / tokens if tokens else nan
    accuracy = correct / n if data.class_labels is not None else (hits / tokens if tokens else nan)
    return {"accuracy": accuracy, "loss": loss, "perplexity": math.exp(loss)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Encoded, *, batch_size: int, precision: str = "fp32"
) -> tuple[float, float]:
    """(accuracy, mean loss) over ``data``; (nan, nan) for an empty split."""
    if isinstance(data, CausalEncoded):
        metrics = evaluate_causal(model, data, batch_size=batch_size, precision=precision)
        return metrics["accuracy"], metrics["loss"]
    n = len(data)
    if n == 0:
        return float("nan"), float("nan")
    model.eval()
    device = model_device(model)

    def score(idx: torch.Tensor) -> tuple[float, ...]:
        batch = to_device(data.batch(idx), device)
        labels = batch.pop("labels")
        with autocast(precision, device), feed(model, data, idx):
            logits = model(**batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        return loss, int((logits.argmax(-1) == labels).sum())

    loss_sum, correct = _over_batches(data, batch_size=batch_size, max_tokens=None, score=score)
    return correct / n, loss_sum / n
