"""The values that travel between server and clients, in every runtime.

They speak in LoRA layer names (``bert.encoder.layer.0.attention.self.query``) and
factors: ``A[layer]`` has shape ``(r, in)``, ``B[layer]`` has shape ``(out, r)``, and the
layer's update to its frozen weight is ``scaling * B @ A`` (PEFT's convention). With DoRA
(``adapter=dora``) each layer also has a magnitude vector ``magnitude[layer]`` of shape
``(out,)``, PEFT's ``lora_magnitude_vector``: the layer's weight is then
``diag(m / ||W0 + s B A||_row) (W0 + s B A)`` (Liu et al., arXiv 2402.09353, eq. 5).
Only :mod:`fedlora.models.adapter` translates them to and from PEFT's parameter names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

# "W": the frozen weights of the LoRA target layers, on a sparse mask (SLoRA's first stage)
Factor = Literal["A", "B", "AB", "W"]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes on the wire: ``numel * element_size`` of each tensor sent."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class AdapterState:
    """The global adapter: LoRA factors per layer plus the trainable head (if any) and,
    for a DoRA adapter, each layer's magnitude vector (empty for plain LoRA)."""

    A: Mapping[str, torch.Tensor]
    B: Mapping[str, torch.Tensor]
    head: Mapping[str, torch.Tensor] = field(default_factory=dict)
    magnitude: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.A)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.A.values(), *self.B.values(), *self.head.values(), *self.magnitude.values()]

    def nbytes(self) -> int:
        return tensor_bytes(self.tensors())

    def to(self, device: torch.device | str) -> AdapterState:
        """The same state on ``device`` (the CPU at a process boundary)."""
        return AdapterState(
            A={k: v.to(device) for k, v in self.A.items()},
            B={k: v.to(device) for k, v in self.B.items()},
            head={k: v.to(device) for k, v in self.head.items()},
            magnitude={k: v.to(device) for k, v in self.magnitude.items()},
        )

    def clone(self) -> AdapterState:
        return AdapterState(
            A={k: v.detach().clone() for k, v in self.A.items()},
            B={k: v.detach().clone() for k, v in self.B.items()},
            head={k: v.detach().clone() for k, v in self.head.items()},
            magnitude={k: v.detach().clone() for k, v in self.magnitude.items()},
        )


@dataclass(frozen=True)
class RoundPlan:
    """What the sampled clients train in one round (Flower's ``configure_train``)."""

    round: int
    trained: Factor
    train_head: bool
    method: str
    # DoRA's magnitude vector: None (the default) trains it in the rounds that train B, its
    # output-side partner (docs/configuration.md, "DoRA"); resolved to a bool on creation.
    train_magnitude: bool | None = None
    # SLoRA's sparse stage (trained="W"): the density of the seeded random mask over each
    # target layer's frozen weight, and the seed that server and clients draw it from.
    mask_density: float = 1.0
    mask_seed: int = 0

    def __post_init__(self) -> None:
        if self.train_magnitude is None:
            object.__setattr__(self, "train_magnitude", self.trains_B)

    @property
    def trains_A(self) -> bool:
        return "A" in self.trained

    @property
    def trains_B(self) -> bool:
        return "B" in self.trained

    @property
    def trains_magnitude(self) -> bool:
        """Whether clients train (and send) DoRA's magnitude vectors this round."""
        return bool(self.train_magnitude)


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply: only the tensors it trained, its example count and metrics.

    ``scaling`` is the LoRA scaling (``alpha / r`` as PEFT set it) of the adapter the client
    trained, per layer: its increment to a frozen weight is ``scaling * B @ A``, so the
    server weighs each client's factors by what they actually did (clients of different
    ranks have different scalings; FLoRA). Empty: the global adapter's scaling.
    ``magnitude``: DoRA's magnitude vectors, when the round trained them.
    ``sparse``: per layer, the values of the client's increment to the frozen weight at the
    round's mask (SLoRA's first stage; the mask itself is seeded, so only values travel).
    """

    client_id: int
    num_examples: int
    A: Mapping[str, torch.Tensor] = field(default_factory=dict)
    B: Mapping[str, torch.Tensor] = field(default_factory=dict)
    head: Mapping[str, torch.Tensor] = field(default_factory=dict)
    train_loss: float = float("nan")
    scaling: Mapping[str, float] = field(default_factory=dict)
    steps: int = 0
    magnitude: Mapping[str, torch.Tensor] = field(default_factory=dict)
    sparse: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def trained_state(self) -> AdapterState:
        """The tensors this reply carries, as an (incomplete) adapter state."""
        return AdapterState(A=self.A, B=self.B, head=self.head, magnitude=self.magnitude)

    def nbytes(self) -> int:
        return self.trained_state.nbytes() + tensor_bytes(self.sparse.values())

    def to(self, device: torch.device | str) -> ClientUpdate:
        """The same reply with its tensors on ``device``."""
        moved = self.trained_state.to(device)
        sparse = {k: v.to(device) for k, v in self.sparse.items()}
        return dataclasses.replace(
            self, A=moved.A, B=moved.B, head=moved.head, magnitude=moved.magnitude, sparse=sparse
        )

    def clone(self) -> ClientUpdate:
        """The same reply with its tensors copied (detached)."""
        copied = self.trained_state.clone()
        sparse = {k: v.detach().clone() for k, v in self.sparse.items()}
        return dataclasses.replace(
            self,
            A=copied.A,
            B=copied.B,
            head=copied.head,
            magnitude=copied.magnitude,
            sparse=sparse,
        )

    def check_finite(self) -> None:
        """Reject NaN/inf updates before they reach the global adapter."""
        from fedlora.errors import FedLoraError

        kinds = (("A", self.A), ("B", self.B), ("head", self.head), ("magnitude", self.magnitude))
        for kind, tensors in (*kinds, ("sparse", self.sparse)):
            for name, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise FedLoraError(
                        f"client {self.client_id} sent a non-finite {kind} update for '{name}' "
                        "(training diverged: lower lr)"
                    )
