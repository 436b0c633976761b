"""Where an engine's Engram rows come from: the model itself, RAM, a store directory on any tier.

``model_tables`` wraps the model's own ``embed.weight`` tensors as :class:`MemoryTable` s (no
copy); ``export_model_tables`` writes them as a store directory (``store.json`` + one file per
layer, :mod:`engramlm.store.storedir`); ``open_tables`` opens such a directory (or its ``store.json``)
on any :class:`~engramlm.store.tiers.Tier`, optionally behind a hot-row cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engramlm.errors import ConfigError
from engramlm.models.model import EngramLM
from engramlm.store.base import RowTable
from engramlm.store.memory import MemoryTable
from engramlm.store.tiers import Tier


def _layout(model: EngramLM):
    if model.layout is None:
        raise ConfigError("model: it has no Engram layers, so there are no tables")
    return model.layout


def model_tables(model: EngramLM) -> dict[int, RowTable]:
    """The model's own tables as in-memory RowTables (views, not copies)."""
    fp = _layout(model).fingerprint
    return {lid: MemoryTable(blk.embed.weight.detach().float().cpu(), fp) for lid, blk in model.engram_layers.items()}


def head_sizes(model: EngramLM) -> dict[int, list[int]]:
    """Rows per hash head of each layer (the primes, order-major then head-minor)."""
    layout = _layout(model)
    return {lid: layout.head_sizes(lid) for lid in layout.layer_ids}


class _WeightBlocks:
    """A tensor seen as a :class:`engramlm.store.storedir.BlockSource`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.num_rows, self.dim = weight.shape

    def read_block(self, start: int, stop: int) -> torch.Tensor:
        return self.weight[start:stop]


def export_model_tables(
    model: EngramLM,
    out_dir: str | os.PathLike,
    row_format: str = "fp32",
    *,
    progress: bool = False,
    model_sha256: str | None = None,
) -> Path:
    """Write the model's tables as a store directory; returns the ``store.json`` path.

    ``model_sha256``: the sha256 of the saved ``model.safetensors`` these weights are (binds the store to
    it); an in-memory model has no file, so by default the store records no model."""
    from engramlm.store.storedir import export_tables

    sources = {lid: _WeightBlocks(blk.embed.weight.detach().float().cpu()) for lid, blk in model.engram_layers.items()}
    return export_tables(
        sources,
        out_dir,
        row_format,
        _layout(model).fingerprint,
        head_sizes=head_sizes(model),
        progress=progress,
        model_sha256=model_sha256,
    )


def open_tables(
    path: str | os.PathLike,
    tier: Tier | str = Tier.MMAP,
    *,
    cache_bytes: int = 0,
    fingerprint: str | None = None,
    mooncake: Any = None,
    mooncake_reader: Any = None,
    model_sha256: str | None = None,
    verify: bool = True,
) -> dict[int, RowTable]:
    """Open a store directory (``store.json``) as ``{layer_id: RowTable}`` on ``tier``.

    ``tier``: a :class:`Tier` name (``mooncake`` needs a set-up client, and reads through ``mooncake_reader``,
    a :class:`~engramlm.store.mooncake_reader.ReaderProcess`, when given); ``cache_bytes`` > 0 puts a
    hot-row cache of that total budget in front of every layer. ``model_sha256``: the sha256 of the
    model's ``model.safetensors`` (``ModelFiles.weights_sha256()``); a store built from other weights is
    refused. ``verify``: check every row read against the files' checksums (default).
    """
    from engramlm.store.storedir import open_store_dir

    tier = Tier.parse(tier)
    p = Path(path)
    if p.is_file() and p.name == "store.json":
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"store: {path} is not a store directory (one with a store.json)")
    return open_store_dir(
        p,
        tier,
        cache_bytes,
        expected_fingerprint=fingerprint,
        mooncake=mooncake,
        mooncake_reader=mooncake_reader,
        expected_model_sha256=model_sha256,
        verify=verify,
    )


def drop_model_tables(model: EngramLM) -> int:
    """Free the model's own Engram tables (the rows then come from a store); returns bytes freed."""
    freed = 0
    for blk in model.engram_layers.values():
        w = blk.embed.weight
        freed += w.numel() * w.element_size()
        blk.embed.weight = torch.nn.Parameter(w.new_empty(0, w.shape[1]), requires_grad=False)
    return freed
