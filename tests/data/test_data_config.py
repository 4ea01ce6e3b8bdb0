"""The data keys of the config (``dominant_fraction``, ``encoding``): validated on load,
with a one-line error naming the key, and one line on the command line too."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.data import label_histogram, partition_clients
from fedlora.data.sources import TextExamples
from fedlora.errors import FedLoraError


def one_line_error(overrides: list[str]) -> str:
    with pytest.raises(FedLoraError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", ["0", "0.0", "-0.1", "1.01"])
def test_dominant_fraction_outside_0_1_is_rejected(value: str):
    message = one_line_error([f"dominant_fraction={value}"])
    assert message.startswith("config key 'dominant_fraction' must be in (0, 1]")


def test_dominant_fraction_1_is_accepted_and_gives_single_class_clients():
    cfg = load_config(None, ["partition=imbalanced", "dominant_fraction=1.0"])
    assert cfg.dominant_fraction == 1.0
    labels = [i % 3 for i in range(90)]
    data = TextExamples(text=[f"r{i}" for i in range(90)], labels=labels)
    clients = partition_clients(
        data,
        num_clients=3,
        partition=cfg.partition,
        dominant_fraction=cfg.dominant_fraction,
        eval_fraction=0.0,
    )
    assert [label_histogram(c.train, 3) for c in clients] == [[30, 0, 0], [0, 30, 0], [0, 0, 30]]


@pytest.mark.parametrize("name", ["latin-1", "cp1252", "utf-16", "UTF8"])
def test_known_encodings_are_accepted(name: str):
    assert load_config(None, [f"encoding={name}"]).encoding == name


def test_default_encoding_is_utf8():
    assert load_config().encoding == "utf-8"


@pytest.mark.parametrize("name", ["latin-9000", "rot13", "zlib", "''"])
def test_unknown_or_non_text_encoding_is_rejected(name: str):
    message = one_line_error([f"encoding={name}"])
    assert message.startswith("config key 'encoding' must name a text encoding")


def test_cli_errors_for_encoding_are_one_line(capsys, tmp_path: Path):
    (tmp_path / "menu.csv").write_bytes(
        ("text,label\n" + "".join(f"café {i},{i % 2}\n" for i in range(8))).encode("latin-1")
    )
    common = [f"output_dir={tmp_path / 'runs'}", "run_name=t", "progress=false"]
    for extra, fragment in (
        (
            [f"dataset={tmp_path / 'menu.csv'}"],
            "set encoding=<its encoding>, e.g. encoding=latin-1",
        ),
        (["encoding=latin-9000"], "config key 'encoding'"),
        (["dominant_fraction=0"], "config key 'dominant_fraction' must be in (0, 1]"),
    ):
        code = main(["run", *common, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("fedlora: error: ") and "\n" not in err, err
        assert fragment in err, err
