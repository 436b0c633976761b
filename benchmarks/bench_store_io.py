"""Issue 18's I/O figures: how long a gather holds the GIL, and Mooncake against loopback TCP.

Why: decode with SSD tables paid ~30% although the forward waited for rows only ~2% of the time. The
reads were hidden; their Python was not: a gather held the GIL against the model's dispatch on the other
thread. So the figure that matters is the **GIL-held time per gather**, not the gather's own time.

It is estimated from CPU accounting, which (unlike a wall-clock probe thread) survives a shared, loaded
machine: blocks of ``--gathers`` decode-sized gathers (``--rows`` ids: one Engram layer of a batch-8 decode
step) per contender, interleaved, ``--repeats`` times. Per gather: the calling thread's CPU
(``RUSAGE_THREAD``), minus the CPU spent inside calls that release the GIL (the aio kernel; Mooncake's
``get_into_ranges``: timed by wrapping them), plus, for the ``threads`` engine only, the user CPU of its
worker threads (Python and 4 KiB zlib CRCs, both under the GIL; their system time is ``preadv`` in the kernel,
GIL released). Helper threads that run no Python (glibc AIO, Mooncake's transfer engine) are reported
but do not count. Torch ops in the calling thread (``unique``, ``index_select``) release the GIL but are
counted: the estimate is an upper bound. A wall-clock probe (a thread of tiny torch ops, slowed down by
concurrent gathers) was tried first: at a load average of 12 on 2 cores its "alone" baseline varied 5x
between repeats, so it measured the neighbours.

Ids are Zipf(1.2)-skewed like text, hot ids scattered over the table. Contenders: ``memory``
(``MemoryTable``: a gather's Python alone), ``direct`` (the ``aio`` engine: one Numba ``nogil`` call per
gather), ``direct_threads`` (the previous engine), ``cached_direct`` (an LFU ``CachedTable`` of
``--cache-fraction`` of the rows, warmed, in front of ``direct``: the cache's own Python), ``mooncake``
(the store's batch get-into API: replicas queried once per session, one
``batch_get_into_multi_buffer_ranges`` per gather into a registered buffer), ``mooncake_ranges`` (one
``get_into_ranges`` per gather, which queries the master per head: the path before issue 18 item 2) and
``mooncake_lookup`` (``EngramStore.lookup``, the first path, counted as GIL-held throughout: a pybind call
that does not say it releases it) and ``mooncake_process`` (a ``ReaderProcess`` lending a pool of its own its
segment and reading it with its own client and GIL; this process's CPU is the dedupe, the request and the
expansion, all of it with the GIL held).

Mooncake against the wire: rows/s of the Mooncake paths at decode size and at ``--big-rows``, against
loopback TCP limits measured in the same run on 127.0.0.1: bulk throughput (one connection streaming 1 MiB
writes) and request-response round trips/s (a request, then one row back; what a read per row costs), the
latter between two threads of this process (they share the GIL: a floor) and between two processes, one and
four requests in flight (Mooncake keeps four connections per peer busy: the fair ceiling).

Run from the repository root: ``nice python -m benchmarks.bench_store_io`` (~2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks._common import stats, write_result
from engramlm.store import _aio
from engramlm.store.base import RowTable
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import write_store
from engramlm.store.memory import MemoryTable
from engramlm.store.mooncake import MooncakeTable, connect, local_master
from engramlm.store.mooncake_reader import ReaderProcess

FP = "5e" * 32


# ---------------------------------------------------------------------------- loopback TCP limits


def _pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    srv.close()
    for s in (cli, conn):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return cli, conn


def _recv_exact(s: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = s.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def loopback_bulk(total: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """Bytes/s one 127.0.0.1 TCP connection carries (a sender thread, this thread receiving)."""
    cli, conn = _pair()
    payload = b"\0" * chunk

    def send() -> None:
        for _ in range(total // chunk):
            cli.sendall(payload)

    th = threading.Thread(target=send)
    buf = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    th.start()
    for _ in range(total // chunk):
        _recv_exact(conn, buf)
    th.join()
    dt = time.perf_counter() - t0
    cli.close()
    conn.close()
    return total / dt


def loopback_round_trips(reply_bytes: int, n: int = 4000) -> float:
    """Round trips/s over 127.0.0.1: a 16-byte request, a ``reply_bytes`` reply (a server thread)."""
    cli, conn = _pair()
    reply = b"\0" * reply_bytes

    def serve() -> None:
        req = memoryview(bytearray(16))
        for _ in range(n):
            _recv_exact(conn, req)
            conn.sendall(reply)

    th = threading.Thread(target=serve)
    th.start()
    req, buf = b"\1" * 16, memoryview(bytearray(reply_bytes))
    t0 = time.perf_counter()
    for _ in range(n):
        cli.sendall(req)
        _recv_exact(cli, buf)
    dt = time.perf_counter() - t0
    th.join()
    cli.close()
    conn.close()
    return n / dt


# The echo server of loopback_round_trips_proc: its own process, so the two ends share no GIL.
_ECHO = """
import socket, sys
reply, req = b"\\0" * int(sys.argv[2]), memoryview(bytearray(16))
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    got = 0
    while got < 16:
        n = s.recv_into(req[got:])
        if n == 0:
            sys.exit(0)
        got += n
    s.sendall(reply)
"""


def loopback_round_trips_proc(reply_bytes: int, depth: int, n: int = 20_000) -> float:
    """Request-response round trips/s over 127.0.0.1 with the server in another process (no GIL shared, unlike
    :func:`loopback_round_trips`), ``depth`` requests in flight (Mooncake keeps 4 connections per peer busy):
    the rate a read of one request-response per row can reach on this machine's loopback TCP."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    child = subprocess.Popen([sys.executable, "-c", _ECHO, str(srv.getsockname()[1]), str(reply_bytes)])
    try:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reqs, buf = b"\1" * (16 * depth), memoryview(bytearray(reply_bytes * depth))
        for _ in range(200):  # warm-up
            conn.sendall(reqs)
            _recv_exact(conn, buf)
        rounds = max(n // depth, 1)
        t0 = time.perf_counter()
        for _ in range(rounds):
            conn.sendall(reqs)
            _recv_exact(conn, buf)
        dt = time.perf_counter() - t0
        conn.close()
        return rounds * depth / dt
    finally:
        srv.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:  # an error above left its connection open: the server waits on it
            child.kill()
            child.wait()


# ---------------------------------------------------------------------------- GIL accounting


class NogilClock:
    """Thread CPU seconds spent inside calls that release the GIL (the aio kernel, ``get_into_ranges``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds += time.thread_time() - t0

        return timed


class _ClockedClient:
    """A Mooncake client whose reads (``get_into_ranges``, the session's batch get-into) are timed by a
    :class:`NogilClock` (both release the GIL); all else passes through."""

    def __init__(self, client: Any, clock: NogilClock) -> None:
        self._client = client
        self.get_into_ranges = clock.wrap(client.get_into_ranges)
        self.batch_get_into_multi_buffer_ranges = clock.wrap(client.batch_get_into_multi_buffer_ranges)
        self.batch_get_session_start = clock.wrap(client.batch_get_session_start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _cpu() -> tuple[float, float, float, float]:
    """(this thread's CPU, the process's CPU, the process's user and system CPU from rusage) in seconds.

    ``thread_time``/``process_time`` are exact (the scheduler's runtime); rusage's user/system split is
    tick-sampled, so it is used only to split the other threads' exact total.
    """
    proc = resource.getrusage(resource.RUSAGE_SELF)
    return time.thread_time(), time.process_time(), proc.ru_utime, proc.ru_stime


def gil_accounting(
    tables: dict[str, RowTable], clocks: dict[str, NogilClock], batches: list[torch.Tensor], n: int, repeats: int
) -> dict[str, Any]:
    """Per gather: wall, CPU, and the GIL-held CPU estimate (see the module docstring), interleaved blocks of n."""
    names = list(tables)
    rows: dict[str, dict[str, list[float]]] = {m: {} for m in names}
    for r in tqdm(range(repeats), desc="gil accounting", leave=False):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t, clock = tables[name], clocks.get(name)
            before_nogil = clock.seconds if clock else 0.0
            c0, p0, u0, s0 = _cpu()
            w0 = time.perf_counter()
            for k in range(n):
                t.gather(batches[(r * n + k) % len(batches)])
            wall = time.perf_counter() - w0
            c1, p1, u1, s1 = _cpu()
            nogil = (clock.seconds if clock else 0.0) - before_nogil
            caller, others = c1 - c0, max(0.0, (p1 - p0) - (c1 - c0))
            user_share = (u1 - u0) / max((u1 - u0) + (s1 - s0), 1e-12)  # of the whole process: an estimate
            others_user, others_sys = others * user_share, others * (1 - user_share)
            # The threads engine's workers run Python (and zlib on 4 KiB pages) under the GIL: their user
            # CPU counts; their system CPU is preadv inside the kernel, GIL released. Other tiers' helper
            # threads (glibc AIO, Mooncake's transfer engine) run no Python: they do not count.
            held = caller - nogil + (others_user if name == "direct_threads" else 0.0)
            sample = {"wall_ms": wall, "caller_cpu_ms": caller, "nogil_cpu_ms": nogil,
                      "other_threads_user_ms": others_user, "other_threads_sys_ms": others_sys,
                      "gil_held_ms": held}  # fmt: skip
            for key, v in sample.items():
                rows[name].setdefault(key, []).append(1e3 * v / n)
    return {name: {key: stats(v) for key, v in per.items()} for name, per in rows.items()}


def gather_times(tables: dict[str, RowTable], batches: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Each contender's own gather time (interleaved), alone on the machine."""
    names = list(tables)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            tables[n].gather(batches[r % len(batches)])
            times[n].append(time.perf_counter() - t0)
    return {n: stats(ts) for n, ts in times.items()}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-rows", type=int, default=100_003)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64, help="ids per decode-sized gather (batch 8 x 8 heads)")
    ap.add_argument("--big-rows", type=int, default=4096, help="ids per large gather (a prefill)")
    ap.add_argument("--gathers", type=int, default=50, help="decode-sized gathers per timed block")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--cache-fraction", type=float, default=0.1, help="cached_direct: LFU cache of this share of rows")
    ap.add_argument("--no-mooncake", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (must accept O_DIRECT)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--out", default="store_io")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = args.heads * args.head_rows
    rng = np.random.default_rng(0)
    # Skewed like text (Zipf 1.2), hot ids scattered over the table by a random permutation.
    perm = rng.permutation(rows)

    def draw(n: int) -> torch.Tensor:
        return torch.from_numpy(perm[(rng.zipf(1.2, n) - 1) % rows])

    small = [draw(args.rows) for _ in range(1024)]
    big = [draw(args.big_rows) for _ in range(16)]
    warm = [draw(args.rows) for _ in range(2000)]
    weights = torch.randn(rows, args.dim, generator=torch.Generator().manual_seed(0))

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="engramlm_bench_store_io_", dir=args.dir))
    results: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            path = scratch / "table.engst"
            write_store(path, weights, "fp32", FP, progress=True)
            aio_clock = NogilClock()  # blocks run one at a time, so the aio tiers can share one clock
            clocks = {"direct": aio_clock, "cached_direct": aio_clock, "mooncake": NogilClock(),
                      "mooncake_ranges": NogilClock()}  # fmt: skip
            _aio.fetch = aio_clock.wrap(_aio.fetch)  # type: ignore[method-assign]  # the kernel call
            tables: dict[str, RowTable] = {
                "memory": MemoryTable(weights, FP),
                "direct": stack.enter_context(DirectFileTable(path, FP)),
                "direct_threads": stack.enter_context(DirectFileTable(path, FP, io_engine="threads")),
                "cached_direct": CachedTable(DirectFileTable(path, FP), int(args.cache_fraction * rows) * args.dim * 4),
            }
            stack.callback(tables["cached_direct"].close)
            mem = MemoryTable(weights, FP)
            inner, tables["cached_direct"].inner = tables["cached_direct"].inner, mem  # type: ignore[attr-defined]
            for b in warm:  # a warm cache (filled from RAM, as bench_generate does), on other draws
                tables["cached_direct"].gather(b)
            tables["cached_direct"].inner = inner  # type: ignore[attr-defined]
            if not tables["direct"].direct_io:  # type: ignore[attr-defined]
                raise SystemExit(f"{scratch}: O_DIRECT refused; pass --dir on a filesystem that supports it")
            mooncake_info: dict[str, Any] = {"ran": False}
            if not args.no_mooncake:
                try:
                    master = stack.enter_context(local_master(scratch / "mooncake_master.log"))
                    client = connect(master, 2 * rows * args.dim * 4 + (256 << 20))
                    stack.callback(client.close)
                    heads = [args.head_rows] * args.heads
                    tables["mooncake"] = MooncakeTable.populate(client, 1, weights, heads, FP)
                    tables["mooncake"]._store = _ClockedClient(client, clocks["mooncake"])  # type: ignore[attr-defined]
                    tables["mooncake_ranges"] = MooncakeTable(client, 1, heads, args.dim, FP, read="ranges")
                    tables["mooncake_ranges"]._store = _ClockedClient(client, clocks["mooncake_ranges"])  # type: ignore[attr-defined]
                    tables["mooncake_lookup"] = MooncakeTable(client, 1, heads, args.dim, FP, read="lookup")
                    # A pool of its own whose segment the reader process lends: rows read there, by its own client
                    master2 = stack.enter_context(local_master(scratch / "mooncake_master2.log"))
                    reader = ReaderProcess(master2, segment_bytes=2 * rows * args.dim * 4 + (256 << 20))
                    stack.callback(reader.close)
                    client2 = connect(master2, 0)
                    stack.callback(client2.close)
                    MooncakeTable.populate(client2, 1, weights, heads, FP)
                    tables["mooncake_process"] = MooncakeTable(client2, 1, heads, args.dim, FP, reader=reader)
                    mooncake_info = {"ran": True}
                except Exception as exc:  # report, do not hide: the JSON says why it did not run
                    mooncake_info = {"ran": False, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"mooncake skipped: {mooncake_info['error']}")
            for name, t in tables.items():  # correctness before timing (and first-use compilation)
                for b in (small[0], big[0]):
                    if not torch.equal(t.gather(b), weights[b]):
                        raise AssertionError(f"{name}: rows differ")
            results["gather_seconds_decode_size"] = gather_times(tables, small, 60)
            results["gather_seconds_big"] = gather_times(tables, big, 8)
            results["gil"] = gil_accounting(tables, clocks, small, args.gathers, args.repeats)
            row_bytes = args.dim * 4
            bulk = loopback_bulk()
            rtt = [loopback_round_trips(row_bytes) for _ in range(3)]
            rtt_proc = {
                d: float(np.median([loopback_round_trips_proc(row_bytes, d) for _ in range(3)])) for d in (1, 4)
            }
            results["loopback_tcp"] = {
                "bulk_bytes_per_s": bulk,
                "bulk_rows_per_s": bulk / row_bytes,
                "round_trips_per_s": float(np.median(rtt)),
                # the server in its own process: depth 1, and 4 in flight as Mooncake's 4 connections per peer
                "round_trips_per_s_two_processes": rtt_proc[1],
                "round_trips_per_s_two_processes_depth4": rtt_proc[4],
                "reply_bytes": row_bytes,
            }
            if mooncake_info["ran"]:
                for name in ("mooncake", "mooncake_ranges", "mooncake_lookup", "mooncake_process"):
                    for size, key in (("decode_size", args.rows), ("big", args.big_rows)):
                        med = results[f"gather_seconds_{size}"][name]["median"]
                        mooncake_info[f"{name}_rows_per_s_{size}"] = key / med
                mooncake_info["ranges_vs_bulk_limit_big"] = mooncake_info["mooncake_rows_per_s_big"] / (
                    bulk / row_bytes
                )
                for size in ("decode_size", "big"):  # against the two-process, 4-in-flight round-trip rate
                    mooncake_info[f"mooncake_vs_round_trip_limit_depth4_{size}"] = (
                        mooncake_info[f"mooncake_rows_per_s_{size}"] / rtt_proc[4]
                    )
                mooncake_info["ranges_vs_round_trip_limit_big"] = mooncake_info["mooncake_rows_per_s_big"] / float(
                    np.median(rtt)
                )
                tables["mooncake"].remove()  # type: ignore[attr-defined]
            results["mooncake"] = mooncake_info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    payload = {
        "kind": "store_io",
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "dir", "results_dir")},
        "table": {"rows": rows, "dim": args.dim, "format": "fp32", "bytes": rows * args.dim * 4},
        "io_engine": {"direct": "aio", "direct_threads": "threads"},
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        **results,
    }
    out = write_result(args.out, payload, args.results_dir)
    print(f"wrote {out}")
    g = results["gil"]
    for name in tables:
        m = {key: v["median"] for key, v in g[name].items()}
        print(
            f"{name:<16} wall {m['wall_ms']:7.2f} ms  caller CPU {m['caller_cpu_ms']:6.3f}"
            f"  nogil {m['nogil_cpu_ms']:6.3f}  GIL held {m['gil_held_ms']:6.3f} ms/gather"
        )
    lt = results["loopback_tcp"]
    print(
        f"loopback TCP: {lt['bulk_bytes_per_s'] / 1e9:.2f} GB/s bulk, {lt['round_trips_per_s']:.0f} round trips/s "
        f"(two processes: {lt['round_trips_per_s_two_processes']:.0f}/s, 4 in flight "
        f"{lt['round_trips_per_s_two_processes_depth4']:.0f}/s)"
    )
    mc = results.get("mooncake", {})
    if mc.get("ran"):
        print(
            f"mooncake batch read: {mc['mooncake_rows_per_s_decode_size']:.0f} rows/s at {args.rows} ids, "
            f"{mc['mooncake_rows_per_s_big']:.0f} rows/s at {args.big_rows} "
            f"({mc['mooncake_vs_round_trip_limit_depth4_big']:.2f}x the 4-in-flight round-trip rate)"
        )


if __name__ == "__main__":
    main()
