"""Accuracy and mean cross-entropy of a model on an encoded split (and perplexity, for
causal-LM data)."""

from __future__ import annotations

import math

import torch

from fedlora.data import Encoded
from fedlora.data.causal import IGNORE_INDEX, CausalEncoded
from fedlora.models.device import autocast, model_device, to_device

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
    nll, tokens, hits, correct = 0.0, 0, 0, 0
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", None) or 2**16)
    width = int(data.attention_mask.sum(dim=1).max())
    step = max(1, min(batch_size, _LOGITS_BUDGET // max(1, width * vocab)))
    for start in range(0, n, step):
        idx = torch.arange(start, min(start + step, n))
        batch = to_device(data.batch(idx), device)
        with autocast(precision, device):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        # position t predicts token t + 1
        pred, target = logits[:, :-1], batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        nll += torch.nn.functional.cross_entropy(pred[keep], target[keep], reduction="sum").item()
        tokens += int(keep.sum())
        hits += int((pred[keep].argmax(-1) == target[keep]).sum())
        if data.class_labels is not None and data.choice_ids is not None:
            at = logits[torch.arange(len(idx), device=device), data.answer_pos[idx].to(device)]
            chosen = at[:, data.choice_ids.to(device)].argmax(-1)
            correct += int((chosen == data.class_labels[idx].to(device)).sum())
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
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        batch = to_device(data.batch(torch.arange(start, min(start + batch_size, n))), device)
        labels = batch["labels"]
        with autocast(precision, device):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / n, loss_sum / n
