"""``fedlora`` command line: ``run`` one method, ``compare`` several.

    fedlora run [CONFIG.yaml] [key=value ...]
    fedlora compare [CONFIG.yaml] [key=value ...]

Errors in the user's input print one line (``fedlora: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedlora import recipes
from fedlora.config import load_config
from fedlora.errors import FedLoraError
from fedlora.federation import silent, stderr_log


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, overrides = _split_args(args.args)
        cfg = load_config(path, overrides)
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
