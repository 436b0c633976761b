"""Prepacked oneDNN weights for the CPU inference matmuls (``packed_inference()``).

Why: at decode batch sizes (1..8 rows) an fp32 ``F.linear`` on the CPU spends most of its time
re-laying the weight out into the GEMM's blocked format, on every call: measured at one thread,
a 512x1344 projection of 8 rows runs at ~10 GB/s of weight, about half of what one core streams
(18.5 GB/s). oneDNN's ``_reorder_linear_weight`` does that layout once; ``_linear_pointwise`` then
reads the packed copy (2-3x faster at 8 rows, ~1.2x at 256, the same maths to fp32 rounding).
One-row products (batch-1 decode) are matrix-vector products, where oneDNN has no fast path and
``F.linear`` reads the [out, in] weight at ~10 GB/s (cold cache, one thread): they read a transposed
[in, out] copy instead, which one GEMM streams at the ~18 GB/s the core's memory delivers (1.3-1.9x
for the wide projections and the LM head), except narrowing products such as ``down``, which read
oneDNN's layout tuned for one row; at a few rows the 24-wide mHC projections read the transposed copy
too (per-shape choice in :func:`_layout`). Several projections of the same input are packed
as ONE weight (q/k/v, gate/up): one call and one pass over the activations instead of three or two.

The packed copy lives in a side table keyed by the weights' storage, never in the state dict, so the
saved-weight format is unchanged and ``deepcopy``/``state_dict`` never see an opaque tensor. It is
rebuilt whenever a weight changes in place (its version counter moves: an optimiser step,
``load_state_dict``) and dropped when the weight is freed; it costs a second copy of the weights in
memory. The matmul is one opaque custom op (``engramlm::packed_linear``), so the compiled decode step
(:mod:`engramlm.infer.compiled`) calls the same kernel as eager inference. The path is opt-in (the
inference engine enters :func:`packed_inference`) and applies only to CPU fp32 activations with
gradients off; everywhere else the callers run their plain ``nn.Linear`` (training numerics untouched).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# Set by :func:`packed_inference`: a plain module global (not a context variable), because the traced
# decode step reads it too and torch.compile guards on a global's value; the engine runs its forwards
# on one thread.
_ACTIVE = False
# weights' storage pointers -> (version key, packed weight, bias); an entry goes when its first weight is freed
_CACHE: dict[tuple, tuple] = {}
# rows the packed layout is tuned for (any row count is correct; 8 is the decode batch the bench runs)
PACK_HINT_ROWS = 8


@contextmanager
def packed_inference(enabled: bool = True) -> Iterator[None]:
    """While active (and oneDNN is available), inference matmuls read prepacked weights.

    Entered by the engine around its forwards (eager and the compiled decode step alike)."""
    global _ACTIVE
    before = _ACTIVE
    _ACTIVE = enabled and _AVAILABLE
    try:
        yield
    finally:
        _ACTIVE = before


def packable(x: torch.Tensor) -> bool:
    """Whether the packed path applies to activations ``x`` here: CPU fp32, no gradients."""
    return _ACTIVE and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def _layout(rows: int, n_in: int, n_out: int) -> int:
    """The weight layout for ``rows`` activation rows against an [n_out, n_in] weight: 0 = the transposed
    [in, out] copy through one ``mm``; k > 0 = oneDNN's packed layout tuned for k rows.

    Measured at one thread with the weights cold (the benchmark's d = 512 projections, weights cycled
    through ~96 MB): one row streams fastest transposed (13-25 GB/s; q/k/v, gate/up, ``o_proj``, the
    Engram ``wkv``, the LM head and the 24-wide mHC projections), except a narrowing product such as
    ``down`` (1344 -> 512: 16.8 GB/s oneDNN tuned for one row, 11.3 GB/s transposed); from a few rows
    on oneDNN wins everywhere (12-15 GB/s against 7-8) except the narrow mHC projections (1.6x transposed).
    """
    if rows == 1:
        return 1 if n_in > n_out >= 256 else 0
    return 0 if rows <= 16 and n_out <= 64 else PACK_HINT_ROWS


def _version_key(params: list[torch.Tensor]) -> tuple:
    try:  # (torch.Size compares as a tuple; this runs ~50 times per decode step, so no per-tensor try)
        return tuple((p._version, p.dtype, p.shape) for p in params)
    except RuntimeError:  # an inference tensor has no version counter: its pointer must do
        return tuple((_version_or_minus_one(p), p.dtype, p.shape) for p in params)


def _version_or_minus_one(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:
        return -1


def _packed(weights: list[torch.Tensor], biases: list[torch.Tensor], layout: int) -> tuple:
    tensors = weights + biases if biases else weights
    ptrs = (layout, *[t.data_ptr() for t in tensors])
    key = _version_key(tensors)
    entry = _CACHE.get(ptrs)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            w = torch.cat(weights) if len(weights) > 1 else weights[0]
            w = w.detach().float().contiguous()
            b = (torch.cat(biases) if len(biases) > 1 else biases[0]).detach().float().contiguous() if biases else None
            if not layout:  # the weight transposed, [in, out] row-major: a plain GEMM streams it at full bandwidth
                entry = (key, w.t().contiguous().t(), b)  # kept as its [out, in] view: F.linear takes it as is
            else:
                entry = (key, torch.ops.mkldnn._reorder_linear_weight(w, layout), b)
        if ptrs not in _CACHE:
            weakref.finalize(weights[0], _CACHE.pop, ptrs, None)
        _CACHE[ptrs] = entry
    return entry


# The op is registered through the low-level ``torch.library.Library`` API rather than
# ``torch.library.custom_op``: the latter wraps every call in Python autograd/dispatch layers (~10 µs
# per call, measured at one thread), and a decode step makes ~50 of these calls. Inference only, so no
# autograd formula is needed (the callers take this path only with gradients off).
_LIB = torch.library.Library("engramlm", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor")


def _packed_linear_impl(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """``x @ cat(weights).T + cat(biases)`` on the cached packed weight (one opaque op for torch.compile)."""
    n_in = x.shape[-1]
    rows = x.numel() // n_in
    layout = _layout(rows, n_in, weights[0].shape[0] if len(weights) == 1 else sum(w.shape[0] for w in weights))
    _, w, b = _packed(weights, biases, layout)
    if not layout:  # w: an [out, in] view of the [in, out] copy, which addmm(b, x2d, copy) (mm without a bias) reads
        if 2 <= x.dim() <= 3 and x.is_contiguous():
            return F.linear(x, w, b)  # that very call, the reshapes included, in one C++ call (~1.5 µs less)
        return F.linear(x.reshape(rows, n_in), w, b).view(*x.shape[:-1], w.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


_LIB.impl("packed_linear", _packed_linear_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("engramlm::packed_linear", lib=_LIB)
def _(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


_packed_linear_op = torch.ops.engramlm.packed_linear.default


def packed_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """``cat([layer(x) for layer in layers], -1)`` through one prepacked weight (call when :func:`packable`).

    Layers must all have a bias or none (the projections fused here are built alike)."""
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if biases and len(biases) != len(layers):
        raise ValueError("packed_linear: the fused layers must all have a bias or none")
    weights = [layer.weight for layer in layers]
    if torch.compiler.is_compiling():  # the traced step calls the opaque op
        return _packed_linear_op(x, weights, biases)
    return _packed_linear_impl(x, weights, biases)  # eager: the same function, without the dispatcher (~4 µs a call)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``, through the packed weight when :func:`packable`."""
    return packed_linear(x, layer) if packable(x) else layer(x)
