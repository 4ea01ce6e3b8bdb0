"""The Flower strategy and ClientApp handlers called directly (no Flower runtime): a
SuperNode that never answers, or that the SuperLink reports offline, is logged and left
out; too few answers stop the round."""

from __future__ import annotations

from uuid import uuid4

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.methods import build_method
from fedlora.outputs import RunDir
from fedlora.runtime.flower import app
from fedlora.runtime.flower.strategy import FedLoRAStrategy
from fedlora.runtime.server import Server

NODES = {0: 1000, 1: 1001, 2: 1002}  # client id -> SuperNode id


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The identity Flower gives the ServerApp's process (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def strategy_for(tiny_overrides, tmp_path, *extra: str) -> FedLoRAStrategy:
    cfg = load_config(None, [*tiny_overrides, "method=fedavg", "runtime=flower-sim", *extra])
    fed = build_federation(cfg, log=silent)
    server = Server(
        fed=fed, method=build_method("fedavg", cfg), run_dir=RunDir(tmp_path / "run"), log=silent
    )
    strategy = FedLoRAStrategy(server=server)
    strategy.nodes = dict(NODES)
    return strategy


def answer(messages, *, silent_clients: set[int]):
    """Run the ClientApp's train handler for each message, as its SuperNode would."""
    by_node = {node: cid for cid, node in NODES.items()}
    replies = []
    for msg in messages:
        cid = by_node[msg.metadata.dst_node_id]
        if cid in silent_clients:
            continue
        context = Context(
            run_id=1,
            node_id=msg.metadata.dst_node_id,
            node_config={"partition-id": cid},
            state=RecordDict(),
            run_config={},
        )
        replies.append(app._train(msg, context))
    return replies


def test_a_supernode_that_never_answers_is_logged_and_left_out(tiny_overrides, tmp_path):
    strategy = strategy_for(tiny_overrides, tmp_path, "min_clients=2")
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES.values())
    arrays, _ = strategy.aggregate_train(1, answer(messages, silent_clients={1}))
    assert arrays is not None
    assert strategy.row["clients"] == [0, 2]
    (failure,) = strategy.failures
    assert failure["client"] == 1 and failure["stage"] == "train"
    assert "no reply within round_timeout" in failure["error"]
    # Only the two replies were aggregated, and the download counts all three messages.
    assert strategy.row["upload_bytes"] == 2 * strategy.state.nbytes()
    assert strategy.row["download_bytes"] == 3 * strategy.state.nbytes()


def test_an_offline_supernode_is_logged_as_its_own_client(tiny_overrides, tmp_path):
    """The SuperLink answers for a SuperNode it declared offline, with an error reply from
    itself (src_node_id = the SuperLink): the failure belongs to the offline node's client."""
    strategy = strategy_for(tiny_overrides, tmp_path, "min_clients=2")
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    for msg in messages:  # what the grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = str(uuid4())
    (to_2,) = [m for m in messages if m.metadata.dst_node_id == NODES[2]]
    offline = create_message_error_unavailable_res_message(to_2.metadata, "node_unavail")
    assert offline.metadata.src_node_id == SUPERLINK_NODE_ID
    strategy.aggregate_train(1, [*answer(messages, silent_clients={2}), offline])
    assert strategy.row["clients"] == [0, 1]
    (failure,) = strategy.failures
    assert failure["client"] == 2 and failure["stage"] == "train"
    assert "Node Unavailable" in failure["error"]


def test_fewer_replies_than_min_clients_stop_the_round(tiny_overrides, tmp_path):
    strategy = strategy_for(tiny_overrides, tmp_path, "min_clients=3")
    before = strategy.state
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    with pytest.raises(
        FedLoraError, match="2 of 3 sampled clients replied, fewer than min_clients=3"
    ):
        strategy.aggregate_train(1, answer(messages, silent_clients={2}))
    assert strategy.state is before  # nothing was aggregated
