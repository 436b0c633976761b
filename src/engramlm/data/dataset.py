"""Read side of a prepared corpus: one split's memory-mapped arrays, checked against the manifest.

Every array is verified (sha256, dtype, length) before use so a truncated or stale shard fails
loudly here instead of silently training on garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engramlm.data.manifest import Manifest
from engramlm.data.splits import SPLITS
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.utils.io import sha256_file


def load_array(
    path: Path,
    sha256: str | None,
    verify: bool,
    dtype: str | None = None,
    length: int | None = None,
) -> np.ndarray:
    """Open one ``.npy`` read-only (memory-mapped when non-empty) after checking it."""
    if not path.is_file():
        raise CorruptFileError(f"{path}: missing; rebuild with `engramlm data prepare`")
    if verify and sha256 is not None and sha256_file(path) != sha256:
        raise CorruptFileError(f"{path}: sha256 does not match the manifest; rebuild it")
    arr: np.ndarray
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        # A zero-length array cannot be memory-mapped: read it whole and accept it only if it is empty
        # (decided by the array read, not by the wording of numpy's error).
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc2:
            raise CorruptFileError(f"{path}: not a readable .npy array ({exc2})") from exc2
        if arr.size:
            raise CorruptFileError(f"{path}: cannot be memory-mapped ({exc})") from exc
    if arr.ndim != 1 or (dtype is not None and arr.dtype != np.dtype(dtype)):
        raise CorruptFileError(f"{path}: shape {arr.shape} dtype {arr.dtype}, want 1-D {dtype}")
    if length is not None and arr.shape[0] != length:
        raise CorruptFileError(f"{path}: {arr.shape[0]} entries, manifest says {length}")
    return arr


class TokenDataset:
    """One split of a prepared directory: packed tokens, document starts, sizes and byte table."""

    def __init__(self, out_dir: str | os.PathLike[str], split: str, *, verify: bool = True) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} not one of {SPLITS}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.manifest = Manifest.load(self.out_dir)
        info = self.manifest.splits[split]
        files = info.files
        try:
            tok_file = files["tokens"]
            off_file = files["doc_offsets"]
            bytes_file = files["doc_bytes"]
            tb = self.manifest.tokenizer["token_bytes"]
            self.vocab_size = int(self.manifest.tokenizer["vocab_size"])
            self.bos_id = int(self.manifest.tokenizer["bos_id"])
            self.eos_id = int(self.manifest.tokenizer["eos_id"])
            self.pad_id = int(self.manifest.tokenizer["pad_id"])
        except (KeyError, TypeError) as exc:
            raise CorruptFileError(f"{self.out_dir}: manifest lacks entry {exc}") from exc

        def load(entry: dict[str, str], dtype: str | None = None, length: int | None = None) -> np.ndarray:
            return load_array(self.out_dir / entry["file"], entry["sha256"], verify, dtype, length)

        self.tokens = load(tok_file, self.manifest.token_dtype, info.tokens)
        self.doc_offsets = load(off_file, "int64", info.documents)
        self.doc_bytes = load(bytes_file, "int64", info.documents)
        self.token_bytes = np.asarray(load(tb, "int64", self.vocab_size))
        if int(self.doc_bytes.sum()) != info.bytes:
            raise CorruptFileError(f"{self.out_dir}: {split} byte counts disagree with manifest")
        starts = np.asarray(self.doc_offsets)
        if starts.size and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= info.tokens):
            raise CorruptFileError(f"{self.out_dir}: {split} document offsets are not increasing")

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the split's text (the bits-per-byte denominator)."""
        return int(self.manifest.splits[self.split].bytes)

    @property
    def n_documents(self) -> int:
        return int(self.doc_offsets.shape[0])

    def doc_start_mask(self, positions: np.ndarray) -> np.ndarray:
        """True where a document begins exactly at that absolute token position."""
        starts = np.asarray(self.doc_offsets)
        idx = np.searchsorted(starts, positions)
        hit = idx < starts.size
        hit[hit] = starts[idx[hit]] == positions[hit]
        return hit

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.out_dir)!r}, {self.split!r}: {self.n_documents} docs, "
            f"{self.n_tokens} tokens, {self.n_bytes} bytes)"
        )
