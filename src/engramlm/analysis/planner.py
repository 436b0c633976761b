"""Table/memory planner: what an Engram configuration costs in bytes, bandwidth and IOPS per tier.

Analytic from the config (no tables are built, so 200 GB presets plan instantly):

* table rows per layer = sum of the layer's head primes (``accounting.engram_table_rows``); one row
  is ``head_dim`` values stored in the chosen format (fp32 4 B, bf16 2 B, fp8 e4m3 + one ue8m0 scale
  per 32 values: d + d/32 B, e.g. 264 B for V4.1's d_h = 256);
* every token reads H_e = (N-1) * K rows in every Engram layer;
* a step of ``batch`` tokens reads ``batch * L * H_e`` rows, of which ``1 / dedup`` are distinct
  (``dedup`` = reads per distinct row in one step, measured with ``engramlm analyze rows`` or 1 for a
  worst case); a store fetches each distinct row once;
* the tier decides the unit of transfer: bytes for hbm/ram/remote, whole pages for ssd (a random read
  of ``ceil(row_bytes / page)`` pages per row, so IOPS are the limit there).

The request's ``tier`` is a hardware word (:class:`engramlm.store.tiers.Medium`: hbm | ram | ssd |
remote), because the reference device depends on it. The plan also carries ``placement``: the store
:class:`~engramlm.store.tiers.Tier` that serves rows from that medium (``Medium.tier``: hbm, ram ->
memory, ssd -> direct, remote -> mooncake) for every layer, with the request's hot-row cache budget
split by rows, as JSON that :func:`engramlm.store.storedir.open_store_dir` opens (``placement=``).

Reference devices (overridable) turn needs into utilisation: HBM3 3.35 TB/s (H100 SXM); host RAM
reached over PCIe 5.0 x16, 64 GB/s, the binding link when rows are gathered on the host and shipped to
the accelerator; one PCIe 4.0 NVMe SSD, 7 GB/s and 1M random 4 KiB reads/s; a 400 Gb/s RDMA NIC,
50 GB/s. The rest of the model is counted in bf16 on the accelerator for the HBM total.

:func:`plan_distributed` (``engramlm analyze plan --ranks N``) is the training view with the tables
row-sharded over N ranks (``engramlm.dist``): bytes per rank, all-to-all bytes per step and their time
at stated link speeds against the backbone's compute; its formulas are stated above the function.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from engramlm.errors import ConfigError
from engramlm.models.accounting import count_parameters, engram_table_rows
from engramlm.models.config import ModelConfig
from engramlm.store.formats import get_format
from engramlm.store.tiers import Medium, Placement

DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp8": "fp8_e4m3_ue8m0", "fp8_e4m3_ue8m0": "fp8_e4m3_ue8m0"}
REFERENCE = {
    Medium.HBM: {"device": "HBM3 (H100 SXM)", "bytes_per_s": 3.35e12, "iops": None},
    Medium.RAM: {"device": "host RAM over PCIe 5.0 x16", "bytes_per_s": 64e9, "iops": None},
    Medium.SSD: {"device": "PCIe 4.0 NVMe SSD", "bytes_per_s": 7e9, "iops": 1e6},
    Medium.REMOTE: {"device": "400 Gb/s RDMA NIC", "bytes_per_s": 50e9, "iops": None},
}
DENSE_BYTES_PER_PARAM = 2  # bf16


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for; validated at construction."""

    dtype: str = "fp8"
    tier: str = "hbm"
    batch: int = 4096
    tokens_per_s: float = 1e5
    dedup: float = 1.0
    page_bytes: int = 4096
    reference_bytes_per_s: float | None = None
    reference_iops: float | None = None
    cache_bytes: int = 0
    cache_policy: str = "lfu"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "tier", Medium.parse(self.tier, "tier").value)
        if isinstance(self.cache_bytes, bool) or not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise ConfigError(f"cache_bytes: must be an int >= 0 (hot-row cache budget), got {self.cache_bytes!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch: must be an int >= 1 (tokens per step), got {self.batch!r}")
        if not self.tokens_per_s > 0:
            raise ConfigError(f"tokens_per_s: must be > 0, got {self.tokens_per_s!r}")
        if not self.dedup >= 1.0:
            raise ConfigError(f"dedup: must be >= 1 (reads per distinct row in a step), got {self.dedup!r}")
        if self.page_bytes < 512 or self.page_bytes & (self.page_bytes - 1):
            raise ConfigError(f"page_bytes: must be a power of two >= 512, got {self.page_bytes!r}")
        for name in ("reference_bytes_per_s", "reference_iops"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name}: must be > 0, got {v!r}")
        self.placement({0: 1})  # the store's own check of cache_policy (and of the medium -> tier map)

    def placement(self, rows: dict[int, int]) -> Placement:
        """Every layer on the tier serving :attr:`tier`, the cache budget split by ``rows``."""
        return Placement.uniform(rows, Medium(self.tier).tier, self.cache_bytes, self.cache_policy)


def plan(config: ModelConfig, req: PlanRequest) -> dict[str, Any]:
    """The plan as a JSON-able dict (see the module doc for every formula)."""
    if config.engram is None:
        raise ConfigError("engram: this config has no Engram section, so there is no table to plan")
    e = config.engram
    fmt = get_format(DTYPES[req.dtype])
    row_bytes = fmt.row_bytes(e.head_dim)
    rows = engram_table_rows(config)
    table_rows = sum(rows)
    table_bytes = table_rows * row_bytes
    heads = e.hash.heads_per_layer
    reads_per_token = heads * len(rows)
    counts = count_parameters(config)
    dense_bytes = (counts.total - counts.engram_tables) * DENSE_BYTES_PER_PARAM
    tiers = {"hbm": dense_bytes}
    tiers[req.tier] = tiers.get(req.tier, 0) + table_bytes

    pages_per_row = math.ceil(row_bytes / req.page_bytes)
    unit_bytes = pages_per_row * req.page_bytes if req.tier == "ssd" else row_bytes
    batch_reads = req.batch * reads_per_token
    unique = min(math.ceil(batch_reads / req.dedup), table_rows)
    steps_per_s = req.tokens_per_s / req.batch
    ref = dict(REFERENCE[req.tier])
    if req.reference_bytes_per_s is not None:
        ref["bytes_per_s"] = req.reference_bytes_per_s
        ref["device"] = "user-specified"
    if req.reference_iops is not None:
        ref["iops"] = req.reference_iops
    rows_per_s = unique * steps_per_s
    bytes_per_s = rows_per_s * unit_bytes
    iops = rows_per_s * (pages_per_row if req.tier == "ssd" else 1)
    return {
        "config": config.name,
        "dtype": fmt.name,
        "tier": req.tier,
        "head_dim": e.head_dim,
        "row_bytes": row_bytes,
        "layers": [
            {"layer": lid, "rows": r, "bytes": r * row_bytes} for lid, r in zip(e.hash.layer_ids, rows, strict=True)
        ],
        "table_rows": table_rows,
        "table_bytes": table_bytes,
        "dense_bytes_bf16": dense_bytes,
        "bytes_per_tier": tiers,
        "placement": req.placement(dict(zip(e.hash.layer_ids, rows, strict=True))).to_dict(),
        "per_token": {"rows_read": reads_per_token, "bytes_read": reads_per_token * row_bytes},
        "per_batch": {
            "tokens": req.batch,
            "rows_read": batch_reads,
            "dedup": req.dedup,
            "unique_rows": unique,
            "bytes_read": unique * row_bytes,
            "bytes_transferred": unique * unit_bytes,
        },
        "throughput": {
            "tokens_per_s": req.tokens_per_s,
            "steps_per_s": steps_per_s,
            "rows_per_s": rows_per_s,
            "bytes_per_s": bytes_per_s,
            "iops": iops,
            "reference": ref,
            "bandwidth_utilisation": bytes_per_s / ref["bytes_per_s"],
            "iops_utilisation": iops / ref["iops"] if ref.get("iops") else None,
        },
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n}"


def _placement_line(placement: dict[str, Any]) -> str:
    tiers = sorted({e["tier"] for e in placement["layers"]})
    cache = sum(e["cache_bytes"] for e in placement["layers"])
    return f"tier {', '.join(tiers)}" + (f", {_size(cache)} {placement['cache_policy']} cache" if cache else "")


def format_plan(p: dict[str, Any]) -> str:
    """A readable table for the terminal (decimal units)."""
    t, b = p["throughput"], p["per_batch"]
    lines = [
        f"Engram table plan: {p['config']}, {p['dtype']} rows of {p['head_dim']} values = {p['row_bytes']} B/row,"
        f" tier {p['tier']}",
        f"store placement: {_placement_line(p['placement'])} (open_store_dir(..., placement=plan['placement']))",
        "",
        f"{'layer':>8} {'rows':>16} {'bytes':>14}",
    ]
    for layer in p["layers"]:
        lines.append(f"{layer['layer']:>8} {layer['rows']:>16,} {_size(layer['bytes']):>14}")
    lines.append(f"{'total':>8} {p['table_rows']:>16,} {_size(p['table_bytes']):>14}")
    lines += ["", "bytes per tier:"]
    for tier, nbytes in p["bytes_per_tier"].items():
        lines.append(f"  {tier:<7} {_size(nbytes):>14}" + ("  (incl. dense model, bf16)" if tier == "hbm" else ""))
    lines += [
        "",
        f"per token: {p['per_token']['rows_read']} rows, {_size(p['per_token']['bytes_read'])}",
        f"per step of {b['tokens']:,} tokens: {b['rows_read']:,} row reads, {b['unique_rows']:,} unique"
        f" (dedup {b['dedup']:g}), {_size(b['bytes_read'])} of rows, {_size(b['bytes_transferred'])} moved",
        f"at {t['tokens_per_s']:,.0f} tokens/s ({t['steps_per_s']:,.2f} steps/s): {_size(t['bytes_per_s'])}/s,"
        f" {t['iops']:,.0f} reads/s",
        f"reference {t['reference']['device']}: {_size(t['reference']['bytes_per_s'])}/s"
        f" -> bandwidth utilisation {t['bandwidth_utilisation']:.1%}"
        + (f", IOPS utilisation {t['iops_utilisation']:.1%}" if t["iops_utilisation"] is not None else ""),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- distributed view
# Training with the tables row-sharded over N ranks (engramlm.dist): every rank owns a contiguous row
# range of every layer's table (dist.shard_ranges), and one step moves, per layer and per rank,
#   forward:  U ids out (int64, 8 B) to their owners + U rows back from them (row bytes each),
#   backward: U row gradients out to the owners (row bytes each; the grad has the rows' dtype),
# with U the rank's unique rows of that layer in its local batch of ``batch / N`` tokens (the
# exchange deduplicates before sending), plus one N-entry int64 count exchange per layer. Owners are
# uniform over ranks (hashed ids spread evenly over each head's rows), so a rank serves U rows in
# expectation and (N-1)/N of what it sends leaves it (the rest is its own share). ExchangeStats'
# ``bytes_sent`` counts forward ids + served rows, self-share included: that is ``forward_bytes``.

ID_BYTES = 8  # exchange_rows sends int64 ids and int64 counts
SLOT_MAP_BYTES = 16  # SparseRowAdam's slot map: a sorted int64 key + an int64 slot per touched row
DEFAULT_LINKS_GBPS = (25.0, 50.0, 100.0, 400.0)
UNIQUE_MODELS = ("measured", "zipf", "uniform")


@dataclass(frozen=True)
class DistRequest:
    """The distributed view's inputs: ranks, global tokens per step, and how many rows a rank's batch touches.

    Unique-row model (``unique_model``):

    * ``uniform`` (worst case): every row read is a distinct n-gram, so only hash collisions inside
      a head's table merge reads: ``U_head = p (1 - exp(-b / p))`` for a head of ``p`` rows read ``b`` times;
    * ``measured``: ``U = unique_fraction * reads`` per layer, a fraction measured on the corpus at the
      rank's local batch size (e.g. by hashing batches, as ``benchmarks/bench_distributed.py`` does);
    * ``zipf``: each order's n-grams are drawn from a Zipf law of exponent ``zipf_s`` over
      ``zipf_types`` n-gram types; the expected distinct n-grams ``D`` of ``b`` draws are hashed into
      each head: ``U_head = p (1 - exp(-D / p))``.

    Compute (to say whether the exchange hides behind it): ``6 * P_act`` FLOPs per token for forward
    and backward (attention's sequence-length term left out), at ``accel_flops * mfu`` per rank.
    """

    ranks: int
    batch: int
    row_dtype: str = "fp32"
    unique_model: str = "uniform"
    unique_fraction: float | None = None
    zipf_s: float = 1.0
    zipf_types: int = 10**9
    links_gbps: tuple[float, ...] = DEFAULT_LINKS_GBPS
    accel_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.4

    def __post_init__(self) -> None:
        for name in ("ranks", "batch", "zipf_types"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an int >= 1, got {v!r}")
        if self.batch < self.ranks:
            raise ConfigError(f"batch: {self.batch} tokens cannot be split over {self.ranks} ranks (batch >= ranks)")
        if self.row_dtype not in DTYPES:
            raise ConfigError(f"row_dtype: must be one of {sorted(DTYPES)}, got {self.row_dtype!r}")
        if self.unique_model not in UNIQUE_MODELS:
            raise ConfigError(f"unique_model: must be one of {list(UNIQUE_MODELS)}, got {self.unique_model!r}")
        if self.unique_model == "measured":
            f = self.unique_fraction
            if f is None or not 0 < f <= 1:
                raise ConfigError(f"unique_fraction: the measured model needs a value in (0, 1], got {f!r}")
        if not self.zipf_s > 0:
            raise ConfigError(f"zipf_s: must be > 0, got {self.zipf_s!r}")
        if not self.links_gbps or any(not g > 0 for g in self.links_gbps):
            raise ConfigError(f"links_gbps: must be one or more speeds > 0, got {self.links_gbps!r}")
        object.__setattr__(self, "links_gbps", tuple(float(g) for g in self.links_gbps))
        if not self.accel_flops > 0:
            raise ConfigError(f"accel_flops: must be > 0, got {self.accel_flops!r}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"mfu: must lie in (0, 1], got {self.mfu!r}")


def zipf_distinct(draws: float, types: int, s: float) -> float:
    """Expected distinct types in ``draws`` samples of a Zipf(``s``) law over ``types`` types.

    ``sum_k 1 - exp(-draws p_k)`` (Poisson approximation of ``1 - (1 - p_k)^draws``), with ``p_k =
    k^-s / H``: summed exactly over the first 10^5 types and integrated on a log grid over the tail.
    """
    import numpy as np

    head = min(types, 100_000)
    k = np.arange(1, head + 1, dtype=np.float64)
    w_head = k**-s
    if types > head:
        u = np.linspace(math.log(head + 0.5), math.log(types + 0.5), 4001)
        x = np.exp(u)
        w_tail_int = np.trapezoid(x ** (1 - s), u)  # integral of k^-s dk over the tail
    else:
        x = u = None
        w_tail_int = 0.0
    norm = float(w_head.sum()) + float(w_tail_int)
    distinct = float((-np.expm1(-draws * w_head / norm)).sum())
    if x is not None:
        distinct += float(np.trapezoid(-np.expm1(-draws * x**-s / norm) * x, u))
    return min(distinct, float(draws), float(types))


def fit_zipf_s(config: ModelConfig, tokens: int, unique_fraction: float, types: int = 10**9) -> float:
    """The Zipf exponent under which ``tokens`` tokens touch ``unique_fraction`` of their row reads.

    Calibrates the ``zipf`` model on one measurement (e.g. one process's global batch) so that it can
    predict another batch size (e.g. a rank's local batch); bisection on ``s`` in [0.05, 5], over which
    the expected unique fraction falls monotonically.
    """
    if not 0 < unique_fraction <= 1:
        raise ConfigError(f"unique_fraction: must lie in (0, 1], got {unique_fraction!r}")
    heads = config.engram.hash.heads_per_layer * len(config.engram.hash.layer_ids)

    def fraction(s: float) -> float:
        req = DistRequest(ranks=1, batch=tokens, unique_model="zipf", zipf_s=s, zipf_types=types)
        return sum(expected_unique_rows(config, tokens, req)) / (tokens * heads)

    lo, hi = 0.05, 5.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) > unique_fraction else (lo, mid)
    return (lo + hi) / 2


def _head_primes(config: ModelConfig) -> list[list[tuple[int, ...]]]:
    """Per layer, per order: the head table sizes (primes)."""
    from engramlm.hashing.primes import prime_plan

    h = config.engram.hash
    return [list(layer) for layer in prime_plan(h.layer_ids, h.engram_vocab_size, h.n_head_per_ngram)]


def expected_unique_rows(config: ModelConfig, tokens: int, req: DistRequest) -> list[float]:
    """Expected unique rows of each Engram layer touched by ``tokens`` tokens, under ``req``'s model."""
    out = []
    for layer in _head_primes(config):
        reads = tokens * sum(len(heads) for heads in layer)
        rows = sum(sum(heads) for heads in layer)
        if req.unique_model == "measured":
            out.append(min(reads * req.unique_fraction, rows))
            continue
        total = 0.0
        for heads in layer:
            if req.unique_model == "uniform":
                distinct = float(tokens)
            else:
                distinct = zipf_distinct(tokens, req.zipf_types, req.zipf_s)
            total += sum(p * -math.expm1(-distinct / p) for p in heads)
        out.append(total)
    return out


def plan_distributed(config: ModelConfig, req: DistRequest) -> dict[str, Any]:
    """Per-rank table, optimizer-state and all-to-all bytes of one training step (formulas above)."""
    from engramlm.dist.rows import shard_ranges

    if config.engram is None:
        raise ConfigError("engram: this config has no Engram section, so there is no table to plan")
    d = config.engram.head_dim
    row_bytes = get_format(DTYPES[req.row_dtype]).row_bytes(d)
    state_row = 2 * d * 4 + 8 + SLOT_MAP_BYTES  # fp32 exp_avg + exp_avg_sq, int64 count, slot map
    rows = engram_table_rows(config)
    n = req.ranks
    largest = [max(b - a for a, b in itertools.pairwise(shard_ranges(r, n))) for r in rows]
    local_tokens = req.batch / n
    unique = expected_unique_rows(config, local_tokens, req)
    heads = config.engram.hash.heads_per_layer
    reads = local_tokens * heads * len(rows)
    u = sum(unique)
    fwd_ids, fwd_rows, bwd_rows = u * ID_BYTES, u * row_bytes, u * row_bytes
    counts = 2 * n * ID_BYTES * len(rows)  # counts out and in, per layer (forward only)
    sent = fwd_ids + fwd_rows + bwd_rows
    wire = sent * (n - 1) / n
    flops = 6 * count_parameters(config).p_act * local_tokens
    compute_s = flops / (req.accel_flops * req.mfu)
    links = []
    for gbps in req.links_gbps:
        t = wire / (gbps * 1e9 / 8)
        links.append({"gbps": gbps, "exchange_s": t, "exchange_over_compute": t / compute_s, "hidden": t <= compute_s})
    return {
        "config": config.name,
        "ranks": n,
        "batch_tokens": req.batch,
        "tokens_per_rank": local_tokens,
        "row_dtype": get_format(DTYPES[req.row_dtype]).name,
        "row_bytes": row_bytes,
        "table_rows_per_rank": sum(largest),
        "table_bytes_per_rank": sum(largest) * row_bytes,
        "optimizer_state_bytes_per_rank": sum(largest) * state_row,  # every owned row touched (the long-run bound)
        "optimizer_state_bytes_per_row": state_row,
        "unique_model": {
            "name": req.unique_model,
            **({"unique_fraction": req.unique_fraction} if req.unique_model == "measured" else {}),
            **({"zipf_s": req.zipf_s, "zipf_types": req.zipf_types} if req.unique_model == "zipf" else {}),
        },
        "per_rank_step": {
            "row_reads": reads,
            "unique_rows": u,
            "unique_rows_per_layer": unique,
            "unique_fraction": u / reads,
            "forward_ids_bytes": fwd_ids,
            "forward_rows_bytes": fwd_rows,
            "forward_bytes": fwd_ids + fwd_rows,
            "backward_bytes": bwd_rows,
            "count_bytes": counts,
            "bytes_sent": sent,
            "bytes_off_rank": wire,
        },
        "all_to_all_bytes_per_step": sent * n,
        "compute": {"flops_per_rank": flops, "accel_flops": req.accel_flops, "mfu": req.mfu, "seconds": compute_s},
        "links": links,
        "break_even_gbps": wire * 8 / compute_s / 1e9,
    }


def format_distributed(p: dict[str, Any]) -> str:
    """The distributed view as terminal lines (decimal units)."""
    s = p["per_rank_step"]
    model = p["unique_model"]
    extra = {k: v for k, v in model.items() if k != "name"}
    lines = [
        f"distributed: {p['ranks']} ranks, {p['batch_tokens']:,} tokens/step ({p['tokens_per_rank']:,.0f} per rank),"
        f" {p['row_dtype']} rows of {p['row_bytes']} B",
        f"  per rank: table {_size(p['table_bytes_per_rank'])} ({p['table_rows_per_rank']:,} rows),"
        f" sparse Adam state <= {_size(p['optimizer_state_bytes_per_rank'])}",
        f"  unique rows per rank and step: {s['unique_rows']:,.0f} of {s['row_reads']:,.0f} reads"
        f" ({s['unique_fraction']:.1%}; model {model['name']}{' ' + str(extra) if extra else ''})",
        f"  all-to-all per rank and step: forward {_size(s['forward_bytes'])}, backward {_size(s['backward_bytes'])},"
        f" {_size(s['bytes_off_rank'])} off-rank; all ranks {_size(p['all_to_all_bytes_per_step'])}",
        f"  compute per rank and step: {p['compute']['seconds'] * 1e3:,.1f} ms (6 P_act FLOPs/token at"
        f" {p['compute']['accel_flops'] / 1e12:,.0f} TFLOP/s x MFU {p['compute']['mfu']:g})",
    ]
    for link in p["links"]:
        lines.append(
            f"  {link['gbps']:>6g} Gb/s: exchange {link['exchange_s'] * 1e3:,.1f} ms"
            f" = {link['exchange_over_compute']:.2f}x compute ({'hidden' if link['hidden'] else 'NOT hidden'})"
        )
    lines.append(f"  hidden behind compute from {p['break_even_gbps']:,.1f} Gb/s per rank")
    return "\n".join(lines)
