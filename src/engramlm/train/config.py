"""Typed, validated training configuration, loadable from TOML/YAML/JSON with ``key=value`` overrides.

A training config has five parts: ``model`` (a preset plus overrides of its
:class:`~engramlm.models.config.ModelConfig` fields), ``data`` (the prepared corpus and batch
shape), ``optim`` (the paper's recipe: Muon + AdamW + sparse Adam at 5x LR for the tables),
``schedule`` (warmup then step decay) and the run itself (steps or token budget, seed, cadence of
logging/eval/checkpoints, output directory). Every field is checked at construction and a bad
value raises :class:`ConfigError` naming its dotted path, e.g. ``optim.lr: must be > 0``.

Overrides use dotted paths (``optim.lr=1e-3``, ``model.overrides.engram.hash.layer_ids=[1,2]``);
values are parsed as JSON when they can be (numbers, booleans, lists, ``null``), else taken as
strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.models.config import ModelConfig
from engramlm.models.presets import PRESETS, get_preset
from engramlm.utils import config as core
from engramlm.utils.config import (
    config_diff,
    deep_merge,
    finite,
    from_dict,
    int_at_least,
    load_config_file,
    need,
    one_of,
    parse_value,
    undot,
)

__all__ = [
    "EVAL_SPLITS",
    "TABLE_TIERS",
    "DataConfig",
    "EngramTableConfig",
    "ModelSection",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "complete_saved_config",
    "config_diff",
    "load_train_config",
    "parse_value",
]

EVAL_SPLITS = ("val", "test", "train")
TABLE_TIERS = ("model", "ssd")
MUON_NS_SCHEDULES = ("quintic", "polar_express")  # train.muon.NS_SCHEDULES (a test keeps them equal)
_OPTIM_FLOATS = ("lr", "weight_decay", "eps", "muon_momentum", "engram_lr_mult", "engram_weight_decay", "engram_eps")


@dataclass(frozen=True)
class ModelSection:
    """A preset (or a model config file) plus overrides of its fields; ``drop`` removes a section."""

    config_section = "model"  # not a field: the prefix of its error paths when built alone

    preset: str = "tiny"
    file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"schema": ModelConfig})
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.file is None:
            need(self.preset in PRESETS, "model.preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        need(isinstance(self.overrides, dict), "model.overrides", "must be a table of ModelConfig fields")
        for d in self.drop:
            need(d in ("engram", "moe"), "model.drop", f"entries must be 'engram' or 'moe', got {d!r}")

    def resolve(self) -> ModelConfig:
        """The validated :class:`ModelConfig` (errors name ``model.overrides.<field>``)."""
        base = ModelConfig.from_file(self.file) if self.file else get_preset(self.preset)
        d = deep_merge(base.to_dict(), undot(self.overrides))
        for section in self.drop:
            d[section] = None
        return from_dict(ModelConfig, d, "model.overrides")


@dataclass(frozen=True)
class DataConfig:
    """A directory built by ``engramlm data prepare``, and the batch shape.

    With ``source`` set (``"stdlib"``, ``"sotu"``, ``"dir:PATH"``, ``"jsonl:PATH"``) the trainer prepares
    ``dir`` from it first (reused when up to date), so a config alone is a complete, runnable job.
    """

    config_section = "data"  # not a field: the prefix of its error paths when built alone

    dir: str = ""
    source: str | None = None
    vocab_size: int = 8192  # tokenizer size when preparing from ``source``
    max_bytes: int | None = None  # corpus cap when preparing from ``source``
    batch_size: int = 8
    seq_len: int = 128
    eval_split: str = "val"
    eval_batch_size: int = 8
    eval_max_batches: int | None = None  # None: the whole split

    def __post_init__(self) -> None:
        need(isinstance(self.dir, str) and bool(self.dir), "data.dir", "must name a prepared corpus directory")
        if self.source is not None:
            kind = self.source.partition(":")[0] if isinstance(self.source, str) else None
            allowed = ("stdlib", "sotu", "dir:PATH", "jsonl:PATH")
            need(kind in ("stdlib", "sotu", "dir", "jsonl"), "data.source", f"must be one of {allowed}")
        int_at_least(self.vocab_size, "data.vocab_size", 259)
        if self.max_bytes is not None:
            int_at_least(self.max_bytes, "data.max_bytes", 1)
        int_at_least(self.batch_size, "data.batch_size", 1)
        int_at_least(self.seq_len, "data.seq_len", 1)
        int_at_least(self.eval_batch_size, "data.eval_batch_size", 1)
        if self.eval_max_batches is not None:
            int_at_least(self.eval_max_batches, "data.eval_max_batches", 1)
        need(self.eval_split in EVAL_SPLITS, "data.eval_split", f"must be one of {EVAL_SPLITS}")


@dataclass(frozen=True)
class OptimConfig:
    """The paper's recipe. Muon updates are RMS-matched to AdamW (Moonlight scaling), so one ``lr``."""

    config_section = "optim"  # not a field: the prefix of its error paths when built alone

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    use_muon: bool = True  # False: AdamW for every dense parameter
    muon_momentum: float = 0.95
    # Newton-Schulz: 4 "polar_express" steps in bf16 by default (since issue 18; before: 5 "quintic" steps in
    # fp32, which older checkpoints keep). On Muon's real inputs they land as close to U V^T as 5 quintic steps
    # (median distance 0.215 vs 0.229), 120-step runs end at the same val loss (2 seeds, within seed noise), and
    # Muon's share of a MoE step falls from ~25% to ~14% on CPU (benchmarks/bench_muon.py, muon_loss_runs.py).
    muon_ns_steps: int = 4
    # iteration dtype: "bf16" (as in Muon's reference code) or "fp32"
    muon_ns_dtype: str = "bf16"
    # coefficients: "quintic" (Jordan's, the same every iteration) or "polar_express" (a minimax quintic per
    # iteration, fitted in train/muon.py; after Amsel et al. 2025); 5 polar_express steps halve the distance
    muon_ns_schedule: str = "polar_express"
    engram_lr_mult: float = 5.0
    engram_weight_decay: float = 0.0
    engram_eps: float = 1e-8
    clip: float | None = 1.0  # global grad-norm clip (dense grads and sparse row grads); None: off

    def __post_init__(self) -> None:
        for name in _OPTIM_FLOATS:
            finite(getattr(self, name), f"optim.{name}")
        if self.clip is not None:
            finite(self.clip, "optim.clip")
        for b in self.betas:
            finite(b, "optim.betas")
        need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        need(self.eps > 0 and self.engram_eps > 0, "optim.eps", "eps and engram_eps must be > 0")
        need(0 <= self.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        int_at_least(self.muon_ns_steps, "optim.muon_ns_steps", 1)
        need(
            self.muon_ns_dtype in ("fp32", "bf16"),
            "optim.muon_ns_dtype",
            f"must be one of ('fp32', 'bf16'), got {self.muon_ns_dtype!r}",
        )
        one_of(self.muon_ns_schedule, "optim.muon_ns_schedule", MUON_NS_SCHEDULES)
        need(self.engram_lr_mult > 0, "optim.engram_lr_mult", f"must be > 0, got {self.engram_lr_mult}")
        need(self.engram_weight_decay >= 0, "optim.engram_weight_decay", "must be >= 0")
        need(self.clip is None or self.clip > 0, "optim.clip", f"must be > 0 or null, got {self.clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then multiply the LR by ``decay_factor`` at each milestone (fractions of the run).

    DeepSeek's step schedule: x0.316 at 80% and again at 90% of training.
    """

    config_section = "schedule"  # not a field: the prefix of its error paths when built alone

    warmup_steps: int = 100
    milestones: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316

    def __post_init__(self) -> None:
        int_at_least(self.warmup_steps, "schedule.warmup_steps", 0)
        finite(self.decay_factor, "schedule.decay_factor")
        for m in self.milestones:
            finite(m, "schedule.milestones")
        need(
            all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "schedule.milestones",
            f"must be increasing fractions in (0, 1), got {list(self.milestones)}",
        )
        need(0 < self.decay_factor <= 1, "schedule.decay_factor", f"must be in (0, 1], got {self.decay_factor}")


@dataclass(frozen=True)
class EngramTableConfig:
    """Where the Engram tables live while training (not part of the model: the same model trains either way).

    ``table_tier``: ``"model"`` keeps each table as the model's ``embed.weight`` in RAM with its Adam state
    (the default); ``"ssd"`` keeps rows and per-row Adam state in files under ``OUT_DIR/engram_tables/``
    (:mod:`engramlm.store.trainable`, read like the store's ``direct`` tier: O_DIRECT page reads) with a RAM
    cache of ``cache_mb`` MiB of hot rows shared by all layers. Both give bit-identical training.
    ``prefetch``: read the next step's rows while the current one computes. ``compact_ratio``: at a
    checkpoint, rewrite a table's base file once its dirty-row logs exceed this multiple of it;
    ``compact_background``: do that rewrite in a background thread while training goes on (the next checkpoint
    after it completes switches to the new base; False: at the checkpoint itself, which then waits for it).
    ``direct_io``: O_DIRECT reads of the base files (False: through the page cache).
    """

    config_section = "engram"  # not a field: the prefix of its error paths when built alone

    table_tier: str = "model"
    cache_mb: float = 512.0
    prefetch: bool = True
    compact_ratio: float = 1.0
    compact_background: bool = False  # opt-in: a read race with the prefetch was seen once (session 8 note)
    direct_io: bool = True

    def __post_init__(self) -> None:
        need(
            self.table_tier in TABLE_TIERS,
            "engram.table_tier",
            f"must be one of {TABLE_TIERS}, got {self.table_tier!r}",
        )
        finite(self.cache_mb, "engram.cache_mb")
        need(self.cache_mb > 0, "engram.cache_mb", f"must be > 0 (MiB), got {self.cache_mb}")
        finite(self.compact_ratio, "engram.compact_ratio")
        need(self.compact_ratio > 0, "engram.compact_ratio", f"must be > 0, got {self.compact_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Give ``steps`` or a ``tokens`` budget (steps = ceil(tokens / (B * T)))."""

    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engram: EngramTableConfig = field(default_factory=EngramTableConfig)
    steps: int | None = None
    tokens: int | None = None
    seed: int = 0
    out_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100  # 0: only at the end
    log_every: int = 1
    # steps whose loss or gradient norm is NaN/inf that may be skipped (no update) before the run stops
    skip_nonfinite: int = 0
    # torch intra-op threads (re-applied every step: numba's OpenMP hashing kernel resets the shared
    # pool). 1 by default: on a shared 2-core machine, 2 spinning OpenMP threads ran ~9x slower per step.
    threads: int | None = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        need(
            (self.steps is None) != (self.tokens is None),
            "steps",
            f"give exactly one of steps or tokens, got steps={self.steps!r}, tokens={self.tokens!r}",
        )
        if self.steps is not None:
            int_at_least(self.steps, "steps", 1)
        if self.tokens is not None:
            int_at_least(self.tokens, "tokens", 1)
        int_at_least(self.seed, "seed", 0)
        need(isinstance(self.out_dir, str) and bool(self.out_dir), "out_dir", "must be a directory path")
        int_at_least(self.checkpoint_every, "checkpoint_every", 1)
        int_at_least(self.keep_checkpoints, "keep_checkpoints", 1)
        int_at_least(self.eval_every, "eval_every", 0)
        int_at_least(self.log_every, "log_every", 1)
        int_at_least(self.skip_nonfinite, "skip_nonfinite", 0)
        if self.threads is not None:
            int_at_least(self.threads, "threads", 1)
        resolved = self.model.resolve()  # validate the model section now, with its field paths
        need(
            self.engram.table_tier == "model" or resolved.engram is not None,
            "engram.table_tier",
            f"{self.engram.table_tier!r} needs a model with Engram layers (this model has none)",
        )

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.data.batch_size * self.data.seq_len))

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if "data" not in d:
            raise ConfigError("missing section (at least data.dir is required)", "data")
        return from_dict(cls, undot(d))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs into a training-config dict, typed by :class:`TrainConfig`'s fields."""
    return core.apply_overrides(d, overrides, TrainConfig)


# Fields added after checkpoints were first written, each with the value every checkpoint written before it
# trained with. A stored config that lacks one is completed with that value, not with today's default, so an
# old run resumes as it ran (and is not refused as "differs from the checkpoint") even after a default changes.
ADDED_LATER: dict[str, Any] = {
    "optim.muon_ns_dtype": "fp32",
    "optim.muon_ns_schedule": "quintic",
}


def complete_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config with the fields it predates set to the values it trained with."""
    return deep_merge(undot(ADDED_LATER), saved)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a TOML/YAML/JSON file (or none) plus ``key=value`` overrides."""
    base = load_config_file(path) if path is not None else {}
    return TrainConfig.from_dict(apply_overrides(base, list(overrides or [])))
