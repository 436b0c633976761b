"""Compiled CPU kernel for the batch hasher (Numba), bit-exact with the int64 reference.

Why a kernel: the reference does one 64-bit division per (position, head) and several full-array
passes per head; this kernel makes one pass over raw ids, compresses, tracks each sequence's window
start (document resets, DEAD tokens) and shares the lookback gather across layers.

The modulo is division-free and exact in float64: split the mix (< 2^63) into 21-bit limbs
a, b, c, so mix = a*2^42 + b*2^21 + c and mix = a*(2^42 mod p) + b*(2^21 mod p) + c (mod p). With
p < 2^30 every term is < 2^51, the sum s < 2^53 is exact in a double, the quotient estimate
floor(s / p) is off by at most one, and s - q*p is exact; one correction each way gives the
non-negative remainder. The head loop is plain float arithmetic that LLVM vectorizes.
"""

from __future__ import annotations

import numpy as np

try:  # Numba is a declared dependency; the torch path is the fallback (and the GPU path).
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

MAX_PRIME_FOR_KERNEL = 1 << 30


def limb_constants(primes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-prime float64 constants of the division-free modulo: p, 1/p, 2^21 mod p, 2^42 mod p."""
    p = primes.astype(np.int64)
    return {
        "pf": p.astype(np.float64),
        "inv": 1.0 / p.astype(np.float64),
        "m21": ((1 << 21) % p).astype(np.float64),
        "m42": ((1 << 42) % p).astype(np.float64),
    }


def _hash_rows(ids, lookup, doc_start, dead, mult, pf, inv, m21, m42, offs, pad, out):  # pragma: no cover - jitted
    """ids [B, T] raw; doc_start/dead uint8 [B, T] (all-zero when unused); out [L, B, T, H_e]."""
    n_batch, n_time = ids.shape
    n_layers, n_max = mult.shape
    heads = pf.shape[2]
    mask21 = np.int64((1 << 21) - 1)
    for b in prange(n_batch):
        xs = np.empty(n_max, np.int64)
        hist = np.empty(n_time, np.int64)
        rem = np.empty(heads, np.float64)
        start = 0
        for t in range(n_time):
            if doc_start[b, t]:
                start = t
            if t > 0 and dead[b, t - 1] and start < t:
                start = t
            hist[t] = lookup[ids[b, t]]
            for k in range(n_max):
                xs[k] = hist[t - k] if t - k >= start else pad
            for layer in range(n_layers):
                mix = xs[0] * mult[layer, 0]
                for k in range(1, n_max):
                    mix ^= xs[k] * mult[layer, k]
                    hi = np.float64(mix >> 42)
                    mid = np.float64((mix >> 21) & mask21)
                    lo = np.float64(mix & mask21)
                    for h in range(heads):
                        p = pf[layer, k - 1, h]
                        s = hi * m42[layer, k - 1, h] + mid * m21[layer, k - 1, h] + lo
                        r = s - np.floor(s * inv[layer, k - 1, h]) * p
                        r = r + p if r < 0.0 else r
                        rem[h] = r - p if r >= p else r
                    base = (k - 1) * heads
                    for h in range(heads):
                        out[layer, b, t, base + h] = np.int64(rem[h]) + offs[layer, k - 1, h]
    return out


if HAVE_NUMBA:
    hash_rows = njit(parallel=True, cache=True, boundscheck=False, nogil=True, error_model="numpy")(_hash_rows)
else:  # pragma: no cover
    hash_rows = None
