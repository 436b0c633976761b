"""Does Engram's deficit on prose close with more training? Fit the head-to-head gap against tokens per row.

Issue 19: on State of the Union the Engram arm trails MoE (+0.025 bpb at the medium budget, +0.007 at
full) while on code it leads. Each table row is updated only when its n-grams recur, so the natural
axis is training tokens per table row. This reads every head-to-head result in ``benchmarks/results``
(any ``--out`` name) for one model size, takes the paired per-seed Engram - MoE bpb difference at each
budget, fits ``gap = a + b ln(tokens per row)`` by weighted least squares (weights 1/SE^2 of each
budget's mean difference) and propagates the seed spread by Monte Carlo (each budget's mean drawn from
a normal with its standard error) into the crossing point ``exp(-a/b)`` (Engram overtakes MoE there if
b < 0, falls behind if b > 0): its median and 68/90% intervals, and how often the slope keeps its sign.
With two budgets this is an extrapolation from two points, and says so.

Budgets trained with one seed (the larger ones, which cost hours per arm here) have no spread of their own: their
standard error is the per-seed std of the paired difference pooled over the multi-seed budgets (stated in the
result as ``se_from: pooled``). They also serve as an out-of-sample test: the fit of the multi-seed budgets alone
predicts each one-seed gap, with the prediction's spread (Monte Carlo over the fit plus the pooled seed noise),
before the refit over all budgets. Larger budgets, with the dense arm left out:
``python -m benchmarks.bench_head_to_head --size long --corpus sotu --seeds 0 --arms moe engram_moe`` (2x full)
and ``--size longer`` (4x), then run this again.

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
    """One point per head-to-head result of this model size that scored ``corpus`` (one-seed points: pooled SE)."""
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
        rows = sum(arms["engram_moe"]["params"]["engram_rows"])
        pairs = list(zip(arms["engram_moe"]["runs"], arms["moe"]["runs"], strict=True))
        points.append({
            "result": path.name, "tokens": s["tokens"], "rows": rows, "tokens_per_row": s["tokens"] / rows,
            "gap_mean": float(np.mean(diffs)), "seeds": len(diffs),
            "gap_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
            # the same gap in nats on the training batches (end of training) and on held-out text: a memory that
            # fits its training text without transferring shows a train gap below zero and a held-out gap above
            "train_loss_gap": float(np.mean([_late_loss(e) - _late_loss(m) for e, m in pairs])),
            "heldout_loss_gap": float(np.mean([e["heldout"]["loss"] - m["heldout"]["loss"] for e, m in pairs])),
        })  # fmt: skip
    pooled = pooled_sd(points)
    for p in points:
        own = p["gap_sd"] is not None
        p["se_from"] = "seeds" if own else "pooled"
        p["gap_se"] = (p["gap_sd"] if own else pooled) / math.sqrt(p["seeds"]) if (own or pooled) else None
    return sorted(points, key=lambda p: p["tokens_per_row"])


def _late_loss(run: dict[str, Any], frac: float = 0.1) -> float:
    """Mean training loss over the last ``frac`` of a run's logged steps (at least 5): one batch is too noisy."""
    curve = run.get("curve") or [[0, float("nan")]]
    n = max(5, int(len(curve) * frac))
    return float(np.mean([loss for _, loss in curve[-n:]]))


def pooled_sd(points: list[dict[str, Any]]) -> float | None:
    """Per-seed std of the paired gap pooled over the budgets with >= 2 seeds (degrees-of-freedom weighted)."""
    own = [(p["seeds"] - 1, p["gap_sd"]) for p in points if p["gap_sd"] is not None]
    dof = sum(k for k, _ in own)
    return math.sqrt(sum(k * sd**2 for k, sd in own) / dof) if dof else None


def predict(result: dict[str, Any], tokens_per_row: float, seed_sd: float) -> dict[str, float]:
    """The fitted gap at ``tokens_per_row`` and the spread of one seed's observation around it."""
    x = math.log(tokens_per_row)
    a, b = np.asarray(result["draws"]["a"]), np.asarray(result["draws"]["b"])
    mean = float(result["intercept"] + result["slope_per_ln_tokens_per_row"] * x)
    fit_sd = float(np.std(a + b * x))
    return {"gap": mean, "fit_sd": fit_sd, "sd": math.sqrt(fit_sd**2 + seed_sd**2)}


def chi2_sf(x: float, dof: int) -> float:
    """P(chi^2_dof >= x) for an integer dof, in closed form (no SciPy): erfc for the odd part, a Poisson sum."""
    h = x / 2
    if dof % 2 == 0:
        return math.exp(-h) * sum(h**i / math.factorial(i) for i in range(dof // 2))
    odd = sum(h ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (dof + 1) // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * odd


def fit(points: list[dict[str, Any]], draws: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Weighted log-linear fit of the gap and the Monte-Carlo distribution of where it crosses zero.

    The result keeps 2,000 of the (intercept, slope) draws under ``draws`` for :func:`predict`; callers drop them
    before writing."""
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
    resid = m - (a0 + b0 * x)
    return {
        "intercept": a0, "slope_per_ln_tokens_per_row": b0,
        "chi2": float((w * resid**2).sum()), "dof": len(points) - 2,
        "p_fit": chi2_sf(float((w * resid**2).sum()), len(points) - 2) if len(points) > 2 else None,
        "draws": {"a": a[:2000].tolist(), "b": b[:2000].tolist()},
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
    points = [p for p in budget_points(RESULTS_DIR, args.corpus, args.d, args.layers) if p["gap_se"] is not None]
    multi = [p for p in points if p["se_from"] == "seeds"]
    if len(multi) < 2:
        raise SystemExit(f"h2h_trend: need >= 2 budgets with >= 2 seeds for {args.corpus}, found {len(multi)}")
    prior = fit(multi)
    seed_sd = pooled_sd(points) or 0.0
    for p in points:
        if p["se_from"] == "pooled":  # out of sample: what the multi-seed budgets alone predicted here
            pr = predict(prior, p["tokens_per_row"], seed_sd)
            p["predicted"] = {**pr, "z": (p["gap_mean"] - pr["gap"]) / pr["sd"]}
    result = fit(points)
    rows = points[-1]["rows"]
    for p in points:
        pred = p.get("predicted")
        extra = f"; predicted {pred['gap']:+.4f} ± {pred['sd']:.4f} (z {pred['z']:+.2f})" if pred else ""
        print(f"{p['result']:<28} {p['tokens']:>10,} tokens  {p['tokens_per_row']:6.1f} tok/row  "
              f"gap {p['gap_mean']:+.4f} ± {p['gap_se']:.4f} (SE, {p['seeds']} seeds, {p['se_from']})"
              + extra)  # fmt: skip
    c = result["cross_tokens_per_row"]
    print(f"fit: gap = {result['intercept']:+.4f} {result['slope_per_ln_tokens_per_row']:+.4f} ln(tokens/row); "
          f"{result['direction']} (P(slope sign) {result['p_slope_sign']:.3f}) at {c['median']:.1f} tokens/row "
          f"(68%: {c['q16']:.1f}-{c['q84']:.1f}; ~{c['median'] * rows / 1e6:.2f}M tokens per arm)")  # fmt: skip
    if result["p_fit"] is not None:
        print(f"fit residuals: chi2 {result['chi2']:.2f} on {result['dof']} dof, p = {result['p_fit']:.4f}")
    for f in (prior, result):
        f.pop("draws")
    doc = {"kind": "h2h_trend", "corpus": args.corpus, "d": args.d, "layers": args.layers, "points": points,
           "pooled_seed_sd": seed_sd}  # fmt: skip
    if len(multi) < len(points):
        doc["fit_multi_seed_only"] = prior
    path = write_result(f"h2h_trend_{args.corpus}", {**doc, "fit": result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
