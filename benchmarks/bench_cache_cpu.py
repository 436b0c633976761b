"""Issue 18: what the SSD tier's hot-row cache costs the decode thread, per gather, in CPU and GIL time.

Why: ``bench_generate --threads 1`` showed decode getting slower as the cache grew (ssd c0 +3.5%, c10
+10.5%, c50 +10.8% over tables in the model) although the hit rate rose: the cache's own Python held the
GIL against the model's dispatch for longer than the reads it saved (the aio engine reads in a ``nogil``
Numba call). Wall-clock ratios are useless on a machine shared with a training job, so this measures
CPU: per gather, the calling thread's CPU (``time.thread_time``) and, of it, the CPU spent inside calls
that release the GIL (the aio kernel, and the cache's own Numba kernels), timed by wrapping them; the
rest is the GIL-held estimate (torch ops in the caller release the GIL but are counted: an upper bound).

Access pattern: ``bench_generate``'s, real text. The same model, hashing and BPE workload (its helpers),
tables exported to real store files and read with O_DIRECT; every Engram layer is gathered once per
decode step for a batch of ``--batch`` held-out texts (the rows the prefetcher asks for), each repeat
on new texts. Caches are first warmed on other text as ``bench_generate.warm_caches`` does.

Contenders, each its own ``DirectFileTable`` on the same files, timed in interleaved blocks of
``--steps`` decode steps: ``memory`` (the rows in RAM: a gather's Python alone), ``c0`` (no cache),
``cN`` (this tree's ``CachedTable`` of N% of the table bytes), each also as ``*_before`` (the same tables gathered
by the gather before issue 18's fused path: ``gather_before``) and, with ``--baseline-rev``, ``cN_base``
(the ``CachedTable`` of that git revision, loaded from its source, on the same warm-up: the before).
``process_cpu_ms`` adds every thread's CPU (glibc's AIO helpers, which run no Python, do the reads).

Run from the repository root: ``nice python -m benchmarks.bench_cache_cpu`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks._common import paired_ratios, stats, write_result
from benchmarks.bench_generate import build_model, build_workload
from benchmarks.bench_store_io import NogilClock
from engramlm.infer.tables import export_model_tables, model_tables, open_tables
from engramlm.store import _aio
from engramlm.store import base as base_store
from engramlm.store import cache as cache_mod
from engramlm.store.base import RowTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.tiers import Tier

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(rev: str, into: Path) -> Any:
    """The ``engramlm.store.cache`` module as it was at git revision ``rev`` (None if git cannot give it)."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:src/engramlm/store/cache.py"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"baseline {rev} unavailable: {exc}")
        return None
    path = into / "cache_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("engramlm_cache_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def gather_before(table: RowTable, row_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``RowTable.gather`` as it was before the fused path (revision e6cc23b, verbatim but for ``table``): torch's
    ``unique``, two item reads, the tier's own ``_fetch_unique`` (unchanged since), ``index_select``. The same
    run's before, on tables of the same kind and state."""
    start = time.perf_counter()
    ids = torch.as_tensor(row_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"row ids must be an integer tensor, got {ids.dtype}")
    flat = ids.reshape(-1).to("cpu", torch.int64)
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1])
    if lo < 0 or hi >= table.num_rows:
        raise IndexError(f"row ids out of range: min {lo}, max {hi}")
    rows = table._fetch_unique(unique)
    out2d = out.view(-1, table.dim)
    if rows.dtype == out.dtype and out.is_contiguous():
        torch.index_select(rows, 0, inverse, out=out2d)
    else:
        out2d.copy_(rows.index_select(0, inverse))
    table.stats.add(
        requests=1,
        rows_total=flat.numel(),
        rows_unique=unique.numel(),
        bytes_used=unique.numel() * table.row_bytes,
        time_s=time.perf_counter() - start,
    )
    return out


def wrap_nogil(mod: Any, names: tuple[str, ...], clock: NogilClock) -> None:
    """Time the module's GIL-releasing kernels that exist (called through module globals, so this reaches them)."""
    for name in names:
        if hasattr(mod, name):
            setattr(mod, name, clock.wrap(getattr(mod, name)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="tokens before the first timed step")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed block")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--cache-pcts", type=float, nargs="+", default=[5, 10, 50])
    ap.add_argument(
        "--baseline-rev", default="none", help="git revision whose CachedTable is the before ('none': no _base rows)"
    )
    ap.add_argument("--warm-tokens", type=int, default=100_000)
    ap.add_argument(
        "--no-before", action="store_true", help="skip the *_before contenders (the gather before the fused path)"
    )
    # The model shape only decides the hashing and the table sizes: bench_generate's defaults.
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engram-layers", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-rows", type=int, default=100_003)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--corpus-mb", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where the store files go (must not be tmpfs for O_DIRECT)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small tables, 2 repeats")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--out", default="cache_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.head_rows, args.repeats, args.steps, args.warm_tokens = 5003, 2, 8, 5000
    torch.set_num_threads(1)

    tok, streams = build_workload(args)
    model = build_model(tok, args)
    need = args.repeats * args.batch
    span = args.prompt + args.steps
    streams = [s for s in streams if s.numel() >= span]
    if len(streams) < need + 1:
        raise SystemExit(f"only {len(streams)} held-out files long enough; need {need + 1} (raise --corpus-mb)")
    with torch.inference_mode():
        # Row ids per decode step, per layer: [batch, H_e] each (what the prefetcher gathers).
        steps: list[list[dict[int, torch.Tensor]]] = []
        for r in range(args.repeats):
            tokens = torch.stack([s[:span] for s in streams[r * args.batch : (r + 1) * args.batch]])
            rows = model.layout.split(model.hash(tokens))
            steps.append([{lid: rows[lid][:, t].contiguous() for lid in rows} for t in range(args.prompt, span)])
        warm_ids = torch.cat(streams[need:])[: args.warm_tokens]
        warm_rows = model.layout.split(model.hash(warm_ids.reshape(1, -1)))
    layer_rows = {lid: int(r.numel()) for lid, r in steps[0][0].items()}

    workroot = Path(args.workdir) if args.workdir else Path(__file__).resolve().parent / "results" / "tmp"
    workroot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_cpu_", dir=workroot))
    opened: list[RowTable] = []
    try:
        store = tmp / "store"
        export_model_tables(model, store, progress=True)
        fp = model.layout.fingerprint
        paths = {lid: t.header.path for lid, t in open_tables(store, Tier.DIRECT, fingerprint=fp).items()}
        mem = model_tables(model)
        base_mod = None if args.baseline_rev == "none" else load_baseline(args.baseline_rev, tmp)
        clock = NogilClock()  # blocks run one at a time: one clock for every kernel
        wrap_nogil(_aio, ("fetch", "gather"), clock)  # the read kernel; gather: with dedupe and expansion
        # called from Python; the rest run inside them (the names a revision lacks are skipped)
        wrap_nogil(cache_mod, ("_probe", "_admit", "_probe_flat", "_expand"), clock)
        wrap_nogil(base_store, ("unique_inverse",), clock)  # the gather's dedupe kernel
        if base_mod is not None:
            wrap_nogil(base_mod, ("_coldest_small",), clock)

        def direct(lid: int) -> DirectFileTable:
            t = DirectFileTable(paths[lid], fp)
            opened.append(t)
            return t

        # memory: the same gather path with the rows in RAM (the cost of a gather's Python alone)
        contenders: dict[str, dict[int, RowTable]] = {"c0": {lid: direct(lid) for lid in paths}, "memory": mem}
        if not args.no_before:
            contenders["c0_before"] = {lid: direct(lid) for lid in paths}
            contenders["memory_before"] = model_tables(model)
        for pct in args.cache_pcts:
            for suffix, mod in (("", cache_mod), ("_base", base_mod)):
                if mod is None:
                    continue
                budget = {lid: int(mem[lid].num_rows * args.head_dim * 4 * pct / 100) for lid in paths}
                contenders[f"c{pct:g}{suffix}"] = {lid: mod.CachedTable(direct(lid), budget[lid]) for lid in paths}
            if not args.no_before:
                contenders[f"c{pct:g}_before"] = {lid: cache_mod.CachedTable(direct(lid), budget[lid]) for lid in paths}
        if not all(t.direct_io for t in opened if isinstance(t, DirectFileTable)):
            raise SystemExit(f"{tmp}: O_DIRECT refused; pass --workdir on a filesystem that supports it")
        chunk = args.batch * args.prompt
        for tables in contenders.values():  # warm-up as bench_generate.warm_caches: misses served from RAM
            for lid, t in tables.items():
                if hasattr(t, "inner"):
                    inner, t.inner = t.inner, mem[lid]  # type: ignore[attr-defined]
                    for part in warm_rows[lid][0].split(chunk):
                        t.gather(part)
                    t.inner = inner  # type: ignore[attr-defined]
                t.gather(steps[0][0][lid])  # buffers and kernels exist before timing
                t.stats.reset()

        names = list(contenders)
        samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        load_before = os.getloadavg()
        for r in tqdm(range(args.repeats), desc="cache cpu", unit="repeat"):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                tables = contenders[name]
                n = 0
                nogil0, cpu0, w0 = clock.seconds, time.thread_time(), time.perf_counter()
                proc0 = time.process_time()
                before = name.endswith("_before")
                for step in steps[r]:
                    for lid, ids in step.items():
                        out = torch.empty(*ids.shape, args.head_dim)  # the prefetcher's staging buffer
                        if before:
                            gather_before(tables[lid], ids, out)
                        else:
                            tables[lid].gather(ids, out=out)
                        n += 1
                wall, cpu, nogil = time.perf_counter() - w0, time.thread_time() - cpu0, clock.seconds - nogil0
                proc = time.process_time() - proc0  # every thread: the caller plus glibc's AIO helpers (no Python)
                for key, v in (
                    ("process_cpu_ms", proc),
                    ("wall_ms", wall),
                    ("cpu_ms", cpu),
                    ("nogil_cpu_ms", nogil),
                    ("gil_held_ms", cpu - nogil),
                ):
                    samples[name].setdefault(key, []).append(1e3 * v / n)
        load_after = os.getloadavg()
    finally:
        for t in opened:
            t.close()
        shutil.rmtree(tmp, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in names:
        r = {key: stats(v) for key, v in samples[name].items()}
        for key in ("cpu_ms", "gil_held_ms"):
            r[f"{key}_ratio_to_c0"] = stats(paired_ratios(samples[name][key], samples["c0"][key]))
        hits = sum(getattr(t.stats, "hits", 0) for t in contenders[name].values())
        misses = sum(getattr(t.stats, "misses", 0) for t in contenders[name].values())
        r["hit_rate"] = hits / max(hits + misses, 1)
        results[name] = r
    payload = {
        "benchmark": "cache_cpu",
        "kind": "cache_cpu",
        "params": vars(args) | {"results_dir": str(args.results_dir) if args.results_dir else None},
        "workload": {"rows_per_gather": layer_rows, "gathers_per_step": len(paths), "steps_per_block": args.steps},
        "load_average_before_after": [load_before, load_after],
        "results": results,
    }
    out = write_result(args.out, payload, args.results_dir)
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; per gather, median over {args.repeats} blocks:")
    head = ("hit", "cpu ms", "gil ms", "nogil ms", "proc ms", "cpu/c0", "gil/c0")
    print(f"{'':14s} " + " ".join(f"{h:>8s}" for h in head))
    for name, r in results.items():
        cells = [r[k]["median"] for k in ("cpu_ms", "gil_held_ms", "nogil_cpu_ms", "process_cpu_ms")]
        ratios = [r[k]["median"] for k in ("cpu_ms_ratio_to_c0", "gil_held_ms_ratio_to_c0")]
        print(f"{name:14s} {r['hit_rate']:8.1%} " + " ".join(f"{v:8.3f}" for v in cells + ratios))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
