"""Batch deduplication of row ids in one Numba ``nogil`` call: the first step of every gather.

Why: ``torch.unique(sorted=True, return_inverse=True)`` plus reading its first and last values back
cost ~20 us of Python and three dispatches per decode-sized gather on the prefetch worker, each a point
where the worker re-takes the GIL from the decode thread (issue 18). A decode gather is ~64 ids: a
stable sort and one pass do the same in ~2 us, and the direct tier's read kernel calls this inline.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(nogil=True, cache=True)
def unique_inverse_kernel(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """(sorted unique ids, inverse) with ``unique[inverse] == flat``: ``torch.unique``'s result, exactly."""
    n = flat.size
    order = np.argsort(flat, kind="mergesort")
    unique = np.empty(n, np.int64)
    inverse = np.empty(n, np.int64)
    u = -1
    prev = np.int64(0)
    for k in range(n):
        i = order[k]
        v = flat[i]
        if u < 0 or v != prev:
            u += 1
            unique[u] = v
            prev = v
        inverse[i] = u
    return unique[: u + 1], inverse


def unique_inverse(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique int64 ids of 1-D ``flat`` and each id's index among them (see the kernel)."""
    return unique_inverse_kernel(np.ascontiguousarray(flat, dtype=np.int64))
