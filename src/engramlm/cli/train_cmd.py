"""``engramlm train --config FILE [key=value ...] [--resume [PATH]] [--overwrite]``: train (or resume) a model.

The run directory is locked for the whole process (a second ``train`` on it fails at once); a
directory that already holds a run is refused unless ``--resume`` or ``--overwrite`` (which moves
the old run aside, never deletes it). Ctrl-C stops after the current step, saves a checkpoint and
exits 130 with the command that resumes it.

Under ``torchrun --nproc-per-node N -m engramlm train ...`` the same command trains one model on N
processes (``engramlm.train.distributed``): rank 0 owns the run directory and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from engramlm.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a TOML/YAML config (+ key=value overrides)",
        description="Train per a TrainConfig. Overrides use dotted paths: optim.lr=1e-3 data.batch_size=16 "
        "model.overrides.hidden_size=128. Checkpoints land in OUT_DIR/checkpoints/step_XXXXXXXX/. Under "
        "`torchrun --nproc-per-node N -m engramlm train ...` it trains on N processes (Engram tables split by row).",
    )
    p.add_argument("--config", help="training config (.toml, .yaml, .yml or .json)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="resume from the latest checkpoint in out_dir, or from PATH (a checkpoint or run directory; "
        "without --config its stored config is used)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="if out_dir already holds a run, move it aside to OUT_DIR.old-<time>/ (never deleted) and start "
        "anew; with --resume PATH, move aside only the checkpoints newer than PATH",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: let config KEY (e.g. optim.lr) differ from the checkpoint's; the run then no longer "
        "reproduces an uninterrupted one (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engramlm.models.locate import read_trainer_state, resolve_checkpoint
    from engramlm.train.config import TrainConfig, apply_overrides, complete_saved_config, load_train_config
    from engramlm.train.trainer import Trainer, TrainingInterrupted

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.config is None:
        if not isinstance(args.resume, str):
            raise ConfigError("--config: required unless --resume PATH names a checkpoint or run directory")
        stored = complete_saved_config(read_trainer_state(resolve_checkpoint(args.resume))["config"])
        config = TrainConfig.from_dict(apply_overrides(stored, overrides))
    else:
        config = load_train_config(args.config, overrides)
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, allow_changes=tuple(args.allow_change))
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:  # first Ctrl-C: stop cleanly; a second one: at once
        signal.signal(signal.SIGINT, previous)
        print("engramlm: stopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)
        trainer.request_stop()

    signal.signal(signal.SIGINT, on_sigint)
    clean = False
    try:
        summary = trainer.fit()
        clean = True
    except TrainingInterrupted as exc:
        clean = True
        if trainer.main:
            print(
                f"engramlm: interrupted at step {exc.step}, checkpoint {exc.checkpoint}; continue with: "
                f"engramlm train --resume {exc.run_dir}",
                file=sys.stderr,
            )
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer.close(clean=clean)  # under torchrun: leave the process group (after a barrier when clean)
    if not trainer.main:  # under torchrun, rank 0 alone reports
        return 0
    print(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False))
    last = summary.get("eval")
    if last is not None and not last.get("full_sweep", True):  # say which held-out figure this is
        print(
            f"engramlm: the summary's held-out bpb {last['bpb']:.4f} covers only the {last['scope']} "
            f"(data.eval_max_batches={config.data.eval_max_batches}); "
            f"`engramlm eval {config.out_dir} --data {config.data.dir}` scores the full split",
            file=sys.stderr,
        )
    return 0
