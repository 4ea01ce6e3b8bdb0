"""fedlora as a Flower app: ``server_app`` and ``client_app`` (Flower 1.41 Message API).

The ServerApp runs a fedlora method through :class:`FedLoRAStrategy` and writes the same
run directory as the in-process runtime (``metrics.jsonl``, ``summary.json``, ``adapter/``,
``plots/``; :mod:`fedlora.outputs.summary`). The ClientApp trains with
:func:`fedlora.client.train_client` (or its DP-SGD version, on the client's own accountant:
:class:`fedlora.privacy.NodeAccount`) and evaluates with
:func:`fedlora.client.evaluate_split` (perplexity too, for causal LMs): nothing about a
method is implemented here. Messages carry adapter tensors, the config and metrics, never
data.

Deployed (``flwr run``), the ServerApp reads the fedlora config from the run config key
``fedlora-config`` (YAML) and, when ``fedlora-resume`` is true, continues the run
directory's checkpoint (``fedlora run --resume``); in the simulation engine
:mod:`fedlora.runtime.flower.sim` builds a ServerApp around the config directly. Clients
get their config from the server with every message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.client import LocalTraining, evaluate_split, train_client
from fedlora.client.state import evaluate_personal, node_state_dir, node_store
from fedlora.config import Config
from fedlora.errors import FedLoraError
from fedlora.federation import Federation, build_federation
from fedlora.log import Log, silent, stderr_log
from fedlora.methods import Method, build_method
from fedlora.outputs import RunDir
from fedlora.outputs.run_dir import write_json
from fedlora.outputs.summary import warn_one_phase, write_results
from fedlora.runtime.checkpoint import Checkpoint, load_checkpoint, truncate_metrics
from fedlora.runtime.flower import codec
from fedlora.runtime.flower.client import LocalClient, local_client
from fedlora.runtime.flower.strategy import FedLoRAStrategy
from fedlora.runtime.server import Server

if TYPE_CHECKING:
    from fedlora.privacy import NodeAccount, ReportedPrivacy

RUN_CONFIG_KEY = "fedlora-config"
RESUME_KEY = "fedlora-resume"  # run config: continue the run directory's checkpoint
FLOWER_RUN_FILE = "flower-run.json"  # in the run directory: the Flower run writing it

# -- server ------------------------------------------------------------------------------


def run_rounds(
    grid: Grid,
    fed: Federation,
    method: Method,
    run_dir: RunDir,
    *,
    log: Log,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """The in-process ``run_federated`` contract, with the clients behind a Flower grid.

    With DP-SGD the server picks the noise (for ``dp.target_epsilon``, as in-process) and
    each client keeps its own accountant on its SuperNode; the server holds their reports
    (:class:`~fedlora.privacy.ReportedPrivacy`).
    """
    privacy: ReportedPrivacy | None = None
    if fed.cfg.dp.enabled:
        from fedlora.privacy import ReportedPrivacy, plan_for_federation  # Opacus: DP runs only

        privacy = ReportedPrivacy(plan_for_federation(fed, pools_clients=False))
        log(f"[{method.label}] {privacy.describe()}")
    server = Server(
        fed=fed, method=method, run_dir=run_dir, log=log, privacy=privacy, resume=resume
    )
    strategy = FedLoRAStrategy(server=server, privacy=privacy)
    strategy.connect(grid)
    strategy.start(grid=grid)
    return server.finish()


def serve(
    grid: Grid,
    cfg: Config,
    *,
    log: Log = stderr_log,
    resume: bool = False,
    flower_run_id: int | None = None,
) -> dict[str, Any]:
    """One fedlora run on the SuperNodes behind ``grid``; returns the run's summary.

    ``resume``: continue the run in ``output_dir/run_name`` after its last checkpoint
    (``fedlora run --resume``), as :func:`fedlora.recipes.resume` does in-process.
    """
    if cfg.run_name is None:
        raise FedLoraError("a Flower run needs a run_name (fedlora run sets one)")
    path = Path(cfg.output_dir) / cfg.run_name
    ckpt = None
    if resume:
        run_dir = RunDir.reopen(path)
        if (run_dir.path / "summary.json").is_file():
            log(f"{run_dir.path} already finished: nothing to resume")
            summary: dict[str, Any] = json.loads((run_dir.path / "summary.json").read_text())
            return summary
        ckpt = load_checkpoint(run_dir.path)
        truncate_metrics(run_dir.metrics_path, None if ckpt is None else ckpt.round)
    else:
        run_dir = RunDir(path, overwrite=cfg.overwrite)
        run_dir.write_config(cfg)
    if flower_run_id is not None:  # so that a resume can tell whether this run still runs
        write_json(run_dir.path / FLOWER_RUN_FILE, {"run_id": flower_run_id})
    fed = build_federation(cfg, log=log)
    method = build_method(cfg.method, cfg)
    if not resume:
        warn_one_phase(cfg, method, log)
    result = run_rounds(grid, fed, method, run_dir, log=log, resume=ckpt)
    return write_results(cfg, fed, result, run_dir)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    text = context.run_config.get(RUN_CONFIG_KEY)
    if not text:
        raise FedLoraError(
            f"run config key '{RUN_CONFIG_KEY}' is empty: launch with `fedlora run ... runtime=flower`"
        )
    cfg = codec.text_to_config(str(text))
    log = stderr_log if cfg.progress else silent
    try:
        serve(
            grid,
            cfg,
            log=log,
            resume=bool(context.run_config.get(RESUME_KEY, False)),
            flower_run_id=int(context.run_id),
        )
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
    # DP-SGD: this client's own accountant, on this node's disk; it may decline the round
    account = _account(cfg, ins, context, client)
    private = train_client if account is None else account.trainer(ins.plan.round)
    store = node_store(cfg, context.node_config, client.model.initial_state)
    # a stateful client (FedSA-LoRA): its own B from this node's store, only A sent back
    train = private if store is None else store.trainer(private)
    update = train(
        adapter=client.model.adapter,
        state=ins.state,
        data=client.train,
        plan=ins.plan,
        settings=LocalTraining.from_config(cfg),
        client_id=client.client_id,
        seed=cfg.seed,
    )
    content = codec.update_to_content(update)
    if account is not None:
        account.record(ins.plan.round, update)
        for key, value in account.report().items():  # the client's epsilon, with its reply
            content.metric_records["metrics"][key] = value
    return Message(content=content, reply_to=msg)


def _account(
    cfg: Config, ins: codec.Instruction, context: Context, client: LocalClient
) -> NodeAccount | None:
    """This client's privacy account on this node (None without DP)."""
    if not cfg.dp.enabled:
        return None
    if ins.noise_multiplier is None:
        raise FedLoraError("a DP-SGD run's message carries no noise multiplier")
    from fedlora.privacy import NodeAccount  # Opacus loads for DP runs only

    return NodeAccount.open(
        directory=node_state_dir(
            context.node_config, output_dir=cfg.output_dir, run_name=cfg.run_name
        ),
        client_id=client.client_id,
        dp=cfg.dp,
        noise_multiplier=ins.noise_multiplier,
        num_examples=len(client.train),
        batch_size=cfg.batch_size,
        steps_per_round=cfg.local_steps,
    )


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    ins = codec.content_to_instruction(msg.content)
    cfg = codec.text_to_config(ins.config)
    client = local_client(
        cfg, config_text=ins.config, node_config=context.node_config, label_names=ins.label_names
    )
    client.model.set_base(ins.base_delta)
    client.model.adapter.set_state(ins.state)
    scores = evaluate_split(  # accuracy and loss; perplexity too on causal-LM data
        client.model.adapter.model,
        client.eval,
        batch_size=cfg.eval_batch_size,
        precision=cfg.precision,
    )
    metrics = MetricRecord(
        {
            "client-id": client.client_id,
            **scores,
            "num-examples": len(client.eval),
            "num-train-examples": len(client.train),
        }
    )
    account = _account(cfg, ins, context, client)
    if account is not None:  # what this client has spent so far (it may have restarted)
        for key, value in account.report().items():
            metrics[key] = value
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
