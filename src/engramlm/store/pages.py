"""Page arithmetic for file tiers: which 4 KiB pages a set of rows touches, and read runs.

Disk reads happen at page granularity, so the I/O plan is computed on pages: deduplicated
(two rows on one page cost one read) and coalesced into contiguous runs (one syscall each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAGE = 4096


@dataclass
class PagePlan:
    """Unique sorted pages, the contiguous runs covering them, and each row's buffer offset.

    The read buffer holds ``pages`` back to back, so page ``pages[i]`` sits at ``i * PAGE``;
    a run ``(first_slot, file_page, count)`` is one read of ``count`` pages.
    """

    pages: np.ndarray
    run_slot: np.ndarray
    run_page: np.ndarray
    run_count: np.ndarray
    row_offset: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.pages.size) * PAGE


def plan_pages(ids: np.ndarray, row_bytes: int, data_offset: int, max_run_pages: int = 64) -> PagePlan:
    """Plan page reads for sorted unique row ``ids`` of a row area starting at ``data_offset``."""
    return plan_offsets(data_offset + ids.astype(np.int64) * row_bytes, row_bytes, max_run_pages)


def plan_offsets(start: np.ndarray, row_bytes: int, max_run_pages: int = 64) -> PagePlan:
    """Plan page reads for records of ``row_bytes`` at byte offsets ``start`` (any order, no duplicates
    needed: pages are deduplicated); ``row_offset[i]`` is where record i sits in the read buffer."""
    start = np.asarray(start, dtype=np.int64)
    first = start // PAGE
    last = (start + row_bytes - 1) // PAGE
    span = int((last - first).max()) + 1 if start.size else 1
    if span == 1:
        pages = np.unique(first)
    else:
        cand = first[:, None] + np.arange(span, dtype=np.int64)
        pages = np.unique(cand[cand <= last[:, None]])
    # A run breaks where pages are not consecutive, and every max_run_pages within a run.
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks)) if pages.size else np.zeros(0, np.int64)
    ends = np.concatenate((breaks, [pages.size])) if pages.size else np.zeros(0, np.int64)
    lengths = ends - starts
    pieces = (lengths + max_run_pages - 1) // max_run_pages
    run_start = np.repeat(starts, pieces)
    within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    run_slot = run_start + within * max_run_pages
    run_end = np.minimum(np.repeat(ends, pieces), run_slot + max_run_pages)
    slot = np.searchsorted(pages, first)
    return PagePlan(
        pages=pages,
        run_slot=run_slot.astype(np.int64),
        run_page=pages[run_slot] if run_slot.size else run_slot,
        run_count=(run_end - run_slot).astype(np.int64),
        row_offset=slot * PAGE + start % PAGE,
    )
