"""Remote tier on Mooncake Store's ``EngramStore`` (landscape §2 row 6).

Mooncake keeps one key per (layer, head) and looks rows up by per-head local ids shaped
[B, L, H], returning float32 [B, L, H, D]. This tier maps engramlm's offset-applied ids onto
that contract: sorted unique ids are split by head (contiguous after sorting), packed into a
[n_max, 1, H] id grid in one vectorised step, looked up in one batched call, and unpacked.
The hash-spec fingerprint is stored under its own key so a mismatched table is refused.
The ``mooncake`` package (PyPI ``mooncake-transfer-engine-non-cuda``) is imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engramlm.errors import HashSpecMismatch
from engramlm.store.base import RowTable, check_fingerprint
from engramlm.store.formats import FP32, RowFormat


def _fingerprint_key(layer_id: int) -> str:
    return f"engramlm:l{layer_id}:fingerprint"


def _engram_store(store: Any, layer_id: int, head_sizes: Sequence[int], dim: int) -> Any:
    from mooncake.store import EngramStore, EngramStoreConfig

    cfg = EngramStoreConfig()
    cfg.table_vocab_sizes = [int(h) for h in head_sizes]
    cfg.embedding_dim = int(dim)
    return EngramStore(int(layer_id), cfg, store)


class MooncakeTable(RowTable):
    """One Engram layer's table ([sum(head_sizes), dim], heads concatenated) in Mooncake Store.

    ``store`` is a set-up ``mooncake.store.MooncakeDistributedStore``.
    """

    def __init__(
        self,
        store: Any,
        layer_id: int,
        head_sizes: Sequence[int],
        dim: int,
        expected_fingerprint: str | None = None,
    ) -> None:
        super().__init__()
        self._store = store
        self.layer_id = int(layer_id)
        self.head_sizes = np.asarray(head_sizes, dtype=np.int64)
        self._offsets = np.concatenate(([0], np.cumsum(self.head_sizes)))
        self._dim = int(dim)
        self._engram = _engram_store(store, layer_id, head_sizes, dim)
        raw = store.get(_fingerprint_key(self.layer_id))
        if not raw:
            raise HashSpecMismatch(f"Mooncake layer {layer_id} has no engramlm fingerprint; populate it first")
        self._fp = raw.decode("ascii")
        if expected_fingerprint is not None and self._fp != check_fingerprint(expected_fingerprint):
            raise HashSpecMismatch(
                f"Mooncake layer {layer_id} was populated under hash spec {self._fp}, "
                f"but hash spec {check_fingerprint(expected_fingerprint)} was expected"
            )

    @classmethod
    def populate(
        cls,
        store: Any,
        layer_id: int,
        weights: torch.Tensor,
        head_sizes: Sequence[int],
        fingerprint: str,
    ) -> MooncakeTable:
        """Create-only upload of a [R, dim] table split into heads; returns the opened tier."""
        fp = check_fingerprint(fingerprint)
        sizes = [int(h) for h in head_sizes]
        if sum(sizes) != weights.shape[0]:
            raise ValueError(f"head sizes sum to {sum(sizes)}, table has {weights.shape[0]} rows")
        w = weights.detach().to("cpu", torch.float32).contiguous().numpy()
        buffers = [np.ascontiguousarray(b) for b in np.split(w, np.cumsum(sizes)[:-1])]
        _engram_store(store, layer_id, sizes, weights.shape[1]).populate(buffers)
        store.put(_fingerprint_key(layer_id), fp.encode("ascii"))
        return cls(store, layer_id, sizes, weights.shape[1], fp)

    def remove(self) -> int:
        """Delete this layer's head tables and fingerprint from the store."""
        self._store.remove(_fingerprint_key(self.layer_id), True)
        return int(self._engram.remove_from_store(True))

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fp

    @property
    def row_format(self) -> RowFormat:
        return FP32

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        head = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[head]
        # Sorted ids keep each head's ids contiguous, so rank within head is a subtraction.
        first = np.searchsorted(head, head, side="left")
        rank = np.arange(idx.size) - first
        grid = np.zeros((int(rank.max()) + 1, 1, self.head_sizes.size), dtype=np.int64)
        grid[rank, 0, head] = local
        rows = np.asarray(self._engram.lookup(grid))[rank, 0, head]
        self.stats.add(bytes_read=grid.size * self.row_bytes)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
