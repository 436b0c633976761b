"""Typed, validated model configuration: backbone, MoE and Engram, with JSON/TOML/YAML I/O.

Every field is checked at construction; a bad value raises :class:`ConfigError` naming the field
and what is allowed. Nested dicts from files are converted recursively and unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec

TABLE_DTYPES = ("fp32", "bf16", "fp8_e4m3_ue8m0")


def _need(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _pos_int(value: Any, name: str) -> None:
    _need(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        name,
        f"must be an int >= 1, got {value!r}",
    )


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-style MoE: shared + top-k routed SwiGLU experts, aux-loss-free balancing."""

    n_routed: int = 8
    n_shared: int = 1
    top_k: int = 2
    expert_hidden: int = 256
    n_dense_layers: int = 1
    score_func: str = "sigmoid"
    bias_update_speed: float = 1e-3

    def __post_init__(self) -> None:
        _pos_int(self.n_routed, "moe.n_routed")
        _pos_int(self.top_k, "moe.top_k")
        _pos_int(self.expert_hidden, "moe.expert_hidden")
        _need(self.top_k <= self.n_routed, "moe.top_k", f"must be <= n_routed ({self.n_routed}), got {self.top_k}")
        _need(self.n_shared >= 0, "moe.n_shared", f"must be >= 0, got {self.n_shared}")
        _need(self.n_dense_layers >= 0, "moe.n_dense_layers", f"must be >= 0, got {self.n_dense_layers}")
        _need(
            self.score_func in ("sigmoid", "softmax"),
            "moe.score_func",
            f"must be 'sigmoid' or 'softmax', got {self.score_func!r}",
        )
        _need(self.bias_update_speed >= 0, "moe.bias_update_speed", f"must be >= 0, got {self.bias_update_speed}")


@dataclass(frozen=True)
class EngramConfig:
    """Engram geometry (the hash spec) and the block's options (spec §13 names)."""

    hash: HashSpec = field(default_factory=HashSpec)
    head_dim: int = 32
    proj_bias: bool = False
    gate: bool = True
    gate_signed_sqrt: bool = True
    gate_norm_eps: float | None = 1e-6
    use_short_conv: bool = True
    kernel_size: int = 4
    conv_dilation: int | None = None
    conv_norm_eps: float = 1e-5
    conv_zero_init: bool = True
    embed_init_std: float = 1.0
    table_dtype: str = "fp32"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        _pos_int(self.head_dim, "engram.head_dim")
        _pos_int(self.kernel_size, "engram.kernel_size")
        if self.conv_dilation is not None:
            _pos_int(self.conv_dilation, "engram.conv_dilation")
        _need(
            self.gate_norm_eps is None or self.gate_norm_eps > 0,
            "engram.gate_norm_eps",
            f"must be > 0 or null (dtype epsilon), got {self.gate_norm_eps}",
        )
        _need(self.embed_init_std > 0, "engram.embed_init_std", f"must be > 0, got {self.embed_init_std}")
        _need(
            self.table_dtype in TABLE_DTYPES,
            "engram.table_dtype",
            f"must be one of {TABLE_DTYPES}, got {self.table_dtype!r}",
        )

    @property
    def dilation(self) -> int:
        """Conv dilation; defaults to max_ngram_size (spec §6)."""
        return self.conv_dilation or self.hash.max_ngram_size


@dataclass(frozen=True)
class ModelConfig:
    """An Engram language model: embedding, blocks (Engram -> attention -> FFN/MoE), head."""

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_hidden: int = 688
    moe: MoEConfig | None = None
    engram: EngramConfig | None = None
    hc_mult: int = 1
    hc_dynamic: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_layers", "n_heads", "mlp_hidden", "hc_mult", "max_seq_len"):
            _pos_int(getattr(self, f), f)
        _need(
            self.hidden_size % self.n_heads == 0,
            "hidden_size",
            f"must be divisible by n_heads ({self.n_heads}), got {self.hidden_size}",
        )
        if self.n_kv_heads is not None:
            _pos_int(self.n_kv_heads, "n_kv_heads")
            _need(
                self.n_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}",
            )
        if self.moe is not None:
            _need(
                self.moe.n_dense_layers <= self.num_layers,
                "moe.n_dense_layers",
                f"must be <= num_layers ({self.num_layers})",
            )
        if self.engram is not None:
            bad = [i for i in self.engram.hash.layer_ids if i >= self.num_layers]
            _need(
                not bad,
                "engram.hash.layer_ids",
                f"must be < num_layers ({self.num_layers}); got {list(self.engram.hash.layer_ids)}",
            )
            _need(
                self.engram.hash.pad_id < self.vocab_size,
                "engram.hash.pad_id",
                f"must be < vocab_size ({self.vocab_size})",
            )

    # ---- helpers -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(load_config_file(path, section="model"))


def load_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read JSON, TOML or YAML into a dict; with ``section``, use that table if present."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file: {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file: unknown extension {p.suffix!r}; use .json, .toml, .yaml or .yml")
    except (ValueError, ImportError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config file: cannot parse {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file: {p} must hold a table/object at top level")
    if section and isinstance(data.get(section), dict):
        return data[section]
    return data


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_jsonable(x) for x in obj]
    return obj


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a table/object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix.rstrip('.') or cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        msg = str(exc)
        if prefix and not msg.startswith(prefix.split(".")[0] + "."):
            msg = prefix + msg  # nested specs name fields relative to themselves
        raise ConfigError(msg) from None


def _convert(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, name) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, name + ".")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    return value
