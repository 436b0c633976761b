"""Row usage and collisions: chunked hashing is exact, counts and collisions match brute force."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.analysis.common import EvalArrays
from engramlm.analysis.rows import (
    COUNT_BUCKETS,
    compressed_ngrams,
    count_buckets,
    dense_keys,
    hash_stream,
    loss_by_ngram_frequency,
    row_usage,
    split_stream,
    zipf_fit,
)
from engramlm.data import TokenDataset, prepare
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rows") / "prep"
    prepare("stdlib", out, 400, max_bytes=60_000, progress=False)
    return out


def _layout(data: Path, mode: str = "reset", base: int = 211):
    spec = HashSpec(
        max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(base, base), layer_ids=(0, 3), boundary_mode=mode
    )
    return make_layout(spec, CompressionMap.from_tokenizer(data / "tokenizer.json"))


@pytest.mark.parametrize("mode", ["reset", "none"])
def test_chunked_hashing_is_exact(data: Path, mode: str) -> None:
    layout = _layout(data, mode)
    tokens, doc = split_stream(TokenDataset(data, "val"), max_tokens=3000)
    assert doc.sum() >= 2  # several documents, so resets matter
    whole = hash_stream(layout, tokens, doc, chunk=1 << 20)
    chunked = hash_stream(layout, tokens, doc, chunk=97)
    assert np.array_equal(whole, chunked)
    from engramlm.hashing.batch import NgramHasher

    direct = NgramHasher(layout)(torch.from_numpy(tokens)[None], torch.from_numpy(doc)[None], head_local=True)
    assert np.array_equal(whole, direct[:, 0].numpy())


def test_usage_and_collisions_match_brute_force(data: Path) -> None:
    layout = _layout(data)
    tokens, doc = split_stream(TokenDataset(data, "val"), max_tokens=2500)
    report, curves = row_usage(layout, tokens, doc)
    rows = hash_stream(layout, tokens, doc)  # [L, N, H_e] head-local
    comp = layout.compression.lookup[tokens]
    pad = layout.compressed_pad_id
    k_heads = layout.spec.n_head_per_ngram
    start = 0
    ngrams: dict[int, list[tuple[int, ...]]] = {n: [] for n in layout.spec.orders}
    for t in range(tokens.shape[0]):  # brute force: plain Python over positions
        if doc[t]:
            start = t
        for n in layout.spec.orders:
            ngrams[n].append(tuple(int(comp[t - k]) if t - k >= start else pad for k in range(n)))
    for li, lid in enumerate(layout.layer_ids):
        heads = report["layers"][str(lid)]["heads"]
        for oi, n in enumerate(layout.spec.orders):
            for k in range(k_heads):
                col = oi * k_heads + k
                h = heads[col]
                assert (h["order"], h["head"]) == (n, k)
                by_row: dict[int, set] = defaultdict(set)
                row_of: dict[tuple, int] = {}
                for t, g in enumerate(ngrams[n]):
                    r = int(rows[li, t, col])
                    assert row_of.setdefault(g, r) == r  # one n-gram, one row
                    by_row[r].add(g)
                c = h["collisions"]
                assert c["distinct_ngrams"] == len(row_of)
                assert c["rows_holding_ngrams"] == len(by_row)
                assert c["collided_rows"] == sum(len(s) > 1 for s in by_row.values())
                assert c["ngrams_in_collided_rows"] == sum(len(s) for s in by_row.values() if len(s) > 1)
                assert c["collided_rows"] > 0  # small primes: collisions must exist
                assert h["touched"] == len(set(rows[li, :, col].tolist()))
                assert h["reads"] == tokens.shape[0]
                assert curves[f"L{lid} n{n} h{k}"].sum() == tokens.shape[0]
    # a wide table collides far less than a narrow one
    wide, _ = row_usage(_layout(data, base=100_003), tokens, doc)
    narrow = report["layers"]["0"]["heads"][-1]["collisions"]["collision_rate"]
    assert wide["layers"]["0"]["heads"][-1]["collisions"]["collision_rate"] < narrow / 10


def test_dense_keys_agree_with_unique_rows(data: Path) -> None:
    layout = _layout(data)
    tokens, doc = split_stream(TokenDataset(data, "val"), max_tokens=1000)
    g = compressed_ngrams(layout, tokens, doc, 3)
    (packed,) = dense_keys(g, base=layout.compression.compressed_vocab_size)
    (fallback,) = dense_keys(g, base=2**40)  # too big to pack: np.unique path
    assert np.unique(packed).size == np.unique(g, axis=0).shape[0] == np.unique(fallback).size
    # equal keys <=> equal n-grams, in both encodings
    assert np.array_equal(packed[:, None] == packed[None], fallback[:, None] == fallback[None])


def test_zipf_fit_recovers_exponent() -> None:
    ranks = np.arange(1, 2001)
    counts = np.round(1e7 * ranks**-1.3).astype(np.int64)
    fit = zipf_fit(np.random.default_rng(0).permutation(np.concatenate([counts, np.zeros(500, np.int64)])))
    assert fit["exponent"] == pytest.approx(1.3, abs=0.01) and fit["r2"] > 0.999
    flat = zipf_fit(np.full(100, 7))
    assert flat["exponent"] == pytest.approx(0.0, abs=1e-9)


def test_loss_by_ngram_count_buckets(data: Path) -> None:
    layout = _layout(data)
    usage_t, usage_d = split_stream(TokenDataset(data, "train"))
    eval_t, eval_d = split_stream(TokenDataset(data, "val"))
    pos = np.arange(eval_t.shape[0] - 1)
    nll = np.random.default_rng(0).random(pos.shape[0])
    arr = EvalArrays(pos, eval_t[:-1], eval_t[1:], np.ones_like(pos), {"baseline": nll}, 0, True)
    rep = loss_by_ngram_frequency(layout, usage_t, usage_d, eval_t, eval_d, arr)
    assert set(rep) == {"2", "3"}
    for by in rep.values():
        assert sum(b["targets"] for b in by.values()) == pos.shape[0]
        assert set(by) <= set(COUNT_BUCKETS)
    # brute-force the bigram count of one frequent position
    big = compressed_ngrams(layout, usage_t, usage_d, 2)
    ev = compressed_ngrams(layout, eval_t, eval_d, 2)
    counts = defaultdict(int)
    for g in map(tuple, big.tolist()):
        counts[g] += 1
    want = np.array([counts[tuple(g)] for g in ev[:-1].tolist()])
    buckets = count_buckets(want)
    for bi, name in enumerate(COUNT_BUCKETS):
        if (buckets == bi).any():
            assert rep["2"][name]["targets"] == int((buckets == bi).sum())
            assert rep["2"][name]["baseline"] == pytest.approx(nll[buckets == bi].mean())
