"""The paper's learning-rate schedule: linear warmup, then step decay at fixed fractions of the run.

A pure function of the step (no scheduler object with state), so resuming needs nothing saved.
"""

from __future__ import annotations

from engramlm.train.config import ScheduleConfig


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor on the base LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    passed = sum(1 for m in cfg.milestones if step >= m * total_steps)
    return cfg.decay_factor**passed
