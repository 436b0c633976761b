"""Memory-mapped tier: the store file's row area as a numpy memmap, read via the page cache.

Simplest file tier: the kernel pages rows in on demand, so tables larger than RAM work, and
sorted unique ids (from ``RowTable.gather``) keep faults and TLB misses in table order.

Verification (``verify=True``, the default): the first time this table reads a 4 KiB page, the page is
checked in place against the file's per-page CRC32 (:func:`~engramlm.store.file.check_pages`) and marked
in a per-table bitmap (1 byte per page, 0.025% of the file); later gathers skip marked pages. Why first
read only: this tier serves from the page cache, where a row is 64-256 bytes of a 4 KiB page, so checking
every read hashes 16-60x the bytes served (the bench measured 3-9x the gather time); a page is the same
bytes until the file is rewritten. What that misses: a file changed on disk after this table checked a
page (a rewrite in place while serving; ``store build`` renames a new file in, which a table still open
does not see), and corruption of a page evicted from the page cache and read again. ``direct`` reads disk
every time and checks every read. A v1 file (no page table) is verified whole at open, with a warning.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from engramlm.store.base import RowTable, TableHeader
from engramlm.store.file import StoreHeader, align_up, check_pages, needs_full_check, open_store, read_page_crcs
from engramlm.store.file import verify_store as _verify_whole
from engramlm.store.pages import PAGE


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
            self._checked = np.zeros(h.num_pages, dtype=bool)
            self._lock = threading.Lock()
        span = align_up(h.data_bytes) if self._crcs is not None else h.data_bytes
        self._flat = np.memmap(path, dtype=np.uint8, mode="r", offset=h.data_offset, shape=(span,))
        self._rows = self._flat[: h.data_bytes].reshape(h.num_rows, h.row_bytes)

    @property
    def pages_checked(self) -> int:
        """How many pages this table has checked so far (0 without page verification)."""
        return int(self._checked.sum()) if self._crcs is not None else 0

    def _check(self, pages: np.ndarray) -> None:
        """Check the not-yet-checked ``pages`` (relative to the row area) in place, then mark them."""
        new = pages[~self._checked[pages]]
        if new.size:
            h = self.header
            check_pages(h, self._crcs, memoryview(self._flat), new + h.data_offset // PAGE, new * PAGE)
            with self._lock:
                self._checked[new] = True

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        h = self.header
        start = idx * h.row_bytes
        # Page-cache reads are page-granular; count distinct pages as the bytes actually read.
        pages = np.union1d(start // PAGE, (start + h.row_bytes - 1) // PAGE)
        if self._crcs is not None:
            self._check(pages)
        raw = self._rows[idx]
        self.stats.add(bytes_read=int(pages.size) * PAGE)
        return self._format.decode(torch.from_numpy(np.ascontiguousarray(raw)))

    def close(self) -> None:
        # Dropping the last reference unmaps; closing the mmap under live views would raise.
        self._rows = np.empty((0, self.header.row_bytes), np.uint8)
        self._flat = np.empty(0, np.uint8)
