"""``engramlm train --config FILE [key=value ...] [--resume [PATH]]``: train (or resume) a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from engramlm.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a TOML/YAML config (+ key=value overrides)",
        description="Train per a TrainConfig. Overrides use dotted paths: optim.lr=1e-3 data.batch_size=16 "
        "model.overrides.hidden_size=128. Checkpoints land in OUT_DIR/checkpoints/step_XXXXXXXX/.",
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engramlm.models.locate import read_trainer_state, resolve_checkpoint
    from engramlm.train.config import TrainConfig, apply_overrides, load_train_config
    from engramlm.train.trainer import Trainer

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    if args.config is None:
        if not isinstance(args.resume, str):
            raise ConfigError("--config: required unless --resume PATH names a checkpoint or run directory")
        stored = read_trainer_state(resolve_checkpoint(args.resume))["config"]
        config = TrainConfig.from_dict(apply_overrides(stored, overrides))
    else:
        config = load_train_config(args.config, overrides)
    summary = Trainer(config, resume=args.resume).fit()
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
