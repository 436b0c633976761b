"""A store directory: one store file per Engram layer plus ``store.json``, the index engines open.

``export_tables`` writes it (used by ``engramlm store build``); ``open_store_dir`` opens it as
``{layer_id: RowTable}`` on any tier, optionally behind a hot-row cache. The index is written
last and atomically, so a directory whose build was interrupted has no (or the old) index and
is never opened half-written. Every layer file carries the hash-spec fingerprint; the index's
fingerprint must agree with each file's, and with the caller's expectation when given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch, MissingFingerprint
from engramlm.store.base import RowTable, check_fingerprint
from engramlm.store.cache import POLICIES, CachedTable
from engramlm.store.file import open_store, write_store
from engramlm.store.formats import get_format
from engramlm.utils.io import atomic_write_json

INDEX_NAME = "store.json"
INDEX_FORMAT = "engramlm.store_dir"
INDEX_VERSION = 1
TIERS = ("memory", "mmap", "file", "mooncake")
FORMAT_ALIASES = {"fp32": "fp32", "bf16": "bf16", "fp8": "fp8_e4m3_ue8m0", "fp8_e4m3_ue8m0": "fp8_e4m3_ue8m0"}
_BLOCK_BYTES = 16 << 20


class BlockSource(Protocol):
    """A table that can be read sequentially in blocks (e.g. :class:`SafetensorsTable`)."""

    num_rows: int
    dim: int

    def read_block(self, start: int, stop: int) -> torch.Tensor: ...


def resolve_format(name: str) -> str:
    """``fp32 | bf16 | fp8`` (or a full format name) -> the store's format name."""
    try:
        return FORMAT_ALIASES[name]
    except KeyError:
        raise ConfigError(f"format must be one of {sorted(FORMAT_ALIASES)}, got {name!r}") from None


def _blocks(src: BlockSource, block_rows: int, bar: Any) -> Iterator[torch.Tensor]:
    for start in range(0, src.num_rows, block_rows):
        stop = min(src.num_rows, start + block_rows)
        yield src.read_block(start, stop)
        if bar is not None:
            bar.update(stop - start)


def export_tables(
    tables: Mapping[int, BlockSource],
    out_dir: str | os.PathLike,
    row_format: str,
    fingerprint: str,
    *,
    tier: str = "file",
    head_sizes: Mapping[int, Sequence[int]] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write every layer's table as ``layer_{id:03d}.engst`` (+ ``store.json``); returns the index path."""
    fmt = get_format(resolve_format(row_format))
    fp = check_fingerprint(fingerprint)
    if tier not in TIERS:
        raise ConfigError(f"tier must be one of {TIERS}, got {tier!r}")
    if not tables:
        raise ConfigError("tables: nothing to export (no Engram layers)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    total = sum(int(t.num_rows) for t in tables.values())
    layers = []
    with tqdm(total=total, unit="row", unit_scale=True, desc=f"export {fmt.name}", disable=not progress) as bar:
        for layer in sorted(tables):
            src = tables[layer]
            heads = [int(h) for h in (head_sizes or {}).get(layer, [src.num_rows])]
            if sum(heads) != src.num_rows:
                raise ConfigError(f"head_sizes[{layer}] sum to {sum(heads)}, table has {src.num_rows} rows")
            name = f"layer_{layer:03d}.engst"
            block_rows = max(1, _BLOCK_BYTES // (4 * src.dim))
            layer_meta = {"layer_id": layer, "head_sizes": heads, **(meta or {})}
            h = write_store(
                out / name, _blocks(src, block_rows, bar), fmt, fp, layer_meta, progress=False, total_rows=src.num_rows
            )
            layers.append(
                {"layer_id": layer, "file": name, "num_rows": h.num_rows, "dim": h.dim, "head_sizes": heads,
                 "row_bytes": h.row_bytes, "file_size": h.file_size}
            )  # fmt: skip
    index = out / INDEX_NAME
    atomic_write_json(
        index,
        {"format": INDEX_FORMAT, "version": INDEX_VERSION, "fingerprint": fp, "row_format": fmt.name, "tier": tier,
         "layers": layers, "meta": dict(meta or {})},
    )  # fmt: skip
    return index


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed, validated ``store.json`` of a store directory."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise CorruptFileError(f"{directory}: no {INDEX_NAME} (not a store directory, or its build did not finish)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CorruptFileError(f"{path}: not valid JSON: {exc}") from exc
    if doc.get("format") != INDEX_FORMAT or doc.get("version") != INDEX_VERSION:
        raise CorruptFileError(f"{path}: not an {INDEX_FORMAT} v{INDEX_VERSION} index")
    return doc


def open_store_dir(
    directory: str | os.PathLike,
    tier: str | None = None,
    cache_bytes: int = 0,
    *,
    cache_policy: str = "lfu",
    expected_fingerprint: str | None = None,
    queue_depth: int = 64,
    mooncake: Any = None,
) -> dict[int, RowTable]:
    """Open a store directory as ``{layer_id: RowTable}``.

    ``tier``: ``memory`` (rows loaded into RAM as packed records), ``mmap`` (page cache),
    ``file`` (O_DIRECT reads, :class:`DirectFileTable`) or ``mooncake`` (a set-up
    ``MooncakeDistributedStore`` passed as ``mooncake``; layers absent from the pool are uploaded
    from the files first). ``None`` uses the index's tier. ``cache_bytes`` > 0 puts a
    :class:`CachedTable` of that total budget (split across layers in proportion to their rows)
    in front of each layer.
    """
    from engramlm.store.direct import DirectFileTable
    from engramlm.store.memory import MemoryTable
    from engramlm.store.mmap import MmapTable

    doc = read_index(directory)
    tier = tier or doc.get("tier", "file")
    if tier not in TIERS:
        raise ConfigError(f"tier must be one of {TIERS}, got {tier!r}")
    if cache_policy not in POLICIES:
        raise ConfigError(f"cache_policy must be one of {POLICIES}, got {cache_policy!r}")
    if cache_bytes < 0:
        raise ConfigError(f"cache_bytes must be >= 0, got {cache_bytes}")
    if tier == "mooncake" and mooncake is None:
        raise ConfigError("tier 'mooncake' needs a set-up MooncakeDistributedStore (mooncake=...)")
    fp = doc["fingerprint"]
    if expected_fingerprint is not None and check_fingerprint(expected_fingerprint) != fp:
        raise HashSpecMismatch(
            f"{directory}: store was built under hash spec {fp}, but hash spec {expected_fingerprint} was expected"
        )
    total_rows = sum(int(e["num_rows"]) for e in doc["layers"])
    tables: dict[int, RowTable] = {}
    try:
        for entry in doc["layers"]:
            layer, path = int(entry["layer_id"]), Path(directory) / entry["file"]
            header = open_store(path, fp)
            if (header.num_rows, header.dim) != (entry["num_rows"], entry["dim"]):
                raise CorruptFileError(f"{path}: shape {header.num_rows}x{header.dim} disagrees with {INDEX_NAME}")
            table: RowTable
            if tier == "memory":
                with MmapTable(path, fp) as mm:
                    raw = torch.from_numpy(mm._rows.copy())
                table = MemoryTable(raw, fp, row_format=header.row_format)
            elif tier == "mmap":
                table = MmapTable(path, fp)
            elif tier == "file":
                table = DirectFileTable(path, fp, queue_depth=queue_depth)
            else:
                table = _open_mooncake(mooncake, layer, path, entry, fp)
            if cache_bytes:
                budget = cache_bytes * int(entry["num_rows"]) // max(total_rows, 1)
                table = CachedTable(table, budget, cache_policy)
            tables[layer] = table
    except BaseException:
        for t in tables.values():
            t.close()
        raise
    return tables


def _open_mooncake(client: Any, layer: int, path: Path, entry: Mapping[str, Any], fp: str) -> RowTable:
    """Open a layer in the Mooncake pool, uploading it from the store file if it is not there yet."""
    from engramlm.store.mmap import MmapTable
    from engramlm.store.mooncake import MooncakeTable

    heads, dim = entry["head_sizes"], int(entry["dim"])
    try:
        return MooncakeTable(client, layer, heads, dim, fp)
    except MissingFingerprint:
        pass  # not uploaded yet: populate below
    with MmapTable(path, fp) as mm:
        weights = mm.fetch_sorted_unique(torch.arange(mm.num_rows))
    return MooncakeTable.populate(client, layer, weights, heads, fp)
