"""The cache's eviction order (``coldest``): the k lowest scores by (score, slot), as a stable sort gives them."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engramlm.store.cache import CachedTable, coldest
from engramlm.store.memory import MemoryTable

FP = "c0" * 32


@settings(max_examples=80, deadline=None)
@given(
    scores=st.lists(st.integers(0, 6), min_size=1, max_size=600),  # small LFU-like scores: mostly ties
    k=st.integers(1, 700),
)
def test_coldest_equals_stable_sort(scores: list[int], k: int) -> None:
    arr = np.array(scores, dtype=np.int64)
    k = min(k, arr.size)
    assert np.array_equal(coldest(arr, k), np.argsort(arr, kind="stable")[:k])


def test_coldest_on_a_large_tied_cache_is_fast_and_exact() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, 200_000).astype(np.int64)
    for k in (1, 64, 256, 257, 5000):
        assert np.array_equal(coldest(scores, k), np.argsort(scores, kind="stable")[:k])


def test_full_lfu_cache_evicts_and_serves_exact_rows() -> None:
    """A full cache admitting on every gather (the path that used argpartition) stays exact and consistent."""
    w = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    cache = CachedTable(MemoryTable(w, FP), 2_000 * 16 * 4, "lfu")
    rng = np.random.default_rng(1)
    for _ in range(300):
        ids = torch.from_numpy((rng.zipf(1.2, 64) - 1) % 20_000)
        assert torch.equal(cache.gather(ids), w[ids])
    assert cache.cached_rows == cache.capacity == 2_000
    assert np.array_equal(cache._slot_id[cache._key_slot], cache._keys)
    assert cache.stats.hit_rate > 0.5
