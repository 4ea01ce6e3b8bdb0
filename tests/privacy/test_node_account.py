"""A SuperNode's own accountant (:class:`fedlora.privacy.NodeAccount`): kept on the node's
disk across processes, declining once the budget is spent, and counting a round the
server repeats only when the release differs."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedlora.config import DPConfig
from fedlora.messages import ClientUpdate
from fedlora.privacy import BudgetSpent, NodeAccount, ReportedPrivacy
from fedlora.privacy.accounting import FederatedPrivacy
from fedlora.privacy.remote import EPSILON, EXHAUSTED, SAMPLE_RATE, STEPS

SIGMA, N, BATCH, STEPS_PER_ROUND, DELTA = 1.1, 40, 8, 3, 1e-5


def open_account(tmp_path, *, target=None, secure=False) -> NodeAccount:
    """A fresh object each time, as a fresh ClientApp process would build it."""
    budget = {"target_epsilon": target} if target else {"noise_multiplier": SIGMA}
    dp = DPConfig(**budget, delta=DELTA, secure_mode=secure)
    return NodeAccount.open(
        directory=tmp_path,
        client_id=2,
        dp=dp,
        noise_multiplier=SIGMA,
        num_examples=N,
        batch_size=BATCH,
        steps_per_round=STEPS_PER_ROUND,
    )


def update(value: float) -> ClientUpdate:
    return ClientUpdate(
        client_id=2,
        num_examples=N,
        A={"l": torch.full((2, 3), value)},
        B={"l": torch.zeros(4, 2)},
        head={},
        train_loss=0.5,
    )


def train(account: NodeAccount, round: int, value: float) -> None:
    """What a DP-SGD round does to the account (the optimizer hook's steps), then record."""
    account.trainer(round)
    for _ in range(STEPS_PER_ROUND):
        account.privacy.accountant.step(noise_multiplier=SIGMA, sample_rate=BATCH / N)
    account.record(round, update(value))


def opacus_epsilon(steps: int) -> float:
    reference = RDPAccountant()
    reference.history = [(SIGMA, BATCH / N, steps)]
    return float(reference.get_epsilon(delta=DELTA))


def test_the_account_is_kept_on_disk_and_equals_opacus(tmp_path):
    assert open_account(tmp_path).report()[EPSILON] == 0.0
    for t in (1, 2):
        train(open_account(tmp_path), t, value=float(t))
    again = open_account(tmp_path)  # a restarted node reads its account back
    report = again.report()
    assert report[STEPS] == 2 * STEPS_PER_ROUND and report[SAMPLE_RATE] == BATCH / N
    assert report[EPSILON] == pytest.approx(opacus_epsilon(2 * STEPS_PER_ROUND), rel=1e-12)
    saved = json.loads((tmp_path / "client-2" / "privacy.json").read_text())
    assert saved["client"] == 2 and sorted(saved["rounds"]) == ["1", "2"]


def test_a_repeated_round_costs_nothing_only_when_its_release_is_identical(tmp_path):
    train(open_account(tmp_path), 1, value=1.0)
    train(open_account(tmp_path), 2, value=2.0)
    # the server was restarted from round 1's checkpoint and repeats round 2
    train(open_account(tmp_path), 2, value=2.0)  # bit-identical update: a copy
    assert open_account(tmp_path).report()[STEPS] == 2 * STEPS_PER_ROUND
    train(open_account(tmp_path), 2, value=2.5)  # another release of round 2: counted
    report = open_account(tmp_path).report()
    assert report[STEPS] == 3 * STEPS_PER_ROUND
    assert report[EPSILON] == pytest.approx(opacus_epsilon(3 * STEPS_PER_ROUND), rel=1e-12)


def test_a_client_whose_next_round_exceeds_the_target_declines(tmp_path):
    # a target between the epsilon after 2 and after 3 rounds
    target = (opacus_epsilon(2 * STEPS_PER_ROUND) + opacus_epsilon(3 * STEPS_PER_ROUND)) / 2
    train(open_account(tmp_path, target=target), 1, value=1.0)
    assert open_account(tmp_path, target=target).report()[EXHAUSTED] == 0
    train(open_account(tmp_path, target=target), 2, value=2.0)
    spent = open_account(tmp_path, target=target)
    assert spent.report()[EXHAUSTED] == 1
    with pytest.raises(BudgetSpent, match=r"^budget spent: client 2 declines to train round 3"):
        spent.trainer(3)
    # a repeat of round 2 is decided on the account before round 2, as the first time
    open_account(tmp_path, target=target).trainer(2)
    with pytest.raises(BudgetSpent):  # unless fresh noise makes it a new release
        open_account(tmp_path, target=target, secure=True).trainer(2)
    assert open_account(tmp_path, target=target).report()[EPSILON] <= target


def test_the_server_reads_reports_like_the_in_process_accountants():
    dp = DPConfig(target_epsilon=8.0, delta=DELTA)
    plan = FederatedPrivacy.plan(
        dp,
        num_examples={0: 40, 1: 40, 2: 20},
        batch_size=BATCH,
        steps_per_round=dict.fromkeys(range(3), 2),
        planned_rounds=dict.fromkeys(range(3), 2),
    )
    reported = ReportedPrivacy(plan)
    assert reported.noise_multiplier == plan.noise_multiplier
    assert reported.metrics() == {"epsilon": {0: 0.0, 1: 0.0, 2: 0.0}, "dp_exhausted": []}
    reported.report(1, {EPSILON: 7.5, STEPS: 4, SAMPLE_RATE: 0.2, EXHAUSTED: 1})
    reported.report(0, {"accuracy": 0.5})  # a reply without an account changes nothing
    assert reported.end_round() == [1] and reported.end_round() == []
    assert reported.trainable([0, 1, 2]) == [0, 2]
    again = ReportedPrivacy(plan)
    again.load_state_dict(json.loads(json.dumps(reported.state_dict())))  # a checkpoint
    assert (
        again.metrics()
        == reported.metrics()
        == {
            "epsilon": {0: 0.0, 1: 7.5, 2: 0.0},
            "dp_exhausted": [1],
        }
    )
    assert again.summary()["steps"] == {0: 0, 1: 4, 2: 0}
