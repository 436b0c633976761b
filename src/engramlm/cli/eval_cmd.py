"""``engramlm eval CHECKPOINT --data DIR``: held-out loss and bits per byte, as JSON.

With ``--tasks a,b`` (or the tag ``engramlm``) it runs lm-evaluation-harness instead (the ``hf`` extra):
the offline tasks of :mod:`engramlm.hf.evaltasks` are built from ``--data``'s held-out split into
``--task-dir`` (default: a temporary directory) and scored by ``lm_eval.simple_evaluate`` through the
``engramlm`` harness model; the harness's result JSON goes to stdout and, atomically, to ``--output``.

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
    p.add_argument("--tasks", default=None, help="lm-eval tasks (comma-separated): engram_bpb, engram_cloze, "
                   "engram_code, or the tag engramlm for all three (needs the hf extra)")  # fmt: skip
    p.add_argument("--task-dir", default=None, help="--tasks: where to write the task files (default: a temp dir)")
    p.add_argument("--limit", type=int, default=None, help="--tasks: at most this many examples per task")
    p.add_argument("--max-examples", type=int, default=500, help="--tasks: examples kept per cloze/code task")
    p.add_argument("--tokenizer", default=None, help="--tasks: tokenizer path or name (default: found and checked)")
    p.add_argument("--output", default=None, help="--tasks: also write the harness's JSON here (atomically)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_tasks(args)
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
    from engramlm.store.trainable import open_checkpoint_tables

    # trained with engram.table_tier=ssd (one process or per-rank row ranges): read the rows from its files
    ckpt_dir = trained.files.model_dir.parent
    tables = open_checkpoint_tables(ckpt_dir, model.layout.fingerprint) if model.layout is not None else {}
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


def run_tasks(args: argparse.Namespace) -> int:
    """``--tasks``: build the offline tasks from ``--data`` and run lm-eval on them."""
    import tempfile

    from engramlm.hf.evaltasks import TAG, TASKS

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in names if t not in (*TASKS, TAG)]
    if not names or bad:
        raise ConfigError(f"--tasks: unknown task {bad[0] if bad else ''!r}; allowed: {[*TASKS, TAG]}")
    if not (Path(args.data) / "manifest.json").is_file():
        raise ConfigError(
            f"--data: {args.data} is not a prepared corpus (no manifest.json); run `engramlm data prepare`"
        )
    try:
        from engramlm.hf.evaltasks import build_tasks
        from engramlm.hf.harness import EngramHarnessLM, evaluate_tasks
    except ImportError as exc:
        raise ConfigError(f"--tasks: needs lm-evaluation-harness (pip install 'engramlm[hf]'): {exc}") from exc
    # The model and its tokenizer first (checked against --data's), so a wrong pairing fails before any work.
    lm = EngramHarnessLM(run=str(args.checkpoint), tokenizer=args.tokenizer, data=str(args.data),
                         max_length=args.seq_len, batch_size=args.batch_size, threads=args.threads)  # fmt: skip
    build = list(TASKS) if TAG in names else names
    with tempfile.TemporaryDirectory(prefix="engramlm-tasks-") as tmp:
        task_dir = Path(args.task_dir) if args.task_dir else Path(tmp)
        counts = build_tasks(args.data, task_dir, split=args.split, tasks=build, max_examples=args.max_examples)
        print(f"eval: tasks {counts} written to {task_dir}", file=sys.stderr)
        doc = evaluate_tasks(lm, names, task_dir, limit=args.limit, output=args.output)
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0
