"""Deterministic prefetch: every Engram layer's rows start loading at forward entry (spec §10.2.2).

Row ids depend on token ids alone, so all layers' lookups can start before block 0 runs; layer
ℓ then waits only for its own rows, and the fetch hides behind the blocks that precede it.

* **CPU**: a fixed pool of ``workers`` threads fed by a *bounded* queue. ``start`` enqueues one
  job per layer (lowest layer id first, since it is needed first); when the queue is full,
  ``start`` blocks, so a producer that outruns the store is slowed down instead of piling up
  staging memory. A job's exception is stored and re-raised by ``wait`` for that layer.
* **CUDA** (when ``torch.cuda.is_available()`` and ``device`` is a CUDA device): the worker gathers
  into a *pinned* host staging buffer, then copies it to the device on a side stream and records
  an event; ``wait`` makes the consumer's current stream wait on that event (no host sync) and
  marks the device tensor as used by that stream so the caching allocator never recycles it early.
* Other devices: the worker gathers on the host and copies synchronously in its own thread.
* **Inline** (``workers=0``): no thread at all. ``start`` calls each table's
  :meth:`~engramlm.store.base.RowTable.start_gather` on the calling thread: a tier with a split phase
  (the direct tier's kernel AIO, a cache in front of it) dedupes, plans and submits its reads and
  returns while the kernel reads; any other tier gathers right there (the memory tier: tens of µs).
  ``wait`` completes the layer's gather (reap, verify, expand). Why: each hand-off to a worker thread
  costs the decode thread a GIL switch, 3-8 per step, which cost more than the memory tier's gathers
  themselves (issue 18). The tiers choose it (``RowTable.prefetch_workers = 0``) where the gather is
  cheap or split-phase.

Correctness never depends on timing: each job writes only its own fresh staging buffer, and
the tiers (including :class:`~engramlm.store.cache.CachedTable`) are safe under concurrent gathers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from engramlm.errors import ConfigError
from engramlm.store.base import PendingGather, RowTable

_STOP = object()


class _Inline:
    """One layer's gather started on the caller's thread: ``result()`` completes it, as ``Future.result``
    does for a worker's job, returning (rows on the prefetcher's device, host seconds spent on it)."""

    __slots__ = ("_device", "_done", "_pending", "_start_s")

    def __init__(self, pending: PendingGather, start_s: float, device: torch.device | None) -> None:
        self._pending, self._start_s, self._device, self._done = pending, start_s, device, False

    def done(self) -> bool:
        return self._done

    def result(self) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        try:
            rows = self._pending.result()
        finally:
            self._done = True
        if self._device is not None:  # pinned staging on CUDA: an async copy on the consumer's stream
            rows = rows.to(self._device, non_blocking=True)
        return rows, self._start_s + time.perf_counter() - t0

    def close(self) -> None:
        self._pending.close()


class PrefetchHandle(Mapping[int, torch.Tensor]):
    """The in-flight rows of one forward pass; ``handle[layer]`` blocks until that layer is ready.

    Dropping a handle (or calling :meth:`close`) whose inline gathers were never waited for reaps their reads."""

    def __init__(self, futures: dict[int, Any], events: dict[int, Any], owner: Prefetcher) -> None:
        self._futures = futures
        self._events = events
        self._owner = owner
        self._ready: dict[int, torch.Tensor] = {}
        self.wait_seconds: dict[int, float] = {}
        self.fetch_seconds: dict[int, float] = {}

    def __getitem__(self, layer_id: int) -> torch.Tensor:
        return self.wait(layer_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._futures)

    def __len__(self) -> int:
        return len(self._futures)

    def __contains__(self, layer_id: object) -> bool:
        return layer_id in self._futures

    def done(self, layer_id: int) -> bool:
        """Whether the host side of ``layer_id``'s fetch has finished (never blocks)."""
        return self._futures[self._key(layer_id)].done()

    def _key(self, layer_id: int) -> int:
        if layer_id not in self._futures:
            raise KeyError(f"layer {layer_id} was not prefetched; prefetched layers are {sorted(self._futures)}")
        return layer_id

    def wait(self, layer_id: int) -> torch.Tensor:
        """Rows ``[B, T, H_e, d_h]`` of ``layer_id`` on the prefetcher's device and dtype.

        Re-raises the fetch's exception. On CUDA the current stream waits on the copy's event,
        so the host returns immediately once the gather itself is done.
        """
        key = self._key(layer_id)
        if key in self._ready:
            return self._ready[key]
        t0 = time.perf_counter()
        rows, fetch_s = self._futures[key].result()
        event = self._events.get(key)
        if event is not None:
            stream = torch.cuda.current_stream(rows.device)
            stream.wait_event(event)
            rows.record_stream(stream)
        waited = time.perf_counter() - t0
        self.wait_seconds[key] = waited
        self.fetch_seconds[key] = fetch_s
        self._owner._record(key, waited, fetch_s)
        self._ready[key] = rows
        return rows

    def close(self) -> None:
        """Reap the inline gathers never waited for (their rows are dropped); worker jobs finish on their own."""
        for key, job in self._futures.items():
            if key not in self._ready and isinstance(job, _Inline):
                job.close()


class Prefetcher:
    """Asynchronous per-layer gathers from ``tables`` (layer id -> RowTable) into staging buffers."""

    def __init__(
        self,
        tables: Mapping[int, RowTable],
        *,
        workers: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        queue_size: int | None = None,
    ) -> None:
        if not tables:
            raise ConfigError("tables: need at least one layer's RowTable")
        if workers is None:  # the tiers' own choice (RowTable.prefetch_workers): inline (0) only if every tier
            choices = [int(t.prefetch_workers) for t in tables.values()]  # wants it, else the most cautious pool
            workers = min((c for c in choices if c > 0), default=0)
        if isinstance(workers, bool) or workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: inline, no thread), got {workers}")
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype}")
        self.tables = {int(k): v for k, v in tables.items()}
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {self.device} requested but CUDA is not available")
        self.dtype = dtype
        self.workers = workers
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # Room for a few forward passes' worth of jobs; beyond that, start() blocks (backpressure).
        self.queue_size = queue_size if queue_size is not None else max(2 * len(self.tables), workers, 1)
        if self.queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {self.queue_size}")
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._streams: dict[int, Any] = {}
        self._closed = False
        self._lock = threading.Lock()
        self.metrics: dict[int, dict[str, float]] = {
            k: {"waits": 0, "wait_s": 0.0, "fetch_s": 0.0, "max_wait_s": 0.0} for k in self.tables
        }
        self._threads = [
            threading.Thread(target=self._worker, name=f"engram-prefetch-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def thread_ids(self) -> list[int]:
        """Native ids of the worker threads (none inline), e.g. to pin them beside a tier's own threads."""
        return [t.native_id for t in self._threads if t.native_id is not None]

    # ---- worker side ---------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fut, fn = item
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # delivered to wait(), never lost
                    fut.set_exception(exc)
            finally:
                self._queue.task_done()

    def _side_stream(self) -> Any:
        """One side stream per worker thread, so two layers' copies can overlap."""
        tid = threading.get_ident()
        stream = self._streams.get(tid)
        if stream is None:
            stream = torch.cuda.Stream(device=self.device)
            self._streams[tid] = stream
        return stream

    def _job(self, table: RowTable, ids: torch.Tensor, event: Any) -> Callable[[], tuple[torch.Tensor, float]]:
        shape = (*ids.shape, table.dim)

        def run() -> tuple[torch.Tensor, float]:
            t0 = time.perf_counter()
            staging = torch.empty(shape, dtype=self.dtype, pin_memory=self._cuda)
            table.gather(ids, out=staging)
            if self._cuda:
                stream = self._side_stream()
                with torch.cuda.stream(stream):
                    rows = torch.empty(shape, dtype=self.dtype, device=self.device)
                    rows.copy_(staging, non_blocking=True)  # pinned source: a true async H2D copy
                    event.record(stream)
            elif self.device.type != "cpu":
                rows = staging.to(self.device)
            else:
                rows = staging
            return rows, time.perf_counter() - t0

        return run

    # ---- consumer side -------------------------------------------------------------------
    def start(self, row_ids: Mapping[int, torch.Tensor]) -> PrefetchHandle:
        """Queue one gather per layer (ids ``[B, T, H_e]``, any integer dtype/device); returns at once
        unless the queue is full. Ids are moved to the host here, before any worker sees them."""
        if self._closed:
            raise RuntimeError("Prefetcher is closed")
        unknown = sorted(set(row_ids) - set(self.tables))
        if unknown:
            raise KeyError(f"no table for layer(s) {unknown}; tables exist for layers {sorted(self.tables)}")
        futures: dict[int, Any] = {}
        events: dict[int, Any] = {}
        for layer in sorted(row_ids):
            ids = torch.as_tensor(row_ids[layer])
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"layer {layer}: row ids must be an integer tensor, got {ids.dtype}")
            if not self.workers:  # inline: the ids are read (or copied by the tier) before start returns
                futures[layer] = self._start_inline(self.tables[layer], ids)
                continue
            ids = ids.detach().to("cpu", torch.int64, copy=True)  # a snapshot: the caller may reuse its tensor
            event = torch.cuda.Event() if self._cuda else None
            fut: Future = Future()
            self._queue.put((fut, self._job(self.tables[layer], ids, event)))
            futures[layer] = fut
            if event is not None:
                events[layer] = event
        return PrefetchHandle(futures, events, self)

    def _start_inline(self, table: RowTable, ids: torch.Tensor) -> _Inline:
        """Start one layer's gather on this thread (see the module docstring, **Inline**)."""
        t0 = time.perf_counter()
        ids = ids.detach()
        if ids.device.type != "cpu" or ids.dtype != torch.int64:
            ids = ids.to("cpu", torch.int64)
        staging = torch.empty((*ids.shape, table.dim), dtype=self.dtype, pin_memory=self._cuda)
        pending = table.start_gather(ids, out=staging)  # the tier snapshots what it keeps of ids
        device = None if self.device.type == "cpu" else self.device
        return _Inline(pending, time.perf_counter() - t0, device)

    def fetch(self, row_ids: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Synchronous convenience: start and wait for every layer."""
        handle = self.start(row_ids)
        return {k: handle.wait(k) for k in handle}

    def _record(self, layer: int, waited: float, fetch_s: float) -> None:
        with self._lock:
            m = self.metrics[layer]
            m["waits"] += 1
            m["wait_s"] += waited
            m["fetch_s"] += fetch_s
            m["max_wait_s"] = max(m["max_wait_s"], waited)

    def reset_metrics(self) -> None:
        with self._lock:
            for m in self.metrics.values():
                m.update(waits=0, wait_s=0.0, fetch_s=0.0, max_wait_s=0.0)

    def close(self) -> None:
        """Finish queued jobs, stop the workers. Idempotent; the tables stay open (caller owns them)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
