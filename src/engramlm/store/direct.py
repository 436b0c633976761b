"""SSD tier: O_DIRECT page reads at high queue depth, bypassing the page cache (spec §10.2.7).

Rows are mapped to 4 KiB pages, pages are deduplicated and coalesced into runs, and runs are
read with ``os.preadv`` (which releases the GIL) by a pool of ``queue_depth`` threads into a
page-aligned anonymous mmap buffer. Nothing reads the whole file, so tables larger than RAM work.
If the filesystem refuses O_DIRECT (tmpfs), the table falls back to buffered preadv, warns,
and reports ``direct_io = False``.

Verification (``verify=True``, the default) keeps the point of O_DIRECT: it reads nothing more. Each
4 KiB page already read into the buffer is checked against the file's per-page CRC32
(:func:`~engramlm.store.file.check_pages`, one zlib CRC per page) before rows are taken from it. The
checks run in the calling thread once the reads are in: in the workers (64 threads contending for the
GIL, which zlib holds for 4 KiB buffers) the same gather took twice as long. A v1
file (no page table) is verified whole at open instead, with a warning.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engramlm.store.base import RowTable, TableHeader
from engramlm.store.file import StoreHeader, check_pages, needs_full_check, open_store, read_page_crcs, verify_store
from engramlm.store.pages import PAGE, PagePlan, plan_pages

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
    ) -> None:
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
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
        self._pool = ThreadPoolExecutor(queue_depth, thread_name_prefix="engram-direct")
        self._local = threading.local()

    def _buffer(self, nbytes: int) -> mmap.mmap:
        """A per-thread page-aligned buffer, grown on demand, so concurrent gathers never share."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, max(nbytes, PAGE))
            self._local.buf = buf
        return buf

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

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.header
        plan = plan_pages(ids.numpy(), h.row_bytes, h.data_offset, self.max_run_pages)
        buf = self._buffer(plan.nbytes)
        view = memoryview(buf)
        try:
            n_runs = plan.run_slot.size
            workers = min(self.queue_depth, n_runs)
            # Each worker takes every ``workers``-th run: balanced, no per-run future.
            futures = [
                self._pool.submit(self._read_runs, view, plan, np.arange(w, n_runs, workers)) for w in range(workers)
            ]
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
        self.stats.add(bytes_read=plan.nbytes)
        return self._format.decode(torch.from_numpy(raw))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
