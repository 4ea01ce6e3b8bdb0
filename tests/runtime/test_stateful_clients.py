"""Stateful clients (FedSA-LoRA): each client's ``B`` persists across rounds and never
travels; personalised accuracy in every evaluated row; resume after a kill equals an
uninterrupted run; a SuperNode's disk store persists between two ClientApp calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedlora.client import evaluate_split
from fedlora.client.state import ClientStore, DiskClientStore, with_private
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods import build_method
from fedlora.outputs import RunDir
from fedlora.runtime import inprocess
from fedlora.runtime.checkpoint import load_checkpoint

TIMINGS = ("time_train_s", "time_aggregate_s", "time_eval_s", "elapsed_s")


def part(seed: int) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return AdapterState(A={}, B={"l0": torch.randn(4, 2, generator=g)})


# -- the store ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_store_gives_the_newest_part_of_an_earlier_round(kind, tmp_path):
    """A client that trains in round t starts from its newest part of a round before t (a
    repeated round does not see the part its first attempt saved); the initial part
    before it has any; two versions are kept."""
    initial = AdapterState(A={"l0": torch.ones(2, 3)}, B={"l0": torch.zeros(4, 2)})
    store = (
        ClientStore(initial, private=("B",))
        if kind == "memory"
        else DiskClientStore(tmp_path / "s", initial, private=("B",))
    )
    assert store.initial.A == {} and torch.equal(store.get(0, before=1).B["l0"], initial.B["l0"])
    store.put(0, part(1), round=1)
    store.put(0, part(3), round=3)
    assert torch.equal(store.get(0, before=3).B["l0"], part(1).B["l0"])
    assert torch.equal(store.get(0, before=4).B["l0"], part(3).B["l0"])
    assert torch.equal(store.get(0).B["l0"], part(3).B["l0"])
    assert torch.equal(store.get(1).B["l0"], initial.B["l0"])  # never trained
    store.put(0, part(5), round=5)
    assert torch.equal(store.get(0, before=5).B["l0"], part(3).B["l0"])
    assert torch.equal(store.get(0, before=3).B["l0"], initial.B["l0"])  # round 1's is gone
    assert store.clients() == [0]
    if kind == "disk":
        assert sorted(p.name for p in (tmp_path / "s" / "client-0").iterdir()) == [
            "round-00003.safetensors",
            "round-00005.safetensors",
        ]


def test_store_state_dict_round_trips_the_newest_part():
    initial = AdapterState(A={}, B={"l0": torch.zeros(4, 2)})
    store = ClientStore(initial, private=("B",))
    store.put(2, part(1), round=1)
    store.put(2, part(2), round=4)
    again = ClientStore(initial, private=("B",))
    again.load_state_dict(store.state_dict())
    assert list(store.state_dict()) == ["2/4/B/l0"]
    assert torch.equal(again.get(2, before=5).B["l0"], part(2).B["l0"])
    assert again.clients() == [2]


def test_trainer_swaps_in_keeps_and_strips_the_private_part():
    """The wrapped trainer starts from the global A with the client's own B and head, keeps
    what it trained, and replies with A only."""
    initial = AdapterState(
        A={"l0": torch.zeros(2, 3)}, B={"l0": torch.zeros(4, 2)}, head={"h": torch.zeros(2)}
    )
    store = ClientStore(initial, private=("B", "head"))
    seen = []

    def fake_train(*, state, client_id, plan, **_):
        seen.append(state)
        return ClientUpdate(
            client_id=client_id,
            num_examples=5,
            A={"l0": state.A["l0"] + 1},
            B={"l0": state.B["l0"] + 2},
            head={"h": state.head["h"] + 3},
        )

    train = store.trainer(fake_train)
    shared = AdapterState(A={"l0": torch.full((2, 3), 7.0)}, B={}, head={})
    for t in (1, 2):
        sent = train(state=shared, client_id=0, plan=RoundPlan(t, "AB", True, "fedsa"))
        assert sent.B == {} and sent.head == {}
        assert sent.nbytes() == 2 * 3 * 4  # A only (float32)
        torch.testing.assert_close(sent.A["l0"], torch.full((2, 3), 8.0))
    torch.testing.assert_close(seen[0].B["l0"], torch.zeros(4, 2))
    torch.testing.assert_close(seen[1].B["l0"], torch.full((4, 2), 2.0))  # its own, kept
    torch.testing.assert_close(seen[1].head["h"], torch.full((2,), 3.0))
    torch.testing.assert_close(store.get(0).B["l0"], torch.full((4, 2), 4.0))


# -- in-process runs ---------------------------------------------------------------------


@pytest.fixture
def fedsa_cfg(tiny_overrides):
    return load_config(None, [*tiny_overrides, "method=fedsa", "rounds=3", "partition=dirichlet"])


def test_each_client_keeps_its_own_b_and_sends_only_a(fedsa_cfg, tmp_path, monkeypatch):
    """Across 3 rounds every client starts round t from the global A and the B (and head)
    it trained in round t - 1; the clients' B differ; the server receives and sends A only
    (bytes), reports no agg_error, and each evaluated row has every client's personalised
    accuracy (recomputed here) beside the global one."""
    starts: dict[tuple[int, int], AdapterState] = {}
    trained: dict[tuple[int, int], ClientUpdate] = {}
    real = inprocess.train_client

    def recording(**kwargs):
        update = real(**kwargs)
        key = (kwargs["plan"].round, kwargs["client_id"])
        starts[key], trained[key] = kwargs["state"], update
        return update

    monkeypatch.setattr(inprocess, "train_client", recording)
    fed = build_federation(fedsa_cfg, log=silent)
    method = build_method("fedsa", fedsa_cfg)
    result = inprocess.run_federated(fed, method, RunDir(tmp_path / "run"), log=silent)
    rows, state = result["rows"], result["state"]
    initial = fed.initial_state
    clients = range(fedsa_cfg.num_clients)
    assert sorted(trained) == [(t, c) for t in (1, 2, 3) for c in clients]
    for c in clients:
        for layer in initial.B:
            assert torch.equal(starts[1, c].B[layer], initial.B[layer])
            for t in (2, 3):
                assert torch.equal(starts[t, c].B[layer], trained[t - 1, c].B[layer])
        for name in initial.head:
            assert torch.equal(starts[2, c].head[name], trained[1, c].head[name])
    for layer in initial.B:
        assert not torch.equal(trained[3, 0].B[layer], trained[3, 1].B[layer])
        # the global model keeps B (and the head) as initialised: nothing else reaches it
        assert torch.equal(state.B[layer], initial.B[layer])
        assert not torch.equal(state.A[layer], initial.A[layer])
    a_bytes = sum(t.numel() * t.element_size() for t in initial.A.values())
    for row in rows[1:]:
        assert row["upload_bytes"] == row["download_bytes"] == a_bytes * len(clients)
        assert "agg_error" not in row
    sizes = {c: len(fed.encoded[c].eval) for c in clients}
    for row in rows:
        personal = row["client_personal_accuracy"]
        assert sorted(personal) == list(clients)
        mean = sum(personal[c] * sizes[c] for c in clients) / sum(sizes.values())
        assert row["personal_accuracy"] == pytest.approx(mean, abs=1e-12)
    assert rows[0]["client_personal_accuracy"] == rows[0]["client_accuracy"]  # nothing trained
    # Client 1's own model after round 3: the final global A with its own B and head.
    own = with_private(state, AdapterState(A={}, B=trained[3, 1].B, head=trained[3, 1].head))
    fed.adapter.set_state(own)
    expect = evaluate_split(fed.adapter.model, fed.encoded[1].eval, batch_size=64)["accuracy"]
    assert rows[-1]["client_personal_accuracy"][1] == pytest.approx(expect, abs=1e-12)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.round == 3
    for layer, B in trained[3, 2].B.items():
        assert torch.equal(ckpt.clients[f"2/3/B/{layer}"], B.cpu())


def fedlora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def metrics(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.mark.integration
def test_resume_after_sigkill_mid_round_keeps_each_clients_b(tiny_overrides, tmp_path):
    """Killed (SIGKILL) in round 3 after one client trained, and resumed: the same rows
    (personalised accuracies included), the same global adapter and the same private part
    of every client, bit for bit, as the run left alone."""
    args = [
        *[o for o in tiny_overrides if not o.startswith(("rounds=", "run_name="))],
        "method=fedsa",
        "rounds=4",
        "client_fraction=0.67",  # a client not sampled in a round keeps its B unchanged
        "lora_dropout=0.1",
    ]
    runs = tmp_path / "runs"
    done = fedlora("run", *args, "run_name=ref")
    assert done.returncode == 0, done.stderr
    killed = fedlora("run", *args, "run_name=k", env={"FEDLORA_DEBUG_KILL": "train:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = fedlora("run", "--resume", str(runs / "k"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round 2/4" in resumed.stderr, resumed.stderr
    assert metrics(runs / "k") == metrics(runs / "ref")
    assert "personal_accuracy" in metrics(runs / "ref")[-1]
    name = "adapter_model.safetensors"
    got, want = (load_file(runs / run / "adapter" / name) for run in ("k", "ref"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    got_c, want_c = load_checkpoint(runs / "k"), load_checkpoint(runs / "ref")
    assert got_c is not None and want_c is not None
    assert got_c.clients.keys() == want_c.clients.keys() and want_c.clients
    assert all(got_c.clients[k].equal(want_c.clients[k]) for k in want_c.clients)


# -- a SuperNode's store (the ClientApp's handlers called directly) ----------------------


def test_supernode_keeps_its_clients_b_on_disk_between_two_calls(
    tiny_overrides, tmp_path, monkeypatch
):
    """The ClientApp's train handler for client 0 in rounds 1 and 2 (``state-dir`` in the
    node config): round 2 starts from the B that round 1 saved on the node, round 2 run
    again (after a server resume) starts from it too, no reply carries a B or the head; the
    evaluate handler's personalised accuracy (client 0's own model) reaches the row."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.runtime.flower import app, codec
    from fedlora.runtime.flower.strategy import FedLoRAStrategy
    from fedlora.runtime.server import Server

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = load_config(None, [*tiny_overrides, "method=fedsa", "runtime=flower-sim"])
    fed = build_federation(cfg, log=silent)
    initial, state_dir = fed.initial_state, tmp_path / "node-0"
    starts: list[AdapterState] = []
    real = app.train_client

    def recording(**kwargs):
        starts.append(kwargs["state"])
        return real(**kwargs)

    monkeypatch.setattr(app, "train_client", recording)
    context = Context(
        run_id=1,
        node_id=1000,
        node_config={"partition-id": 0, "state-dir": str(state_dir)},
        state=RecordDict(),
        run_config={},
    )

    def message(plan: RoundPlan | None, state: AdapterState) -> Message:
        ins = codec.Instruction(
            config=codec.config_to_text(cfg),
            label_names=list(fed.dataset.label_names),
            state=state,
            base_delta={},
            plan=plan,
        )
        kind = MessageType.EVALUATE if plan is None else MessageType.TRAIN
        return Message(
            content=codec.instruction_to_content(ins), dst_node_id=1000, message_type=kind
        )

    shared = AdapterState(A=dict(initial.A), B={})  # what the server sends: A only
    for t in (1, 2, 2):
        reply = app._train(message(RoundPlan(t, "AB", True, "fedsa"), shared), context)
        update = codec.content_to_update(reply.content)
        assert update.A and update.B == {} and update.head == {}
    node_dir = state_dir / cfg.run_name  # one folder per run under the node's state-dir
    saved = sorted(p.name for p in (node_dir / "client-0").iterdir())
    assert saved == ["round-00001.safetensors", "round-00002.safetensors"]
    round_1 = load_file(node_dir / "client-0" / "round-00001.safetensors")
    for layer in initial.B:
        assert torch.equal(starts[0].B[layer], initial.B[layer])
        assert not torch.equal(round_1[f"B/{layer}"], initial.B[layer])
        assert torch.equal(starts[1].B[layer], round_1[f"B/{layer}"])
        assert torch.equal(starts[2].B[layer], round_1[f"B/{layer}"])  # the repeated round
    for name in initial.head:
        assert torch.equal(starts[1].head[name], round_1[f"head/{name}"])

    reply = app._evaluate(message(None, initial), context)
    got = reply.content.metric_records["metrics"]
    own = DiskClientStore(node_dir, initial, private=("B", "head", "magnitude")).get(0)
    fed.adapter.set_state(with_private(initial, own))
    expect = evaluate_split(fed.adapter.model, fed.encoded[0].eval, batch_size=64)["accuracy"]
    assert float(got["personal-accuracy"]) == pytest.approx(expect, abs=1e-12)
    server = Server(
        fed=fed, method=build_method("fedsa", cfg), run_dir=RunDir(tmp_path / "run"), log=silent
    )
    strategy = FedLoRAStrategy(server=server)
    strategy.aggregate_evaluate(0, [reply])
    assert strategy.row["client_personal_accuracy"] == {0: float(got["personal-accuracy"])}
    assert strategy.row["personal_accuracy"] == float(got["personal-accuracy"])
