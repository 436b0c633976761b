"""The cache's eviction order (``coldest``), its policies against a plain-Python reference, its id->slot map."""

from __future__ import annotations

import numpy as np
import pytest
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


def _consistent(cache: CachedTable) -> None:
    """The dense id -> slot map and the slot -> id array are inverse bijections over the occupied slots."""
    keys, key_slot = cache._keys, cache._key_slot
    assert keys.size == cache.cached_rows
    assert np.array_equal(cache._slot_id[key_slot], keys)
    assert np.array_equal(np.sort(key_slot), np.arange(cache.cached_rows))


def test_bf16_cache_copies_rows_bit_exact() -> None:
    """A 2-byte cache dtype goes through the kernels' bit copy: rows equal the inner's rows cast to bf16."""
    w = torch.randn(5_000, 16, generator=torch.Generator().manual_seed(2))
    cache = CachedTable(MemoryTable(w, FP), 500 * 16 * 2, "lru", dtype=torch.bfloat16)
    assert cache.capacity == 500
    rng = np.random.default_rng(3)
    for _ in range(100):
        ids = torch.from_numpy((rng.zipf(1.2, 64) - 1) % 5_000)
        assert torch.equal(cache.gather(ids), w[ids].to(torch.bfloat16).float())
    _consistent(cache)
    assert cache.stats.hits > 0 and cache.cached_rows == 500


def test_lfu_keeps_a_hot_set_through_scans() -> None:
    """Scan resistance: a hot set gathered every step survives a stream of one-off cold ids; LRU does not."""
    w = torch.randn(50_000, 8, generator=torch.Generator().manual_seed(4))
    hot = torch.arange(0, 2_000, 20)  # 100 hot ids, half the capacity
    kept = {}
    for policy in ("lfu", "lru"):
        cache = CachedTable(MemoryTable(w, FP), 200 * 8 * 4, policy)
        for step in range(200):
            cold = torch.arange(10_000 + step * 150, 10_000 + (step + 1) * 150)  # never seen again
            ids = torch.cat([hot, cold]) if step % 2 == 0 else cold
            assert torch.equal(cache.gather(ids), w[ids])
        _consistent(cache)
        kept[policy] = np.isin(hot.numpy(), cache._keys).mean()
    assert kept["lfu"] == 1.0
    assert kept["lru"] < 1.0  # recency alone lets the cold stream push hot rows out


def test_static_never_evicts() -> None:
    w = torch.randn(1_000, 8, generator=torch.Generator().manual_seed(5))
    cache = CachedTable(MemoryTable(w, FP), 50 * 8 * 4, "static")
    cache.preload(torch.arange(100, 150))
    before = cache._keys.copy()
    assert torch.equal(cache.gather(torch.tensor([[149, 100], [100, 120]])), w[torch.tensor([[149, 100], [100, 120]])])
    assert cache.stats.hits == 3 and cache.stats.misses == 0
    cache.gather(torch.arange(500, 700))  # misses, cache full: static keeps what it has
    assert np.array_equal(cache._keys, before)
    _consistent(cache)


class _ReferenceRecency:
    """The lru/static admission rule in plain Python, one id at a time: the kernels must match it slot for slot.

    Per gather (sorted unique ids): hits get the gather's tick (lru); misses fill free slots in id order, then
    (lru) each further miss replaces the next coldest slot filled before this gather, ordered by (tick, slot),
    if its tick is newer.
    """

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self.slot_id: list[int] = []
        self.score: list[int] = []
        self.where: dict[int, int] = {}
        self.tick = 0
        self.hits = 0

    def gather(self, ids: list[int]) -> None:
        self.tick += 1
        misses = []
        for i in ids:
            if i in self.where:
                self.hits += 1
                if self.policy == "lru":
                    self.score[self.where[i]] = self.tick
            else:
                misses.append(i)
        occupied = len(self.slot_id)
        n_free = min(self.capacity - occupied, len(misses))
        for i in misses[:n_free]:
            self.where[i] = len(self.slot_id)
            self.slot_id.append(i)
            self.score.append(self.tick)
        rest = misses[n_free:]
        if not rest or not occupied or self.policy == "static":
            return
        victims = sorted(range(occupied), key=lambda s: (self.score[s], s))[: len(rest)]
        for i, s in zip(rest, victims, strict=False):
            if self.tick <= self.score[s]:
                break
            del self.where[self.slot_id[s]]
            self.where[i], self.slot_id[s], self.score[s] = s, i, self.tick


@pytest.mark.parametrize("policy", ["lru", "static"])
def test_recency_policies_match_a_python_reference_slot_for_slot(policy: str) -> None:
    w = torch.randn(3_000, 4, generator=torch.Generator().manual_seed(6))
    cache = CachedTable(MemoryTable(w, FP), 150 * 4 * 4, policy)
    ref = _ReferenceRecency(150, policy)
    rng = np.random.default_rng(7)
    for _ in range(120):
        ids = torch.from_numpy((rng.zipf(1.3, int(rng.integers(1, 200))) - 1) % 3_000)
        assert torch.equal(cache.gather(ids), w[ids])
        ref.gather(torch.unique(ids).tolist())
        assert cache._slot_id[: cache.cached_rows].tolist() == ref.slot_id
    assert cache.stats.hits == ref.hits > 0
