"""The one tier vocabulary: which :class:`RowTable` serves a store directory's layer files, and where.

Before this module the same tier had three names (``direct`` on ``generate``, ``file`` in
``store build``, ``ssd`` in the planner) and was validated in four places. Now:

* :class:`Tier` names how a layer file is served (``memory | mmap | direct | mooncake``); the CLIs take
  their ``--tier`` choices from it and :data:`OPENERS` maps each member to the code that opens it.
* :class:`Medium` is the planner's hardware word (``hbm | ram | ssd | remote``: where the bytes live,
  which picks its reference device); :attr:`Medium.tier` is the tier that serves rows from there.
* :class:`Placement` is, per layer, a tier and a hot-row cache budget. The planner emits one
  (``plan()["placement"]``, JSON) and :func:`engramlm.store.storedir.open_store_dir` opens it.

``store.json`` files written before the rename record the O_DIRECT tier as ``file``;
:meth:`Tier.from_index` (and only it) still reads that spelling (:data:`INDEX_ALIASES`).
The checkpoint-in-place table (:class:`~engramlm.store.checkpoint.SafetensorsTable`) and the hot-row
cache (:class:`~engramlm.store.cache.CachedTable`, a wrapper in front of any tier) are not tiers of a
store directory, so they are not members.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from engramlm.errors import ConfigError, CorruptFileError
from engramlm.store.base import RowTable
from engramlm.store.cache import POLICIES
from engramlm.store.file import StoreHeader


def _parse(enum: type[StrEnum], value: object, field_name: str, aliases: Mapping[str, Any] | None = None) -> Any:
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        if value in enum._value2member_map_:
            return enum(value)
        if aliases and value in aliases:
            return aliases[value]
    raise ConfigError(f"{field_name}: must be one of {[m.value for m in enum]}, got {value!r}")


class Tier(StrEnum):
    """How a store directory's layer files are served; the value is the user-facing name."""

    MEMORY = "memory"  # rows copied into host RAM as packed records (MemoryTable)
    MMAP = "mmap"  # the file memory-mapped, read through the page cache (MmapTable)
    DIRECT = "direct"  # O_DIRECT page reads at high queue depth, no page cache (DirectFileTable)
    MOONCAKE = "mooncake"  # a remote Mooncake Store pool, uploaded from the files if absent (MooncakeTable)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The accepted spellings, in registry order (what every ``--tier`` offers)."""
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: object, field: str = "tier") -> Tier:
        """``value`` as a Tier; anything else is one ConfigError naming ``field`` and the allowed names."""
        return _parse(cls, value, field)

    @classmethod
    def from_index(cls, value: object, field: str = "store.json tier") -> Tier:
        """The tier a ``store.json`` records, including spellings older builds wrote (``file``)."""
        return _parse(cls, value, field, INDEX_ALIASES)

    @property
    def help(self) -> str:
        return _HELP[self]


INDEX_ALIASES: Mapping[str, Tier] = {"file": Tier.DIRECT}
"""Old ``store.json`` spellings -> tier. Only saved indexes use them; arguments must use :class:`Tier` names."""

_HELP = {
    Tier.MEMORY: "rows loaded into host RAM",
    Tier.MMAP: "memory-mapped, page cache",
    Tier.DIRECT: "O_DIRECT reads, no page cache (SSD)",
    Tier.MOONCAKE: "remote Mooncake Store pool",
}


def tier_help() -> str:
    """One line for a ``--tier`` help string: every tier and what it does."""
    return "; ".join(f"{t.value}: {t.help}" for t in Tier)


class Medium(StrEnum):
    """The planner's hardware word: where a table's bytes live (it picks the reference device)."""

    HBM = "hbm"
    RAM = "ram"
    SSD = "ssd"
    REMOTE = "remote"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: object, field: str = "tier") -> Medium:
        return _parse(cls, value, field)

    @property
    def tier(self) -> Tier:
        """The store tier that serves rows from this medium (see :data:`MEDIUM_TIER`)."""
        return MEDIUM_TIER[self]


MEDIUM_TIER: Mapping[Medium, Tier] = {
    # Rows resident in memory. A store directory can only hold them in host RAM; rows resident on
    # the accelerator are the model's own tables (no store), so memory is the closest store tier.
    Medium.HBM: Tier.MEMORY,
    Medium.RAM: Tier.MEMORY,
    # The planner's SSD model is random page reads bounded by IOPS with no page cache: O_DIRECT.
    # mmap would add the page cache, whose hit rate depends on free RAM that the plan does not model.
    Medium.SSD: Tier.DIRECT,
    Medium.REMOTE: Tier.MOONCAKE,
}


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer's rows come from: a tier, and a hot-row cache budget in bytes (0 = none)."""

    tier: Tier
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tier", Tier.parse(self.tier))
        c = self.cache_bytes
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ConfigError(f"cache_bytes: must be an int >= 0, got {c!r}")


@dataclass(frozen=True)
class Placement:
    """Per Engram layer a :class:`LayerPlacement`; what the planner emits and ``open_store_dir`` opens."""

    layers: Mapping[int, LayerPlacement]
    cache_policy: str = "lfu"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("placement.layers: must name at least one Engram layer")
        layers: dict[int, LayerPlacement] = {}
        for lid, lp in self.layers.items():
            if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
                raise ConfigError(f"placement.layers: layer ids must be ints >= 0, got {lid!r}")
            if not isinstance(lp, LayerPlacement):
                raise ConfigError(f"placement.layers[{lid}]: must be a LayerPlacement, got {type(lp).__name__}")
            layers[lid] = lp
        object.__setattr__(self, "layers", dict(sorted(layers.items())))
        if self.cache_policy not in POLICIES:
            raise ConfigError(f"cache_policy: must be one of {list(POLICIES)}, got {self.cache_policy!r}")

    @classmethod
    def uniform(
        cls, rows: Mapping[int, int], tier: Tier | str, cache_bytes: int = 0, cache_policy: str = "lfu"
    ) -> Placement:
        """Every layer on ``tier``; ``cache_bytes`` split across layers in proportion to their ``rows``."""
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ConfigError(f"cache_bytes: must be an int >= 0, got {cache_bytes!r}")
        t = Tier.parse(tier)
        total = sum(int(r) for r in rows.values())
        return cls(
            {int(lid): LayerPlacement(t, cache_bytes * int(r) // max(total, 1)) for lid, r in rows.items()},
            cache_policy,
        )

    @property
    def tiers(self) -> set[Tier]:
        return {lp.tier for lp in self.layers.values()}

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"cache_policy": ..., "layers": [{"layer_id", "tier", "cache_bytes"}, ...]}``."""
        return {
            "cache_policy": self.cache_policy,
            "layers": [
                {"layer_id": lid, "tier": lp.tier.value, "cache_bytes": lp.cache_bytes}
                for lid, lp in self.layers.items()
            ],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Placement:
        """Inverse of :meth:`to_dict` (e.g. ``plan.json``'s ``placement``)."""
        try:
            entries = doc["layers"]
            layers = {
                e["layer_id"]: LayerPlacement(Tier.parse(e["tier"], f"placement.layers[{e['layer_id']}].tier"),
                                              e.get("cache_bytes", 0))
                for e in entries
            }  # fmt: skip
        except (KeyError, TypeError) as exc:
            want = "{'layers': [{'layer_id', 'tier', 'cache_bytes'}, ...], 'cache_policy'}"
            raise ConfigError(f"placement: expected {want}, missing or malformed: {exc}") from exc
        return cls(layers, doc.get("cache_policy", "lfu"))

    @classmethod
    def coerce(cls, value: Placement | Mapping[str, Any]) -> Placement:
        """A Placement, or its JSON form."""
        return value if isinstance(value, Placement) else cls.from_dict(value)


@dataclass(frozen=True)
class LayerFile:
    """What an opener is given: one layer's validated store file and its index entry."""

    layer_id: int
    path: Path
    header: StoreHeader
    head_sizes: list[int]


@dataclass(frozen=True)
class OpenOptions:
    """Tier-specific knobs: O_DIRECT queue depth, the set-up Mooncake client (and the reader process that reads its
    pool for this process, if any: :class:`~engramlm.store.mooncake_reader.ReaderProcess`), and whether rows are
    checked.

    ``verify`` (default True): ``memory`` checks every chunk CRC32 of the file at open (it reads it all
    anyway); ``mmap`` and ``direct`` check the CRC32 of every 4 KiB page a gather reads; ``mooncake`` uploads
    from a checked ``mmap`` read. False skips the row checks (header, meta and size are always checked).
    """

    queue_depth: int = 64
    mooncake: Any = field(default=None, compare=False)
    mooncake_reader: Any = field(default=None, compare=False)  # a ReaderProcess reading ``mooncake``'s pool
    verify: bool = True


def check_options(tiers: set[Tier], options: OpenOptions) -> None:
    """Refuse, before any file is opened, a tier whose required option is missing."""
    if Tier.MOONCAKE in tiers and options.mooncake is None:
        raise ConfigError("tier 'mooncake' needs a set-up MooncakeDistributedStore (mooncake=...)")


def _open_memory(layer: LayerFile, fp: str, opts: OpenOptions) -> RowTable:
    """Read the row area once and check it against the chunk CRC32s (v1 and v2 files) before serving it."""
    import numpy as np

    from engramlm.store.file import check_chunks
    from engramlm.store.memory import MemoryTable

    h = layer.header
    raw = np.fromfile(layer.path, dtype=np.uint8, count=h.data_bytes, offset=h.data_offset)
    if raw.size != h.data_bytes:
        raise CorruptFileError(f"{layer.path}: truncated row data ({raw.size} of {h.data_bytes} bytes)")
    if opts.verify:
        check_chunks(h, raw)
    return MemoryTable(torch.from_numpy(raw.reshape(h.num_rows, h.row_bytes)), fp, row_format=h.row_format)


def _open_mmap(layer: LayerFile, fp: str, opts: OpenOptions) -> RowTable:
    from engramlm.store.mmap import MmapTable

    return MmapTable(layer.path, fp, verify=opts.verify)


def _open_direct(layer: LayerFile, fp: str, opts: OpenOptions) -> RowTable:
    from engramlm.store.direct import DirectFileTable

    return DirectFileTable(layer.path, fp, queue_depth=opts.queue_depth, verify=opts.verify)


def _open_mooncake(layer: LayerFile, fp: str, opts: OpenOptions) -> RowTable:
    """Open a layer in the Mooncake pool, uploading it from the store file if it is not there yet."""
    from engramlm.errors import MissingFingerprint
    from engramlm.store.mmap import MmapTable
    from engramlm.store.mooncake import MooncakeTable

    check_options({Tier.MOONCAKE}, opts)
    client, heads, dim, reader = opts.mooncake, layer.head_sizes, layer.header.dim, opts.mooncake_reader
    try:
        return MooncakeTable(client, layer.layer_id, heads, dim, fp, reader=reader)
    except MissingFingerprint:
        pass  # not uploaded yet: populate below
    with MmapTable(layer.path, fp, verify=opts.verify) as mm:
        weights = mm.fetch_sorted_unique(torch.arange(mm.num_rows))
    return MooncakeTable.populate(client, layer.layer_id, weights, heads, fp, reader=reader)


Opener = Callable[[LayerFile, str, OpenOptions], RowTable]
OPENERS: Mapping[Tier, Opener] = {
    Tier.MEMORY: _open_memory,
    Tier.MMAP: _open_mmap,
    Tier.DIRECT: _open_direct,
    Tier.MOONCAKE: _open_mooncake,
}
"""Tier -> the function that opens one layer file on it (fingerprint already checked by the caller)."""


def open_layer(tier: Tier | str, layer: LayerFile, fingerprint: str, options: OpenOptions | None = None) -> RowTable:
    """One layer file opened on ``tier``."""
    return OPENERS[Tier.parse(tier)](layer, fingerprint, options or OpenOptions())
