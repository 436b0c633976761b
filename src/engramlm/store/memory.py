"""In-memory tier: the table is a resident tensor; dense rows are gathered by one compiled call, the rest with
``index_select``.

Also the reference every other tier is tested against. It holds decoded float rows, packed
byte records, or the V4.1 checkpoint's split fp8 form mapped in place (decoded per gather).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from engramlm.store._dedup import unique_inverse_kernel
from engramlm.store.base import RowTable, TableHeader, int_view
from engramlm.store.formats import BF16, FP8, FP32, RowFormat, decode_split, get_format

_DENSE_FORMATS = {torch.float32: FP32, torch.bfloat16: BF16}


@nb.njit(cache=True)
def _gather_rows(flat: np.ndarray, weights: np.ndarray, out: np.ndarray) -> tuple[int, int, int]:  # pragma: no cover
    """(unique ids, lowest id, highest id); rows of in-range ids ``flat`` copied from ``weights`` into ``out`` bit for
    bit, nothing copied when an id is out of range. Keeps the GIL: a few µs, on the decode thread (inline)."""
    unique, _ = unique_inverse_kernel(flat)
    lo, hi = unique[0], unique[unique.size - 1]
    if lo < 0 or hi >= weights.shape[0]:
        return unique.size, lo, hi
    for i in range(flat.size):
        out[i, :] = weights[flat[i], :]
    return unique.size, lo, hi


class MemoryTable(RowTable):
    """A table held in a tensor: float32/bf16 rows, or uint8 records with ``row_format``."""

    # A gather is an index_select of tens of µs: the Prefetcher runs it inline on the decode thread, which
    # costs less than handing it to a worker thread and back (a GIL switch each way; issue 18).
    prefetch_workers = 0

    def __init__(
        self,
        weights: torch.Tensor,
        fingerprint: str,
        row_format: str | RowFormat | None = None,
    ) -> None:
        if weights.dim() != 2:
            raise ValueError(f"weights must be 2-D [rows, dim], got shape {tuple(weights.shape)}")
        self._scale: torch.Tensor | None = None
        if weights.dtype == torch.uint8:
            if row_format is None:
                raise ValueError("uint8 (packed) weights need an explicit row_format")
            fmt = get_format(row_format)
            dim = fmt.dim_of(weights.shape[1])
            if fmt.row_bytes(dim) != weights.shape[1]:
                raise ValueError(f"{weights.shape[1]} bytes is not a {fmt.name} row")
        elif weights.dtype in _DENSE_FORMATS:
            fmt = get_format(row_format or _DENSE_FORMATS[weights.dtype])
            dim = weights.shape[1]
        else:
            raise ValueError(f"unsupported weights dtype {weights.dtype}; use from_split for fp8")
        super().__init__(TableHeader(weights.shape[0], dim, fingerprint, fmt))
        self._format = fmt
        self._weights = weights

    @classmethod
    def from_split(cls, weight: torch.Tensor, scale: torch.Tensor, fingerprint: str) -> MemoryTable:
        """Serve the checkpoint's split fp8 form (e4m3 [R, d] + e8m0 [R, d/32]) in place."""
        table = cls.__new__(cls)
        if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float8_e8m0fnu:
            got = f"{weight.dtype}/{scale.dtype}"
            raise ValueError(f"split form dtypes must be e4m3/e8m0, got {got}")
        RowTable.__init__(table, TableHeader(weight.shape[0], weight.shape[1], fingerprint, FP8))
        table._format = FP8
        table._weights = weight
        table._scale = scale
        return table

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        """Dense rows of ``dtype`` (float32 / bf16) in one compiled call: the dedupe (for the counters and the range
        check) and the row copies, no torch op (the generic path's three index ops cost ~100 µs a decode gather)."""
        w = self._weights
        if self._scale is not None or w.dtype != dtype or dtype not in _DENSE_FORMATS or not w.is_contiguous():
            return None
        if type(self)._fetch_unique is not MemoryTable._fetch_unique:  # a subclass reads its own way
            return None
        rows = int_view(w)
        n_unique, lo, hi = _gather_rows(flat, rows, out.view(rows.dtype))
        if lo < 0 or hi >= self.num_rows:
            raise self._out_of_range(int(lo), int(hi))
        self.stats.add(bytes_read=n_unique * self.row_bytes)
        return int(n_unique)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        self.stats.add(bytes_read=ids.numel() * self.row_bytes)
        if self._scale is not None:
            return decode_split(self._weights[ids], self._scale[ids])
        rows = self._weights.index_select(0, ids)
        if rows.dtype == torch.uint8:
            return self._format.decode(rows)
        return rows
