"""Compiled CPU kernel for the batch hasher (Numba), bit-exact with the int64 reference.

Why a kernel: the reference does one 64-bit division per (position, head) and several full-array
passes per head; this kernel makes one pass, shares the lookback gather across layers and replaces
the division by a float64 reciprocal estimate corrected in exact int64 arithmetic. Since the mix
is < 2^63 and every prime is >= 2^11, the estimate's quotient is off by at most one, so one
correction step in each direction gives the exact non-negative remainder.
"""

from __future__ import annotations

import numpy as np

try:  # Numba is a declared dependency; the torch path is the fallback (and the GPU path).
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

MIN_PRIME_FOR_KERNEL = 1 << 11


def _hash_rows(x, window_start, mult, primes, offs, inv, pad, out):  # pragma: no cover - jitted
    n_batch, n_time = x.shape
    n_layers, n_max = mult.shape
    heads = primes.shape[2]
    for b in prange(n_batch):
        xs = np.empty(n_max, np.int64)
        for t in range(n_time):
            s = window_start[b, t]
            for k in range(n_max):
                xs[k] = x[b, t - k] if t - k >= s else pad
            for layer in range(n_layers):
                mix = xs[0] * mult[layer, 0]
                for k in range(1, n_max):
                    mix ^= xs[k] * mult[layer, k]
                    fmix = np.float64(mix)
                    for h in range(heads):
                        p = primes[layer, k - 1, h]
                        r = mix - np.int64(fmix * inv[layer, k - 1, h]) * p
                        if r < 0:
                            r += p
                        if r >= p:
                            r -= p
                        out[layer, b, t, (k - 1) * heads + h] = r + offs[layer, k - 1, h]
    return out


if HAVE_NUMBA:
    hash_rows = njit(parallel=True, cache=True, boundscheck=False, nogil=True)(_hash_rows)
else:  # pragma: no cover
    hash_rows = None
