"""Generate the Markdown benchmark tables from ``benchmarks/results/*.json``.

Why: numbers in a README drift from the runs they came from when typed by hand. Every table is
rendered from the result files, with the machine and the exact command beneath it, and
``--update-readme FILE`` splices them between ``<!-- bench:<kind>:start -->`` and
``<!-- bench:<kind>:end -->`` markers (only where both markers exist). Kinds: hashing, engram_block,
store, store_io, cache_cpu, row_access, sparse_update, head_to_head, head_to_head_why, generate, reproductions, depth,
distributed, muon, lm_eval_h2h, serve, decode_vs_hf, train_step, ssd_train, block0, h2h_trend, h2h_splits. A
result
whose kind is a renderer's name plus a suffix (``head_to_head_quick``, ``generate_t1``) stacks under that
renderer.

Usage: ``python -m benchmarks.make_tables [--results-dir DIR] [--update-readme README.md]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parent.parent


def _ms(s: dict[str, Any]) -> str:
    """Median and IQR of a seconds summary, in ms."""
    return f"{s['median'] * 1e3:.2f} ({s['q1'] * 1e3:.2f}–{s['q3'] * 1e3:.2f})"


def _x(s: dict[str, Any]) -> str:
    """Median ratio with its IQR."""
    return f"{s['median']:.2f}× ({s['q1']:.2f}–{s['q3']:.2f})"


def _opt(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _load(doc: dict[str, Any]) -> str:
    """1-minute load average before -> after the run, where the benchmark recorded it (shared machines)."""
    la = doc.get("load_average_1_5_15") or doc.get("load_average_before_after")
    if isinstance(la, dict):
        la = [la.get("before"), la.get("after")]
    if not la or len(la) != 2 or not all(la):
        return ""
    return f" · load {la[0][0]:.1f}→{la[1][0]:.1f}"


def _hash_threads(m: dict[str, Any]) -> str:
    """Results before hash_threads existed recorded Numba's (OpenMP) pool size instead."""
    if "hash_threads" in m:
        return f"hashing {m['hash_threads']}"
    return f"numba {m.get('numba_threads')} ({m.get('numba_threading_layer')})"


def _footer(doc: dict[str, Any]) -> list[str]:
    """Provenance line under every table: machine, versions, thread env, command, time."""
    m = doc.get("machine", {})
    env = {k: v for k, v in (m.get("thread_env") or {}).items() if v is not None}
    env_s = ", ".join(f"{k}={v}" for k, v in env.items()) or "defaults"
    commit = (m.get("git_commit") or "uncommitted")[:12]
    return [
        "",
        f"<sub>{m.get('cpu_model')} · {m.get('cpu_count')} cores · {m.get('ram_gib')} GiB · "
        f"python {m.get('python')} · torch {m.get('torch')} · numpy {m.get('numpy')} · "
        f"numba {m.get('numba')} · threads: torch {m.get('torch_threads')}, {_hash_threads(m)} · "
        f"env: {env_s}{_load(doc)} · "
        f"commit {commit} · {doc.get('timestamp_utc')}<br>`{doc.get('command')}`</sub>",
    ]


def _image(doc: dict[str, Any], plot: str | None, alt: str) -> list[str]:
    """An image link to a plot written next to the result file, relative to the repository root (where the
    README is); nothing if the benchmark wrote no plot or the file is missing. Benchmarks record plot paths
    inconsistently (bare name, repo-relative, absolute), so only the file name is trusted."""
    src = doc.get("_path")
    if not plot or src is None:
        return []
    png = Path(src).resolve().parent / Path(plot).name
    if not png.is_file():
        return []
    try:
        link = png.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        link = png.as_posix()
    return ["", f"![{alt}]({link})"]


def _throughput_block(doc: dict[str, Any]) -> int | None:
    return next((r.get("throughput_block_calls") for r in doc["presets"].values()), None)


def hashing_table(doc: dict[str, Any]) -> list[str]:
    """Throughput, speedup, bound and streaming latency of one hashing result file."""
    p = doc["parameters"]
    lines = [
        f"**Hashing, variant `{doc.get('variant', 'default')}`**: B={p['batch']}, T={p['seq']} "
        f"real tokens (CPython stdlib sources), both Engram layers, compression included on "
        f"both sides; median (IQR) over {p['repeats']} interleaved repeats; speedup = paired "
        f"per-repeat ratio, target ≥ {p['target_speedup']:.0f}× in throughput."
        + (
            " **Throughput**: each sample is "
            f"{block} calls back to back, library and reference alternating (a loader hashing batch after "
            "batch); **single call**: one call right after the other contender's, which has just evicted "
            "the caches (a latency under interference)."
            if (block := _throughput_block(doc))
            else ""
        ),
        "",
        "| preset | contender | ms / call, single | Mtok/s | speedup, single call | ms / call, throughput "
        "| **speedup, throughput** |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "reference_numpy": "reference (NumPy)",
        "library_auto": "NgramHasher auto (Numba)",
        "library_1thread": "NgramHasher 1 thread",
        "library_torch": "NgramHasher torch",
    }
    for preset, r in doc["presets"].items():
        for key, label in names.items():
            sp = r["speedup_vs_reference"].get(key)
            tp = r.get("throughput_speedup_vs_reference", {}).get(key)
            blk = r["timing_s"].get(f"{key}_block")
            lines.append(
                f"| {preset} | {label} | {_ms(r['timing_s'][key])} | "
                f"{r['tokens_per_s'][key]['median'] / 1e6:.2f} | {_x(sp) if sp else '1×'} | "
                f"{_ms(blk) if blk else '—'} | {f'**{_x(tp)}**' if tp else ('1×' if blk else '—')} |"
            )
    lines += [
        "",
        "| preset | ns/(token·head) call | cycles/(token·head), 1 thread | write GB/s (call) | "
        "memcpy GB/s | memcpy time / call time | JIT first call s | cold compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, r in doc["presets"].items():
        b, j = r["bound"], r["jit"]
        lines.append(
            f"| {preset} | {b['ns_per_token_head_call']:.2f} | {_opt(b['cycles_per_token_head_1thread'], '.1f')} | "
            f"{b['write_gbps_call']:.2f} | {b['memcpy_gbps']:.2f} | {b['fraction_of_memcpy_call'] * 100:.0f}% | "
            f"{j['first_call_s']:.3f} | {_opt(j['cold_compile_first_call_s'], '.2f')} |"
        )
    lines += [
        "",
        "The kernel compresses, hashes and writes in one pass, so the call is the kernel. "
        "'memcpy time / call time' near 100% means the call costs what copying its output costs. "
        "'JIT first call' may be a Numba disk-cache load; 'cold compile' compiles a fresh "
        "dispatcher with the cache off.",
        "",
        "| preset | streaming step µs (B=8) | p99 µs | tokens/s | matches batch |",
        "|---|---|---|---|---|",
    ]
    for preset, r in doc["presets"].items():
        s = r["streaming"]
        lat = s["step_latency_s"]
        lines.append(
            f"| {preset} | {lat['median'] * 1e6:.1f} ({lat['q1'] * 1e6:.1f}–{lat['q3'] * 1e6:.1f})"
            f" | {s['step_latency_p99_s'] * 1e6:.1f} | {s['tokens_per_s_median_step']:,.0f} | "
            f"{'yes' if s['verified_equal_to_batch'] else 'NO'} |"
        )
    return lines + _footer(doc)


def engram_block_table(doc: dict[str, Any]) -> list[str]:
    """Forward time against the official demo module, the reference structure and the autograd path."""
    if "cells" not in doc:  # version 1 files: block vs reference and the matmul peak only
        return _engram_block_table_v1(doc)
    g, p, demo = doc["geometry"], doc["parameters"], doc["official_demo"]
    demo_s = (
        f"official demo `{demo['path']}` (sha256 {demo['sha256'][:12]})"
        if demo.get("available")
        else f"official demo not run ({demo.get('error') or 'no --demo-file'})"
    )
    lines = [
        f"**Engram block forward** (v{doc['version']}; demo geometry: d={g['hidden']}, M={g['branches_M']}, "
        f"{g['heads']}×{g['head_dim']} = d_mem {g['d_mem']}, conv={g['conv']} (random weights), "
        f"{g['table_rows']:,} rows), T={p['seq']}, fp32, glibc's default allocator; {demo_s}; all contenders "
        f"share the weights and inputs, outputs checked allclose(1e-4). Median (IQR) over {p['repeats']} "
        "interleaved repeats; × = paired per-repeat time ratio contender ÷ EngramBlock; faults = minor page "
        "faults per call; floor = compulsory bytes at the measured copy bandwidth ÷ block time.",
        "",
        "| B | threads | EngramBlock ms | × official demo | × ReferenceEngram | × autograd path | "
        "faults block / demo / autograd | matmul ÷ block | bytes/token (compulsory) | copy GB/s | floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["cells"]:
        sp, fl = c["speedup_of_engram_block"], c["minor_faults_per_call"]
        demo_x = _x(sp["official_demo"]) if "official_demo" in sp else "—"
        demo_f = f"{fl['official_demo']['median']:,.0f}" if "official_demo" in fl else "—"
        lines.append(
            f"| {c['batch']} | {c['threads']} | {_ms(c['timing_s']['engram_block'])} | **{demo_x}** | "
            f"{_x(sp['reference_engram'])} | {_x(sp['engram_block_autograd'])} | "
            f"{fl['engram_block']['median']:,.0f} / {demo_f} / {fl['engram_block_autograd']['median']:,.0f} | "
            f"{c['matmul_fraction']['median']:.0%} | {c['bytes_per_token']['compulsory'] / 1024:.1f} KiB | "
            f"{c['memory_bandwidth_gbs']['median']:.1f} | {c['bandwidth_floor_fraction']['median']:.0%} |"
        )
    return lines + _footer(doc)


def _engram_block_table_v1(doc: dict[str, Any]) -> list[str]:
    """Forward time, GFLOP/s and fraction of the measured matmul peak."""
    g, p = doc["geometry"], doc["parameters"]
    lines = [
        f"**Engram block forward** (demo geometry: d={g['hidden']}, M={g['branches_M']}, "
        f"{g['heads']}×{g['head_dim']} = d_mem {g['d_mem']}, conv={g['conv']}, "
        f"{g['table_rows']:,} rows), B={p['batch']}, T={p['seq']}, fp32; "
        f"{doc['flops']['total'] / 1e9:.2f} GFLOP/forward; median (IQR) over "
        f"{p['repeats']} interleaved repeats; outputs allclose(1e-4), max |diff| "
        f"{doc['max_abs_diff']:.1e}.",
        "",
        "| contender | ms / forward | GFLOP/s | fraction of matmul peak | speedup vs reference |",
        "|---|---|---|---|---|",
    ]
    t, gf, fr = doc["timing_s"], doc["gflops"], doc["fraction_of_matmul_peak"]
    rows = [
        ("EngramBlock (fused)", "engram_block", _x(doc["speedup_vs_reference"])),
        ("ReferenceEngram", "reference_engram", "1×"),
    ]
    for label, key, sp in rows:
        f = fr[key]
        lines.append(
            f"| {label} | {_ms(t[key])} | {gf[key]['median']:.1f} | {f['median'] * 100:.0f}% "
            f"({f['q1'] * 100:.0f}–{f['q3'] * 100:.0f}%) | {sp} |"
        )
    (n, k), (_, nn) = doc["matmul_shape"]
    lines.append(
        f"| torch.matmul [{n}, {k}]×[{k}, {nn}] (peak) | {_ms(t['matmul_peak'])} | "
        f"{gf['matmul_peak']['median']:.1f} | 100% | — |"
    )
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- store


def _cell_ratio(r: dict[str, Any] | None) -> str:
    return "—" if r is None else _x(r)


def _sig(v: float) -> str:
    """About three significant digits without scientific notation (throughputs span 4 decades)."""
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def store_table(doc: dict[str, Any]) -> list[str]:
    """Gather throughput per tier and row format, each as a paired time ratio to its physical reference."""
    p, formats = doc["parameters"], doc["formats"]
    known = ("fp32", "bf16", "fp8_e4m3_ue8m0")
    fmts = sorted(formats, key=lambda f: (known.index(f) if f in known else len(known), f))
    labels = {
        "memory": "memory (`MemoryTable`)",
        "mmap": "mmap (page cache, warm)",
        "direct": f"direct (O_DIRECT, queue depth {p['queue_depth']})",
        "cached_direct": f"cached direct ({p['cache_policy'].upper()} {p['cache_fraction']:.0%} of rows + direct)",
        "mooncake": "Mooncake (TCP on 127.0.0.1)",
        "ref_index_select": "**ref** `torch.index_select` in RAM",
        "ref_odirect_4k": "**ref** raw O_DIRECT 4 KiB reads",
    }
    sources = {"text": "real row ids (stdlib text, demo hash)", "uniform": "uniform random row ids"}
    lines = [
        f"**Store gather**: one `{p['preset']}`-layout table of {p['table_rows']:,} rows × {p['dim']} "
        f"(vocab scale {p['vocab_scale']}), requests of B={p['batch']}×T={p['seq']}×{p['heads']} heads = "
        f"{p['lookups_per_request']:,} lookups; median over {p['repeats']} interleaved repeats "
        f"(Mooncake {p['mooncake_repeats']}). Cell: M lookups/s · time ÷ the tier's physical reference "
        "(paired per-repeat ratio, median (IQR); 1× = as fast as the hardware path, >1× slower). "
        "Reference: `index_select` for memory, mmap and Mooncake; raw O_DIRECT reads for direct and cached direct.",
    ]
    for source, caption in sources.items():
        if not any(source in formats[f]["sources"] for f in fmts):
            continue
        lines += ["", f"| {caption} | " + " | ".join(fmts) + " |", "|---" * (len(fmts) + 1) + "|"]
        srcs = {f: formats[f]["sources"].get(source) for f in fmts}
        for tier, label in labels.items():
            cells = []
            for f in fmts:
                c = (srcs[f] or {}).get("contenders", {}).get(tier)
                if c is None:
                    cells.append("—")
                    continue
                ratio = "ref" if tier.startswith("ref_") else _cell_ratio(srcs[f]["time_ratio_vs_reference"].get(tier))
                cells.append(f"{_sig(c['rows_per_s'] / 1e6)} · {ratio}")
            if any(c != "—" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        gap = [_cell_ratio((srcs[f] or {}).get("time_ratio_vs_reference", {}).get("direct_vs_ref_index_select"))
               for f in fmts]  # fmt: skip
        lines.append("| direct ÷ RAM `index_select` (the SSD gap) | " + " | ".join(gap) + " |")
        for tier in ("direct", "mmap"):  # the default (verified) tier against verify=False, same run
            cost = [_cell_ratio(((srcs[f] or {}).get("verification_cost") or {}).get(tier)) for f in fmts]
            if any(c != "—" for c in cost):
                lines.append(f"| {tier}: verified ÷ `verify=False` (page CRC32 cost) | " + " | ".join(cost) + " |")
    lines += [
        "",
        "| format | row bytes | file MiB | unique / lookups (text · uniform) | direct read amplification "
        "(text · uniform) | cache hit rate (text · uniform) | Mooncake upload s |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fmts:
        r = formats[f]
        src = r["sources"]

        def both(get: Callable[[dict[str, Any]], float], fmt: str, src: dict[str, Any] = src) -> str:
            return " · ".join(format(get(src[s]), fmt) if s in src else "—" for s in ("text", "uniform"))

        lines.append(
            f"| {f} | {r['row_bytes']} | {r['file_bytes'] / 2**20:,.0f} | "
            f"{both(lambda s: s['unique_rows_per_request_median'] / s['lookups_per_request'], '.0%')} | "
            f"{both(lambda s: s['contenders']['direct']['store_stats']['amplification'], '.1f')}× | "
            f"{both(lambda s: s['contenders']['cached_direct']['store_stats']['hit_rate'], '.0%')} | "
            f"{_opt(r.get('mooncake_upload_seconds'), '.2f')} |"
        )
    once = [
        f"{f}: memory tier's open check {r['memory_open_check']['gb_per_s']:.1f} GB/s; a fresh verified mmap's first "
        f"touch {r['mmap_first_touch']['us_per_page']:.1f} µs/page ({r['mmap_first_touch']['ratio']:.1f}× unverified)"
        for f in fmts
        if "memory_open_check" in (r := formats[f]) and "mmap_first_touch" in r
    ]
    if once:
        lines += ["", "One-off verification costs: " + "; ".join(once) + "."]
    return lines + _footer(doc)


def store_io_table(doc: dict[str, Any]) -> list[str]:
    """How long a gather holds the GIL per I/O engine (CPU accounting), and Mooncake against loopback TCP."""
    p, t, g = doc["parameters"], doc["table"], doc["gil"]
    d, b = doc["gather_seconds_decode_size"], doc["gather_seconds_big"]
    labels = {
        "memory": "`MemoryTable`: the gather's Python alone",
        "direct": "`aio` engine: one Numba nogil call",
        "direct_threads": "`threads` engine, before issue 18",
        "cached_direct": "LFU cache in front of `aio`",
        "mooncake": "batch get-into of a session into a registered buffer"
        if "mooncake_ranges" in g
        else "one `get_into_ranges` into a registered buffer",  # runs before issue 18 item 2
        "mooncake_ranges": "one `get_into_ranges` (master queried per head), before issue 18 item 2",
        "mooncake_lookup": "`EngramStore.lookup`, before issue 18",
        "mooncake_process": "the batch get-into by a reader process, rows in its own segment; the caller's "
        "CPU is its dedupe, the request and the expansion (the child has its own GIL; its CPU is not counted here)",
    }
    lines = [
        f"**Store I/O off the GIL**: an fp32 table of {t['rows']:,} rows × {t['dim']} ({t['bytes'] / 2**20:,.0f} MiB); "
        f"decode-sized gathers of {p['rows']} Zipf-skewed ids (one layer of a batch-8 decode step), large ones of "
        f"{p['big_rows']}. GIL held per gather = the calling thread's CPU minus its CPU inside calls that release "
        "the GIL, plus the `threads` engine's worker user CPU (an upper bound; CPU accounting, so a loaded machine "
        f"does not move it); median (IQR) over {p['repeats']} interleaved blocks of {p['gathers']} gathers. "
        "Wall times are the gather's own, on this (shared) machine.",
        "",
        f"| contender | GIL held ms / gather | caller CPU ms | of it in nogil calls ms | other threads CPU ms "
        f"(user + sys) | wall ms ({p['rows']} ids) | wall ms ({p['big_rows']} ids) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in labels.items():
        if name not in g:
            continue
        m = g[name]
        held = m["gil_held_ms"]
        lines.append(
            f"| `{name}` ({label}) | {held['median']:.3f} ({held['q1']:.3f}–{held['q3']:.3f}) | "
            f"{m['caller_cpu_ms']['median']:.3f} | {m['nogil_cpu_ms']['median']:.3f} | "
            f"{m['other_threads_user_ms']['median']:.3f} + {m['other_threads_sys_ms']['median']:.3f} | "
            f"{1e3 * d[name]['median']:.2f} | {1e3 * b[name]['median']:.1f} |"
        )
    lt, mc = doc["loopback_tcp"], doc.get("mooncake", {})
    tcp = (
        f"Loopback TCP on this machine: {lt['bulk_bytes_per_s'] / 1e9:.2f} GB/s bulk "
        f"({lt['bulk_rows_per_s'] / 1e6:.1f} M rows/s of {lt['reply_bytes']} B), "
        f"{lt['round_trips_per_s']:,.0f} request-response round trips/s."
    )
    if mc.get("ran"):
        was = ""
        if "mooncake_ranges_rows_per_s_big" in mc:
            was = (
                f" `get_into_ranges`: {mc['mooncake_ranges_rows_per_s_decode_size']:,.0f} and "
                f"{mc['mooncake_ranges_rows_per_s_big']:,.0f};"
            )
        read = "batch get-into" if "mooncake_ranges" in g else "ranged read"
        tcp += (
            f" Mooncake rows/s, {read}: {mc['mooncake_rows_per_s_decode_size']:,.0f} ({p['rows']} ids), "
            f"{mc['mooncake_rows_per_s_big']:,.0f} ({p['big_rows']} ids) = "
            f"{mc['ranges_vs_bulk_limit_big']:.2%} of the bulk limit, "
            f"{mc['ranges_vs_round_trip_limit_big']:.2f}× one round trip per row;{was} `lookup`: "
            f"{mc['mooncake_lookup_rows_per_s_decode_size']:,.0f} and {mc['mooncake_lookup_rows_per_s_big']:,.0f}."
        )
        if "mooncake_process_rows_per_s_big" in mc:
            tcp += (
                " Through the reader process (legacy TCP framing): "
                f"{mc['mooncake_process_rows_per_s_decode_size']:,.0f} and "
                f"{mc['mooncake_process_rows_per_s_big']:,.0f}."
            )
    else:
        tcp += f" Mooncake not run: {mc.get('error', 'disabled (--no-mooncake)')}."
    return [*lines, "", tcp, *_footer(doc)]


# ---------------------------------------------------------------------------- row access


def _pct(q: float) -> str:
    return f"{q * 100:.1f}%"


def row_access_table(doc: dict[str, Any]) -> list[str]:
    """Skew of real row accesses: Zipf fit, batch dedup ratio, cache hit rate per policy and size."""
    p, layers = doc["parameters"], doc["layers"]
    lines = [
        f"**Row access on real text** (`{p['preset']}` layout, {p['heads_per_layer']} heads per layer, "
        f"{p['tokens']:,} stdlib tokens in sequences of {p['seq']}): how skewed Engram lookups are, what batch "
        "dedup saves, and what a hot-row cache of a given size catches.",
        "",
        "| layer | table rows | lookups | rows touched | singletons | Zipf s (R²) | lookups in top 0.1% / 1% / 10% "
        "of rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, r in layers.items():
        z, top = r["zipf"], r["share_of_lookups_in_top_rows"]
        lines.append(
            f"| {layer} | {r['table_rows']:,} | {r['lookups']:,} | {r['distinct_rows_touched']:,} "
            f"({r['touched_fraction']:.0%}) | {r['singletons']:,} | {z['exponent']:.3f} ({z['r2']:.3f}) | "
            + " / ".join(f"{v:.0%}" for v in top.values())
            + " |"
        )
    first = next(iter(layers.values()))["unique_per_batch"]
    lines += [
        "",
        "Unique rows / lookups per batch, median (IQR) over batches (lower = more saved by dedup):",
        "",
        "| layer | " + " | ".join(f"{u['tokens']:,} tokens" for u in first) + " |",
        "|---" * (len(first) + 1) + "|",
    ]
    for layer, r in layers.items():
        cells = [f"{u['unique_ratio_median']:.0%} ({u['unique_ratio_q1']:.0%}–{u['unique_ratio_q3']:.0%})"
                 for u in r["unique_per_batch"]]  # fmt: skip
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    for layer, r in layers.items():
        hr = r.get("hit_rate")
        if not hr:
            continue
        pols = sorted(hr["by_policy"], key=lambda k: (k == "infinite", k))
        names = [("∞ (bound)" if k == "infinite" else k.upper() if len(k) <= 3 else k) for k in pols]
        lines += [
            "",
            f"Cache hit rate, layer {layer} ({hr['method']}; replay batches of {hr['replay_batch_tokens']:,} tokens):",
            "",
            "| cache size (share of rows) | rows | " + " | ".join(names) + " |",
            "|---" * (len(pols) + 2) + "|",
        ]
        for i, (frac, rows) in enumerate(zip(hr["capacity_fraction"], hr["capacity_rows"], strict=True)):
            lines.append(f"| {frac:.1%} | {rows:,} | " + " | ".join(_pct(hr["by_policy"][k][i]) for k in pols) + " |")
    plot = _image(doc, doc.get("plot"), "row access: rank-frequency, unique rows per batch, hit rate")
    return lines + plot + _footer(doc)


# ---------------------------------------------------------------------------- sparse update


def sparse_update_table(doc: dict[str, Any]) -> list[str]:
    """Step time and table optimiser state for R vs 10R rows: the sparse path must not scale with the table."""
    p, arms, ratio = doc["params"], doc["arms"], doc["ratio_step_time_10R_over_R"]
    labels = {
        "sparse_R": "sparse Adam, R",
        "sparse_10R": "sparse Adam, 10R",
        "dense_R": "dense grad + AdamW, R",
        "dense_10R": "dense grad + AdamW, 10R",
    }
    verdict = "met" if doc.get("within_10pct") else "**not met**"
    lines = [
        f"**Sparse table update**: full training steps (fwd + bwd + clip + optimiser) of two models that differ "
        f"only in table size, R = {p['base_rows']:,}/head vs 10R, same real batches (B={p['batch_size']}, "
        f"T={p['seq_len']}), {p['repeats']} interleaved repeats, {p['threads']} thread(s). "
        f"**Step time 10R ÷ R = {_x(ratio)}** (paired; target ≤ 1.10×: {verdict}).",
        "",
        "| arm | table rows | table MiB | step ms | table optimiser state MiB (allocated / touched) | "
        "rows with state |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(arms, key=lambda n: (list(labels).index(n) if n in labels else len(labels), n)):
        a = arms[name]
        rws = a.get("rows_with_state")
        lines.append(
            f"| {labels.get(name, name)} | {a['table_rows']:,} | {a['table_bytes'] / 2**20:,.1f} | "
            f"{_ms(a['step_s'])} | {a['table_optimizer_state_bytes'] / 2**20:,.1f} / "
            f"{a['table_optimizer_state_bytes_used'] / 2**20:,.1f} | {'all' if rws is None else f'{rws:,}'} |"
        )
    if "ratio_dense_10R_over_R" in doc:
        lines += [
            "",
            f"The naive path on the same tables (dense `.grad` + dense AdamW, timed in a separate phase): "
            f"step time 10R ÷ R = {_x(doc['ratio_dense_10R_over_R'])}.",
        ]
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- head to head

H2H_ARMS = {"dense": "dense", "moe": "MoE (ρ = 1)", "engram_moe": "Engram + MoE"}
H2H_PAIRS = ("engram_moe_minus_moe", "moe_minus_dense", "engram_moe_minus_dense")  # headline first


def _ordered(keys: Any, preferred: Any) -> list[str]:
    """``keys`` with those in ``preferred`` first, in its order (JSON files may have sorted keys)."""
    pref = list(preferred)
    return sorted(keys, key=lambda k: (pref.index(k) if k in pref else len(pref), k))


def _scored(corpora: dict[str, Any], s: dict[str, Any]) -> str:
    """Held-out tokens actually scored per corpus (older results only recorded the requested count)."""
    got = {c: v["heldout"] for c, v in corpora.items() if "heldout" in v}
    if not got:
        return f"{s['eval_tokens']:,} tokens (requested)"
    return ", ".join(f"{h['tokens_scored']:,} tokens of {h['documents']} {h['split']} documents ({c})"
                     for c, h in got.items())  # fmt: skip


def _few_documents(corpora: dict[str, Any]) -> list[str]:
    few = {c: v["heldout"]["documents"] for c, v in corpora.items() if v.get("heldout", {}).get("few_documents")}
    return [
        f"\n> **Warning**: the {c} held-out split has only {n} documents; the held-out mean may describe those"
        " texts more than the corpus."
        for c, n in few.items()
    ]


def head_to_head_table(doc: dict[str, Any]) -> list[str]:
    """Held-out bpb of dense vs MoE vs Engram+MoE at equal activated parameters, with paired seed diffs."""
    s, corpora = doc["settings"], doc["corpora"]
    seeds = s["seeds"]
    lines = [
        f"**Head-to-head, size `{doc.get('size', '?')}`**: d={s['d']}, {s['layers']} layers, {s['heads']} heads, "
        f"MoE {s['experts']} routed experts (hidden {s['expert_hidden']}, top-2), Engram arm at ρ = "
        f"{s['rho_target']}; {s['tokens']:,} training tokens per arm (B={s['batch']}, T={s['seq']}), held-out "
        f"{_scored(corpora, s)}, seeds {', '.join(map(str, seeds))}. Hypothesis under test: "
        f"{_hypothesis(doc)}.",
        *_few_documents(corpora),
        "",
        "| corpus | arm | P_act | P_tot | ρ | routed experts × width | Engram rows | held-out bpb, mean ± std "
        "| min – max | train tok/s (median seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus, c in corpora.items():
        for arm in _ordered(c["arms"], H2H_ARMS):
            a = c["arms"][arm]
            pr, b = a["params"], a["bpb"]
            tps = sorted(r["tokens_per_s"] for r in a["runs"])
            lines.append(
                f"| {corpus} | {H2H_ARMS.get(arm, arm)} | {pr['P_act']:,} | {pr['P_tot']:,} | "
                f"{'—' if pr['rho'] is None else format(pr['rho'], '.2f')} | {_experts(a['model'])} | "
                f"{', '.join(f'{n:,}' for n in pr['engram_rows']) or '—'} | "
                f"**{b['mean']:.4f}** ± {_std(b)} | {b['min']:.4f} – {b['max']:.4f} | "
                f"{tps[len(tps) // 2]:,.0f} |"
            )
    pairs = _ordered(next(iter(corpora.values()))["paired_bpb_diff"], H2H_PAIRS)
    lines += [
        "",
        f"Paired per-seed bpb differences, mean ± std over {len(seeds)} seeds (negative = the first arm is better):",
        "",
        "| corpus | "
        + " | ".join(k.replace("_minus_", " − ") for k in pairs)
        + " | order by mean bpb (best first) | hypothesis |",
        "|---" * (len(pairs) + 3) + "|",
    ]
    for corpus, c in corpora.items():
        d = c["paired_bpb_diff"]
        order = c["order_by_mean_bpb"]
        if len(order) < len(H2H_ARMS):  # a subset of the arms (--arms) cannot test the three-way order
            verdict = f"not tested ({len(order)} arms)"
        else:
            verdict = "holds" if order == ["engram_moe", "moe", "dense"] else "not observed"
        lines.append(
            f"| {corpus} | "
            + " | ".join(f"{d[k]['mean']:+.4f} ± {_std(d[k])}" for k in pairs)
            + f" | {' < '.join(order)} | {verdict} |"
        )
    return lines + _image(doc, doc.get("plot"), f"head-to-head {doc.get('size', '')} curves") + _footer(doc)


def _hypothesis(doc: dict[str, Any]) -> str:
    """The order under test, cut to the arms the run trained (``--arms``)."""
    trained = {arm for c in doc["corpora"].values() for arm in c["arms"]}
    if trained >= set(H2H_ARMS):
        return doc.get("hypothesis", "held-out loss: engram_moe < moe < dense")
    return "held-out loss: " + " < ".join(a for a in ("engram_moe", "moe", "dense") if a in trained)


def _std(spread: dict[str, Any]) -> str:
    """A seed spread's std, or "n/a" for one seed (a std of 0.0000 would read as no noise)."""
    return "n/a" if spread.get("n", 2) < 2 else f"{spread['std']:.4f}"


def _experts(model: dict[str, Any]) -> str:
    moe = model.get("moe")
    return f"{moe['n_routed']} × {moe['expert_hidden']}" if moe else "—"


def head_to_head_why_table(doc: dict[str, Any]) -> list[str]:
    """One-factor variants of the head-to-head's Engram arm, each against the MoE arm of the same seed."""
    s = doc["settings"]
    lines = [
        f"**Why, corpus `{doc['corpus']}`, size `{doc['size']}`** (seeds {', '.join(map(str, doc['seeds']))}; "
        f"{s['tokens']:,} training tokens per arm; Engram arm with P_act "
        f"{'matched to' if doc.get('p_act_matched', True) else 'above'} the MoE's): held-out bpb of the MoE arm "
        f"{doc['moe']['bpb']['mean']:.4f}; each row changes one thing in the Engram + MoE arm.",
        "",
        "| variant | table LR × | Engram rows | P_act | P_tot | held-out bpb | − MoE (same seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in doc["variants"].items():
        pr, d = v["params"], v["bpb_minus_moe"]
        spread = f" ± {d['std']:.4f}" if d["n"] > 1 else ""
        lines.append(
            f"| {name} | {v['optim'].get('engram_lr_mult', 5.0):g} | {', '.join(f'{n:,}' for n in pr['engram_rows'])} "
            f"| {pr['P_act']:,} | {pr['P_tot']:,} | {v['bpb']['mean']:.4f} | {d['mean']:+.4f}{spread} |"
        )
    return lines + _image(doc, doc.get("plot"), f"why {doc['corpus']}") + _footer(doc)


# ---------------------------------------------------------------------------- generate


def _pool_suffix(name: str) -> tuple[str, str]:
    """(contender, prefetch suffix) for the paired pool/inline contenders: ``ssd_c0_w2`` -> ("ssd_c0", "_w2")."""
    for suffix in ("_inline", "_w"):
        i = name.rfind(suffix)
        if i > 0 and (suffix == "_inline" or name[i + 2 :].isdigit()):
            return name[:i], name[i:]
    return name, ""


def _prefetch_how(suffix: str) -> str:
    if suffix == "_inline":
        return ", inline prefetch (no worker thread)"
    return f", {suffix[2:]} prefetch thread(s)" if suffix else ""


def _gen_order(name: str) -> tuple[int, float]:
    if name == "ssd_c0_split":
        return (2, 0.0001)
    base, suffix = _pool_suffix(name)
    if suffix and not name.startswith("mooncake"):
        o = _gen_order(base)
        return (o[0], o[1] + 0.001 * (1 + len(suffix)))
    if name.startswith("ssd_c") and name.endswith("_pinned"):
        return (2, float(name[5:-7]) + 0.0005)
    if name.startswith("ssd_c"):
        return (2, float(name[5:]))
    if name == "ssd_threads":
        return (2, 1e9)
    if name.startswith("mooncake_process"):
        pct, pinned = _process_variant(name)
        return (4, pct + (0.0005 if pinned else 0.0))
    if name.startswith("mooncake_c") and name[10:].replace(".", "").isdigit():
        return (3, float(name[10:]))
    if name.startswith("mooncake_"):
        return (3, 1e9)
    if name == "mooncake":
        return (3, -1.0)
    return ({"model": 0, "model_pinned": 0, "memory": 1}.get(name, 3), 0.5 if name == "model_pinned" else 0.0)


_TIERS_CHOICE = "the tiers' own choice of"


def _generate_headline(res: dict[str, Any]) -> str:
    """The SSD tier with the smallest cache (the hardest case) against the in-model baseline."""
    ssd = sorted((n for n in res if n.startswith("ssd_c") and not _pool_suffix(n)[1]), key=_gen_order)
    if not ssd:
        return ""
    r = res[ssd[0]]
    lc = r.get("load_corrected_time_ratio_vs_model")
    corrected = "" if lc is None else f" ({_x(lc)} load-corrected)"
    return (
        f" **SSD tier, {ssd[0][5:]}% cache: decode time {_x(r['time_ratio_vs_model'])}{corrected} of in-model, "
        f"forward blocked on rows {r['wait_pct_of_decode']:.2f}% of decode.**"
    )


_MOONCAKE_READS = {
    "lookup": "`EngramStore.lookup` per call",
    "ranges": "one `get_into_ranges` per gather (master queried per head)",
    "batch": "the batch get-into of a session, one call per gather",
    "legacy": "the batch get-into with the legacy TCP framing (`MC_TCP_PROTO=1`: no status frame per request; "
    "set around its calls only, since a write then completes before it lands)",
}


def _process_variant(name: str) -> tuple[float, bool]:
    """(cache %, pinned) of a ``mooncake_process[_cN][_pinned]`` contender."""
    rest = name[len("mooncake_process") :]
    pinned = rest.endswith("_pinned")
    rest = rest[: -len("_pinned")] if pinned else rest
    return (float(rest[2:]) if rest.startswith("_c") else 0.0), pinned


def _mooncake_how(name: str, doc: dict[str, Any]) -> str:
    """How a ``mooncake*`` contender reads: ``mooncake`` by the run's default, ``mooncake_<read>``, ``mooncake_cN``."""
    p = doc.get("params", {})
    if name.startswith("mooncake_process"):
        pct, pinned = _process_variant(name)
        cpus = doc.get("pinned_cpus") or {}
        return (
            f"{_MOONCAKE_READS['batch']}, by a reader process lending the pool its segment (split phase: ids and "
            "rows through shared slots, no prefetch thread)"
            + (f", + LFU cache {pct:g}% of table bytes" if pct else "")
            + (f", the reader pinned to CPU {cpus.get('helpers', '?')}, the decode thread to {cpus.get('decode', '?')}"
               if pinned else "")
        )  # fmt: skip
    first = (p.get("mooncake_workers") or [None])[0]  # runs before issue 18 item 2: the common --workers
    own = "" if first is None else f", {first} prefetch thread(s)"
    if name.startswith("mooncake_c") and name[10:].replace(".", "").isdigit():
        return f"{_MOONCAKE_READS['batch']}, + LFU cache {name[10:]}% of table bytes{own}"
    if name.startswith("mooncake_nice") and name[13:].lstrip("-").isdigit():
        return f"{_MOONCAKE_READS['batch']}{own}, transport threads at nice {name[13:]}"
    if name.startswith("mooncake_w") and name[10:].isdigit():
        return f"{_MOONCAKE_READS['batch']}, {name[10:]} prefetch thread(s)"
    if name == "mooncake_pinned":
        cpus = doc.get("pinned_cpus") or {}
        return (
            f"{_MOONCAKE_READS['batch']}{own}, the client's threads and the prefetch thread pinned to CPU "
            f"{cpus.get('helpers', '?')}, the decode thread to {cpus.get('decode', '?')}"
        )
    if name.startswith("mooncake_"):
        return _MOONCAKE_READS.get(name[9:], name[9:])
    read = doc.get("mooncake", {}).get("read", "lookup")  # runs before issue 18 used EngramStore.lookup
    read = read[0] if isinstance(read, list) and len(read) == 1 else read
    how = _MOONCAKE_READS.get(read, "one ranged read per gather") if isinstance(read, str) else str(read)
    return how + own


def _mooncake_headline(res: dict[str, Any]) -> str:
    """The Mooncake tier without a cache against the in-model baseline, when it ran with the batch reads."""
    r = res.get("mooncake")
    if r is None or "mooncake_ranges" not in res:
        return ""
    lc = r.get("load_corrected_time_ratio_vs_model")
    corrected = "" if lc is None else f" ({_x(lc)} load-corrected)"
    return (
        f" **Mooncake tier, no cache: decode time {_x(r['time_ratio_vs_model'])}{corrected} of in-model "
        f"(`get_into_ranges` in the same run: {_x(res['mooncake_ranges']['time_ratio_vs_model'])}), "
        f"forward blocked on rows {r['wait_pct_of_decode']:.2f}% of decode.**"
    )


def _label(doc: dict[str, Any]) -> str:
    """A result's own label (e.g. "before this change"), set off after a table's title; empty when it has none."""
    return f" — *{doc['label']}*" if doc.get("label") else ""


def _per_token_bytes(r: dict[str, Any]) -> str:
    """Bytes a contender's tier read per generated token; — where not recorded or nothing read."""
    b = r.get("read_bytes_per_token")
    return "—" if not b else f"{b / 1024:,.1f} KiB"


def gather_cpu_table(doc: dict[str, Any]) -> list[str]:
    """Decode-thread and I/O-thread CPU per inline gather, per tier (``bench_gather_cpu``)."""
    p, res = doc["params"], doc["results"]
    lines = [
        f"**Who pays for an inline gather**{_label(doc)}: {p['gathers'] - p['warm']} decode-step gathers (64 "
        f"Zipf-skewed ids) of a {p['rows']:,} x {p['dim']} fp32 table, {p['pause_ms']:g} ms between start and "
        "result; CPU per gather, medians (the I/O thread's: its schedstat over the run).",
        "",
        "| tier | decode thread: start | decode thread: result | I/O thread | cache hit rate |",
        "|---|---|---|---|---|",
    ]
    for name, r in res.items():
        io, hit = r.get("io_thread_us_per_gather"), r.get("hit_rate")
        lines.append(
            f"| {name} | {r['decode_start_us']['median']:.1f} µs | {r['decode_result_us']['median']:.1f} µs | "
            f"{'—' if io is None else f'{io:.1f} µs'} | {'—' if hit is None else f'{hit:.0%}'} |"
        )
    return lines + _footer(doc)


def generate_table(doc: dict[str, Any]) -> list[str]:
    """Decode tokens/s with the tables in the model, in RAM, on SSD behind a cache, and in Mooncake."""
    p, m, res = doc["params"], doc["model"], doc["results"]
    w = doc.get("workload", {})
    lines = [
        f"**End-to-end generation**{_label(doc)}: {m['parameters'] / 1e6:.0f}M-parameter model ({p['layers']} layers, "
        f"d={p['hidden']}), Engram at layers {', '.join(map(str, m['engram_layers']))}, tables "
        f"{m['table_bytes'] / 2**20:,.0f} MiB ({sum(m['table_rows']):,} rows); batch {p['batch']}, prompt "
        f"{p['prompt']}, {p['steps']} decode steps ({w.get('decode', 'real text')}, {w.get('corpus', '')}), "
        f"{p['repeats']} interleaved repeats, {p['threads']} torch thread(s), "
        f"{_TIERS_CHOICE if p['workers'] is None else p['workers']} prefetch worker(s) (column "
        "'prefetch': 0 = inline, gathers started and completed on the decode thread); "
        f"O_DIRECT {'on' if doc.get('direct_io') else '**off**'}. Time ÷ in-model is the paired per-repeat "
        "ratio; 'load-corrected' is the same ratio for whole generate calls minus the time the decode thread "
        "was runnable but waiting for a CPU (Linux schedstat: the neighbours' share on a shared machine; "
        "blocking on the GIL or on rows stays in); 'rows wait' is the time the forward sat blocked on rows ÷ "
        "decode time (prefetch not hidden); 'bytes read / token' is what the tier read per generated token, prefill "
        "included (whole 4 KiB pages from the SSD file; rows from RAM for `memory`): what a cache saves."
        + _generate_headline(res)
        + _mooncake_headline(res),
        "",
        "| contender | rows served from | prefetch | tokens/s | time ÷ in-model | load-corrected time ÷ in-model | "
        "rows wait % of decode | cache hit rate | bytes read / token | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(res, key=_gen_order):
        r = res[name]
        base, suffix = _pool_suffix(name)
        if name.startswith("mooncake"):
            base, suffix = name, ""
        if name == "model":
            where = "the model's own `embed.weight`"
        elif name == "model_pinned":
            decode_cpus = (doc.get("pinned_cpus") or {}).get("decode", "?")
            where = f"the model's own `embed.weight`, the decode thread pinned to CPU {decode_cpus}"
        elif base == "memory":
            where = "`MemoryTable` via the prefetcher" + _prefetch_how(suffix)
        elif base == "ssd_c0" and suffix:
            where = "SSD (O_DIRECT), no cache" + _prefetch_how(suffix)
        elif name == "ssd_c0_split":
            where = "SSD (O_DIRECT), no cache, inline without the I/O thread (`io_submit` on the decode thread)"
        elif name.startswith("ssd_c"):
            pinned_arm = name.endswith("_pinned")
            cache = name[5:-7] if pinned_arm else name[5:]
            where = "SSD (O_DIRECT), " + ("no cache" if cache == "0" else f"LFU cache {cache}% of table bytes")
            if pinned_arm:
                pins = doc.get("pinned_cpus") or {}
                decode, io = pins.get("decode", "?"), pins.get("helpers", "?")
                where += f"; decode thread on CPU {decode}, I/O threads on CPU {io}"
        elif name.startswith("mooncake"):
            where = f"Mooncake master on 127.0.0.1 (TCP), {_mooncake_how(name, doc)}"
        elif name == "ssd_threads":
            where = "SSD (O_DIRECT), no cache, the `threads` I/O engine (before issue 18)"
        else:
            where = name
        tps, ratio = r["tokens_per_second"], r["time_ratio_vs_model"]
        hit, lc = r.get("cache_hit_rate"), r.get("load_corrected_time_ratio_vs_model")
        corrected = "—" if lc is None else "1×" if name == "model" else _x(lc)
        nw = r.get("prefetch_workers", None if name in ("model",) or name.startswith("mooncake") else p.get("workers"))
        how = " (I/O thread)" if r.get("io_thread") else " (split)" if r.get("split_phase") else ""
        pf = "—" if nw is None else "inline" + how if nw == 0 else str(nw)
        lines.append(
            f"| {name} | {where} | {pf} | {tps['median']:.1f} ({tps['q1']:.1f}–{tps['q3']:.1f}) | "
            f"{'1×' if name == 'model' else _x(ratio)} | {corrected} | "
            f"{r['wait_pct_of_decode']:.2f}% | "
            f"{'—' if hit is None else f'{hit:.0%}'} | {_per_token_bytes(r)} | "
            f"{'yes' if r['same_tokens_as_model'] else '**NO**'} |"
        )
    mc = doc.get("mooncake", {})
    if not mc.get("ran", False):
        lines += ["", f"Mooncake tier not run: {mc.get('error', 'disabled (--no-mooncake)')}."]
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- reproductions


# engram-spec.md §9.5 (paper §6.2), losses read off the paper's figure; the JSON records no claim for these.
PAPER_ABLATIONS = (
    "largest regressions w/o multi-branch, w/o compression, w/o gating; +4-gram slightly worse; w/o short conv marginal"
)


def _beyond(delta: float, threshold: float | None) -> bool | None:
    return None if threshold is None else delta > threshold


def reproductions_table(doc: dict[str, Any]) -> list[str]:
    """The paper's three findings at CPU scale: sparsity allocation, memory scaling, ablations."""
    s, exps, fnd = doc["parameters"], doc["experiments"], doc.get("findings", {})
    setting, noise = doc.get("setting", "?"), doc.get("noise")
    lines = [
        f"**Paper reproductions, setting `{setting}`, corpus `{doc.get('corpus', '?')}`**: d={s['hidden']}, "
        f"{s['layers']} layers, {s['routed']} "
        f"routed experts (hidden {s['expert']}), hc_mult {s['hc_mult']}; every arm trains {s['steps']} steps of "
        f"B={s['batch']}×T={s['seq']} on the same data, seed and schedule, scored on the same {s['eval_batches']} "
        "held-out batches"
        + (f", tables at {s['engram_lr_mult']:g}× the base LR" if "engram_lr_mult" in s else "")
        + "."
        + (
            f" Seed spread of the reference arm (seeds {', '.join(map(str, noise['seeds']))}): std "
            f"{noise['std']:.4f} nats, so a difference between two single-seed arms is beyond noise when it exceeds "
            f"~{noise['threshold']:.3f} (2·√2·std)."
            if noise else ""
        )
        + (" *Quick setting: a pipeline check, far too noisy to confirm or refute the paper.*"
           if setting == "quick" else ""),
        "",
        "| finding | paper | here |",
        "|---|---|---|",
    ]  # fmt: skip
    thr = noise["threshold"] if noise else None

    def verdict(beyond: bool | None) -> str:
        return "" if beyond is None else (" (beyond noise)" if beyond else " (within noise)")

    if "rho" in fnd:
        f = fnd["rho"]
        here = f"best ρ = {f['best_rho']:.2f} (`{f['best_arm']}`), interior optimum: {'yes' if f['u_shape'] else 'no'}"
        if "rise_pure_moe" in f:
            here += (
                f"; above the best: pure MoE {f['rise_pure_moe']:+.4f}{verdict(_beyond(f['rise_pure_moe'], thr))}, "
                f"`{f['most_engram_arm']}` {f['rise_most_engram']:+.4f}"
                f"{verdict(_beyond(f['rise_most_engram'], thr))}"
            )
            if f.get("quadratic_optimum_rho") is not None:
                here += f"; quadratic fit's optimum ρ = {f['quadratic_optimum_rho']:.2f}"
        lines.append(f"| sparsity allocation | {f['paper']} | {here}; P_tot spread {f['p_tot_spread']:.2%} |")
    if "memory" in fnd:
        f = fnd["memory"]
        se = f" ± {f['slope_se']:.4f}" if "slope_se" in f else ""
        here = f"slope {f['slope_per_ln_rows']:+.4f}{se} nats per ln(rows), R² {f['r2']:.2f}"
        here += f", over {f['span']:.0f}× rows"
        if "fitted_drop" in f:
            here += f"; fitted drop over the span {f['fitted_drop']:+.4f}{verdict(f['drop_beyond_noise'])}"
        lines.append(f"| memory scaling | {f['paper']} | {here} |")
    if "ablations" in fnd:
        comp = sorted(
            ((k, v) for k, v in fnd["ablations"].items() if not k.startswith("layer=")), key=lambda kv: -kv[1]
        )
        place = sorted((v, k) for k, v in fnd["ablations"].items() if k.startswith("layer="))

        def mark(v: float) -> str:  # bold: the difference exceeds the seed-noise threshold
            return f"**{v:+.3f}**" if thr is not None and abs(v) > thr else f"{v:+.3f}"

        here = "Δ loss vs reference: " + ", ".join(f"`{k}` {mark(v)}" for k, v in comp)
        if place:
            (best, b_arm), (worst, w_arm) = place[0], place[-1]
            here += f"; best placement `{b_arm}` ({mark(best)}), worst `{w_arm}` ({mark(worst)})"
        if thr is not None:
            here += f"; bold: beyond noise (more than ±{thr:.3f})"
        lines.append(f"| ablations | {PAPER_ABLATIONS} | {here} |")
    if "rho" in exps:
        lines += [
            "",
            "| ρ arm | ρ | P_tot | P_act | Engram rows | held-out loss | bpb |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in exps["rho"]:
            lines.append(
                f"| {a['arm']} | {_opt(a['rho'], '.3f')} | {a['p_tot']:,} | {a['p_act']:,} | "
                f"{sum(a['engram_rows']):,} | {a['eval_loss']:.4f} | {a['eval_bpb']:.4f} |"
            )
    if "memory" in exps:
        lines += ["", "| memory arm | Engram rows | P_tot | held-out loss | bpb |", "|---|---|---|---|---|"]
        for a in exps["memory"]:
            lines.append(
                f"| {a['arm']} | {sum(a['engram_rows']):,} | {a['p_tot']:,} | {a['eval_loss']:.4f} | "
                f"{a['eval_bpb']:.4f} |"
            )
    if "ablations" in exps:
        ref = next((a["eval_loss"] for a in exps["ablations"] if a["arm"] == "reference"), None)
        lines += ["", "| ablation | P_act | held-out loss | Δ vs reference | bpb |", "|---|---|---|---|---|"]
        for a in exps["ablations"]:
            delta = "—" if ref is None or a["arm"] == "reference" else f"{a['eval_loss'] - ref:+.4f}"
            lines.append(f"| {a['arm']} | {a['p_act']:,} | {a['eval_loss']:.4f} | {delta} | {a['eval_bpb']:.4f} |")
    for plot in doc.get("plots", []):
        name = Path(plot).stem
        lines += _image(doc, plot, name.replace("_", " "))
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- depth (LogitLens, CKA)


def _mean_std(ms: dict[str, list[float]], i: int, fmt: str = ".3f") -> str:
    return f"{ms['mean'][i]:{fmt}} ± {ms['std'][i]:{fmt}}"


def depth_table(doc: dict[str, Any]) -> list[str]:
    """LogitLens KL per layer for the three head-to-head arms and the CKA alignment index of Engram vs MoE."""
    p = doc["parameters"]
    lines = [
        f"**Does Engram make early layers deeper?** Full-size head-to-head arms, seeds "
        f"{', '.join(map(str, doc['seeds']))} (mean ± std; Engram − MoE paired by seed). LogitLens: KL(final ‖ "
        f"early exit) over {p['lens_batches']} held-out batches of {p['batch']}×{p['seq']}. CKA (spec §9.8 minibatch "
        f"unbiased estimator, minibatches of {p['cka_minibatch']}) between Engram + MoE (layer j) and MoE on the "
        f"final tokens of recurring held-out {p['ngram']}-grams; alignment index a_j = CKA-weighted mean MoE layer "
        f"index of the top {p['top_k']} (control: the same index between two MoE seeds, seed s vs s + 1, since the "
        f"top-k average alone pulls a_j toward the middle). Paper: {doc['paper']['logit_lens']}; "
        f"{doc['paper']['cka']}.",
    ]
    for corpus, r in doc["corpora"].items():
        kl, d, a = r["kl_to_final"], r["kl_engram_minus_moe"], r["alignment_index"]
        lines += [
            "",
            f"*{corpus}* (Engram at block {', '.join(map(str, r['engram_layers']))}; CKA on {r['cka_tokens']:,} "
            f"tokens, {r['recurring_share']:.0%} of held-out positions end a recurring {p['ngram']}-gram)",
            "",
            "| j | stream after | KL dense | KL MoE | KL Engram + MoE | KL Engram − MoE | a_j Engram vs MoE "
            "| a_j MoE vs MoE (control) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ctrl = r.get("alignment_control_moe_vs_moe")
        for i, name in enumerate(r["layers"]):
            lines.append(
                f"| {i} | {name} | {_mean_std(kl['dense'], i)} | {_mean_std(kl['moe'], i)} | "
                f"{_mean_std(kl['engram_moe'], i)} | {d['mean'][i]:+.3f} ± {d['std'][i]:.3f} | "
                f"{_mean_std(a, i, '.2f')} | {_mean_std(ctrl, i, '.2f') if ctrl else 'n/a'} |"
            )
    return lines + _image(doc, doc.get("plot"), "LogitLens and CKA") + _footer(doc)


# ---------------------------------------------------------------------------- distributed and Muon


def distributed_table(doc: dict[str, Any]) -> list[str]:
    """1 vs N gloo processes: step time, tokens/s, phases, communication share; exchange bytes vs the planner."""
    p, one, many = doc["params"], doc["one_process"], doc["distributed"]
    ex = doc["exchange_bytes_per_step"]
    n = many["processes"]
    lines = [
        f"**Distributed training (row-sharded tables, gloo)**: the same EngramLM (d = {p['model']['hidden_size']}, "
        f"{p['model']['num_layers']} layers, tables of {sum(p['table_rows']):,} rows) and the same global batches "
        f"({p['batch_size']} x {p['seq_len']} = {p['tokens_per_step']:,} real SOTU tokens), one thread per process, "
        f"{p['steps']} timed steps after {p['warmup']}. {n} processes reach "
        f"**{doc['speedup_tokens_per_s']:.2f}x** the one-process tokens/s; the per-step loss differs by at most "
        f"{doc['loss_max_rel_diff']:.1e} (relative).",
        "",
        "| run | step ms | tokens/s | fwd exchange ms | compute ms | bwd exchange ms | all-reduce ms | optimizer ms "
        "| communication share | table rows per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in (("1 process", one), (f"{n} processes", many)):
        ph = r["phases_s"]
        comm = "–" if r["processes"] == 1 else _pct(r["communication_share"]["median"])
        lines.append(
            f"| {label} | {_ms(r['step_s'])} | {r['tokens_per_s']:,.0f} | {ph['fwd_exchange']['median'] * 1e3:.1f} | "
            f"{ph['compute']['median'] * 1e3:.1f} | {ph['bwd_exchange']['median'] * 1e3:.1f} | "
            f"{ph['allreduce']['median'] * 1e3:.1f} | {ph['optimizer']['median'] * 1e3:.1f} | {comm} | "
            f"{', '.join(f'{x:,}' for x in r['table_rows_per_rank'])} |"
        )
    m = ex["measured"]
    lines += [
        "",
        f"Row-exchange bytes per step, all ranks (forward ids + rows, backward row gradients), measured by "
        f"`ExchangeStats` vs the planner (`analyze plan --ranks {n}`) (unique rows / reads: "
        f"{ex['unique_fraction_local']:.1%} in a rank's local batch, "
        f"{ex['unique_fraction_global']:.1%} in the global one):",
        "",
        "| | unique rows | forward bytes | backward bytes | total bytes | error |",
        "|---|---|---|---|---|---|",
        f"| measured | {m['unique']:,.0f} | {m['forward']:,.0f} | {m['backward']:,.0f} | {m['total']:,.0f} | |",
    ]
    what = {
        "measured": "planner, unique fraction counted by hashing the local batches",
        "zipf": f"planner, Zipf s = {ex['zipf_s_fit_on_global']:.2f} fitted on the global batch "
        f"({ex['zipf_types']:.0e} types)",
        "uniform": "planner, uniform worst case (every read a distinct n-gram)",
    }
    for name, pr in ex["predicted"].items():
        lines.append(
            f"| {what.get(name, name)} | {pr['unique']:,.0f} | {pr['forward']:,.0f} | {pr['backward']:,.0f} | "
            f"{pr['total']:,.0f} | {pr['error_total']:+.1%} |"
        )
    return lines + _footer(doc)


def muon_table(doc: dict[str, Any]) -> list[str]:
    """Optimizer share of an Engram + MoE step per Newton-Schulz schedule and dtype, and each one's distance
    to the exact polar factor on real gradients."""
    p, arms, f = doc["params"], doc["arms"], doc["flops"]
    load = doc.get("load_average_before_after")
    load_s = f", load average {load[0][0]:.1f} → {load[1][0]:.1f}" if load else ""
    lines = [
        f"**Muon on the Engram + MoE arm**{_label(doc)} (`{p['config']}`, {p['tokens_per_step']:,} tokens/step, "
        f"{p['threads']} thread(s), {p['repeats']} steps, every variant on the same gradients, interleaved"
        f"{load_s}): the backbone is {f['backbone_6_p_act_per_step'] / 1e9:.1f} GFLOP/step (6 P_act per token). "
        f"The rest of the step: {_ms(doc['compute_s'])} ms. Muon numerics version {p['muon_numerics_version']}.",
        "",
        "| Muon | Newton-Schulz GFLOP | Muon ms | × before (paired) | optimizer ms | step ms | optimizer share "
        "| tokens/s | fraction of the fp32 matmul rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _ordered(arms, ("v2 fp32 (before)", "default, v3 stage by stage (before)", "quintic 5 fp32")):
        a = arms[name]
        lines.append(
            f"| {name} | {a['newton_schulz_flops_per_step'] / 1e9:.1f} | {_ms(a['muon_s'])} | "
            f"{_x(a['muon_speedup_over_before'])} | {_ms(a['optimizer_s'])} | {_ms(a['step_s'])} | "
            f"{_pct(a['optimizer_share']['median'])} | {a['tokens_per_s']:,.0f} | {_pct(a['matmul_rate_fraction'])} |"
        )
    q = doc.get("quality")
    if q:
        steps = [str(s) for s in q["steps"]]
        last = steps[-1]
        lines += [
            "",
            f"Distance to the exact polar factor on Muon's real inputs at training steps {', '.join(steps)} "
            "(median over matrices of ||O − U Vᵀ|| / ||U Vᵀ||; O's singular values at the last step):",
            "",
            "| Muon | " + " | ".join(f"step {s}" for s in steps) + f" | σ(O) q01 / q50 / q99 / max, step {last} |",
            "|---|" + "---|" * len(steps) + "---|",
        ]
        for name in _ordered(q["variants"], ("quintic 5 fp32", "quintic 5 bf16")):
            per = q["variants"][name]
            sq = per[last]["sigma_quantiles"]
            lines.append(
                f"| {name} | "
                + " | ".join(f"{per[s]['polar_rel_error']['median']:.3f}" for s in steps)
                + f" | {sq['q01']:.3f} / {sq['q50']:.3f} / {sq['q99']:.3f} / {sq['max']:.3f} |"
            )
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- lm-eval on the head-to-head arms


def _lm(v: float, sign: str = "") -> str:
    """4 decimals for bits per byte and accuracy, 1 for perplexities in the thousands."""
    return format(v, f"{sign},.1f" if abs(v) >= 100 else f"{sign}.4f")


def lm_eval_h2h_table(doc: dict[str, Any]) -> list[str]:
    """The head-to-head arms scored by lm-evaluation-harness on the offline tasks, with paired seed diffs."""
    s, metrics = doc["settings"], doc["metrics"]
    keys = [f"{m['task']}:{m['metric']}" for m in metrics]
    names = [f"{m['task']} {m['metric'].split(',')[0]} ({'↓' if m['lower_is_better'] else '↑'})" for m in metrics]
    lines = [
        f"**Head-to-head arms through lm-evaluation-harness {s['lm_eval']}**, size `{doc['size']}` (the arms of "
        f"`bench_head_to_head`, windows of {s['seq']} tokens), seeds {', '.join(map(str, s['seeds']))}, mean ± std; "
        f"tasks built offline from the corpus's held-out split (cloze/code: up to {s['max_examples']} examples"
        + (f", `--limit {s['limit']}`" if s.get("limit") else "")
        + ").",
        "",
        "| corpus | arm | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for corpus, c in doc["corpora"].items():
        for arm in _ordered(c["arms"], H2H_ARMS):
            sc = c["arms"][arm]["scores"]
            lines.append(
                f"| {corpus} | {H2H_ARMS.get(arm, arm)} | "
                + " | ".join(f"{_lm(sc[k]['mean'])} ± {_lm(sc[k]['std'])}" for k in keys)
                + " |"
            )
        for pair, d in c["paired_diff"].items():
            lines.append(
                f"| {corpus} | {pair.replace('_minus_', ' − ')} (paired) | "
                + " | ".join(f"{_lm(d[k]['mean'], '+')} ± {_lm(d[k]['std'])}" for k in keys)
                + " |"
            )
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- serve


def _lat(v: float | None) -> str:
    return "—" if v is None else f"{v * 1e3:.0f}"


def serve_table(doc: dict[str, Any]) -> list[str]:
    """Streaming clients vs output tokens/s, TTFT and ITL: engramlm serve (tables in the model, on a tier) vs a
    per-request generate() server."""
    p, m, res, w = doc["params"], doc["model"], doc["results"], doc.get("workload", {})
    base = res.get("hf_generate", {})
    lines = [
        f"**Serving under load**: engramlm model {m['engramlm_parameters'] / 1e6:.1f}M parameters ({p['layers']} "
        f"layers, d={p['hidden']}, Engram at layers {', '.join(map(str, m['engram_layers']))}, tables "
        f"{m['engram_table_bytes'] / 2**20:,.0f} MiB); baseline `hf_generate`: {w.get('baseline', '')}, "
        f"{m['llama_parameters'] / 1e6:.1f}M parameters, one `generate()` per request. Closed-loop streaming "
        f"clients, prompts {'/'.join(map(str, w.get('prompt_tokens', [])))} tokens of held-out text, outputs "
        f"{'/'.join(map(str, w.get('output_tokens', [])))} tokens (`ignore_eos`); one torch thread per server. "
        "Latencies in ms; 'time in' = the scheduler's prefill / decode / row-fetch wait as shares of the wall time "
        "(the rest is HTTP, detokenising and idle).",
        "",
        "| clients | contender | output tok/s | ÷ hf_generate | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
        "time in prefill / decode / row wait | tokens per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    levels = sorted({int(n) for r in res.values() for n in r})
    for n in levels:
        for name, r in res.items():
            x = r.get(str(n))
            if x is None:
                continue
            b = base.get(str(n))
            ratio = (
                f"{x['output_tokens_per_s'] / b['output_tokens_per_s']:.2f}×" if b and name != "hf_generate" else "—"
            )
            sh = x.get("time_shares")
            shares = "—" if not sh else f"{sh['prefill']:.0%} / {sh['decode']:.0%} / {sh['row_wait']:.1%}"
            batch = "—" if not sh else f"{sh['mean_batch']:.1f}"
            lines.append(
                f"| {n} | {name} | {x['output_tokens_per_s']:.1f} | {ratio} | {_lat(x['ttft_p50_s'])} | "
                f"{_lat(x['ttft_p99_s'])} | {_lat(x['itl_p50_s'])} | {_lat(x['itl_p99_s'])} | {shares} | {batch} |"
            )
    return lines + _image(doc, doc.get("plot"), "serving: tokens/s, TTFT and ITL vs concurrent clients") + _footer(doc)


# ---------------------------------------------------------------------------- SSD training


def _ssd_curve_rows(c: dict[str, Any]) -> list[str]:
    """One row per arm of a step-time curve: step time, the three overheads, prefetch wait, rows moved."""
    mib = 2**20

    def iqr(o: dict[str, Any] | None) -> str:
        return "-" if o is None else f"{_pct(o['median'])} ({_pct(o['q1'])} to {_pct(o['q3'])})"

    def row(label: str, a: dict[str, Any]) -> str:
        return (
            f"| {label} | {a['cache_bytes'] / mib:,.1f} | {_ms(a['step_s'])} | {iqr(a['overhead'])} | "
            f"{iqr(a.get('overhead_load_corrected'))} | {iqr(a.get('cpu_overhead'))} | {a['wait_ms']['median']:.2f} | "
            f"{a['io']['rows_read']:,} | {a['io']['rows_written']:,} |"
        )

    lines = [
        "| cache (% of table) | cache MiB | step ms | overhead vs RAM: wall (median, IQR) | load-corrected | CPU | "
        "prefetch wait ms | rows read | rows written |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| RAM (table in the model) | - | {_ms(c['ram']['step_s'])} | - | - | - | - | - | - |",
    ]
    for a in sorted(c["ssd"].values(), key=lambda a: a["cache_fraction"]):
        lines.append(row(f"{100 * a['cache_fraction']:g}%", a))
    if "ssd_buffered_0.1" in c:
        lines.append(row("10%, `engram.direct_io=false` (page cache)", c["ssd_buffered_0.1"]))
    return lines


def _ssd_load(c: dict[str, Any]) -> str:
    if "load_avg_before" not in c:
        return ""
    b, a = c["load_avg_before"], c["load_avg_after"]
    return (
        f" Load average (1/5/15 min) before {b[0]:.1f}/{b[1]:.1f}/{b[2]:.1f}, after {a[0]:.1f}/{a[1]:.1f}/{a[2]:.1f}."
    )


def ssd_train_table(doc: dict[str, Any]) -> list[str]:
    """Training with the tables on SSD: step-time overhead over RAM by cache size, the large run's memory and
    I/O against the disk's measured limits, and checkpoint cost as the table grows 10x."""
    c, disk, big = doc["curve"], doc["disk"], doc["large"]
    head = doc.get("headline_overhead_at_10pct")
    verdict = "met" if doc.get("within_10pct") else "**not met**"
    mib = 2**20
    h10 = c["ssd"].get("0.1", {})
    extra = ""
    if "overhead_load_corrected" in h10:
        cpu_ok = "met" if doc.get("within_10pct_cpu") else "**not met**"
        extra = (
            f" Load-corrected: {_pct(h10['overhead_load_corrected']['median'])}; CPU (every thread of the process): "
            f"{_pct(h10['cpu_overhead']['median'])} (the target on CPU time: {cpu_ok})."
        )
    lines = [
        f"**Tables on SSD while training** (`engram.table_tier=ssd`): the same model and batches trained side by "
        f"side with the table in RAM and on SSD (table file {c['table_file_bytes'] / mib:,.0f} MiB: rows + Adam "
        f"state), one step of each arm in turn, {c['steps']} timed steps, torch threads "
        f"{c.get('torch_threads', 1)}; losses identical in every arm: {'yes' if c['identical_losses'] else '**no**'}. "
        + (f"**Overhead at a cache of 10% of the table: {_pct(head['median'])}** (wall, IQR {_pct(head['q1'])} to "
           f"{_pct(head['q3'])}; target <= 10%: {verdict})." if head else "")
        + extra + _ssd_load(c)
        + (" A step is timed until its own prefetch of the next step is done; 'load-corrected' removes the time the "
           "training thread was runnable but waiting for a CPU (Linux schedstat); 'CPU' is the process's CPU time "
           "per step (training, prefetch and I/O threads) over the RAM arm's." if "overhead_load_corrected" in h10
           else ""),
        "",
        *_ssd_curve_rows(c),
    ]  # fmt: skip
    for th, ct in sorted((doc.get("curve_threads") or {}).items()):
        h = ct["ssd"].get("0.1")
        lines += [
            "",
            f"The same curve with torch at {th} intra-op threads (RAM arm too), {ct['steps']} timed steps"
            + (f"; 10% cache: wall {_pct(h['overhead']['median'])}, CPU {_pct(h['cpu_overhead']['median'])}" if h
               else "") + "." + _ssd_load(ct),
            "",
            *_ssd_curve_rows(ct),
        ]  # fmt: skip
    rd, wr = disk["read_qd16"], disk["write_qd16"]
    lines += [
        "",
        f"**Large run**: a {big['table_file_bytes'] / 2**30:.2f} GiB table file ({big['table_rows']:,} rows) behind a "
        f"{big['cache_bytes'] / mib:,.0f} MiB cache ({big['table_file_bytes'] / big['cache_bytes']:.1f}x the cache): "
        + (f"{big.get('batch_size', 8)} x 64 tokens a step, timed over {big['steps']} steps after "
           f"{big['warmup_steps']} warm-up steps (cache {100 * big['cache_filled_bytes'] / big['cache_bytes']:.0f}% "
           f"full; evicting and writing back while timed: {'yes' if big.get('evicting_when_timed') else '**no**'}): "
           if "warmup_steps" in big else "")
        + f"{big['tokens_per_s']:,.0f} tokens/s, step {1e3 * big['step_s']:,.0f} ms, prefetch wait "
        f"{big['wait_ms']['median']:.2f} ms (median), rows found in the cache at the gather (after the prefetch) "
        f"{100 * big['cache_hit_rate']:.1f}%. "
        f"**Peak RSS {big['peak_rss_bytes'] / mib:,.0f} MiB** against a bound of {big['bound_bytes'] / mib:,.0f} MiB "
        f"(the same process with a negligible in-model table peaks at {big['baseline_peak_rss_bytes'] / mib:,.0f} "
        f"MiB; + cache + index {big['index_bytes'] / mib:,.0f} MiB + a stated "
        f"{big.get('stated_overhead_bytes', 0) / mib:,.0f} MiB for the per-step I/O buffers): "
        f"{'within' if big['within_bound'] else '**above**'}. Rows read {big['rows_read_per_s']:,.0f}/s and written "
        f"{big['rows_written_per_s']:,.0f}/s ({big['bytes_read_per_s'] / mib:,.1f} and "
        f"{big['bytes_written_per_s'] / mib:,.1f} MiB/s) against the disk's measured O_DIRECT 4 KiB random "
        f"limits of {rd['iops']:,.0f} reads/s ({rd['mib_s']:,.0f} MiB/s) and {wr['iops']:,.0f} writes/s at queue "
        f"depth 16 (QD 1: {disk['read_qd1']['iops']:,.0f} and {disk['write_qd1']['iops']:,.0f}/s). Table creation "
        f"(streamed init, CRCs, fsync) took {big['init_s']:,.0f} s." + _ssd_load(big),
        "",
        f"**Checkpoints as the table grows 10x** (after the same steps; SSD cache fixed at "
        f"{doc['checkpoints'][0].get('cache_bytes', 0) / mib:,.0f} MiB): the RAM tier's checkpoint copies the table "
        "and its state; the SSD tier's writes the cache's dirty rows to the log plus the dense model and a manifest.",
        "",
        "| rows per head | table in RAM MiB | SSD table file MiB | RAM checkpoint MiB, s | SSD checkpoint MiB written "
        "(log + files), s |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for r in doc["checkpoints"]:
        m, s_ = r["model"], r["ssd"]
        lines.append(
            f"| {r['vocab_per_head']:,} | {r['table_bytes_ram'] / mib:,.1f} | {r['table_file_bytes'] / mib:,.1f} | "
            f"{m['bytes_written'] / mib:,.1f}, {m['checkpoint_s']:.2f} | {s_['bytes_written'] / mib:,.1f} "
            f"({s_['log_bytes'] / mib:,.1f} + {s_['checkpoint_dir_bytes'] / mib:,.1f}), {s_['checkpoint_s']:.2f} |"
        )
    return lines + _image(doc, doc.get("plot"), "SSD step-time overhead vs cache size") + _footer(doc)


# ---------------------------------------------------------------------------- decode vs HF


def _med_iqr(s: dict[str, Any]) -> str:
    return f"{s['median']:.1f} ({s['q1']:.1f}–{s['q3']:.1f})"


def decode_vs_hf_table(doc: dict[str, Any]) -> list[str]:
    """Greedy generate: engramlm vs HF transformers on a same-shape Llama, and the Engram layers' share."""
    m, p = doc["model"], doc["params"]
    lines = [
        f"**Decode vs HF transformers {doc['transformers']}** (v{doc['version']}{_label(doc)}): same shape "
        f"(d={m['hidden']}, "
        f"{m['layers']} layers, {m['heads']} heads, MLP {m['mlp_hidden']}, vocab {m['vocab']:,}; engramlm adds "
        f"M={m['hc_mult']} hyper-connection branches and Engram at layers {m['engram_layers']}, tables in the "
        f"model); prompt {p['prompt']} real-text tokens, {p['steps']} new tokens per sequence, greedy, one "
        f"`generate` call per contender per repeat (prefill + decode), {p['repeats']} interleaved repeats, "
        f"{p['threads']} torch thread(s). × HF = paired per-repeat time ratio HF ÷ engramlm (above 1: faster "
        "than HF); Engram share = 1 − t(no Engram) ÷ t(engramlm).",
        "",
    ]
    unpacked = all("unpacked_speedup_vs_hf" in r for r in doc["runs"])
    if unpacked:
        lines[0] += (
            " Unpacked × HF: the eager engine with `packed=False` (plain `F.linear`, no prepacked oneDNN weights,"
            " no fused q/k/v and gate/up: the matmuls before this change), same run."
        )
    lines += [
        "| batch | engramlm tok/s | HF Llama tok/s | **× HF** | without Engram × HF | Engram share |"
        + (" unpacked × HF |" if unpacked else ""),
        "|---|---|---|---|---|---|" + ("---|" if unpacked else ""),
    ]
    for r in doc["runs"]:
        t, sh = r["tokens_per_second"], r["engram_share"]
        lines.append(
            f"| {r['batch']} | {_med_iqr(t['engramlm'])} | {_med_iqr(t['hf_llama'])} | **{_x(r['speedup_vs_hf'])}** | "
            f"{_x(r['no_engram_speedup_vs_hf'])} | {sh['median']:.0%} ({sh['q1']:.0%}–{sh['q3']:.0%}) |"
            + (f" {_x(r['unpacked_speedup_vs_hf'])} |" if unpacked else "")
        )
    compiled = [r for r in doc["runs"] if "compiled" in r]
    if compiled:
        lines += [
            "",
            "With `Engine(compile=True)` (the one-token decode steps through "
            "`torch.compile`, prefill eager; same repeats, interleaved with the rows above). Times exclude "
            "compilation, which happens once per batch size in the untimed warm-up call; its cost is the last "
            "column (engramlm / without Engram).",
            "",
            "| batch | compiled tok/s | **× HF** | × eager | without Engram × HF | Engram share | compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compiled:
            c, t = r["compiled"], r["tokens_per_second"]
            sh, cs = c["engram_share"], c["compile_seconds"]
            lines.append(
                f"| {r['batch']} | {_med_iqr(t['engramlm_compiled'])} | **{_x(c['speedup_vs_hf'])}** | "
                f"{_x(c['speedup_vs_eager'])} | {_x(c['no_engram_speedup_vs_hf'])} | "
                f"{sh['median']:.0%} ({sh['q1']:.0%}–{sh['q3']:.0%}) | "
                f"{cs.get('engramlm_compiled', 0):.0f} / {cs.get('engramlm_no_engram_compiled', 0):.0f} |"
            )
    split = [r for r in doc["runs"] if "prefill_and_step_seconds" in r]
    if split:
        names = [n for n in split[0]["prefill_and_step_seconds"] if "no_engram" not in n]
        lines += [
            "",
            "Where engramlm's time goes (median ms per call): the prefill, then the mean one-token decode step.",
            "",
            "| batch | " + " | ".join(f"{n} prefill / step" for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for r in split:
            ps = r["prefill_and_step_seconds"]
            med = {n: (ps[n]["prefill_s"]["median"] * 1e3, ps[n]["decode_step_s"]["median"] * 1e3) for n in names}
            cells = [f"{med[n][0]:.0f} / {med[n][1]:.1f}" for n in names]
            lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- block 0 probes


def block0_table(doc: dict[str, Any]) -> list[str]:
    """Each block-0 probe: held-out loss over seeds, its paired gap to the block-1 reference, what the block adds."""
    p = doc["parameters"]
    lines = [
        f"**Why block 0 trails block 1** (setting `{doc['setting']}`, {doc['corpus']}: d={p['hidden']}, "
        f"{p['layers']} layers, {p['steps']} steps of {p['batch']}×{p['seq']}, seeds "
        f"{', '.join(map(str, doc['seeds']))}; gap = held-out loss minus block 1's, paired by seed; Y/H = RMS of "
        "the Engram output over RMS of the stream it is added to, on held-out tokens, at the first and the last "
        "kept checkpoint; α = the gate at the last).",
        "",
        "| probe | held-out loss | gap to block 1 | Y/H early → final | α p10 / p50 / p90 |",
        "|---|---|---|---|---|",
    ]
    for name, a in doc["arms"].items():
        g = a.get("minus_block1")
        gap = "—" if g is None or name == "block1" else f"{g['mean']:+.3f} ± {g['std']:.3f}"
        first, last = a["inside"][0][0], a["inside"][0][-1]
        ratio = [np.mean([run[i]["ratio"] for run in a["inside"]]) for i in (0, -1)]
        lines.append(
            f"| {name} | {a['loss']['mean']:.3f} ± {a['loss']['std']:.3f} | {gap} | "
            f"{ratio[0]:.2f} (step {first['step']}) → {ratio[1]:.2f} | "
            f"{last['alpha_q10']:.2f} / {last['alpha_q50']:.2f} / {last['alpha_q90']:.2f} |"
        )
    return lines + _image(doc, doc.get("plot"), "block 0 probes") + _footer(doc)


def _nats_gaps(p: dict[str, Any]) -> str:
    if "train_loss_gap" not in p:
        return "—"
    return f"{p['train_loss_gap']:+.3f} → {p['heldout_loss_gap']:+.3f}"


def h2h_trend_table(doc: dict[str, Any]) -> list[str]:
    """The paired Engram - MoE gap per budget and where its log-linear fit crosses zero."""
    f, c = doc["fit"], doc["fit"]["cross_tokens_per_row"]
    lines = [
        f"**Engram − MoE gap vs tokens per row**, {doc['corpus']} (d={doc['d']}, {doc['layers']} layers): gap = "
        f"{f['intercept']:+.4f} {f['slope_per_ln_tokens_per_row']:+.4f} ln(tokens/row); {f['direction']} at "
        f"**{c['median']:.1f} tokens/row** (68%: {c['q16']:.1f}–{c['q84']:.1f}; 90%: {c['q05']:.1f}–{c['q95']:.1f}; "
        f"slope sign kept in {f['p_slope_sign']:.1%} of draws).",
        "",
        "| result | training tokens | tokens per row | gap (bpb), mean ± SE | seeds | predicted by the multi-seed "
        "budgets' fit (± SD of one seed), z | gap in nats: training batches (last 10% of steps) → held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in doc["points"]:
        pred = p.get("predicted")
        pred_s = f"{pred['gap']:+.4f} ± {pred['sd']:.4f}, z = {pred['z']:+.1f}" if pred else "—"
        se_s = " (pooled)" if p.get("se_from") == "pooled" else ""
        lines.append(
            f"| {p['result']} | {p['tokens']:,} | {p['tokens_per_row']:.1f} | {p['gap_mean']:+.4f} ± {p['gap_se']:.4f}"
            f"{se_s} | {p['seeds']} | {pred_s} | {_nats_gaps(p)} |"
        )
    if f.get("p_fit") is not None:
        lines += ["", f"Residuals of the fit over all budgets: χ² = {f['chi2']:.1f} on {f['dof']} degree(s) of freedom "
                  f"(p = {f['p_fit']:.3f})."]  # fmt: skip
        if f["p_fit"] < 0.05:  # the headline above is a line's crossing; say when the data reject the line
            note = f"the log-linear fit is **rejected** (p = {f['p_fit']:.3f}), so no crossing is claimed; the line "
            lines[0] = lines[0].replace(f"{f['direction']} at", note + "would cross at")
    return lines + _footer(doc)


def cache_cpu_table(doc: dict[str, Any]) -> list[str]:
    """Per-gather CPU and GIL time of the SSD tier's hot-row cache, against no cache, RAM, and the cache before."""
    p, w, res = doc["params"], doc["workload"], doc["results"]
    rows = ", ".join(f"layer {lid}: {n}" for lid, n in w["rows_per_gather"].items())
    base = p.get("baseline_rev", "none")
    before = (
        f" `_base` is the `CachedTable` of revision `{base}`, loaded from git, same run."
        if base != "none" and any(n.endswith("_base") for n in res)
        else ""
    )
    has_proc = all("process_cpu_ms" in r for r in res.values())
    lines = [
        f"**Hot-row cache cost on the decode thread**: `bench_generate`'s workload (real text, batch {p['batch']}, "
        f"{w['gathers_per_step']} Engram layers gathered per decode step; ids per gather {rows}), O_DIRECT store "
        f"files, caches warmed on {p['warm_tokens']:,} other tokens. Per gather: the calling thread's CPU, of it "
        "the CPU inside GIL-releasing calls (the aio read kernel, the cache's and the dedupe kernels), and the rest, "
        "the GIL-held estimate"
        + ("; all threads' CPU (the caller plus glibc's AIO helpers, which run no Python)" if has_proc else "")
        + f"; median (IQR) over {p['repeats']} interleaved blocks of {p['steps']} steps. `memory`: the rows in RAM "
        "(a gather's Python alone); `*_before`: the same tables gathered by `RowTable.gather` as it was before the "
        "fused path (`torch.unique`, the tier's `_fetch_unique`, `index_select`)." + before,
        "",
        "| contender | hit rate | GIL held ms / gather | caller CPU ms | of it nogil ms | "
        + ("all threads CPU ms | " if has_proc else "")
        + "GIL held / c0 | CPU / c0 |",
        "|---|---|---|---|---|---|---|" + ("---|" if has_proc else ""),
    ]

    def order(name: str) -> tuple[float, str]:  # memory first, then by cache size, each before its before
        head = name.split("_")[0]
        return (-1.0 if head == "memory" else float(head[1:]) if head[1:].replace(".", "").isdigit() else 1e9, name)

    for name in sorted(res, key=order):
        r = res[name]
        g = r["gil_held_ms"]
        proc = f"{r['process_cpu_ms']['median']:.3f} | " if has_proc else ""
        lines.append(
            f"| `{name}` | {'—' if name.startswith('memory') else format(r['hit_rate'], '.1%')} | "
            f"{g['median']:.3f} ({g['q1']:.3f}–{g['q3']:.3f}) | "
            f"{r['cpu_ms']['median']:.3f} | {r['nogil_cpu_ms']['median']:.3f} | {proc}"
            f"{r['gil_held_ms_ratio_to_c0']['median']:.2f} | {r['cpu_ms_ratio_to_c0']['median']:.2f} |"
        )
    return lines + _footer(doc)


def h2h_splits_table(doc: dict[str, Any]) -> list[str]:
    """A head-to-head's Engram and MoE arms scored on the training text and on each held-out split."""
    seeds = [s.removeprefix("seed") for s in doc["seeds"]]
    lines = [
        f"**Where the gap comes from**: the `{doc['result']}` arms ({doc['corpus']}, seeds {', '.join(seeds)}) "
        "scored on the same number of tokens of each split. Gap = Engram + MoE − MoE, mean over seeds "
        "(negative: Engram better); excess = the split's loss gap minus the training text's.",
        "",
        "| split | tokens | MoE loss | Engram + MoE loss | gap (nats) | gap (bpb) "
        "| excess over the training text (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in _ordered(doc["splits"], ("train", "test", "val")):
        r = doc["splits"][split]
        excess = r.get("excess_vs_train_loss")
        lines.append(
            f"| {split} | {r['tokens']:,} | {r['moe_loss']['mean']:.4f} | {r['engram_moe_loss']['mean']:.4f} | "
            f"{r['gap_loss']['mean']:+.4f} | {r['gap_bpb']['mean']:+.4f} | "
            f"{'—' if excess is None else format(excess, '+.4f')} |"
        )
    return lines + _footer(doc)


# ---------------------------------------------------------------------------- training step vs HF


TRAIN_STEP_ORDER = ("engramlm dense", "engramlm dense adamw", "hf llama", "engramlm moe", "engramlm engram_moe",
                    "hf qwen2_moe")  # fmt: skip


def _s_iqr(s: dict[str, Any]) -> str:
    """Seconds: median (IQR), three significant digits."""
    return f"{s['median']:.3g} ({s['q1']:.3g}–{s['q3']:.3g})"


def train_step_table(doc: dict[str, Any]) -> list[str]:
    """One training step of the head-to-head arms against HF transformers models of the same shape."""
    m, p = doc["model"], doc["params"]
    moe = m.get("moe")
    moe_s = (f"; MoE arm: layer 0 dense, then {moe['n_routed']} routed experts of width {moe['expert_hidden']}, "
             f"top {moe['top_k']}, {moe['n_shared']} shared") if moe else ""  # fmt: skip
    lines = [
        f"**Training step vs HF transformers {doc['transformers']}** (v{doc['version']}{_label(doc)}): "
        "configs/sotu_*.toml "
        f"(d={m['hidden']}, {m['layers']} layers, {m['heads']} heads, MLP {m['mlp_hidden']}, vocab {m['vocab']:,}"
        f"{moe_s}); one step = forward + backward + clip + optimizer + zero_grad on the same real batch of "
        f"`{Path(p['data']).name}` "
        f"({doc['runs'][0]['tokens_per_step']:,} tokens) for every contender, {p['repeats']} interleaved repeats "
        f"after {p['warmup']} warm-up step(s). engramlm: `Trainer.train_step` with the paper's recipe (Muon + "
        "AdamW + sparse Adam), *adamw* with `optim.use_muon=false`; HF: `LlamaForCausalLM` / "
        f"`Qwen2MoeForCausalLM` with `torch.optim.AdamW`, attention `{doc['runs'][0].get('hf_attn_implementation')}`"
        f", experts `{doc['runs'][0].get('hf_experts_implementation')}`. × HF = paired per-repeat time ratio "
        "HF ÷ engramlm (above 1: faster than HF); *w/o optimizer*: the same for the rest of the step (forward, "
        "backward, clip, zero_grad). Matmul rate: 6 P_act FLOPs per token (without embedding and "
        "LM head / with the LM head) over the best fp32 1024³ matmul at that thread count.",
    ]
    for r in doc["runs"]:
        lines += [
            "",
            f"{r['threads']} torch thread(s), fp32 matmul {r['gemm_fp32_flops_per_s'] / 1e9:.0f} GFLOP/s:",
            "",
            "| contender | step s | tokens/s | optimizer share | of matmul rate | **× HF** | × HF w/o optimizer |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in _ordered(r["arms"], TRAIN_STEP_ORDER):
            a = r["arms"][name]
            sh = a["optimizer_share"]
            tps = a["tokens_per_s"]
            vs = f"**{_x(a['speedup_vs_hf'])}** vs {a['hf_peer']}" if "speedup_vs_hf" in a else "—"
            rest = a.get("speedup_vs_hf_without_optimizer")
            vs += f" | {_x(rest)}" if rest else " | —"
            lines.append(
                f"| {name} | {_s_iqr(a['step_s'])} | {tps['median']:,.0f} ({tps['q1']:,.0f}–{tps['q3']:,.0f}) | "
                f"{sh['median']:.1%} ({sh['q1']:.1%}–{sh['q3']:.1%}) | "
                f"{a['matmul_rate_fraction']:.0%} / {a['matmul_rate_fraction_with_head']:.0%} | "
                f"{vs} |"
            )
    return lines + _footer(doc)


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "hashing": hashing_table,
    "engram_block": engram_block_table,
    "decode_vs_hf": decode_vs_hf_table,
    "train_step": train_step_table,
    "store": store_table,
    "store_io": store_io_table,
    "cache_cpu": cache_cpu_table,
    "row_access": row_access_table,
    "sparse_update": sparse_update_table,
    "head_to_head": head_to_head_table,
    "head_to_head_why": head_to_head_why_table,
    "generate": generate_table,
    "gather_cpu": gather_cpu_table,
    "reproductions": reproductions_table,
    "depth": depth_table,
    "distributed": distributed_table,
    "muon": muon_table,
    "lm_eval_h2h": lm_eval_h2h_table,
    "serve": serve_table,
    "ssd_train": ssd_train_table,
    "block0": block0_table,
    "h2h_trend": h2h_trend_table,
    "h2h_splits": h2h_splits_table,
}
KINDS = tuple(RENDERERS)


def kind_of(doc: dict[str, Any]) -> str | None:
    """The README block a result belongs to: its ``kind`` (or ``benchmark``) if a renderer has that name,
    else the renderer whose name prefixes it (``head_to_head_quick`` -> ``head_to_head``, ``generate_t1`` ->
    ``generate``), so variants written with ``--out``/sizes stack under one marker."""
    kind = doc.get("kind", doc.get("benchmark"))
    if not isinstance(kind, str):
        return None
    if kind in RENDERERS:
        return kind
    return next((k for k in sorted(RENDERERS, key=len, reverse=True) if kind.startswith(k + "_")), None)


def load_results(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Result documents grouped by kind, files in name order (so 'hashing' precedes variants)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        kind = kind_of(doc)
        if kind is None:
            print(f"make_tables: skipping {path.name} (unknown kind {doc.get('kind')!r})", file=sys.stderr)
            continue
        doc["_path"] = str(path)  # where its plots are looked up
        grouped.setdefault(kind, []).append(doc)
    return grouped


def render(grouped: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """One Markdown block per kind (several result files of a kind are stacked)."""
    out: dict[str, str] = {}
    for kind in KINDS:
        docs = grouped.get(kind, [])
        parts = ["\n".join(RENDERERS[kind](d)) for d in docs]
        if parts:
            out[kind] = "\n\n".join(parts)
    return out


def update_readme(path: Path, blocks: dict[str, str]) -> list[str]:
    """Replace marker-delimited regions in ``path``; returns the kinds actually replaced."""
    from engramlm.utils.io import atomic_write_text

    text = path.read_text(encoding="utf-8")
    done = []
    for kind, body in blocks.items():
        pat = re.compile(
            rf"(<!-- bench:{re.escape(kind)}:start -->)(.*?)(<!-- bench:{re.escape(kind)}:end -->)",
            re.DOTALL,
        )
        if pat.search(text):
            text = pat.sub(lambda m, b=body: f"{m.group(1)}\n{b}\n{m.group(3)}", text, count=1)
            done.append(kind)
    if done:
        atomic_write_text(path, text)
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--update-readme", type=Path, default=None, metavar="FILE")
    args = ap.parse_args(argv)

    blocks = render(load_results(args.results_dir))
    for kind, body in blocks.items():
        print(f"### {kind}\n\n{body}\n")
    if args.update_readme is not None:
        done = update_readme(args.update_readme, blocks)
        missing = sorted(set(blocks) - set(done))
        print(f"make_tables: updated {done} in {args.update_readme}", file=sys.stderr)
        if missing:
            print(f"make_tables: no markers for {missing} in {args.update_readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
