"""Write one CSV of labelled text per organisation, for trying a deployment by hand.

    .venv/bin/python scripts/make_org_data.py OUT_DIR [--clients 2] [--seed 0]

Splits the training part of the packaged BBC News corpus among ``--clients``
organisations (label skew, the default Dirichlet partition) and writes
``OUT_DIR/org<k>.csv`` with columns ``text,label`` (label = topic name). Each SuperNode
then reads only its own file (``data-path`` in its node config); the server evaluates on
BBC News' held-out split, which no organisation holds. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fedlora.data import load_text_dataset, partition_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_text_dataset(name="bbc-news", seed=args.seed)  # the server's split, same seed
    clients = partition_clients(
        data.train,
        num_clients=args.clients,
        partition="dirichlet",
        eval_fraction=0.0,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for client in clients:
        path = args.out / f"org{client.client_id}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for text, label in zip(client.train.text, client.train.labels, strict=True):
                writer.writerow([text, data.label_names[label]])
        print(f"{path}: {len(client.train)} examples")


if __name__ == "__main__":
    main()
