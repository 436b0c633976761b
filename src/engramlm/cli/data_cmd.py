"""``engramlm data prepare``: build a corpus, tokenizer and token shards from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from engramlm.data.build import prepare, summary
from engramlm.data.corpora import SOURCE_KINDS, SourceSpec
from engramlm.data.tokenizer import DEFAULT_VOCAB_SIZE
from engramlm.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``data`` command group with its ``prepare`` subcommand."""
    data = subparsers.add_parser("data", help="prepare corpora, tokenizer and token shards")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help="build (or reuse) a prepared corpus directory")
    p.add_argument(
        "--source",
        type=_source,
        required=True,
        metavar="KIND[:PATH]",
        help=f"one of {', '.join(SOURCE_KINDS)}; dir and jsonl take their path as dir:PATH / jsonl:PATH (or --path)",
    )
    p.add_argument("--path", help="directory (dir) or file (jsonl) to read (or --source KIND:PATH)")
    p.add_argument("--glob", default="**/*.txt", help="file pattern for --source dir")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (jsonl)")
    p.add_argument("--id-field", default=None, help="JSON field holding a document id (jsonl)")
    p.add_argument("--exclude-gui", action="store_true", help="stdlib: also skip idlelib, tkinter and lib2to3")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--max-bytes", type=int, default=None, help="tiny slice of about this size")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads")
    p.add_argument("--cache-dir", default=None, help="download cache (default $ENGRAMLM_CACHE)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    data.set_defaults(func=lambda _args: data.print_help() or 2)


def _source(text: str) -> tuple[str, str | None]:
    """``--source KIND`` or ``--source KIND:PATH`` (the form configs' ``data.source`` uses too)."""
    kind, sep, path = text.partition(":")
    if kind not in SOURCE_KINDS:
        raise argparse.ArgumentTypeError(f"{kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if sep and kind not in ("dir", "jsonl"):
        raise argparse.ArgumentTypeError(f"{kind} takes no path, got {text!r}")
    if sep and not path:
        raise argparse.ArgumentTypeError(f"{text!r} names no path: use {kind}:PATH")
    return kind, path or None


def run(args: argparse.Namespace) -> int:
    """Run ``data prepare`` and print a JSON summary of the build."""
    kind, path = args.source
    if path and args.path and path != args.path:
        raise ConfigError(f"--path: {args.path} and --source {kind}:{path} name two different inputs; give one")
    if kind in ("dir", "jsonl") and not (path or args.path):
        raise ConfigError(f"--source: {kind} needs a path: --source {kind}:PATH")
    spec = SourceSpec(
        kind=kind,
        path=path or args.path,
        glob=args.glob,
        text_field=args.text_field,
        id_field=args.id_field,
        exclude_gui=args.exclude_gui,
        cache_dir=args.cache_dir,
    )
    manifest = prepare(
        spec,
        args.out,
        args.vocab_size,
        max_bytes=args.max_bytes,
        workers=args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    print(json.dumps(summary(manifest, args.out), indent=2, sort_keys=True))
    return 0
