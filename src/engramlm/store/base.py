"""The one table interface every tier implements, plus the metrics spec §10.2 requires.

``RowTable.gather`` owns the shared work — id validation, batch deduplication, sorting into
table order, expansion back to request order — so a tier only implements
``_fetch_unique(sorted_unique_ids)`` and cannot get those parts wrong. Likewise the base holds
the :class:`TableHeader` (rows, width, fingerprint, row format), validated once, so no tier
re-implements or re-validates it.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from engramlm.store._dedup import unique_inverse
from engramlm.store.formats import RowFormat, get_format
from engramlm.utils import affinity

if TYPE_CHECKING:
    from engramlm.store import _aio

INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> the same-size integer dtype


def int_view(t: torch.Tensor) -> np.ndarray:
    """A same-size integer NumPy view of a contiguous tensor: the kernels copy rows bit for bit (bf16 too)."""
    return t.view(INT_VIEWS[t.element_size()]).numpy()


@dataclass
class StoreStats:
    """Counters of one table; thread-safe ``add`` because gathers may run concurrently."""

    requests: int = 0
    rows_total: int = 0
    rows_unique: int = 0
    bytes_read: int = 0
    bytes_used: int = 0
    hits: int = 0
    misses: int = 0
    time_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, type(getattr(self, f.name))(0))

    @property
    def unique_ratio(self) -> float:
        """Unique / total rows: how much batch deduplication saved."""
        return self.rows_unique / self.rows_total if self.rows_total else 0.0

    @property
    def amplification(self) -> float:
        """Bytes read / bytes used: 1.0 is ideal, page-granular disk reads make it larger."""
        return self.bytes_read / self.bytes_used if self.bytes_used else 0.0

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out.update(
            unique_ratio=self.unique_ratio,
            amplification=self.amplification,
            hit_rate=self.hit_rate,
        )
        return out


def check_fingerprint(fingerprint: str) -> str:
    """Fingerprints are opaque 64-hex strings; reject anything else early."""
    fp = str(fingerprint).lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"fingerprint must be 64 hex characters, got {fingerprint!r}")
    return fp


@dataclass(frozen=True)
class TableHeader:
    """What a table is, whatever its tier: [num_rows, dim] rows of ``row_format`` under ``fingerprint``."""

    num_rows: int
    dim: int
    fingerprint: str
    row_format: RowFormat
    row_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_rows, bool) or int(self.num_rows) != self.num_rows or self.num_rows < 0:
            raise ValueError(f"num_rows must be an int >= 0, got {self.num_rows!r}")
        if isinstance(self.dim, bool) or int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {self.dim!r}")
        object.__setattr__(self, "num_rows", int(self.num_rows))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "fingerprint", check_fingerprint(self.fingerprint))
        object.__setattr__(self, "row_format", get_format(self.row_format))
        object.__setattr__(self, "row_bytes", self.row_format.row_bytes(self.dim))


class PendingGather:
    """A gather started by :meth:`RowTable.start_gather`; ``result()`` completes it once and returns the rows.

    The base holds a finished result (or its exception); a tier's split phase subclasses it, overriding
    ``_finish`` (reap the reads, verify, expand; returns the number of unique ids) and ``_reap`` (wait for
    the reads in flight and release their buffers without using them). ``close`` (also run when it is
    garbage-collected) reaps a gather never completed, so no buffer is freed while the kernel writes it.
    """

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None
        self._exc: BaseException | None = None
        self._open = False  # reads in flight: _finish or _reap must run
        self._table: RowTable | None = None
        self._out: torch.Tensor | None = None
        self._n = 0
        self._start = 0.0
        self.after: Callable[[int], None] | None = None  # called with the unique ids once the rows are in

    @classmethod
    def ready(cls, rows: torch.Tensor) -> PendingGather:
        p = cls()
        p._rows = rows
        return p

    @classmethod
    def failed(cls, exc: BaseException) -> PendingGather:
        p = cls()
        p._exc = exc
        return p

    def bind(self, table: RowTable, out: torch.Tensor, n: int, start: float) -> None:
        """Called by ``start_gather`` on a split-phase gather: where its rows go and what to count."""
        self._table, self._out, self._n, self._start, self._open = table, out, n, start, True

    def _finish(self) -> int:  # pragma: no cover - overridden by every split-phase tier
        raise NotImplementedError

    def _reap(self) -> None:  # pragma: no cover - overridden by every split-phase tier
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        if self._open:
            self._open = False
            try:
                n_unique = self._finish()
            except BaseException as exc:
                self._exc = exc
            else:
                assert self._table is not None and self._out is not None
                self._table._count(self._n, n_unique, self._start)
                if self.after is not None:
                    self.after(n_unique)
                self._rows = self._out
        if self._exc is not None:
            raise self._exc
        assert self._rows is not None
        return self._rows

    def close(self) -> None:
        """Reap reads still in flight (their rows are dropped). Idempotent."""
        if self._open:
            self._open = False
            self._exc = RuntimeError("this gather was closed (its reads reaped) before its rows were taken")
            self._reap()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self.close()


class RowTable(ABC):
    """A read-only [num_rows, dim] table gathered by int64 offset-applied row ids.

    A tier passes its :class:`TableHeader` to ``__init__``; the properties below read it.
    """

    # Prefetch threads that suit this tier when the caller does not choose (``Prefetcher(workers=None)``):
    # two let one layer's read overlap another's; a tier whose client is itself multi-threaded may want one;
    # 0 (inline, no thread) suits a gather cheaper than the GIL hand-offs to and from a worker (the memory tier).
    prefetch_workers: int = 2

    def __init__(self, header: TableHeader) -> None:
        if not isinstance(header, TableHeader):
            raise TypeError(f"header must be a TableHeader, got {type(header).__name__}")
        self.table_header = header
        self.stats = StoreStats()
        self.io_cpus: frozenset[int] | None = None  # where this table's own reading threads run (None: anywhere)

    # The tier's own reading thread (an ``_aio.IoThread``: the direct tier's, a cache's), once started; None else.
    _io: _aio.IoThread | None = None

    @property
    def io_thread_ids(self) -> list[int]:
        """Native ids of the threads this table runs for its reads (a direct tier's I/O thread, a cache's); none
        for a tier that reads on the caller's thread or through a client's own threads."""
        tid = self._io.native_id if self._io is not None else None
        return [] if tid is None else [tid]

    def set_io_cpus(self, cpus: Iterable[int] | None) -> None:
        """Confine this table's reading threads (:attr:`io_thread_ids`, and those it starts later) to ``cpus``;
        None allows every CPU. :class:`~engramlm.infer.Engine` ``io_cpus`` sets it on every table it reads."""
        self.io_cpus = affinity.cpu_set(cpus, "io_cpus")
        self._apply_io_cpus()

    def _apply_io_cpus(self) -> None:
        """Move the tier's own thread to :attr:`io_cpus` (one not started yet takes them when it starts, under its
        lock, so a set changed meanwhile is never lost); a wrapper passes the set on in ``set_io_cpus``."""
        if self._io is not None:
            self._io.set_cpus(self.io_cpus)

    @property
    def num_rows(self) -> int:
        return self.table_header.num_rows

    @property
    def dim(self) -> int:
        return self.table_header.dim

    @property
    def fingerprint(self) -> str:
        return self.table_header.fingerprint

    @property
    def row_format(self) -> RowFormat:
        return self.table_header.row_format

    @property
    def row_bytes(self) -> int:
        return self.table_header.row_bytes

    @abstractmethod
    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [len(ids), dim] (any float dtype) for sorted, unique, in-range int64 ``ids``."""

    def close(self) -> None:  # noqa: B027 - optional hook, most tiers hold nothing
        """Release files and threads; the default tier holds none."""

    def __enter__(self) -> RowTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch_sorted_unique(self, ids: torch.Tensor) -> torch.Tensor:
        """``_fetch_unique`` for callers (e.g. a cache) that already deduplicated and sorted."""
        if ids.numel() == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        return self._fetch_unique(ids)

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        """Optional fused path: fill ``out`` (uint8 [n, dim * itemsize], the bytes of C-contiguous ``dtype`` rows)
        with the rows of int64 ids ``flat`` and return the number of unique ids, or None to take the generic
        dedupe -> ``_fetch_unique`` -> expand path.

        A tier that can do the whole gather in one GIL-free call (the direct tier's aio kernel, the cache in
        front of it) overrides this, on NumPy arrays (no torch op between the tier's Python and its kernel).
        It must raise :meth:`_out_of_range`'s error for ids outside the table."""
        return None

    def _count(self, n: int, n_unique: int, start: float) -> None:
        self.stats.add(
            requests=1,
            rows_total=n,
            rows_unique=n_unique,
            bytes_used=n_unique * self.row_bytes,
            time_s=time.perf_counter() - start,
        )

    def _out_of_range(self, lo: int, hi: int) -> IndexError:
        return IndexError(
            f"row ids out of range: min {lo}, max {hi}, table has {self.num_rows} rows "
            f"(valid ids are 0..{self.num_rows - 1})"
        )

    def _prepare(self, row_ids: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat int64 CPU ids, output tensor): the checks every gather makes first."""
        ids = row_ids if isinstance(row_ids, torch.Tensor) else torch.as_tensor(row_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"row ids must be an integer tensor, got {ids.dtype}")
        shape = (*ids.shape, self.dim)
        flat = ids.reshape(-1)
        if flat.dtype != torch.int64 or flat.device.type != "cpu":
            flat = flat.to("cpu", torch.int64)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif tuple(out.shape) not in (shape, (flat.numel(), self.dim)):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        return flat, out

    def _start_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> PendingGather | None:
        """Optional split phase: start reading the rows of int64 ids ``flat`` into ``out`` (as ``_gather_bytes``)
        and return at once with a :class:`PendingGather` whose ``result()`` completes it, or None where this
        tier has no split phase (the caller then gathers synchronously). ``out``, ``flat`` and every buffer the
        reads write must stay alive until the pending gather is completed or reaped (its ``result``/``close``)."""
        return None

    @property
    def split_phase(self) -> bool:
        """Whether :meth:`start_gather` can return before the rows are read (see ``_start_bytes``)."""
        return False

    def start_gather(self, row_ids: torch.Tensor, out: torch.Tensor | None = None) -> PendingGather:
        """:meth:`gather` in two halves on the calling thread, no worker: submit now, collect with ``result()``.

        A tier with a split phase (the direct tier's kernel AIO, a cache in front of it) dedupes, plans and
        submits its reads here and returns while the kernel reads; the others gather here, synchronously.
        Errors (ids out of range, I/O, CRC) are raised by ``result()``, with :meth:`gather`'s messages."""
        start = time.perf_counter()
        try:
            flat, out = self._prepare(row_ids, out)
            if flat.numel() and out.is_contiguous() and out.device.type == "cpu":
                flat_np = np.ascontiguousarray(flat.numpy())
                pending = self._start_bytes(flat_np, out.view(-1, self.dim).view(torch.uint8).numpy(), out.dtype)
                if pending is not None:
                    pending.bind(self, out, flat_np.size, start)
                    return pending
            return PendingGather.ready(self._gather_prepared(flat, out, start))
        except Exception as exc:  # delivered by result(), as the worker path delivers it by wait()
            return PendingGather.failed(exc)

    def gather(self, row_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows for ``row_ids`` (any shape) as ``[*row_ids.shape, dim]``, float32 or into ``out``.

        Ids are deduplicated and fetched once each in table order, then expanded back.
        """
        start = time.perf_counter()
        flat, out = self._prepare(row_ids, out)
        return self._gather_prepared(flat, out, start)

    def _gather_prepared(self, flat: torch.Tensor, out: torch.Tensor, start: float) -> torch.Tensor:
        if flat.numel() == 0:
            return out
        flat_np = np.ascontiguousarray(flat.numpy())
        out2d = out.view(-1, self.dim)
        contiguous = out.is_contiguous()
        n_unique = None
        if contiguous and out.device.type == "cpu":
            n_unique = self._gather_bytes(flat_np, out2d.view(torch.uint8).numpy(), out.dtype)
        if n_unique is None:
            unique_np, inverse_np = unique_inverse(flat_np)
            lo, hi = int(unique_np[0]), int(unique_np[-1])
            if lo < 0 or hi >= self.num_rows:
                raise self._out_of_range(lo, hi)
            rows = self._fetch_unique(torch.from_numpy(unique_np))
            inverse = torch.from_numpy(inverse_np)
            if rows.dtype == out.dtype and contiguous:
                torch.index_select(rows, 0, inverse, out=out2d)
            else:
                out2d.copy_(rows.index_select(0, inverse))
            n_unique = unique_np.size
        self._count(flat_np.size, n_unique, start)
        return out
