import re
from pathlib import Path

import pytest

from fedlora.config import Config, load_config, parse_overrides
from fedlora.errors import FedLoraError


def test_defaults_are_the_packaged_demo():
    cfg = load_config()
    assert cfg.model == "minilm" and cfg.dataset == "bbc-news"


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\nlayers: [3, 4, 5]\nmethod: ffa\n")
    cfg = load_config(path, ["rank=2", "lr=1e-3", "target_modules=[query]", "data_dir=null"])
    assert (cfg.rank, cfg.layers, cfg.method, cfg.lr) == (2, [3, 4, 5], "ffa", 1e-3)
    assert cfg.target_modules == ["query"] and cfg.data_dir is None


def test_scalar_for_list_key_is_one_element_list():
    assert load_config(None, ["layers=5"]).layers == [5]


def test_required_key_names_exist():
    names = set(Config.__dataclass_fields__)
    required = {
        "model",
        "dataset",
        "data_dir",
        "num_clients",
        "rounds",
        "local_steps",
        "batch_size",
        "lr",
        "optimizer",
        "method",
        "rank",
        "alpha",
        "target_modules",
        "layers",
        "partition",
        "client_fraction",
        "weighting",
        "eval_every",
        "seed",
        "output_dir",
    }
    assert required <= names


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("rnak=4", "unknown config key 'rnak'"),
        ("method=fedprox", "unknown method 'fedprox'"),
        ("rank=0", "'rank' must be >= 1"),
        ("rank=two", "'rank' must be an integer"),
        ("lr=-1", "'lr' must be > 0"),
        ("client_fraction=0", "config key 'client_fraction' must be in (0, 1], got 0.0"),
        ("weighting=size", "'weighting' must be one of"),
        ("optimizer=lion", "'optimizer' must be one of"),
        ("partition=random", "'partition' must be one of"),
        ("layers=[-1]", "'layers' must be a non-empty list of block indices >= 0, got [-1]"),
        ("overwrite=maybe", "config key 'overwrite' must be true or false, got 'maybe'"),
        ("noequals", "override 'noequals' is not of the form key=value"),
    ],
)
def test_bad_values_raise_one_line(override: str, fragment: str):
    with pytest.raises(FedLoraError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(FedLoraError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: [1,\n")
    with pytest.raises(
        FedLoraError, match=rf"config file {re.escape(str(bad))} is not valid YAML \(line 2\)"
    ):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(
        FedLoraError, match=rf"config file {re.escape(str(listy))} must hold a mapping of keys"
    ):
        load_config(listy)


def test_nested_override_parsing():
    assert parse_overrides(["dp.delta=1e-5", "dp.accountant=rdp"]) == {
        "dp": {
            "delta": "1e-5",
            "accountant": "rdp",
        }  # PyYAML: no dot, a string; coerced by field type
    }


def test_quantization_none_on_the_command_line_is_the_choice_not_null():
    from fedlora.config import load_config

    assert load_config(None, ["quantization=none"]).quantization == "none"
    assert load_config(None, ["quantization=nf4"]).quantization == "nf4"
