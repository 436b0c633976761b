"""The store file: one table's encoded rows at a page-aligned offset, checksummed per chunk.

Layout (all integers little-endian):

* ``[0, 512)`` header: magic ``ENGRMST\\0``, version, flags, num_rows, dim, row_bytes,
  row format name, fingerprint, data/meta/trailer offsets, chunk geometry, the meta and
  trailer CRC32s, then the header's own CRC32.
* ``[512, 512 + meta_len)`` meta: UTF-8 JSON (e.g. the hash-spec blob), CRC32 in the header.
* ``[data_offset, +num_rows*row_bytes)`` rows, row-major; ``data_offset`` is 4096-aligned so
  O_DIRECT can read pages in place.
* trailer: one CRC32 (u32) per chunk of ``chunk_rows`` rows (about 1 MiB each).

Files are written through ``atomic_open`` (temp + fsync + rename), so readers never see a torn one.
"""

from __future__ import annotations

import json
import os
import struct
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
VERSION = 1
PAGE = 4096
META_OFFSET = 512
DEFAULT_CHUNK_BYTES = 1 << 20
_FIELDS = struct.Struct("<8sIIQII16s64sQQQQQQQII")
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

    @property
    def file_size(self) -> int:
        return self.crc_offset + 4 * self.num_chunks

    @property
    def format(self) -> RowFormat:
        return get_format(self.row_format)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "file_size": self.file_size}

    def _pack(self) -> bytes:
        body = _FIELDS.pack(
            MAGIC, self.version, 0, self.num_rows, self.dim, self.row_bytes,
            self.row_format.encode("ascii"), self.fingerprint.encode("ascii"),
            self.data_offset, self.data_bytes, self.chunk_rows, self.num_chunks,
            META_OFFSET, self.meta_len, self.crc_offset, self.meta_crc, self.trailer_crc,
        )  # fmt: skip
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
            n_rows += block.shape[0]
            if bar is not None:
                bar.update(block.shape[0])
        if crc is None:
            raise ValueError("write_store got no rows; a store needs at least one row")
        crc.finish()
        trailer = np.asarray(crc.crcs, dtype="<u4").tobytes()
        f.write(trailer)
        header = StoreHeader(
            path=str(path), version=VERSION, num_rows=n_rows, dim=int(dim or 0),
            row_bytes=row_bytes, row_format=fmt.name, fingerprint=fp, data_offset=data_offset,
            data_bytes=n_rows * row_bytes, chunk_rows=chunk_rows, num_chunks=len(crc.crcs),
            meta_len=len(meta_bytes), crc_offset=data_offset + n_rows * row_bytes,
            meta_crc=zlib.crc32(meta_bytes), trailer_crc=zlib.crc32(trailer), meta=meta or {},
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
            head = f.read(_FIELDS.size + _CRC.size)
            if len(head) < _FIELDS.size + _CRC.size:
                raise _corrupt(path, f"truncated header ({size} bytes)")
            if head[:8] != MAGIC:
                raise _corrupt(path, f"bad magic {head[:8]!r}, expected {MAGIC!r}")
            (stored_crc,) = _CRC.unpack(head[_FIELDS.size :])
            if zlib.crc32(head[: _FIELDS.size]) != stored_crc:
                raise _corrupt(path, "header checksum mismatch")
            v = _FIELDS.unpack(head[: _FIELDS.size])
            if v[1] != VERSION:
                raise _corrupt(path, f"unsupported version {v[1]} (this build reads {VERSION})")
            header = StoreHeader(
                path=str(path), version=v[1], num_rows=v[3], dim=v[4], row_bytes=v[5],
                row_format=v[6].rstrip(b"\0").decode("ascii"),
                fingerprint=v[7].decode("ascii"), data_offset=v[8], data_bytes=v[9],
                chunk_rows=v[10], num_chunks=v[11], meta_len=v[13], crc_offset=v[14],
                meta_crc=v[15], trailer_crc=v[16],
            )  # fmt: skip
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
    if bad:
        spans = ", ".join(
            f"chunk {i} (rows {i * header.chunk_rows}..{min((i + 1) * header.chunk_rows, header.num_rows) - 1})"
            for i in bad[:5]
        )
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise _corrupt(path, f"checksum mismatch in {len(bad)} chunk(s): {spans}{more}")
    return header
