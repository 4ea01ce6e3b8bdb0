import ast
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedlora.config import (
    SECTIONS,
    Config,
    DataSection,
    DPConfig,
    ModelSection,
    config_from_dict,
    load_config,
    parse_overrides,
)
from fedlora.errors import FedLoraError
from fedlora.methods import check_config


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
    names = set(Config.model_fields)
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
    with pytest.raises(FedLoraError) as info:  # method names: the methods' own check
        check_config(load_config(None, [override]))
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


def test_config_imports_nothing_else_of_fedlora():
    code = (
        "import sys, fedlora.config; "
        "print(sorted(m for m in sys.modules if m.startswith('fedlora')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert ast.literal_eval(out) == ["fedlora", "fedlora.config", "fedlora.errors"]


def test_a_section_validates_on_its_own():
    assert ModelSection(rank=4).rank == 4
    with pytest.raises(FedLoraError, match=r"^config key 'rank' must be >= 1, got 0$"):
        ModelSection(rank=0)
    with pytest.raises(FedLoraError, match=r"^config key 'dp.delta' must be in \(0, 1\), got 1.0$"):
        DPConfig(delta=1)
    with pytest.raises(FedLoraError, match=r"^unknown config key 'rank'"):
        DataSection(rank=4)  # a key of another section


def test_sections_hold_every_key_once():
    keys = [k for section in SECTIONS.values() for k in section]
    flat = {k for k in Config.model_fields if k != "dp"} | {
        f"dp.{k}" for k in DPConfig.model_fields
    }
    assert len(keys) == len(set(keys)) and set(keys) == flat


def _documented_keys() -> dict[str, set[str]]:
    """The keys of each `## heading` of docs/configuration.md, from its key tables."""
    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    found: dict[str, set[str]] = {}
    heading, in_keys = "", False
    for line in text.splitlines():
        if line.startswith("## "):
            heading, in_keys = line[3:].strip(), False
        elif line.startswith("| key |"):
            in_keys = True
        elif in_keys and line.startswith("| `"):
            found.setdefault(heading, set()).add(line.split("`")[1])
        elif not line.startswith("|"):
            in_keys = False
    return found


def test_every_key_is_documented_under_its_section():
    assert _documented_keys() == {title: set(keys) for title, keys in SECTIONS.items()}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rnak=4", "unknown config key 'rnak' (did you mean 'rank'? known keys: adapter,"),
        ("dp.noise=1", "unknown config key 'dp.noise' (known keys: accountant, delta,"),
        ("dp=5", "config key 'dp' must be a mapping, got 5"),
        ("seed=1.5", "config key 'seed' must be an integer, got 1.5"),
        ("rank=true", "config key 'rank' must be an integer, got True"),
        ("alpha=true", "config key 'alpha' must be a number, got True"),
        ("alpha=big", "config key 'alpha' must be a number, got 'big'"),
        ("label_column=[1]", "config key 'label_column' must be a string, got [1]"),
        ("layers=[1, x]", "config key 'layers' must be an integer, got 'x'"),
        ("schedule=[{rounds: 0, method: fra}]", "config key 'schedule.rounds' must be >= 1, got 0"),
        ("schedule=[{rounds: 2}]", "config key 'schedule.method' is required"),
        ("schedule=[{method: fra}, {method: ffa}]", "schedule phase 1 (fra) needs 'rounds'"),
    ],
)
def test_pydantic_errors_become_one_line_naming_the_key(override, message):
    with pytest.raises(FedLoraError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_words_and_numbers_keep_their_meaning():
    cfg = load_config(None, ["prefix_cache=off", "lr=1e-3", "alpha=16", "data_dir=none"])
    assert (cfg.prefix_cache, cfg.lr, cfg.alpha, cfg.data_dir) == ("off", 1e-3, 16.0, None)
    assert isinstance(cfg.alpha, float)
    assert load_config(None, ["dp.delta=1e-6"]).dp.delta == 1e-6


def test_replace_validates_and_a_saved_config_round_trips():
    cfg = load_config(
        None, ["method=schedule", "schedule=[{method: fra, rounds: 2}, {method: ffa}]"]
    )
    assert cfg.schedule is not None and cfg.schedule[0].method == "fra"
    assert cfg.replace(rank=2).rank == 2 and cfg.rank == 8
    with pytest.raises(FedLoraError, match="'rank' must be >= 1"):
        cfg.replace(rank=0)
    saved = cfg.to_dict()
    assert saved["schedule"] == [{"method": "fra", "rounds": 2}, {"method": "ffa", "rounds": None}]
    assert isinstance(saved["dp"], dict)
    assert config_from_dict(saved) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(ValidationError):  # frozen
        cfg.rank = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=schedule"], "method 'schedule' needs config key 'schedule'"),
        (
            ["method=schedule", "schedule=[{method: flora, rounds: 1}, {method: ffa}]"],
            "schedule phase 1: method 'flora' cannot be scheduled (allowed: fedavg, ffa, rolora, fra, fedex)",
        ),
        (["method=centralized", "runtime=flower-sim"], "method 'centralized' pools every client's"),
        (["methods=[fedavg,nope]"], "unknown method 'nope' (known: fedavg, ffa,"),
    ],
)
def test_what_only_a_method_knows_is_checked_by_the_methods(overrides, message):
    cfg = load_config(None, overrides)  # the config module knows no method
    with pytest.raises(FedLoraError) as info:
        check_config(cfg)
    assert str(info.value).startswith(message), str(info.value)
