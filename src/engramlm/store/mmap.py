"""Memory-mapped tier: the store file's row area as a numpy memmap, read via the page cache.

Simplest file tier: the kernel pages rows in on demand, so tables larger than RAM work, and
sorted unique ids (from ``RowTable.gather``) keep faults and TLB misses in table order.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from engramlm.store.base import RowTable, TableHeader
from engramlm.store.file import StoreHeader, open_store
from engramlm.store.pages import PAGE


class MmapTable(RowTable):
    """A store file gathered through ``np.memmap`` fancy indexing, decoded to float."""

    def __init__(self, path: str | os.PathLike, expected_fingerprint: str | None = None) -> None:
        self.header: StoreHeader = open_store(path, expected_fingerprint)
        h = self.header
        super().__init__(TableHeader(h.num_rows, h.dim, h.fingerprint, h.format))
        self._format = h.format
        self._rows = np.memmap(path, dtype=np.uint8, mode="r", offset=h.data_offset, shape=(h.num_rows, h.row_bytes))

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        raw = self._rows[idx]
        # Page-cache reads are page-granular; count distinct pages as the bytes actually read.
        start = self.header.data_offset + idx * self.header.row_bytes
        pages = np.union1d(start // PAGE, (start + self.header.row_bytes - 1) // PAGE)
        self.stats.add(bytes_read=int(pages.size) * PAGE)
        return self._format.decode(torch.from_numpy(np.ascontiguousarray(raw)))

    def close(self) -> None:
        # Dropping the last reference unmaps; closing the mmap under live views would raise.
        self._rows = np.empty((0, self.header.row_bytes), np.uint8)
