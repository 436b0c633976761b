"""Row usage and collisions: how the hashed table is actually used on a corpus split.

Per Engram layer and head (a head of order n owns ``p`` rows, its prime):

* **touched**: rows read at least once while sweeping the split (every input position, windows as
  in training: reset at document starts in ``reset`` mode), and that as a share of ``p``;
* **access distribution**: reads per row, sorted; a Zipf fit ``count ~ C * rank^-s`` by least
  squares in log-log over all touched rows (exponent ``s``, R^2), the top-1 share and the
  effective number of rows ``exp(entropy)``;
* **collisions** (exact): the distinct compressed n-grams of that order are enumerated
  (``np.unique`` over packed keys), each mapped to its row; a row is *collided* when more than one
  distinct n-gram lands in it. Reported: distinct n-grams D, collided rows, the share of distinct
  n-grams that share their row, and the share a uniform random hash would give,
  ``1 - (1 - 1/p)^(D-1)`` (the multiply-XOR-mod-prime hash should be close to it);
* **loss on frequent vs rare n-grams** (with a model): each target of an evaluation split is
  bucketed by how often the n-gram ending at its input token occurred in the usage split
  (0, 1-9, 10-99, 100-999, 1000+), per order; mean loss with and without Engram per bucket. The
  model scores windows of ``seq_len`` tokens, so the first n-1 tokens of each window see a shorter
  context than the split-level n-gram; they are a fraction (n-1)/seq_len of the targets.

Everything is vectorised: one hashing pass in chunks (exact: each chunk carries the n-1 tokens
before it), ``np.bincount``/``np.unique`` per head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engramlm.analysis.common import EvalArrays, eval_pass, mode_baseline, mode_no_engram, new_figure
from engramlm.errors import ConfigError
from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.spec import HashLayout

COUNT_EDGES = (1, 10, 100, 1000)
COUNT_BUCKETS = ("0", "1-9", "10-99", "100-999", "1000+")


def split_stream(dataset, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The split's packed tokens (int64) and document-start flags, optionally truncated."""
    n = dataset.n_tokens if max_tokens is None else min(dataset.n_tokens, int(max_tokens))
    tokens = np.asarray(dataset.tokens[:n], dtype=np.int64)
    return tokens, dataset.doc_start_mask(np.arange(n, dtype=np.int64))


def hash_stream(
    layout: HashLayout, tokens: np.ndarray, doc_start: np.ndarray, *, head_local: bool = True, chunk: int = 1 << 16
) -> np.ndarray:
    """Row ids [L, N, H_e] of a whole token stream, hashed in chunks that carry their n-1 predecessors."""
    hasher = NgramHasher(layout)
    n, ctx = tokens.shape[0], layout.spec.max_ngram_size - 1
    dtype = np.int32 if layout.spec.row_id_dtype == "int32" else np.int64
    out = np.empty((layout.num_layers, n, layout.heads_per_layer), dtype=dtype)
    for lo in range(0, n, chunk):
        a = max(0, lo - ctx)
        hi = min(n, lo + chunk)
        ids = torch.from_numpy(np.ascontiguousarray(tokens[a:hi]))[None]
        ds = torch.from_numpy(np.ascontiguousarray(doc_start[a:hi]))[None]
        rows = hasher(ids, ds, head_local=head_local)
        out[:, lo:hi] = rows[:, 0, lo - a :].numpy()
    return out


def stream_window_starts(layout: HashLayout, doc_start: np.ndarray) -> np.ndarray:
    """First position each position's lookback may read (document reset only in ``reset`` mode)."""
    n = doc_start.shape[0]
    if layout.spec.boundary_mode != "reset":
        return np.zeros(n, dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)
    return np.maximum.accumulate(np.where(doc_start, idx, 0))


def compressed_ngrams(layout: HashLayout, tokens: np.ndarray, doc_start: np.ndarray, n: int) -> np.ndarray:
    """[N, n] compressed n-gram ending at each position, most recent first (the hasher's k = 0..n-1);
    lookbacks before the window start read the compressed pad id, as in the hash."""
    x = layout.compression.compress(tokens)
    starts = stream_window_starts(layout, doc_start)
    idx = np.arange(x.shape[0], dtype=np.int64)
    grams = np.full((x.shape[0], n), layout.compressed_pad_id, dtype=np.int64)
    for k in range(n):  # n <= 8 lookbacks, vectorised over positions
        ok = idx - k >= starts
        grams[ok, k] = x[idx[ok] - k]
    return grams


def dense_keys(*grams: np.ndarray, base: int) -> list[np.ndarray]:
    """One int64 key per n-gram row, equal iff the n-grams are equal, consistent across the arrays."""
    n = grams[0].shape[1]
    if base**n < 2**62:
        w = base ** np.arange(n, dtype=np.int64)
        return [g @ w for g in grams]
    both = np.concatenate(grams, axis=0)
    _, inv = np.unique(both, axis=0, return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    cuts = np.cumsum([g.shape[0] for g in grams])[:-1]
    return list(np.split(inv, cuts))


def zipf_fit(counts: np.ndarray) -> dict[str, float | None]:
    """Least-squares fit of log(count) = log C - s log(rank) over touched rows, sorted descending."""
    c = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    if c.shape[0] < 3:
        return {"exponent": None, "r2": None}
    x, y = np.log(np.arange(1, c.shape[0] + 1)), np.log(c)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(((y - y.mean()) ** 2).sum())
    return {
        "exponent": float(-slope),
        "log_c": float(intercept),
        "r2": float(1 - (resid**2).sum() / ss) if ss else None,
    }


def collision_stats(keys: np.ndarray, rows: np.ndarray, prime: int) -> dict[str, Any]:
    """Exact collisions of distinct n-grams (``keys``) in one head's ``rows`` (same positions)."""
    uniq, first = np.unique(keys, return_index=True)
    d = int(uniq.shape[0])
    used, per_row = np.unique(rows[first], return_counts=True)
    collided = per_row > 1
    return {
        "distinct_ngrams": d,
        "rows_holding_ngrams": int(used.shape[0]),
        "collided_rows": int(collided.sum()),
        "ngrams_in_collided_rows": int(per_row[collided].sum()),
        "collision_rate": float(per_row[collided].sum() / d) if d else 0.0,
        "uniform_hash_rate": float(1.0 - (1.0 - 1.0 / prime) ** max(d - 1, 0)),
    }


def access_stats(rows: np.ndarray, prime: int) -> tuple[dict[str, Any], np.ndarray]:
    counts = np.bincount(rows.astype(np.int64), minlength=prime)
    touched = int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum() if counts.sum() else np.zeros(0)
    stats = {
        "reads": int(counts.sum()),
        "rows": int(prime),
        "touched": touched,
        "touched_share": touched / prime,
        "top1_share": float(p.max()) if p.size else 0.0,
        "effective_rows": float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0,
        "zipf": zipf_fit(counts),
    }
    return stats, counts


def row_usage(
    layout: HashLayout, tokens: np.ndarray, doc_start: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Usage and collision statistics per layer/head; also the sorted access counts for plotting."""
    local = hash_stream(layout, tokens, doc_start, head_local=True)
    base = layout.compression.compressed_vocab_size
    k_heads = layout.spec.n_head_per_ngram
    keys = {n: dense_keys(compressed_ngrams(layout, tokens, doc_start, n), base=base)[0] for n in layout.spec.orders}
    layers: dict[str, Any] = {}
    curves: dict[str, np.ndarray] = {}
    for li, lid in enumerate(layout.layer_ids):
        heads = []
        for oi, n in enumerate(layout.spec.orders):
            for k in range(k_heads):
                col = oi * k_heads + k
                prime = int(layout.primes[li, oi, k])
                stats, counts = access_stats(local[li, :, col], prime)
                stats.update(order=n, head=k, collisions=collision_stats(keys[n], local[li, :, col], prime))
                heads.append(stats)
                curves[f"L{lid} n{n} h{k}"] = np.sort(counts[counts > 0])[::-1]
        layers[str(lid)] = {"table_rows": layout.rows_of(lid), "heads": heads}
    return {"tokens": int(tokens.shape[0]), "layers": layers}, curves


def count_buckets(counts: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(COUNT_EDGES), counts, side="right")


def loss_by_ngram_frequency(
    layout: HashLayout,
    usage_tokens: np.ndarray,
    usage_doc: np.ndarray,
    eval_tokens: np.ndarray,
    eval_doc: np.ndarray,
    arr: EvalArrays,
) -> dict[str, Any]:
    """Per order: targets bucketed by their n-gram's count in the usage split; loss per mode per bucket."""
    base = layout.compression.compressed_vocab_size
    out: dict[str, Any] = {}
    for n in layout.spec.orders:
        ku, ke = dense_keys(
            compressed_ngrams(layout, usage_tokens, usage_doc, n),
            compressed_ngrams(layout, eval_tokens, eval_doc, n),
            base=base,
        )
        uniq, cnt = np.unique(ku, return_counts=True)
        pos_keys = ke[arr.positions]
        if uniq.size:
            j = np.clip(np.searchsorted(uniq, pos_keys), 0, uniq.size - 1)
            c = np.where(uniq[j] == pos_keys, cnt[j], 0)
        else:
            c = np.zeros_like(pos_keys)
        bucket = count_buckets(c)
        rep = {}
        for bi, name in enumerate(COUNT_BUCKETS):
            sel = bucket == bi
            if not sel.any():
                continue
            rep[name] = {"targets": int(sel.sum()), **{m: float(v[sel].mean()) for m, v in arr.nll.items()}}
        out[str(n)] = rep
    return out


def run_rows(
    model,
    layout: HashLayout,
    usage_ds,
    eval_ds=None,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if layout is None:
        raise ConfigError("checkpoint: this model has no Engram layers")
    tokens, doc = split_stream(usage_ds, max_tokens)
    report, curves = row_usage(layout, tokens, doc)
    report["split"] = usage_ds.split
    if model is not None and eval_ds is not None:
        modes = {"baseline": mode_baseline, "no_engram": mode_no_engram}
        arr = eval_pass(
            model, eval_ds, modes, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, progress=progress
        )
        et, ed = split_stream(eval_ds)
        report["loss_by_ngram_count"] = {
            "eval_split": eval_ds.split,
            "buckets": list(COUNT_BUCKETS),
            "orders": loss_by_ngram_frequency(layout, tokens, doc, et, ed, arr),
        }
    return report, curves


def plot_rows(report: dict[str, Any], curves: dict[str, np.ndarray]):
    has_loss = "loss_by_ngram_count" in report
    fig = new_figure(12 if has_loss else 7, 4.5)
    ax = fig.add_subplot(1, 2 if has_loss else 1, 1)
    for name, c in curves.items():
        if c.size:
            ax.loglog(np.arange(1, c.size + 1), c, lw=0.8, label=name)
    ax.set_xlabel("row rank")
    ax.set_ylabel("reads")
    ax.set_title(f"row access on {report['split']} ({report['tokens']} tokens)")
    if len(curves) <= 16:
        ax.legend(fontsize=6)
    if has_loss:
        ax2 = fig.add_subplot(1, 2, 2)
        orders = report["loss_by_ngram_count"]["orders"]
        width = 0.8 / max(1, 2 * len(orders))
        x = np.arange(len(COUNT_BUCKETS))
        j = 0
        for n, rep in orders.items():
            for mode in ("baseline", "no_engram"):
                vals = [rep[b][mode] if b in rep and mode in rep[b] else np.nan for b in COUNT_BUCKETS]
                ax2.bar(x + j * width, vals, width, label=f"{n}-gram, {mode}")
                j += 1
        ax2.set_xticks(x + width * (j - 1) / 2, COUNT_BUCKETS)
        ax2.set_xlabel(f"n-gram count in {report['split']}")
        ax2.set_ylabel("mean loss (nats)")
        ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig
