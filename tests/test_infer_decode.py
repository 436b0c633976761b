"""Incremental decoding (prefill + one-token steps through DecodeCache) equals the full forward."""

from __future__ import annotations

import pytest
import torch

from engramlm.hashing.spec import HashSpec
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.decode import DecodeCache
from engramlm.models.model import EngramLM
from helpers import tiny_lm

V = 48
T = 21


pytestmark = pytest.mark.usefixtures("one_thread")


def build(*, m: int, moe: bool, mode: str = "reset", seed: int = 0) -> EngramLM:
    spec = HashSpec(
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(31, 37),
        layer_ids=(0, 2),
        boundary_mode=mode,
    )
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=16,
        num_layers=3,
        n_heads=2,
        n_kv_heads=1,
        mlp_hidden=24,
        hc_mult=m,
        max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=8, n_dense_layers=1) if moe else None,
        engram=EngramConfig(hash=spec, head_dim=4),
    )
    return tiny_lm(cfg, seed, random_conv=True).eval()


def ids_and_masks(b: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    doc = torch.zeros(b, t, dtype=torch.bool)
    doc[:, 0] = True
    doc[0, 7] = doc[0, 15] = True  # one reset inside the prompt, one during decoding
    doc[-1, 12] = True
    dead = torch.zeros(b, t, dtype=torch.bool)
    dead[-1, 17] = True
    return ids, doc, dead


def incremental(model: EngramLM, ids, prefill: int, doc=None, dead=None) -> torch.Tensor:
    b, t = ids.shape
    cache = DecodeCache(model, b, t + 3)
    sl = lambda x, a, z: None if x is None else x[:, a:z]  # noqa: E731
    outs = [cache.run(model, ids[:, :prefill], doc_start=sl(doc, 0, prefill), dead=sl(dead, 0, prefill)).logits]
    for i in range(prefill, t):
        outs.append(cache.run(model, ids[:, i : i + 1], doc_start=sl(doc, i, i + 1), dead=sl(dead, i, i + 1)).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("reset", [False, True])
def test_prefill_then_steps_equal_full_forward(m: int, moe: bool, reset: bool) -> None:
    model = build(m=m, moe=moe)
    ids, doc, dead = ids_and_masks(2, T)
    doc, dead = (doc, dead) if reset else (None, None)
    with torch.no_grad():
        full = model(ids, engram=model.engram_inputs(ids, doc, dead)).logits
        for prefill in (1, 5):
            got = incremental(model, ids, prefill, doc, dead)
            torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
        # The conv history and resets matter: dropping the doc masks changes the logits.
        if reset:
            assert not torch.allclose(incremental(model, ids, 5), full, atol=1e-4)


def test_decode_row_ids_match_batch_hasher() -> None:
    model = build(m=1, moe=False)
    ids, doc, dead = ids_and_masks(3, T, seed=4)
    ref = model.hash(ids, doc, dead)
    cache = DecodeCache(model, 3, T)
    got = [cache.begin(ids[:, :4], doc[:, :4], dead[:, :4]).row_ids]
    cache.pos += 4  # begin() alone does not commit
    for i in range(4, T):
        got.append(cache.begin(ids[:, i : i + 1], doc[:, i : i + 1], dead[:, i : i + 1]).row_ids)
        cache.pos += 1
    assert torch.equal(torch.cat(got, dim=2), ref)


@pytest.mark.parametrize("m", [1, 4])
def test_right_padded_batch_prefill_matches_each_sequence_alone(m: int) -> None:
    model = build(m=m, moe=True)
    ids, doc, _ = ids_and_masks(3, T, seed=2)
    lens = torch.tensor([4, 11, 7])
    steps = 6
    with torch.no_grad():
        cache = DecodeCache(model, 3, 11 + steps)
        padded = ids[:, :11].clone()
        padded[torch.arange(11) >= lens[:, None]] = 0
        out = cache.run(model, padded, doc_start=doc[:, :11], lengths=lens).logits
        batched = [out[torch.arange(3), lens - 1]]
        for s in range(steps):
            col = lens + s
            nxt = ids[torch.arange(3), col][:, None]
            batched.append(cache.run(model, nxt, doc_start=doc[torch.arange(3), col][:, None]).logits[:, 0])
        batched = torch.stack(batched, dim=1)
        for b in range(3):
            n = int(lens[b]) + steps
            x = ids[b : b + 1, :n]
            alone = model(x, engram=model.engram_inputs(x, doc[b : b + 1, :n])).logits[0, int(lens[b]) - 1 :]
            torch.testing.assert_close(batched[b], alone, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_after_history_matches() -> None:
    model = build(m=4, moe=False)
    ids, doc, dead = ids_and_masks(2, T, seed=3)
    with torch.no_grad():
        full = model(ids, engram=model.engram_inputs(ids, doc, dead)).logits
        cache = DecodeCache(model, 2, T)
        parts = [(0, 6), (6, 13), (13, 14), (14, T)]
        got = torch.cat(
            [cache.run(model, ids[:, a:z], doc_start=doc[:, a:z], dead=dead[:, a:z]).logits for a, z in parts],
            dim=1,
        )
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_bad_lengths_raise() -> None:
    model = build(m=1, moe=False)
    cache = DecodeCache(model, 2, 4)
    with pytest.raises(ValueError, match="overflow"):
        cache.begin(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        cache.begin(torch.zeros(2, 3, dtype=torch.long), lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="batch"):
        cache.begin(torch.zeros(3, 1, dtype=torch.long))


@torch.no_grad()
def test_skipped_engram_layers_decode_like_the_full_forward_and_cannot_change_mid_sequence() -> None:
    model = build(m=2, moe=False)
    ids, doc, _ = ids_and_masks(2, T)
    full = model(ids, engram=model.engram_inputs(ids, doc, skip_engram={2})).logits
    cache = DecodeCache(model, 2, T + 3)
    outs = [cache.run(model, ids[:, :9], doc_start=doc[:, :9], skip_engram={2}).logits]
    for t in range(9, T):
        outs.append(cache.run(model, ids[:, t : t + 1], doc_start=doc[:, t : t + 1], skip_engram={2}).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"skip_engram: this decode cache was started skipping layers \[2\]"):
        cache.run(model, ids[:, :1], skip_engram=False)
