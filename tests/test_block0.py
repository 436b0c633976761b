"""What the block-0 investigation (issue 19, bench_block0) relies on, pinned.

- The gate's query is RMSNorm(H): the scale of the stream at block 0 (the raw token embedding, ~0.02)
  cannot change the gate, so "key from the embedding vs from a normed embedding" is one function.
- ``value_init_scale`` scales only the value rows of the fused projection: the keys, hence the gate,
  are unchanged at insertion, and Y shrinks by exactly the factor.
- ``embed_init_std`` sets the token embedding's init; the default keeps the historic 0.02.
"""

from __future__ import annotations

import torch

from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.model import EngramLM, engram_block
from engramlm.nn.engram import EngramBlock


def _block(**kw) -> EngramBlock:
    torch.manual_seed(0)
    return EngramBlock(hidden_size=32, num_rows=50, num_heads=4, head_dim=8, n_branches=2, **kw)


def test_gate_is_invariant_to_the_scale_of_the_stream() -> None:
    blk = _block()
    h = torch.randn(2, 5, 2, 32)
    keys = torch.randn(2, 5, 2, 32)
    ref = blk.gate_values(h, keys)
    for c in (1.0, 50.0):
        torch.testing.assert_close(blk.gate_values(h * c, keys), ref, rtol=1e-5, atol=1e-6)
    # at the token embedding's scale (RMS 0.02) only the norm's eps (1e-6 vs 4e-4) shows: 0.1 %
    torch.testing.assert_close(blk.gate_values(h * 0.02, keys), ref, rtol=2e-3, atol=1e-4)


def test_value_init_scale_shrinks_the_output_and_leaves_the_gate() -> None:
    base, small = _block(), _block(value_init_scale=0.25)
    m, d = 2, 32
    torch.testing.assert_close(small.wkv.weight[: m * d], base.wkv.weight[: m * d])
    torch.testing.assert_close(small.wkv.weight[m * d :], base.wkv.weight[m * d :] * 0.25)
    small.embed.weight.data.copy_(base.embed.weight)
    h, ids = torch.randn(2, 5, 2, 32), torch.randint(0, 50, (2, 5, 4))
    (ob, ab), (os_, as_) = base(h, ids, return_gate=True), small(h, ids, return_gate=True)
    torch.testing.assert_close(as_, ab)
    torch.testing.assert_close(os_ - h, (ob - h) * 0.25, rtol=1e-5, atol=1e-6)


def test_config_fields_reach_the_model() -> None:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(31, 37), layer_ids=(0,), compression=False)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=64,
                      engram=EngramConfig(hash=spec, head_dim=8, value_init_scale=0.5), embed_init_std=0.5)  # fmt: skip
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, CompressionMap.identity(64)))
    assert 0.4 < float(model.embed.weight.detach().std()) < 0.6
    torch.manual_seed(1)
    blk = engram_block(cfg, 68, 4)
    assert blk.wkv.weight.shape[0] == 2 * 32  # M = 1: one key, then the value
    assert ModelConfig().embed_init_std == 0.02 and EngramConfig().value_init_scale == 1.0
