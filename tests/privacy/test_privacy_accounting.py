"""Each client's epsilon, recomputed independently with Opacus from what the run reports."""

import json
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedlora import recipes
from fedlora.config import DPConfig, load_config
from fedlora.outputs import read_metrics
from fedlora.privacy import ClientPrivacy, FederatedPrivacy

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def opacus_epsilon(accountant: str, *, sigma: float, q: float, steps: int, delta: float) -> float:
    """A fresh Opacus accountant stepped one DP-SGD step at a time."""
    acc = OPACUS[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def run_dp(tiny_overrides, *extra: str) -> tuple[dict, list[dict]]:
    cfg = load_config(None, [*tiny_overrides, *extra])
    recipes.run(cfg, log=lambda line: None)
    run_dir = Path(cfg.output_dir) / "t"
    return json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_recomputed_from_summary(tiny_overrides, accountant):
    summary, rows = run_dp(
        tiny_overrides,
        "method=fedavg",
        "dp.noise_multiplier=0.8",
        "dp.delta=1e-5",
        f"dp.accountant={accountant}",
    )
    dp = summary["dp"]
    assert (dp["noise_multiplier"], dp["delta"], dp["accountant"]) == (0.8, 1e-5, accountant)
    for cid, n in summary["client_train_sizes"].items():
        # Poisson sampling at the configured expected batch size (8), 2 rounds x 2 steps
        assert dp["sample_rate"][cid] == pytest.approx(min(8, n) / n)
        assert dp["steps"][cid] == 4
        expected = opacus_epsilon(
            accountant,
            sigma=dp["noise_multiplier"],
            q=dp["sample_rate"][cid],
            steps=dp["steps"][cid],
            delta=dp["delta"],
        )
        assert rows[-1]["epsilon"][cid] == pytest.approx(expected, rel=1e-9)
        assert dp["epsilon"][cid] == pytest.approx(expected, rel=1e-9)
        # and every round's value is the account after that round's steps
        after_round_1 = opacus_epsilon(
            accountant, sigma=0.8, q=dp["sample_rate"][cid], steps=2, delta=1e-5
        )
        assert rows[1]["epsilon"][cid] == pytest.approx(after_round_1, rel=1e-9)
        assert 0 < after_round_1 < expected


def test_target_epsilon_picks_the_noise_for_the_planned_steps(tiny_overrides):
    summary, rows = run_dp(tiny_overrides, "method=ffa", "dp.target_epsilon=3")
    dp = summary["dp"]
    worst_q = max(dp["sample_rate"].values())
    planned = summary["rounds"] * 2  # every client trains every round, 2 local steps
    assert dp["noise_multiplier"] == pytest.approx(
        get_noise_multiplier(
            target_epsilon=3.0,
            target_delta=1e-5,
            sample_rate=worst_q,
            steps=planned,
            accountant="rdp",
        )
    )
    for cid, eps in rows[-1]["epsilon"].items():
        assert 2.9 < eps <= 3.0  # Opacus' search stops within 0.01 below the target
        assert dp["steps"][cid] == planned
    assert all(r["dp_exhausted"] == [] for r in rows)
    assert all(r["clients"] == [0, 1, 2] for r in rows[1:])


def test_client_over_budget_stops_training_and_the_run_says_so(tiny_overrides, tmp_path):
    # 1 client of 3 per round over 5 rounds: each client is planned for ceil(5/3) = 2 rounds,
    # and in 4 rounds at least one client is sampled twice: it must not train a third time.
    lines: list[str] = []
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "method=rolora",
            "rounds=5",
            "client_fraction=0.34",
            "dp.target_epsilon=3",
        ],
    )
    recipes.run(cfg, log=lines.append)
    rows = read_metrics(Path(cfg.output_dir) / "t")
    stopped = [r for r in rows if r["dp_exhausted"]]
    assert stopped, "no client ran out of budget"
    first = stopped[0]
    for cid in first["dp_exhausted"]:
        assert any(f"client {cid} stops training" in line for line in lines)
        later = [r for r in rows if r["round"] > first["round"]]
        assert all(cid not in r["clients"] for r in later)
    summary = json.loads((Path(cfg.output_dir) / "t" / "summary.json").read_text())
    assert all(eps <= 3.0 for eps in summary["dp"]["epsilon"].values())
    assert set(map(str, first["dp_exhausted"])) <= set(map(str, summary["dp"]["exhausted"]))


def test_privacy_state_resumes_the_account():
    def client() -> ClientPrivacy:
        return ClientPrivacy(
            noise_multiplier=1.1,
            max_grad_norm=1.0,
            num_examples=100,
            batch_size=10,
            steps_per_round=3,
        )

    uninterrupted, first, resumed = client(), client(), client()
    for _ in range(8):
        uninterrupted.accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    for _ in range(5):
        first.accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through summary.json
    assert resumed.steps == 5 and resumed.epsilon(1e-5) == first.epsilon(1e-5) > 0
    for _ in range(3):
        resumed.accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    assert resumed.epsilon(1e-5) == pytest.approx(uninterrupted.epsilon(1e-5), rel=1e-12)
    assert first.epsilon_after_round(1e-5) == pytest.approx(uninterrupted.epsilon(1e-5), rel=1e-12)

    ledger = FederatedPrivacy(DPConfig(target_epsilon=3.0), {0: first, 1: client()})
    ledger.exhausted = [0]
    fresh = FederatedPrivacy(DPConfig(target_epsilon=3.0), {0: client(), 1: client()})
    fresh.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert fresh.epsilons() == ledger.epsilons() and fresh.trainable([0, 1]) == [1]
