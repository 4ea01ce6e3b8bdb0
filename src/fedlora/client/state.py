"""What a client keeps between rounds: the factors its method never sends (FedSA-LoRA's ``B``).

A method declares the parts of the adapter that stay with each client
(:attr:`fedlora.methods.base.LoRAMethod.private`: kinds of
:class:`~fedlora.messages.AdapterState`, ``"B"``, ``"head"``, ``"magnitude"``). A client
of such a method

1. starts from the global shared part with its **own** private part swapped in
   (:func:`with_private`; a client that has not trained yet has the initial one);
2. trains as any client does;
3. keeps the private part it trained in its store and replies with the shared part only
   (:func:`split_update`), so private tensors never travel and the upload counts only what
   does.

:meth:`ClientStore.trainer` wraps any trainer (:func:`fedlora.client.train_client`, a DP
trainer) in these three steps. The in-process runtime's server process holds one
:class:`ClientStore` for all clients and checkpoints it; a Flower SuperNode keeps its
client's part on disk (:class:`DiskClientStore`, under the node config key ``state-dir``),
where a resumed server finds it untouched.

A store keeps the two newest versions of each client's part, each tagged with the round
that trained it: a client training in round ``t`` starts from the newest version of a round
before ``t``, so a round repeated after a resume (a SuperNode that had already trained it
before the server was killed) starts from what the uninterrupted run had.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.data import Encoded
from fedlora.errors import FedLoraError
from fedlora.messages import AdapterState, ClientUpdate

if TYPE_CHECKING:
    from fedlora.config import Config

KINDS = ("A", "B", "head", "magnitude")  # the parts of an AdapterState
STATE_DIR_KEY = "state-dir"  # node config: where a SuperNode keeps its client's private part
_KEEP = 2  # versions kept per client: the newest, and the one a repeated round starts from

Trainer = Callable[..., ClientUpdate]


def shared_part(state: AdapterState, private: Collection[str]) -> AdapterState:
    """``state`` without the kinds in ``private``: what travels."""
    return AdapterState(**{k: {} if k in private else dict(getattr(state, k)) for k in KINDS})


def private_part(state: AdapterState, private: Collection[str]) -> AdapterState:
    """Only the kinds in ``private`` of ``state``: what a client keeps."""
    return AdapterState(**{k: dict(getattr(state, k)) if k in private else {} for k in KINDS})


def with_private(state: AdapterState, part: AdapterState) -> AdapterState:
    """A client's own model: ``state`` with the tensors of ``part`` in place of its own."""
    return AdapterState(**{k: {**getattr(state, k), **getattr(part, k)} for k in KINDS})


def split_update(
    update: ClientUpdate, *, start: AdapterState, private: Collection[str]
) -> tuple[ClientUpdate, AdapterState]:
    """(the reply without its private tensors, the private part the client now holds).

    A private kind the round did not train (the head of a ``head=frozen`` run) is kept as
    the client started from it.
    """
    kept = private_part(with_private(start, update.trained_state), private)
    empty: dict[str, Any] = {k: {} for k in private}
    sent = dataclasses.replace(update, **empty)
    return sent, kept


class ClientStore:
    """Every client's private part, in memory (the in-process runtime's server process).

    ``private``: the kinds the clients keep (:attr:`~fedlora.methods.base.LoRAMethod.private`);
    ``initial``: the starting adapter, whose private part a client holds until it first
    trains.
    """

    def __init__(self, initial: AdapterState, *, private: Collection[str]) -> None:
        self.private = tuple(private)
        self.initial = private_part(initial, self.private)
        self._parts: dict[int, dict[int, AdapterState]] = {}  # client -> round -> part

    # -- the versions (a disk store overrides these two) ------------------------------

    def _versions(self, client_id: int) -> dict[int, AdapterState]:
        return self._parts.get(client_id, {})

    def _write(self, client_id: int, round: int, part: AdapterState) -> None:
        versions = self._parts.setdefault(client_id, {})
        versions[round] = part
        for old in sorted(versions)[:-_KEEP]:
            del versions[old]

    # -- what a client does with its store --------------------------------------------

    def get(self, client_id: int, *, before: int | None = None) -> AdapterState:
        """The part ``client_id`` holds at the start of round ``before`` (None: now): the
        newest version trained in an earlier round, else the initial part."""
        versions = self._versions(client_id)
        rounds = [t for t in versions if before is None or t < before]
        return versions[max(rounds)] if rounds else self.initial

    def put(self, client_id: int, part: AdapterState, *, round: int) -> None:
        """Keep ``part``, trained by ``client_id`` in round ``round``."""
        self._write(client_id, round, part)

    def clients(self) -> list[int]:
        """The clients that have trained (hold a part of their own)."""
        return sorted(c for c in self._parts if self._parts[c])

    def trainer(self, train: Trainer) -> Trainer:
        """``train`` as a client of a method with private parts runs it: from the global
        shared part plus its own private part, keeping what it trained, replying with the
        shared part only. Same keyword arguments as :func:`fedlora.client.train_client`."""

        def run(*, state: AdapterState, client_id: int, **kwargs: Any) -> ClientUpdate:
            round = kwargs["plan"].round
            start = with_private(state, self.get(client_id, before=round))
            update = train(state=start, client_id=client_id, **kwargs)
            sent, kept = split_update(update, start=start, private=self.private)
            self.put(client_id, kept, round=round)
            return sent

        return run

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Each client's newest part as ``{"<client>/<round>/<kind>/<name>": tensor}``."""
        flat: dict[str, torch.Tensor] = {}
        for cid in self.clients():
            versions = self._versions(cid)
            t = max(versions)
            for kind in KINDS:
                for name, tensor in getattr(versions[t], kind).items():
                    flat[f"{cid}/{t}/{kind}/{name}"] = tensor
        return flat

    def load_state_dict(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Back to what :meth:`state_dict` saved (clients absent from it: the initial part)."""
        parts: dict[tuple[int, int], dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in flat.items():
            client, trained_in, kind, name = key.split("/", 3)
            at = (int(client), int(trained_in))
            parts.setdefault(at, {k: {} for k in KINDS})[kind][name] = tensor
        self._parts = {}
        for (cid, t), kinds in sorted(parts.items()):
            self._write(cid, t, AdapterState(**kinds))


class DiskClientStore(ClientStore):
    """One client's (or a few clients') private parts on disk: a SuperNode's store.

    ``directory/client-<id>/round-<t>.safetensors``, written to a temporary name and
    renamed, so a node killed while saving leaves the previous version whole.
    """

    def __init__(
        self, directory: str | Path, initial: AdapterState, *, private: Collection[str]
    ) -> None:
        super().__init__(initial, private=private)
        self.directory = Path(directory)

    def _client_dir(self, client_id: int) -> Path:
        return self.directory / f"client-{client_id}"

    def _versions(self, client_id: int) -> dict[int, AdapterState]:
        versions: dict[int, AdapterState] = {}
        for path in self._client_dir(client_id).glob("round-*.safetensors"):
            kinds: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
            for key, tensor in load_file(str(path)).items():
                kind, _, name = key.partition("/")
                kinds[kind][name] = tensor
            versions[int(path.name.removeprefix("round-").split(".")[0])] = AdapterState(**kinds)
        return versions

    def _write(self, client_id: int, round: int, part: AdapterState) -> None:
        folder = self._client_dir(client_id)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{kind}/{name}": t.detach().cpu().contiguous()
            for kind in KINDS
            for name, t in getattr(part, kind).items()
        }
        path = folder / f"round-{round:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        for old in sorted(folder.glob("round-*.safetensors"))[:-_KEEP]:
            old.unlink(missing_ok=True)

    def clients(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (p.name.removeprefix("client-") for p in self.directory.glob("client-*"))
        return sorted(int(c) for c in found if c.isdigit() and self._versions(int(c)))


def node_store(
    cfg: Config, node_config: Mapping[str, Any], initial: AdapterState | None
) -> DiskClientStore | None:
    """This SuperNode's store when the run's method keeps private parts (None otherwise),
    in :func:`node_state_dir`; ``initial``: the adapter the node built (same seed as the
    server's)."""
    from fedlora.methods import build_method  # the methods import the client package

    private = build_method(cfg.method, cfg).private
    if not private:
        return None
    if initial is None:
        raise FedLoraError("a stateful client needs the adapter its node built (initial_state)")
    directory = node_state_dir(node_config, output_dir=cfg.output_dir, run_name=cfg.run_name)
    return DiskClientStore(directory, initial, private=private)


def node_state_dir(
    node_config: Mapping[str, Any], *, output_dir: str, run_name: str | None
) -> Path:
    """Where a SuperNode keeps what its client holds between rounds: the node config's
    ``state-dir`` (one folder per run under it, ``<state-dir>/<run_name>``, so that runs
    sharing a node do not share state), else ``<output_dir>/<run_name>/client-state`` as
    the node resolves it (the run's own directory when server and nodes share a file
    system, as in ``flower-sim``), else (no run name) a folder under the system's
    temporary directory."""
    if node_config.get(STATE_DIR_KEY):
        base = Path(str(node_config[STATE_DIR_KEY]))
        return base / run_name if run_name else base
    if run_name:
        return Path(output_dir) / run_name / "client-state"
    return Path(tempfile.gettempdir()) / "fedlora-client-state"


def evaluate_personal(
    *,
    adapter: Any,
    store: ClientStore,
    splits: Mapping[int, Encoded],
    evaluate: Callable[[Encoded], Mapping[str, float]],
) -> dict[int, dict[str, float]]:
    """Each client's own model (the global adapter the model holds, with the client's
    private part in place) on that client's split; the model holds the global adapter
    again afterwards. ``evaluate(split)`` scores the model as it stands."""
    global_state = adapter.get_state()
    scores: dict[int, dict[str, float]] = {}
    try:
        for cid, data in splits.items():
            adapter.set_state(with_private(global_state, store.get(cid)))
            scores[cid] = dict(evaluate(data))
    finally:
        adapter.set_state(global_state)
    return scores
