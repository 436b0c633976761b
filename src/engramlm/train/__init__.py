"""Training: typed configs, the paper's optimiser recipe (Muon + AdamW + sparse table Adam),
the Trainer loop and atomic resumable checkpoints (issue 3). Finding checkpoints and loading a trained
model are ``engramlm.models.locate``'s; the held-out evaluation loop is ``engramlm.models.evaluate``."""

from engramlm.train.checkpoint import load_checkpoint
from engramlm.train.config import (
    DataConfig,
    ModelSection,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    load_train_config,
)
from engramlm.train.metrics import read_metrics
from engramlm.train.muon import Muon, orthogonalize
from engramlm.train.optim import OptimizerSet, split_parameters
from engramlm.train.schedule import lr_multiplier
from engramlm.train.sparse_adam import SparseRowAdam
from engramlm.train.trainer import Trainer

__all__ = [
    "DataConfig",
    "ModelSection",
    "Muon",
    "OptimConfig",
    "OptimizerSet",
    "ScheduleConfig",
    "SparseRowAdam",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_train_config",
    "lr_multiplier",
    "orthogonalize",
    "read_metrics",
    "split_parameters",
]
