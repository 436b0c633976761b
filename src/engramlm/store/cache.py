"""Hot-row cache in front of any tier: decoded rows in a dense slot tensor, looked up vectorised.

N-gram access is skewed but workload-dependent (landscape §4.2), so the cache is optional and
instrumented. The id->slot map is a sorted id array (``searchsorted`` lookups, linear-time
merges), so hits never touch a Python loop. Policies:

* ``lfu`` — TinyLFU-style: a count-min sketch (halved periodically, so it ages) estimates
  every id's frequency; a miss replaces the coldest slot only if it is more frequent.
* ``lru`` — a miss replaces the least recently used slot not touched by this batch.
* ``static`` — fills free slots (or ``preload``), never evicts.

Correctness never depends on timing: hits are copied out under the lock before this call
inserts anything, misses come from the inner tier, and slot writes happen under the lock.
"""

from __future__ import annotations

import threading

import numba as nb
import numpy as np
import torch

from engramlm.errors import ConfigError
from engramlm.store.base import RowTable

POLICIES = ("lfu", "lru", "static")
_SKETCH_DEPTH = 4
_SKETCH_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


@nb.njit(nogil=True, cache=True)
def _coldest_small(scores: np.ndarray, k: int) -> np.ndarray:  # pragma: no cover - compiled
    """Bounded insertion: one pass, the k lowest kept sorted by (score, slot)."""
    best_s = np.empty(k, np.int64)
    best_i = np.empty(k, np.int64)
    m = 0
    for i in range(scores.size):
        s = scores[i]
        if m == k and s >= best_s[k - 1]:
            continue
        j = m if m < k else k - 1
        while j > 0 and best_s[j - 1] > s:
            best_s[j] = best_s[j - 1]
            best_i[j] = best_i[j - 1]
            j -= 1
        best_s[j] = s
        best_i[j] = i
        if m < k:
            m += 1
    return best_i[:m]


def coldest(scores: np.ndarray, k: int) -> np.ndarray:
    """Slots of the ``k`` lowest scores, ascending by (score, slot): the eviction order.

    Was ``argpartition`` + a stable sort: NumPy's introselect takes ~40 ms on 80k slots of LFU scores
    (small integers, mostly ties), on every admitting gather, under the GIL. A bounded one-pass selection in
    a Numba ``nogil`` kernel for the usual few misses; a stable sort for large ``k`` (a prefill).
    """
    if k >= scores.size:
        return np.argsort(scores, kind="stable")
    if k <= 256:
        return _coldest_small(np.ascontiguousarray(scores, dtype=np.int64), k)
    return np.argsort(scores, kind="stable")[:k]


class _FrequencySketch:
    """Count-min sketch with multiply-shift hashing and periodic halving (aging)."""

    def __init__(self, capacity: int) -> None:
        self.bits = int(min(22, max(10, int(np.ceil(np.log2(max(4 * capacity, 1)))))))
        self.table = np.zeros((_SKETCH_DEPTH, 1 << self.bits), dtype=np.int32)
        self.sample = max(10 * capacity, 1024)
        self.added = 0

    def _hash(self, ids: np.ndarray) -> np.ndarray:
        mixed = ids.astype(np.uint64)[None, :] * _SKETCH_MULT[:, None]
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)

    def add(self, ids: np.ndarray) -> bool:
        """Count one access per id; returns True when the counters were just halved."""
        h = self._hash(ids) + (np.arange(_SKETCH_DEPTH, dtype=np.int64) << self.bits)[:, None]
        # Buffered increment: ids colliding within one batch count once there. That rare
        # undercount is harmless for admission and ~50x faster than np.add.at.
        self.table.reshape(-1)[h.reshape(-1)] += 1
        self.added += ids.size
        if self.added >= self.sample:
            self.table >>= 1
            self.added //= 2
            return True
        return False

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        h = self._hash(ids)
        return self.table[np.arange(_SKETCH_DEPTH)[:, None], h].min(axis=0).astype(np.int64)


class CachedTable(RowTable):
    """``inner`` behind a fixed-budget cache of decoded rows (capacity = budget // row size)."""

    def __init__(
        self,
        inner: RowTable,
        budget_bytes: int,
        policy: str = "lfu",
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(inner.table_header)
        if policy not in POLICIES:
            raise ConfigError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        self.inner = inner
        self.policy = policy
        self.dtype = dtype
        elem = torch.empty(0, dtype=dtype).element_size()
        self.capacity = max(0, int(budget_bytes) // (inner.dim * elem))
        self._slots = torch.empty(self.capacity, inner.dim, dtype=dtype)
        self._keys = np.empty(0, dtype=np.int64)  # sorted cached ids
        self._key_slot = np.empty(0, dtype=np.int64)  # slot of each key
        self._slot_id = np.full(self.capacity, -1, dtype=np.int64)
        self._score = np.zeros(self.capacity, dtype=np.int64)  # LFU estimate or LRU tick
        self._used = 0
        self._tick = 0
        self._sketch = _FrequencySketch(self.capacity) if policy == "lfu" else None
        self._lock = threading.Lock()

    @property
    def cached_rows(self) -> int:
        return int(self._keys.size)

    def close(self) -> None:
        self.inner.close()

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, slot of each hit) for sorted unique ``ids``; caller holds the lock."""
        if self._keys.size == 0:
            return np.zeros(ids.size, dtype=bool), np.empty(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys, ids), self._keys.size - 1)
        hit = self._keys[pos] == ids
        return hit, self._key_slot[pos[hit]]

    def _touch(self, ids: np.ndarray, hit_slots: np.ndarray) -> None:
        self._tick += 1
        if self._sketch is not None:
            if self._sketch.add(ids):
                self._score >>= 1
            self._score[hit_slots] = self._sketch.estimate(self._slot_id[hit_slots])
        else:
            self._score[hit_slots] = self._tick

    def _admit(self, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Insert miss rows per policy; caller holds the lock. ``ids`` sorted unique."""
        present, _ = self._lookup(ids)
        fresh = np.flatnonzero(~present)  # another thread may have inserted some meanwhile
        if fresh.size == 0 or self.capacity == 0:
            return
        cand = ids[fresh]
        if self._sketch is not None:
            cand_score = self._sketch.estimate(cand)
        else:
            cand_score = np.full(cand.size, self._tick, dtype=np.int64)
        order = np.argsort(-cand_score, kind="stable")
        occupied = self._used  # only slots filled before this call may be evicted
        n_free = min(self.capacity - occupied, order.size)
        take = order[:n_free]
        slots = np.arange(occupied, occupied + n_free, dtype=np.int64)
        self._used += n_free
        rest = order[n_free:]
        if rest.size and occupied and self.policy != "static":
            k = min(rest.size, occupied)
            victims = coldest(self._score[:occupied], k)
            rest = rest[:k]
            # Candidates descend and victims ascend in score, so admission is a prefix.
            n_adm = int(np.count_nonzero(cand_score[rest] > self._score[victims]))
            evict = victims[:n_adm]
            if evict.size:
                old = np.sort(self._slot_id[evict])
                keep = np.ones(self._keys.size, dtype=bool)
                keep[np.searchsorted(self._keys, old)] = False
                self._keys, self._key_slot = self._keys[keep], self._key_slot[keep]
            take = np.concatenate([take, rest[:n_adm]])
            slots = np.concatenate([slots, evict])
        if take.size == 0:
            return
        self._slots[torch.from_numpy(slots)] = rows[torch.from_numpy(fresh[take])].to(self.dtype)
        self._slot_id[slots] = cand[take]
        self._score[slots] = cand_score[take]
        by_id = np.argsort(cand[take], kind="stable")
        new_ids, new_slots = cand[take][by_id], slots[by_id]
        at = np.searchsorted(self._keys, new_ids)
        self._keys = np.insert(self._keys, at, new_ids)
        self._key_slot = np.insert(self._key_slot, at, new_slots)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        out = torch.empty(idx.size, self.dim, dtype=self.dtype)
        with self._lock:
            hit, hit_slots = self._lookup(idx)
            if hit_slots.size:
                out[torch.from_numpy(hit)] = self._slots[torch.from_numpy(hit_slots)]
            self._touch(idx, hit_slots)
        miss = ~hit
        miss_ids = idx[miss]
        if miss_ids.size:
            rows = self.inner.fetch_sorted_unique(torch.from_numpy(miss_ids))
            out[torch.from_numpy(miss)] = rows.to(self.dtype)
            with self._lock:
                self._admit(miss_ids, rows)
        self.stats.add(hits=int(hit_slots.size), misses=int(miss_ids.size))
        return out

    def preload(self, row_ids: torch.Tensor) -> None:
        """Warm the cache with known-hot rows (e.g. from a profile); the static policy's setup."""
        ids = torch.unique(torch.as_tensor(row_ids).reshape(-1).to(torch.int64))
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.num_rows):
            raise IndexError(f"preload ids out of range [0, {self.num_rows})")
        idx = ids.numpy()
        with self._lock:
            hit, _ = self._lookup(idx)
        miss_ids = idx[~hit]
        if miss_ids.size:
            rows = self.inner.fetch_sorted_unique(torch.from_numpy(miss_ids))
            with self._lock:
                if self._sketch is not None:
                    self._sketch.add(miss_ids)
                self._admit(miss_ids, rows)
