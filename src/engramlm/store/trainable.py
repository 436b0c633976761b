"""SSD tier for training: a table whose rows *and* per-row optimizer state live in files, with a bounded
RAM cache of hot rows, dirty tracking, write-back and crash-safe, copy-free checkpoints.

Files of one table (a directory)::

    base-000000.bin   4 KiB header page (JSON), then one record per row, in row order. Written once
                      (at creation or by a compaction), never modified: a checkpoint can always point at it.
    base-000000.crc   CRC32 of every 4 KiB page after the header (uint32 each); base pages are checked on
                      every read, as the ``direct`` tier checks store pages.
    log-000001.bin    append-only chunks of dirty rows, written when dirty rows leave the cache (eviction)
                      and at a checkpoint (flush). One log file per session: a resumed run never appends
                      to a file an earlier checkpoint points into.

A record is ``[row fp32 d | m fp32 d | v fp32 d | count int64]`` padded to a power of two (or to whole pages
above 4 KiB), so a record never straddles a page and one page-planned O_DIRECT read brings a row with its
optimizer state. A log chunk is a header page (magic, row count, CRC32 of ids and records) followed by the
ids and the records, each padded to pages, so log records are read with the same page planner.

**Checkpoints without copying the table.** :meth:`TrainableTable.flush` appends every dirty cached row
to the log, fsyncs it and returns a *manifest*: the base file (and its CRC file's CRC), each log file with
the length committed so far and the CRC32 of those bytes. The trainer writes the manifest inside the
checkpoint directory, which is renamed into place atomically: a checkpoint is the manifest, and the bytes it
names are never rewritten (logs only grow, bases are immutable). A kill at any moment leaves at most bytes
beyond some manifest's lengths, which nothing reads. Opening from a manifest re-reads the committed log
prefix once (CRC per chunk and per file: truncated or corrupt segments are refused with
:class:`CorruptFileError` naming the file) and rebuilds the row -> newest location index. When the logs
outgrow ``compact_ratio`` x the base, :meth:`compact` streams base + logs into a new base (one sequential
pass; the old files stay until no retained checkpoint names them, :func:`collect_garbage`).

Memory: the cache (``cache_bytes`` of records), plus 12 bytes per table row (newest location int64, cache
slot int32) and one uint32 per base page: for 32-dim rows (512-byte records) 2.3% of the table file.

Thread safety: one lock guards the cache and the logs; :meth:`prefetch` (a background thread) reads the
disk outside it. A row being updated by the current step is never prefetched (the caller excludes it), so
a row missing from the cache has a stable newest copy on disk while it is read.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import re
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.errors import CorruptFileError
from engramlm.store import _aio
from engramlm.store.base import RowTable, TableHeader
from engramlm.store.direct import AIO_MAX_FDS, _open_direct
from engramlm.store.pages import PAGE, PagePlan, plan_offsets
from engramlm.utils.io import fsync_path

MANIFEST_FORMAT = "engramlm-trainable-table"
MANIFEST_VERSION = 1
_BASE_MAGIC = "engramlm-trainable-base-v1"
_LOG_MAGIC = b"ENGRLOG1"
_LOG_HEAD = np.dtype([("magic", "S8"), ("n", "<u8"), ("rec", "<u8"), ("crc", "<u4"), ("pad", "<u4")])
_LOC_SHIFT = 44  # loc = file_no << 44 | byte offset; -1: the base file
_IO_BLOCK = 8 << 20  # bytes per sequential read/write block (init, compaction, flush)
_READ_ROWS = 2048  # records per page-planned read: bounds each thread's read buffer to 2048 pages (8 MiB)
_NO_CRCS = np.zeros(0, np.uint32)


def _align(x: int, to: int = PAGE) -> int:
    return (x + to - 1) // to * to


@dataclass(frozen=True)
class RecordLayout:
    """Where a row and its optimizer state sit in one record."""

    dim: int

    @property
    def used(self) -> int:
        return 12 * self.dim + 8

    @property
    def nbytes(self) -> int:
        u = self.used
        return 1 << (u - 1).bit_length() if u <= PAGE else _align(u)

    def empty(self, n: int) -> np.ndarray:
        return np.zeros((n, self.nbytes), dtype=np.uint8)

    def unpack(self, rec: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, m, v, count) as new torch tensors from records ``[n, nbytes]``: one copy of each part, taken
        from a float32 view of the records (no intermediate contiguous copy)."""
        d = self.dim
        rec = np.ascontiguousarray(rec)
        f = torch.from_numpy(rec.view(np.float32))  # [n, nbytes / 4]: nbytes is a power of two >= 16 or pages
        if (12 * d) % 8 == 0:
            count = torch.from_numpy(rec.view(np.int64))[:, 12 * d // 8].clone()
        else:
            count = torch.from_numpy(np.ascontiguousarray(rec[:, 12 * d : 12 * d + 8]).view(np.int64)[:, 0].copy())
        return f[:, :d].clone(), f[:, d : 2 * d].clone(), f[:, 2 * d : 3 * d].clone(), count

    def pack(self, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, count: torch.Tensor) -> np.ndarray:
        """Records from (rows, m, v, count): each part copied once into place; the padding is zeroed, so equal
        states give equal bytes (and equal CRCs)."""
        d, n = self.dim, w.shape[0]
        rec = np.empty((n, self.nbytes), dtype=np.uint8)
        rec[:, 12 * d + 8 :] = 0
        f = torch.from_numpy(rec.view(np.float32))
        f[:, :d] = w
        f[:, d : 2 * d] = m
        f[:, 2 * d : 3 * d] = v
        c = count.to(torch.int64).contiguous().numpy()
        if (12 * d) % 8 == 0:
            rec.view(np.int64)[:, 12 * d // 8] = c
        else:
            rec[:, 12 * d : 12 * d + 8] = c.reshape(-1, 1).view(np.uint8)
        return rec

    def rows(self, rec: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rec[:, : 4 * self.dim]).view(np.float32).copy())


def _page_crcs(data: memoryview | bytes) -> np.ndarray:
    n = len(data) // PAGE
    return np.fromiter((zlib.crc32(data[i * PAGE : (i + 1) * PAGE]) for i in range(n)), dtype=np.uint32, count=n)


def _file_crc(path: Path, length: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        left = length
        while left:
            b = f.read(min(left, _IO_BLOCK))
            if not b:
                break
            crc = zlib.crc32(b, crc)
            left -= len(b)
    return crc


class _Reader:
    """Page-planned reads of records at byte offsets of one file (O_DIRECT where the filesystem allows).

    Two engines, the same bytes and checks (as :mod:`engramlm.store.direct`): ``aio``, where
    :mod:`engramlm.store._aio` runs (glibc on 64-bit Linux), does a whole read (plan, ``lio_listio`` over
    duplicated descriptors, CRC32 per page, the copy of records out of the pages) in one Numba ``nogil``
    call, so the prefetch thread holds the GIL only to enter it and the training thread's Python dispatch is
    not slowed by it; ``threads`` (elsewhere) plans in NumPy and ``preadv``s runs in the pool's threads."""

    def __init__(
        self, path: Path, direct: bool, pool: ThreadPoolExecutor, queue_depth: int, engine: str = "auto"
    ) -> None:
        self.path = path
        self.fd, self.direct_io, _ = _open_direct(path, direct)
        self.pool, self.queue_depth = pool, queue_depth
        self._local = threading.local()
        self._read_lock = threading.RLock()  # _probe reads through read() again
        self._fds = np.zeros(0, np.int64)
        self.engine = "threads"
        if engine != "threads" and _aio.available():
            self._fds = _aio.dup_fds(self.fd, max(1, min(queue_depth, AIO_MAX_FDS)))
            self.engine = "aio"
        self._probed = self.engine != "aio"

    def _probe(self, offsets: np.ndarray, rec_bytes: int, crcs: np.ndarray | None, first_page: int) -> None:
        """At the first read: keep the aio engine only if it reads what ``os.preadv`` reads (a few records)."""
        self._probed = True
        few = offsets[:: max(1, offsets.size // 3)][:3]
        try:
            got = self.read(few, rec_bytes, crcs, first_page)
        except OSError:
            got = None
        self.engine = "threads"
        want = self.read(few, rec_bytes, crcs, first_page)
        if got is not None and np.array_equal(got, want):
            self.engine = "aio"
        else:
            self._close_dups()

    def _buffer(self, nbytes: int) -> mmap.mmap:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = mmap.mmap(-1, max(_align(nbytes), PAGE))
            self._local.buf = buf
        return buf

    def _aligned(self, nbytes: int) -> np.ndarray:
        """The aio engine's per-thread page-aligned buffer (the kernel writes by address)."""
        return _aio.aligned_buffer(self._local, nbytes)

    def _runs(self, view: memoryview, plan: PagePlan, runs: np.ndarray) -> None:
        for slot, page, count in zip(
            plan.run_slot[runs].tolist(), plan.run_page[runs].tolist(), plan.run_count[runs].tolist(), strict=True
        ):
            off, pos, want = page * PAGE, slot * PAGE, count * PAGE
            while want:
                got = os.preadv(self.fd, [view[pos : pos + want]], off)
                if got <= 0:
                    raise CorruptFileError(f"{self.path}: truncated (short read at byte {off})")
                off, pos, want = off + got, pos + got, want - got

    def read(self, offsets: np.ndarray, rec_bytes: int, crcs: np.ndarray | None, first_page: int = 0) -> np.ndarray:
        """Records at ``offsets``; with ``crcs``, every page read is checked (``crcs[page - first_page]``).
        Read in file order, at most ``_READ_ROWS`` records at a time (bounded buffers, pages still coalesced)."""
        # one read at a time per reader: the prefetch and a background compaction may share a file's reader, and
        # its first read probes (switching engines, maybe closing the aio descriptors) under the other's feet
        with self._read_lock:
            return self._read_locked(offsets, rec_bytes, crcs, first_page)

    def _read_locked(self, offsets: np.ndarray, rec_bytes: int, crcs: np.ndarray | None, first_page: int) -> np.ndarray:
        out = np.empty((offsets.size, rec_bytes), dtype=np.uint8)
        if not offsets.size:
            return out
        sorted_ = bool(np.all(offsets[1:] > offsets[:-1]))
        order = None if sorted_ else np.argsort(offsets, kind="stable")
        base = first_page * PAGE
        rel = (offsets if sorted_ else offsets[order]) - base
        if not self._probed:
            self._probe(offsets, rec_bytes, crcs, first_page)
        if self.engine == "aio" and not np.any(rel % rec_bytes):  # records on the file's record grid
            dst = out if sorted_ else np.empty_like(out)
            self._read_aio(rel // rec_bytes, rec_bytes, crcs, base, dst)
            if not sorted_:
                out[order] = dst
            return out
        for s in range(0, offsets.size, _READ_ROWS):
            sel = slice(s, s + _READ_ROWS) if sorted_ else order[s : s + _READ_ROWS]
            out[sel] = self._read_some(offsets[sel], rec_bytes, crcs, first_page)
        return out

    def _read_aio(self, idx: np.ndarray, rec_bytes: int, crcs: np.ndarray | None, base: int, out: np.ndarray) -> None:
        """Records ``idx`` (ascending) of the grid ``base + idx * rec_bytes`` into ``out``, ``_READ_ROWS`` at a
        time, each batch one nogil call."""
        verify = crcs is not None
        table = crcs if verify else _NO_CRCS
        span = (rec_bytes + PAGE - 1) // PAGE  # records never straddle a page (RecordLayout), so no + 1
        buf = self._aligned(min(idx.size, _READ_ROWS) * span * PAGE)
        for s in range(0, idx.size, _READ_ROWS):
            part = np.ascontiguousarray(idx[s : s + _READ_ROWS])
            dst = out[s : s + _READ_ROWS]
            while True:
                err, n_pages, bad, first = _aio.fetch(part, rec_bytes, base, 64, self._fds, buf, table, verify, dst)
                if err != -1:
                    break
                buf = self._aligned(n_pages * PAGE)  # a record layout that straddles pages: grow and retry
            if err:
                raise OSError(err, os.strerror(err), str(self.path))
            if bad:
                raise CorruptFileError(
                    f"{self.path}: page {first} fails its CRC32 ({bad} bad page(s) in this read); the table file is "
                    "corrupt"
                )
            if n_pages and int(part[-1]) * rec_bytes + base + rec_bytes > os.fstat(self.fd).st_size:
                raise CorruptFileError(f"{self.path}: truncated (record past the end of the file)")

    def _read_some(self, offsets: np.ndarray, rec_bytes: int, crcs: np.ndarray | None, first_page: int) -> np.ndarray:
        plan = plan_offsets(offsets, rec_bytes, 64)
        buf = self._buffer(plan.nbytes)
        view = memoryview(buf)
        try:
            n_runs = plan.run_slot.size
            workers = min(self.queue_depth, n_runs)
            if workers <= 1:
                self._runs(view, plan, np.arange(n_runs))
            else:
                futs = [self.pool.submit(self._runs, view, plan, np.arange(w, n_runs, workers)) for w in range(workers)]
                for f in futs:
                    f.result()
            if crcs is not None:
                got = _page_crcs(view[: plan.nbytes])
                bad = np.flatnonzero(got != crcs[plan.pages - first_page])
                if bad.size:
                    raise CorruptFileError(
                        f"{self.path}: page {int(plan.pages[bad[0]])} fails its CRC32 ({bad.size} bad page(s) in "
                        "this read); the table file is corrupt"
                    )
            arr = np.frombuffer(buf, dtype=np.uint8, count=plan.nbytes)
            out = np.lib.stride_tricks.sliding_window_view(arr, rec_bytes)[plan.row_offset]  # one copy, no index matrix
            del arr
        finally:
            view.release()
        return out

    def _close_dups(self) -> None:
        for fd in self._fds[1:].tolist():
            os.close(fd)
        self._fds = np.zeros(0, np.int64)

    def close(self) -> None:
        self._close_dups()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, parts: list, pos: int) -> None:
    """Write ``parts`` back to back at ``pos``: one ``pwritev``, finished by ``pwrite`` after a short write."""
    total = sum(len(p) for p in parts)
    done = os.pwritev(fd, parts, pos) if parts else 0
    if done < total:
        rest = memoryview(b"".join(bytes(p) for p in parts))
        while done < total:
            done += os.pwrite(fd, rest[done:], pos + done)


def _base_header(num_rows: int, dim: int, rec: int, fingerprint: str) -> bytes:
    doc = {"magic": _BASE_MAGIC, "num_rows": num_rows, "dim": dim, "record_bytes": rec, "fingerprint": fingerprint}
    raw = json.dumps(doc, sort_keys=True).encode()
    if len(raw) > PAGE:
        raise ValueError("base header does not fit a page")
    return raw + b" " * (PAGE - len(raw))


def _write_base(
    path: Path, num_rows: int, layout: RecordLayout, fingerprint: str, blocks: Iterable[tuple[int, np.ndarray]]
) -> dict[str, Any]:
    """Write a base file (+ its .crc) from ``(first_row, records)`` blocks in row order; fsynced. -> manifest entry."""
    rec = layout.nbytes
    crc_path = path.with_suffix(".crc")
    crcs: list[np.ndarray] = []
    pending = bytearray()
    written = 0
    with open(path, "xb") as f:  # never an existing name: another run's directory may hard-link it
        f.write(_base_header(num_rows, layout.dim, rec, fingerprint))
        for first, recs in blocks:
            if first != written:
                raise ValueError(f"base blocks out of order: row {first}, expected {written}")
            pending += recs.tobytes()
            written += recs.shape[0]
            full = len(pending) // PAGE * PAGE
            if full:
                chunk = memoryview(pending)[:full]
                f.write(chunk)
                crcs.append(_page_crcs(chunk))
                del chunk
                del pending[:full]
        if written != num_rows:
            raise ValueError(f"base blocks cover {written} rows, expected {num_rows}")
        if pending:
            pending += b"\0" * (PAGE - len(pending))
            f.write(pending)
            crcs.append(_page_crcs(pending))
        f.flush()
        os.fsync(f.fileno())
    table = np.concatenate(crcs) if crcs else np.zeros(0, np.uint32)
    crc_bytes = table.astype("<u4").tobytes()
    with open(crc_path, "xb") as f:
        f.write(crc_bytes)
        f.flush()
        os.fsync(f.fileno())
    return {
        "file": path.name,
        "crc_file": crc_path.name,
        "crc_crc32": zlib.crc32(crc_bytes),
        "size": path.stat().st_size,
    }


def _next_name(directory: Path, prefix: str) -> str:
    nums = [int(m.group(1)) for p in directory.iterdir() if (m := re.fullmatch(prefix + r"-(\d+)\.bin", p.name))]
    return f"{prefix}-{max(nums, default=-1) + 1:06d}.bin"


class TrainableTable(RowTable):
    """A [num_rows, dim] fp32 table with per-row Adam state (m, v, count) on disk and a bounded RAM cache.

    Build with :meth:`create` (fresh) or :meth:`open` (from a checkpoint's manifest). ``read``/``write``
    move records (:class:`RecordLayout`) of sorted unique ids; ``tick`` is the caller's step, used for
    eviction (least recently used first). As a :class:`RowTable` it gathers the newest rows.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Mapping[str, Any],
        fingerprint: str,
        *,
        cache_bytes: int,
        direct: bool = True,
        queue_depth: int = 16,
        writable: bool = True,
    ) -> None:
        num_rows, dim = int(manifest["num_rows"]), int(manifest["dim"])
        super().__init__(TableHeader(num_rows, dim, fingerprint, "fp32"))
        self.directory = Path(directory)
        self.layout = RecordLayout(dim)
        self.rec = self.layout.nbytes
        if int(manifest["record_bytes"]) != self.rec:
            raise CorruptFileError(f"{self.directory}: manifest records {manifest['record_bytes']}-byte records")
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(queue_depth, thread_name_prefix="engram-ssd")
        self._queue_depth, self._direct = queue_depth, direct
        self.io = {"rows_read": 0, "bytes_read": 0, "rows_written": 0, "bytes_written": 0, "log_chunks": 0}
        self._open_base(manifest["base"])
        self._loc = np.full(num_rows, -1, dtype=np.int64)
        self._logs: list[dict[str, Any]] = []  # committed and current logs: file, length, crc32, reader
        for entry in manifest.get("logs", []):
            self._replay_log(entry)
        self.writable = writable
        if writable:  # a session's own log; read-only opens (exports) create nothing
            self._new_log()
        cap = max(1, int(cache_bytes) // self.rec)
        self.capacity = cap
        self._crec = np.zeros((cap, self.rec), dtype=np.uint8)  # calloc: pages become resident as slots fill
        self._crow = np.full(cap, -1, dtype=np.int64)
        self._cdirty = np.zeros(cap, dtype=bool)
        self._cused = np.zeros(cap, dtype=np.int64)
        self._slot = np.full(num_rows, -1, dtype=np.int32)
        self._free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack of free slots: the top is at _nfree - 1
        self._nfree = cap
        self._compaction: _Compaction | None = None  # a background compaction (start_compaction)

    # ---- creation and opening -----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        num_rows: int,
        dim: int,
        fingerprint: str,
        init: Callable[[Callable[[int, torch.Tensor], None]], None],
        **kwargs: Any,
    ) -> TrainableTable:
        """A fresh table whose rows ``init(write)`` produces in order (``write(first_row, rows)``); state zero."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        layout = RecordLayout(dim)
        base = _write_base_streaming(d / _next_name(d, "base"), num_rows, layout, fingerprint, init)
        manifest = {"num_rows": num_rows, "dim": dim, "record_bytes": layout.nbytes, "base": base, "logs": []}
        fsync_path(d)
        return cls(d, manifest, fingerprint, **kwargs)

    @classmethod
    def from_records(
        cls,
        directory: str | os.PathLike,
        num_rows: int,
        dim: int,
        fingerprint: str,
        blocks: Iterable[tuple[int, np.ndarray]],
        **kwargs: Any,
    ) -> TrainableTable:
        """A table whose base holds the records ``blocks`` give (``(first_row, records)`` in row order: rows with
        their Adam state, e.g. streamed from other tables by :func:`copy_records`), with an empty log."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        layout = RecordLayout(dim)
        base = _write_base(d / _next_name(d, "base"), num_rows, layout, fingerprint, blocks)
        manifest = {"num_rows": num_rows, "dim": dim, "record_bytes": layout.nbytes, "base": base, "logs": []}
        fsync_path(d)
        return cls(d, manifest, fingerprint, **kwargs)

    @classmethod
    def open(cls, directory: str | os.PathLike, manifest: Mapping[str, Any], fingerprint: str, **kwargs: Any):
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
            raise CorruptFileError(f"{directory}: not a trainable-table manifest v{MANIFEST_VERSION}")
        return cls(Path(directory), manifest, fingerprint, **kwargs)

    def _open_base(self, entry: Mapping[str, Any]) -> None:
        path = self.directory / entry["file"]
        crc_path = self.directory / entry["crc_file"]
        for p in (path, crc_path):
            if not p.is_file():
                raise CorruptFileError(f"{p}: missing, but the checkpoint's table manifest names it")
        if path.stat().st_size != int(entry["size"]):
            raise CorruptFileError(f"{path}: {path.stat().st_size} bytes, the manifest records {entry['size']}")
        raw = crc_path.read_bytes()
        if zlib.crc32(raw) != int(entry["crc_crc32"]):
            raise CorruptFileError(f"{crc_path}: CRC32 does not match the manifest; the page checksums are corrupt")
        with open(path, "rb") as f:
            head = f.read(PAGE)
        try:
            doc = json.loads(head.decode().strip())
        except ValueError:
            doc = {}
        want = {"magic": _BASE_MAGIC, "num_rows": self.num_rows, "dim": self.dim, "record_bytes": self.rec}
        if any(doc.get(k) != v for k, v in want.items()):
            raise CorruptFileError(f"{path}: header is not a trainable base of {self.num_rows} x {self.dim}")
        self._base_entry = dict(entry)
        self._base_crcs = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
        self._base = _Reader(path, self._direct, self._pool, self._queue_depth)

    def _replay_log(self, entry: Mapping[str, Any]) -> None:
        """Check a committed log prefix (per chunk and whole) and point the index at its rows."""
        path = self.directory / entry["file"]
        length = int(entry["length"])
        if not path.is_file():
            raise CorruptFileError(f"{path}: missing, but the checkpoint's table manifest names it")
        size = path.stat().st_size
        if size < length:
            raise CorruptFileError(f"{path}: truncated log segment ({size} bytes, the checkpoint committed {length})")
        file_no = len(self._logs)
        pos = 0
        with open(path, "rb") as f:
            while pos < length:
                head = f.read(PAGE)
                h = np.frombuffer(head[: _LOG_HEAD.itemsize], dtype=_LOG_HEAD)[0] if len(head) == PAGE else None
                if h is None or h["magic"] != _LOG_MAGIC or int(h["rec"]) != self.rec:
                    raise CorruptFileError(f"{path}: no valid log chunk header at byte {pos}; the segment is corrupt")
                n = int(h["n"])
                ids_bytes = _align(_LOG_HEAD.itemsize + 8 * n) - PAGE
                ids_raw = head[_LOG_HEAD.itemsize :] + f.read(max(0, ids_bytes))
                ids = np.frombuffer(ids_raw[: 8 * n], dtype="<i8")
                body_crc = zlib.crc32(ids.tobytes())
                rec_start = pos + _align(_LOG_HEAD.itemsize + 8 * n)
                left = _align(n * self.rec)
                tail = n * self.rec
                while left:
                    b = f.read(min(left, _IO_BLOCK))
                    if not b:
                        break
                    use = b[: max(0, min(len(b), tail))]
                    body_crc = zlib.crc32(use, body_crc)
                    tail -= len(use)
                    left -= len(b)
                end = rec_start + _align(n * self.rec)
                if left or end > length or body_crc != int(h["crc"]):
                    raise CorruptFileError(
                        f"{path}: log chunk at byte {pos} fails its CRC32 or is cut short; the segment is corrupt"
                    )
                if n and (ids.min() < 0 or ids.max() >= self.num_rows):
                    raise CorruptFileError(f"{path}: log chunk at byte {pos} names rows outside the table")
                self._loc[ids] = (file_no << _LOC_SHIFT) | (rec_start + np.arange(n, dtype=np.int64) * self.rec)
                pos = end
        if _file_crc(path, length) != int(entry["crc32"]):
            raise CorruptFileError(f"{path}: CRC32 of the committed {length} bytes does not match the checkpoint")
        self._logs.append(
            {"file": path.name, "length": length, "crc32": int(entry["crc32"]), "fd": -1,
             "reader": _Reader(path, False, self._pool, self._queue_depth)}
        )  # fmt: skip

    def _new_log(self) -> None:
        name = _next_name(self.directory, "log")
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        fsync_path(self.directory)
        self._logs.append(
            {"file": name, "length": 0, "crc32": 0, "fd": fd, "reader": _Reader(path, False, self._pool, 1)}
        )

    # ---- disk ---------------------------------------------------------------------------------
    def _read_disk(self, ids: np.ndarray, locs: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self.rec), dtype=np.uint8)
        in_base = locs < 0
        if in_base.any():
            off = PAGE + ids[in_base] * self.rec
            out[in_base] = self._base.read(off, self.rec, self._base_crcs, first_page=1)
        if (~in_base).any():
            idx = np.flatnonzero(~in_base)
            fno = locs[idx] >> _LOC_SHIFT
            for f in np.unique(fno).tolist():
                sel = idx[fno == f]
                off = locs[sel] & ((1 << _LOC_SHIFT) - 1)
                out[sel] = self._logs[f]["reader"].read(off, self.rec, None)
        self.io["rows_read"] += int(ids.size)
        self.io["bytes_read"] += int(ids.size) * self.rec
        return out

    def _append_log(self, ids: np.ndarray, recs: np.ndarray) -> None:
        """Append (ids, records) as chunks of at most ~_IO_BLOCK bytes; the index then points there."""
        if not self.writable:
            raise RuntimeError(f"{self.directory}: opened read-only")
        log = self._logs[-1]
        per = max(1, _IO_BLOCK // self.rec)
        for s in range(0, ids.size, per):
            i, r = ids[s : s + per].astype("<i8"), np.ascontiguousarray(recs[s : s + per])
            n = i.size
            head = np.zeros(1, dtype=_LOG_HEAD)
            body_crc = zlib.crc32(r.data, zlib.crc32(i.data))
            head[0] = (_LOG_MAGIC, n, self.rec, body_crc, 0)
            hdr = head.tobytes() + i.tobytes()
            hdr += b"\0" * (_align(len(hdr)) - len(hdr))
            parts = [hdr, r.data.cast("B"), b"\0" * (_align(r.nbytes) - r.nbytes)]  # one pwritev, no record copy
            pos = log["length"]
            _pwrite_all(log["fd"], parts, pos)
            for part in parts:
                log["crc32"] = zlib.crc32(part, log["crc32"])
            rec_start = pos + len(hdr)
            end = rec_start + _align(r.nbytes)
            self._loc[i] = ((len(self._logs) - 1) << _LOC_SHIFT) | (rec_start + np.arange(n, dtype=np.int64) * self.rec)
            log["length"] = end
            self.io["rows_written"] += n
            self.io["bytes_written"] += end - pos
            self.io["log_chunks"] += 1

    # ---- cache --------------------------------------------------------------------------------
    def _evict(self, k: int) -> None:
        occupied = np.flatnonzero(self._crow >= 0)
        k = min(max(k, self.capacity // 16), occupied.size)  # evict in batches: fewer, larger log chunks
        if k <= 0:
            return
        victims = occupied[np.argpartition(self._cused[occupied], k - 1)[:k]] if k < occupied.size else occupied
        dirty = victims[self._cdirty[victims]]
        if dirty.size:
            order = np.argsort(self._crow[dirty])
            dirty = dirty[order]
            self._append_log(self._crow[dirty], self._crec[dirty])
        self._slot[self._crow[victims]] = -1
        self._crow[victims] = -1
        self._cdirty[victims] = False
        self._free[self._nfree : self._nfree + victims.size] = victims
        self._nfree += victims.size

    def _put(self, ids: np.ndarray, recs: np.ndarray, dirty: bool, tick: int) -> None:
        slots = self._slot[ids].astype(np.int64)
        res = slots >= 0
        if res.all():  # the step's write-back: every row is cached (read put it there); no masked copies
            self._crec[slots] = recs
            self._cused[slots] = np.maximum(self._cused[slots], tick)
            if dirty:
                self._cdirty[slots] = True
            return
        if res.any():
            s = slots[res]
            self._crec[s] = recs[res]
            self._cused[s] = np.maximum(self._cused[s], tick)
            if dirty:
                self._cdirty[s] = True
        new = np.flatnonzero(~res)
        if not new.size:
            return
        if new.size > self.capacity:  # more rows than the cache holds: the excess goes straight to disk
            spill, new = new[: new.size - self.capacity], new[new.size - self.capacity :]
            if dirty:
                self._append_log(ids[spill], recs[spill])
        if self._nfree < new.size:
            self._evict(new.size - self._nfree)
        take = self._free[self._nfree - new.size : self._nfree][::-1].copy()  # the order list.pop() gave
        self._nfree -= new.size
        self._crec[take] = recs[new]
        self._crow[take] = ids[new]
        self._cdirty[take] = dirty
        self._cused[take] = tick
        self._slot[ids[new]] = take

    # ---- the API the optimizer uses -------------------------------------------------------------
    def read(self, ids: np.ndarray, tick: int = 0) -> np.ndarray:
        """Records of sorted unique ``ids`` (the newest: cache, else log, else base); misses are cached."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._lock:
            slots = self._slot[ids]
            hit = slots >= 0
            if hit.all():  # everything prefetched: one gather, no masks
                out = self._crec[slots]
                self._cused[slots] = np.maximum(self._cused[slots], tick)
                self.stats.add(hits=int(ids.size), misses=0)
                return out
            out = np.empty((ids.size, self.rec), dtype=np.uint8)
            hs = slots[hit]
            out[hit] = self._crec[hs]
            self._cused[hs] = np.maximum(self._cused[hs], tick)
            miss = np.flatnonzero(~hit)
            self.stats.add(hits=int(hit.sum()), misses=int(ids.size - hit.sum()))
            if miss.size:
                out[miss] = self._read_disk(ids[miss], self._loc[ids[miss]])
                self._put(ids[miss], out[miss], False, tick)
        return out

    def write(self, ids: np.ndarray, recs: np.ndarray, tick: int = 0) -> None:
        """Store updated records (marked dirty; written to the log on eviction or :meth:`flush`)."""
        with self._lock:
            self._put(np.asarray(ids, dtype=np.int64), recs, True, tick)

    def prefetch(self, ids: np.ndarray, skip: np.ndarray | None = None, tick: int = 0) -> int:
        """Bring ``ids`` (minus ``skip``: rows the running step will rewrite) into the cache; disk reads run
        outside the lock. Returns the number of rows read."""
        ids = np.asarray(ids, dtype=np.int64)
        if skip is not None and skip.size:
            ids = ids[~np.isin(ids, skip, assume_unique=True)]
        with self._lock:
            res = self._slot[ids] >= 0
            self._cused[self._slot[ids[res]]] = tick
            want = ids[~res]
            locs = self._loc[want].copy()
        if not want.size:
            return 0
        recs = self._read_disk(want, locs)
        with self._lock:
            still = self._slot[want] < 0
            self._put(want[still], recs[still], False, tick)
        return int(want.size)

    def flush(self) -> dict[str, Any]:
        """Write every dirty row to the log, fsync it, and return the manifest of this exact state."""
        with self._lock:
            dirty = np.flatnonzero(self._cdirty)
            if dirty.size:
                dirty = dirty[np.argsort(self._crow[dirty])]
                per = max(1, _IO_BLOCK // self.rec)
                for s in range(0, dirty.size, per):
                    d = dirty[s : s + per]
                    self._append_log(self._crow[d], self._crec[d])
                self._cdirty[dirty] = False
            if self.writable:
                os.fsync(self._logs[-1]["fd"])
            return self.manifest()

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "num_rows": self.num_rows,
            "dim": self.dim,
            "record_bytes": self.rec,
            "base": dict(self._base_entry),
            "logs": [
                {"file": g["file"], "length": g["length"], "crc32": g["crc32"]} for g in self._logs if g["length"]
            ],
        }

    @property
    def log_bytes(self) -> int:
        return sum(g["length"] for g in self._logs)

    @property
    def base_bytes(self) -> int:
        return int(self._base_entry["size"])

    def files(self) -> set[str]:
        """Files this open table uses (never collected)."""
        b = self._base_entry
        job = self._compaction  # the base a background compaction is writing: not garbage
        new = {job.name, Path(job.name).with_suffix(".crc").name} if job is not None else set()
        return {b["file"], b["crc_file"], *(g["file"] for g in self._logs), *new}

    # ---- sequential access: export, compaction ----------------------------------------------------
    def read_records(self, start: int, stop: int) -> np.ndarray:
        """Newest records of rows [start, stop), read sequentially (one base range + the relocated rows)."""
        with self._lock:
            first, last = PAGE + start * self.rec, PAGE + stop * self.rec
            p0, p1 = first // PAGE, (last + PAGE - 1) // PAGE
            raw = os.pread(self._base.fd if not self._base.direct_io else self._buffered_base(), (p1 - p0) * PAGE,
                           p0 * PAGE)  # fmt: skip
            if len(raw) != (p1 - p0) * PAGE:
                raise CorruptFileError(f"{self._base.path}: truncated at page {p0}")
            bad = np.flatnonzero(_page_crcs(raw) != self._base_crcs[p0 - 1 : p1 - 1])
            if bad.size:
                raise CorruptFileError(
                    f"{self._base.path}: page {p0 + int(bad[0])} fails its CRC32; the file is corrupt"
                )
            arr = np.frombuffer(raw, dtype=np.uint8)[first - p0 * PAGE : last - p0 * PAGE]
            out = arr.reshape(stop - start, self.rec).copy()
            ids = np.arange(start, stop, dtype=np.int64)
            moved = np.flatnonzero(self._loc[start:stop] >= 0)
            if moved.size:
                out[moved] = self._read_disk(ids[moved], self._loc[ids[moved]])
            slots = self._slot[start:stop]
            cached = np.flatnonzero(slots >= 0)
            out[cached] = self._crec[slots[cached]]
            return out

    def _buffered_base(self) -> int:
        fd = getattr(self, "_base_buffered_fd", -1)
        if fd < 0:
            fd = os.open(self._base.path, os.O_RDONLY)
            self._base_buffered_fd = fd
        return fd

    def read_block(self, start: int, stop: int) -> torch.Tensor:
        """Newest rows [start, stop) (a ``store.storedir.BlockSource``: exports stream through this)."""
        return self.layout.rows(self.read_records(start, stop))

    def compact(self) -> dict[str, Any]:
        """Flush, then stream base + logs into a new base; the logs are no longer needed by this state.
        Returns the new manifest. Old files remain for older checkpoints (:func:`collect_garbage`). A background
        compaction in flight is waited for and switched to first."""
        if self._compaction is not None:
            self._compaction.thread.join()
            self.finish_compaction()
        self.flush()
        with self._lock:
            name = _next_name(self.directory, "base")
            per = max(1, _IO_BLOCK // self.rec)
            blocks = ((s, self.read_records(s, min(self.num_rows, s + per))) for s in range(0, self.num_rows, per))
            entry = _write_base(self.directory / name, self.num_rows, self.layout, self.fingerprint, blocks)
            fsync_path(self.directory)
            old_base = self._base
            for g in self._logs:
                g["reader"].close()
                if g["fd"] >= 0:
                    os.close(g["fd"])
            fd = getattr(self, "_base_buffered_fd", -1)
            if fd >= 0:
                os.close(fd)
                self._base_buffered_fd = -1
            old_base.close()
            self._open_base(entry)
            self._loc[:] = -1
            self._logs = []
            self._new_log()
            return self.manifest()

    # ---- background compaction -----------------------------------------------------------------
    def start_compaction(self) -> bool:
        """Start rewriting base + logs into a new base in a background thread; False if one is in flight or
        the table is read-only. The current log is fsynced and closed to appends first (rows written from now on
        go to a new log, which the compacted state keeps), and the row index is snapshotted, so the thread reads
        only files nobody writes any more, without the lock: the training step never waits for it. The result
        is switched to by :meth:`finish_compaction` (at a checkpoint); until then every manifest names the old
        files, so a kill at any moment leaves the previous checkpoint valid (the partial base is garbage)."""
        with self._lock:
            if not self.writable or self._compaction is not None:
                return False
            os.fsync(self._logs[-1]["fd"])
            n = len(self._logs)
            job = _Compaction(_next_name(self.directory, "base"), n)
            self._new_log()
            loc = self._loc.copy()  # 8 bytes a row while the compaction runs
            readers = [g["reader"] for g in self._logs[:n]]
            base_path, base_crcs = self._base.path, self._base_crcs
            job.thread = threading.Thread(
                target=self._compact_in_background, args=(job, loc, base_path, base_crcs, readers),
                name="engram-ssd-compact", daemon=True,
            )  # fmt: skip
            self._compaction = job
            job.thread.start()
        return True

    def _compact_in_background(
        self, job: _Compaction, loc: np.ndarray, base_path: Path, base_crcs: np.ndarray, readers: list[_Reader]
    ) -> None:
        path = self.directory / job.name
        per = max(1, _IO_BLOCK // self.rec)

        def blocks() -> Iterable[tuple[int, np.ndarray]]:
            with open(base_path, "rb") as f:
                for s in range(0, self.num_rows, per):
                    if job.cancel.is_set():
                        raise _Cancelled
                    e = min(self.num_rows, s + per)
                    yield s, _snapshot_records(f, base_path, base_crcs, loc, readers, self.rec, s, e)

        try:
            job.entry = _write_base(path, self.num_rows, self.layout, self.fingerprint, blocks())
            fsync_path(self.directory)
        except BaseException as exc:  # reported by finish_compaction; a cancelled one leaves nothing behind
            if not isinstance(exc, _Cancelled):
                job.error = exc
            for p in (path, path.with_suffix(".crc")):
                p.unlink(missing_ok=True)

    @property
    def compacting(self) -> bool:
        """A background compaction is in flight (its thread still running)."""
        job = self._compaction
        return job is not None and job.thread is not None and (job.thread.is_alive() or job.thread.ident is None)

    def finish_compaction(self) -> bool:
        """If a background compaction has completed, make its base this table's base and drop the logs it
        absorbed (rows written since it started stay in the newer logs); returns whether it switched. Call with
        no prefetch in flight (the trainer calls it at a checkpoint, before :meth:`flush`): file numbers in the
        row index change. A compaction that failed raises its error here."""
        job = self._compaction
        if job is None or self.compacting:
            return False
        self._compaction = None
        if job.error is not None:
            raise job.error
        if job.entry is None:
            return False
        with self._lock:
            n = job.logs
            moved = self._loc >= 0
            fno = np.where(moved, self._loc >> _LOC_SHIFT, -1)
            self._loc[moved & (fno < n)] = -1  # in the new base now
            newer = moved & (fno >= n)
            self._loc[newer] -= n << _LOC_SHIFT
            for g in self._logs[:n]:
                g["reader"].close()
                if g["fd"] >= 0:
                    os.close(g["fd"])
            self._logs = self._logs[n:]
            fd = getattr(self, "_base_buffered_fd", -1)
            if fd >= 0:
                os.close(fd)
                self._base_buffered_fd = -1
            self._base.close()
            self._open_base(job.entry)
        return True

    def cancel_compaction(self) -> None:
        """Stop a background compaction and wait for its thread; its base (partial, or complete but not switched
        to, so named by no manifest) is removed."""
        job = self._compaction
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join()
            self._compaction = None
            if job.entry is not None:
                for name in (job.entry["file"], job.entry["crc_file"]):
                    (self.directory / name).unlink(missing_ok=True)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layout.rows(self.read(ids.numpy()))

    def close(self) -> None:
        self.cancel_compaction()
        with self._lock:
            for g in self._logs:
                g["reader"].close()
                if g["fd"] >= 0:
                    os.close(g["fd"])
                    g["fd"] = -1
            self._base.close()
            fd = getattr(self, "_base_buffered_fd", -1)
            if fd >= 0:
                os.close(fd)
                self._base_buffered_fd = -1
        self._pool.shutdown(wait=True)


class _Cancelled(Exception):
    pass


@dataclass
class _Compaction:
    """A background compaction: the base file it writes, how many of the table's logs it absorbs."""

    name: str
    logs: int
    thread: threading.Thread | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    entry: dict[str, Any] | None = None  # the new base's manifest entry, once written
    error: BaseException | None = None


def _snapshot_records(
    f: Any,
    path: Path,
    crcs: np.ndarray,
    loc: np.ndarray,
    readers: list[_Reader],
    rec: int,
    start: int,
    stop: int,
) -> np.ndarray:
    """Records of rows [start, stop) as of a snapshot of the row index ``loc``: the base's pages (CRC-checked)
    and, for rows the index moved to a log, that log's record (``readers`` by file number)."""
    first, last = PAGE + start * rec, PAGE + stop * rec
    p0, p1 = first // PAGE, (last + PAGE - 1) // PAGE
    raw = os.pread(f.fileno(), (p1 - p0) * PAGE, p0 * PAGE)
    if len(raw) != (p1 - p0) * PAGE:
        raise CorruptFileError(f"{path}: truncated at page {p0}")
    bad = np.flatnonzero(_page_crcs(raw) != crcs[p0 - 1 : p1 - 1])
    if bad.size:
        raise CorruptFileError(f"{path}: page {p0 + int(bad[0])} fails its CRC32; the file is corrupt")
    out = np.frombuffer(raw, dtype=np.uint8)[first - p0 * PAGE : last - p0 * PAGE].reshape(stop - start, rec).copy()
    part = loc[start:stop]
    moved = np.flatnonzero(part >= 0)
    if moved.size:
        fno = part[moved] >> _LOC_SHIFT
        for fi in np.unique(fno).tolist():
            sel = moved[fno == fi]
            out[sel] = readers[fi].read(part[sel] & ((1 << _LOC_SHIFT) - 1), rec, None)
    return out


def _write_base_streaming(
    path: Path, num_rows: int, layout: RecordLayout, fingerprint: str, init: Callable[..., None]
) -> dict[str, Any]:
    """A base file whose rows ``init(write)`` produces in order, written as they come (bounded memory)."""
    import queue

    q: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=1)
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def blocks() -> Iterable[tuple[int, np.ndarray]]:
        while (item := q.get()) is not None:
            yield item

    def writer() -> None:
        try:
            result.update(_write_base(path, num_rows, layout, fingerprint, blocks()))
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)
            while q.get() is not None:  # drain so the producer never blocks
                pass

    t = threading.Thread(target=writer, name="engram-ssd-init", daemon=True)
    t.start()
    try:

        def write(first: int, rows: torch.Tensor) -> None:
            z = torch.zeros_like(rows)
            q.put((first, layout.pack(rows, z, z, torch.zeros(rows.shape[0], dtype=torch.int64))))

        init(write)
    finally:
        q.put(None)
        t.join()
    if errors:
        raise errors[0]
    return result


def collect_garbage(directory: str | os.PathLike, keep: set[str]) -> list[str]:
    """Delete base/log files of a table directory that no kept manifest (or open table) names."""
    removed = []
    for p in Path(directory).iterdir():
        if re.fullmatch(r"(base-\d+\.(bin|crc)|log-\d+\.bin)", p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def manifest_files(manifest: Mapping[str, Any]) -> set[str]:
    b = manifest["base"]
    return {b["file"], b["crc_file"], *(g["file"] for g in manifest.get("logs", []))}


def link_table_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str]) -> int:
    """Make ``names`` (files of the table directory ``src``) appear in ``dst`` too: hard links (bases are
    immutable and a log is appended only by the session that created it, so sharing the inode is safe; a later
    delete in one directory leaves the other's name), a copy where the filesystem refuses a link. Existing names
    in ``dst`` are kept. Returns the bytes copied (0: all linked)."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for name in sorted(names):
        if (dst / name).exists():
            continue
        try:
            os.link(src / name, dst / name)
        except OSError:
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            fsync_path(tmp)
            os.replace(tmp, dst / name)
            copied += (dst / name).stat().st_size
    fsync_path(dst)
    return copied


@dataclass(frozen=True)
class TablePart:
    """One saved table holding the global rows ``[start, stop)`` of a layer (a rank's shard, or the whole)."""

    start: int
    stop: int
    directory: Path
    manifest: Mapping[str, Any]


def copy_records(
    parts: list[TablePart], start: int, stop: int, fingerprint: str, *, block_rows: int | None = None
) -> Iterable[tuple[int, np.ndarray]]:
    """Records (row + Adam m, v, count; the newest: base, then logs) of global rows ``[start, stop)`` from the
    saved tables ``parts`` (sorted, contiguous), as ``(first_row - start, records)`` blocks of ~8 MiB: what
    :meth:`TrainableTable.from_records` writes into a new base. Only the parts overlapping the range are opened
    (read-only, one at a time, with a one-record cache), so memory is one block plus a part's row index."""
    cover = [p for p in parts if p.start < stop and start < p.stop]
    if (
        not cover
        or cover[0].start > start
        or cover[-1].stop < stop
        or any(a.stop != b.start for a, b in itertools.pairwise(cover))
    ):
        raise CorruptFileError(f"the saved tables do not cover rows [{start}, {stop}) without gaps")
    return _copy_records(cover, start, stop, fingerprint, block_rows)


def _copy_records(
    cover: list[TablePart], start: int, stop: int, fingerprint: str, block_rows: int | None
) -> Iterable[tuple[int, np.ndarray]]:
    for p in cover:
        t = TrainableTable.open(p.directory, p.manifest, fingerprint, cache_bytes=1, writable=False)
        try:
            if t.num_rows != p.stop - p.start:
                raise CorruptFileError(f"{p.directory}: {t.num_rows} rows, its checkpoint gives it {p.stop - p.start}")
            per = block_rows or max(1, _IO_BLOCK // t.rec)
            a, b = max(start, p.start), min(stop, p.stop)
            for s in range(a, b, per):
                e = min(b, s + per)
                yield s - start, t.read_records(s - p.start, e - p.start)
        finally:
            t.close()


TABLES_FILE = "engram_tables.json"
TABLES_FORMAT = "engramlm-trainable-tables"


def tables_doc(manifests: Mapping[int, Mapping[str, Any]], dirs: Mapping[int, Path], doc_dir: Path) -> dict[str, Any]:
    """The JSON a checkpoint holds for its tables: per layer, the table directory (relative to ``doc_dir``,
    where the JSON is written) and the manifest of the exact state saved."""
    return {
        "format": TABLES_FORMAT,
        "version": MANIFEST_VERSION,
        "layers": {
            str(lid): {"dir": os.path.relpath(dirs[lid], doc_dir), "manifest": dict(manifests[lid])}
            for lid in sorted(manifests)
        },
    }


def read_tables_doc(path: str | os.PathLike) -> dict[int, tuple[Path, dict[str, Any]]]:
    """layer id -> (table directory, manifest) from a checkpoint's ``engram_tables.json``."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{p}: not a readable table manifest ({exc})") from exc
    if doc.get("format") != TABLES_FORMAT or doc.get("version") != MANIFEST_VERSION:
        raise CorruptFileError(f"{p}: not an engramlm trainable-tables file v{MANIFEST_VERSION}")
    return {int(k): ((p.parent / v["dir"]).resolve(), v["manifest"]) for k, v in doc["layers"].items()}


def open_tables(
    path: str | os.PathLike, fingerprint: str, *, cache_bytes: int = 64 << 20, writable: bool = False, **kwargs: Any
) -> dict[int, TrainableTable]:
    """Open every layer named by a checkpoint's ``engram_tables.json`` (read-only by default: an export or a
    server reads the rows without loading the table; ``cache_bytes`` is split by table size)."""
    entries = read_tables_doc(path)
    total = sum(int(m["num_rows"]) for _, m in entries.values()) or 1
    out: dict[int, TrainableTable] = {}
    try:
        for lid, (d, man) in sorted(entries.items()):
            share = max(1, cache_bytes * int(man["num_rows"]) // total)
            out[lid] = TrainableTable.open(d, man, fingerprint, cache_bytes=share, writable=writable, **kwargs)
    except BaseException:
        for t in out.values():
            t.close()
        raise
    return out


class RankedRows:
    """One table saved as consecutive row ranges, one :class:`TrainableTable` each (a run trained under torchrun
    with ``engram.table_tier=ssd``: each rank's shard), read as one table: a ``BlockSource`` for ``store build``
    and a ``gather`` for ``eval``. Read-only; ids are global."""

    def __init__(self, parts: list[TrainableTable]) -> None:
        self.parts = parts
        self.dim = int(parts[0].dim)
        self.starts = np.cumsum([0, *(int(p.num_rows) for p in parts)])
        self.num_rows = int(self.starts[-1])

    def read_block(self, start: int, stop: int) -> torch.Tensor:
        out = []
        for lo, p in zip(self.starts[:-1].tolist(), self.parts, strict=True):
            a, b = max(start, lo), min(stop, lo + p.num_rows)
            if a < b:
                out.append(p.read_block(a - lo, b - lo))
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def gather(self, row_ids: torch.Tensor) -> torch.Tensor:
        flat = row_ids.reshape(-1).long()
        part = torch.from_numpy(np.searchsorted(self.starts[1:], flat.numpy(), side="right"))
        out = torch.empty(flat.numel(), self.dim)
        for i, p in enumerate(self.parts):
            sel = (part == i).nonzero().flatten()
            if sel.numel():
                out[sel] = p.gather(flat[sel] - int(self.starts[i]))
        return out.reshape(*row_ids.shape, self.dim)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def checkpoint_table_docs(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The ``engram_tables.json`` files of a checkpoint trained with ``engram.table_tier=ssd``: one (a one-process
    run), one per rank in rank order (torchrun: ``trainer_state.json``'s ``shards.tables_files``), or none."""
    d = Path(ckpt_dir)
    if (d / TABLES_FILE).is_file():
        return [d / TABLES_FILE]
    try:
        state = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [d / rel for rel in (state.get("shards") or {}).get("tables_files", [])]


def checkpoint_table_parts(ckpt_dir: str | os.PathLike) -> dict[int, list[TablePart]]:
    """Layer id -> the saved tables of an SSD-trained checkpoint in row order, each with its global row range
    (one process: one part; torchrun: one per rank, consecutive): what a job of another world size reads its
    rows from. {} if the checkpoint has no SSD tables."""
    out: dict[int, list[TablePart]] = {}
    for doc in checkpoint_table_docs(ckpt_dir):
        for lid, (d, man) in sorted(read_tables_doc(doc).items()):
            parts = out.setdefault(lid, [])
            lo = parts[-1].stop if parts else 0
            parts.append(TablePart(lo, lo + int(man["num_rows"]), d, man))
    if len({len(p) for p in out.values()}) > 1:
        raise CorruptFileError(f"{ckpt_dir}: the ranks' table files name different Engram layers")
    return out


def open_checkpoint_tables(
    ckpt_dir: str | os.PathLike, fingerprint: str, *, cache_bytes: int = 64 << 20
) -> dict[int, TrainableTable | RankedRows]:
    """Read-only tables of an SSD-trained checkpoint (see :func:`checkpoint_table_docs`); {} if it has none."""
    docs = checkpoint_table_docs(ckpt_dir)
    if len(docs) <= 1:
        return open_tables(docs[0], fingerprint, cache_bytes=cache_bytes) if docs else {}
    opened: list[dict[int, TrainableTable]] = []
    try:
        for doc in docs:
            opened.append(open_tables(doc, fingerprint, cache_bytes=max(1, cache_bytes // len(docs))))
        lids = set(opened[0])
        if any(set(o) != lids for o in opened):
            raise CorruptFileError(f"{ckpt_dir}: the ranks' table files name different Engram layers")
    except BaseException:
        for o in opened:
            for t in o.values():
                t.close()
        raise
    return {lid: RankedRows([o[lid] for o in opened]) for lid in sorted(lids)}
