"""A plain NumPy transcription of the reference hashing algorithm (the demo's structure).

Shift with padding, then multiply, XOR and modulo per head, one layer at a time. It exists as
the baseline the fast hashers are benchmarked against and as a cross-check in tests; it only
supports ``boundary_mode="none"`` without DEAD tokens, like the demo.
"""

from __future__ import annotations

import numpy as np


def reference_row_ids(
    compressed_ids: np.ndarray,
    multipliers: np.ndarray,
    primes: np.ndarray,
    offsets: np.ndarray,
    compressed_pad_id: int,
) -> np.ndarray:
    """Row ids [L, B, T, H_e] (offset-applied, int64) for compressed ids [B, T].

    ``multipliers`` is [L, N]; ``primes`` and ``offsets`` are [L, N-1, K].
    """
    x = np.asarray(compressed_ids, dtype=np.int64)
    _, t = x.shape
    n_layers, max_n = multipliers.shape
    out = []
    for layer in range(n_layers):
        shifted = [x]
        for k in range(1, max_n):
            padded = np.pad(x, ((0, 0), (k, 0)), constant_values=compressed_pad_id)
            shifted.append(padded[:, :t])
        heads = []
        mix = shifted[0] * multipliers[layer, 0]
        for n in range(2, max_n + 1):
            mix = np.bitwise_xor(mix, shifted[n - 1] * multipliers[layer, n - 1])
            for h in range(primes.shape[2]):
                heads.append(mix % primes[layer, n - 2, h] + offsets[layer, n - 2, h])
        out.append(np.stack(heads, axis=-1))
    return np.stack(out)
