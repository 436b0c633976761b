"""Who pays for an inline gather: CPU of the decode thread and of the tier's I/O thread, per gather.

End-to-end ratios on this 2-core VM swing by about ±2% from run to run (``bench_generate``), so they cannot
say where a 1-3% overhead comes from. This benchmark measures the parts directly, on the decode-step shape
(batch 8 x 8 heads = 64 skewed ids per gather, a table of 800k rows x 64 fp32): for each tier, the decode
thread's CPU in ``start_gather`` and in ``result()`` (``time.thread_time``, with a 2 ms sleep between them
standing in for the forward), and the CPU the tier's GIL-free I/O thread spends per gather (its
``/proc/self/task/<tid>/schedstat``). Contenders: the memory tier (a synchronous gather at start), the
direct (O_DIRECT) tier with its I/O thread, and a hot-row cache of 10% (never full in this run) and of 0.1% (full:
every gather evicts) in front of it (the cache's own I/O thread: probe, read of the misses, expansion, admission).

    python -m benchmarks.bench_gather_cpu [--gathers 600] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import sched_seconds, stats, write_result
from engramlm.store.base import RowTable
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import write_store
from engramlm.store.memory import MemoryTable

FP = "ab" * 32


def io_thread_seconds(table: RowTable) -> float | None:
    """CPU seconds the table's I/O thread has run (a cache's own thread, else its direct tier's); None if none."""
    io = getattr(table, "_io", None) or getattr(getattr(table, "inner", None), "_io", None)
    thread = getattr(io, "_thread", None)
    if thread is None or thread.native_id is None:
        return None
    return sched_seconds(thread.native_id)[0]


def measure(tables: dict[str, RowTable], ids: list[torch.Tensor], warm: int, pause_s: float) -> dict[str, Any]:
    """Per tier and gather: decode-thread CPU at start and at result (µs), I/O thread CPU (µs), wall of result
    (µs). The tiers take turns gather by gather (order rotating), so a burst of noise on the shared host falls on
    all of them alike."""
    out = torch.empty(*ids[0].shape, next(iter(tables.values())).dim)
    for table in tables.values():
        for i in ids[:warm]:  # threads start, kernels compile, the cache fills
            table.start_gather(i, out=out).result()
    names = list(tables)
    start: dict[str, list[float]] = {n: [] for n in names}
    finish: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    io0 = {n: io_thread_seconds(t) for n, t in tables.items()}
    for g, i in enumerate(ids[warm:]):
        for n in names[g % len(names) :] + names[: g % len(names)]:
            c0 = time.thread_time()
            pending = tables[n].start_gather(i, out=out)
            c1 = time.thread_time()
            time.sleep(pause_s)
            c2, w2 = time.thread_time(), time.perf_counter()
            pending.result()
            c3, w3 = time.thread_time(), time.perf_counter()
            start[n].append(1e6 * (c1 - c0))
            finish[n].append(1e6 * (c3 - c2))
            wall[n].append(1e6 * (w3 - w2))
    count = len(ids) - warm
    results = {}
    for n, table in tables.items():
        io1 = io_thread_seconds(table)
        results[n] = {
            "decode_start_us": stats(start[n]),
            "decode_result_us": stats(finish[n]),
            "decode_total_us_mean": float(np.mean(start[n]) + np.mean(finish[n])),
            "result_wall_us": stats(wall[n]),
            "io_thread_us_per_gather": None if io0[n] is None or io1 is None else 1e6 * (io1 - io0[n]) / count,
            "hit_rate": table.stats.hit_rate if isinstance(table, CachedTable) else None,
            "io_thread": bool(getattr(getattr(table, "inner", table), "io_thread", False)),
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=800_024)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--gathers", type=int, default=600)
    ap.add_argument("--warm", type=int, default=100)
    ap.add_argument("--pause-ms", type=float, default=2.0, help="between start and result: the forward's stand-in")
    ap.add_argument("--workdir", default=None, help="where the store file goes (must not be tmpfs for O_DIRECT)")
    ap.add_argument("--out", default="gather_cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = torch.randn(args.rows, args.dim)
    rng = np.random.default_rng(0)  # decode-step ids: Zipf-skewed, spread over the table
    ids = [torch.from_numpy(((rng.zipf(1.2, (8, 1, 8)) - 1) * 7919) % args.rows) for _ in range(args.gathers)]
    root = Path(args.workdir) if args.workdir else Path(__file__).resolve().parent / "results" / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gather_cpu_", dir=root))
    try:
        path = tmp / "table.engst"
        write_store(path, weights, "fp32", FP, {"hash_spec": {"seed": 0}})
        table_bytes = args.rows * args.dim * 4
        makers = {
            "memory": lambda: MemoryTable(weights, FP),
            "direct": lambda: DirectFileTable(path, FP),
            "cached10": lambda: CachedTable(DirectFileTable(path, FP), table_bytes // 10),
            "cached0.1": lambda: CachedTable(DirectFileTable(path, FP), table_bytes // 1000),  # full: evicts
        }
        tables = {name: make() for name, make in makers.items()}
        try:
            results = measure(tables, ids, args.warm, args.pause_ms / 1e3)
        finally:
            for table in tables.values():
                table.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = {"params": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    print(f"wrote {write_result(args.out, payload)}")
    for name, r in results.items():
        io = r["io_thread_us_per_gather"]
        print(
            f"{name:9s} decode thread: start {r['decode_start_us']['median']:6.1f} us + result "
            f"{r['decode_result_us']['median']:6.1f} us   I/O thread {'-' if io is None else f'{io:6.1f}'} us/gather"
        )


if __name__ == "__main__":
    main()
