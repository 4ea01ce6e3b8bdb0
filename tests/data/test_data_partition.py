"""Client partitions built with flwr-datasets partitioners."""

from __future__ import annotations

import pytest

from fedlora.data import (
    ImbalancedPartitioner,
    TextExamples,
    describe_clients,
    label_histogram,
    partition_clients,
)
from fedlora.errors import FedLoraError


def make_examples(counts: list[int], groups: list[str] | None = None) -> TextExamples:
    """``counts[c]`` rows of label ``c``, interleaved; every text is unique."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = labels[::2] + labels[1::2]
    return TextExamples(
        text=[f"row {i}" for i in range(len(labels))],
        labels=labels,
        groups=None if groups is None else [groups[i % len(groups)] for i in range(len(labels))],
    )


def rows_of(clients) -> list[str]:
    return [t for c in clients for t in c.train.text + c.eval.text]


def assert_disjoint_cover(clients, examples: TextExamples, *, all_rows: bool = True) -> None:
    rows = rows_of(clients)
    assert len(rows) == len(set(rows)), "a row was given to two clients"
    assert set(rows) <= set(examples.text)
    if all_rows:
        assert len(rows) == len(examples)
    by_text = dict(zip(examples.text, examples.labels, strict=True))
    for client in clients:  # labels travel with their texts
        assert client.train.labels == [by_text[t] for t in client.train.text]


def test_iid_sizes_sum_to_n_and_eval_fraction():
    data = make_examples([60, 40, 50, 50])
    clients = partition_clients(data, num_clients=7, partition="iid", eval_fraction=0.1)
    assert [c.client_id for c in clients] == list(range(7))
    assert_disjoint_cover(clients, data)
    sizes = [len(c.train) + len(c.eval) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(c.eval) == round(0.1 * s) for c, s in zip(clients, sizes, strict=True))
    # shuffled before sharding: client 0 does not just get the first rows
    assert set(clients[0].train.text + clients[0].eval.text) != set(data.text[: sizes[0]])


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "imbalanced"])
def test_partitions_are_deterministic_per_seed(partition):
    data = make_examples([80, 60, 60])
    first = partition_clients(data, num_clients=5, partition=partition, seed=4)
    again = partition_clients(data, num_clients=5, partition=partition, seed=4)
    other = partition_clients(data, num_clients=5, partition=partition, seed=5)
    assert first == again
    assert [c.train.text for c in first] != [c.train.text for c in other]


def test_dirichlet_covers_data_and_skews_labels():
    data = make_examples([100, 100, 100, 100])
    skewed = partition_clients(data, num_clients=5, partition="dirichlet", partition_alpha=0.1)
    iid = partition_clients(data, num_clients=5, partition="iid")
    assert_disjoint_cover(skewed, data)

    def max_share(clients) -> float:
        """Mean over clients of the share of their most common label (0.25 = uniform)."""
        shares = []
        for c in clients:
            hist = label_histogram(c.train, 4)
            shares.append(max(hist) / sum(hist))
        return sum(shares) / len(shares)

    assert max_share(iid) < 0.45
    assert max_share(skewed) > 0.6
    assert len({tuple(label_histogram(c.train, 4)) for c in skewed}) == 5


def within_class_runs(clients, data: TextExamples) -> list[bool]:
    """For each (client, class) holding 2 or more but not all of that class's rows: whether
    those rows are a contiguous run of the class's rows in file order."""
    row_of = {t: i for i, t in enumerate(data.text)}
    runs = []
    for label in sorted(set(data.labels)):
        rank = {row: r for r, row in enumerate(i for i, y in enumerate(data.labels) if y == label)}
        for c in clients:
            ranks = sorted(rank[row_of[t]] for t in c.train.text + c.eval.text if row_of[t] in rank)
            if 2 <= len(ranks) < len(rank):
                runs.append(ranks[-1] - ranks[0] + 1 == len(ranks))
    return runs


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "imbalanced"])
def test_rows_are_shuffled_before_partitioning(partition):
    # A file sorted by some hidden feature within each class (here: the row index, e.g.
    # date or source) must not become feature skew: contiguous blocks per class per client.
    data = make_examples([100, 100, 100, 100])
    clients = partition_clients(
        data, num_clients=5, partition=partition, partition_alpha=1.0, eval_fraction=0.0
    )
    runs = within_class_runs(clients, data)
    assert len(runs) >= 10
    assert not any(runs), f"{sum(runs)} of {len(runs)} client-class blocks are contiguous"
    again = partition_clients(
        data, num_clients=5, partition=partition, partition_alpha=1.0, eval_fraction=0.0
    )
    assert again == clients


def test_imbalanced_each_client_dominated_by_its_class():
    data = make_examples([100, 100, 100, 100])
    clients = partition_clients(
        data, num_clients=6, partition="imbalanced", dominant_fraction=0.8, eval_fraction=0.0
    )
    assert_disjoint_cover(clients, data, all_rows=False)
    sizes = {len(c.train) for c in clients}
    assert len(sizes) == 1, "equal client sizes"
    # Classes 0 and 1 dominate two clients each: 2 * 0.8 m + 4 * 0.2 m / 3 <= 100 -> m = 53.
    assert sizes == {53}
    for c in clients:
        hist = label_histogram(c.train, 4)
        dominant = c.client_id % 4
        assert hist[dominant] / len(c.train) >= 0.8 - 0.02
        assert max(hist) == hist[dominant]
        others = [n for k, n in enumerate(hist) if k != dominant]
        assert max(others) - min(others) <= 1, "the rest is spread evenly"


def test_imbalanced_sizes_limited_by_scarce_class():
    data = make_examples([200, 40])
    clients = partition_clients(data, num_clients=4, partition="imbalanced", eval_fraction=0.0)
    # Clients 1 and 3 need 0.8 m rows of class 1, clients 0 and 2 need 0.2 m: 2 m <= 40.
    assert [len(c.train) for c in clients] == [20, 20, 20, 20]
    assert [label_histogram(c.train, 2) for c in clients] == [[16, 4], [4, 16]] * 2


def test_imbalanced_partitioner_composes_like_flwr_partitioners():
    from datasets import Dataset

    partitioner = ImbalancedPartitioner(
        num_partitions=2, partition_by="label", dominant_fraction=0.75, seed=0
    )
    partitioner.dataset = Dataset.from_dict({"label": [0] * 8 + [1] * 8})
    assert partitioner.num_partitions == 2
    assert sorted(partitioner.load_partition(0)[:]["label"]) == [0] * 6 + [1] * 2
    assert sorted(partitioner.load_partition(1)[:]["label"]) == [0] * 2 + [1] * 6


def test_natural_partition_one_client_per_group():
    data = make_examples([30, 30], groups=["nyc", "berlin", "lagos"])
    clients = partition_clients(data, num_clients=3, partition="natural", eval_fraction=0.2)
    assert_disjoint_cover(clients, data)
    for client, group in zip(
        clients, ["berlin", "lagos", "nyc"], strict=True
    ):  # sorted group order
        assert set((client.train.groups or []) + (client.eval.groups or [])) == {group}
        assert len(client.train) + len(client.eval) == 20 and len(client.eval) == 4


def test_natural_partition_errors():
    data = make_examples([10, 10], groups=["a", "b", "c"])
    with pytest.raises(FedLoraError, match=r"the data has 3 groups \(a, b, c\).*num_clients=2"):
        partition_clients(data, num_clients=2, partition="natural")
    with pytest.raises(FedLoraError, match="needs a group column"):
        partition_clients(make_examples([10, 10]), num_clients=2, partition="natural")


def test_eval_split_rules():
    data = make_examples([10, 10])
    tiny = partition_clients(data, num_clients=10, eval_fraction=0.01)
    assert all((len(c.train), len(c.eval)) == (1, 1) for c in tiny)
    none = partition_clients(data, num_clients=4, eval_fraction=0.0)
    assert all(len(c.eval) == 0 and len(c.train) == 5 for c in none)
    single = partition_clients(data, num_clients=20, eval_fraction=0.5)
    assert all((len(c.train), len(c.eval)) == (1, 0) for c in single)


def test_empty_clients_are_reported():
    data = make_examples([10, 10, 10])
    with pytest.raises(FedLoraError, match=r"partition 'dirichlet' \(alpha=0\.01\).*raise alpha"):
        partition_clients(data, num_clients=10, partition="dirichlet", partition_alpha=0.01)
    scarce = make_examples([20, 1])
    with pytest.raises(
        FedLoraError, match=r"client 0 got no training examples under partition 'imbalanced'"
    ):
        partition_clients(scarce, num_clients=4, partition="imbalanced")


def test_argument_errors():
    data = make_examples([3, 3])
    with pytest.raises(FedLoraError, match=r"unknown partition 'shards'.*iid, dirichlet"):
        partition_clients(data, num_clients=2, partition="shards")
    with pytest.raises(FedLoraError, match="num_clients must be at least 1"):
        partition_clients(data, num_clients=0)
    with pytest.raises(FedLoraError, match=r"num_clients=7 is more than the 6 training examples"):
        partition_clients(data, num_clients=7)
    with pytest.raises(FedLoraError, match=r"^partition_alpha must be positive, got 0.0$"):
        partition_clients(data, num_clients=2, partition="dirichlet", partition_alpha=0.0)
    with pytest.raises(FedLoraError, match=r"^eval_fraction must be in \[0, 1\), got 1.0$"):
        partition_clients(data, num_clients=2, eval_fraction=1.0)


def test_label_histogram_and_describe_clients():
    data = make_examples([6, 2])
    assert label_histogram(data, 3) == [6, 2, 0]
    clients = partition_clients(data, num_clients=2, eval_fraction=0.25)
    table = describe_clients(clients, ["negative", "positive"]).splitlines()
    assert table[0].split() == ["client", "train", "eval", "negative", "positive"]
    for line, c in zip(table[1:], clients, strict=True):
        hist = label_histogram(c.train, 2)
        assert line.split() == [
            str(c.client_id),
            str(len(c.train)),
            str(len(c.eval)),
            *map(str, hist),
        ]
