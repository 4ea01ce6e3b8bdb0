"""Tokenise a split once; serve batches trimmed to their longest row."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlora.data.sources import TextExamples
from fedlora.errors import FedLoraError

if TYPE_CHECKING:
    from fedlora.models.prefix import PrefixStates


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class Encoded:
    """Token ids of a whole split, right-padded to its longest row (at most ``max_length``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None
    # The cached hidden states entering the first block with LoRA (fedlora.models.prefix;
    # config key prefix_cache), filled as rows are used; None: no cache.
    prefix: PrefixStates | None = field(default=None, kw_only=True, repr=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model keyword arguments (with ``labels``) for the rows ``indices``.

        Padding is on the right, so columns past the batch's longest row are pure padding
        and are cut: a batch of short sentences costs only its own length.
        """
        mask = self.attention_mask[indices]
        width = max(1, int(mask.sum(dim=1).max())) if len(mask) else 1
        out = {
            "input_ids": self.input_ids[indices, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[indices],
        }
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids[indices, :width]
        return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id for decoders that define no pad token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise FedLoraError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")


def encode(tokenizer: Any, examples: TextExamples, *, max_length: int) -> Encoded:
    """Tokenise ``examples`` in one call (pairs when ``text_pair`` is set), truncating to
    ``max_length`` tokens, and right-pad to the longest row.

    Padding is done here rather than by the tokenizer so that it is always on the right
    (decoder tokenizers often pad on the left) and works without a pad token (eos is
    used; the model's ``pad_token_id`` must then be set to the same id).
    """
    if max_length < 1:
        raise FedLoraError(f"max_length must be at least 1, got {max_length}")
    pad_id = pad_token_id(tokenizer)
    labels = torch.tensor(examples.labels, dtype=torch.long)
    if len(examples) == 0:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Encoded(
            input_ids=empty, attention_mask=empty.clone(), labels=labels, token_type_ids=None
        )
    tokens = tokenizer(
        examples.text,
        examples.text_pair,
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    lengths = np.array([len(row) for row in tokens["input_ids"]], dtype=np.int64)
    # Row-major boolean mask of real tokens: scattering the flat ids into it right-pads.
    real = np.arange(int(lengths.max())) < lengths[:, None]

    def padded(key: str, fill: int) -> torch.Tensor:
        out = np.full(real.shape, fill, dtype=np.int64)
        out[real] = np.fromiter(chain.from_iterable(tokens[key]), dtype=np.int64)
        return torch.from_numpy(out)

    input_ids = padded("input_ids", pad_id)
    attention_mask = torch.from_numpy(real.astype(np.int64))
    token_type_ids = padded("token_type_ids", 0) if "token_type_ids" in tokens else None
    return Encoded(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        token_type_ids=token_type_ids,
    )
