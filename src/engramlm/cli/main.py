"""The ``engramlm`` command line: one sub-module per command group, each exposing ``register``.

Each command module defines ``register(subparsers)`` which adds its parser(s) and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from engramlm import __version__
from engramlm.errors import EngramError

# Command modules, in help order. A module missing here is simply not offered.
COMMAND_MODULES = (
    "engramlm.cli.demo_cmd",
    "engramlm.cli.hash_cmd",
    "engramlm.cli.info_cmd",
    "engramlm.cli.data_cmd",
    "engramlm.cli.store_cmd",
    "engramlm.cli.train_cmd",
    "engramlm.cli.eval_cmd",
    "engramlm.cli.plot_cmd",
    "engramlm.cli.analyze_cmd",
    "engramlm.cli.generate_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engramlm", description="Engram conditional memory: hashing, models, stores.")
    parser.add_argument("--version", action="version", version=f"engramlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EngramError as exc:
        print(f"engramlm: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
