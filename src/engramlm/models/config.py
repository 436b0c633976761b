"""Typed, validated model configuration: backbone, MoE and Engram, with JSON/TOML/YAML I/O.

Every field is checked at construction; a bad value raises :class:`ConfigError` naming the field
and what is allowed. Loading, typed nested construction and error paths live in the shared config
core (:mod:`engramlm.utils.config`); this module only declares the fields and their rules.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.hashing.spec import HashSpec
from engramlm.utils.config import finite, from_dict, int_at_least, load_config_file, need, to_jsonable

__all__ = ["TABLE_DTYPES", "EngramConfig", "MoEConfig", "ModelConfig", "load_config_file"]

TABLE_DTYPES = ("fp32", "bf16", "fp8_e4m3_ue8m0")


def _pos_int(value: Any, name: str) -> None:
    int_at_least(value, name, 1)


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek-style MoE: shared + top-k routed SwiGLU experts, aux-loss-free balancing."""

    config_section = "moe"  # not a field: the prefix of its error paths when built alone

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
        need(self.top_k <= self.n_routed, "moe.top_k", f"must be <= n_routed ({self.n_routed}), got {self.top_k}")
        need(self.n_shared >= 0, "moe.n_shared", f"must be >= 0, got {self.n_shared}")
        need(self.n_dense_layers >= 0, "moe.n_dense_layers", f"must be >= 0, got {self.n_dense_layers}")
        need(
            self.score_func in ("sigmoid", "softmax"),
            "moe.score_func",
            f"must be 'sigmoid' or 'softmax', got {self.score_func!r}",
        )
        finite(self.bias_update_speed, "moe.bias_update_speed")
        need(self.bias_update_speed >= 0, "moe.bias_update_speed", f"must be >= 0, got {self.bias_update_speed}")


@dataclass(frozen=True)
class EngramConfig:
    """Engram geometry (the hash spec) and the block's options (spec §13 names)."""

    config_section = "engram"  # not a field: the prefix of its error paths when built alone

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
    # Multiplier on the value projection's initial weights: the Engram output's size at insertion
    # relative to the residual stream it is added to (bench_block0: at block 0 that stream is the raw
    # token embedding, and the default output is ~16x larger than it).
    value_init_scale: float = 1.0
    table_dtype: str = "fp32"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        _pos_int(self.head_dim, "engram.head_dim")
        _pos_int(self.kernel_size, "engram.kernel_size")
        if self.conv_dilation is not None:
            _pos_int(self.conv_dilation, "engram.conv_dilation")
        for name in ("gate_norm_eps", "conv_norm_eps", "embed_init_std", "value_init_scale"):
            if getattr(self, name) is not None:
                finite(getattr(self, name), f"engram.{name}")
        need(self.conv_norm_eps > 0, "engram.conv_norm_eps", f"must be > 0, got {self.conv_norm_eps}")
        need(
            self.gate_norm_eps is None or self.gate_norm_eps > 0,
            "engram.gate_norm_eps",
            f"must be > 0 or null (dtype epsilon), got {self.gate_norm_eps}",
        )
        need(self.embed_init_std > 0, "engram.embed_init_std", f"must be > 0, got {self.embed_init_std}")
        need(self.value_init_scale > 0, "engram.value_init_scale", f"must be > 0, got {self.value_init_scale}")
        need(
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
    # Token embedding init N(0, std^2). At block 0 this is the whole residual stream an Engram block adds to.
    embed_init_std: float = 0.02
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_layers", "n_heads", "mlp_hidden", "hc_mult", "max_seq_len"):
            _pos_int(getattr(self, f), f)
        for f in ("rope_theta", "norm_eps", "embed_init_std"):
            finite(getattr(self, f), f)
            need(getattr(self, f) > 0, f, f"must be > 0, got {getattr(self, f)}")
        need(
            self.hidden_size % self.n_heads == 0,
            "hidden_size",
            f"must be divisible by n_heads ({self.n_heads}), got {self.hidden_size}",
        )
        if self.n_kv_heads is not None:
            _pos_int(self.n_kv_heads, "n_kv_heads")
            need(
                self.n_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}",
            )
        if self.moe is not None:
            need(
                self.moe.n_dense_layers <= self.num_layers,
                "moe.n_dense_layers",
                f"must be <= num_layers ({self.num_layers})",
            )
        if self.engram is not None:
            bad = [i for i in self.engram.hash.layer_ids if i >= self.num_layers]
            need(
                not bad,
                "engram.hash.layer_ids",
                f"must be < num_layers ({self.num_layers}); got {list(self.engram.hash.layer_ids)}",
            )
            need(
                self.engram.hash.pad_id < self.vocab_size,
                "engram.hash.pad_id",
                f"must be < vocab_size ({self.vocab_size})",
            )

    # ---- helpers -------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(load_config_file(path, section="model"))
