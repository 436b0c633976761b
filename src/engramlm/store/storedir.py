"""A store directory: one store file per Engram layer plus ``store.json``, the index engines open.

``export_tables`` writes it (used by ``engramlm store build``); ``open_store_dir`` opens it as
``{layer_id: RowTable}`` on any :class:`~engramlm.store.tiers.Tier`, optionally behind a hot-row cache,
or per layer as a :class:`~engramlm.store.tiers.Placement` says (e.g. the planner's). The index is written
last and atomically, so a directory whose build was interrupted has no (or the old) index and
is never opened half-written. Every layer file carries the hash-spec fingerprint; the index's
fingerprint must agree with each file's, and with the caller's expectation when given.

**Bound to a model.** The hash spec says which row an n-gram maps to, not what the rows hold: two runs
(or two checkpoints of one run) share a spec and differ in every row. So ``export_tables(model_sha256=)``
records the sha256 of the ``model.safetensors`` the tables were read from, in ``store.json`` and in each
layer file's meta, and ``open_store_dir(expected_model_sha256=)`` refuses a store built from other weights
(:class:`~engramlm.errors.ForeignStoreError`). A model that keeps training gets a new digest at every
checkpoint, so a store exported at step N serves step N only: its rows are step N's rows. A store that
records no model (built before this, or from an in-memory model) opens with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from engramlm.errors import ConfigError, CorruptFileError, ForeignStoreError, HashSpecMismatch
from engramlm.store.base import RowTable, check_fingerprint
from engramlm.store.cache import CachedTable
from engramlm.store.file import open_store, write_store
from engramlm.store.formats import get_format
from engramlm.store.tiers import LayerFile, OpenOptions, Placement, Tier, check_options, open_layer
from engramlm.utils.io import atomic_write_json

INDEX_NAME = "store.json"
INDEX_FORMAT = "engramlm.store_dir"
INDEX_VERSION = 1
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
    tier: Tier | str = Tier.DIRECT,
    head_sizes: Mapping[int, Sequence[int]] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    model_sha256: str | None = None,
) -> Path:
    """Write every layer's table as ``layer_{id:03d}.engst`` (+ ``store.json``); returns the index path.

    ``tier`` is the default tier recorded in the index (what ``open_store_dir`` uses when given none).
    ``model_sha256``: the sha256 of the ``model.safetensors`` the tables come from (the store's model
    binding, see the module docstring); None records none.
    """
    model_fp = check_fingerprint(model_sha256) if model_sha256 is not None else None
    fmt = get_format(resolve_format(row_format))
    fp = check_fingerprint(fingerprint)
    tier = Tier.parse(tier)
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
            if model_fp is not None:
                layer_meta["model_sha256"] = model_fp
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
        {"format": INDEX_FORMAT, "version": INDEX_VERSION, "fingerprint": fp, "row_format": fmt.name,
         "tier": tier.value, "layers": layers, "meta": dict(meta or {}), "model_sha256": model_fp},
    )  # fmt: skip
    return index


def check_model(directory: str | os.PathLike, doc: Mapping[str, Any], expected_model_sha256: str | None) -> None:
    """Refuse a store whose index names another model's weights; warn when it names none."""
    if expected_model_sha256 is None:
        return
    want = check_fingerprint(expected_model_sha256)
    got = doc.get("model_sha256")
    if got is None:
        warnings.warn(
            f"{Path(directory) / INDEX_NAME}: records no source model (built before stores were bound to models, "
            "or from an in-memory model), so it cannot be checked to hold this model's tables",
            RuntimeWarning,
            stacklevel=3,
        )
    elif got != want:
        raise ForeignStoreError(
            f"{Path(directory) / INDEX_NAME}: store was built from model weights sha256 {got[:16]}..., not from "
            f"this model ({want[:16]}...); rebuild it with `engramlm store build MODEL --out DIR`"
        )


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
    try:
        doc["tier"] = Tier.from_index(doc.get("tier", Tier.DIRECT.value)).value
    except ConfigError as exc:
        raise CorruptFileError(f"{path}: {exc}") from exc
    return doc


def open_store_dir(
    directory: str | os.PathLike,
    tier: Tier | str | None = None,
    cache_bytes: int = 0,
    *,
    placement: Placement | Mapping[str, Any] | None = None,
    cache_policy: str = "lfu",
    expected_fingerprint: str | None = None,
    queue_depth: int = 64,
    mooncake: Any = None,
    mooncake_reader: Any = None,
    expected_model_sha256: str | None = None,
    verify: bool = True,
) -> dict[int, RowTable]:
    """Open a store directory as ``{layer_id: RowTable}``.

    Either every layer on one ``tier`` (a :class:`Tier`: ``memory``, ``mmap``, ``direct`` or ``mooncake``;
    ``None`` uses the index's) with ``cache_bytes`` > 0 putting a :class:`CachedTable` of that total
    budget (split across layers in proportion to their rows) in front of each layer; or a
    ``placement`` (a :class:`Placement` or its JSON form, e.g. ``plan()["placement"]``) naming each
    layer's tier and cache budget. ``mooncake`` is a set-up ``MooncakeDistributedStore``, needed by
    that tier (layers absent from the pool are uploaded from the files first); ``mooncake_reader``, a
    :class:`~engramlm.store.mooncake_reader.ReaderProcess` of the same pool, then reads it for this process.
    ``expected_model_sha256``: the sha256 of the model's ``model.safetensors``; a store built from other
    weights is refused (:class:`ForeignStoreError`). ``verify`` (default True): check rows against the
    files' CRC32s (see :class:`~engramlm.store.tiers.OpenOptions`); False serves them unchecked.
    """
    doc = read_index(directory)
    rows = {int(e["layer_id"]): int(e["num_rows"]) for e in doc["layers"]}
    if placement is not None:
        if tier is not None or cache_bytes or cache_policy != "lfu":
            raise ConfigError("placement: give a placement or tier/cache_bytes/cache_policy, not both")
        placement = Placement.coerce(placement)
        if set(placement.layers) != set(rows):
            raise ConfigError(
                f"placement: places layers {sorted(placement.layers)}, but {directory} holds layers {sorted(rows)}"
            )
    else:
        placement = Placement.uniform(rows, tier if tier is not None else doc["tier"], cache_bytes, cache_policy)
    options = OpenOptions(queue_depth=queue_depth, mooncake=mooncake, mooncake_reader=mooncake_reader, verify=verify)
    check_options(placement.tiers, options)
    fp = doc["fingerprint"]
    if expected_fingerprint is not None and check_fingerprint(expected_fingerprint) != fp:
        raise HashSpecMismatch(
            f"{directory}: store was built under hash spec {fp}, but hash spec {expected_fingerprint} was expected"
        )
    check_model(directory, doc, expected_model_sha256)
    tables: dict[int, RowTable] = {}
    try:
        for entry in doc["layers"]:
            layer, path = int(entry["layer_id"]), Path(directory) / entry["file"]
            header = open_store(path, fp)
            if (header.num_rows, header.dim) != (entry["num_rows"], entry["dim"]):
                raise CorruptFileError(f"{path}: shape {header.num_rows}x{header.dim} disagrees with {INDEX_NAME}")
            if header.meta.get("model_sha256") != doc.get("model_sha256"):
                raise ForeignStoreError(
                    f"{path}: layer file was built from model weights sha256 {header.meta.get('model_sha256')}, "
                    f"but {INDEX_NAME} says {doc.get('model_sha256')}"
                )
            where = placement.layers[layer]
            table = open_layer(where.tier, LayerFile(layer, path, header, list(entry["head_sizes"])), fp, options)
            if where.cache_bytes:
                table = CachedTable(table, where.cache_bytes, placement.cache_policy)
            tables[layer] = table
    except BaseException:
        for t in tables.values():
            t.close()
        raise
    return tables
