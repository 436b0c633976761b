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

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.models.config import ModelConfig, _from_dict, load_config_file
from engramlm.models.presets import PRESETS, get_preset

EVAL_SPLITS = ("val", "test", "train")


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _int_at_least(value: Any, name: str, low: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _need(ok, name, f"must be an int >= {low}, got {value!r}")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _undot(d: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (TOML/YAML files may use either form)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = _undot(v) if isinstance(v, dict) else v
        parts = k.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _deep_merge(node[parts[-1]], v) if isinstance(node.get(parts[-1]), dict) else v
    return out


@dataclass(frozen=True)
class ModelSection:
    """A preset (or a model config file) plus overrides of its fields; ``drop`` removes a section."""

    preset: str = "tiny"
    file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.file is None:
            _need(self.preset in PRESETS, "model.preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        _need(isinstance(self.overrides, dict), "model.overrides", "must be a table of ModelConfig fields")
        for d in self.drop:
            _need(d in ("engram", "moe"), "model.drop", f"entries must be 'engram' or 'moe', got {d!r}")

    def resolve(self) -> ModelConfig:
        """The validated :class:`ModelConfig` (errors name ``model.overrides.<field>``)."""
        base = ModelConfig.from_file(self.file) if self.file else get_preset(self.preset)
        d = _deep_merge(base.to_dict(), _undot(self.overrides))
        for section in self.drop:
            d[section] = None
        try:
            return ModelConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"model.overrides.{exc}") from None


@dataclass(frozen=True)
class DataConfig:
    """A directory built by ``engramlm data prepare``, and the batch shape.

    With ``source`` set (``"stdlib"``, ``"sotu"``, ``"dir:PATH"``, ``"jsonl:PATH"``) the trainer prepares
    ``dir`` from it first (reused when up to date), so a config alone is a complete, runnable job.
    """

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
        _need(isinstance(self.dir, str) and bool(self.dir), "data.dir", "must name a prepared corpus directory")
        if self.source is not None:
            kind = self.source.partition(":")[0] if isinstance(self.source, str) else None
            allowed = ("stdlib", "sotu", "dir:PATH", "jsonl:PATH")
            _need(kind in ("stdlib", "sotu", "dir", "jsonl"), "data.source", f"must be one of {allowed}")
        _int_at_least(self.vocab_size, "data.vocab_size", 259)
        if self.max_bytes is not None:
            _int_at_least(self.max_bytes, "data.max_bytes", 1)
        _int_at_least(self.batch_size, "data.batch_size", 1)
        _int_at_least(self.seq_len, "data.seq_len", 1)
        _int_at_least(self.eval_batch_size, "data.eval_batch_size", 1)
        if self.eval_max_batches is not None:
            _int_at_least(self.eval_max_batches, "data.eval_max_batches", 1)
        _need(self.eval_split in EVAL_SPLITS, "data.eval_split", f"must be one of {EVAL_SPLITS}")


@dataclass(frozen=True)
class OptimConfig:
    """The paper's recipe. Muon updates are RMS-matched to AdamW (Moonlight scaling), so one ``lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    use_muon: bool = True  # False: AdamW for every dense parameter
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    engram_lr_mult: float = 5.0
    engram_weight_decay: float = 0.0
    engram_eps: float = 1e-8
    clip: float | None = 1.0  # global grad-norm clip (dense grads and sparse row grads); None: off

    def __post_init__(self) -> None:
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        _need(self.eps > 0 and self.engram_eps > 0, "optim.eps", "eps and engram_eps must be > 0")
        _need(0 <= self.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _int_at_least(self.muon_ns_steps, "optim.muon_ns_steps", 1)
        _need(self.engram_lr_mult > 0, "optim.engram_lr_mult", f"must be > 0, got {self.engram_lr_mult}")
        _need(self.engram_weight_decay >= 0, "optim.engram_weight_decay", "must be >= 0")
        _need(self.clip is None or self.clip > 0, "optim.clip", f"must be > 0 or null, got {self.clip}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then multiply the LR by ``decay_factor`` at each milestone (fractions of the run).

    DeepSeek's step schedule: x0.316 at 80% and again at 90% of training.
    """

    warmup_steps: int = 100
    milestones: tuple[float, ...] = (0.8, 0.9)
    decay_factor: float = 0.316

    def __post_init__(self) -> None:
        _int_at_least(self.warmup_steps, "schedule.warmup_steps", 0)
        _need(
            all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "schedule.milestones",
            f"must be increasing fractions in (0, 1), got {list(self.milestones)}",
        )
        _need(0 < self.decay_factor <= 1, "schedule.decay_factor", f"must be in (0, 1], got {self.decay_factor}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Give ``steps`` or a ``tokens`` budget (steps = ceil(tokens / (B * T)))."""

    data: DataConfig
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
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
        _need(
            (self.steps is None) != (self.tokens is None),
            "steps",
            f"give exactly one of steps or tokens, got steps={self.steps!r}, tokens={self.tokens!r}",
        )
        if self.steps is not None:
            _int_at_least(self.steps, "steps", 1)
        if self.tokens is not None:
            _int_at_least(self.tokens, "tokens", 1)
        _int_at_least(self.seed, "seed", 0)
        _need(isinstance(self.out_dir, str) and bool(self.out_dir), "out_dir", "must be a directory path")
        _int_at_least(self.checkpoint_every, "checkpoint_every", 1)
        _int_at_least(self.keep_checkpoints, "keep_checkpoints", 1)
        _int_at_least(self.eval_every, "eval_every", 0)
        _int_at_least(self.log_every, "log_every", 1)
        _int_at_least(self.skip_nonfinite, "skip_nonfinite", 0)
        if self.threads is not None:
            _int_at_least(self.threads, "threads", 1)
        self.model.resolve()  # validate the model section now, with its field paths

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
            raise ConfigError("data: missing section (at least data.dir is required)")
        return _from_dict(cls, _undot(d), "")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def parse_value(text: str) -> Any:
    """An override's value: JSON when it parses (``3``, ``1e-3``, ``true``, ``[1,2]``, ``null``), else text."""
    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs into a nested dict; a path through a non-table is an error."""
    out = _undot(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value with a dotted key, e.g. optim.lr=1e-3")
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key!r} below it")
            node = nxt
        node[parts[-1]] = parse_value(raw)
    return out


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a TOML/YAML/JSON file (or none) plus ``key=value`` overrides."""
    base = load_config_file(path) if path is not None else {}
    return TrainConfig.from_dict(apply_overrides(base, list(overrides or [])))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two config dicts differ (for resume checks)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
