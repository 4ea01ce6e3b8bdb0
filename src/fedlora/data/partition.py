"""Which rows go where: clients (flwr-datasets partitioners), train/test splits, subsamples.

The partitioners see a tiny in-memory ``datasets.Dataset`` of row indices and labels
(never the texts); each partition is mapped back to rows of the ``TextExamples``.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedlora.errors import FedLoraError

if TYPE_CHECKING:  # sources imports the splits below; TextExamples is only needed for typing
    from fedlora.data.sources import TextExamples

PARTITIONS = ("iid", "dirichlet", "natural", "imbalanced")


@dataclass(frozen=True)
class ClientData:
    """One client's local data: what it trains on and what it evaluates on."""

    client_id: int
    train: TextExamples
    eval: TextExamples


class ImbalancedPartitioner(Partitioner):
    """Each client is dominated by one class (the FRA-LoRA paper's imbalanced split).

    Client ``k``'s dominant class is ``classes[k mod C]``; ``round(f * m)`` of its ``m``
    examples come from that class and the other ``m - round(f * m)`` are spread evenly
    over the remaining ``C - 1`` classes. All clients get the same size ``m``: the largest
    one the per-class supply allows, so rows may be left unused when classes are
    unbalanced (like flwr's ``ShardPartitioner``). Rows within a class are drawn in a
    seeded random order.
    """

    def __init__(
        self, *, num_partitions: int, partition_by: str, dominant_fraction: float, seed: int
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError("num_partitions must be at least 1")
        if not 0.0 < dominant_fraction <= 1.0:
            raise ValueError(f"dominant_fraction must be in (0, 1], got {dominant_fraction}")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._dominant_fraction = dominant_fraction
        self._seed = seed
        self._indices: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if self._indices is None:
            self._indices = self._assign()
        return self.dataset.select(self._indices[partition_id])

    def _counts(self, client: int, size: int, classes: Sequence[int]) -> dict[int, int]:
        """How many rows of each class client ``client`` takes when it holds ``size`` rows."""
        dominant = classes[client % len(classes)]
        others = [c for c in classes if c != dominant]
        n_dominant = size if not others else round(self._dominant_fraction * size)
        counts = {dominant: n_dominant}
        rest = size - n_dominant
        # Rotate which classes get the remainder so no class is drained first by every client.
        for j, c in enumerate(others):
            counts[c] = rest // len(others) + ((j - client) % len(others) < rest % len(others))
        return counts

    def _fits(self, size: int, classes: Sequence[int], supply: dict[int, int]) -> bool:
        demand = dict.fromkeys(classes, 0)
        for client in range(self._num_partitions):
            for c, n in self._counts(client, size, classes).items():
                demand[c] += n
        return all(demand[c] <= supply[c] for c in classes)

    def _assign(self) -> list[list[int]]:
        labels = np.asarray(self.dataset[:][self._partition_by])
        classes = sorted(int(c) for c in np.unique(labels))
        supply = {c: int((labels == c).sum()) for c in classes}
        lo, hi = 0, len(labels) // self._num_partitions  # demand grows with size: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._fits(mid, classes, supply) else (lo, mid - 1)
        rng = np.random.default_rng(self._seed)
        pools = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
        partitions = []
        for client in range(self._num_partitions):
            rows: list[int] = []
            for c, n in self._counts(client, lo, classes).items():
                rows += pools[c][:n]
                del pools[c][:n]
            partitions.append(rng.permutation(rows).tolist())
        return partitions


def partition_clients(
    train: TextExamples,
    *,
    num_clients: int,
    partition: str = "iid",
    partition_alpha: float = 0.5,
    dominant_fraction: float = 0.8,
    eval_fraction: float = 0.1,
    max_eval_examples: int | None = None,
    seed: int = 0,
) -> list[ClientData]:
    """Split ``train`` into ``num_clients`` clients, each with its own train and eval part.

    ``partition``: ``iid`` (equal shards), ``dirichlet`` (label skew: for each class
    ``c``, the clients' shares ``p_c ~ Dir(alpha * 1_K)``, Hsu et al. 2019, "Measuring
    the effects of non-identical data distribution"; smaller alpha, more skew),
    ``natural`` (one client per distinct value of ``train.groups``, in sorted order) or
    ``imbalanced`` (see ``ImbalancedPartitioner``). Every partitioner sees the rows in a
    seeded random order, never file order, so a sorted source file does not skew the
    clients. Each client's partition is then split at random into eval
    (``round(eval_fraction * size)``, at least 1 if the partition has 2 rows or more) and
    train. The same ``seed`` gives the same clients. ``max_eval_examples`` caps each
    client's eval split (the rest trains): per-client evaluation of every round then costs
    a bounded time however large the clients are.
    """
    if partition not in PARTITIONS:
        known = ", ".join(PARTITIONS)
        raise FedLoraError(f"unknown partition {partition!r}; choose one of {known}")
    if num_clients < 1:
        raise FedLoraError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(train):
        raise FedLoraError(
            f"num_clients={num_clients} is more than the {len(train)} training examples"
        )
    if not 0.0 <= eval_fraction < 1.0:
        raise FedLoraError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if partition == "dirichlet" and not partition_alpha > 0:
        raise FedLoraError(f"partition_alpha must be positive, got {partition_alpha}")
    if partition == "imbalanced" and not 0.0 < dominant_fraction <= 1.0:
        raise FedLoraError(f"dominant_fraction must be in (0, 1], got {dominant_fraction}")

    described = {
        "iid": "'iid'",
        "dirichlet": f"'dirichlet' (alpha={partition_alpha})",
        "natural": "'natural'",
        "imbalanced": f"'imbalanced' (dominant_fraction={dominant_fraction})",
    }[partition]
    parts = _partition_indices(
        train,
        num_clients=num_clients,
        partition=partition,
        alpha=partition_alpha,
        dominant_fraction=dominant_fraction,
        seed=seed,
        described=described,
    )
    clients = []
    for client_id, rows in enumerate(parts):
        n_eval = 0
        if eval_fraction > 0 and len(rows) >= 2:
            n_eval = min(len(rows) - 1, max(1, round(eval_fraction * len(rows))))
            if max_eval_examples is not None:
                n_eval = min(n_eval, max_eval_examples)
        order = np.random.default_rng([seed, client_id]).permutation(len(rows))
        eval_rows = [rows[i] for i in order[:n_eval]]
        train_rows = [rows[i] for i in order[n_eval:]]
        if not train_rows:
            raise FedLoraError(
                f"client {client_id} got no training examples under partition {described}; "
                + (
                    "raise alpha or lower num_clients"
                    if partition == "dirichlet"
                    else "lower num_clients"
                )
            )
        clients.append(
            ClientData(
                client_id=client_id, train=train.select(train_rows), eval=train.select(eval_rows)
            )
        )
    return clients


def _partition_indices(
    train: TextExamples,
    *,
    num_clients: int,
    partition: str,
    alpha: float,
    dominant_fraction: float,
    seed: int,
    described: str,
) -> list[list[int]]:
    """Row indices of ``train`` per client, from the flwr-datasets partitioner.

    The rows are shuffled (by ``seed``) before any partitioner sees them: flwr's
    partitioners cut in the order they are given (``IidPartitioner`` contiguous shards,
    ``DirichletPartitioner`` a contiguous block of each class per client), so a file
    sorted by date, source or length would otherwise become a hidden feature skew.
    """
    n = len(train)
    # flwr redraws the Dirichlet shares (at most 10 times) until every client holds
    # min_size rows: at least one, up to 10 when the data makes that easy.
    min_size = min(10, max(1, n // (2 * num_clients)))
    order = np.random.default_rng(seed).permutation(n).tolist()
    columns: dict[str, list[int] | list[str]] = {
        "idx": order,
        "label": [train.labels[i] for i in order],
    }
    partitioner: Partitioner
    if partition == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            seed=seed,
        )
    elif partition == "natural":
        if train.groups is None:
            raise FedLoraError(
                "partition 'natural' needs a group column (set group_column when loading the data)"
            )
        groups = sorted(set(train.groups))
        if len(groups) != num_clients:
            shown = ", ".join(groups[:5]) + (", ..." if len(groups) > 5 else "")
            raise FedLoraError(
                f"partition 'natural' makes one client per group: the data has {len(groups)} "
                f"groups ({shown}), but num_clients={num_clients}"
            )
        columns["group"] = [train.groups[i] for i in order]
        partitioner = NaturalIdPartitioner(partition_by="group")
    else:
        partitioner = ImbalancedPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            dominant_fraction=dominant_fraction,
            seed=seed,
        )
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        # flwr warns on every Dirichlet redraw and NaturalId draws a tqdm bar on stderr.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # dataset[:] reads a whole column at once; dataset["idx"] iterates row by row.
            return [partitioner.load_partition(k)[:]["idx"] for k in range(num_clients)]
    except ValueError as exc:
        if partition != "dirichlet":
            raise
        raise FedLoraError(
            f"partition {described} left some client with fewer than {min_size} examples "
            f"after 11 draws; raise alpha or lower num_clients"
        ) from exc


def _by_label(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    return dict(sorted(groups.items()))


def stratified_split(
    examples: TextExamples, *, test_fraction: float, seed: int, label_names: Sequence[str]
) -> tuple[TextExamples, TextExamples]:
    """Split into (train, test): per class, about ``round(n_c * test_fraction)`` rows go to
    test (at least one, and at least one stays in train), so both hold every class.

    Identical examples stay on the same side (BBC News repeats 98 of its 2,225 articles),
    so no test example is also a training example; the seeded shuffle is over those
    groups of duplicates, which are then taken until the class's test quota is met.
    """
    pairs: Sequence[str | None] = examples.text_pair or [None] * len(examples)
    rng = random.Random(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label, rows in _by_label(examples.labels).items():
        copies: dict[tuple[str, str | None], list[int]] = defaultdict(list)
        for row in rows:
            copies[examples.text[row], pairs[row]].append(row)
        if len(copies) < 2:
            raise FedLoraError(
                f"label {label_names[label]!r} has only 1 distinct example; "
                "need at least 2 to split it into train and test"
            )
        units = list(copies.values())
        rng.shuffle(units)
        quota = max(1, round(len(rows) * test_fraction))
        taken = 0
        while taken < quota and len(units) > 1:
            unit = units.pop()
            test_idx += unit
            taken += len(unit)
        train_idx += [row for unit in units for row in unit]
    return examples.select(sorted(train_idx)), examples.select(sorted(test_idx))


def stratified_subsample(examples: TextExamples, *, size: int, seed: int) -> TextExamples:
    """A seeded subsample of ``size`` rows with the label proportions kept (largest remainder)."""
    if len(examples) <= size:
        return examples
    by_label = _by_label(examples.labels)
    exact = {label: size * len(rows) / len(examples) for label, rows in by_label.items()}
    quota = {label: int(share) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda label: quota[label] - exact[label])
    for label in by_remainder[: size - sum(quota.values())]:
        quota[label] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for label, rows in by_label.items():
        chosen += rng.sample(rows, quota[label])
    return examples.select(sorted(chosen))


def label_histogram(examples: TextExamples, num_labels: int) -> list[int]:
    """Number of examples of each label id ``0 .. num_labels - 1``."""
    counts = [0] * num_labels
    for label in examples.labels:
        if not 0 <= label < num_labels:
            raise ValueError(f"label {label} outside 0..{num_labels - 1}")
        counts[label] += 1
    return counts


def describe_clients(clients: Sequence[ClientData], label_names: Sequence[str]) -> str:
    """A plain-text table: client id, train and eval sizes, and the train label histogram."""
    header = ["client", "train", "eval", *label_names]
    rows = [
        [str(c.client_id), str(len(c.train)), str(len(c.eval))]
        + [str(n) for n in label_histogram(c.train, len(label_names))]
        for c in clients
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
        for line in [header, *rows]
    )
