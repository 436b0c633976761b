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
   over tokens; window handling is one select, and only when windows are in use) and its two
   limbs (top 21 bits, low 42 bits) as doubles;
2. per output column (order, head) a long, branch-free loop over the block's tokens computing
   ``mix mod p`` into a small int32 scratch ``[columns, BLOCK]`` (L1-resident);
3. the scratch is transposed into ``out[layer, b, t, column]`` (adding the head offsets) in 8 x 8
   tiles by :func:`_tile8`, an LLVM intrinsic: eight vector loads, the 24-shuffle transpose
   network, eight vector stores. The scalar transposing copy it replaced cost more than the
   modulo itself (~1.2 cycles per row id); column counts that are not a multiple of 8 use it still.

Scratch arrays are allocated once per call and indexed in 2-D: a NumPy view created inside a loop
costs two atomic reference-count updates in Numba (removing them saved ~15% on the V4.1 layout).
Indices Numba cannot prove non-negative (``base - k + i``) go through :func:`_idx_py`: a signed index
gets a wraparound test per access that keeps LLVM from vectorising the mix (measured 2.3x slower).

The modulo is division-free and exact in float64. With mix = a*2^42 + lo (a < 2^21, lo < 2^42,
mix < 2^63) and p < 2^30, s = a*(2^42 mod p) + lo is congruent to mix, every term is an exact
integer and s < 2^52 (one FMA per row id; three 21-bit limbs cost ~5% more on the V4.1 layout).
With ``inv`` the largest double <= 1/p, the quotient estimate q = floor(fl(s * inv)) is floor(s/p)
or one less (see :func:`exact_mod` for the proof), so r = s - q*p lies in [0, 2p) and one
unsigned-min step finishes: min(r, r - p) as uint32.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # Numba is a declared dependency; the torch path is the fallback (and the GPU path).
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

MAX_PRIME_FOR_KERNEL = 1 << 30
MIN_PRIME_FOR_KERNEL = 3
BLOCK = 128  # tokens per block: scratch + limbs stay in L1
CHUNK = 1024  # tokens per parallel work item
_JIT = {"boundscheck": False, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}


def modulo_constants(primes: np.ndarray) -> np.ndarray:
    """Per-prime float64 constants ``[..., 3]``: p, inv (largest double <= 1/p), 2^42 mod p.

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
    return np.stack([pf, inv, ((1 << 42) % p).astype(np.float64)], axis=-1)


def _limbs_py(mix):  # pragma: no cover - jitted, inlined
    """0 <= mix < 2^63 as two exact doubles: the top 21 bits and the low 42 bits.

    Each limb is OR-ed into the bits of 2^52 (an integer below 2^52 fills the mantissa exactly), read
    as a double and 2^52 subtracted: three vector ops, where AVX2's int64 -> double conversion is a
    long sequence (measured: the V4.1 call 10% faster)."""
    magic = np.int64(0x4330000000000000)
    a = np.int64((mix >> 42) | magic).view(np.float64) - 4503599627370496.0
    lo = np.int64((mix & np.int64((1 << 42) - 1)) | magic).view(np.float64) - 4503599627370496.0
    return a, lo


def _idx_py(i):  # pragma: no cover - jitted, inlined
    """An array index as unsigned, for indices like ``base + i`` that Numba cannot prove non-negative.

    A signed index gets a negative-index wraparound (sign test, add) on every access, which stops LLVM
    from vectorising the loop: the multiply-XOR mix ran 2.3x slower with it."""
    return np.uint64(i)


def _mod_limbs_py(a, lo, p, inv, m42):  # pragma: no cover - jitted, inlined
    """(a*2^42 + lo) mod p as int32, for the constants of :func:`modulo_constants`."""
    s = a * m42 + lo
    r = np.int32(s - np.floor(s * inv) * p)
    return np.int32(min(np.uint32(r), np.uint32(r - np.int32(p))))


def _exact_mod(mixes, cf, out):  # pragma: no cover - jitted
    for i in range(mixes.shape[0]):
        a, lo = _limbs(mixes[i])
        out[i] = _mod_limbs(a, lo, cf[i, 0], cf[i, 1], cf[i, 2])
    return out


def _transpose_add(tmp, offs, out, layer, b, t0, i0, i1, n_col):  # pragma: no cover - jitted, inlined
    """out[layer, b, t0 + i, j] = tmp[j, i] + offs[layer, j] for i0 <= i < i1 (the scalar transpose)."""
    for i in range(i0, i1):
        for j in range(n_col):
            out[layer, b, t0 + i, j] = tmp[j, i] + offs[layer, j]


# The 8 x 8 transpose as three rounds of two-input shuffles (the unpack / 64-bit / 128-bit-lane
# pattern): after them, vector i holds element i of each of the eight input rows, in row order.
_UNPACK = ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])
_PAIRS = ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
_HALVES = ([0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


def _tile8_typing(typingctx, src, s0, s_stride, dst, d0, d_stride, offs, o0, streaming):  # pragma: no cover
    """``dst[d0 + i*d_stride + j] = src[s0 + j*s_stride + i] + offs[o0 + j]`` for i, j in 0..7.

    ``streaming`` (a compile-time literal bool) selects non-temporal stores, which write around the
    cache: for outputs far larger than it they skip the read-for-ownership of every line (measured
    1.2-1.7x faster for the 6-8 MB benchmark outputs). They need each row 32-byte aligned, which
    the caller guarantees (aligned buffer, ``d_stride`` and ``d0`` multiples of 8 elements).

    src: 1-D C-contiguous int32; dst, offs: 1-D C-contiguous, both int32 or both int64 (the int32
    values are sign-extended). Indices are not checked: the caller keeps every tile in bounds.
    """
    ok = (
        isinstance(src, types.Array) and isinstance(dst, types.Array) and isinstance(offs, types.Array)
        and src.dtype == types.int32 and dst.dtype in (types.int32, types.int64) and offs.dtype == dst.dtype
        and all(a.ndim == 1 and a.layout == "C" for a in (src, dst, offs))
        and isinstance(streaming, types.BooleanLiteral)
    )  # fmt: skip
    if not ok:
        return None
    nontemporal = streaming.literal_value
    sig = types.void(src, s0, s_stride, dst, d0, d_stride, offs, o0, streaming)

    def codegen(context, builder, signature, args):
        src_v, s0_v, ss_v, dst_v, d0_v, ds_v, off_v, o0_v, _ = args
        arrays = [
            context.make_array(signature.args[k])(context, builder, v) for k, v in ((0, src_v), (3, dst_v), (6, off_v))
        ]
        src_data, dst_data, off_data = (a.data for a in arrays)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        width = signature.args[3].dtype.bitwidth
        v32, vout = ir.VectorType(i32, 8), ir.VectorType(ir.IntType(width), 8)

        def as_i64(v):
            return builder.sext(v, i64) if v.type.width < 64 else v

        s0_, ss_, d0_, ds_, o0_ = (as_i64(v) for v in (s0_v, ss_v, d0_v, ds_v, o0_v))

        def at(data, start, stride, k, vec):
            index = builder.add(start, builder.mul(stride, ir.Constant(i64, k)))
            return builder.bitcast(builder.gep(data, [index]), vec.as_pointer())

        def shuffle(x, y, mask):
            return builder.shuffle_vector(x, y, ir.Constant(v32, mask))

        r = [builder.load(at(src_data, s0_, ss_, k, v32), align=4) for k in range(8)]
        t = [shuffle(r[k - k % 2], r[k - k % 2 + 1], _UNPACK[k % 2]) for k in range(8)]
        u = [shuffle(t[g + h // 2], t[g + h // 2 + 2], _PAIRS[h % 2]) for g in (0, 4) for h in range(4)]
        cols = [shuffle(u[k % 4], u[k % 4 + 4], _HALVES[k // 4]) for k in range(8)]
        off = builder.load(at(off_data, o0_, ir.Constant(i64, 0), 0, vout), align=4)
        for i in range(8):
            v = cols[i] if width == 32 else builder.sext(cols[i], vout)
            st = builder.store(builder.add(v, off), at(dst_data, d0_, ds_, i, vout), align=32 if nontemporal else 4)
            if nontemporal:
                st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
        return context.get_dummy_value()

    return sig, codegen


def _hash_items(  # pragma: no cover - jitted
    ids, lookup, doc_start, dead, windowed, mult, cf, offs, pad, out, streaming, bad, lo, hi
):
    """Hash work items lo..hi-1; item = (row, chunk of CHUNK tokens), row-major.

    ids [B, T] raw; doc_start/dead uint8 [B, T] (read only when ``windowed``);
    cf [L, 3, H_e] (modulo_constants, column-major); offs [L, H_e] in out's dtype (C-contiguous);
    out [L, B, T, H_e] (C-contiguous); ``streaming``: write the tiles with non-temporal stores (only
    for a 32-byte aligned ``out``); bad [B * chunks] uint8 set to 1 where a chunk holds an id outside
    the lookup."""
    n_batch, n_time = ids.shape
    n_layers, n_max = mult.shape
    n_col = out.shape[3]
    n_ord = n_max - 1
    heads = n_col // n_ord
    vocab = lookup.shape[0]
    lead = n_max - 1  # leading slots: x[t - k] for the k tokens before the chunk (pad before t = 0)
    n_chunks = (n_time + CHUNK - 1) // CHUNK
    x = np.empty(CHUNK + lead, np.int64)
    st = np.zeros(CHUNK, np.int64)
    mix = np.empty(BLOCK, np.int64)
    la = np.empty((n_ord, BLOCK), np.float64)
    ll = np.empty((n_ord, BLOCK), np.float64)
    tmp = np.empty((n_col, BLOCK), np.int32)
    tmp_flat, out_flat, offs_flat = tmp.reshape(-1), out.reshape(-1), offs.reshape(-1)
    tiles = n_col % 8 == 0
    for item in range(lo, min(hi, n_batch * n_chunks)):
        b = item // n_chunks
        c0 = (item % n_chunks) * CHUNK
        c1 = min(c0 + CHUNK, n_time)
        m = c1 - c0
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
        for t0 in range(0, m, BLOCK):
            n = min(BLOCK, m - t0)
            base = t0 + lead
            for layer in range(n_layers):
                m0 = mult[layer, 0]
                for i in range(n):
                    mix[i] = x[_u(base + i)] * m0
                for k in range(1, n_max):
                    mk = mult[layer, k]
                    if windowed:
                        for i in range(n):
                            v = x[_u(base - k + i)] if t0 + i - k >= st[_u(t0 + i)] else pad
                            mix[i] ^= v * mk
                    else:
                        for i in range(n):
                            mix[i] ^= x[_u(base - k + i)] * mk
                    for i in range(n):
                        la[k - 1, i], ll[k - 1, i] = _limbs(mix[i])
                o = 0
                for j in range(n_col):
                    if j == (o + 1) * heads:  # no integer division in this loop: it runs per block
                        o += 1
                    p = cf[layer, 0, j]
                    inv = cf[layer, 1, j]
                    m42 = cf[layer, 2, j]
                    for i in range(n):
                        tmp[j, i] = _mod_limbs(la[o, i], ll[o, i], p, inv, m42)
                tt = c0 + t0
                n8 = n - n % 8 if tiles else 0
                row0 = ((layer * n_batch + b) * n_time + tt) * n_col
                for i0 in range(0, n8, 8):
                    for j0 in range(0, n_col, 8):
                        s0, d0, o0 = j0 * BLOCK + i0, row0 + i0 * n_col + j0, layer * n_col + j0
                        if streaming:
                            _tile8(tmp_flat, s0, BLOCK, out_flat, d0, n_col, offs_flat, o0, True)
                        else:
                            _tile8(tmp_flat, s0, BLOCK, out_flat, d0, n_col, offs_flat, o0, False)
                _tr(tmp, offs, out, layer, b, tt, n8, n, n_col)
    return out


if HAVE_NUMBA:
    _limbs = njit(inline="always", **_JIT)(_limbs_py)
    _u = njit(inline="always", **_JIT)(_idx_py)
    _mod_limbs = njit(inline="always", **_JIT)(_mod_limbs_py)
    _tr = njit(inline="always", **_JIT)(_transpose_add)
    _tile8 = intrinsic(_tile8_typing)
    exact_mod_kernel = njit(cache=True, **_JIT)(_exact_mod)
    hash_items = njit(cache=True, **_JIT)(_hash_items)
else:  # pragma: no cover
    hash_items = exact_mod_kernel = None


def exact_mod(mixes: np.ndarray, primes: np.ndarray) -> np.ndarray:
    """``mixes % primes`` (elementwise, int32) through the kernel's modulo; for tests.

    Exactness, for 0 <= mix < 2^63 and 3 <= p < 2^30 (p prime, so 1/p is not a double):
    a < 2^21, 2^42 mod p < 2^30 and lo < 2^42, so s < 2^51 + 2^42 is computed exactly
    (with or without FMA). Let v = s * inv (real) and m = floor(s/p). Since inv < 1/p,
    v <= s/p <= m + 1 - 1/p; rounding moves v by at most half an ulp < v * 2^-53 < 1/p, so
    fl(v) < m + 1 and q <= m. Since inv >= (1/p)(1 - 2^-52), v >= s/p - 2/p and fl(v) >=
    s/p - 3/p >= m - 1 for p >= 3, so q >= m - 1. Hence r = s - q*p, an exact integer, is in
    [0, 2p) (< 2^31, so the int32 conversion is exact) and min(r, r - p) taken as uint32
    (r - p wraps above 2^31 when negative) is r mod p.
    """
    mixes = np.ascontiguousarray(mixes, dtype=np.int64).reshape(-1)
    cf = np.ascontiguousarray(modulo_constants(np.broadcast_to(primes, mixes.shape)).reshape(-1, 3))
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
