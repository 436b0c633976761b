"""Named configurations (spec §13). Engram geometry is normative; backbones are documented choices.

* ``demo``: the official demo's Engram defaults (V3 tokenizer, layers [1, 15], d_h 64, biases,
  dtype-epsilon gate norm, default conv init, no document reset) on a dense 30-layer backbone.
* ``paper-27b`` / ``paper-40b``: the paper's Engram-27B/40B Engram modules (d_h 80, layers
  [1, 14]) on a 30-layer MoE backbone (2 shared + 55 routed, top-6). The paper's MLA attention is
  replaced by GQA and the expert width (1,536) is our estimate; only the Engram part is exact.
* ``deepseek-v4.1``: the shipped V4.1-Flash Engram (orders 2-4, 8 heads, d_h 256, base 16M,
  layers [1, 14], no conv, int32 ids, fp8 rows) on a 40-layer, d=5120, M=4 backbone outline.
* ``tiny``: the CPU research preset: 4 layers, d = 256, the project's 8k byte-level BPE, Engram
  at layer 1 with base rows 5 x vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig


def _demo() -> ModelConfig:
    return ModelConfig(
        name="demo",
        vocab_size=129_280,
        hidden_size=1024,
        num_layers=30,
        n_heads=16,
        mlp_hidden=2816,
        hc_mult=4,
        engram=EngramConfig(
            hash=HashSpec(
                max_ngram_size=3,
                n_head_per_ngram=8,
                engram_vocab_size=(646_400, 646_400),
                layer_ids=(1, 15),
                boundary_mode="none",
                expected_compressed_vocab_size=98_627,
            ),
            head_dim=64,
            proj_bias=True,
            gate_norm_eps=None,
            conv_zero_init=False,
            tokenizer="deepseek-v3",
        ),
    )


def _paper(base: int, name: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=129_280,
        hidden_size=2560,
        num_layers=30,
        n_heads=32,
        mlp_hidden=10_240,
        hc_mult=4,
        moe=MoEConfig(n_routed=55, n_shared=2, top_k=6, expert_hidden=1536, n_dense_layers=1),
        engram=EngramConfig(
            hash=HashSpec(
                max_ngram_size=3,
                n_head_per_ngram=8,
                engram_vocab_size=(base, base),
                layer_ids=(1, 14),
                boundary_mode="reset",
                expected_compressed_vocab_size=98_627,
            ),
            head_dim=80,
            tokenizer="deepseek-v3",
        ),
    )


def _v41() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v4.1",
        vocab_size=129_280,
        hidden_size=5120,
        num_layers=40,
        n_heads=64,
        n_kv_heads=8,
        mlp_hidden=12_288,
        hc_mult=4,
        moe=MoEConfig(n_routed=256, n_shared=1, top_k=6, expert_hidden=2048, n_dense_layers=1),
        engram=EngramConfig(
            hash=HashSpec(
                max_ngram_size=4,
                n_head_per_ngram=8,
                engram_vocab_size=(16_000_000,) * 3,
                layer_ids=(1, 14),
                boundary_mode="none",
                row_id_dtype="int32",
                expected_compressed_vocab_size=99_092,
            ),
            head_dim=256,
            use_short_conv=False,
            table_dtype="fp8_e4m3_ue8m0",
            tokenizer="deepseek-v4",
        ),
    )


def _tiny() -> ModelConfig:
    vocab = 8192
    return ModelConfig(
        name="tiny",
        vocab_size=vocab,
        hidden_size=256,
        num_layers=4,
        n_heads=4,
        mlp_hidden=688,
        hc_mult=4,
        max_seq_len=1024,
        engram=EngramConfig(
            hash=HashSpec(
                max_ngram_size=3,
                n_head_per_ngram=4,
                engram_vocab_size=(5 * vocab, 5 * vocab),
                layer_ids=(1,),
                boundary_mode="reset",
            ),
            head_dim=32,
        ),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "demo": _demo,
    "paper-27b": lambda: _paper(2_262_400, "paper-27b"),
    "paper-40b": lambda: _paper(7_239_680, "paper-40b"),
    "deepseek-v4.1": _v41,
    "tiny": _tiny,
}


def get_preset(name: str) -> ModelConfig:
    """The named preset's config (a fresh, immutable object)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()
