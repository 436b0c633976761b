"""The store file: one table's encoded rows at a page-aligned offset, checksummed per chunk and per page.

Layout (all integers little-endian):

* ``[0, 512)`` header: magic ``ENGRMST\\0``, version, flags, num_rows, dim, row_bytes,
  row format name, fingerprint, data/meta/trailer offsets, chunk geometry, the meta and
  trailer CRC32s, (v2) the page-CRC table's offset, length and CRC32, then the header's own CRC32.
* ``[512, 512 + meta_len)`` meta: UTF-8 JSON (e.g. the hash-spec blob), CRC32 in the header.
* ``[data_offset, +num_rows*row_bytes)`` rows, row-major; ``data_offset`` is 4096-aligned so
  O_DIRECT can read pages in place. v2 zero-pads the row area to a whole page.
* trailer: one CRC32 (u32) per chunk of ``chunk_rows`` rows (about 1 MiB each): ``store verify``'s
  sequential pass and the ``memory`` tier's check at open.
* (v2) page table: one CRC32 (u32) per 4 KiB page of the (padded) row area, 0.1% of the rows.

Why per page: the ``direct`` tier reads only the pages a batch touches and ``mmap`` faults in only
those, so a check on every read must cost what they read, not a 1 MiB chunk per row. zlib's CRC32 on
one page is ~1.3 us here (~3 GB/s, faster than any NumPy-vectorised hash we tried, ~0.8 GB/s), so
:func:`check_pages` runs it per page touched (the direct tier's ``aio`` engine calls the same zlib
``crc32`` from its ``nogil`` kernel, :mod:`engramlm.store._aio`). v1 files (no page table) are still read:
the file tiers verify them whole at open, with a warning (see :func:`needs_full_check`).

Files are written through ``atomic_open`` (temp + fsync + rename), so readers never see a torn one.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.errors import CorruptFileError, HashSpecMismatch
from engramlm.store.base import check_fingerprint
from engramlm.store.formats import RowFormat, get_format
from engramlm.utils.io import atomic_open

MAGIC = b"ENGRMST\0"
VERSION = 2
READABLE_VERSIONS = (1, 2)
PAGE = 4096
META_OFFSET = 512
DEFAULT_CHUNK_BYTES = 1 << 20
_FIELDS = struct.Struct("<8sIIQII16s64sQQQQQQQII")
_FIELDS_V2 = struct.Struct("<8sIIQII16s64sQQQQQQQIIQQI")
_CRC = struct.Struct("<I")
_PROGRESS_MIN_BYTES = 256 << 20


def align_up(x: int, to: int = PAGE) -> int:
    return (x + to - 1) // to * to


@dataclass
class StoreHeader:
    """Decoded header of a store file; ``meta`` is the JSON blob."""

    path: str
    version: int
    num_rows: int
    dim: int
    row_bytes: int
    row_format: str
    fingerprint: str
    data_offset: int
    data_bytes: int
    chunk_rows: int
    num_chunks: int
    meta_len: int
    crc_offset: int
    meta_crc: int
    trailer_crc: int
    meta: dict[str, Any] = field(default_factory=dict)
    page_crc_offset: int = 0  # v2: the per-page CRC32 table (0 in v1 files, which have none)
    num_pages: int = 0
    page_table_crc: int = 0

    @property
    def file_size(self) -> int:
        if self.version >= 2:
            return self.page_crc_offset + 4 * self.num_pages
        return self.crc_offset + 4 * self.num_chunks

    @property
    def has_page_crcs(self) -> bool:
        """Whether reads can be checked page by page (v2); v1 files can only be verified whole."""
        return self.version >= 2 and self.num_pages > 0

    @property
    def format(self) -> RowFormat:
        return get_format(self.row_format)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "file_size": self.file_size}

    def _pack(self) -> bytes:
        fields = (
            MAGIC, self.version, 0, self.num_rows, self.dim, self.row_bytes,
            self.row_format.encode("ascii"), self.fingerprint.encode("ascii"),
            self.data_offset, self.data_bytes, self.chunk_rows, self.num_chunks,
            META_OFFSET, self.meta_len, self.crc_offset, self.meta_crc, self.trailer_crc,
        )  # fmt: skip
        if self.version >= 2:
            body = _FIELDS_V2.pack(*fields, self.page_crc_offset, self.num_pages, self.page_table_crc)
        else:
            body = _FIELDS.pack(*fields)
        return body + _CRC.pack(zlib.crc32(body))


def _corrupt(path: str | os.PathLike, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid engramlm store file: {why}")


class _ChunkCrc:
    """Streams bytes and closes one CRC32 per ``chunk_bytes``, whatever the block sizes."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.crcs: list[int] = []
        self._crc = 0
        self._fill = 0

    def update(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            take = min(self.chunk_bytes - self._fill, len(data) - pos)
            self._crc = zlib.crc32(data[pos : pos + take], self._crc)
            self._fill += take
            pos += take
            if self._fill == self.chunk_bytes:
                self.finish()

    def finish(self) -> None:
        if self._fill:
            self.crcs.append(self._crc)
        self._crc = 0
        self._fill = 0


def _blocks(rows: torch.Tensor | Iterable[torch.Tensor], fmt: RowFormat, block_rows: int) -> Iterable[torch.Tensor]:
    """Yield encoded uint8 blocks; uint8 input is taken as already-encoded records."""
    if isinstance(rows, torch.Tensor):
        table = rows
        rows = (table[i : i + block_rows] for i in range(0, table.shape[0], block_rows))
    for block in rows:
        if block.dim() != 2:
            raise ValueError(f"row blocks must be 2-D, got shape {tuple(block.shape)}")
        yield block.contiguous() if block.dtype == torch.uint8 else fmt.encode(block)


def write_store(
    path: str | os.PathLike,
    rows: torch.Tensor | Iterable[torch.Tensor],
    row_format: str | RowFormat,
    fingerprint: str,
    meta: dict[str, Any] | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
    total_rows: int | None = None,
) -> StoreHeader:
    """Write a table atomically; ``rows`` is a [R, d] tensor or an iterable of [n, d] blocks.

    Float blocks are encoded with ``row_format``; uint8 blocks are taken as encoded records.
    ``progress=None`` shows a tqdm bar only for writes over 256 MiB.
    """
    fmt = get_format(row_format)
    fp = check_fingerprint(fingerprint)
    meta_bytes = json.dumps(meta or {}, sort_keys=True).encode("utf-8")
    data_offset = align_up(META_OFFSET + len(meta_bytes))
    if isinstance(rows, torch.Tensor):
        total_rows = rows.shape[0]
    dim = rows.shape[1] if isinstance(rows, torch.Tensor) and rows.dtype != torch.uint8 else None
    header: StoreHeader | None = None
    bar = None
    with atomic_open(path, "wb") as f:
        f.write(b"\0" * META_OFFSET + meta_bytes)
        f.write(b"\0" * (data_offset - f.tell()))
        n_rows = 0
        crc: _ChunkCrc | None = None
        page_crc = _ChunkCrc(PAGE)
        row_bytes = 0
        for block in _blocks(rows, fmt, block_rows=max(1, (16 << 20) // 256)):
            if crc is None:
                row_bytes = block.shape[1]
                dim = dim or fmt.dim_of(row_bytes)
                if fmt.row_bytes(dim) != row_bytes:
                    raise ValueError(f"{row_bytes}-byte records are not {fmt.name} rows")
                chunk_rows = max(1, chunk_bytes // row_bytes)
                crc = _ChunkCrc(chunk_rows * row_bytes)
                show = progress if progress is not None else ((total_rows or 0) * row_bytes >= _PROGRESS_MIN_BYTES)
                if show:
                    from tqdm import tqdm

                    bar = tqdm(total=total_rows, unit="row", desc=f"write {Path(path).name}")
            if block.shape[1] != row_bytes:
                raise ValueError(f"block of {block.shape[1]} bytes/row, expected {row_bytes}")
            data = memoryview(block.numpy()).cast("B")
            f.write(data)
            crc.update(data)
            page_crc.update(data)
            n_rows += block.shape[0]
            if bar is not None:
                bar.update(block.shape[0])
        if crc is None:
            raise ValueError("write_store got no rows; a store needs at least one row")
        crc.finish()
        data_bytes = n_rows * row_bytes
        pad = memoryview(bytes(align_up(data_bytes) - data_bytes))
        f.write(pad)
        page_crc.update(pad)
        page_crc.finish()
        trailer = np.asarray(crc.crcs, dtype="<u4").tobytes()
        f.write(trailer)
        page_table = np.asarray(page_crc.crcs, dtype="<u4").tobytes()
        f.write(page_table)
        crc_offset = data_offset + align_up(data_bytes)
        header = StoreHeader(
            path=str(path), version=VERSION, num_rows=n_rows, dim=int(dim or 0),
            row_bytes=row_bytes, row_format=fmt.name, fingerprint=fp, data_offset=data_offset,
            data_bytes=data_bytes, chunk_rows=chunk_rows, num_chunks=len(crc.crcs),
            meta_len=len(meta_bytes), crc_offset=crc_offset,
            meta_crc=zlib.crc32(meta_bytes), trailer_crc=zlib.crc32(trailer), meta=meta or {},
            page_crc_offset=crc_offset + len(trailer), num_pages=len(page_crc.crcs),
            page_table_crc=zlib.crc32(page_table),
        )  # fmt: skip
        f.seek(0)
        f.write(header._pack())
    if bar is not None:
        bar.close()
    return header


def read_header(path: str | os.PathLike) -> StoreHeader:
    """Parse and validate the header, meta and file size (not the row checksums)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(META_OFFSET)
            if len(head) < _FIELDS.size + _CRC.size:
                raise _corrupt(path, f"truncated header ({size} bytes)")
            if head[:8] != MAGIC:
                raise _corrupt(path, f"bad magic {head[:8]!r}, expected {MAGIC!r}")
            (version,) = struct.unpack_from("<I", head, 8)
            if version not in READABLE_VERSIONS:
                raise _corrupt(path, f"unsupported version {version} (this build reads {list(READABLE_VERSIONS)})")
            fields = _FIELDS_V2 if version >= 2 else _FIELDS
            (stored_crc,) = _CRC.unpack_from(head, fields.size)
            if zlib.crc32(head[: fields.size]) != stored_crc:
                raise _corrupt(path, "header checksum mismatch")
            v = fields.unpack(head[: fields.size])
            header = StoreHeader(
                path=str(path), version=v[1], num_rows=v[3], dim=v[4], row_bytes=v[5],
                row_format=v[6].rstrip(b"\0").decode("ascii"),
                fingerprint=v[7].decode("ascii"), data_offset=v[8], data_bytes=v[9],
                chunk_rows=v[10], num_chunks=v[11], meta_len=v[13], crc_offset=v[14],
                meta_crc=v[15], trailer_crc=v[16],
            )  # fmt: skip
            if version >= 2:
                header.page_crc_offset, header.num_pages, header.page_table_crc = v[17], v[18], v[19]
            if size != header.file_size:
                what = "truncated" if size < header.file_size else "has trailing bytes"
                raise _corrupt(path, f"{what}: {size} bytes, header says {header.file_size}")
            f.seek(META_OFFSET)
            meta_bytes = f.read(header.meta_len)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read store file: {exc}") from exc
    if zlib.crc32(meta_bytes) != header.meta_crc:
        raise _corrupt(path, "meta checksum mismatch")
    header.meta = json.loads(meta_bytes.decode("utf-8"))
    fmt = get_format(header.row_format)
    if fmt.row_bytes(header.dim) != header.row_bytes or header.data_offset % PAGE:
        raise _corrupt(path, "inconsistent geometry (row_bytes/dim/data_offset)")
    if header.version >= 2 and (
        header.num_pages != align_up(header.data_bytes) // PAGE
        or header.crc_offset != header.data_offset + align_up(header.data_bytes)
        or header.page_crc_offset != header.crc_offset + 4 * header.num_chunks
    ):
        raise _corrupt(path, "inconsistent geometry (page table)")
    return header


def open_store(path: str | os.PathLike, expected_fingerprint: str | None = None) -> StoreHeader:
    """Validate a store file and, if given, its hash-spec fingerprint; returns its header."""
    header = read_header(path)
    if expected_fingerprint is not None:
        expected = check_fingerprint(expected_fingerprint)
        if header.fingerprint != expected:
            raise HashSpecMismatch(
                f"{path}: table was written under hash spec {header.fingerprint}, but hash spec {expected} was expected"
            )
    return header


def verify_store(path: str | os.PathLike, expected_fingerprint: str | None = None) -> StoreHeader:
    """Check every chunk checksum; raises CorruptFileError naming the bad chunks and rows."""
    header = open_store(path, expected_fingerprint)
    chunk_bytes = header.chunk_rows * header.row_bytes
    if header.has_page_crcs:
        read_page_crcs(header)
    with open(path, "rb") as f:
        f.seek(header.crc_offset)
        trailer = f.read(4 * header.num_chunks)
        if zlib.crc32(trailer) != header.trailer_crc:
            raise _corrupt(path, "chunk checksum table is damaged")
        expected = np.frombuffer(trailer, dtype="<u4")
        f.seek(header.data_offset)
        bad = []
        for i in range(header.num_chunks):
            want = min(chunk_bytes, header.data_bytes - i * chunk_bytes)
            if zlib.crc32(f.read(want)) != int(expected[i]):
                bad.append(i)
    _raise_bad_chunks(header, bad)
    return header


def _raise_bad_chunks(header: StoreHeader, bad: list[int]) -> None:
    if bad:
        spans = ", ".join(
            f"chunk {i} (rows {i * header.chunk_rows}..{min((i + 1) * header.chunk_rows, header.num_rows) - 1})"
            for i in bad[:5]
        )
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise _corrupt(header.path, f"checksum mismatch in {len(bad)} chunk(s): {spans}{more}")


def check_chunks(header: StoreHeader, data: np.ndarray) -> None:
    """Check the whole row area ``data`` (uint8, ``data_bytes`` long, already in memory) against the chunk
    CRCs: the ``memory`` tier's check at open (it reads every byte anyway); v1 and v2 files."""
    with open(header.path, "rb") as f:
        f.seek(header.crc_offset)
        trailer = f.read(4 * header.num_chunks)
    if zlib.crc32(trailer) != header.trailer_crc:
        raise _corrupt(header.path, "chunk checksum table is damaged")
    expected = np.frombuffer(trailer, dtype="<u4")
    flat = memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")
    chunk_bytes = header.chunk_rows * header.row_bytes
    bad = [
        i
        for i in range(header.num_chunks)
        if zlib.crc32(flat[i * chunk_bytes : min((i + 1) * chunk_bytes, header.data_bytes)]) != int(expected[i])
    ]
    _raise_bad_chunks(header, bad)


def read_page_crcs(header: StoreHeader) -> np.ndarray:
    """The v2 per-page CRC32 table (u32, one per page of the row area), itself checked against the header."""
    with open(header.path, "rb") as f:
        f.seek(header.page_crc_offset)
        table = f.read(4 * header.num_pages)
    if len(table) != 4 * header.num_pages or zlib.crc32(table) != header.page_table_crc:
        raise _corrupt(header.path, "page checksum table is damaged")
    return np.frombuffer(table, dtype="<u4").astype(np.uint32)


def check_pages(
    header: StoreHeader,
    crcs: np.ndarray,
    buf: memoryview | np.ndarray,
    pages: np.ndarray,
    offsets: np.ndarray | None = None,
) -> None:
    """Refuse rows read from pages whose CRC32 is not the recorded one.

    ``pages``: absolute file page numbers (as :func:`engramlm.store.pages.plan_pages` gives); page
    ``pages[i]`` lies in ``buf`` at byte ``offsets[i]`` (default ``i * 4096``: back to back). One zlib CRC32
    per page (~1.3 us for 4 KiB here): this is the per-read cost of verification.
    """
    if not pages.size:
        return
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    starts = (np.arange(pages.size, dtype=np.int64) * PAGE if offsets is None else offsets).tolist()
    got = np.array([zlib.crc32(view[o : o + PAGE]) for o in starts], dtype=np.uint32)
    rel = pages - header.data_offset // PAGE
    bad = np.flatnonzero(got != crcs[rel])
    if bad.size:
        raise page_mismatch(header, int(rel[bad[0]]), int(bad.size))


def page_mismatch(header: StoreHeader, page: int, count: int = 1) -> CorruptFileError:
    """The error for ``count`` row-area pages failing their CRC32, the first being ``page`` (row-area relative)."""
    first = page * PAGE // header.row_bytes
    last = min(header.num_rows, ((page + 1) * PAGE + header.row_bytes - 1) // header.row_bytes) - 1
    more = f" and {count - 1} more page(s)" if count > 1 else ""
    return _corrupt(
        header.path,
        f"checksum mismatch in row-data block (page) {page} at byte {header.data_offset + page * PAGE} "
        f"(rows {first}..{last}){more}; run `engramlm store verify` and rebuild the store",
    )


def needs_full_check(header: StoreHeader, tier: str) -> bool:
    """A v1 file (no page table) opened with verification: warn once and have the caller verify it whole."""
    if header.has_page_crcs:
        return False
    warnings.warn(
        f"{header.path}: store format v{header.version} has no per-page checksums, so the {tier} tier verifies "
        "the whole file at open instead of each read; rebuild it with `engramlm store build` to check every read",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
