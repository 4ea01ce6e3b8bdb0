"""fedlora as a Flower app: ``server_app`` and ``client_app`` (Flower 1.41 Message API).

The ServerApp runs a fedlora method through :class:`FedLoRAStrategy` and writes the same
run directory as the in-process runtime (``metrics.jsonl``, ``summary.json``, ``adapter/``,
``plots/``). The ClientApp trains with :func:`fedlora.client.train_client` and evaluates
with :func:`fedlora.client.evaluate`: nothing about a method is implemented here. Messages
carry adapter tensors, the config and metrics, never data.

Deployed (``flwr run``), the ServerApp reads the fedlora config from the run config key
``fedlora-config`` (YAML); in the simulation engine :mod:`fedlora.runtime.flower.sim`
builds a ServerApp around the config directly. Clients get their config from the server
with every message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora import recipes
from fedlora.client import LocalTraining, evaluate, evaluate_split, train_client
from fedlora.client.state import evaluate_personal, node_store
from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.federation import Federation, Log, build_federation, silent, stderr_log
from fedlora.methods import Method
from fedlora.outputs import RunDir
from fedlora.runtime.flower import codec
from fedlora.runtime.flower.client import local_client
from fedlora.runtime.flower.strategy import FedLoRAStrategy
from fedlora.runtime.server import Server

RUN_CONFIG_KEY = "fedlora-config"

# -- server ------------------------------------------------------------------------------


def run_rounds(
    grid: Grid, fed: Federation, method: Method, run_dir: RunDir, *, log: Log
) -> dict[str, Any]:
    """The in-process ``run_federated`` contract, with the clients behind a Flower grid."""
    server = Server(fed=fed, method=method, run_dir=run_dir, log=log)
    strategy = FedLoRAStrategy(server=server)
    strategy.connect(grid)
    strategy.start(grid=grid)
    return server.finish()


def serve(grid: Grid, cfg: Config, *, log: Log = stderr_log) -> dict[str, Any]:
    """One fedlora run on the SuperNodes behind ``grid``; returns the run's summary."""
    if cfg.run_name is None:
        raise FedLoraError("a Flower run needs a run_name (fedlora run sets one)")
    run_dir = RunDir(Path(cfg.output_dir) / cfg.run_name, overwrite=cfg.overwrite)
    fed = build_federation(cfg, log=log)
    return recipes.run_method(
        cfg,
        fed,
        run_dir,
        log=log,
        rounds=lambda f, m, d, *, log: run_rounds(grid, f, m, d, log=log),
    )


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    text = context.run_config.get(RUN_CONFIG_KEY)
    if not text:
        raise FedLoraError(
            f"run config key '{RUN_CONFIG_KEY}' is empty: launch with `fedlora run ... runtime=flower`"
        )
    cfg = codec.text_to_config(str(text))
    try:
        serve(grid, cfg, log=stderr_log if cfg.progress else silent)
    except FedLoraError as exc:
        stderr_log(f"fedlora: error: {exc}")  # the one line the run's log ends with
        raise


# -- client ------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    ins = codec.content_to_instruction(msg.content)
    assert ins.plan is not None, "a train message carries a round plan"
    cfg = codec.text_to_config(ins.config)
    client = local_client(
        cfg, config_text=ins.config, node_config=context.node_config, label_names=ins.label_names
    )
    if cfg.fail_client_round == [client.client_id, ins.plan.round]:
        # Test hook (config key fail_client_round): this client raises in this round.
        raise RuntimeError(
            f"fail_client_round: client {client.client_id} fails in round {ins.plan.round}"
        )
    client.model.set_base(ins.base_delta)
    store = node_store(cfg, context.node_config, client.model.initial_state)
    # a stateful client (FedSA-LoRA): its own B from this node's store, only A sent back
    train = train_client if store is None else store.trainer(train_client)
    update = train(
        adapter=client.model.adapter,
        state=ins.state,
        data=client.train,
        plan=ins.plan,
        settings=LocalTraining.from_config(cfg),
        client_id=client.client_id,
        seed=cfg.seed,
    )
    return Message(content=codec.update_to_content(update), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    ins = codec.content_to_instruction(msg.content)
    cfg = codec.text_to_config(ins.config)
    client = local_client(
        cfg, config_text=ins.config, node_config=context.node_config, label_names=ins.label_names
    )
    client.model.set_base(ins.base_delta)
    client.model.adapter.set_state(ins.state)
    accuracy, loss = evaluate(
        client.model.adapter.model,
        client.eval,
        batch_size=cfg.eval_batch_size,
        precision=cfg.precision,
    )
    metrics = MetricRecord(
        {
            "client-id": client.client_id,
            "accuracy": accuracy,
            "loss": loss,
            "num-examples": len(client.eval),
            "num-train-examples": len(client.train),
        }
    )
    store = node_store(cfg, context.node_config, client.model.initial_state)
    if store is not None:  # this client's own model too: the global A with its own B
        (own,) = evaluate_personal(
            adapter=client.model.adapter,
            store=store,
            splits={client.client_id: client.eval},
            evaluate=lambda data: evaluate_split(
                client.model.adapter.model,
                data,
                batch_size=cfg.eval_batch_size,
                precision=cfg.precision,
            ),
        ).values()
        metrics["personal-accuracy"] = own["accuracy"]
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
