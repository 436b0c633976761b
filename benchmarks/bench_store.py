"""Gather throughput of every store tier and row format, against the physical references.

Why: a tier is only as good as its distance to what the hardware allows. Each tier's batched
``gather`` (dedupe, sort, fetch, decode, expand) is timed interleaved, in the same run, with:

* ``ref_index_select``: raw ``torch.index_select`` of the same packed records from the same
  in-memory table (all lookups, no dedupe, no decode): the memory-bandwidth reference;
* ``ref_odirect_4k``: raw random O_DIRECT 4 KiB ``preadv`` reads, one per page the request
  touches, from ``queue_depth`` threads on the same file: the SSD reference (what
  :class:`DirectFileTable` does minus planning, coalescing and decoding).

Tiers: ``memory`` (MemoryTable over packed records), ``mmap`` (page cache, warm: the file was
just written), ``direct`` (O_DIRECT, queue depth 64), ``cached_direct`` (LFU cache of 10% of the
rows in front of ``direct``, warmed on earlier batches) and, for fp32, ``mooncake`` (a real
``mooncake_master`` on 127.0.0.1, TCP transport, the real ``EngramStore`` client).

Verification cost: ``mmap`` and ``direct`` are timed as opened by default (every page a gather reads
checked against its CRC32; ``mmap`` checks a page on its first read only), interleaved with
``mmap_noverify`` and ``direct_noverify`` (``verify=False``); ``verification_cost`` reports the paired
time ratios verified / unverified. ``mmap_first_touch`` times one uniform batch on a freshly opened
verified ``mmap`` table (every page checked) against the unverified one: the cost before the bitmap
is warm. The ``memory`` tier checks the file's chunk CRC32s once at open: ``memory_open_check``.

Row ids: the ``demo`` preset's real hash (V3 tokenizer + compression, 2/3-grams, 16 heads) with
table sizes scaled by ``--vocab-scale`` (default 0.2, ~2.07M rows per layer, so the fp32 table
is ~530 MB), applied to CPython stdlib tokens (a new batch of B×T tokens per repeat), and the
same number of uniform random ids. All tiers are checked equal to ``memory`` before timing.

Run from the repository root: ``python -m benchmarks.bench_store`` (~2-3 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks._common import paired_ratios, stats, write_result
from benchmarks.bench_hashing import stdlib_token_ids
from engramlm.assets import resolve_tokenizer
from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import make_layout
from engramlm.models.presets import get_preset
from engramlm.store.base import RowTable
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import check_chunks, write_store
from engramlm.store.formats import get_format
from engramlm.store.memory import MemoryTable
from engramlm.store.mmap import MmapTable
from engramlm.store.mooncake import MooncakeTable, connect, local_master
from engramlm.store.pages import PAGE

FORMATS = ("fp32", "bf16", "fp8_e4m3_ue8m0")


# ---------------------------------------------------------------------------- physical references


class RawDirectReader:
    """One O_DIRECT 4 KiB preadv per page, spread over ``queue_depth`` threads (GIL released)."""

    def __init__(self, path: Path, queue_depth: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        self.queue_depth = queue_depth
        self.pool = ThreadPoolExecutor(queue_depth)
        self.bufs = [mmap.mmap(-1, PAGE) for _ in range(queue_depth)]

    def _read(self, w: int, pages: np.ndarray) -> int:
        buf, fd, got = self.bufs[w], self.fd, 0
        for p in pages.tolist():
            got += os.preadv(fd, [buf], p * PAGE)
        return got

    def read_pages(self, pages: np.ndarray) -> int:
        n = min(self.queue_depth, pages.size)
        futs = [self.pool.submit(self._read, w, pages[w::n]) for w in range(n)]
        return sum(f.result() for f in futs)

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)
        for b in self.bufs:
            b.close()


def pages_of(ids: np.ndarray, row_bytes: int, data_offset: int) -> np.ndarray:
    start = data_offset + np.unique(ids) * row_bytes
    return np.union1d(start // PAGE, (start + row_bytes - 1) // PAGE)


# ---------------------------------------------------------------------------- the benchmark


def random_table_blocks(rows: int, dim: int, seed: int, block: int = 1 << 18) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for s in range(0, rows, block):
        yield torch.randn(min(block, rows - s), dim, generator=g)


def time_interleaved(
    contenders: dict[str, Callable[[int], object]], repeats: int, desc: str, limit: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Like _common.interleaved_timings, but each repeat r hands batch r to every contender.

    ``limit[name] = k`` runs a (very slow) contender only in the first k repeats; its paired
    ratios then use the references' samples of those same repeats.
    """
    names = list(contenders)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            if r >= (limit or {}).get(n, repeats):
                continue
            t0 = time.perf_counter()
            contenders[n](r)
            out[n].append(time.perf_counter() - t0)
    return out


def bench_source(
    reqs: list[torch.Tensor],
    packed: torch.Tensor,
    raw: RawDirectReader,
    tiers: dict[str, RowTable],
    row_bytes: int,
    data_offset: int,
    dim: int,
    repeats: int,
    mooncake_repeats: int,
    desc: str,
) -> dict[str, Any]:
    """Time every tier and both references on the same request sequence; summaries and ratios."""
    flat = [r.reshape(-1) for r in reqs]
    page_sets = [pages_of(f.numpy(), row_bytes, data_offset) for f in flat]
    out_buf = torch.empty(*reqs[0].shape, dim)
    contenders: dict[str, Callable[[int], object]] = {
        "ref_index_select": lambda r: torch.index_select(packed, 0, flat[r]),
        "ref_odirect_4k": lambda r: raw.read_pages(page_sets[r]),
    }
    for name, t in tiers.items():
        contenders[name] = lambda r, t=t: t.gather(reqs[r], out=out_buf)
    for t in tiers.values():
        t.stats.reset()
    times = time_interleaved(contenders, repeats, desc, {"mooncake": mooncake_repeats})
    lookups = flat[0].numel()
    uniq = [int(torch.unique(f).numel()) for f in flat]
    res: dict[str, Any] = {
        "lookups_per_request": lookups,
        "unique_rows_per_request_median": float(np.median(uniq)),
        "pages_per_request_median": float(np.median([p.size for p in page_sets])),
        "contenders": {},
    }
    for name, ts in times.items():
        s = stats(ts)
        per_req = list(zip(uniq, ts, strict=False))  # a limited contender has fewer samples
        entry: dict[str, Any] = {
            "seconds": s,
            "rows_per_s": lookups / s["median"],
            "unique_rows_per_s": float(np.median([u / t for u, t in per_req])),
            "gb_per_s_used": float(np.median([u * row_bytes / t / 1e9 for u, t in per_req])),
        }
        if name == "ref_index_select":  # it moves every lookup, duplicates included
            entry["gb_per_s_used"] = lookups * row_bytes / s["median"] / 1e9
        if name == "ref_odirect_4k":
            entry["gb_per_s_read"] = float(
                np.median([p.size * PAGE / t / 1e9 for p, t in zip(page_sets, ts, strict=True)])
            )
        if name in tiers:
            entry["store_stats"] = tiers[name].stats.as_dict()
        res["contenders"][name] = entry
    # Time ratios tier / reference (>1: slower than the physical reference), paired per repeat.
    ratios: dict[str, Any] = {}
    for name in tiers:
        ref = "ref_odirect_4k" if name.startswith(("direct", "cached_direct")) else "ref_index_select"
        k = len(times[name])
        ratios[name] = {"vs": ref, **stats(paired_ratios(times[name], times[ref][:k]))}
    ratios["direct_vs_ref_index_select"] = stats(paired_ratios(times["direct"], times["ref_index_select"]))
    res["time_ratio_vs_reference"] = ratios
    # >1: how much slower a verified gather is than the same tier unverified, paired per repeat.
    res["verification_cost"] = {
        name: stats(paired_ratios(times[name], times[f"{name}_noverify"])) for name in ("mmap", "direct")
    }
    return res


def bench_format(
    fmt_name: str,
    workdir: Path,
    rows: int,
    dim: int,
    batches: dict[str, list[torch.Tensor]],
    warm_batches: list[torch.Tensor],
    repeats: int,
    queue_depth: int,
    cache_fraction: float,
    mooncake: Any | None,
    head_sizes: list[int],
    fingerprint: str,
    mooncake_repeats: int,
) -> dict[str, Any]:
    fmt = get_format(fmt_name)
    path = workdir / f"table-{fmt_name}.engst"
    t0 = time.perf_counter()
    header = write_store(path, random_table_blocks(rows, dim, 0), fmt, fingerprint, progress=True, total_rows=rows)
    write_s = time.perf_counter() - t0
    packed = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=rows * header.row_bytes,
                                          offset=header.data_offset).reshape(rows, header.row_bytes))  # fmt: skip
    tiers: dict[str, RowTable] = {
        "memory": MemoryTable(packed, fingerprint, row_format=fmt),
        "mmap": MmapTable(path, fingerprint),
        "mmap_noverify": MmapTable(path, fingerprint, verify=False),
        "direct": DirectFileTable(path, fingerprint, queue_depth=queue_depth),
        "direct_noverify": DirectFileTable(path, fingerprint, queue_depth=queue_depth, verify=False),
    }
    t0 = time.perf_counter()
    check_chunks(header, packed.numpy())  # what the memory tier does at open (it reads the file anyway)
    check_s = time.perf_counter() - t0
    cache_budget = int(cache_fraction * rows) * dim * 4
    tiers["cached_direct"] = CachedTable(DirectFileTable(path, fingerprint, queue_depth=queue_depth), cache_budget)
    upload_s = None
    if mooncake is not None and fmt_name == "fp32":
        t0 = time.perf_counter()
        tiers["mooncake"] = MooncakeTable.populate(mooncake, 1, packed.view(torch.float32), head_sizes,
                                                   fingerprint)  # fmt: skip
        upload_s = time.perf_counter() - t0
    raw = RawDirectReader(path, queue_depth)
    if not tiers["direct"].direct_io:  # type: ignore[attr-defined]
        raise RuntimeError(f"{path}: O_DIRECT refused; pass --dir on a filesystem that supports it")

    # Correctness before timing.
    probe = batches["text"][0]
    want = tiers["memory"].gather(probe)
    for name, t in tiers.items():
        if not torch.equal(t.gather(probe), want):
            raise AssertionError(f"{fmt_name}/{name}: rows differ from the memory tier")
    for b in warm_batches:  # warm the cache on text batches not used for timing
        tiers["cached_direct"].gather(b)
    first = batches["uniform"][0]
    tiers["mmap_noverify"].gather(first)  # page cache warm for both
    with MmapTable(path, fingerprint) as cold:
        t0 = time.perf_counter()
        cold.gather(first)
        cold_s = time.perf_counter() - t0
        cold_pages = cold.pages_checked
    t0 = time.perf_counter()
    tiers["mmap_noverify"].gather(first)
    plain_s = time.perf_counter() - t0

    results: dict[str, Any] = {
        "row_bytes": header.row_bytes,
        "file_bytes": header.file_size,
        "write_seconds": write_s,
        "mooncake_upload_seconds": upload_s,
        "memory_open_check": {"seconds": check_s, "gb_per_s": header.data_bytes / check_s / 1e9},
        "mmap_first_touch": {
            "seconds_verified": cold_s,
            "seconds_unverified": plain_s,
            "ratio": cold_s / plain_s,
            "pages_checked": cold_pages,
            "us_per_page": (cold_s - plain_s) / cold_pages * 1e6,
        },
        "sources": {},
    }
    for source, reqs in batches.items():
        res = bench_source(reqs, packed, raw, tiers, header.row_bytes, header.data_offset, dim, repeats,
                           mooncake_repeats, f"{fmt_name}/{source}")  # fmt: skip
        results["sources"][source] = res
        line = ", ".join(f"{n} {c['rows_per_s'] / 1e6:.2f}" for n, c in res["contenders"].items())
        print(f"{fmt_name}/{source}: Mrows/s {line}")
        cost = ", ".join(f"{n} x{c['median']:.2f}" for n, c in res["verification_cost"].items())
        print(f"{fmt_name}/{source}: verified/unverified time {cost}")
    raw.close()
    for t in tiers.values():
        if isinstance(t, RowTable) and t is not tiers.get("mooncake"):
            t.close()
    if "mooncake" in tiers:
        tiers["mooncake"].remove()  # type: ignore[attr-defined]
    path.unlink()
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-scale", type=float, default=0.2, help="scale of the demo preset's per-head table size")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--queue-depth", type=int, default=64)
    ap.add_argument("--cache-fraction", type=float, default=0.1)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--no-mooncake", action="store_true")
    ap.add_argument("--mooncake-repeats", type=int, default=3, help="repeats for the (slow) Mooncake tier")
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (must accept O_DIRECT)")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cfg = get_preset("demo")
    assert cfg.engram is not None and cfg.engram.tokenizer is not None
    tok = resolve_tokenizer(cfg.engram.tokenizer)
    base = cfg.engram.hash
    spec = base.replace(engram_vocab_size=tuple(int(v * args.vocab_scale) for v in base.engram_vocab_size),
                        layer_ids=(base.layer_ids[0],))  # fmt: skip
    layout = make_layout(spec, CompressionMap.from_tokenizer(tok))
    rows, dim = layout.rows_of(layout.layer_ids[0]), cfg.engram.head_dim
    head_sizes = layout.head_sizes(layout.layer_ids[0])
    n_warm = 8
    per_req = args.batch * args.seq
    raw, text_info = stdlib_token_ids(tok, per_req * (args.repeats + n_warm))
    ids = NgramHasher(layout)(torch.from_numpy(raw.reshape(-1, args.seq)))[0]  # [S, T, H]
    text = [ids[i * args.batch : (i + 1) * args.batch].to(torch.int64) for i in range(args.repeats + n_warm)]
    g = torch.Generator().manual_seed(0)
    uniform = [torch.randint(0, rows, text[0].shape, generator=g) for _ in range(args.repeats)]
    batches = {"text": text[n_warm:], "uniform": uniform}

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="engramlm_bench_store_", dir=args.dir))
    mooncake = None
    try:
        with contextlib.ExitStack() as stack:
            if not args.no_mooncake:  # a real master on 127.0.0.1, one client lending the pool's memory
                master = stack.enter_context(local_master(scratch / "mooncake_master.log"))
                mooncake = connect(master, max(1 << 30, int(rows * dim * 4 * 1.25)), 256 << 20)
                stack.callback(mooncake.close)
            results = {
                f: bench_format(f, scratch, rows, dim, batches, text[:n_warm], args.repeats, args.queue_depth,
                                args.cache_fraction, mooncake, head_sizes, layout.fingerprint, args.mooncake_repeats)
                for f in args.formats
            }  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    payload = {
        "kind": "store",
        "parameters": {"preset": "demo", "vocab_scale": args.vocab_scale, "table_rows": rows, "dim": dim,
                       "heads": layout.heads_per_layer, "batch": args.batch, "seq": args.seq,
                       "lookups_per_request": per_req * layout.heads_per_layer, "repeats": args.repeats,
                       "queue_depth": args.queue_depth, "cache_fraction": args.cache_fraction,
                       "cache_policy": "lfu", "cache_warm_batches": n_warm, "scratch_dir": str(scratch.parent),
                       "mooncake": mooncake is not None, "mooncake_repeats": args.mooncake_repeats,
                       "layout_fingerprint": layout.fingerprint},
        "text": text_info,
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "formats": results,
    }  # fmt: skip
    path = write_result("store", payload, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
