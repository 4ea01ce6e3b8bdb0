"""The rows of ``metrics.jsonl``, built the same way by every runtime.

A round's row starts with what the server knows after aggregation (:func:`round_row`),
then gains the evaluation (``accuracy``, ``loss``, ``client_accuracy``, or ``None`` on
rounds that are not evaluated; stateful clients add their personalised accuracies,
:func:`personal_row`) and the timings. Round 0 (:func:`start_row`) evaluates
the starting model before any training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.messages import ClientUpdate, RoundPlan
from fedlora.methods import Aggregate


def eval_due(round: int, *, every: int, rounds: int) -> bool:
    """Round 0, every ``every``-th round and the last round are evaluated."""
    return round == 0 or round % every == 0 or round == rounds


def start_row(method: str) -> dict[str, Any]:
    return {
        "round": 0,
        "method": method,
        "trained": "",
        "clients": [],
        "upload_bytes": 0,
        "download_bytes": 0,
    }


def round_row(
    *,
    plan: RoundPlan,
    clients: Sequence[int],
    updates: Sequence[ClientUpdate],
    download_bytes: int,
    result: Aggregate,
    errors: Mapping[str, float],
    drift: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """What a round did: who trained what, the steps taken, the bytes moved, the
    aggregation error ``errors`` (per layer, :func:`fedlora.methods.base.update_error`),
    the clients' drift (per layer, :func:`fedlora.methods.base.update_drift`; both from
    :func:`~fedlora.methods.base.update_measures`) and any
    diagnostics of the method's own, each under its own name."""
    row: dict[str, Any] = {
        "round": plan.round,
        "method": plan.method,
        "trained": plan.trained + ("+head" if plan.train_head else ""),
        "clients": list(clients),
        "train_loss": sum(u.train_loss for u in updates) / len(updates),
        "local_steps": {u.client_id: u.steps for u in updates},
        "upload_bytes": sum(u.nbytes() for u in updates),
        "download_bytes": download_bytes,
    }
    if errors:
        row["agg_error"] = _summary(errors)
        undefined = sorted(layer for layer, e in errors.items() if math.isinf(e))
        if undefined:
            # inf is written as null: say why, so a null is never mistaken for "no error"
            row["agg_error"]["undefined"] = (
                "the clients' mean update is zero but the aggregate is not, in layers "
                + ", ".join(undefined)
            )
    if drift:
        # inf (increments that cancel to a zero mean) is written as null, like agg_error's
        row["client_drift"] = _summary(drift)
    for name, values in result.diagnostics.items():
        row[name] = _summary(values)
    return row


def personal_row(
    scores: Mapping[int, Mapping[str, float]], sizes: Mapping[int, int]
) -> dict[str, Any]:
    """Stateful clients' own models on their own eval splits (FedSA-LoRA): each client's
    accuracy (``client_personal_accuracy``) and their mean weighted by eval-split size
    (``personal_accuracy``, the accuracy over all clients' eval examples together; None
    when no client has any)."""
    per_client = {cid: scores[cid]["accuracy"] for cid in sorted(scores)}
    counted = {cid: sizes[cid] for cid in per_client if sizes.get(cid)}
    total = sum(counted.values())
    mean = sum(per_client[c] * n for c, n in counted.items()) / total if total else None
    return {"client_personal_accuracy": per_client, "personal_accuracy": mean}


def _summary(values: Mapping[str, float]) -> dict[str, Any]:
    per_layer = dict(values)
    return {
        "mean": sum(per_layer.values()) / len(per_layer),
        "max": max(per_layer.values()),
        "layers": per_layer,
    }


def progress_line(tag: str, row: Mapping[str, Any], *, rounds: int) -> str:
    """The one line per round printed while a run goes."""
    t = row["round"]
    if t == 0:
        return f"{tag} round 0/{rounds}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
    acc = "accuracy -" if row["accuracy"] is None else f"accuracy {row['accuracy']:.4f}"
    trained = row["trained"].removesuffix("+head")
    failed = f"  {len(row['failures'])} failed" if row.get("failures") else ""
    return (
        f"{tag} round {t}/{rounds} trained {trained:<2} {acc}  "
        f"train loss {row['train_loss']:.4f}  up {row['upload_bytes'] / 1e6:.3f} MB  "
        f"{row['elapsed_s']:.0f}s{failed}"
    )
