"""``engramlm eval CHECKPOINT --data DIR``: held-out loss and bits per byte, as JSON.

By default the whole split is scored (``scope`` says so), unlike the trainer's periodic evals, which
stop after ``data.eval_max_batches`` batches: the two figures for one checkpoint differ by design. A
progress bar (batches, ETA) goes to stderr when it is a terminal, or with ``--progress``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="held-out loss and bits-per-byte of a checkpoint over a whole split (JSON)")
    p.add_argument("checkpoint", help="checkpoint directory, run directory (latest checkpoint) or saved model")
    p.add_argument("--data", required=True, help="prepared corpus directory (engramlm data prepare)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's training seq_len")
    p.add_argument("--max-batches", type=int, default=None, help="default: the whole split")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from engramlm.data.dataset import TokenDataset
    from engramlm.data.loader import EvalLoader
    from engramlm.models.evaluate import evaluate
    from engramlm.models.locate import TOKENIZER_FILE, load_trained_model, verify_tokenizer

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        raise ConfigError(f"--data: {data} is not a prepared corpus (no manifest.json); run `engramlm data prepare`")
    ds = TokenDataset(data, args.split)
    trained = load_trained_model(args.checkpoint)
    model, state = trained.model, trained.state
    verify_tokenizer(model, data / TOKENIZER_FILE, what=f"model {trained.files.model_dir}")  # the data's = the model's
    if model.config.vocab_size < ds.vocab_size:
        raise ConfigError(f"--data: {data} has {ds.vocab_size} token ids, the model only {model.config.vocab_size}")
    seq_len = args.seq_len or (state["config"]["data"]["seq_len"] if state else None)
    if seq_len is None:
        raise ConfigError("--seq-len: required for a saved model directory (no training config to read it from)")
    torch.manual_seed(0)
    loader = EvalLoader(ds, args.batch_size, seq_len, row_ids_fn=model.hasher)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    from engramlm.store.trainable import TABLES_FILE, open_tables

    ssd = trained.files.model_dir.parent / TABLES_FILE  # trained with engram.table_tier=ssd: read rows from its files
    tables = open_tables(ssd, model.layout.fingerprint) if ssd.is_file() and model.layout is not None else {}
    try:
        result = evaluate(model, loader, args.max_batches, args.threads, progress=progress, tables=tables)
    finally:
        for t in tables.values():
            t.close()
    result.update(checkpoint=str(args.checkpoint), data=str(data), split=args.split, seq_len=seq_len)
    if trained.step is not None:
        result["step"] = trained.step
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
