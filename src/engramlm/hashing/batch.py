"""Vectorized batch hasher: token ids [B, T] -> offset-applied row ids [L, B, T, H_e].

One definition (spec §4), two back ends: a compiled CPU kernel (Numba) and a pure torch path
that runs on any device. Both are tested bit-exact against the NumPy int64 reference. All
Engram layers are hashed in one call, so it can run in the data loader or once per step before
block 0 (spec §4.6, §10.2).
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

from engramlm.errors import ConfigError
from engramlm.hashing import _kernels
from engramlm.hashing.spec import HashLayout

Backend = Literal["auto", "kernel", "torch"]


def default_threads() -> int:
    """Threads for the CPU kernel: ``NUMBA_NUM_THREADS`` if set, else the cores this process may use.

    Not ``numba.get_num_threads()``: that launches Numba's OpenMP threading layer, which resets
    torch's intra-op thread count (``torch.set_num_threads(1)`` silently became 2, and two training
    jobs on two cores then ran 4-5x slower). The kernel uses its own plain threads, so it never needs
    that layer.
    """
    env = os.environ.get("NUMBA_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _aligned_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary (the kernel's vector stores need 32)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def window_starts(
    doc_start: torch.Tensor | None, dead: torch.Tensor | None, shape: tuple[int, int], device
) -> torch.Tensor:
    """First position each position's lookback may read, [B, T] int64 (spec §4.2, §11.4).

    ``doc_start`` (bool [B, T]) restarts the window at a document start (``reset`` mode).
    ``dead`` (bool [B, T]) is the V4.1 DEAD rule: a lookback never reaches a DEAD position
    before t, nor anything older; the DEAD position itself still reads its own id at k = 0.
    """
    b, t = shape
    idx = torch.arange(t, device=device).expand(b, t)
    start = torch.zeros(b, t, dtype=torch.long, device=device)
    if doc_start is not None:
        start = torch.cummax(torch.where(doc_start.bool(), idx, 0), dim=1).values
    if dead is not None:
        after_dead = torch.where(dead.bool(), idx + 1, 0)
        after_dead = torch.cummax(after_dead, dim=1).values
        shifted = torch.zeros_like(after_dead)
        shifted[:, 1:] = after_dead[:, :-1]  # only DEAD positions strictly before t count
        start = torch.maximum(start, shifted)
    return start


class NgramHasher:
    """Hashes all Engram layers of a :class:`HashLayout` at once.

    ``hasher(ids, doc_start=None, dead=None, head_local=False)`` returns row ids of shape
    [L, B, T, H_e] in the spec's ``row_id_dtype``, ordered order-major then head-minor.
    Ids are offset-applied (``o <= r < o + p``) unless ``head_local=True``.
    ``doc_start`` is honoured only in ``boundary_mode="reset"``; ``dead`` always.

    ``threads`` caps the CPU kernel's threads (None: :func:`default_threads`, all usable cores by
    default); they are plain threads sharing work through a counter (see ``_kernels.run_tasks``).
    Inputs under ``MIN_TOKENS_PER_THREAD`` tokens per thread use fewer threads, because waking a
    helper costs more than it saves there.
    """

    MIN_TOKENS_PER_THREAD = 8192
    # Outputs at least this large are written with non-temporal stores (see ``_kernels._tile8_typing``):
    # above the per-core L2 the output is not read back from cache anyway.
    STREAMING_BYTES = 4 << 20

    def __init__(self, layout: HashLayout, backend: Backend = "auto", threads: int | None = None) -> None:
        if backend not in ("auto", "kernel", "torch"):
            raise ConfigError(f"backend: must be 'auto', 'kernel' or 'torch', got {backend!r}")
        if backend == "kernel" and not _kernels.HAVE_NUMBA:
            raise ConfigError("backend: 'kernel' needs numba, which is not importable here")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(f"threads: must be None or an int >= 1, got {threads!r}")
        self.layout = layout
        self.backend = backend
        self.threads = threads
        n_layers = layout.primes.shape[0]
        self.out_dtype = torch.int32 if layout.spec.row_id_dtype == "int32" else torch.int64
        out_np = np.int32 if self.out_dtype == torch.int32 else np.int64
        self._np = {
            "mult": np.ascontiguousarray(layout.multipliers),
            "primes": np.ascontiguousarray(layout.primes),
            "offs": np.ascontiguousarray(layout.offsets),
        }
        lo, hi = int(layout.primes.min()), int(layout.primes.max())
        self._kernel_ok = (
            _kernels.HAVE_NUMBA and _kernels.MIN_PRIME_FOR_KERNEL <= lo and hi < _kernels.MAX_PRIME_FOR_KERNEL
        )
        if self._kernel_ok:  # [L, 3, H_e]: per output column p, 1/p (rounded down), 2^42 mod p
            cf = _kernels.modulo_constants(layout.primes.reshape(n_layers, -1))
            self._np["cf"] = np.ascontiguousarray(np.moveaxis(cf, -1, 1))
            self._np["offs_out"] = np.ascontiguousarray(layout.offsets.reshape(n_layers, -1).astype(out_np))
        self._lookup = np.ascontiguousarray(layout.compression.lookup, dtype=np.int64)
        self._torch_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _consts(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._torch_cache:
            self._torch_cache[device] = {
                k: torch.from_numpy(self._np[k]).to(device) for k in ("mult", "primes", "offs")
            }
        return self._torch_cache[device]

    def __call__(
        self,
        ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        *,
        head_local: bool = False,
    ) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, T], got shape {tuple(ids.shape)}")
        for name, mask in (("doc_start", doc_start), ("dead", dead)):
            if mask is not None and mask.shape != ids.shape:
                raise ValueError(f"{name} must have the shape of ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if self.layout.spec.boundary_mode != "reset":
            doc_start = None
        use_kernel = self.backend == "kernel" or (self.backend == "auto" and ids.device.type == "cpu")
        if use_kernel and self._kernel_ok:
            out = self._hash_kernel(ids, doc_start, dead)
        else:
            x = self.layout.compression.compress(ids)
            out = self._hash_torch(x, window_starts(doc_start, dead, tuple(x.shape), x.device))
        if head_local:
            off = self._consts(out.device)["offs"].reshape(out.shape[0], 1, 1, -1)
            out = out - off.to(out.dtype)
        return out

    def _hash_kernel(
        self, ids: torch.Tensor, doc_start: torch.Tensor | None, dead: torch.Tensor | None
    ) -> torch.Tensor:
        """CPU path: NumPy in, NumPy out; no torch kernels run (see ``_kernels``).

        The kernel checks the id range while it compresses; the min/max for the error message
        is only computed when it reports an out-of-range id.
        """
        c = self._np
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        raw = ids.numpy()
        if raw.dtype not in (np.int32, np.int64):
            raw = raw.astype(np.int64)
        raw = np.ascontiguousarray(raw)
        b, t = raw.shape
        windowed = doc_start is not None or dead is not None
        if windowed:
            zeros = np.zeros((b, t), dtype=np.uint8)
            doc = zeros if doc_start is None else np.ascontiguousarray(doc_start.numpy(), dtype=np.uint8)
            dd = zeros if dead is None else np.ascontiguousarray(dead.numpy(), dtype=np.uint8)
        else:
            doc = dd = np.zeros((0, 0), dtype=np.uint8)
        dtype = np.int32 if self.out_dtype == torch.int32 else np.int64
        out = _aligned_empty((c["mult"].shape[0], b, t, self.layout.heads_per_layer), dtype)
        streaming = out.nbytes >= self.STREAMING_BYTES
        n_items = b * -(-t // _kernels.CHUNK)
        bad = np.zeros(n_items, dtype=np.uint8)
        threads = default_threads() if self.threads is None else self.threads
        threads = max(1, min(threads, b * t // self.MIN_TOKENS_PER_THREAD))
        per_task = max(1, n_items // (4 * threads))  # a few tasks per thread: late helpers can still help
        args = (raw, self._lookup, doc, dd, windowed, c["mult"], c["cf"], c["offs_out"],
                self.layout.compressed_pad_id, out, streaming, bad)  # fmt: skip

        def task(i: int) -> None:
            _kernels.hash_items(*args, i * per_task, (i + 1) * per_task)

        _kernels.run_tasks(task, -(-n_items // per_task), threads)
        if bad.any():
            self.layout.compression._check_range(int(raw.min()), int(raw.max()))
        return torch.from_numpy(out)

    def _hash_torch(self, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        c = self._consts(x.device)
        mult, primes, offs = c["mult"], c["primes"], c["offs"]
        n_layers, n_max = mult.shape
        b, t = x.shape
        pos = torch.arange(t, device=x.device)
        pad = self.layout.compressed_pad_id
        mix = torch.zeros((n_layers, b, t), dtype=torch.long, device=x.device)
        mixes = []
        for k in range(n_max):  # N <= 8 lookbacks: a loop over k, never over tokens
            shifted = torch.full_like(x, pad)
            shifted[:, k:] = x[:, : t - k]
            shifted = torch.where(pos - k >= starts, shifted, pad)
            mix = mix ^ (shifted[None] * mult[:, k, None, None])
            if k >= 1:
                mixes.append(mix)
        mu = torch.stack(mixes, dim=-1)  # [L, B, T, N-1]
        rows = torch.remainder(mu[..., None], primes[:, None, None]) + offs[:, None, None]
        return rows.reshape(n_layers, b, t, -1).to(self.out_dtype)
