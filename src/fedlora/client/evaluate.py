"""Accuracy and mean cross-entropy of a model on an encoded split."""

from __future__ import annotations

import torch

from fedlora.data import Encoded


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, *, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean loss) over ``data``; (nan, nan) for an empty split."""
    n = len(data)
    if n == 0:
        return float("nan"), float("nan")
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, n)))
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / n, loss_sum / n
