"""Inline prefetch (``Prefetcher(workers=0)``) and the split phase (``RowTable.start_gather``): the same rows, errors
and cache behaviour as the worker pool, and reads in flight are always reaped before their buffers can go."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.errors import CorruptFileError
from engramlm.store import _aio
from engramlm.store.base import PendingGather
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import open_store
from engramlm.store.memory import MemoryTable
from engramlm.store.pages import PAGE
from engramlm.store.prefetch import Prefetcher
from tests.test_store_tiers import FP, ROWS, _reference, _store, direct_dir  # noqa: F401

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not _aio.available() and not os.environ.get("CI"), reason=f"aio engine unavailable: {_aio.why_unavailable()}"
    ),
]


def _io_thread(table: DirectFileTable) -> None:
    if not table.io_thread:  # CI runs on x86-64 Linux with AIO: there this must hold
        if os.environ.get("CI"):
            pytest.fail(f"I/O thread unavailable: {_aio.IoThread.why_unavailable()}")
        pytest.skip(f"I/O thread unavailable: {_aio.IoThread.why_unavailable()}")


def _decode_ids(rng: np.random.Generator, b: int = 8, t: int = 1, h: int = 8) -> torch.Tensor:
    """Decode-step-shaped ids: skewed (many duplicates across the batch), both table ends included."""
    ids = (rng.zipf(1.3, (b, t, h)) - 1) % ROWS
    ids[0, 0, 0], ids[-1, -1, -1] = 0, ROWS - 1
    return torch.from_numpy(ids)


def _split(table: DirectFileTable) -> None:
    if not table.split_phase:  # CI runs on a kernel that has AIO: there this must hold
        if os.environ.get("CI"):
            pytest.fail(f"split phase unavailable: {table._slots.reason or table._kctx.reason}")
        pytest.skip(f"split phase unavailable: {table._slots.reason or table._kctx.reason}")


@pytest.mark.parametrize(("fmt", "io_thread"), [("fp32", True), ("fp32", False), ("bf16", True), ("bf16", False)])
def test_inline_rows_equal_the_worker_pools(direct_dir: Path, fmt: str, io_thread: bool) -> None:  # noqa: F811
    """Memory, direct and cached-direct tables (three cache policies) through an inline prefetcher and a worker
    pool, step after step: identical rows, identical cache contents and counters."""
    path = _store(direct_dir, fmt)
    ref = _reference(fmt)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16

    def tables() -> dict[int, object]:
        def d() -> DirectFileTable:
            return DirectFileTable(path, FP, io_thread=io_thread)

        return {
            0: MemoryTable(ref._format.decode(ref._weights).to(dtype), FP),
            1: d(),
            2: CachedTable(d(), 40 * 64 * 4, "lfu", dtype=dtype),
            3: CachedTable(d(), 40 * 64 * 4, "lru", dtype=dtype),
            4: CachedTable(d(), 40 * 64 * 4, "static", dtype=dtype),
            5: CachedTable(d(), 0, dtype=dtype),
        }

    inline_t, pool_t = tables(), tables()
    _split(inline_t[1])  # type: ignore[arg-type]
    assert all(t.split_phase for k, t in inline_t.items() if k)  # type: ignore[attr-defined]
    assert inline_t[1].io_thread == io_thread  # type: ignore[attr-defined]
    with Prefetcher(inline_t) as default:  # type: ignore[arg-type]  # the tiers' choice: inline with the I/O thread
        assert default.workers == (0 if io_thread else 2)
    rng = np.random.default_rng(7)
    with Prefetcher(inline_t, workers=0, dtype=dtype) as inline, Prefetcher(pool_t, workers=2, dtype=dtype) as pool:  # type: ignore[arg-type]
        assert inline.workers == 0
        for step in range(25):
            shape = (2, 40, 6) if step % 5 == 0 else (8, 1, 8)  # a prefill-sized step now and then
            ids = {k: _decode_ids(rng, *shape) for k in inline_t}
            h_in, h_pool = inline.start(ids), pool.start(ids)
            for k in sorted(ids, reverse=True):  # any order
                want = ref.gather(ids[k]).to(dtype)
                assert torch.equal(h_in[k], want), (step, k)
                assert torch.equal(h_pool[k], want), (step, k)
    for k in (2, 3, 4):  # with the I/O thread, the caches ran every inline gather on their own one
        assert (inline_t[k]._io is not None) == io_thread  # type: ignore[attr-defined]
        assert pool_t[k]._io is None  # type: ignore[attr-defined]
    for k in (2, 3, 4, 5):
        a, b = inline_t[k], pool_t[k]
        assert np.array_equal(a._keys, b._keys), k  # type: ignore[attr-defined]
        sa, sb = a.stats.as_dict(), b.stats.as_dict()  # type: ignore[attr-defined]
        for field in ("requests", "rows_total", "rows_unique", "hits", "misses"):
            assert sa[field] == sb[field], (k, field)
        assert a.inner.stats.bytes_read == b.inner.stats.bytes_read > 0  # type: ignore[attr-defined]
    assert inline_t[2].stats.hits > 0 and inline_t[5].stats.misses > 0  # type: ignore[attr-defined]
    for t in (*inline_t.values(), *pool_t.values()):
        t.close()  # type: ignore[attr-defined]


def test_start_returns_with_reads_in_flight_and_each_layer_waits_for_its_own(direct_dir: Path) -> None:  # noqa: F811
    """The split phase is real: start returns a gather still open (no thread completes it), and waiting for
    another layer leaves it open; its own wait completes it."""
    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    direct = DirectFileTable(path, FP, io_thread=False)
    _split(direct)
    mem = MemoryTable(ref._format.decode(ref._weights), FP)
    ids = {1: _decode_ids(np.random.default_rng(1)), 2: _decode_ids(np.random.default_rng(2))}
    with Prefetcher({1: direct, 2: mem}, workers=0) as pf:
        assert pf.workers == 0 and not pf._threads
        handle = pf.start(ids)
        assert len(direct._inflight) == 1  # submitted, not reaped
        assert torch.equal(handle[2], ref.gather(ids[2]))
        assert not handle.done(1) and len(direct._inflight) == 1
        assert torch.equal(handle[1], ref.gather(ids[1]))
        assert handle.done(1) and len(direct._inflight) == 0
        assert pf.metrics[1]["waits"] == 1 and pf.metrics[1]["fetch_s"] > 0
    direct.close()


@pytest.mark.parametrize("io_thread", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_out_of_range_raised_at_wait_with_the_worker_paths_message(
    direct_dir: Path,  # noqa: F811
    cached: bool,
    io_thread: bool,
) -> None:
    path = _store(direct_dir, "fp32")
    bad = torch.tensor([[[3, ROWS + 5, 3]]])
    messages = []
    for workers in (0, 2):
        table = DirectFileTable(path, FP, io_thread=io_thread)
        t = CachedTable(table, 64 * 64 * 4) if cached else table
        with Prefetcher({1: t}, workers=workers) as pf:
            handle = pf.start({1: bad})  # never raises here
            with pytest.raises(IndexError, match=rf"min 3, max {ROWS + 5}, table has {ROWS} rows") as exc:
                handle.wait(1)
            messages.append(str(exc.value))
            four = torch.tensor([[[4]]])
            assert torch.equal(pf.fetch({1: four})[1], _reference("fp32").gather(four))
        assert not table._inflight
        t.close()
    assert messages[0] == messages[1]


@pytest.mark.parametrize("io_thread", [True, False])
@pytest.mark.parametrize("cached", [False, True])
def test_crc_corruption_detected_at_wait(direct_dir: Path, cached: bool, io_thread: bool) -> None:  # noqa: F811
    """A flipped byte fails the page's CRC on the split path with the worker path's message; nothing corrupt is
    admitted to the cache, and pages elsewhere still read."""
    path = _store(direct_dir, "fp32")
    h = open_store(path)
    row = 2000
    data = bytearray(path.read_bytes())
    data[h.data_offset + row * h.row_bytes + 3] ^= 0x04
    path.write_bytes(bytes(data))
    page = row * h.row_bytes // PAGE
    ref = _reference("fp32")
    messages = []
    for workers in (0, 2):
        table = DirectFileTable(path, FP, io_thread=io_thread)
        t = CachedTable(table, 64 * 64 * 4) if cached else table
        with Prefetcher({1: t}, workers=workers) as pf:
            handle = pf.start({1: torch.tensor([[[3, row, ROWS - 1, row]]])})
            with pytest.raises(CorruptFileError, match=rf"\(page\) {page} at byte") as exc:
                handle.wait(1)
            messages.append(str(exc.value))
            ok = torch.tensor([[[0, 1, 5, 5]]])
            assert torch.equal(pf.fetch({1: ok})[1], ref.gather(ok))
        if cached:
            assert row not in t._keys.tolist() and 3 not in t._keys.tolist()  # type: ignore[attr-defined]
        t.close()
    assert messages[0] == messages[1]


def test_dropped_or_closed_with_reads_in_flight_is_safe(direct_dir: Path) -> None:  # noqa: F811
    """A handle dropped unwaited, a gather closed, a table closed: each reaps its reads before the page buffers
    can be reused; the slots go back to the pool and later gathers read correct rows through them."""
    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    direct = DirectFileTable(path, FP, io_thread=False)
    _split(direct)
    cached = CachedTable(DirectFileTable(path, FP, io_thread=False), 100 * 64 * 4)
    rng = np.random.default_rng(3)
    with Prefetcher({1: direct, 2: cached}, workers=0) as pf:
        for _ in range(20):  # dropped handles: garbage-collected with reads in flight
            handle = pf.start({1: _decode_ids(rng, 4, 40, 6), 2: _decode_ids(rng, 4, 4, 6)})
            assert len(direct._inflight) == 1 and len(cached.inner._inflight) == 1
            del handle
            gc.collect()
            assert not direct._inflight and not cached.inner._inflight
        handle = pf.start({1: _decode_ids(rng), 2: _decode_ids(rng)})
        handle.close()  # explicit: reaped, the rows are gone
        assert not direct._inflight
        with pytest.raises(RuntimeError, match="closed"):
            handle.wait(1)
        for _ in range(5):  # the pooled slots (contexts, buffers) serve later gathers correctly
            ids = {1: _decode_ids(rng), 2: _decode_ids(rng)}
            handle = pf.start(ids)
            assert torch.equal(handle[2], ref.gather(ids[2])) and torch.equal(handle[1], ref.gather(ids[1]))
    assert len(direct._slots._all) <= 2  # one per gather ever in flight at once, not one per gather
    pending = direct.start_gather(_decode_ids(rng, 4, 40, 6), out=torch.empty(4, 40, 6, 64))
    assert isinstance(pending, PendingGather) and len(direct._inflight) == 1
    direct.close()  # reaps it before destroying its context
    with pytest.raises(RuntimeError, match="closed"):
        pending.result()
    cached.close()


def test_start_gather_of_every_tier_matches_gather(direct_dir: Path) -> None:  # noqa: F811
    """``start_gather`` on tiers without a split phase (fp8 on disk, the memory tier) is a synchronous gather;
    empty requests and large ones (past the page buffer's first size) work on the split path too."""
    ref = _reference("fp8_e4m3_ue8m0")
    fp8 = DirectFileTable(_store(direct_dir, "fp8_e4m3_ue8m0"), FP)
    assert not fp8.split_phase and fp8.prefetch_workers == 2
    ids = _decode_ids(np.random.default_rng(4), 2, 40, 6)
    for t in (fp8, ref):
        assert torch.equal(t.start_gather(ids).result(), ref.gather(ids))
    fp32 = DirectFileTable(_store(direct_dir, "fp32"), FP, io_thread=False)
    _split(fp32)
    big = torch.arange(ROWS - 1, -1, -1).repeat(2)  # every page of the file, descending, twice
    assert torch.equal(fp32.start_gather(big).result(), _reference("fp32").gather(big))
    assert fp32.start_gather(torch.zeros(0, dtype=torch.int64)).result().shape == (0, 64)
    fp8.close()
    fp32.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the lead's GPU check)")
def test_inline_on_cuda_gives_the_host_rows(direct_dir: Path) -> None:  # noqa: F811
    """Inline on CUDA: pinned staging, the copy on the consumer's stream; rows equal the host reference."""
    ref = _reference("fp32")
    direct = DirectFileTable(_store(direct_dir, "fp32"), FP)
    mem = MemoryTable(ref._format.decode(ref._weights), FP)
    rng = np.random.default_rng(5)
    with Prefetcher({1: direct, 2: mem}, workers=0, device="cuda") as pf:
        for _ in range(10):
            ids = {1: _decode_ids(rng), 2: _decode_ids(rng)}
            handle = pf.start(ids)
            for k in (2, 1):
                rows = handle[k]
                assert rows.device.type == "cuda" and torch.equal(rows.cpu(), ref.gather(ids[k]))
    direct.close()


def test_io_thread_jobs_dropped_closed_and_a_full_ring(direct_dir: Path) -> None:  # noqa: F811
    """The I/O thread: gathers dropped unwaited and a table closed with a job posted are safe; more gathers in
    flight than the ring holds fall back to the split phase; the thread stops on close; rows always exact."""
    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    direct = DirectFileTable(path, FP)
    cached = CachedTable(DirectFileTable(path, FP), 100 * 64 * 4)
    _io_thread(direct)
    rng = np.random.default_rng(9)
    with Prefetcher({1: direct, 2: cached}) as pf:
        assert pf.workers == 0
        for _ in range(20):
            pf.start({1: _decode_ids(rng, 4, 40, 6), 2: _decode_ids(rng)})  # dropped at once
            gc.collect()
        many = [_decode_ids(rng) for _ in range(12)]  # more gathers in flight than the ring's 8 slots
        pending = [direct.start_gather(i) for i in many]
        for _ in range(5):
            ids = {1: _decode_ids(rng), 2: _decode_ids(rng)}
            handle = pf.start(ids)
            assert torch.equal(handle[1], ref.gather(ids[1])) and torch.equal(handle[2], ref.gather(ids[2]))
        for i, p in zip(many, pending, strict=True):
            assert torch.equal(p.result(), ref.gather(i))
    thread = direct._io._thread  # type: ignore[union-attr]
    ids = _decode_ids(rng)
    late = direct.start_gather(ids)
    direct.close()  # the posted job finishes before the thread stops
    assert thread is not None and not thread.is_alive() and not direct.io_thread
    assert torch.equal(late.result(), ref.gather(ids))
    cached.close()


def _cache_consistent(c: CachedTable) -> None:
    """The id->slot map and the slot->id list describe the same rows, and the slots hold those ids' rows."""
    keys = c._keys
    slots = c._slot_of[keys]
    assert keys.size == c.cached_rows and np.array_equal(np.sort(slots), np.arange(keys.size))
    assert np.array_equal(c._slot_id[slots], keys)
    rows = c._slots[torch.from_numpy(slots.astype(np.int64))]
    assert torch.equal(rows, _reference("fp32").gather(torch.from_numpy(keys)))


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_cached_io_thread_and_other_threads_share_the_cache_safely(direct_dir: Path, policy: str) -> None:  # noqa: F811
    """Gathers posted to the cache's I/O thread (admission settling there after each waiter is woken) interleaved
    with synchronous gathers, a preload and a worker pool on other threads: every row exact, the cache's map, slot
    list and slot rows always agree, and the cache ends as the same gathers made one after another would leave it."""
    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    threaded = CachedTable(DirectFileTable(path, FP), 60 * 64 * 4, policy)
    plain = CachedTable(DirectFileTable(path, FP, io_thread=False), 60 * 64 * 4, policy)
    _io_thread(threaded.inner)  # type: ignore[arg-type]
    rng = np.random.default_rng(11)
    for step in range(40):
        posted = [_decode_ids(rng) for _ in range(3)]
        sync = _decode_ids(rng, 2, 3, 8)
        handles = [threaded.start_gather(i) for i in posted]  # in flight together on the I/O thread
        got = threaded.gather(sync)  # meanwhile, on this thread: waits for those jobs to settle first
        for i in posted:  # the same gathers one after another, synchronously
            assert torch.equal(plain.gather(i), ref.gather(i))
        assert torch.equal(plain.gather(sync), ref.gather(sync)) and torch.equal(got, ref.gather(sync))
        for c in (threaded, plain):
            if step == 20:
                c.preload(torch.arange(100, 110))
        for i, h in zip(posted, handles, strict=True):
            assert torch.equal(h.result(), ref.gather(i))
        assert threaded._io is not None and plain._io is None
        assert np.array_equal(threaded._keys, plain._keys), step
    for c in (threaded, plain):
        _cache_consistent(c)
    with Prefetcher({1: threaded}, workers=0) as inline, Prefetcher({1: threaded}, workers=2) as pool:
        for _ in range(10):  # the I/O thread and two pool threads on one cache at once
            a, b = {1: _decode_ids(rng)}, {1: _decode_ids(rng)}
            ha, hb = inline.start(a), pool.start(b)
            assert torch.equal(hb[1], ref.gather(b[1])) and torch.equal(ha[1], ref.gather(a[1]))
    _cache_consistent(threaded)
    assert threaded.stats.hits > 0 and threaded.inner.stats.bytes_read > 0  # type: ignore[attr-defined]
    threaded.close()
    plain.close()
    assert threaded._io is None


def test_io_thread_that_fails_fails_its_waiters_and_takes_no_more_jobs(direct_dir: Path) -> None:  # noqa: F811
    """If the I/O thread's loop raises (a failed allocation, say), every job not done gets that error at its wait
    instead of hanging, later posts are refused (the table falls back to the split phase) and close returns."""
    import numba as nb

    @nb.njit(nogil=True)
    def failing(ids, out, status, a):  # pragma: no cover - compiled
        if ids.size == 3:
            raise MemoryError("no page buffer")
        return 0

    path = _store(direct_dir, "fp32")
    direct = DirectFileTable(path, FP)
    _io_thread(direct)
    io = _aio.IoThread(direct, 64, job=failing)
    assert io.running
    ok = io.post(np.array([1, 2], np.int64))
    assert ok is not None and io.wait(ok)[1][0] == 0
    io.release(ok)
    bad = io.post(np.array([1, 2, 3], np.int64))
    assert bad is not None
    with pytest.raises(RuntimeError, match=r"I/O thread stopped .*MemoryError: no page buffer"):
        io.wait(bad)
    io.release(bad)
    assert not io.running and io.post(np.array([1], np.int64)) is None and not io.can_post(1)
    io.settle_all()  # returns: nothing is left to settle
    io.close()
    ids = _decode_ids(np.random.default_rng(2))
    direct._io = _aio.IoThread(direct, 64, job=failing)  # the table's own thread dies: gathers fall back
    stuck = direct.start_gather(torch.tensor([[[4, 5, 6]]]))
    with pytest.raises(RuntimeError, match="I/O thread stopped"):
        stuck.result()
    assert torch.equal(direct.start_gather(ids).result(), _reference("fp32").gather(ids))
    direct.close()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_io_threads_follow_set_io_cpus_before_and_after_they_start(direct_dir: Path) -> None:  # noqa: F811
    """``set_io_cpus`` pins a table's I/O threads whether they run already (the direct tier's) or start later (the
    cache's, which passes the set to its tier too); None frees them; rows stay exact; a bad set is refused."""
    from engramlm.errors import ConfigError

    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    every = set(range(os.cpu_count() or 1)) & os.sched_getaffinity(0)
    one = {max(every)}
    direct = DirectFileTable(path, FP)
    cached = CachedTable(DirectFileTable(path, FP), 100 * 64 * 4)
    _io_thread(direct)
    rng = np.random.default_rng(4)
    try:
        ids = _decode_ids(rng)
        assert torch.equal(direct.start_gather(ids).result(), ref.gather(ids))  # the thread starts unpinned
        (tid,) = direct.io_thread_ids
        direct.set_io_cpus(one)
        cached.set_io_cpus(one)  # before its thread exists
        assert os.sched_getaffinity(tid) == one and cached.inner.io_cpus == frozenset(one)
        assert torch.equal(cached.start_gather(ids).result(), ref.gather(ids))
        assert cached.io_thread_ids and all(os.sched_getaffinity(t) == one for t in cached.io_thread_ids)
        direct.set_io_cpus(None)
        assert os.sched_getaffinity(tid) == every
        from engramlm.dist.rows import RowShard
        from engramlm.dist.tables import ShardedRowTable

        sharded = ShardedRowTable(direct.table_header, RowShard((0, direct.num_rows), 0), direct)  # one rank
        sharded.set_io_cpus(one)  # a sharded table's reading threads are its local shard's
        assert sharded.io_thread_ids == [tid] and os.sched_getaffinity(tid) == one
        sharded.set_io_cpus(None)
        with pytest.raises(ConfigError, match="io_cpus: must name at least one CPU"):
            direct.set_io_cpus([])
    finally:
        direct.close()
        cached.close()
