"""Hot-row cache in front of any tier: decoded rows in a dense slot tensor, looked up vectorised.

N-gram access is skewed but workload-dependent (landscape §4.2), so the cache is optional and
instrumented. It must also cost less CPU than the reads it saves: on the decode thread a gather's
Python holds the GIL against the model's own dispatch (issue 18), and the SSD tier's reads already run
in a ``nogil`` kernel. So the whole cache, lookup, frequency sketch, hit copy, admission and eviction,
is two Numba ``nogil`` kernels over a dense id->slot map (int32 per table row, -1 = absent: 3.2 MB
for 800k rows): one call before the inner tier's read (hits copied into the output, misses listed),
one after (misses admitted); in front of the direct tier, one fused call, and for inline gathers a job
of the cache's own GIL-free I/O thread, whose admission runs after the decode thread got its rows.
The sorted-key map it replaces (``searchsorted``, ``np.insert`` on every admission, a NumPy sketch)
cost about twice the CPU of a whole uncached O_DIRECT gather. Policies:

* ``lfu`` — TinyLFU-style: a count-min sketch (halved periodically, so it ages) estimates
  every id's frequency; a miss replaces the coldest slot only if it is more frequent.
* ``lru`` — a miss replaces the least recently used slot not touched by this batch.
* ``static`` — fills free slots (or ``preload``), never evicts.

Correctness never depends on timing: hits are copied out under the lock before this call
inserts anything, misses come from the inner tier, and slot writes happen under the lock.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numba as nb
import numpy as np
import torch

from engramlm.errors import ConfigError
from engramlm.store import _aio
from engramlm.store._dedup import unique_inverse_kernel
from engramlm.store.base import INT_VIEWS, PendingGather, RowTable, int_view

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


_LFU, _LRU, _STATIC = 0, 1, 2


@nb.njit(nogil=True, cache=True)
def _bucket(x: int, d: int, bits: int) -> int:  # pragma: no cover - compiled
    """Multiply-shift hash of row id ``x`` for sketch row ``d``: the top ``bits`` bits of x * MULT[d]."""
    return np.int64((np.uint64(x) * _SKETCH_MULT[d]) >> np.uint64(64 - bits))


@nb.njit(nogil=True, cache=True)
def _estimate(table: np.ndarray, bits: int, x: int) -> int:  # pragma: no cover - compiled
    est = table[0, _bucket(x, 0, bits)]
    for d in range(1, _SKETCH_DEPTH):
        est = min(est, table[d, _bucket(x, d, bits)])
    return np.int64(est)


@nb.njit(nogil=True, cache=True)
def _sketch_add(
    ids: np.ndarray, table: np.ndarray, bits: int, score: np.ndarray, sample: int, added: int
) -> int:  # pragma: no cover - compiled
    """Count one access per id; halve every counter (and every slot's score) each ``sample`` accesses (aging)."""
    for i in range(ids.size):
        for d in range(_SKETCH_DEPTH):
            table[d, _bucket(ids[i], d, bits)] += 1
    added += ids.size
    if added >= sample:
        for d in range(table.shape[0]):
            for j in range(table.shape[1]):
                table[d, j] >>= 1
        for j in range(score.size):
            score[j] >>= 1
        added //= 2
    return added


@nb.njit(nogil=True, cache=True)
def _probe(
    ids: np.ndarray,
    slot_of: np.ndarray,
    score: np.ndarray,
    slots: np.ndarray,
    out: np.ndarray,
    policy: int,
    tick: int,
    table: np.ndarray,
    bits: int,
    sample: int,
    added: int,
) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled
    """Copy hits into ``out``, refresh their scores; returns (miss positions in ``ids``, miss ids, sketch count)."""
    if policy == _LFU:
        added = _sketch_add(ids, table, bits, score, sample, added)
    miss = np.empty(ids.size, np.int64)
    n_miss = 0
    for i in range(ids.size):
        s = slot_of[ids[i]]
        if s < 0:
            miss[n_miss] = i
            n_miss += 1
            continue
        out[i, :] = slots[s, :]
        if policy == _LFU:
            score[s] = _estimate(table, bits, ids[i])
        elif policy == _LRU:
            score[s] = tick
    miss = miss[:n_miss]
    return miss, ids[miss], added


@nb.njit(nogil=True, cache=True)
def _admit(
    ids: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
    pos: np.ndarray,
    slot_of: np.ndarray,
    slot_id: np.ndarray,
    score: np.ndarray,
    slots: np.ndarray,
    used: int,
    policy: int,
    tick: int,
    table: np.ndarray,
    bits: int,
) -> int:  # pragma: no cover - compiled
    """Copy miss ``rows`` to ``out[pos]``, then admit them (sorted unique ``ids``) per policy; returns slots in use.

    Free slots go to the most frequent candidates; then, unless static, each further candidate
    replaces the coldest slot filled before this call if it is strictly hotter (candidates descend
    and victims ascend in score, so admission is a prefix). Ids another thread inserted meanwhile
    are skipped.
    """
    for i in range(pos.size):
        out[pos[i], :] = rows[i, :]
    capacity = slot_id.size
    fresh = np.empty(ids.size, np.int64)
    nf = 0
    for i in range(ids.size):
        if slot_of[ids[i]] < 0:
            fresh[nf] = i
            nf += 1
    if nf == 0 or capacity == 0:
        return used
    fresh = fresh[:nf]
    cand = np.empty(nf, np.int64)
    for j in range(nf):
        cand[j] = _estimate(table, bits, ids[fresh[j]]) if policy == _LFU else tick
    order = np.argsort(-cand, kind="mergesort")
    occupied = used
    n_free = min(capacity - occupied, nf)
    for j in range(n_free):
        i, s = fresh[order[j]], occupied + j
        slot_of[ids[i]], slot_id[s], score[s] = s, ids[i], cand[order[j]]
        slots[s, :] = rows[i, :]
    used = occupied + n_free
    n_rest = nf - n_free
    if n_rest == 0 or occupied == 0 or policy == _STATIC:
        return used
    k = min(n_rest, occupied)
    if k <= 256 and k < occupied:
        victims = _coldest_small(score[:occupied], k)  # a view: no copy of the scores
    else:
        victims = np.argsort(score[:occupied], kind="mergesort")[:k]
    n_adm = 0
    for j in range(k):
        if cand[order[n_free + j]] > score[victims[j]]:
            n_adm += 1
    for j in range(n_adm):
        slot_of[slot_id[victims[j]]] = -1
    for j in range(n_adm):
        i, s = fresh[order[n_free + j]], victims[j]
        slot_of[ids[i]], slot_id[s], score[s] = s, ids[i], cand[order[n_free + j]]
        slots[s, :] = rows[i, :]
    return used


@nb.njit(nogil=True, cache=True)
def _probe_flat(
    flat: np.ndarray,
    num_rows: int,
    slot_of: np.ndarray,
    score: np.ndarray,
    slots: np.ndarray,
    policy: int,
    tick: int,
    table: np.ndarray,
    bits: int,
    sample: int,
    added: int,
) -> tuple:  # pragma: no cover - compiled
    """Dedupe any ids ``flat``, range-check, then :func:`_probe` the unique ids into a fresh [u, dim] buffer.

    Returns (ok, unique, inverse, rows of the unique ids (hits filled), miss positions, miss ids, sketch
    count); ``ok`` is False when an id lies outside [0, num_rows) (then only ``unique`` is meaningful).
    """
    unique, inverse = unique_inverse_kernel(flat)
    rows = np.empty((unique.size, slots.shape[1]), slots.dtype)
    if unique[0] < 0 or unique[unique.size - 1] >= num_rows:
        none = np.empty(0, np.int64)
        return False, unique, inverse, rows, none, none, added
    pos, miss_ids, added = _probe(unique, slot_of, score, slots, rows, policy, tick, table, bits, sample, added)
    return True, unique, inverse, rows, pos, miss_ids, added


@nb.njit(nogil=True, cache=True)
def _expand(rows: np.ndarray, inverse: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i] = rows[inverse[i]]``: the unique rows back to request order."""
    for i in range(inverse.size):
        out[i, :] = rows[inverse[i], :]


PAGE = 4096
_FUSED_MAX_IDS = 1024  # as the direct tier's FUSED_MAX_IDS: a prefill gathers synchronously


@lru_cache(maxsize=1)
def _fused_kernel() -> Any:
    """The cached gather in front of the aio direct tier as one ``nogil`` kernel (built on first use: it calls the
    aio engine's compiled ``fetch``). The worker enters and leaves it once per gather, instead of re-taking the GIL
    between four calls, each hand-off delaying the decode thread (issue 18)."""
    fetch = _aio._kernels()[4]

    @nb.njit(nogil=True)
    def cached_read(
        flat, num_rows, slot_of, score, slots, policy, tick, table, bits, sample, added, slot_id, used,
        row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, ctx, out,
    ):  # fmt: skip  # pragma: no cover - compiled
        """(status, pages read, bad pages, first bad page, unique ids, misses, sketch count, slots used); status 0,
        an errno, -1 (``buf`` too small: never, the caller sizes it for every id) or -2 (an id out of range: pages
        and bad then hold the lowest and highest id). Nothing is admitted unless every page read and verified."""
        ok, unique, inverse, rows, pos, miss_ids, added = _probe_flat(
            flat, num_rows, slot_of, score, slots, policy, tick, table, bits, sample, added
        )
        nu = unique.size
        if not ok:
            return -2, unique[0], unique[nu - 1], -1, nu, 0, added, used
        n_pages = 0
        if pos.size:
            miss = np.empty((pos.size, slots.shape[1]), slots.dtype)
            err, n_pages, bad, first = fetch(
                miss_ids, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, miss.view(np.uint8), ctx
            )
            if err != 0 or bad:
                return err, n_pages, bad, first, nu, pos.size, added, used
            used = _admit(miss_ids, miss, rows, pos, slot_of, slot_id, score, slots, used, policy, tick, table, bits)
        _expand(rows, inverse, out)
        return 0, n_pages, 0, -1, nu, pos.size, added, used

    return cached_read


@lru_cache(maxsize=1)
def _split_kernels() -> tuple[Any, Any]:
    """The cached gather in front of the direct tier's kernel AIO in two ``nogil`` halves (split phase): ``start``
    dedupes, probes (hits copied out) and submits the misses' page reads; ``finish`` reaps them, verifies,
    admits the misses and expands. No thread between the halves: the kernel reads while the forward runs."""
    k = _aio._kernels()
    start_read, finish_read, copy_rows = k[6], k[7], k[3]

    @nb.njit(nogil=True)
    def start(
        flat, num_rows, slot_of, score, slots, policy, tick, table, bits, sample, added,
        row_bytes, data_offset, max_run_pages, buf, ctx, fd,
    ):  # fmt: skip  # pragma: no cover - compiled
        """(status, lo, hi, sketch count, unique count, inverse, rows, miss positions, miss ids, then start_read's
        (pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st)); status 0, -1 (``buf`` too small:
        never, the caller sizes it for every id) or -2 (an id out of range: nothing probed or submitted)."""
        ok, unique, inverse, rows, pos, miss_ids, added = _probe_flat(
            flat, num_rows, slot_of, score, slots, policy, tick, table, bits, sample, added
        )
        nu = unique.size
        lo, hi = unique[0], unique[nu - 1]
        status, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st = start_read(
            ctx, fd, miss_ids, row_bytes, data_offset, max_run_pages, buf
        )
        if not ok:
            status = -2
        return (status, lo, hi, added, nu, inverse, rows, pos, miss_ids, pages, run_slot, run_count, row_offset,
                cbs, ptrs, got, rstatus, st)  # fmt: skip

    @nb.njit(nogil=True)
    def finish(
        ctx, fd, buf, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st, crcs, verify, page0,
        miss_ids, pos, rows, inverse, slot_of, slot_id, score, slots, used, policy, tick, table, bits, out,
    ):  # fmt: skip  # pragma: no cover - compiled
        """(errno or 0, bad pages, first bad page, slots used): reap + verify the misses, admit them, expand.
        Nothing is admitted unless every page read and verified."""
        if pos.size:
            err, bad, first = finish_read(ctx, fd, buf, pages, run_slot, run_count, cbs, ptrs, got, rstatus, st,
                                          crcs, verify, page0)  # fmt: skip
            if err or bad:
                return err, bad, first, used
            miss = np.empty((pos.size, slots.shape[1]), slots.dtype)
            copy_rows(buf, row_offset, miss.view(np.uint8))
            used = _admit(miss_ids, miss, rows, pos, slot_of, slot_id, score, slots, used, policy, tick, table, bits)
        _expand(rows, inverse, out)
        return 0, 0, -1, used

    return start, finish


@lru_cache(maxsize=1)
def _thread_kernels() -> tuple[Any, Any]:
    """The whole cached gather as a job of the cache's own I/O thread (an :class:`_aio.IoThread` over the direct
    tier's file), so the decode thread only posts the ids and later copies the rows out. ``job`` = dedupe + probe
    (hits copied, sketch and scores updated), the read of the misses, expansion into the job's ring row;
    ``settle`` = the misses' admission (the victim scan over every occupied slot), run after the waiter woke.
    ``args`` ends with the cache's arrays and ``st`` = [tick, sketch count, slots used]; only this thread touches
    them while a job is in flight (:meth:`CachedTable._exclusive`). Status: (0 or an errno or -2, pages, bad
    pages, first bad page, unique ids, misses, lowest id, highest id). Nothing is admitted unless every page read
    and verified."""
    k = _aio._kernels()
    fetch, aligned = k[4], k[18]

    @nb.njit(nogil=True)
    def job(flat, out_bytes, status, a):  # pragma: no cover - compiled
        (num_rows, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, ctx,
         slot_of, score, slots, _, table, bits, sample, policy, st) = a  # fmt: skip
        n, dim = flat.size, slots.shape[1]
        out = out_bytes[: n * row_bytes].view(slots.dtype).reshape((n, dim))
        none_ids, none_rows = np.empty(0, np.int64), np.empty((0, dim), slots.dtype)
        st[0] += 1
        ok, unique, inverse, rows, pos, miss_ids, added = _probe_flat(
            flat, num_rows, slot_of, score, slots, policy, st[0], table, bits, sample, st[1]
        )
        nu = unique.size
        status[0], status[1], status[2], status[3], status[4], status[5] = 0, 0, 0, -1, nu, pos.size
        status[6], status[7] = unique[0], unique[nu - 1]
        if not ok:
            status[0] = -2
            return False, none_ids, none_rows
        st[1] = added
        if pos.size == 0:
            _expand(rows, inverse, out)
            return False, none_ids, none_rows
        miss = np.empty((pos.size, dim), slots.dtype)
        need = _aio_max_pages(pos.size, row_bytes)
        page_buf = buf if need * PAGE <= buf.size else aligned(need)
        err, n_pages, bad, first = fetch(
            miss_ids, row_bytes, data_offset, max_run_pages, fds, page_buf, crcs, verify, miss.view(np.uint8), ctx
        )
        status[0], status[1], status[2], status[3] = err, n_pages, bad, first
        if err != 0 or bad:
            return False, none_ids, none_rows
        for i in range(pos.size):
            rows[pos[i], :] = miss[i, :]
        _expand(rows, inverse, out)
        return True, miss_ids, miss

    @nb.njit(nogil=True)
    def settle(carry, a):  # pragma: no cover - compiled
        admit, miss_ids, miss = carry
        if admit:
            slot_of, score, slots, slot_id, table, bits = a[9], a[10], a[11], a[12], a[13], a[14]
            policy, st = a[16], a[17]
            st[2] = _admit(miss_ids, miss, miss, np.empty(0, np.int64), slot_of, slot_id, score, slots, st[2], policy,
                           st[0], table, bits)  # fmt: skip
        return 0

    return job, settle


@nb.njit(nogil=True, cache=True)
def _aio_max_pages(n_ids: int, row_bytes: int) -> int:  # pragma: no cover - compiled
    """``_aio.max_pages`` in a kernel: the pages a read of ``n_ids`` rows can touch at most."""
    return n_ids * ((row_bytes + PAGE - 1) // PAGE + 1)


class CachedTable(RowTable):
    """``inner`` behind a fixed-budget cache of decoded rows (capacity = budget // row size)."""

    @property
    def prefetch_workers(self) -> int:  # misses go to the inner tier, so its choice holds
        return self.inner.prefetch_workers

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
        elem = torch.empty(0, dtype=dtype).element_size()
        if elem not in INT_VIEWS:
            raise ConfigError(f"cache dtype must be 2, 4 or 8 bytes wide, got {dtype}")
        self.inner = inner
        self.policy = policy
        self._policy = POLICIES.index(policy)  # _LFU, _LRU, _STATIC
        self.dtype = dtype
        self.capacity = max(0, int(budget_bytes) // (inner.dim * elem))
        self._slots = torch.empty(self.capacity, inner.dim, dtype=dtype)
        self._slots_np = int_view(self._slots)
        self._slot_of = np.full(self.num_rows if self.capacity else 0, -1, dtype=np.int32)  # id -> slot
        self._slot_id = np.full(self.capacity, -1, dtype=np.int64)  # slot -> id
        self._score = np.zeros(self.capacity, dtype=np.int64)  # LFU estimate or LRU tick
        self._st = np.zeros(3, dtype=np.int64)  # tick, sketch count, slots used: shared with the I/O thread's kernels
        # Count-min sketch (LFU only; a 1-column stub otherwise so the kernels keep one signature).
        self._sk_bits = int(min(22, max(10, int(np.ceil(np.log2(max(4 * self.capacity, 1)))))))
        width = 1 << self._sk_bits if policy == "lfu" else 1
        self._sk_table = np.zeros((_SKETCH_DEPTH, width), dtype=np.int32)
        self._sk_sample = max(10 * self.capacity, 1024)
        self._lock = threading.Lock()
        self._io: _aio.IoThread | None = None
        self._want_io = self.capacity > 0 and bool(getattr(inner, "io_thread", False))

    # The policy's scalars live in ``_st`` so the I/O thread's kernels can advance them too.
    _tick = property(lambda self: int(self._st[0]), lambda self, v: self._st.__setitem__(0, v))
    _sk_added = property(lambda self: int(self._st[1]), lambda self, v: self._st.__setitem__(1, v))
    _used = property(lambda self: int(self._st[2]), lambda self, v: self._st.__setitem__(2, v))

    def _exclusive(self) -> _Exclusive:
        """The cache's state to this thread alone: the lock (which every post to the I/O thread holds too), then
        every job already posted to the I/O thread settled (its admission written)."""
        return _Exclusive(self)

    @property
    def cached_rows(self) -> int:
        with self._exclusive():
            return self._used  # an evicted slot is refilled in the same call: occupied slots are all live

    @property
    def _keys(self) -> np.ndarray:
        """Cached ids, ascending (introspection and tests; O(num_rows))."""
        with self._exclusive():
            return np.flatnonzero(self._slot_of >= 0).astype(np.int64)

    @property
    def _key_slot(self) -> np.ndarray:
        """The slot of each of ``_keys``."""
        return self._slot_of[self._keys].astype(np.int64)

    def _io_thread(self) -> _aio.IoThread | None:
        """The cache's own I/O thread in front of a direct tier that has one (started on the first inline gather):
        it runs the whole cached gather (:func:`_thread_kernels`), admission included, off the decode thread."""
        if self._io is None and self._want_io:
            inner: Any = self.inner
            args = inner._fused_read_args(1, self.dtype)
            io = None
            if args is not None:
                extra = (self._slot_of, self._score, self._slots_np, self._slot_id, self._sk_table, self._sk_bits,
                         self._sk_sample, self._policy, self._st)  # fmt: skip
                job, settle = _thread_kernels()
                io = _aio.IoThread(inner, inner._io_max_ids(), job=job, settle=settle, extra=extra, cpus=self.io_cpus)
            if io is None or not io.running:
                self._want_io = False
                return None
            self._io = io
            weakref.finalize(self, io.close)  # a cache dropped unclosed still stops its thread
        return self._io

    @property
    def io_thread_ids(self) -> list[int]:
        return super().io_thread_ids + self.inner.io_thread_ids

    def set_io_cpus(self, cpus: Iterable[int] | None) -> None:
        super().set_io_cpus(cpus)
        self.inner.set_io_cpus(self.io_cpus)

    def close(self) -> None:
        self._want_io = False
        if self._io is not None:
            self._io.close()
            self._io = None
        self.inner.close()

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        if self.capacity == 0:
            self.stats.add(misses=int(ids.numel()))
            return self.inner.fetch_sorted_unique(ids)
        idx = ids.numpy()
        out = torch.empty(idx.size, self.dim, dtype=self.dtype)
        out_bits = int_view(out)
        with self._exclusive():
            self._tick += 1
            pos, miss_ids, self._sk_added = _probe(
                idx, self._slot_of, self._score, self._slots_np, out_bits, self._policy, self._tick,
                self._sk_table, self._sk_bits, self._sk_sample, self._sk_added,
            )  # fmt: skip
        if pos.size:
            rows = self.inner.fetch_sorted_unique(torch.from_numpy(miss_ids))
            if rows.dtype != self.dtype or not rows.is_contiguous():
                rows = rows.to(self.dtype).contiguous()
            with self._exclusive():  # misses copied into out and admitted in one nogil call
                self._used = _admit(
                    miss_ids, int_view(rows), out_bits, pos, self._slot_of, self._slot_id, self._score,
                    self._slots_np, self._used, self._policy, self._tick, self._sk_table, self._sk_bits,
                )  # fmt: skip
        self.stats.add(hits=int(idx.size - pos.size), misses=int(pos.size))
        return out

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        """The whole cached gather off the GIL when ``dtype`` is the cache's: in front of the aio direct tier ONE
        ``nogil`` call (:func:`_cached_read`: dedupe + probe, the read of the misses, admit + expand), under the
        lock; in front of any other tier with a fused path, three (probe, the inner tier's read, admit + expand).
        Same policy steps as ``_fetch_unique``; no torch op between them."""
        if dtype != self.dtype:
            return None
        if self.capacity == 0:
            n = self.inner._gather_bytes(flat, out, dtype)
            if n is not None:
                self.stats.add(misses=n)
            return n
        out_bits = out.view(self._slots_np.dtype)
        fused = getattr(self.inner, "_fused_read_args", None)
        args = fused(flat.size, dtype) if fused is not None else None
        if args is not None:
            with self._exclusive():
                self._tick += 1
                status, n_pages, bad, first, n_unique, n_miss, self._sk_added, self._used = _fused_kernel()(
                    flat, self.num_rows, self._slot_of, self._score, self._slots_np, self._policy, self._tick,
                    self._sk_table, self._sk_bits, self._sk_sample, self._sk_added, self._slot_id, self._used,
                    *args, out_bits,
                )  # fmt: skip
            if status == -2:
                raise self._out_of_range(int(n_pages), int(bad))
            if status == -1:
                raise RuntimeError("page buffer smaller than the plan; _fused_read_args sizes it for every id")
            if status or bad:
                self.inner._raise_read_error(int(status), int(bad), int(first))
            self.inner.stats.add(bytes_read=n_pages * PAGE)
            self.stats.add(hits=n_unique - n_miss, misses=n_miss)
            return n_unique
        probe = self._probe(flat)
        miss = torch.empty(probe[3].size, self.dim, dtype=self.dtype)
        if miss.shape[0]:
            self._read_misses(probe[4], miss, dtype)
        return self._settle(probe, miss, out_bits)

    def _read_misses(self, miss_ids: np.ndarray, miss: torch.Tensor, dtype: torch.dtype) -> None:
        """The rows of sorted unique ``miss_ids`` into ``miss`` (the cache's dtype): the inner tier's fused path,
        else its decoded rows."""
        if self.inner._gather_bytes(miss_ids, miss.view(torch.uint8).numpy(), dtype) is None:
            miss.copy_(self.inner.fetch_sorted_unique(torch.from_numpy(miss_ids)))  # a decoding tier's float rows

    def _settle(
        self, probe: tuple[np.ndarray, ...], miss: torch.Tensor, out: np.ndarray, tick: int | None = None
    ) -> int:
        """A probed gather finished: its misses (read into ``miss``) copied into its rows and admitted at ``tick``
        (None: the current one) in one nogil call, every row expanded into ``out``, the stats counted."""
        unique, inverse, rows, pos, miss_ids = probe
        if pos.size:
            with self._exclusive():
                self._used = _admit(
                    miss_ids, int_view(miss), rows, pos, self._slot_of, self._slot_id, self._score, self._slots_np,
                    self._used, self._policy, self._tick if tick is None else tick, self._sk_table, self._sk_bits,
                )  # fmt: skip
        _expand(rows, inverse, out)
        self.stats.add(hits=int(unique.size - pos.size), misses=int(pos.size))
        return int(unique.size)

    def _probe(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        """One gather's probe, under the lock: a new tick, the sketch updated, hits copied into fresh rows.
        (unique, inverse, rows, pos, miss_ids), as ``_probe_flat``; an id outside the table raises IndexError."""
        with self._exclusive():
            self._tick += 1
            ok, unique, inverse, rows, pos, miss_ids, self._sk_added = _probe_flat(
                flat, self.num_rows, self._slot_of, self._score, self._slots_np, self._policy, self._tick,
                self._sk_table, self._sk_bits, self._sk_sample, self._sk_added,
            )  # fmt: skip
        if not ok:
            raise self._out_of_range(int(unique[0]), int(unique[-1]))
        return unique, inverse, rows, pos, miss_ids

    @property
    def split_phase(self) -> bool:
        return bool(self.inner.split_phase)

    def _start_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> PendingGather | None:
        """Split phase in front of a split-phase direct tier (see :func:`_split_kernels`): start = dedupe + probe +
        submit the misses (under the lock), ``result()`` = reap + admit + expand (under the lock). Same policy
        steps and stats as ``_gather_bytes``; a miss another gather admitted meanwhile is skipped by ``_admit``."""
        inner = self.inner
        if dtype != self.dtype or not self.split_phase:
            return None
        if self.capacity == 0:
            pending = inner._start_bytes(flat, out, dtype)
            if pending is not None:
                pending.after = lambda n: self.stats.add(misses=n)
            return pending
        if not hasattr(inner, "_slots"):  # not the direct tier (the Mooncake reader process): probe, its split phase
            return self._start_inner(flat, out, dtype)
        h = inner.header  # type: ignore[attr-defined]
        if getattr(inner._format, "dtype", None) != dtype:  # type: ignore[attr-defined]
            return None
        io = self._io_thread()
        if io is not None and io.can_post(flat.size):  # the whole gather on the cache's GIL-free I/O thread
            with self._lock:  # no job starts while another thread holds the cache (see _exclusive)
                k = io.post(flat)
            if k is not None:
                return _CachedIoPending(self, io, k, out)
        if flat.size > _FUSED_MAX_IDS:  # the split phase sizes its page buffer for every id: a prefill waits
            return None
        slot = inner._slots.acquire(_aio.max_pages(flat.size, h.row_bytes) * PAGE)  # type: ignore[attr-defined]
        if slot is None:
            return None
        try:
            with self._exclusive():
                self._tick += 1
                state = _split_kernels()[0](
                    flat, self.num_rows, self._slot_of, self._score, self._slots_np, self._policy, self._tick,
                    self._sk_table, self._sk_bits, self._sk_sample, self._sk_added, h.row_bytes, h.data_offset,
                    inner.max_run_pages, slot.arr, slot.ctx, inner._fd,  # type: ignore[attr-defined]
                )  # fmt: skip
                if state[0] != -2:
                    self._sk_added = state[3]
        except BaseException:
            inner._slots.release(slot)  # type: ignore[attr-defined]
            raise
        if state[0] != 0:
            inner._slots.release(slot)  # type: ignore[attr-defined]
            if state[0] == -2:
                raise self._out_of_range(int(state[1]), int(state[2]))
            raise RuntimeError("page buffer smaller than the plan; the slot is sized for every id")
        pending = _CachedPending(self, slot, state, out.view(self._slots_np.dtype), self._tick)
        inner._inflight.add(pending)  # type: ignore[attr-defined]
        return pending

    def _start_inner(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> PendingGather:
        """Split phase in front of any other split-phase tier: probe now (hits copied), the misses started by the
        inner tier's own split phase (or read now, where it declines); ``result()`` admits them and expands."""
        probe = self._probe(flat)
        tick, miss_ids = self._tick, probe[4]
        miss = torch.empty(miss_ids.size, self.dim, dtype=self.dtype)
        inner_pending = None
        if miss_ids.size:
            start = time.perf_counter()
            inner_pending = self.inner._start_bytes(miss_ids, miss.view(torch.uint8).numpy(), dtype)
            if inner_pending is None:
                self._read_misses(miss_ids, miss, dtype)
            else:
                inner_pending.bind(self.inner, miss, miss_ids.size, start)
        return _InnerPending(self, inner_pending, probe, miss, tick, out)

    def preload(self, row_ids: torch.Tensor) -> None:
        """Warm the cache with known-hot rows (e.g. from a profile); the static policy's setup."""
        ids = torch.unique(torch.as_tensor(row_ids).reshape(-1).to(torch.int64))
        if ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.num_rows):
            raise IndexError(f"preload ids out of range [0, {self.num_rows})")
        if self.capacity == 0:
            return
        idx = ids.numpy()
        with self._exclusive():
            miss_ids = idx[self._slot_of[idx] < 0]
        if miss_ids.size:
            rows = self.inner.fetch_sorted_unique(torch.from_numpy(miss_ids)).to(self.dtype).contiguous()
            with self._exclusive():
                if self._policy == _LFU:
                    self._sk_added = _sketch_add(
                        miss_ids, self._sk_table, self._sk_bits, self._score, self._sk_sample, self._sk_added
                    )
                none = np.empty(0, np.int64)  # no output to fill
                self._used = _admit(
                    miss_ids, int_view(rows), self._slots_np, none, self._slot_of, self._slot_id, self._score,
                    self._slots_np, self._used, self._policy, self._tick, self._sk_table, self._sk_bits,
                )  # fmt: skip


class _Exclusive:
    """``with cache._exclusive():`` (a class, not a generator: it guards every gather, ~0.3 µs)."""

    __slots__ = ("_cache",)

    def __init__(self, cache: CachedTable) -> None:
        self._cache = cache

    def __enter__(self) -> None:
        c = self._cache
        c._lock.acquire()
        if c._io is not None:
            try:
                c._io.settle_all()
            except BaseException:
                c._lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        self._cache._lock.release()


class _CachedPending(PendingGather):
    """A cached gather whose misses' page reads are in flight in the direct tier's :class:`~engramlm.store._aio.IoSlot`
    (hits already copied at start). Registered with the inner table, so closing it reaps these reads too."""

    def __init__(self, cache: CachedTable, slot: _aio.IoSlot, state: tuple, out: np.ndarray, tick: int) -> None:
        super().__init__()
        self._cache, self._slot, self._state, self._out_bits, self._tick = cache, slot, state, out, tick

    def _finish(self) -> int:
        c, slot = self._cache, self._slot
        inner: Any = c.inner
        (_, _, _, _, nu, inverse, rows, pos, miss_ids, pages, run_slot, run_count, row_offset, cbs, ptrs, got,
         rstatus, st) = self._state  # fmt: skip
        crcs = inner._crcs if inner._crcs is not None else inner._no_crcs
        try:
            with c._exclusive():
                err, bad, first, c._used = _split_kernels()[1](
                    slot.ctx, inner._fd, slot.arr, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus,
                    st, crcs, inner._crcs is not None, inner.header.data_offset // PAGE, miss_ids, pos, rows, inverse,
                    c._slot_of, c._slot_id, c._score, c._slots_np, c._used, c._policy, self._tick, c._sk_table,
                    c._sk_bits, self._out_bits,
                )  # fmt: skip
        except BaseException:  # the kernel never ran (or was interrupted): reap before the slot is reused
            self._reap()
            raise
        self._done()
        if err or bad:
            inner._raise_read_error(int(err), int(bad), int(first))
        inner.stats.add(bytes_read=int(pages.size) * PAGE)
        c.stats.add(hits=int(nu - pos.size), misses=int(pos.size))
        return int(nu)

    def _reap(self) -> None:
        cbs, ptrs, got, rstatus, st = self._state[13:18]
        try:
            _aio.reap(self._slot.ctx, cbs, ptrs, got, rstatus, st)
        finally:
            self._done()

    def _done(self) -> None:
        inner: Any = self._cache.inner
        inner._inflight.discard(self)
        inner._slots.release(self._slot)
        self._state = ()


class _CachedIoPending(PendingGather):
    """A cached gather posted whole to the cache's I/O thread (job ``k``): hits, misses and expansion are in the
    job's ring row when it is done; the misses' admission settles on that thread afterwards."""

    def __init__(self, cache: CachedTable, io: _aio.IoThread, k: int, out: np.ndarray) -> None:
        super().__init__()
        self._cache, self._io, self._k, self._out_bytes = cache, io, k, out

    def _finish(self) -> int:
        c = self._cache
        inner: Any = c.inner
        st, pages, bad, first, nu, n_miss, lo, hi = self._io.collect(self._k, self._out_bytes)
        if st == -2:
            raise c._out_of_range(lo, hi)
        if st or bad:
            inner._raise_read_error(st, bad, first)
        inner.stats.add(bytes_read=pages * PAGE)
        c.stats.add(hits=nu - n_miss, misses=n_miss)
        return nu

    def _reap(self) -> None:
        self._io.discard(self._k)


class _InnerPending(PendingGather):
    """A cached gather whose misses another split-phase tier is reading (``inner``: its pending gather, None when
    there were no misses or they were read at start); ``_finish`` settles it (:meth:`CachedTable._settle`)."""

    def __init__(
        self,
        cache: CachedTable,
        inner: PendingGather | None,
        probe: tuple[np.ndarray, ...],
        miss: torch.Tensor,
        tick: int,
        out: np.ndarray,
    ) -> None:
        super().__init__()
        self._cache, self._inner, self._probe, self._miss, self._tick = cache, inner, probe, miss, tick
        self._out_bits = out.view(cache._slots_np.dtype)

    def _finish(self) -> int:
        if self._inner is not None:
            self._inner.result()
        return self._cache._settle(self._probe, self._miss, self._out_bits, self._tick)

    def _reap(self) -> None:
        if self._inner is not None:
            self._inner.close()
