"""Compiled CPU kernel for the batch hasher (Numba), bit-exact with the int64 reference.

Why a kernel: the reference does one 64-bit division per (position, head) and several full-array
passes per head; this kernel makes one pass over raw ids, compresses, tracks each sequence's window
start (document resets, DEAD tokens), shares the lookback gather across layers and replaces the
division by a float64 reciprocal estimate corrected in exact int64 arithmetic. The mix is < 2^63
and every prime is >= 2^11, so the estimated quotient is off by at most one and one correction
step in each direction gives the exact non-negative remainder.

It uses Numba's ``workqueue`` threading layer unless the user chose another: its idle workers
sleep instead of spinning, so they do not steal the cores from torch's OpenMP pool (and the
kernel path itself runs no torch op, so torch's spinning workers are not woken either).
"""

from __future__ import annotations

import os

import numpy as np

try:  # Numba is a declared dependency; the torch path is the fallback (and the GPU path).
    import numba
    from numba import njit, prange

    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

MIN_PRIME_FOR_KERNEL = 1 << 11


def _hash_rows(ids, lookup, doc_start, dead, mult, primes, offs, inv, pad, out):  # pragma: no cover - jitted
    """ids [B, T] raw; doc_start/dead uint8 [B, T] (all-zero when unused); out [L, B, T, H_e]."""
    n_batch, n_time = ids.shape
    n_layers, n_max = mult.shape
    heads = primes.shape[2]
    for b in prange(n_batch):
        xs = np.empty(n_max, np.int64)
        hist = np.empty(n_time, np.int64)
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
                    fmix = np.float64(mix)
                    base = (k - 1) * heads
                    for h in range(heads):
                        p = primes[layer, k - 1, h]
                        r = mix - np.int64(fmix * inv[layer, k - 1, h]) * p
                        if r < 0:
                            r += p
                        if r >= p:
                            r -= p
                        out[layer, b, t, base + h] = r + offs[layer, k - 1, h]
    return out


if HAVE_NUMBA:
    hash_rows = njit(parallel=True, cache=True, boundscheck=False, nogil=True)(_hash_rows)
else:  # pragma: no cover
    hash_rows = None
