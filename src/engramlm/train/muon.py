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
whole, identical update: the work is divided by the world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

# Quintic Newton-Schulz coefficients tuned for speed of convergence near singular values in [0, 1].
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Bumped whenever the update's numerics change (benchmarks/_arms.py keys cached arm results on it):
# 1 = per-parameter chains with separate elementwise ops; 2 = fused baddbmm, same-shape matrices batched.
MUON_NUMERICS_VERSION = 2
CPU_CHUNK_BYTES = 256 << 10


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of each matrix in ``g`` [..., m, n] (returned in fp32; singular values ~ 1).

    The iteration runs in ``dtype`` (fp32, or bf16 as the Muon reference does on accelerators).
    """
    shape = g.shape
    x = g.reshape(-1, shape[-2], shape[-1])
    per = _chunk(shape[-2], shape[-1], x.device)
    out = torch.cat([_newton_schulz(c, steps, dtype) for c in x.split(per)]) if x.shape[0] > per else None
    return (out if out is not None else _newton_schulz(x, steps, dtype)).reshape(shape)


def _chunk(rows: int, cols: int, device: torch.device) -> int:
    """Matrices per batched chain: all of them on an accelerator; on a CPU as many as keep one
    iterate within CPU_CHUNK_BYTES, so the chain's working set (~4 iterates) stays in the core's
    cache (measured: 140 matrices of 256 x 256 in one chain take 1.5x as long as one at a time)."""
    if device.type != "cpu":
        return 1 << 62
    return max(1, CPU_CHUNK_BYTES // (rows * cols * 4))


def _newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        xx = torch.bmm(x, x.mT)
        poly = torch.baddbmm(xx, xx, xx, beta=b, alpha=c)  # b XX^T + c (XX^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + poly X
    if transposed:
        x = x.mT
    return x.float()


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def orthogonalize_many(
    mats: Sequence[torch.Tensor],
    steps: int = 5,
    dtype: torch.dtype = torch.float32,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """:func:`orthogonalize` of every tensor in ``mats`` (each ``[..., m, n]``), same-shape matrices batched.

    With a ``group`` of N > 1 ranks this is a collective: every rank must call it with the same shapes
    (as data-parallel ranks do), orthogonalises ``ceil(K / N)`` of each batch of K same-shape matrices
    and receives the rest by ``all_gather``, so all ranks return the same tensors bitwise.
    """
    world, rank = _world(group)
    buckets: dict[tuple[int, int, torch.device], list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.shape[-2], m.shape[-1], m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(mats)
    for (rows, cols, _device), idx in buckets.items():
        stack = torch.cat([mats[i].reshape(-1, rows, cols) for i in idx]) if len(idx) > 1 else mats[idx[0]]
        stack = stack.reshape(-1, rows, cols)
        k = stack.shape[0]
        if world > 1:
            share = -(-k // world)
            mine = orthogonalize(stack[rank * share : (rank + 1) * share], steps, dtype)
            if mine.shape[0] < share:  # the last ranks' shares run short (or empty): pad for all_gather
                mine = torch.cat([mine, mine.new_zeros(share - mine.shape[0], rows, cols)])
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine.contiguous(), group=group)
            result = torch.cat(parts)[:k]
        else:
            result = orthogonalize(stack, steps, dtype)
        offset = 0
        for i in idx:
            n = mats[i].numel() // (rows * cols)
            out[i] = result[offset : offset + n].reshape(mats[i].shape)
            offset += n
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Nesterov momentum + Newton-Schulz orthogonalisation + decoupled weight decay (params ndim >= 2).

    ``ns_dtype`` is the iteration's dtype (``fp32`` | ``bf16``); ``process_group`` shares the
    Newton-Schulz work across data-parallel ranks (see the module doc); ``None`` for one process.
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
    ) -> None:
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {sorted(NS_DTYPES)}, got {ns_dtype!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps})
        self.nesterov, self.ns_dtype, self.process_group = nesterov, NS_DTYPES[ns_dtype], process_group
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon needs matrices (ndim >= 2), got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                params.append(p)
                grads.append(p.grad.add(buf, alpha=mom) if self.nesterov else buf)
            updates = orthogonalize_many(grads, group["ns_steps"], self.ns_dtype, self.process_group)
            for p, update in zip(params, updates, strict=True):
                scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return None
