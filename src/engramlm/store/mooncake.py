"""Remote tier on Mooncake Store's ``EngramStore`` (landscape §2 row 6).

Mooncake keeps one object per (layer, head): the head's rows, float32, back to back (``EngramStore``
populates them). A gather reads exactly its rows: sorted unique ids are split by head (contiguous
after sorting) and every row becomes one byte range of its head's object, fetched by ONE call (which
releases the GIL) into a per-thread buffer registered with the client, so the transfer engine writes
the rows in place. Read modes:

* ``batch`` (default): the store's batch get-into API. ``batch_get_session_start`` asks the master for
  the heads' replicas once (renewed every ``SESSION_RENEW_S``, and at once when a read reports an
  expired lease); each gather is then one ``batch_get_into_multi_buffer_ranges`` with no master RPC.
* ``ranges``: one ``get_into_ranges`` per gather, which queries the master once per head and once
  more for the leases (9 RPCs for 8 heads) before every transfer.
* ``lookup``: the per-lookup path both replaced, ``EngramStore.lookup`` on a [n, 1, H] id grid (GIL
  held, 175-384x an ``index_select``); also the fallback when a buffer cannot be registered.

The client's wait for a transfer polls every 10 us; each wake-up takes a core from the decode thread
on a small machine, so reads run with a coarser timer slack (``WAIT_SLACK_US``; Linux only), which
lets the kernel batch those wake-ups. A gather is fused (``gather``/``_gather_bytes``): NumPy views of the
ids and rows, one Numba call to dedupe and plan each row's source offset and destination, the one call, one
Numba call expanding the registered buffer into the caller's rows; nothing but the store's call releases the
GIL, since every release is a point where the decode thread takes it and the reading thread then waits for it
back. ~33 us of Python per decode-sized gather against ~65 us before (issue 18); what remains is the
transport's ~30 us of CPU per row, one TCP request-response each (see docs/architecture.md). The hash-spec
fingerprint is stored under its own key so a mismatched table is refused. The ``mooncake`` package (PyPI
``mooncake-transfer-engine-non-cuda``) is imported lazily.

``local_master`` starts a private ``mooncake_master`` on 127.0.0.1 and ``connect`` sets up a client
of any master: the tests, the benchmarks and the CLI share these rather than each spelling them out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numba as nb
import numpy as np
import torch

from engramlm.errors import ConfigError, EngramError, HashSpecMismatch, MissingFingerprint
from engramlm.store._dedup import unique_inverse_kernel
from engramlm.store.base import PendingGather, RowTable, TableHeader, check_fingerprint
from engramlm.store.formats import FP32
from engramlm.store.mooncake_reader import ReaderProcess, slot_capacity
from engramlm.utils import affinity

READ_MODES = ("batch", "ranges", "lookup")
SESSION_RENEW_S = 1.0  # re-query the replicas (and their leases) at least this often
WAIT_SLACK_US = 200  # timer slack of a reading thread: batches the client's 10 us polls
_MISSING = "install the `store` extra (pip install 'engramlm[store]') and Debian's libibverbs1"


@dataclass(frozen=True)
class MasterAddress:
    """What a client needs to reach a master: its RPC address and its HTTP metadata URL."""

    rpc: str
    metadata: str


def master_binary() -> Path:
    """The ``mooncake_master`` shipped in the ``mooncake`` package, else the one on PATH."""
    try:
        import mooncake

        shipped = Path(mooncake.__file__).parent / "mooncake_master"
        if shipped.exists():
            return shipped
    except ImportError:
        pass
    found = shutil.which("mooncake_master")
    if found is None:
        raise EngramError(f"mooncake_master not found (neither in the mooncake package nor on PATH): {_MISSING}")
    return Path(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise EngramError(f"mooncake_master exited with {proc.returncode} ({_MISSING}?); log {log}:\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise EngramError(f"mooncake_master did not open 127.0.0.1:{port} in time; log {log}")
        time.sleep(0.1)


@contextlib.contextmanager
def local_master(log_path: str | Path, timeout: float = 20.0) -> Iterator[MasterAddress]:
    """Run a private ``mooncake_master`` bound to 127.0.0.1 on free ports until the block exits.

    Its output goes to ``log_path``; the master is terminated (killed if it lingers) on exit.
    """
    binary = master_binary()
    rpc, http, metrics = _free_port(), _free_port(), _free_port()
    log_path = Path(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), f"-rpc_port={rpc}", "-rpc_address=127.0.0.1",
             "-enable_http_metadata_server=true", f"-http_metadata_server_port={http}",
             "-http_metadata_server_host=127.0.0.1", f"-metrics_port={metrics}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            for port in (rpc, http):
                _wait_port(port, proc, deadline, log_path)
            yield MasterAddress(f"127.0.0.1:{rpc}", f"http://127.0.0.1:{http}/metadata")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


CONNECT_TIMEOUT_S = 3.0


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an RPC address or an ``http://host:port/...`` URL; None when there is none."""
    netloc = urllib.parse.urlsplit(address).netloc if "://" in address else address
    host, sep, port = netloc.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(master: MasterAddress, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, naming the address, when the master's RPC port or its metadata server refuses TCP.

    The Mooncake client itself retries for about 90 s, logging each attempt, before it gives up.
    """
    for what, address in (("master", master.rpc), ("metadata server", master.metadata)):
        hp = _host_port(address)
        if hp is None:
            if what == "master":
                raise EngramError(f"{address!r} is not a host:port address")
            continue  # e.g. P2PHANDSHAKE: no server of its own to check
        try:
            with socket.create_connection(hp, timeout=timeout):
                pass
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise EngramError(
                f"no Mooncake {what} at {address} ({reason} within {timeout:g} s); start mooncake_master there "
                "or pass its address"
            ) from None


@contextlib.contextmanager
def _client_log() -> Iterator[IO[bytes] | None]:
    """Quiet the Mooncake client while it sets up: its glog level to ERROR (``MC_LOG_LEVEL``) and the
    fd-2 lines of setup (glog's "before InitGoogleLogging" banner, a benign metadata 404) into a temp
    file, yielded so a failed setup can quote it. A user who sets ``MC_LOG_LEVEL`` sees everything."""
    if "MC_LOG_LEVEL" in os.environ:
        yield None
        return
    os.environ["MC_LOG_LEVEL"] = "ERROR"  # read at setup; unset after, so no child process inherits it
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.environ.pop("MC_LOG_LEVEL", None)


_TRANSPORT_THREADS: dict[int, tuple[Any, dict[int, int]]] = {}  # id(client) -> (client, {tid: start time})


def _thread_starts() -> dict[int, int]:
    """This process's threads: native id -> start time (clock ticks since boot), which tells a thread apart
    from a later one that reuses its id. Empty where there is no /proc (not Linux)."""
    starts = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return starts
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                starts[int(tid)] = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22: starttime
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return starts


def transport_threads(client: Any) -> list[int]:
    """Native ids of the threads ``client`` started at setup that still run. Some exit soon after setup
    (seen on CI: 1 of 26), and their ids may be reused by unrelated threads, which must not be reniced or
    pinned, so each is matched by its start time as well as its id."""
    _, started = _TRANSPORT_THREADS.get(id(client), (None, {}))
    now = _thread_starts()
    return sorted(tid for tid, start in started.items() if now.get(tid) == start)


def set_transport_nice(client: Any, nice: int) -> int:
    """Set the scheduling niceness of the threads ``client`` started at setup (its transfer engine's TCP
    workers, RPC and metadata threads); returns how many. Linux only (elsewhere 0).

    Why: on a small machine those threads wake per row and preempt the decode thread; a positive
    ``nice`` lets the decode thread keep its core. Measured in ``bench_generate --mooncake-nice`` on 2
    cores it does not pay: the decode thread waited less for a CPU but layer 1's rows came late (rows
    wait 1.1% -> 5.0% of decode at nice 10), so ``connect`` leaves it at 0. Lowering it again needs
    ``CAP_SYS_NICE``.
    """
    return _each_thread(
        transport_threads(client),
        lambda tid: os.setpriority(os.PRIO_PROCESS, tid, int(nice)),
        PermissionError,
        f"cannot set the Mooncake client's threads to nice {nice}",
    )


def _each_thread(tids: Iterable[int], apply: Callable[[int], object], errors: type[OSError], failure: str) -> int:
    """``apply(tid)`` to each thread, skipping threads that have exited; ``errors`` become one EngramError
    (``failure: why``). Returns how many threads it was applied to."""
    done = 0
    for tid in tids:
        try:
            apply(tid)
            done += 1
        except ProcessLookupError:
            continue  # a thread that has exited
        except errors as exc:
            raise EngramError(f"{failure}: {exc}") from None
    return done


def set_transport_affinity(client: Any, cpus: Iterable[int] | None, extra_threads: Iterable[int] = ()) -> int:
    """Pin the threads ``client`` started at setup (its transfer engine's TCP worker, which runs both ends of
    every loopback transfer, and its RPC and metadata threads), plus ``extra_threads`` (native ids, e.g. the
    prefetch thread that calls the store: ``Prefetcher.thread_ids``), to ``cpus``; None allows every CPU
    again. Returns how many threads were set. Linux only (elsewhere 0).

    Why: a decode-sized gather costs the client ~1.9 ms of TCP work per 64 rows (one request-response per
    row, ~30 us each on this VM) and its caller ~0.4 ms; woken beside the decode thread, they preempt it.
    Confined to a core of their own, with the decode thread kept off it, they no longer do; measured in
    ``bench_generate --mooncake-pin`` on 2 cores it does not pay (+5.8% / +8.4% of decode time against +5.4% /
    +6.1% unpinned, two runs): layer 1's rows came later (rows wait 1.1% / 2.1% of decode against 1.0% / 1.6%),
    the prefetch thread sharing one core with the TCP thread. So nothing pins by default; a machine with cores
    to spare may differ.
    """
    if not affinity.supported():
        return 0
    allowed = affinity.cpu_set(cpus, "transport cpus") or affinity.every_cpu()
    return _each_thread(
        [*transport_threads(client), *extra_threads],
        lambda tid: os.sched_setaffinity(tid, allowed),
        OSError,
        f"cannot pin the Mooncake client's threads to CPUs {sorted(allowed)}",
    )


def connect(master: MasterAddress, segment_bytes: int, buffer_bytes: int = 64 << 20, *, transport_nice: int = 0) -> Any:
    """A ``MooncakeDistributedStore`` of ``master`` (TCP) lending ``segment_bytes`` to the pool.

    The master is checked to be reachable first (:func:`check_reachable`: the client itself retries
    for about 90 s), and the client's log is kept off the terminal (:func:`_client_log`). The threads
    the client starts are remembered for :func:`set_transport_nice` (applied here when ``transport_nice``).
    """
    check_reachable(master)
    from mooncake.store import MooncakeDistributedStore

    with _client_log() as log:
        client = MooncakeDistributedStore()
        before = _thread_starts()
        rc = client.setup("127.0.0.1", master.metadata, int(segment_bytes), int(buffer_bytes), "tcp", "", master.rpc)
        after = _thread_starts()
        _TRANSPORT_THREADS[id(client)] = (client, {t: s for t, s in after.items() if before.get(t) != s})
        said = ""
        if rc != 0 and log is not None:
            log.seek(0)
            errors = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.startswith(("E", "F"))]
            said = f"; the client said: {errors[-1].split('] ', 1)[-1]}" if errors else ""
    if rc != 0:
        _TRANSPORT_THREADS.pop(id(client), None)
        raise EngramError(f"cannot set up a Mooncake client of {master.rpc} (setup returned {rc}){said}")
    if transport_nice:
        set_transport_nice(client, transport_nice)
    return client


_BUFFERS: dict[int, tuple[Any, threading.local, list[np.ndarray]]] = {}
_BUFFERS_LOCK = threading.Lock()


def _registered_buffer(store: Any, floats: int) -> np.ndarray | None:
    """This thread's float32 buffer of at least ``floats`` registered with ``store``; None if registration fails.

    One per (client, thread), shared by its tables. Buffers are never unregistered nor freed: unregistering
    after the client was closed crashes the process, and freed memory still registered would overlap the next
    registration (the transfer engine refuses overlaps). Growth doubles, so what is kept is < 2x the peak.
    """
    with _BUFFERS_LOCK:
        entry = _BUFFERS.get(id(store))
        if entry is None:  # the entry holds the client, so its id is never reused while listed
            entry = _BUFFERS[id(store)] = (store, threading.local(), [])
    _, local, kept = entry
    buf = getattr(local, "buf", None)
    if buf is not None and buf.size >= floats:
        return buf
    new = np.zeros(max(floats, 1 << 16, 2 * (0 if buf is None else buf.size)), dtype=np.float32)
    if store.register_buffer(new.ctypes.data, new.nbytes) != 0:
        return None
    with _BUFFERS_LOCK:
        kept.append(new)
    local.buf = new
    return new


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
_PRCTL: Any = None


def _prctl() -> Any:
    """libc's ``prctl`` (Linux), else False; looked up once. Called with the GIL held (``PyDLL``): a ctypes
    call that released it would be one more point where the decode thread and the reading thread trade it."""
    global _PRCTL
    if _PRCTL is None:
        _PRCTL = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.PyDLL(None, use_errno=True).prctl
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
                _PRCTL = fn
            except (OSError, AttributeError):
                pass
    return _PRCTL


@contextlib.contextmanager
def wait_slack(microseconds: int = WAIT_SLACK_US) -> Iterator[None]:
    """This thread's timer slack raised to ``microseconds`` for the block (no-op off Linux).

    The Mooncake client waits for a transfer by sleeping 10 us between polls; with the default 50 us
    slack that is ~20 wake-ups per millisecond, each one taking a core from the decode thread on a
    2-core machine. A coarser slack lets the kernel merge them: measured on 64-row gathers, the reading
    thread's CPU fell from 0.83 to 0.43 ms (200 us) for at most 200 us more latency.
    """
    prctl = _prctl()
    old = prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0) if prctl else -1
    if old < 0:
        yield
        return
    prctl(_PR_SET_TIMERSLACK, int(microseconds) * 1000, 0, 0, 0)
    try:
        yield
    finally:
        prctl(_PR_SET_TIMERSLACK, old, 0, 0, 0)


@nb.njit(cache=True)
def _plan_ranges(
    unique: np.ndarray, offsets: np.ndarray, row_bytes: int, base: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """(source offset in its head's object, destination, head cut points) of sorted, unique, in-range ids.

    Ids ``unique[cut[h]:cut[h + 1]]`` belong to head ``h`` (``offsets``: the heads' first rows, then the
    row count); row ``k`` goes to ``base + k * row_bytes``. One pass instead of ~10 NumPy calls."""
    n, heads = unique.size, offsets.size - 1
    src = np.empty(n, np.int64)
    dst = np.empty(n, np.int64)
    cut = np.full(heads + 1, n, np.int64)
    h = 0
    cut[0] = 0
    for k in range(n):
        v = unique[k]
        while h + 1 < heads and v >= offsets[h + 1]:
            h += 1
            cut[h] = k
        src[k] = (v - offsets[h]) * row_bytes
        dst[k] = base + k * row_bytes
    return src, dst, cut


@nb.njit(cache=True)
def _dedupe(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``unique_inverse_kernel`` keeping the GIL: a ~2 us call that released it would invite the decode
    thread to take it, and the reading thread to wait for it back."""
    return unique_inverse_kernel(flat)


@nb.njit(cache=True)
def _expand(rows: np.ndarray, inverse: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i] = rows[inverse[i]]`` (float32), the GIL kept, as ``_dedupe``."""
    for i in range(inverse.size):
        out[i, :] = rows[inverse[i], :]


class _ReaderGather(PendingGather):
    """A gather the reader process is reading into ``slots`` (one part of ``table._capacity`` unique ids each):
    ``_finish`` waits for them and expands their rows into the caller's rows; ``_reap`` waits and drops them."""

    def __init__(self, table: MooncakeTable, slots: list[int], n: int, inverse: np.ndarray, out: np.ndarray) -> None:
        super().__init__()
        self._t, self._slots, self._unique_n, self._inverse, self._dst = table, slots, n, inverse, out

    def _finish(self) -> int:
        t, reader, n = self._t, self._t.reader, self._unique_n
        assert reader is not None
        if len(self._slots) == 1:  # the decode case: expanded straight from the slot
            try:
                reader.wait(self._slots[0])
                _expand(reader.rows(self._slots[0], n, t.dim), self._inverse, self._dst)
            finally:
                reader.release(*self._slots)
        else:
            rows = np.empty((n, t.dim), np.float32)
            t._collect(self._slots, rows)
            _expand(rows, self._inverse, self._dst)
        t.stats.add(bytes_read=n * t.dim * 4)
        return n

    def _reap(self) -> None:
        assert self._t.reader is not None
        self._t.reader.release(*self._slots)


def _fingerprint_key(layer_id: int) -> str:
    return f"engramlm:l{layer_id}:fingerprint"


def _engram_store(store: Any, layer_id: int, head_sizes: Sequence[int], dim: int) -> Any:
    from mooncake.store import EngramStore, EngramStoreConfig

    cfg = EngramStoreConfig()
    cfg.table_vocab_sizes = [int(h) for h in head_sizes]
    cfg.embedding_dim = int(dim)
    return EngramStore(int(layer_id), cfg, store)


class MooncakeTable(RowTable):
    """One Engram layer's table ([sum(head_sizes), dim], heads concatenated) in Mooncake Store.

    ``store`` is a set-up ``mooncake.store.MooncakeDistributedStore``.
    """

    # The client runs its own transport threads: a second prefetch thread only competes with them, and one
    # thread reads layer 1 before layer 5 starts (bench_generate: rows wait 0.8% vs 1.4% of decode, 1.08x vs
    # 1.10x of in-model time with two).
    prefetch_workers = 1

    def __init__(
        self,
        store: Any,
        layer_id: int,
        head_sizes: Sequence[int],
        dim: int,
        expected_fingerprint: str | None = None,
        *,
        read: str = "batch",
        reader: ReaderProcess | None = None,
    ) -> None:
        if read not in READ_MODES:
            raise ConfigError(f"mooncake read must be one of {READ_MODES}, got {read!r}")
        if reader is not None and read != "batch":
            raise ConfigError(f"mooncake read must be 'batch' with a reader process, got {read!r}")
        self._store = store
        self.read = read
        self.layer_id = int(layer_id)
        self.head_sizes = np.asarray(head_sizes, dtype=np.int64)
        self._offsets = np.concatenate(([0], np.cumsum(self.head_sizes)))
        self._engram = _engram_store(store, layer_id, head_sizes, dim)
        raw = store.get(_fingerprint_key(self.layer_id))
        if not raw:
            raise MissingFingerprint(f"Mooncake layer {layer_id} has no engramlm fingerprint; populate it first")
        fp = raw.decode("ascii")
        if expected_fingerprint is not None and fp != check_fingerprint(expected_fingerprint):
            raise HashSpecMismatch(
                f"Mooncake layer {layer_id} was populated under hash spec {fp}, "
                f"but hash spec {check_fingerprint(expected_fingerprint)} was expected"
            )
        super().__init__(TableHeader(int(self._offsets[-1]), int(dim), fp, FP32))
        self._keys = list(self._engram.get_store_keys())
        if len(self._keys) != self.head_sizes.size:
            got = len(self._keys)
            raise EngramError(f"Mooncake layer {layer_id}: {got} head keys for {self.head_sizes.size} heads")
        if self.read == "batch" and not hasattr(store, "batch_get_into_multi_buffer_ranges"):
            self.read = "ranges"  # an older client without the session API
        self.wait_slack_us = WAIT_SLACK_US  # the reading thread's timer slack during a read (see wait_slack)
        self._session_at: float | None = None  # monotonic time of the last session start
        self._session_lock = threading.Lock()
        self.reader = reader
        if reader is not None:  # gathers split-phase on the caller's thread, read by the child: no worker
            self._reader_table = reader.open_table(self.layer_id, self.head_sizes, self.dim, fp)
            self._capacity = slot_capacity(reader.slot_bytes, self.dim * 4)
            self.prefetch_workers = 0

    @classmethod
    def populate(
        cls,
        store: Any,
        layer_id: int,
        weights: torch.Tensor,
        head_sizes: Sequence[int],
        fingerprint: str,
        *,
        reader: ReaderProcess | None = None,
    ) -> MooncakeTable:
        """Create-only upload of a [R, dim] table split into heads; returns the opened tier (read by ``reader``)."""
        fp = check_fingerprint(fingerprint)
        sizes = [int(h) for h in head_sizes]
        if sum(sizes) != weights.shape[0]:
            raise ValueError(f"head sizes sum to {sum(sizes)}, table has {weights.shape[0]} rows")
        w = weights.detach().to("cpu", torch.float32).contiguous().numpy()
        buffers = [np.ascontiguousarray(b) for b in np.split(w, np.cumsum(sizes)[:-1])]
        _engram_store(store, layer_id, sizes, weights.shape[1]).populate(buffers)
        store.put(_fingerprint_key(layer_id), fp.encode("ascii"))
        return cls(store, layer_id, sizes, weights.shape[1], fp, reader=reader)

    def remove(self) -> int:
        """Delete this layer's head tables and fingerprint from the store."""
        self._end_session()
        self._store.remove(_fingerprint_key(self.layer_id), True)
        return int(self._engram.remove_from_store(True))

    def close(self) -> None:
        """Drop the cached replicas of the ``batch`` session (the objects stay in the store)."""
        self._end_session()

    def _end_session(self) -> None:
        with self._session_lock:
            if self._session_at is not None:
                self._session_at = None
                self._store.batch_get_session_end(self._keys)

    def _start_session(self, force: bool) -> None:
        """Query every head's replica and lease once (the only master RPC of a ``batch`` read)."""
        with self._session_lock:
            now = time.monotonic()
            if not force and self._session_at is not None and now - self._session_at < SESSION_RENEW_S:
                return
            self._session_at = None
            codes = self._store.batch_get_session_start(self._keys)
            bad = [(h, int(c)) for h, c in enumerate(codes) if c != 0]
            if bad or len(codes) != len(self._keys):
                h, code = bad[0] if bad else (0, -1)
                raise EngramError(
                    f"Mooncake read of layer {self.layer_id} head {h} ({self._keys[h]}) failed: "
                    f"the session start returned error {code} for {len(bad) or len(self._keys)} head(s)"
                )
            self._session_at = now

    def gather(self, row_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`RowTable.gather`; the prefetcher's case (contiguous int64 CPU ids into a contiguous float32 CPU
        ``out`` of their shape) goes through NumPy views: the base's tensor views and reshapes each release the
        GIL, a point where the decode thread takes it and this (reading) thread waits for it back."""
        if (
            out is None
            or type(row_ids) is not torch.Tensor
            or row_ids.dtype != torch.int64
            or out.dtype != torch.float32
            or row_ids.device.type != "cpu"
            or out.device.type != "cpu"
            or self.read == "lookup"
            or not (row_ids.is_contiguous() and out.is_contiguous())
            or out.shape != (*row_ids.shape, self.dim)
            or row_ids.numel() == 0
        ):
            return super().gather(row_ids, out)
        start = time.perf_counter()
        flat = row_ids.numpy().reshape(-1)
        n_unique = self._gather_bytes(flat, out.numpy().reshape(flat.size, self.dim).view(np.uint8), out.dtype)
        if n_unique is None:  # no registered buffer: the lookup fallback
            return super().gather(row_ids, out)
        self._count(flat.size, n_unique, start)
        return out

    @property
    def split_phase(self) -> bool:
        return self.reader is not None

    @property
    def io_thread_ids(self) -> list[int]:
        """The reader process's threads, which read for this table (none without one: the client's own threads
        are :func:`transport_threads`)."""
        return self.reader.thread_ids if self.reader is not None else []

    def _apply_io_cpus(self) -> None:
        """Confine the reader process's threads (threads it starts later inherit their creator's CPUs)."""
        if self.reader is not None:
            affinity.pin(self.reader.thread_ids, self.io_cpus)

    def _unique(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, inverse = _dedupe(flat)
        lo, hi = int(unique[0]), int(unique[-1])
        if lo < 0 or hi >= self.num_rows:
            raise self._out_of_range(lo, hi)
        return unique, inverse

    def _start_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> PendingGather | None:
        """With a reader process: dedupe, hand the unique ids to the child (a slot per ``_capacity`` of them, a
        prefill's too) and return while it reads; None (a synchronous read) where too few slots are free or the
        rows are not float32."""
        if self.reader is None or dtype != torch.float32:
            return None
        unique, inverse = self._unique(flat)
        slots = self.reader.submit_parts(self._reader_table, unique, self.dim * 4, self._capacity)
        if slots is None:
            return None
        return _ReaderGather(self, slots, unique.size, inverse, out.view(np.float32))

    def _collect(self, slots: list[int], rows: np.ndarray) -> None:
        """Wait for the parts read into ``slots`` (part ``k``: ``rows[k * _capacity:][:_capacity]``) and copy them
        into ``rows``; the slots are given back, after an error too (each once the child is done with it)."""
        reader = self.reader
        assert reader is not None
        try:
            for k, slot in enumerate(slots):
                reader.wait(slot)
                part = rows[k * self._capacity : (k + 1) * self._capacity]
                part[:] = reader.rows(slot, part.shape[0], self.dim)
        finally:
            reader.release(*slots)

    def _read_by_reader(self, unique: np.ndarray, rows: np.ndarray) -> None:
        """Rows of sorted unique ids into ``rows`` through the reader process, one slot's worth at a time."""
        assert self.reader is not None
        for a in range(0, unique.size, self._capacity):
            part = unique[a : a + self._capacity]
            self._collect([self.reader.submit(self._reader_table, part, self.dim * 4)], rows[a : a + part.size])
        self.stats.add(bytes_read=unique.size * self.dim * 4)

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        """The whole gather with the rows landing in the registered buffer and expanded from it into ``out``
        (float32 rows only; else, or in ``lookup`` mode, the generic path): one Numba call plans the reads,
        the store's call reads, one more expands. No tensor, no copy out of the buffer, and the GIL released only
        by the store's call (Numba and ctypes calls that release it are points where the decode thread takes it)."""
        if self.read == "lookup" or dtype != torch.float32:
            return None
        if self.reader is not None:
            unique, inverse = self._unique(flat)
            rows = np.empty((unique.size, self.dim), np.float32)
            self._read_by_reader(unique, rows)
            _expand(rows, inverse, out.view(np.float32))
            return int(unique.size)
        buf = _registered_buffer(self._store, flat.size * self.dim)
        if buf is None:
            return None  # the generic path falls back to lookup
        unique, inverse = self._unique(flat)
        rows = buf[: unique.size * self.dim].reshape(unique.size, self.dim)
        self._read_unique(unique, rows)
        _expand(rows, inverse, out.view(np.float32))
        return int(unique.size)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        if self.reader is not None:
            rows = np.empty((ids.numel(), self.dim), np.float32)
            self._read_by_reader(ids.numpy(), rows)
            return torch.from_numpy(rows)
        flat = _registered_buffer(self._store, ids.numel() * self.dim) if self.read != "lookup" else None
        if flat is None:
            return self._lookup(ids)
        n = ids.numel()
        rows = flat[: n * self.dim].reshape(n, self.dim)
        self._read_unique(ids.numpy(), rows)
        return torch.from_numpy(rows.copy())  # the buffer is this thread's, reused by its next read

    def _read_unique(self, unique: np.ndarray, rows: np.ndarray) -> None:
        """Read the rows of sorted, unique, in-range ids into ``rows`` (a slice of the registered buffer).

        Sorted ids keep each head's ids contiguous: one key and one slice of ranges per head that has any."""
        row = self.dim * 4
        base = rows.ctypes.data if self.read == "batch" else 0  # batch: absolute addresses; ranges: offsets
        src, dst, cut = _plan_ranges(unique, self._offsets, row, base)
        src_l, dst_l, cut_l = src.tolist(), dst.tolist(), cut.tolist()
        heads = [h for h in range(self.head_sizes.size) if cut_l[h] < cut_l[h + 1]]
        keys = [self._keys[h] for h in heads]
        srcs = [src_l[cut_l[h] : cut_l[h + 1]] for h in heads]
        dsts = [dst_l[cut_l[h] : cut_l[h + 1]] for h in heads]
        sizes = [[row] * (cut_l[h + 1] - cut_l[h]) for h in heads]
        with wait_slack(self.wait_slack_us):
            if self.read == "batch":
                self._read_batch(heads, keys, dsts, sizes, srcs)
            else:
                self._read_ranges(heads, keys, rows, dsts, sizes, srcs)
        self.stats.add(bytes_read=unique.size * row)

    def _read_batch(self, heads: list[int], keys: list[str], dsts: list, sizes: list, srcs: list) -> None:
        """One ``batch_get_into_multi_buffer_ranges``: destinations are absolute addresses, one per row."""
        want = [self.dim * 4 * len(s) for s in sizes]
        for attempt in range(2):  # a lease that ran out mid-session: renew once and read again
            self._start_session(force=attempt > 0)
            got = self._store.batch_get_into_multi_buffer_ranges(keys, dsts, sizes, srcs)
            if got == want:
                return
        bad = [(h, int(g), w) for h, g, w in zip(heads, got, want, strict=True) if g != w]
        h, g, w = bad[0] if bad else (heads[0], -1, want[0])
        raise EngramError(
            f"Mooncake read of layer {self.layer_id} head {h} ({self._keys[h]}) failed: "
            f"{len(bad) or len(heads)} head(s) short, returned {g} instead of {w} bytes"
        )

    def _read_ranges(
        self, heads: list[int], keys: list[str], rows: np.ndarray, dsts: list, sizes: list, srcs: list
    ) -> None:
        """One ``get_into_ranges`` (the master is queried per head inside the call)."""
        row = self.dim * 4
        got = self._store.get_into_ranges([rows.ctypes.data], [keys], [dsts], [srcs], [sizes])[0]
        for h, res in zip(heads, got, strict=True):
            bad = [r for r in res if r != row]
            if bad:
                raise EngramError(
                    f"Mooncake read of layer {self.layer_id} head {h} ({self._keys[h]}) failed: "
                    f"{len(bad)} of {len(res)} rows returned {bad[0]} instead of {row} bytes"
                )

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The per-lookup path: ``EngramStore.lookup`` on an id grid (GIL held throughout)."""
        idx = ids.numpy()
        head = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[head]
        # Sorted ids keep each head's ids contiguous, so rank within head is a subtraction.
        first = np.searchsorted(head, head, side="left")
        rank = np.arange(idx.size) - first
        grid = np.zeros((int(rank.max()) + 1, 1, self.head_sizes.size), dtype=np.int64)
        grid[rank, 0, head] = local
        rows = np.asarray(self._engram.lookup(grid))[rank, 0, head]
        self.stats.add(bytes_read=grid.size * self.row_bytes)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
