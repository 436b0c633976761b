"""Per-layer odd hash multipliers (spec §4.1), drawn from NumPy's seeded PCG64 generator."""

from __future__ import annotations

import numpy as np

INT64_MAX = 2**63 - 1


def half_bound(compressed_vocab_size: int) -> int:
    """max(1, ((2^63 - 1) // V') // 2): keeps every product x' * m below 2^63."""
    return max(1, (INT64_MAX // int(compressed_vocab_size)) // 2)


def layer_multipliers(compressed_vocab_size: int, max_ngram_size: int, layer_id: int, seed: int = 0) -> np.ndarray:
    """Multipliers m_{l,k} for lookback k = 0..N-1: one ``integers`` call with N draws, then 2r+1."""
    rng = np.random.default_rng(int(seed) + 10007 * int(layer_id))
    r = rng.integers(low=0, high=half_bound(compressed_vocab_size), size=int(max_ngram_size), dtype=np.int64)
    return r * 2 + 1
