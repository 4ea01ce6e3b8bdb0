"""Bad DP settings stop the run with one line, from Python and from the command line."""

import pytest

from fedlora import cli
from fedlora.config import RUNTIMES, load_config
from fedlora.errors import FedLoraError
from fedlora.methods import check_config

BAD = [
    (["dp.noise_multiplier=-1"], "dp.noise_multiplier' must be >= 0"),
    (["dp.noise_multiplier=1", "dp.delta=1"], "dp.delta' must be in (0, 1)"),
    (["dp.noise_multiplier=1", "dp.delta=1.5"], "dp.delta' must be in (0, 1)"),
    (["dp.noise_multiplier=1", "dp.delta=0"], "dp.delta' must be in (0, 1)"),
    (
        ["dp.noise_multiplier=1", "dp.target_epsilon=3"],
        "give dp.noise_multiplier or dp.target_epsilon, not both",
    ),
    (
        ["dp.target_epsilon=0.05", "dp.delta=1e-5"],
        "dp.target_epsilon=0.05 is unreachable at dp.delta=1e-05 with the rdp accountant",
    ),
    (
        ["dp.target_epsilon=0.001", "dp.accountant=prv"],
        "dp.target_epsilon=0.001 is unreachable at dp.delta=1e-05 with the prv accountant",
    ),
    (["dp.target_epsilon=-2"], "dp.target_epsilon' must be > 0"),
    (["dp.noise_multiplier=1", "dp.max_grad_norm=0"], "dp.max_grad_norm' must be > 0"),
    (["dp.noise_multiplier=1", "dp.accountant=gdp"], "dp.accountant' must be one of rdp, prv"),
    (["dp.noise=1"], "unknown config key 'dp.noise'"),
    (["dp.target_epsilon=3", "task=causal-lm"], "dp.* (DP-SGD) runs with task=classification only"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_dp_config_gets_a_one_line_error(overrides, message):
    with pytest.raises(FedLoraError) as info:  # a target's reachability: check_config's
        check_config(load_config(None, overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("overrides", "message"), BAD[:6])
def test_bad_dp_config_on_the_command_line_exits_2_with_one_line(overrides, message, capsys):
    assert cli.main(["run", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedlora: error: ") and message in err


def test_good_dp_config_is_enabled_and_off_by_default():
    assert not load_config(None, []).dp.enabled
    cfg = load_config(None, ["dp.target_epsilon=3", "dp.delta=1e-5", "dp.accountant=prv"])
    assert cfg.dp.enabled and cfg.dp.target_epsilon == 3.0 and cfg.dp.delta == 1e-5


@pytest.mark.parametrize("runtime", ["flower-sim", "flower"])
def test_dp_runs_on_every_runtime(runtime):
    """DP-SGD on Flower: each client keeps its own accountant (tests/runtime/test_flower_sim.py)."""
    assert runtime in RUNTIMES
    cfg = load_config(
        None, ["dp.noise_multiplier=1", f"runtime={runtime}", "superlink=h:1", "insecure=true"]
    )
    assert cfg.dp.enabled and cfg.runtime == runtime
