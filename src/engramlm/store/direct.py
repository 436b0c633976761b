"""SSD tier: O_DIRECT page reads at high queue depth, bypassing the page cache (spec §10.2.7).

Rows are mapped to 4 KiB pages, pages are deduplicated and coalesced into runs, and runs are read
into a page-aligned buffer. Nothing reads the whole file, so tables larger than RAM work. If the
filesystem refuses O_DIRECT (tmpfs), the table falls back to buffered reads, warns, and reports
``direct_io = False``.

Two I/O engines, same plan, same bytes, same checks (``io_engine`` says which one a table uses):

* ``aio`` (the default where it runs: glibc on 64-bit Linux): the whole gather, planning, submission,
  completion, CRC32 checks and the copy of rows out of the pages, is one Numba ``nogil`` call
  (:mod:`engramlm.store._aio`: POSIX AIO ``lio_listio`` over ``min(queue_depth, 16)`` duplicated
  descriptors). A gather holds the GIL only to enter and leave that call, so a decode thread running
  the model's Python dispatch is no longer slowed by the reads (``bench_store``'s GIL probe measures it).
* ``threads`` (elsewhere, or when the engine's probe at open disagrees with ``os.preadv``): NumPy
  planning, ``os.preadv`` per run in ``queue_depth`` threads, one zlib CRC per page in Python: correct,
  but it holds the GIL for most of a gather.

Verification (``verify=True``, the default) keeps the point of O_DIRECT: it reads nothing more. Each
4 KiB page already read into the buffer is checked against the file's per-page CRC32 before rows are
taken from it. A v1 file (no page table) is verified whole at open instead, with a warning.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engramlm.errors import ConfigError
from engramlm.store import _aio
from engramlm.store.base import PendingGather, RowTable, TableHeader
from engramlm.store.file import (
    StoreHeader,
    check_pages,
    needs_full_check,
    open_store,
    page_mismatch,
    read_page_crcs,
    verify_store,
)
from engramlm.store.formats import FP32
from engramlm.store.pages import PAGE, PagePlan, plan_pages

IO_ENGINES = ("auto", "aio", "threads")
IO_THREAD_MAX_IDS = 4096  # the I/O thread's ring takes a batch-8 prefill of 32 tokens (2,048 ids a layer)
IO_THREAD_RING_BYTES = 16 << 20  # ...within this many bytes of rows for its 8 jobs (wide rows: fewer ids)
FUSED_MAX_IDS = 1024  # a decode step's ids per layer (B x H_e) stay far below; a prefill takes the split path
AIO_MAX_FDS = 16  # reads in flight per table with aio; this VM's virtio disk saturates at ~16 (bench_store)

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _open_direct(path: str | os.PathLike, want: bool) -> tuple[int, bool, str | None]:
    """Open for O_DIRECT and probe one aligned read; fall back to buffered if refused."""
    if want and _O_DIRECT:
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            reason = f"open(O_DIRECT) refused: {exc.strerror}"
        else:
            probe = mmap.mmap(-1, PAGE)
            try:
                os.preadv(fd, [probe], 0)
                return fd, True, None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                reason = f"O_DIRECT read refused: {exc.strerror}"
            finally:
                probe.close()
    else:
        reason = "O_DIRECT not requested" if not want else "O_DIRECT unavailable on this OS"
    return os.open(path, os.O_RDONLY), False, reason


class DirectFileTable(RowTable):
    """A store file read with deduplicated, coalesced, page-aligned O_DIRECT preadv calls."""

    def __init__(
        self,
        path: str | os.PathLike,
        expected_fingerprint: str | None = None,
        *,
        queue_depth: int = 64,
        max_run_pages: int = 64,
        direct: bool = True,
        verify: bool = True,
        io_engine: str = "auto",
        io_thread: bool = True,
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        if io_engine not in IO_ENGINES:
            raise ConfigError(f"io_engine must be one of {IO_ENGINES}, got {io_engine!r}")
        self.header: StoreHeader = open_store(path, expected_fingerprint)
        h = self.header
        super().__init__(TableHeader(h.num_rows, h.dim, h.fingerprint, h.format))
        self.verify = verify
        self._crcs: np.ndarray | None = None
        if verify and needs_full_check(h, "direct"):
            verify_store(path)
        elif verify:
            self._crcs = read_page_crcs(h)
        self._format = h.format
        self.queue_depth = queue_depth
        self.max_run_pages = max_run_pages
        self._fd, self.direct_io, self.fallback_reason = _open_direct(path, direct)
        if direct and not self.direct_io:
            warnings.warn(
                f"{path}: {self.fallback_reason}; using buffered preadv (page cache)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._fds = np.zeros(0, np.int64)
        self._no_crcs = np.zeros(0, np.uint32)
        self._kctx = _aio.KernelContexts()
        self._slots = _aio.IoSlots(self._kctx.reason)  # split phase: one kernel AIO context per gather in flight
        self._inflight: weakref.WeakSet[_DirectPending] = weakref.WeakSet()
        self.io_engine, self.engine_reason = "threads", _aio.why_unavailable()
        if io_engine != "threads" and self.engine_reason is None:
            self._fds = _aio.dup_fds(self._fd, min(queue_depth, AIO_MAX_FDS))
            self.io_engine, self.engine_reason = "aio", self._probe_aio()
            if self.engine_reason is not None and self._kctx.reason is None:  # retry with glibc's POSIX AIO
                self._kctx.disable(f"kernel AIO: {self.engine_reason}")
                self.engine_reason = self._probe_aio()
            if self.engine_reason is not None:
                self._close_dups()
                self.io_engine = "threads"
        if io_engine == "aio" and self.io_engine != "aio":
            self.close()
            raise ConfigError(f"io_engine 'aio' cannot run here: {self.engine_reason}")
        if self.io_engine == "threads":
            self._pool = ThreadPoolExecutor(queue_depth, thread_name_prefix="engram-direct")
        self._io: _aio.IoThread | None = None
        self._want_io = bool(io_thread) and self.split_phase and _aio.IoThread.why_unavailable() is None

    @property
    def io_thread(self) -> bool:
        """Whether gathers started inline (``start_gather``, ``Prefetcher(workers=0)``) are read by this table's
        GIL-free I/O thread (:class:`_aio.IoThread`, started on the first such gather)."""
        return self._want_io

    def _io_max_ids(self) -> int:
        """Ids one job of an I/O thread's ring may hold (of this table's rows)."""
        ring = (IO_THREAD_RING_BYTES // (8 * self.header.row_bytes)) if self.header.row_bytes else IO_THREAD_MAX_IDS
        return max(64, min(IO_THREAD_MAX_IDS, ring))

    def _io_thread(self) -> _aio.IoThread | None:
        if self._io is None and self._want_io:
            io = _aio.IoThread(self, self._io_max_ids(), cpus=self.io_cpus)
            if not io.running:
                self._want_io = False
                return None
            self._io = io
            weakref.finalize(self, io.close)  # a table dropped unclosed still stops its thread
        return self._io

    @property
    def split_phase(self) -> bool:
        """Whether a gather can be started and completed on the caller's thread with no worker (:meth:`start_gather`,
        ``Prefetcher(workers=0)``): the aio engine on kernel AIO, a plain format (fp32/bf16) on disk.

        By default (``io_thread=True``) the gathers started inline are read by the table's GIL-free I/O thread
        (``prefetch_workers`` is then 0): the decode thread only posts (~30 µs) and collects (~35 µs). Without
        it (``io_thread=False``, ``prefetch_workers`` 2) ``workers=0`` submits on the decode thread itself: on
        this project's 2-core VM the synchronous part of an O_DIRECT ``io_submit`` (~3.7 µs per request, ~235 µs
        per 64-row gather) and the reap + CRC + copy (~115 µs) then cost as much as the worker pool's GIL
        hand-offs they remove (``generate_t1_inline_ab``: +5.6% vs +4.5% pooled at no cache, paired)."""
        return (
            self.io_engine == "aio"
            and self._kctx.reason is None
            and self._slots.reason is None
            and getattr(self._format, "dtype", None) is not None
        )

    @property
    def prefetch_workers(self) -> int:  # type: ignore[override]
        return 0 if self._want_io else RowTable.prefetch_workers

    @property
    def aio_submit(self) -> str:
        """How the aio engine submits: ``kernel`` (Linux AIO, no helper threads) or ``glibc`` (POSIX AIO's threads)."""
        return "glibc" if self._kctx.reason is not None else "kernel"

    def _probe_aio(self) -> str | None:
        """None if the aio engine reads the same bytes as ``os.preadv`` (first and last rows), else why not."""
        h = self.header
        ids = np.unique(np.array([0, h.num_rows // 2, h.num_rows - 1], dtype=np.int64)) if h.num_rows else None
        if ids is None:
            return None
        try:
            got, _ = self._raw_aio(ids)
        except OSError as exc:
            return f"aio probe failed: {exc}"
        pool = ThreadPoolExecutor(1)
        try:
            want, _ = self._raw_threads(ids, pool)
        finally:
            pool.shutdown()
        return None if np.array_equal(got, want) else "aio probe read different bytes than os.preadv"

    def _buffer(self, nbytes: int) -> mmap.mmap:
        """A per-thread page-aligned buffer, grown on demand, so concurrent gathers never share."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, max(nbytes, PAGE))
            self._local.buf = buf
        return buf

    def _aligned(self, nbytes: int) -> np.ndarray:
        """The aio engine's per-thread buffer: a page-aligned NumPy view (the kernel writes by address)."""
        return _aio.aligned_buffer(self._local, nbytes)

    def _read_runs(self, view: memoryview, plan: PagePlan, runs: np.ndarray) -> None:
        """Read a strided subset of runs; a short read before EOF is retried, never ignored."""
        fd = self._fd
        slots, pages = plan.run_slot[runs].tolist(), plan.run_page[runs].tolist()
        for slot, page, count in zip(slots, pages, plan.run_count[runs].tolist(), strict=True):
            off, pos, want = page * PAGE, slot * PAGE, count * PAGE
            while want:
                got = os.preadv(fd, [view[pos : pos + want]], off)
                if got <= 0:
                    break  # EOF: the last page of the file is partial.
                off, pos, want = off + got, pos + got, want - got

    def _raw_aio(self, idx: np.ndarray) -> tuple[np.ndarray, int]:
        """(rows as uint8 [n, row_bytes], bytes read) by the nogil kernel."""
        h = self.header
        out = np.empty((idx.size, h.row_bytes), dtype=np.uint8)
        crcs = self._crcs if self._crcs is not None else self._no_crcs
        buf = self._aligned(_aio.max_pages(min(idx.size, 64), h.row_bytes) * PAGE)
        while True:
            err, n_pages, bad, first = _aio.fetch(
                idx, h.row_bytes, h.data_offset, self.max_run_pages, self._fds, buf, crcs, self._crcs is not None, out,
                ctx=self._kctx.get(),
            )  # fmt: skip
            if err != -1:
                break
            buf = self._aligned(n_pages * PAGE)  # the plan needs more pages than the buffer holds
        if err:
            raise OSError(err, os.strerror(err), h.path)
        if bad:
            raise page_mismatch(h, first - h.data_offset // PAGE, bad)
        return out, n_pages * PAGE

    def _raw_threads(self, idx: np.ndarray, pool: ThreadPoolExecutor) -> tuple[np.ndarray, int]:
        """(rows as uint8 [n, row_bytes], bytes read) by ``os.preadv`` in ``pool``'s threads."""
        h = self.header
        plan = plan_pages(idx, h.row_bytes, h.data_offset, self.max_run_pages)
        buf = self._buffer(plan.nbytes)
        view = memoryview(buf)
        try:
            n_runs = plan.run_slot.size
            workers = min(self.queue_depth, n_runs)
            # Each worker takes every ``workers``-th run: balanced, no per-run future.
            futures = [pool.submit(self._read_runs, view, plan, np.arange(w, n_runs, workers)) for w in range(workers)]
            for fut in futures:
                fut.result()
            if self._crcs is not None:
                check_pages(h, self._crcs, view[: plan.nbytes], plan.pages)
            arr = np.frombuffer(buf, dtype=np.uint8, count=plan.nbytes)
            windows = np.lib.stride_tricks.sliding_window_view(arr, h.row_bytes)
            raw = windows[plan.row_offset]
            del arr, windows
        finally:
            view.release()
        return raw, plan.nbytes

    def _fused_read_args(self, n_ids: int, dtype: torch.dtype) -> tuple | None:
        """What a caller's own ``nogil`` kernel needs to read rows of this table with ``_aio.fetch`` (the cache
        fuses its probe, this read and its admission into one call), or None where that cannot run: not the aio
        engine, a format that is not ``dtype`` on disk, or more than ``FUSED_MAX_IDS`` ids (a prefill: the page
        buffer must be sized before the call for the worst case, every id on its own pages)."""
        h = self.header
        if self.io_engine != "aio" or getattr(self._format, "dtype", None) != dtype or n_ids > FUSED_MAX_IDS:
            return None
        crcs = self._crcs if self._crcs is not None else self._no_crcs
        buf = self._aligned(_aio.max_pages(n_ids, h.row_bytes) * PAGE)
        verify = self._crcs is not None
        return h.row_bytes, h.data_offset, self.max_run_pages, self._fds, buf, crcs, verify, self._kctx.get()

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        """The aio engine on a plain format (fp32/bf16) whose dtype is ``dtype``: the whole gather, dedupe,
        read, verification and expansion into ``out``, is one ``nogil`` kernel call (see ``_aio.gather``)."""
        h = self.header
        if self.io_engine != "aio" or getattr(self._format, "dtype", None) != dtype or out.shape[1] != h.row_bytes:
            return None
        crcs = self._crcs if self._crcs is not None else self._no_crcs
        buf = self._aligned(_aio.max_pages(min(flat.size, 64), h.row_bytes) * PAGE)
        while True:
            err, n_pages, bad, first, n_unique, lo, hi = _aio.gather(
                flat, h.num_rows, h.row_bytes, h.data_offset, self.max_run_pages, self._fds, buf, crcs,
                self._crcs is not None, out, ctx=self._kctx.get(),
            )  # fmt: skip
            if err != -1:
                break
            buf = self._aligned(n_pages * PAGE)  # the plan needs more pages than the buffer holds
        if err == -2:
            raise self._out_of_range(int(lo), int(hi))
        if err or bad:
            self._raise_read_error(err, bad, first)
        self.stats.add(bytes_read=n_pages * PAGE)
        return int(n_unique)

    def _start_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> _DirectPending | None:
        """Split phase (see :meth:`RowTable.start_gather`): one ``nogil`` call dedupes, plans and ``io_submit``s
        the page reads, and returns while the kernel reads; :class:`_DirectPending` reaps, verifies and expands."""
        h = self.header
        if not self.split_phase or getattr(self._format, "dtype", None) != dtype or out.shape[1] != h.row_bytes:
            return None
        io = self._io_thread()
        if io is not None:
            k = io.post(flat)
            if k is not None:
                return _ThreadPending(self, k, out)
        slot = self._slots.acquire(_aio.max_pages(min(flat.size, 64), h.row_bytes) * PAGE)
        if slot is None:
            return None
        try:
            while True:
                state = _aio.gather_start(
                    flat, h.num_rows, h.row_bytes, h.data_offset, self.max_run_pages, slot.arr, slot.ctx, self._fd
                )
                if state[0] != -1:
                    break
                slot.buffer(int(state[5].size) * PAGE)  # the plan needs more pages than the buffer holds
        except BaseException:
            self._slots.release(slot)  # nothing was submitted
            raise
        if state[0] == -2:
            self._slots.release(slot)
            raise self._out_of_range(int(state[1]), int(state[2]))
        pending = _DirectPending(self, slot, state, out)
        self._inflight.add(pending)
        return pending

    def _raise_read_error(self, err: int, bad: int, first: int) -> None:
        """The aio kernels' failure as the error the threaded engine raises: an errno, or a page CRC mismatch."""
        h = self.header
        if err:
            raise OSError(err, os.strerror(err), h.path)
        raise page_mismatch(h, first - h.data_offset // PAGE, bad)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        if self.io_engine == "aio":
            raw, nbytes = self._raw_aio(np.ascontiguousarray(idx, dtype=np.int64))
        else:
            assert self._pool is not None
            raw, nbytes = self._raw_threads(idx, self._pool)
        self.stats.add(bytes_read=nbytes)
        if self._format is FP32:  # the rows are fresh float32 records already: a view, not a decode copy
            return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float32)
        return self._format.decode(torch.from_numpy(raw))

    def _close_dups(self) -> None:
        for fd in self._fds[1:].tolist():
            os.close(fd)
        self._fds = np.zeros(0, np.int64)

    def close(self) -> None:
        self._want_io = False
        if getattr(self, "_io", None) is not None:
            self._io.close()  # type: ignore[union-attr]
            self._io = None
        for pending in list(self._inflight):  # reads in flight finish before their contexts and buffers go
            pending.close()
        self._slots.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._kctx.close()
        self._close_dups()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _DirectPending(PendingGather):
    """A direct-tier gather whose page reads are in flight in its own :class:`~engramlm.store._aio.IoSlot`.

    Holds the control blocks, the page buffer (in the slot) and the plan until the reads are reaped, by
    ``result()`` (reap, verify, expand into ``out``) or by ``close()``/garbage collection (reap only)."""

    def __init__(self, table: DirectFileTable, slot: _aio.IoSlot, state: tuple, out: np.ndarray) -> None:
        super().__init__()
        self._tbl, self._slot, self._state, self._out_bytes = table, slot, state, out

    def _finish(self) -> int:
        t, slot = self._tbl, self._slot
        (_, _, _, nu, inverse, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st) = self._state
        h = t.header
        crcs = t._crcs if t._crcs is not None else t._no_crcs
        try:
            err, bad, first = _aio.gather_finish(
                slot.ctx, t._fd, slot.arr, pages, run_slot, run_count, row_offset, inverse, cbs, ptrs, got, rstatus,
                st, crcs, t._crcs is not None, h.data_offset // PAGE, self._out_bytes,
            )  # fmt: skip
        except BaseException:  # the kernel never ran (or was interrupted): reap before the slot is reused
            self._reap()
            raise
        self._done()
        if err or bad:
            t._raise_read_error(int(err), int(bad), int(first))
        t.stats.add(bytes_read=int(pages.size) * PAGE)
        return int(nu)

    def _reap(self) -> None:
        _, _, _, _, _, _, _, _, _, cbs, ptrs, got, rstatus, st = self._state
        try:
            _aio.reap(self._slot.ctx, cbs, ptrs, got, rstatus, st)
        finally:
            self._done()

    def _done(self) -> None:
        self._tbl._inflight.discard(self)
        self._tbl._slots.release(self._slot)
        self._state = ()


class _ThreadPending(PendingGather):
    """A direct-tier gather posted to the table's I/O thread (job ``k`` of its ring)."""

    def __init__(self, table: DirectFileTable, k: int, out: np.ndarray) -> None:
        super().__init__()
        self._tbl, self._k, self._out_bytes = table, k, out
        self._io = table._io

    def _finish(self) -> int:
        t, io = self._tbl, self._io
        assert io is not None
        st, pages, bad, first, nu, lo, hi, _ = io.collect(self._k, self._out_bytes)
        if st == -2:
            raise t._out_of_range(lo, hi)
        if st or bad:
            t._raise_read_error(st, bad, first)
        t.stats.add(bytes_read=pages * PAGE)
        return nu

    def _reap(self) -> None:
        assert self._io is not None
        self._io.discard(self._k)
