"""Generate the Markdown benchmark tables from ``benchmarks/results/*.json``.

Why: numbers in a README drift from the runs they came from when typed by hand. Every table is
rendered from the result files, with the machine and the exact command beneath it, and
``--update-readme FILE`` splices them between ``<!-- bench:<kind>:start -->`` and
``<!-- bench:<kind>:end -->`` markers (only where both markers exist).

Usage: ``python benchmarks/make_tables.py [--results-dir DIR] [--update-readme README.md]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("hashing", "engram_block")


def _ms(s: dict[str, Any]) -> str:
    """Median and IQR of a seconds summary, in ms."""
    return f"{s['median'] * 1e3:.2f} ({s['q1'] * 1e3:.2f}–{s['q3'] * 1e3:.2f})"


def _x(s: dict[str, Any]) -> str:
    """Median ratio with its IQR."""
    return f"{s['median']:.2f}× ({s['q1']:.2f}–{s['q3']:.2f})"


def _opt(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


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
        f"numba {m.get('numba')} · threads: torch {m.get('torch_threads')}, numba "
        f"{m.get('numba_threads')} ({m.get('numba_threading_layer')}) · env: {env_s} · "
        f"commit {commit} · {doc.get('timestamp_utc')}<br>`{doc.get('command')}`</sub>",
    ]


def hashing_table(doc: dict[str, Any]) -> list[str]:
    """Throughput, speedup, bound and streaming latency of one hashing result file."""
    p = doc["parameters"]
    lines = [
        f"**Hashing, variant `{doc.get('variant', 'default')}`**: B={p['batch']}, T={p['seq']} "
        f"real tokens (CPython stdlib sources), both Engram layers, compression included on "
        f"both sides; median (IQR) over {p['repeats']} interleaved repeats; speedup = paired "
        f"per-repeat ratio, target ≥ {p['target_speedup']:.0f}×.",
        "",
        "| preset | contender | ms / call | Mtok/s | speedup vs reference |",
        "|---|---|---|---|---|",
    ]
    names = {
        "reference_numpy": "reference (NumPy)",
        "library_auto": "NgramHasher auto (Numba)",
        "library_torch": "NgramHasher torch",
    }
    for preset, r in doc["presets"].items():
        for key, label in names.items():
            sp = r["speedup_vs_reference"].get(key)
            lines.append(
                f"| {preset} | {label} | {_ms(r['timing_s'][key])} | "
                f"{r['tokens_per_s'][key]['median'] / 1e6:.2f} | {_x(sp) if sp else '1×'} |"
            )
    lines += [
        "",
        "| preset | ns/(token·head) call | kernel only¹ | cycles/(token·head·thread) | "
        "write GB/s (kernel) | memcpy GB/s | kernel vs memcpy | JIT first call s | "
        "cold compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, r in doc["presets"].items():
        b, j = r["bound"], r["jit"]
        lines.append(
            f"| {preset} | {b['ns_per_token_head_call']:.2f} | {b['ns_per_token_head_kernel']:.2f} "
            f"| {_opt(b['cycles_per_token_head_per_thread'], '.1f')} | "
            f"{b['write_gbps_kernel']:.2f} | {b['memcpy_gbps']:.2f} | "
            f"{b['fraction_of_memcpy_kernel'] * 100:.0f}% | {j['first_call_s']:.3f} | "
            f"{_opt(j['cold_compile_first_call_s'], '.2f')} |"
        )
    lines += [
        "",
        "¹ call median minus the compression-only median (estimate of the Numba kernel alone). "
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


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "hashing": hashing_table,
    "engram_block": engram_block_table,
}


def load_results(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Result documents grouped by kind, files in name order (so 'hashing' precedes variants)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        kind = doc.get("kind", doc.get("benchmark"))
        if kind in RENDERERS:
            grouped.setdefault(kind, []).append(doc)
        else:
            print(f"make_tables: skipping {path.name} (unknown kind {kind!r})", file=sys.stderr)
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
