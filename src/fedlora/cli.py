"""``fedlora`` command line: ``run`` one method, ``compare`` several.

    fedlora run [CONFIG.yaml] [key=value ...]
    fedlora compare [CONFIG.yaml] [key=value ...]
    fedlora run --resume RUN_DIR
    fedlora sweep [CONFIG.yaml] [key=value ...] --grid key=v1,v2 [--grid ...]
    fedlora report RUNS_DIR
    fedlora experiment linear [--out DIR]
    fedlora experiment upload
    fedlora keys make OUT_DIR NAME [NAME ...]
    fedlora keys register --superlink HOST:PORT --root-certificates CA PUBLIC_KEY [...]
    fedlora keys list --superlink HOST:PORT --root-certificates CA

Errors in the user's input print one line (``fedlora: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fedlora import recipes
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.log import silent, stderr_log
from fedlora.methods import check_config


def _split_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The optional config file comes first; everything else is key=value."""
    path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif path is None:
            path = item
        else:
            raise FedLoraError(
                f"unexpected argument '{item}': give one config file and key=value overrides"
            )
    return path, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA fine-tuning: compare aggregation methods."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run one method (config key 'method')"),
        ("compare", "run every method in config key 'methods' on the same setup"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "args",
            nargs="*",
            metavar="CONFIG|key=value",
            help="an optional YAML config file, then key=value overrides",
        )
        if name == "run":
            p.add_argument(
                "--resume",
                metavar="RUN_DIR",
                help="continue a killed in-process run from its last checkpoint",
            )
    p = sub.add_parser("sweep", help="one run per point of a grid; skips finished runs")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--grid", action="append", default=[], metavar="key=v1,v2", help="a grid axis")
    p = sub.add_parser("report", help="markdown tables and plots from finished runs")
    p.add_argument("runs_dir", metavar="RUNS_DIR")
    p = sub.add_parser("experiment", help="the papers' analytical experiments")
    p.add_argument("name", choices=["linear", "upload"])
    p.add_argument("--out", default="runs/linear", help="directory for the plot and table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layers",
        type=_blocks,
        default=None,
        metavar="FIRST-LAST",
        help="upload: the transformer blocks with LoRA (e.g. 18-23, RoLoRA's P2 for SST-2); "
        "default all 24",
    )
    _add_keys_parser(sub)
    return parser


def _add_keys_parser(sub: Any) -> None:
    """``fedlora keys``: SuperNode authentication (docs/deployment.md, "Node authentication")."""
    p = sub.add_parser("keys", help="SuperNode key pairs and the SuperLink's list of nodes")
    keys = p.add_subparsers(dest="keys_command", required=True)
    make = keys.add_parser("make", help="one EC key pair per SuperNode: NAME.key, NAME.pub")
    make.add_argument("out_dir", metavar="OUT_DIR")
    make.add_argument("names", nargs="+", metavar="NAME")
    for name, help_text in (
        ("register", "put SuperNodes' public keys on the SuperLink's list"),
        ("list", "the SuperNodes on the SuperLink's list, with their status"),
    ):
        q = keys.add_parser(name, help=help_text)
        q.add_argument("--superlink", required=True, metavar="HOST:PORT")
        q.add_argument("--root-certificates", required=True, metavar="CA")
        if name == "register":
            q.add_argument("public_keys", nargs="+", metavar="PUBLIC_KEY")


def _keys(args: argparse.Namespace) -> None:
    from fedlora.runtime.flower import keys

    if args.keys_command == "make":
        for private, public in keys.make_node_keys(args.out_dir, args.names):
            print(f"{private} (stays on the SuperNode), {public} (register it)", flush=True)
    elif args.keys_command == "register":
        registered = keys.register_nodes(
            args.public_keys, superlink=args.superlink, root_certificates=args.root_certificates
        )
        for key, node_id in registered.items():
            print(f"{key}: node {node_id}", flush=True)
    else:
        nodes = keys.list_nodes(superlink=args.superlink, root_certificates=args.root_certificates)
        for node in nodes:
            print(f"node {node['node-id']}: {node['status']}", flush=True)


def _blocks(text: str) -> list[int]:
    """``18-23`` or ``18,19,20`` -> block indices."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            blocks = list(range(first, last + 1))
        else:
            blocks = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a block range: {text!r} (use e.g. 18-23)") from None
    if not blocks or min(blocks) < 0:
        raise argparse.ArgumentTypeError(f"not a block range: {text!r} (use e.g. 18-23)")
    return blocks


def _other(args: argparse.Namespace) -> bool:
    """sweep, report, experiment; False for run and compare."""
    from fedlora import reproduce

    if args.command == "sweep":
        path, overrides = _split_args(args.args)
        reproduce.sweep(path, overrides, reproduce.parse_grid(args.grid))
    elif args.command == "keys":
        _keys(args)
    elif args.command == "report":
        print(reproduce.write_report(args.runs_dir), flush=True)
    elif args.command == "experiment":
        if args.name == "upload":  # RoLoRA Table 6, from RoBERTa-Large's config
            from fedlora.reproduce.upload import roberta_large_config, upload_table

            print(upload_table(roberta_large_config(), layers=args.layers), flush=True)
        else:
            from fedlora.reproduce.linear import run_linear

            print(run_linear(out_dir=args.out, seed=args.seed), flush=True)
    else:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "resume", None):
            if args.args:
                raise FedLoraError("--resume takes the run directory only: no config or overrides")
            recipes.resume(args.resume)
            return 0
        if _other(args):
            return 0
        path, overrides = _split_args(args.args)
        cfg = load_config(path, overrides)
        check_config(cfg)
        log = stderr_log if cfg.progress else silent
        if args.command == "run":
            recipes.run(cfg, log=log)
        else:
            recipes.compare(cfg, log=log)
    except FedLoraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; metrics written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
