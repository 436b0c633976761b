"""Mooncake reads in a process of their own, so the decode thread never trades the GIL for them (issue 18).

In one process, a pool read runs on a prefetch thread: it takes the GIL to plan, gives it up inside the store's
call, and takes it back to finish, and each time it waits for the decode thread to let go (an op boundary), then
the decode thread waits for it. Measured with tables in RAM, that hand-off alone costs 2-3% of decode
(``bench_generate``'s ``memory_w2`` against ``memory``), about half of what the Mooncake tier cost in all.

:class:`ReaderProcess` moves the reading to a child process with its own Mooncake client and its own GIL. The
parent and the child share one memory region of ``slots`` fixed-size slots, registered with the child's client,
so the transfer engine writes rows straight into memory the parent reads. A gather:

1. the parent dedupes its ids (:class:`~engramlm.store.mooncake.MooncakeTable` ``_start_bytes``), writes the
   sorted unique ids into a free slot and sends a 20-byte request down a pipe;
2. the child plans the byte ranges and makes the store's one batch read into that slot's rows;
3. the child answers down the other pipe, and the parent, when the layer needs its rows, reads the answer and
   expands the slot's unique rows into the caller's tensor.

The child only reads, so its transfers use the transfer engine's legacy TCP framing (``MC_TCP_PROTO=1``, set in
its environment unless the caller set it): no status frame per request, which saves a quarter of a 64-row read
(2.05 against 2.76 ms here). That framing lets a *write* complete before it lands, which is why this process,
which uploads, keeps the default; a read completes only when its bytes are in the slot either way.

The pipes order everything (a pipe's write and read are a barrier on every architecture), so the flags live in
the answers, not in the shared memory. A child that dies is seen as the end of its pipe, and named in the error
with its log's last lines; a child's error (a failed read, a refused fingerprint) comes back as its exception's
type and message. The child exits when the parent closes the request pipe, or dies with it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engramlm import errors
from engramlm.errors import ConfigError, EngramError

_REQ = struct.Struct("<IIIq")  # op, slot, table, count (ids to read, or the bytes of an OPEN's JSON that follow)
_REP = struct.Struct("<IiI")  # slot, status (0: ok), bytes of the error message that follow
_OPEN, _READ = 1, 2
_READY = 0xFFFFFFFF  # the slot of the child's first answer
_ALIGN = 64
START_TIMEOUT_S = 120.0  # the child imports torch and numba before it connects: seconds on a cold CI machine
READ_TIMEOUT_S = 60.0


def _rows_offset(n: int) -> int:
    """Where a slot's rows start: after its ``n`` int64 ids, 64-byte aligned."""
    return -(-(8 * n) // _ALIGN) * _ALIGN


def slot_capacity(slot_bytes: int, row_bytes: int) -> int:
    """How many unique ids of ``row_bytes`` rows one slot holds (ids and rows)."""
    n = slot_bytes // (8 + row_bytes)
    while n > 0 and _rows_offset(n) + n * row_bytes > slot_bytes:
        n -= 1
    return n


def _read_exact(fd: int, n: int) -> bytes:
    """``n`` bytes from a pipe, or fewer only at its end (the other side closed or died)."""
    data = os.read(fd, n)
    while data and len(data) < n:
        more = os.read(fd, n - len(data))
        if not more:
            break
        data += more
    return data


class ReaderProcess:
    """A child process reading a Mooncake pool into shared slots; see the module docstring.

    ``master``: the pool's :class:`~engramlm.store.mooncake.MasterAddress`. ``slots`` gathers can be in flight
    at once (a forward starts one per Engram layer; a prefill's gather takes a slot per ``slot_bytes`` of ids and
    rows; one that finds too few free is read synchronously, through one slot in turns). ``segment_bytes``:
    memory the child lends the pool. On one host, lend it there rather than from this process: rows in the
    reader's own segment are read without a second process's transport threads taking part (64-row gathers:
    2.7 ms against 4.5-5 ms from another process's segment). ``buffer_bytes``: the child client's local transfer
    buffer. ``legacy_framing``: the child's transfers without a status frame per request (see the module
    docstring). Thread-safe; one thread at a time collects answers.
    """

    def __init__(
        self,
        master: Any,
        *,
        slots: int = 32,
        slot_bytes: int = 1 << 20,
        segment_bytes: int = 0,
        buffer_bytes: int = 16 << 20,
        legacy_framing: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"slots must be an integer >= 1, got {slots!r}")
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 4096:
            raise ConfigError(f"slot_bytes must be an integer >= 4096, got {slot_bytes!r}")
        for name, value in (("segment_bytes", segment_bytes), ("buffer_bytes", buffer_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        self.master = master
        self.slots = slots
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.read_timeout_s = float(read_timeout_s)
        self._lock = threading.Lock()  # slots, the request pipe, and reading answers
        self._free = list(range(slots - 1, -1, -1))
        self._inflight: set[int] = set()  # slots whose request was sent and whose answer was not read yet
        self._done: dict[int, tuple[int, str]] = {}  # slot -> (status, message) answered, not yet collected
        self._tables = 0
        self._closed = False
        self._log = tempfile.NamedTemporaryFile(prefix="engramlm-mooncake-reader-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        size = self.slots * self.slot_bytes
        shm = _shared_file(size)
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        try:
            self._mm = mmap.mmap(shm, size)
            self.buffer = np.frombuffer(self._mm, dtype=np.uint8)
            fds = (req_r, rep_w, shm)
            argv = [*map(str, (*fds, self.slots, self.slot_bytes)), master.rpc, master.metadata]
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, *argv, str(segment_bytes), str(buffer_bytes)],
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                env=_child_env(legacy_framing),
            )  # fmt: skip
        finally:
            os.close(req_r)
            os.close(rep_w)
            os.close(shm)
        self._poll = select.poll()
        self._poll.register(self._rep_r, select.POLLIN)
        try:
            status, message = self._answer(_READY, start_timeout_s)
            if status:
                raise _error(message, f"the Mooncake reader process could not start: {message}")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def thread_ids(self) -> list[int]:
        """The child's threads (its reading thread and its client's), e.g. to pin them; none off Linux."""
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self._proc.pid}/task"))
        except OSError:
            return []

    # ---- requests --------------------------------------------------------------------------------
    def open_table(self, layer_id: int, head_sizes: Sequence[int], dim: int, fingerprint: str) -> int:
        """Open one layer's table in the child (its fingerprint checked there too); returns its handle."""
        payload = json.dumps(
            {"layer_id": int(layer_id), "head_sizes": [int(h) for h in head_sizes], "dim": int(dim), "fp": fingerprint}
        ).encode()
        with self._lock:
            self._check_open()
            table = self._tables
            self._tables += 1
            slot = self._take()
            self._request(slot, _REQ.pack(_OPEN, slot, table, len(payload)) + payload)
        try:
            self.wait(slot)
        finally:
            self.release(slot)
        return table

    def submit(self, table: int, unique: np.ndarray, row_bytes: int) -> int:
        """Start reading the rows of sorted, unique, in-range int64 ids ``unique`` (at most
        :func:`slot_capacity` of them) into a free slot; returns the slot, for :meth:`wait` and :meth:`rows`."""
        slots = self.submit_parts(table, unique, row_bytes, max(int(unique.size), 1), strict=True)
        assert slots is not None
        return slots[0]

    def submit_parts(
        self, table: int, unique: np.ndarray, row_bytes: int, per_slot: int, *, strict: bool = False
    ) -> list[int] | None:
        """Start reading ``unique`` in parts of ``per_slot`` ids, one slot each (part ``k``: ids
        ``unique[k * per_slot:][:per_slot]``); returns the slots in order. When fewer slots are free than parts,
        nothing is sent: None, or with ``strict`` the error that names the slots."""
        if _rows_offset(per_slot) + per_slot * row_bytes > self.slot_bytes:
            raise ValueError(f"{per_slot} rows of {row_bytes} bytes do not fit a slot of {self.slot_bytes} bytes")
        parts = max(-(-int(unique.size) // per_slot), 1)
        sent: list[int] = []
        error: BaseException | None = None
        with self._lock:
            self._check_open()
            if len(self._free) < parts and not strict:
                return None
            for k in range(parts):
                try:
                    slot = self._take()
                except EngramError as exc:
                    error = exc
                    break
                part = unique[k * per_slot : (k + 1) * per_slot]
                try:
                    self._request(slot, _REQ.pack(_READ, slot, table, part.size), ids=part)
                except BaseException as exc:
                    error = exc
                    break
                sent.append(slot)
        if error is not None:
            self.release(*sent)  # the parts already sent: their slots come back once the child is done with them
            raise error
        return sent

    def rows(self, slot: int, n: int, dim: int) -> np.ndarray:
        """The float32 rows ``[n, dim]`` a completed read left in ``slot`` (a view: valid until released)."""
        start = slot * self.slot_bytes + _rows_offset(n)
        return self.buffer[start : start + 4 * n * dim].view(np.float32).reshape(n, dim)

    def wait(self, slot: int) -> None:
        """Block until the child has answered ``slot``'s request; raise its error, if it sent one. Returns at once
        for a slot whose answer was already taken."""
        with self._lock:
            while slot in self._inflight:
                got, status, message = self._next_answer(self.read_timeout_s)
                self._inflight.discard(got)
                self._done[got] = (status, message)
            status, message = self._done.pop(slot, (0, ""))
        if status:
            raise _error(message, f"Mooncake reader process: {message}")

    def release(self, *slots: int) -> None:
        """Give ``slots`` back, each once the child is done writing it (an answer not yet taken is waited for and
        dropped, its error too); their rows views are then invalid."""
        for slot in slots:
            try:
                self.wait(slot)
            except EngramError:
                pass  # a failed read, or a child that died or was stopped: nothing writes the slot any more
            with self._lock:
                self._free.append(slot)

    # ---- plumbing --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EngramError("the Mooncake reader process is closed")

    def _take(self) -> int:
        if not self._free:
            raise EngramError(
                f"all {self.slots} slots of the Mooncake reader process are in use: collect or close earlier "
                "gathers first (PendingGather.result / close), or open the reader with more slots"
            )
        return self._free.pop()

    def _request(self, slot: int, data: bytes, ids: np.ndarray | None = None) -> None:
        """Write ``ids`` into ``slot``, send its request (lock held) and count it in flight; the slot is freed again
        if that fails."""
        try:
            if ids is not None:
                base = slot * self.slot_bytes
                self.buffer[base : base + 8 * ids.size].view(np.int64)[:] = ids
            self._send(data)
        except BaseException:
            self._free.append(slot)
            raise
        self._inflight.add(slot)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:  # one write for a read's request (< PIPE_BUF); an OPEN's JSON may take more
                view = view[os.write(self._req_w, view) :]
        except BrokenPipeError:
            raise self._died() from None

    def _answer(self, slot: int, timeout_s: float) -> tuple[int, str]:
        got, status, message = self._next_answer(timeout_s)
        if got != slot:
            raise EngramError(f"Mooncake reader process answered slot {got} where {slot} was due")
        return status, message

    def _next_answer(self, timeout_s: float) -> tuple[int, int, str]:
        if self._closed and self._req_w < 0:
            raise EngramError("the Mooncake reader process is closed")
        if not self._poll.poll(int(timeout_s * 1000)):
            self._proc.kill()  # it may still write a slot: it is not used again
            self._closed = True
            raise EngramError(
                f"the Mooncake reader process (pid {self._proc.pid}) did not answer within {timeout_s:g} s and was "
                f"stopped; its log: {self.log_path}"
            )
        head = _read_exact(self._rep_r, _REP.size)
        if len(head) < _REP.size:
            raise self._died()
        slot, status, length = _REP.unpack(head)
        message = _read_exact(self._rep_r, length).decode(errors="replace") if length else ""
        return slot, status, message

    def _died(self) -> EngramError:
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._closed = True
        tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        return EngramError(f"the Mooncake reader process exited (code {code}); log {self.log_path}:\n{tail}")

    def close(self) -> None:
        """End the child (it closes its client) and free the shared region. Idempotent."""
        with self._lock:
            if getattr(self, "_req_w", -1) < 0:
                return
            self._closed = True
            os.close(self._req_w)
            self._req_w = -1
        proc = getattr(self, "_proc", None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(self._rep_r)
        self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        # The region stays mapped while a NumPy view may still point into it; it is freed with the object.

    def __enter__(self) -> ReaderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _error(message: str, fallback: str) -> EngramError:
    """The child's ``Type: text`` as that engramlm error type (a refused fingerprint stays a HashSpecMismatch)."""
    name, _, text = message.partition(": ")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, EngramError):
        return cls(text)
    return EngramError(fallback)


def _shared_file(size: int) -> int:
    """An fd of ``size`` zeroed bytes of shared memory with no name left behind (memfd, else an unlinked file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("engramlm-mooncake-slots", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        fd, path = tempfile.mkstemp(prefix="engramlm-mooncake-slots-")
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def _child_env(legacy_framing: bool) -> dict[str, str]:
    """The parent's environment, with engramlm importable even when run from a source tree, one torch thread, and
    the transfer engine's legacy TCP framing for the child's own transfers unless told otherwise (see the module
    docstring)."""
    env = dict(os.environ)
    if legacy_framing:
        env.setdefault("MC_TCP_PROTO", "1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- the child -------------------------------------------------------------------------------------
def _serve(
    req: int, rep: int, shm: int, slots: int, slot_bytes: int, master: Any, segment_bytes: int, buffer_bytes: int
) -> int:
    """The child's loop: answer READY (or why not), then each request in order, until the request pipe ends."""
    from engramlm.store.mooncake import MooncakeTable, connect

    def answer(slot: int, exc: BaseException | None = None) -> None:
        message = f"{type(exc).__name__}: {exc}".encode() if exc is not None else b""
        os.write(rep, _REP.pack(slot, 1 if exc is not None else 0, len(message)) + message)

    size = slots * slot_bytes
    try:
        region = mmap.mmap(shm, size)
        buffer = np.frombuffer(region, dtype=np.uint8)
        client = connect(master, segment_bytes, buffer_bytes)
        if client.register_buffer(buffer.ctypes.data, size) != 0:
            raise EngramError(f"cannot register the {size}-byte shared region with the Mooncake client")
    except BaseException as exc:
        answer(_READY, exc)
        return 1
    answer(_READY)
    tables: dict[int, MooncakeTable] = {}
    try:
        while True:
            head = _read_exact(req, _REQ.size)
            if len(head) < _REQ.size:
                return 0  # the parent closed the pipe, or died
            op, slot, table, count = _REQ.unpack(head)
            try:
                if op == _OPEN:
                    spec = json.loads(_read_exact(req, count))
                    tables[table] = MooncakeTable(client, spec["layer_id"], spec["head_sizes"], spec["dim"], spec["fp"])
                else:
                    t = tables[table]
                    base = slot * slot_bytes
                    unique = buffer[base : base + 8 * count].view(np.int64)
                    rows = buffer[base + _rows_offset(count) :][: 4 * count * t.dim].view(np.float32)
                    t._read_unique(unique, rows.reshape(count, t.dim))
            except Exception as exc:  # answered, never fatal: the next read may succeed
                answer(slot, exc)
            else:
                answer(slot)
    finally:
        for t in tables.values():
            with contextlib.suppress(Exception):
                t.close()
        with contextlib.suppress(Exception):
            client.close()


if __name__ == "__main__":
    from engramlm.store.mooncake import MasterAddress

    _fds, (_rpc, _meta), _sizes = sys.argv[1:6], sys.argv[6:8], sys.argv[8:10]
    sys.exit(_serve(*map(int, _fds), MasterAddress(_rpc, _meta), *map(int, _sizes)))  # type: ignore[arg-type]
