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
"""

from __future__ import annotations

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
