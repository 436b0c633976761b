"""Muon: SGD-momentum whose update is orthogonalised by a Newton-Schulz iteration (Jordan et al. 2024).

Used for the backbone's weight matrices (attention, FFN, experts, Engram's fused projection),
never for embeddings or the LM head. The update is scaled by ``0.2 * sqrt(max(out, in))`` (Moonlight,
Liu et al. 2025) so its RMS matches AdamW's, which lets Muon share AdamW's learning rate and
decoupled weight decay: one ``lr`` for the whole backbone, as the paper's recipe assumes.

Cost: Newton-Schulz is ~3 matmuls of ``min(out, in)^2 * max(out, in)`` per iteration per matrix,
which on a small MoE is a large share of the step (every expert is a matrix). So a step does it
in as few, as large batched calls as possible: every matrix of the same shape, across parameters
and across the expert dimension of stacked ``[E, out, in]`` weights, goes through one batched
chain (:func:`orthogonalize_many`), each iteration two fused ``baddbmm`` and one ``bmm``. With a
``process_group`` (data parallel: every rank holds the same all-reduced gradients) each rank
orthogonalises a contiguous share of each same-shape batch and an all-gather gives every rank the
whole, identical update: the work is divided by the world size. On one process a step goes one
cache-sized chunk of same-shape matrices at a time through every stage (momentum, Nesterov input,
cast, iteration, weight decay, update added from the iterate as it is): bitwise the same as the
stage-by-stage path, without its model-sized intermediate tensors (profiled on the CPU MoE arm: the
Newton-Schulz GEMMs are then ~90% of Muon's time, at ~95% of the machine's bf16 ``bmm`` rate).

Schedules (``ns_schedule``): ``quintic`` repeats Jordan's fixed coefficients every iteration (the
default, 5 steps); ``polar_express`` uses a different odd quintic per iteration, each the minimax
approximation of 1 on the interval of singular values the previous ones leave (the greedy
construction of Amsel, Persson, Musco & Gower 2025, "The Polar Express", arXiv:2505.16932, which
they prove optimal for the composition). The coefficients are fitted here by a Remez exchange
(:func:`ns_coefficients`), not copied. Measured on real gradients of the bench MoE model
(benchmarks/bench_muon.py ``--quality``): 5 polar_express steps bring the update closer to the exact
polar factor U V^T than 5 quintic steps at the same cost; 3-4 steps are cheaper but farther, because
fewer steps cannot lift the smallest singular values (a quintic's slope at 0 bounds the lift per step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

# Quintic Newton-Schulz coefficients tuned for speed of convergence near singular values in [0, 1].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NS_SCHEDULES = ("quintic", "polar_express")
# polar_express: per number of steps, the smallest singular value (relative to the Frobenius norm the input
# is divided by) the schedule is fitted to bring near 1: fewer steps cannot lift as small a value, and aiming
# too low widens the band for all the others. Chosen to minimise the RMS distance of the singular values to 1
# on real gradients of the bench MoE model (training steps 1 and 4; benchmarks/bench_muon.py --quality reports
# steps 10 and 20 too); 1e-3 (Amsel et al.'s choice) for 6 steps and more. SAFETY: the relative headroom each
# polynomial keeps above its interval (rounding, bf16 above all, can leave a singular value slightly past
# the bound; Amsel et al. use 1%).
POLAR_EXPRESS_LOWER = {1: 0.1, 2: 0.03, 3: 0.01, 4: 4e-3, 5: 1.5e-3}
POLAR_EXPRESS_SAFETY = 0.01
# Bumped whenever the update's numerics change (benchmarks/_arms.py keys cached arm results on it):
# 1 = per-parameter chains with separate elementwise ops; 2 = fused baddbmm, same-shape matrices batched;
# 3 = per-iteration coefficient schedules (optim.muon_ns_schedule), results written in place, foreach momentum.
# (The one-process chunked step changed no bit of version 3's results: tests/test_muon.py asserts it.)
MUON_NUMERICS_VERSION = 3
CPU_CHUNK_BYTES = {torch.float32: 256 << 10, torch.bfloat16: 1 << 20}  # one iterate's bytes; see _chunk

Coeffs = tuple[tuple[float, float, float], ...]


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float, float]:
    """(a, b, c, err): the odd p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| on [lo, hi].

    Remez exchange: the optimum equioscillates at lo (p = 1 - err), its local max (1 + err), its local
    min (1 - err) and hi (1 + err); solve for the coefficients on the current points, move the inner
    two to the new extrema (the roots of p'), repeat until they stay put.
    """
    x = np.array([lo, lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, hi])
    sign = np.array([1.0, -1.0, 1.0, -1.0])
    for _ in range(200):
        a, b, c, err = np.linalg.solve(np.stack([x, x**3, x**5, sign], 1), np.ones(4))
        disc = 9 * b * b - 20 * a * c  # p'(x) = a + 3b x^2 + 5c x^4, a quadratic in x^2
        if disc <= 0 or c == 0:
            break
        y = np.sort([(-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)])
        if y[0] <= 0:
            break
        new = np.array([lo, math.sqrt(y[0]), math.sqrt(y[1]), hi])
        if not lo < new[1] < new[2] < hi:
            break
        done = np.allclose(new, x, rtol=1e-14, atol=0)
        x = new
        if done:
            break
    return float(a), float(b), float(c), float(abs(err))


@functools.lru_cache(maxsize=32)
def ns_coefficients(schedule: str = "quintic", steps: int = 5) -> Coeffs:
    """The (a, b, c) of each of ``steps`` iterations: X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    if schedule not in NS_SCHEDULES:
        raise ValueError(f"ns_schedule must be one of {NS_SCHEDULES}, got {schedule!r}")
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    if schedule == "quintic":
        return (NS_COEFFS,) * steps
    out, lo, hi = [], POLAR_EXPRESS_LOWER.get(steps, 1e-3), 1.0
    for _ in range(steps):
        a, b, c, _err = _minimax_quintic(lo, hi * (1 + POLAR_EXPRESS_SAFETY))
        grid = np.linspace(lo, hi, 20001)  # the image of [lo, hi]: the next polynomial's interval
        image = a * grid + b * grid**3 + c * grid**5
        out.append((a, b, c))
        lo, hi = float(image.min()), float(image.max())
    return tuple(out)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, schedule: str = "quintic"
) -> torch.Tensor:
    """Approximately U V^T of each matrix in ``g`` [..., m, n] (returned in fp32; singular values ~ 1).

    The iteration runs in ``dtype`` (fp32, or bf16 as the Muon reference does on accelerators).
    """
    shape = g.shape
    x = g.reshape(-1, shape[-2], shape[-1])
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _orthogonalize_into(x, out, ns_coefficients(schedule, steps), dtype)
    return out.reshape(shape)


def _orthogonalize_into(x: torch.Tensor, out: torch.Tensor, coeffs: Coeffs, dtype: torch.dtype) -> None:
    """``out`` [K, m, n] fp32 <- the orthogonalised ``x`` [K, m, n], in cache-sized chunks on a CPU."""
    per = _chunk(x.shape[-2], x.shape[-1], x.device, dtype)
    for src, dst in zip(x.split(per), out.split(per), strict=True):
        _iterate(src, coeffs, dtype, dst)


def _chunk(rows: int, cols: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Matrices per batched chain: all of them on an accelerator; on a CPU as many as keep one
    iterate within ``CPU_CHUNK_BYTES[dtype]``, so the chain's working set (~4 iterates) stays in the
    core's cache (measured, fp32: 140 matrices of 256 x 256 in one chain take 1.5x as long as one at a
    time; bf16: chains of 8 such matrices, 1 MiB, take 0.88x the time of chains of one, 16 take 1.0x)."""
    if device.type != "cpu":
        return 1 << 62
    return max(1, CPU_CHUNK_BYTES.get(dtype, CPU_CHUNK_BYTES[torch.float32]) // (rows * cols * dtype.itemsize))


def _iterate(g: torch.Tensor, coeffs: Coeffs, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The iteration on ``g`` [k, m, n]: the result [k, m, n] in ``dtype`` (a transposed view when m > n),
    or, given ``out`` (fp32, same shape), written there."""
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
        out = out.mT if out is not None else None
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    last = len(coeffs) - 1
    for i, (a, b, c) in enumerate(coeffs):
        xx = torch.bmm(x, x.mT)
        poly = torch.baddbmm(xx, xx, xx, beta=b, alpha=c)  # b XX^T + c (XX^T)^2
        if i == last and out is not None and dtype == torch.float32 and out.is_contiguous():
            x = torch.baddbmm(x, poly, x, beta=a, out=out)  # the last product lands in place
            return x.mT if transposed else x
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    if out is not None:
        x = out.copy_(x)
    return x.mT if transposed else x


def _pieces(sizes: Sequence[int], per: int) -> Iterator[list[tuple[int, int, int]]]:
    """Chunks of at most ``per`` matrices over tensors of ``sizes`` matrices each, as (tensor, start, stop)
    slices: a tensor of many matrices is cut into views, small tensors are grouped into one chunk."""
    chunk: list[tuple[int, int, int]] = []
    n = 0
    for i, k in enumerate(sizes):
        s = 0
        while s < k:
            take = min(per - n, k - s)
            chunk.append((i, s, s + take))
            n, s = n + take, s + take
            if n == per:
                yield chunk
                chunk, n = [], 0
    if chunk:
        yield chunk


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def orthogonalize_many(
    mats: Sequence[torch.Tensor],
    steps: int = 5,
    dtype: torch.dtype = torch.float32,
    group: dist.ProcessGroup | None = None,
    schedule: str = "quintic",
) -> list[torch.Tensor]:
    """:func:`orthogonalize` of every tensor in ``mats`` (each ``[..., m, n]``), same-shape matrices batched.

    With a ``group`` of N > 1 ranks this is a collective: every rank must call it with the same shapes
    (as data-parallel ranks do), orthogonalises ``ceil(K / N)`` of each batch of K same-shape matrices
    and receives the rest by ``all_gather``, so all ranks return the same tensors bitwise.
    On one process a bucket is only stacked (copied) when one chain takes more matrices than a single
    tensor holds (accelerators); on a CPU every chunk is a view of its own tensor and lands in its output.
    """
    coeffs = ns_coefficients(schedule, steps)
    world, rank = _world(group)
    buckets: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.shape[-2], m.shape[-1], m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (rows, cols, device), idx in buckets.items():
        views = [mats[i].reshape(-1, rows, cols) for i in idx]
        k = sum(v.shape[0] for v in views)
        if world == 1 and (len(idx) == 1 or _chunk(rows, cols, device, dtype) <= min(v.shape[0] for v in views)):
            for i, v in zip(idx, views, strict=True):
                res = torch.empty(v.shape, dtype=torch.float32, device=device)
                _orthogonalize_into(v, res, coeffs, dtype)
                out[i] = res.reshape(mats[i].shape)
            continue
        stack = torch.cat(views) if len(views) > 1 else views[0]
        if world > 1:
            share = -(-k // world)
            mine = torch.zeros(share, rows, cols, dtype=torch.float32, device=device)
            part = stack[rank * share : (rank + 1) * share]
            _orthogonalize_into(part, mine[: part.shape[0]], coeffs, dtype)  # short last shares stay zero-padded
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=group)
            result = torch.cat(parts)[:k]
        else:
            result = torch.empty(stack.shape, dtype=torch.float32, device=device)
            _orthogonalize_into(stack, result, coeffs, dtype)
        offset = 0
        for i, v in zip(idx, views, strict=True):
            out[i] = result[offset : offset + v.shape[0]].reshape(mats[i].shape)
            offset += v.shape[0]
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Nesterov momentum + Newton-Schulz orthogonalisation + decoupled weight decay (params ndim >= 2).

    ``ns_dtype`` is the iteration's dtype (``fp32`` | ``bf16``); ``ns_schedule`` its coefficients
    (``quintic`` | ``polar_express``, see the module doc); ``process_group`` shares the Newton-Schulz
    work across data-parallel ranks (see the module doc); ``None`` for one process.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        nesterov: bool = True,
        ns_dtype: str = "fp32",
        process_group: dist.ProcessGroup | None = None,
        ns_schedule: str = "quintic",
    ) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {sorted(NS_DTYPES)}, got {ns_dtype!r}")
        ns_coefficients(ns_schedule, ns_steps)  # validates both
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps})
        self.nesterov, self.ns_dtype, self.process_group = nesterov, NS_DTYPES[ns_dtype], process_group
        self.ns_schedule = ns_schedule
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon needs matrices (ndim >= 2), got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        world, _rank = _world(self.process_group)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
            contiguous = all(p.is_contiguous() and self.state[p]["momentum_buffer"].is_contiguous() for p in params)
            if world == 1 and contiguous:  # (the chunked step writes through views of the weights and buffers)
                self._step_chunked(group, params)
            else:
                self._step_whole(group, params)
        return None

    def _step_whole(self, group: dict, params: list[torch.Tensor]) -> None:
        """Each stage over every parameter in turn (foreach ops), the Newton-Schulz work shared by the ranks."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, grads)
        inputs = torch._foreach_add(grads, bufs, alpha=mom) if self.nesterov else bufs
        updates = orthogonalize_many(inputs, group["ns_steps"], self.ns_dtype, self.process_group, self.ns_schedule)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        for p, update in zip(params, updates, strict=True):
            p.add_(update.to(p.dtype), alpha=-lr * _scale(p))

    def _step_chunked(self, group: dict, params: list[torch.Tensor]) -> None:
        """One process: every stage (momentum, Nesterov input, cast, iteration, decay, update) on one
        cache-sized chunk of same-shape matrices at a time, the update added from the iterate as it is.

        The same operations in the same order per element as :meth:`_step_whole` (bitwise equal: a
        matrix's GEMMs do not depend on its batch, and adding a bf16 update to an fp32 weight computes in
        fp32 as adding its fp32 copy does, and writing the Nesterov input into a bf16 tensor rounds it as
        casting it does); what it saves is memory traffic (no model-sized Nesterov input, fp32 result or
        separate decay pass; the input is written in the iteration's dtype) and chains of one matrix where a
        shape has many.
        """
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        coeffs = ns_coefficients(self.ns_schedule, group["ns_steps"])
        buckets: dict[tuple[int, int, torch.device], list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.shape[-2], p.shape[-1], p.device), []).append(p)
        for (rows, cols, device), ps in buckets.items():
            flat = [(p.view(-1, rows, cols), p.grad.reshape(-1, rows, cols),
                     self.state[p]["momentum_buffer"].view(-1, rows, cols)) for p in ps]  # fmt: skip
            alpha = -lr * _scale(ps[0])
            for chunk in _pieces([f[0].shape[0] for f in flat], _chunk(rows, cols, device, self.ns_dtype)):
                # the chain's input, cast as it is written (no fp32 copy, no cat)
                x = torch.empty(sum(e - s for _, s, e in chunk), rows, cols, dtype=self.ns_dtype, device=device)
                at = 0
                for i, s, e in chunk:
                    _w, g, buf = (t[s:e] for t in flat[i])
                    buf.mul_(mom).add_(g)
                    if self.nesterov:
                        torch.add(g, buf, alpha=mom, out=x[at : at + e - s])
                    else:
                        x[at : at + e - s].copy_(buf)
                    at += e - s
                x = _iterate(x, coeffs, self.ns_dtype)
                at = 0
                for i, s, e in chunk:
                    w = flat[i][0][s:e]
                    if wd:
                        w.mul_(1 - lr * wd)
                    upd = x[at : at + e - s]
                    w.add_(upd if w.dtype in (upd.dtype, torch.float32) else upd.to(w.dtype), alpha=alpha)
                    at += e - s


def _scale(p: torch.Tensor) -> float:
    """Moonlight's update scale: RMS matched to AdamW's (see the module doc)."""
    return 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
