"""``engramlm store``: check and describe store files without loading their rows."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("store", help="inspect and verify table store files")
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check the header and every chunk checksum")
    verify.add_argument("path")
    verify.add_argument("--fingerprint", help="expected hash-spec fingerprint (64 hex)")
    verify.set_defaults(func=run_verify)
    inspect = sub.add_parser("inspect", help="print the header as JSON")
    inspect.add_argument("path")
    inspect.set_defaults(func=run_inspect)


def run_verify(args: argparse.Namespace) -> int:
    from engramlm.store.file import verify_store

    h = verify_store(args.path, args.fingerprint)
    print(f"{args.path}: OK ({h.num_rows} rows x {h.dim}, {h.row_format}, {h.num_chunks} chunks)")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from engramlm.store.file import read_header

    print(json.dumps(read_header(args.path).to_dict(), indent=2, sort_keys=True))
    return 0
