"""Token shards: each split's documents encoded, packed end to end, and stored as ``.npy`` arrays.

Layout per document: ``[BOS] text-tokens [EOS]``. The leading BOS means a document's first text
token is always predicted from a known context (so every text byte is scored in eval), and its
position marks the document start. Arrays are ``.npy`` so dtype and length are self-describing
and ``np.load(mmap_mode="r")`` maps them without reading: tokens are uint16 when the vocab fits
(half the disk and page cache of int32), with int64 document start offsets beside them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from engramlm.data.tokenizer import BOS_ID, EOS_ID
from engramlm.utils.io import atomic_open, sha256_file

# Documents per encode_batch call: large enough to keep both cores busy, small enough to report.
_BATCH_BYTES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_files(split: str) -> dict[str, str]:
    """File names of one split: packed tokens, document start offsets, document UTF-8 sizes."""
    return {
        "tokens": f"{split}.tokens.npy",
        "doc_offsets": f"{split}.doc_offsets.npy",
        "doc_bytes": f"{split}.doc_bytes.npy",
    }


def _batches(texts: Sequence[str]) -> list[slice]:
    out, start, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= _BATCH_BYTES:
            out.append(slice(start, i + 1))
            start, size = i + 1, 0
    if start < len(texts):
        out.append(slice(start, len(texts)))
    return out


def encode_documents(
    tok: Tokenizer, texts: Sequence[str], vocab_size: int, *, progress: bool = True, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``[BOS] doc [EOS]`` for every text; return (tokens, int64 start offsets)."""
    dtype = token_dtype(vocab_size)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    total = sum(len(t) for t in texts)
    with tqdm(total=total, unit="char", unit_scale=True, desc=desc, disable=not progress) as bar:
        for sl in _batches(texts):
            chunk = list(texts[sl])
            for k, enc in enumerate(encode(chunk, add_special_tokens=False)):
                ids = np.empty(len(enc.ids) + 2, dtype=dtype)
                ids[0], ids[-1] = BOS_ID, EOS_ID
                ids[1:-1] = enc.ids
                parts.append(ids)
                lengths[sl.start + k] = ids.size
            bar.update(sum(len(t) for t in chunk))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    offsets = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return tokens, offsets


def save_array(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """Write one ``.npy`` atomically; return its sha256 for the manifest."""
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def write_split(
    out_dir: Path, split: str, tokens: np.ndarray, offsets: np.ndarray, doc_bytes: np.ndarray
) -> dict[str, dict[str, str]]:
    """Write a split's three arrays; return ``{role: {"file", "sha256"}}``."""
    arrays = {"tokens": tokens, "doc_offsets": offsets, "doc_bytes": doc_bytes.astype(np.int64)}
    return {
        role: {"file": name, "sha256": save_array(out_dir / name, arrays[role])}
        for role, name in shard_files(split).items()
    }
