"""Row-access distribution of Engram lookups on real text: dedup per batch, Zipf fit, cache hit rates.

Why: whether a hot-row cache pays off (spec §10.1 "multi-level cache", proposed, not evaluated)
depends on how skewed the n-gram row accesses are on real input. This hashes CPython's stdlib
sources (tokenized with the DeepSeek-V3 tokenizer) with the ``demo`` preset's real layout
(V3 compression, 2/3-grams, 8 heads per order, ~10.3M rows per layer) and measures:

* **unique rows per batch**: distinct rows / lookups for batches of B×T tokens (what batch
  deduplication saves, spec §10.2.3);
* **Zipf fit**: exponent s of frequency ∝ rank^-s, from a least-squares line through the
  log-log rank-frequency curve (ranks 1..the number of rows seen at least twice);
* **hit rate vs cache size** for the three :class:`CachedTable` policies, replaying the token
  stream batch by batch through the real cache code (in front of a 1-wide stand-in table, since
  hit rates depend only on ids and capacity). The first half of the stream warms the caches
  (and is the profile ``static`` preloads its hottest rows from); hits are counted on the second.

Writes ``results/row_access.json`` and ``results/row_access.png``.
Run from the repository root: ``python -m benchmarks.bench_row_access``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks._common import RESULTS_DIR, write_result
from benchmarks.bench_hashing import stdlib_token_ids
from engramlm.assets import resolve_tokenizer
from engramlm.hashing.batch import NgramHasher
from engramlm.models.build import build_layout
from engramlm.models.presets import get_preset
from engramlm.store.base import RowTable, TableHeader
from engramlm.store.cache import POLICIES, CachedTable
from engramlm.store.formats import FP32


class _IdOnlyTable(RowTable):
    """A [rows, 1] table of zeros: lets the real cache code run on ids alone."""

    def __init__(self, rows: int) -> None:
        super().__init__(TableHeader(rows, 1, "0" * 64, FP32))

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.numel(), 1)


def zipf_fit(counts: np.ndarray) -> dict[str, Any]:
    """Exponent of a log-log least-squares line through rank-frequency (ranks with count >= 2)."""
    freq = np.sort(counts)[::-1].astype(np.float64)
    top = int(np.count_nonzero(freq >= 2))
    ranks = np.arange(1, top + 1, dtype=np.float64)
    slope, intercept = np.polyfit(np.log(ranks), np.log(freq[:top]), 1)
    pred = slope * np.log(ranks) + intercept
    resid = np.log(freq[:top]) - pred
    r2 = 1 - float(resid.var() / np.log(freq[:top]).var())
    return {"exponent": float(-slope), "intercept": float(intercept), "r2": r2, "ranks_fitted": top}


def hit_rates(ids: np.ndarray, batch_lookups: int, rows: int, capacities: list[int]) -> dict[str, list[float]]:
    """Hit rate on the second half of the id stream, per policy and capacity (warm on the first)."""
    half = ids.size // 2 // batch_lookups * batch_lookups
    warm, test = ids[:half], ids[half:]
    # The static policy's profile: the most frequent rows of the warm-up half.
    uniq, cnt = np.unique(warm, return_counts=True)
    hottest = uniq[np.argsort(-cnt, kind="stable")]
    out: dict[str, list[float]] = {p: [] for p in POLICIES}
    # Upper bound for any policy: an infinite cache misses only a row's first appearance.
    seen = np.zeros(rows, dtype=bool)
    seen[warm] = True
    hits = looked = 0
    for s in range(0, test.size, batch_lookups):
        u = np.unique(test[s : s + batch_lookups])
        hits, looked = hits + int(seen[u].sum()), looked + u.size
        seen[u] = True
    out["infinite"] = [hits / looked] * len(capacities)
    steps = len(POLICIES) * len(capacities)
    with tqdm(total=steps, desc="cache replay", leave=False) as bar:
        for policy in POLICIES:
            for cap in capacities:
                cache = CachedTable(_IdOnlyTable(rows), cap * 4, policy)
                if policy == "static":
                    cache.preload(torch.from_numpy(hottest[:cap]))
                else:
                    for s in range(0, warm.size, batch_lookups):
                        cache.fetch_sorted_unique(torch.from_numpy(np.unique(warm[s : s + batch_lookups])))
                cache.stats.reset()
                for s in range(0, test.size, batch_lookups):
                    cache.fetch_sorted_unique(torch.from_numpy(np.unique(test[s : s + batch_lookups])))
                out[policy].append(cache.stats.hit_rate)
                bar.update()
    return out


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for layer, r in result["layers"].items():
        freq = np.asarray(r["rank_frequency_sample"]["freq"])
        ranks = np.asarray(r["rank_frequency_sample"]["rank"])
        ax.loglog(ranks, freq, ".", ms=3, label=f"layer {layer}")
        z = r["zipf"]
        ax.loglog(ranks, np.exp(z["intercept"]) * ranks ** -z["exponent"], "-", lw=1,
                  label=f"fit s={z['exponent']:.2f} (R²={z['r2']:.2f})")  # fmt: skip
    ax.set(xlabel="rank", ylabel="lookups", title="Row rank-frequency (stdlib, demo layout)")
    ax.legend(fontsize=8)
    ax = axes[1]
    layer, first = next((k, v) for k, v in result["layers"].items() if v["hit_rate"])
    fr = np.asarray(first["hit_rate"]["capacity_fraction"]) * 100
    for policy, hr in first["hit_rate"]["by_policy"].items():
        style = "k--" if policy == "infinite" else "o-"
        ax.semilogx(fr, np.asarray(hr) * 100, style, label=policy + (" (bound)" if policy == "infinite" else ""))
    ax.set(xlabel="cache size (% of the layer's rows)", ylabel="hit rate (%) of batch-unique lookups",
           title=f"Hit rate vs cache size (layer {layer})")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax = axes[2]
    for layer, r in result["layers"].items():
        ub = r["unique_per_batch"]
        ax.semilogx([u["tokens"] for u in ub], [u["unique_ratio_median"] for u in ub], "o-", label=f"layer {layer}")
    ax.set(xlabel="tokens per batch (B×T)", ylabel="unique rows / lookups", title="Batch deduplication")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--tokens", type=int, default=1 << 20, help="stdlib tokens to hash")
    ap.add_argument("--seq", type=int, default=512, help="T of a batch (sequences are cut from the stream)")
    ap.add_argument("--batch", type=int, default=8, help="B of the cache-replay batches")
    ap.add_argument("--cache-fractions", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--all-layers-hit-rate", action="store_true", help="replay caches for every layer")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cfg = get_preset(args.preset)
    assert cfg.engram is not None and cfg.engram.tokenizer is not None
    tok = resolve_tokenizer(cfg.engram.tokenizer)
    layout = build_layout(cfg, tok)
    n_seq = args.tokens // args.seq
    raw, text_info = stdlib_token_ids(tok, n_seq * args.seq)
    t0 = time.perf_counter()
    # One long stream cut into sequences of T; each sequence is hashed from its own start.
    row_ids = NgramHasher(layout)(torch.from_numpy(raw.reshape(n_seq, args.seq)))  # [L, S, T, H]
    hash_s = time.perf_counter() - t0
    heads = layout.heads_per_layer

    layers: dict[str, Any] = {}
    for li, layer in enumerate(layout.layer_ids):
        ids = row_ids[li].numpy().astype(np.int64)  # [S, T, H]
        rows = layout.rows_of(layer)
        counts = np.bincount(ids.reshape(-1), minlength=rows)
        seen = counts[counts > 0]
        z = zipf_fit(seen)
        freq = np.sort(seen)[::-1]
        sample_ranks = np.unique(np.geomspace(1, freq.size, 400).astype(np.int64))
        unique_per_batch = []
        for b in (1, 2, 4, 8, 16, 32):
            if b > n_seq:
                break
            ratios = [np.unique(ids[s : s + b]).size / ids[s : s + b].size for s in range(0, n_seq - b + 1, b)]
            unique_per_batch.append(
                {"batch": b, "tokens": b * args.seq, "lookups": b * args.seq * heads,
                 "unique_ratio_median": float(np.median(ratios)), "unique_ratio_q1": float(np.percentile(ratios, 25)),
                 "unique_ratio_q3": float(np.percentile(ratios, 75)), "batches": len(ratios)}
            )  # fmt: skip
        capacities = [max(1, int(f * rows)) for f in args.cache_fractions]
        if li > 0 and not args.all_layers_hit_rate:
            hr = None  # the replay is the slow part; layers share the text, so one is representative
        else:
            hr = hit_rates(ids.reshape(-1), args.batch * args.seq * heads, rows, capacities)
        top_share = {f"{p}%": float(np.sort(seen)[::-1][: max(1, int(p / 100 * rows))].sum() / seen.sum())
                     for p in (0.1, 1, 10)}  # fmt: skip
        layers[str(layer)] = {
            "table_rows": rows,
            "lookups": int(ids.size),
            "distinct_rows_touched": int(seen.size),
            "touched_fraction": float(seen.size / rows),
            "singletons": int(np.count_nonzero(seen == 1)),
            "max_count": int(seen.max()),
            "share_of_lookups_in_top_rows": top_share,
            "zipf": z,
            "rank_frequency_sample": {"rank": sample_ranks.tolist(), "freq": freq[sample_ranks - 1].tolist()},
            "unique_per_batch": unique_per_batch,
            "hit_rate": None if hr is None else {"capacity_fraction": args.cache_fractions, "capacity_rows": capacities,
                         "by_policy": hr, "replay_batch_tokens": args.batch * args.seq,
                         "method": "warm on the first half of the stream, count hits on the second half; "
                                   "static preloads the first half's most frequent rows"},
        }  # fmt: skip
        best = {p: round(v[-1], 3) for p, v in (hr or {}).items()}
        ub = unique_per_batch[min(3, len(unique_per_batch) - 1)]
        print(f"layer {layer}: zipf s={z['exponent']:.3f} (R2 {z['r2']:.3f}), touched {seen.size}/{rows}, "
              f"unique/batch({ub['tokens']} tokens)={ub['unique_ratio_median']:.3f}, "
              f"hit@{args.cache_fractions[-1]:.0%} {best}")  # fmt: skip

    payload = {
        "kind": "row_access",
        "parameters": {"preset": args.preset, "tokens": n_seq * args.seq, "seq": args.seq, "batch": args.batch,
                       "heads_per_layer": heads, "layout_fingerprint": layout.fingerprint},
        "text": text_info,
        "hash_seconds": hash_s,
        "layers": layers,
    }  # fmt: skip
    out_dir = args.results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "row_access.png"
    plot(png, payload)
    payload["plot"] = png.name
    path = write_result("row_access", payload, args.results_dir)
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
