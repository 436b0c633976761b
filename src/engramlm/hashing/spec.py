"""The hash spec (what a user configures) and the hash layout (everything derived from it).

A trained table is only valid under the exact compression map, multipliers and primes that
wrote it, so the layout carries a fingerprint over all of them; tables and checkpoints store it,
and loading under a different layout is refused (:class:`~engramlm.errors.HashSpecMismatch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engramlm.errors import ConfigError, HashSpecMismatch
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.multipliers import layer_multipliers
from engramlm.hashing.primes import prime_plan
from engramlm.utils.config import from_dict, need

if TYPE_CHECKING:
    import torch

HASH_ALGORITHM = "engram-multiply-xor-prime/1"
BOUNDARY_MODES = ("none", "reset")
ROW_ID_DTYPES = ("int64", "int32")


@dataclass(frozen=True)
class HashSpec:
    """User-facing hashing configuration (spec §13 field names).

    ``engram_vocab_size`` holds one base row count per order n = 2..N (length N-1).
    ``layer_ids`` are 0-based transformer block indices, sorted, without duplicates.
    """

    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    engram_vocab_size: tuple[int, ...] = (646_400, 646_400)
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0
    boundary_mode: Literal["none", "reset"] = "none"
    row_id_dtype: Literal["int64", "int32"] = "int64"
    compression: bool = True
    expected_compressed_vocab_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "engram_vocab_size", tuple(int(x) for x in self.engram_vocab_size))
        object.__setattr__(self, "layer_ids", tuple(int(x) for x in self.layer_ids))
        n = self.max_ngram_size
        need(isinstance(n, int) and 2 <= n <= 8, "max_ngram_size", f"must be an int in [2, 8], got {n!r}")
        k = self.n_head_per_ngram
        need(isinstance(k, int) and k >= 1, "n_head_per_ngram", f"must be an int >= 1, got {k!r}")
        need(
            len(self.engram_vocab_size) == n - 1,
            "engram_vocab_size",
            f"needs one base per order 2..{n} (length {n - 1}), got {list(self.engram_vocab_size)}",
        )
        need(
            all(2 <= b < 2**31 - 2**20 for b in self.engram_vocab_size),
            "engram_vocab_size",
            f"bases must lie in [2, 2^31 - 2^20), got {list(self.engram_vocab_size)}",
        )
        ids = list(self.layer_ids)
        need(len(ids) >= 1, "layer_ids", "must name at least one layer")
        need(
            ids == sorted(set(ids)) and ids[0] >= 0,
            "layer_ids",
            f"must be non-negative, sorted ascending, without duplicates; got {ids}",
        )
        need(self.pad_id >= 0, "pad_id", f"must be >= 0, got {self.pad_id}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(
            self.boundary_mode in BOUNDARY_MODES,
            "boundary_mode",
            f"must be one of {BOUNDARY_MODES}, got {self.boundary_mode!r}",
        )
        need(
            self.row_id_dtype in ROW_ID_DTYPES,
            "row_id_dtype",
            f"must be one of {ROW_ID_DTYPES}, got {self.row_id_dtype!r}",
        )

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram_size + 1))

    @property
    def heads_per_layer(self) -> int:
        """H_e = (N - 1) * K hash columns per Engram layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engram_vocab_size"] = list(self.engram_vocab_size)
        d["layer_ids"] = list(self.layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HashSpec:
        """Typed construction through the config core (unknown keys name the allowed ones)."""
        return from_dict(cls, d)

    def replace(self, **changes: Any) -> HashSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class HashLayout:
    """A spec bound to a compression map: multipliers, primes, offsets and table sizes.

    Arrays: ``multipliers`` int64 [L, N]; ``primes`` and ``offsets`` int64 [L, N-1, K];
    ``table_rows`` int64 [L] (R_l). Row ids handed out by the hashers are offset-applied
    (``r = z + o``, spec §4.5) unless stated otherwise.
    """

    spec: HashSpec
    compression: CompressionMap
    _multipliers: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        exp = self.spec.expected_compressed_vocab_size
        if exp is not None and self.compression.compressed_vocab_size != exp:
            raise ConfigError(
                "expected_compressed_vocab_size: the compression map has V' = "
                f"{self.compression.compressed_vocab_size}, the spec expects {exp}; a different "
                "V' changes every multiplier and therefore every row id (wrong tokenizer?)"
            )
        if not self.spec.compression and self.compression.normalizer != "identity":
            raise ConfigError("compression: the spec has compression=false but the map is not the identity")
        if self.spec.pad_id >= self.compression.vocab_size:
            raise ConfigError(
                f"pad_id: {self.spec.pad_id} is outside the tokenizer vocabulary [0, {self.compression.vocab_size})"
            )
        if self._multipliers is not None:
            recomputed = self._compute_multipliers()
            if not np.array_equal(np.asarray(self._multipliers, dtype=np.int64), recomputed):
                raise HashSpecMismatch(
                    "stored hash multipliers differ from the ones NumPy's default_rng recomputes "
                    f"here (numpy {np.__version__}); refusing to rehash silently. Stored: "
                    f"{np.asarray(self._multipliers).tolist()}, recomputed: {recomputed.tolist()}"
                )

    # ---- derived quantities -------------------------------------------------------------
    def _compute_multipliers(self) -> np.ndarray:
        v = self.compression.compressed_vocab_size
        return np.stack(
            [layer_multipliers(v, self.spec.max_ngram_size, lid, self.spec.seed) for lid in self.spec.layer_ids]
        )

    @cached_property
    def multipliers(self) -> np.ndarray:
        return self._compute_multipliers()

    @cached_property
    def primes(self) -> np.ndarray:
        plan = prime_plan(self.spec.layer_ids, self.spec.engram_vocab_size, self.spec.n_head_per_ngram)
        return np.asarray(plan, dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        flat = self.primes.reshape(len(self.spec.layer_ids), -1)
        off = np.cumsum(flat, axis=1) - flat
        return off.reshape(self.primes.shape)

    @cached_property
    def table_rows(self) -> np.ndarray:
        return self.primes.reshape(len(self.spec.layer_ids), -1).sum(axis=1)

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.spec.layer_ids

    @property
    def num_layers(self) -> int:
        return len(self.spec.layer_ids)

    @property
    def heads_per_layer(self) -> int:
        return self.spec.heads_per_layer

    @property
    def compressed_pad_id(self) -> int:
        return int(self.compression.lookup[self.spec.pad_id])

    def layer_index(self, layer_id: int) -> int:
        try:
            return self.spec.layer_ids.index(int(layer_id))
        except ValueError:
            raise ConfigError(
                f"layer_id: {layer_id} is not an Engram layer; Engram layers are {list(self.spec.layer_ids)}"
            ) from None

    # ---- by layer id (callers never do index arithmetic) ---------------------------------
    def rows_of(self, layer_id: int) -> int:
        """R_l: rows of layer ``layer_id``'s table (the sum of its head sizes)."""
        return int(self.table_rows[self.layer_index(layer_id)])

    def head_sizes(self, layer_id: int) -> list[int]:
        """Rows of each hash head of layer ``layer_id``, order-major then head-minor (its primes)."""
        return [int(p) for p in self.primes[self.layer_index(layer_id)].reshape(-1)]

    def split(self, row_ids: torch.Tensor, layer_ids: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Stacked row ids [L, ...] (the hashers' output) -> ``{layer_id: row_ids[...]}`` (views, no copy).

        ``layer_ids`` picks a subset (default: every Engram layer)."""
        if row_ids.shape[0] != self.num_layers:
            raise ValueError(
                f"row_ids: leading dim must be the {self.num_layers} Engram layers, got {row_ids.shape[0]}"
            )
        wanted = self.layer_ids if layer_ids is None else tuple(layer_ids)
        return {int(lid): row_ids[self.layer_index(lid)] for lid in wanted}

    # ---- fingerprint --------------------------------------------------------------------
    def fingerprint_payload(self) -> dict[str, Any]:
        """Everything that decides which row an n-gram maps to (boundary mode and id dtype do not)."""
        return {
            "algorithm": HASH_ALGORITHM,
            "compression_digest": self.compression.digest(),
            "compressed_vocab_size": self.compression.compressed_vocab_size,
            "compressed_pad_id": self.compressed_pad_id,
            "max_ngram_size": self.spec.max_ngram_size,
            "n_head_per_ngram": self.spec.n_head_per_ngram,
            "layer_ids": list(self.spec.layer_ids),
            "multipliers": self.multipliers.tolist(),
            "primes": self.primes.tolist(),
        }

    @cached_property
    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def check_fingerprint(self, other: str, what: str = "table") -> None:
        if other != self.fingerprint:
            raise HashSpecMismatch(
                f"{what} was written under hash-spec fingerprint {other[:16]}..., but the current "
                f"hash layout has {self.fingerprint[:16]}...: its rows belong to different n-grams. "
                "Load it with the compression map, layer ids, seed and table sizes it was trained with."
            )

    # ---- description --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: per layer, multipliers and table sizes per order per head."""
        layers = {}
        for i, lid in enumerate(self.spec.layer_ids):
            layers[str(lid)] = {
                "multipliers": self.multipliers[i].tolist(),
                "table_sizes": self.primes[i].tolist(),
                "rows": int(self.table_rows[i]),
            }
        return {
            "fingerprint": self.fingerprint,
            "compressed_vocab_size": self.compression.compressed_vocab_size,
            "vocab_size": self.compression.vocab_size,
            "layers": layers,
        }


def make_layout(spec: HashSpec, compression: CompressionMap, multipliers: Sequence | None = None) -> HashLayout:
    """Bind a spec to a compression map; pass stored ``multipliers`` to have them re-verified."""
    mult = None if multipliers is None else np.asarray(multipliers, dtype=np.int64)
    return HashLayout(spec, compression, mult)
