"""The server's half of a round, shared by every runtime: weigh the replies, aggregate,
fold what the method folds into the frozen weights, load the new global adapter, and build
the round's metrics row with the aggregation error.

The in-process loop and the Flower strategy differ only in how replies arrive; what the
server does with them is this one function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import Aggregate, LoRAMethod
from fedlora.methods.base import client_weights, update_error
from fedlora.models.adapter import PeftAdapter
from fedlora.runtime.rows import round_row


def apply_round(
    *,
    method: LoRAMethod,
    plan: RoundPlan,
    state: AdapterState,
    starts: Mapping[int, AdapterState],
    updates: Sequence[ClientUpdate],
    weighting: str,
    scaling: Mapping[str, float],
    adapter: PeftAdapter,
    base_total: dict[str, torch.Tensor],
    download_bytes: int,
    clients: Sequence[int] | None = None,
) -> tuple[Aggregate, dict[str, Any]]:
    """Aggregate ``updates`` (sorted by client) into the next global adapter.

    ``base_total`` (the sum of everything folded into the frozen weights so far) is updated
    in place; the model in ``adapter`` holds the new global adapter on return. Returns the
    method's :class:`~fedlora.methods.Aggregate` and the round's metrics row (without the
    evaluation and timings, which the runtime adds). ``clients``: who the row lists as
    having trained (default: the clients that replied).
    """
    weights = client_weights(updates, weighting, method)
    result = method.aggregate(
        plan=plan, state=state, updates=updates, weights=weights, scaling=scaling
    )
    for layer, delta in result.base_delta.items():
        adapter.add_to_base(layer, delta)
        total = base_total.get(layer)
        base_total[layer] = delta.clone() if total is None else total + delta
    adapter.set_state(result.state)
    row = round_row(
        plan=plan,
        clients=list(clients) if clients is not None else [u.client_id for u in updates],
        updates=updates,
        download_bytes=download_bytes,
        result=result,
        errors=update_error(
            before=state,
            starts=starts,
            updates=updates,
            weights=weights,
            scaling=scaling,
            result=result,
        ),
    )
    return result, row
