"""Compiled CPU kernel for the batch hasher (Numba), bit-exact with the int64 reference.

Why a kernel: the reference does one 64-bit division per (position, head) and several full-array
passes per head; this kernel reads the raw ids once, compresses them (with the range check),
handles windows (document resets, DEAD tokens) and hashes every layer.

Layout of the work, chosen so that LLVM vectorises the hot loops (AVX2 has no 64-bit multiply or
int64<->double conversion, so the shape of the loops decides the speed):

0. work items are (batch row, chunk of ``CHUNK`` tokens); :func:`run_tasks` hands groups of them
   to plain threads (the kernel releases the GIL) through a shared counter, and the caller only
   waits for groups that were actually started: a helper thread that the OS has not scheduled
   yet (the machine is shared) never holds up a call, as it would at an OpenMP barrier;
1. per block of ``BLOCK`` tokens and per layer, the multiply-XOR mix of every order (a short loop
   over tokens; window handling is one select, and only when windows are in use) and its three
   21-bit limbs as doubles;
2. per output column (order, head) a long, branch-free loop over the block's tokens computing
   ``mix mod p`` into a small int32 scratch ``[columns, BLOCK]`` (L1-resident);
3. a transposing copy of the scratch into ``out[layer, b, t, column]`` adding the head offsets,
   with the column count a compile-time constant for the common layouts.

The modulo is division-free and exact in float64. With mix = a*2^42 + c*2^21 + d (21-bit limbs,
mix < 2^63) and p < 2^30, s = a*(2^42 mod p) + c*(2^21 mod p) + d is congruent to mix, every
term is an exact integer and s < 2^53. With ``inv`` the largest double <= 1/p, the quotient
estimate q = floor(fl(s * inv)) is floor(s/p) or one less (see :func:`exact_mod` for the proof),
so r = s - q*p lies in [0, 2p) and one unsigned-min step finishes: min(r, r - p) as uint32.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # Numba is a declared dependency; the torch path is the fallback (and the GPU path).
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

MAX_PRIME_FOR_KERNEL = 1 << 30
MIN_PRIME_FOR_KERNEL = 3
BLOCK = 128  # tokens per block: scratch + limbs stay in L1
CHUNK = 1024  # tokens per parallel work item
_JIT = {"boundscheck": False, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}


def modulo_constants(primes: np.ndarray) -> np.ndarray:
    """Per-prime float64 constants ``[..., 4]``: p, inv (largest double <= 1/p), 2^21 mod p, 2^42 mod p.

    ``inv`` is rounded down exactly (checked with integer arithmetic on the double's mantissa),
    which makes the quotient estimate one-sided.
    """
    p = np.asarray(primes, dtype=np.int64)
    if p.size and (int(p.min()) < MIN_PRIME_FOR_KERNEL or int(p.max()) >= MAX_PRIME_FOR_KERNEL):
        raise ValueError(f"primes must lie in [{MIN_PRIME_FOR_KERNEL}, 2^30) for the kernel")
    pf = p.astype(np.float64)
    inv = 1.0 / pf
    flat_inv, flat_p = inv.reshape(-1), p.reshape(-1)
    for i in range(flat_inv.size):
        mant, exp = np.frexp(flat_inv[i])  # inv = mant * 2^exp, mant * 2^53 an integer
        m = int(mant * 2.0**53)
        e = int(exp) - 53
        # inv > 1/p  <=>  m * 2^e * p > 1  <=>  m * p > 2^-e   (e < 0 here)
        if m * int(flat_p[i]) > (1 << -e):
            flat_inv[i] = np.nextafter(flat_inv[i], 0.0)
    inv = flat_inv.reshape(inv.shape)
    return np.stack([pf, inv, ((1 << 21) % p).astype(np.float64), ((1 << 42) % p).astype(np.float64)], axis=-1)


def _limbs_py(mix):  # pragma: no cover - jitted, inlined
    """The three 21-bit limbs of 0 <= mix < 2^63 as doubles (exact: each < 2^21)."""
    mask21 = np.int64((1 << 21) - 1)
    a = np.float64(np.int32(mix >> 42))
    c = np.float64(np.int32((mix >> 21) & mask21))
    d = np.float64(np.int32(mix & mask21))
    return a, c, d


def _mod_limbs_py(a, c, d, p, inv, m21, m42):  # pragma: no cover - jitted, inlined
    """(a*2^42 + c*2^21 + d) mod p as int32, for the constants of :func:`modulo_constants`."""
    s = a * m42 + c * m21 + d
    r = np.int32(s - np.floor(s * inv) * p)
    return np.int32(min(np.uint32(r), np.uint32(r - np.int32(p))))


def _exact_mod(mixes, cf, out):  # pragma: no cover - jitted
    for i in range(mixes.shape[0]):
        a, c, d = _limbs(mixes[i])
        out[i] = _mod_limbs(a, c, d, cf[i, 0], cf[i, 1], cf[i, 2], cf[i, 3])
    return out


def _transpose_add(tmp, ol, ob, t0, n, n_col):  # pragma: no cover - jitted, inlined
    """ob[t0 + i, j] = tmp[j, i] + ol[j]; inlined with a literal n_col so the j loop unrolls."""
    for i in range(n):
        for j in range(n_col):
            ob[t0 + i, j] = tmp[j, i] + ol[j]


def _hash_items(ids, lookup, doc_start, dead, windowed, mult, cf, offs, pad, out, bad, lo, hi):  # pragma: no cover
    """Hash work items lo..hi-1; item = (row, chunk of CHUNK tokens), row-major.

    ids [B, T] raw; doc_start/dead uint8 [B, T] (read only when ``windowed``);
    cf [L, 4, H_e] (modulo_constants, column-major); offs [L, H_e] in out's dtype;
    out [L, B, T, H_e]; bad [B * chunks] uint8 set to 1 where a chunk holds an id outside the lookup."""
    n_batch, n_time = ids.shape
    n_layers, n_max = mult.shape
    n_col = out.shape[3]
    n_ord = n_max - 1
    heads = n_col // n_ord
    vocab = lookup.shape[0]
    lead = n_max - 1  # leading slots: x[t - k] for the k tokens before the chunk (pad before t = 0)
    n_chunks = (n_time + CHUNK - 1) // CHUNK
    for item in range(lo, min(hi, n_batch * n_chunks)):
        b = item // n_chunks
        c0 = (item % n_chunks) * CHUNK
        c1 = min(c0 + CHUNK, n_time)
        m = c1 - c0
        x = np.empty(m + lead, np.int64)
        chunk_bad = False
        for u in range(m + lead):
            t = c0 - lead + u
            if t < 0:
                x[u] = pad
                continue
            v = ids[b, t]
            if v < 0 or v >= vocab:
                chunk_bad = True
                v = 0
            x[u] = lookup[v]
        if chunk_bad:
            bad[item] = 1
            continue
        st = np.zeros(m if windowed else 0, np.int64)
        if windowed:
            start = 0
            for u in range(c0, 0, -1):  # latest window start at or before c0
                if doc_start[b, u] or dead[b, u - 1]:
                    start = u
                    break
            for t in range(c0, c1):
                if doc_start[b, t]:
                    start = t
                if t > 0 and dead[b, t - 1]:
                    start = t
                st[t - c0] = start - c0  # relative to the chunk, may be negative
        mix = np.empty(BLOCK, np.int64)
        la = np.empty((n_ord, BLOCK), np.float64)
        lc = np.empty((n_ord, BLOCK), np.float64)
        ld = np.empty((n_ord, BLOCK), np.float64)
        tmp = np.empty((n_col, BLOCK), np.int32)
        ob = out[:, b]
        for t0 in range(0, m, BLOCK):
            n = min(BLOCK, m - t0)
            xb = x[t0 + lead : t0 + lead + n]
            for layer in range(n_layers):
                m0 = mult[layer, 0]
                for i in range(n):
                    mix[i] = xb[i] * m0
                for k in range(1, n_max):
                    mk = mult[layer, k]
                    xk = x[t0 + lead - k : t0 + lead - k + n]
                    if windowed:
                        sb = st[t0 : t0 + n]
                        for i in range(n):
                            v = xk[i] if t0 + i - k >= sb[i] else pad
                            mix[i] ^= v * mk
                    else:
                        for i in range(n):
                            mix[i] ^= xk[i] * mk
                    a_, c_, d_ = la[k - 1], lc[k - 1], ld[k - 1]
                    for i in range(n):
                        a_[i], c_[i], d_[i] = _limbs(mix[i])
                for j in range(n_col):
                    o = j // heads
                    p = cf[layer, 0, j]
                    inv = cf[layer, 1, j]
                    m21 = cf[layer, 2, j]
                    m42 = cf[layer, 3, j]
                    a_, c_, d_ = la[o], lc[o], ld[o]
                    tj = tmp[j]
                    for i in range(n):
                        tj[i] = _mod_limbs(a_[i], c_[i], d_[i], p, inv, m21, m42)
                ol = offs[layer]
                obl = ob[layer]
                tt = c0 + t0
                if n_col == 8:
                    _tr(tmp, ol, obl, tt, n, 8)
                elif n_col == 16:
                    _tr(tmp, ol, obl, tt, n, 16)
                elif n_col == 24:
                    _tr(tmp, ol, obl, tt, n, 24)
                elif n_col == 32:
                    _tr(tmp, ol, obl, tt, n, 32)
                else:
                    _tr(tmp, ol, obl, tt, n, n_col)
    return out


if HAVE_NUMBA:
    _limbs = njit(inline="always", **_JIT)(_limbs_py)
    _mod_limbs = njit(inline="always", **_JIT)(_mod_limbs_py)
    _tr = njit(inline="always", **_JIT)(_transpose_add)
    exact_mod_kernel = njit(cache=True, **_JIT)(_exact_mod)
    hash_items = njit(cache=True, **_JIT)(_hash_items)
else:  # pragma: no cover
    hash_items = exact_mod_kernel = None


def exact_mod(mixes: np.ndarray, primes: np.ndarray) -> np.ndarray:
    """``mixes % primes`` (elementwise, int32) through the kernel's modulo; for tests.

    Exactness, for 0 <= mix < 2^63 and 3 <= p < 2^30 (p prime, so 1/p is not a double):
    the limbs are < 2^21 and the constants < 2^30, so s < 2^52 + 2^21 is computed exactly
    (with or without FMA). Let v = s * inv (real) and m = floor(s/p). Since inv < 1/p,
    v <= s/p <= m + 1 - 1/p; rounding moves v by at most half an ulp < v * 2^-53 < 1/p, so
    fl(v) < m + 1 and q <= m. Since inv >= (1/p)(1 - 2^-52), v >= s/p - 2/p and fl(v) >=
    s/p - 3/p >= m - 1 for p >= 3, so q >= m - 1. Hence r = s - q*p, an exact integer, is in
    [0, 2p) (< 2^31, so the int32 conversion is exact) and min(r, r - p) taken as uint32
    (r - p wraps above 2^31 when negative) is r mod p.
    """
    mixes = np.ascontiguousarray(mixes, dtype=np.int64).reshape(-1)
    cf = np.ascontiguousarray(modulo_constants(np.broadcast_to(primes, mixes.shape)).reshape(-1, 4))
    if mixes.size and (int(mixes.min()) < 0):
        raise ValueError("mixes must be non-negative (the spec's mix is < 2^63)")
    return exact_mod_kernel(mixes, cf, np.empty(mixes.shape, np.int32))


_POOL: dict[str, object] = {"pool": None, "size": 0, "pid": None}
_POOL_LOCK = threading.Lock()


def _helpers(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``n`` helper threads (recreated after a fork)."""
    with _POOL_LOCK:
        pool = _POOL["pool"]
        if pool is None or _POOL["size"] < n or _POOL["pid"] != os.getpid():
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="engramlm-hash")
            _POOL.update(pool=pool, size=n, pid=os.getpid())
        return pool  # type: ignore[return-value]


def run_tasks(task: Callable[[int], None], n_tasks: int, threads: int) -> None:
    """Run ``task(0..n_tasks-1)`` on the calling thread plus up to ``threads - 1`` helpers.

    Tasks are claimed from a shared counter; the call returns once every claimed task is done,
    so helpers that start late find nothing left and cost nothing. The first error is re-raised.
    """
    if threads <= 1 or n_tasks <= 1:
        for i in range(n_tasks):
            task(i)
        return
    counter = itertools.count()  # next() is atomic under the GIL
    lock = threading.Lock()
    finished = threading.Event()
    state = {"done": 0}
    errors: list[BaseException] = []

    def worker() -> None:
        while (i := next(counter)) < n_tasks:
            try:
                task(i)
            except BaseException as exc:  # re-raised on the calling thread
                errors.append(exc)
            with lock:
                state["done"] += 1
                if state["done"] == n_tasks:
                    finished.set()

    pool = _helpers(threads - 1)
    for _ in range(threads - 1):
        pool.submit(worker)
    worker()
    finished.wait()
    if errors:
        raise errors[0]
