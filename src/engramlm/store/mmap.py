"""Memory-mapped tier: the store file's row area as a numpy memmap, read via the page cache.

Simplest file tier: the kernel pages rows in on demand, so tables larger than RAM work, and
sorted unique ids (from ``RowTable.gather``) keep faults and TLB misses in table order.

Verification (``verify=True``, the default): the 4 KiB pages the batch's rows lie on are copied out
of the map, each is checked against the file's per-page CRC32 (:func:`~engramlm.store.file.check_pages`)
and the rows are taken from that checked copy, so what is served is what was checked. That costs a
page copy plus one CRC per page touched (``benchmarks/bench_store.py`` reports the ratio). A v1 file
(no page table) is verified whole at open instead, with a warning.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from engramlm.store.base import RowTable, TableHeader
from engramlm.store.file import StoreHeader, align_up, check_pages, needs_full_check, open_store, read_page_crcs
from engramlm.store.file import verify_store as _verify_whole
from engramlm.store.pages import PAGE, plan_pages


class MmapTable(RowTable):
    """A store file gathered through ``np.memmap`` fancy indexing, decoded to float.

    ``verify``: check every page a gather reads against its recorded CRC32 (default); False serves
    rows unchecked (only the header, meta and size are checked at open).
    """

    def __init__(
        self, path: str | os.PathLike, expected_fingerprint: str | None = None, *, verify: bool = True
    ) -> None:
        self.header: StoreHeader = open_store(path, expected_fingerprint)
        h = self.header
        super().__init__(TableHeader(h.num_rows, h.dim, h.fingerprint, h.format))
        self._format = h.format
        self.verify = verify
        self._crcs: np.ndarray | None = None
        if verify and needs_full_check(h, "mmap"):
            _verify_whole(path)
        elif verify:
            self._crcs = read_page_crcs(h)
        span = align_up(h.data_bytes) if self._crcs is not None else h.data_bytes
        self._flat = np.memmap(path, dtype=np.uint8, mode="r", offset=h.data_offset, shape=(span,))
        self._rows = self._flat[: h.data_bytes].reshape(h.num_rows, h.row_bytes)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        h = self.header
        if self._crcs is not None:
            plan = plan_pages(idx, h.row_bytes, h.data_offset)
            page0 = h.data_offset // PAGE
            buf = np.ascontiguousarray(self._flat.reshape(-1, PAGE)[plan.pages - page0])
            check_pages(h, self._crcs, buf, plan.pages)
            windows = np.lib.stride_tricks.sliding_window_view(buf.reshape(-1), h.row_bytes)
            raw = np.ascontiguousarray(windows[plan.row_offset])
            self.stats.add(bytes_read=plan.nbytes)
            return self._format.decode(torch.from_numpy(raw))
        raw = self._rows[idx]
        # Page-cache reads are page-granular; count distinct pages as the bytes actually read.
        start = h.data_offset + idx * h.row_bytes
        pages = np.union1d(start // PAGE, (start + h.row_bytes - 1) // PAGE)
        self.stats.add(bytes_read=int(pages.size) * PAGE)
        return self._format.decode(torch.from_numpy(np.ascontiguousarray(raw)))

    def close(self) -> None:
        # Dropping the last reference unmaps; closing the mmap under live views would raise.
        self._rows = np.empty((0, self.header.row_bytes), np.uint8)
        self._flat = np.empty(0, np.uint8)
