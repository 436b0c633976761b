"""Does Engram's deficit on prose close with more training? Fit the head-to-head gap against tokens per row.

Issue 19: on State of the Union the Engram arm trails MoE (+0.025 bpb at the medium budget, +0.007 at
full) while on code it leads. Each table row is updated only when its n-grams recur, so the natural
axis is training tokens per table row. This reads every head-to-head result in ``benchmarks/results``
(any ``--out`` name) for one model size, takes the paired per-seed Engram - MoE bpb difference at each
budget, fits ``gap = a + b ln(tokens per row)`` by weighted least squares (weights 1/SE^2 of each
budget's mean difference) and propagates the seed spread by Monte Carlo (each budget's mean drawn from
a normal with its standard error) into the crossing point ``exp(-a/b)`` (Engram overtakes MoE there if
b < 0, falls behind if b > 0): its median and 68/90% intervals, and how often the slope keeps its sign.
With two budgets this is an extrapolation from two points, and says so. Budgets with one seed have no spread and are
skipped. Larger budgets: ``python -m benchmarks.bench_head_to_head --size long`` (2x full) and
``--size longer`` (4x), then run this again.

    python -m benchmarks.h2h_trend                   # sotu, the full-size model (d=256, 4 layers)
    python -m benchmarks.h2h_trend --corpus stdlib
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import RESULTS_DIR, write_result
from benchmarks.make_tables import kind_of


def budget_points(results_dir: Path, corpus: str, d: int, layers: int) -> list[dict[str, Any]]:
    """One point per head-to-head result of this model size that scored ``corpus`` with >= 2 seeds."""
    points = []
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if kind_of(doc) != "head_to_head" or corpus not in doc.get("corpora", {}):  # the README's grouping
            continue
        s = doc["settings"]
        if (s["d"], s["layers"]) != (d, layers):
            continue
        arms = doc["corpora"][corpus]["arms"]
        diffs = [e["heldout"]["bpb"] - m["heldout"]["bpb"]
                 for e, m in zip(arms["engram_moe"]["runs"], arms["moe"]["runs"], strict=True)]  # fmt: skip
        if len(diffs) < 2:
            continue
        rows = sum(arms["engram_moe"]["params"]["engram_rows"])
        points.append({
            "result": path.name, "tokens": s["tokens"], "rows": rows, "tokens_per_row": s["tokens"] / rows,
            "gap_mean": float(np.mean(diffs)), "gap_se": float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))),
            "seeds": len(diffs),
        })  # fmt: skip
    return sorted(points, key=lambda p: p["tokens_per_row"])


def fit(points: list[dict[str, Any]], draws: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Weighted log-linear fit of the gap and the Monte-Carlo distribution of where it crosses zero."""
    x = np.log([p["tokens_per_row"] for p in points])
    m = np.array([p["gap_mean"] for p in points])
    se = np.maximum([p["gap_se"] for p in points], 1e-6)
    w = 1.0 / se**2
    sample = np.random.default_rng(seed).normal(m, se, size=(draws, len(points)))
    xm = (w * x).sum() / w.sum()
    b = (w * (x - xm) * (sample - (sample * w).sum(1, keepdims=True) / w.sum())).sum(1) / (w * (x - xm) ** 2).sum()
    a = (sample * w).sum(1) / w.sum() - b * xm
    b0 = float((w * (x - xm) * (m - (w * m).sum() / w.sum())).sum() / (w * (x - xm) ** 2).sum())
    a0 = float((w * m).sum() / w.sum() - b0 * xm)
    # the gap is zero at exp(-a/b): Engram overtakes MoE there when b < 0, falls behind when b > 0
    same = np.sign(b) == np.sign(b0)
    at = np.exp(np.clip(-a[same] / b[same], -50, 50))
    q = np.quantile(at, [0.05, 0.16, 0.5, 0.84, 0.95])
    return {
        "intercept": a0, "slope_per_ln_tokens_per_row": b0,
        "direction": "engram overtakes moe" if b0 < 0 else "engram falls behind moe",
        "p_slope_sign": float(same.mean()),
        "cross_tokens_per_row": {"point": math.exp(-a0 / b0), "median": float(q[2]), "q16": float(q[1]),
                                 "q84": float(q[3]), "q05": float(q[0]), "q95": float(q[4])},
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    points = budget_points(RESULTS_DIR, args.corpus, args.d, args.layers)
    if len(points) < 2:
        raise SystemExit(f"h2h_trend: need >= 2 budgets with >= 2 seeds for {args.corpus}, found {len(points)}")
    result = fit(points)
    rows = points[-1]["rows"]
    for p in points:
        print(f"{p['result']:<28} {p['tokens']:>10,} tokens  {p['tokens_per_row']:6.1f} tok/row  "
              f"gap {p['gap_mean']:+.4f} ± {p['gap_se']:.4f} (SE, {p['seeds']} seeds)")  # fmt: skip
    c = result["cross_tokens_per_row"]
    print(f"fit: gap = {result['intercept']:+.4f} {result['slope_per_ln_tokens_per_row']:+.4f} ln(tokens/row); "
          f"{result['direction']} (P(slope sign) {result['p_slope_sign']:.3f}) at {c['median']:.1f} tokens/row "
          f"(68%: {c['q16']:.1f}-{c['q84']:.1f}; ~{c['median'] * rows / 1e6:.2f}M tokens per arm)")  # fmt: skip
    doc = {"kind": "h2h_trend", "corpus": args.corpus, "d": args.d, "layers": args.layers, "points": points}
    path = write_result(f"h2h_trend_{args.corpus}", {**doc, "fit": result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
