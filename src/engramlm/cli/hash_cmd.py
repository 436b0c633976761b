"""``engramlm hash``: which rows a text touches, per Engram layer (head-local ids)."""

from __future__ import annotations

import argparse
import json

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hash", help="hash a text: multipliers, table sizes and row ids per layer")
    p.add_argument("--preset", required=True, help="preset name or config file")
    p.add_argument("--tokenizer", help="tokenizer.json path or a known name (default: the preset's)")
    p.add_argument("--text", required=True, help="text to hash")
    p.add_argument("--json", action="store_true", help="print JSON (the only format for now)")
    p.add_argument("--offsets", action="store_true", help="print offset-applied ids instead of head-local ones")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from engramlm.assets import resolve_tokenizer
    from engramlm.hashing.batch import NgramHasher
    from engramlm.models.build import build_layout, resolve_config

    config = resolve_config(args.preset)
    layout = build_layout(config, args.tokenizer)
    tok_path = resolve_tokenizer(args.tokenizer or config.engram.tokenizer)
    ids = Tokenizer.from_file(str(tok_path)).encode(args.text, add_special_tokens=False).ids
    rows = NgramHasher(layout)(torch.tensor([ids], dtype=torch.long), head_local=not args.offsets)
    desc = layout.describe()
    out = {
        "compressed_vocab_size": layout.compression.compressed_vocab_size,
        "fingerprint": layout.fingerprint,
        "token_ids": ids,
        "compressed_ids": layout.compression.compress(torch.tensor(ids, dtype=torch.long)).tolist(),
        "row_id_form": "offset-applied" if args.offsets else "head-local",
        "head_order": "order-major, head-minor",
        "layers": {},
    }
    for i, lid in enumerate(layout.layer_ids):
        d = desc["layers"][str(lid)]
        out["layers"][str(lid)] = {
            "multipliers": d["multipliers"],
            "table_sizes": d["table_sizes"],
            "row_ids": rows[i, 0].tolist(),
        }
    print(json.dumps(out))
    return 0
