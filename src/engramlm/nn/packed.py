"""Prepacked oneDNN weights for the CPU inference matmuls (``packed_inference()``).

Why: at decode batch sizes (1..8 rows) an fp32 ``F.linear`` on the CPU spends most of its time
re-laying the weight out into the GEMM's blocked format, on every call: measured at one thread,
a 512x1344 projection of 8 rows runs at ~10 GB/s of weight, a quarter of the core's memory
bandwidth. oneDNN's ``_reorder_linear_weight`` does that layout once; ``_linear_pointwise`` then
reads the packed copy (2-3x faster at 8 rows, ~1.2x at 256, same maths to fp32 rounding). Several
projections of the same input are packed as ONE weight (q/k/v, gate/up): one call and one pass
over the activations instead of three or two.

The packed copy lives in a side table keyed by the module (weakly), never in the state dict, so the
saved-weight format is unchanged and ``deepcopy``/``state_dict`` never see an opaque tensor. It is
rebuilt whenever a weight is replaced or changed in place (its storage pointer or version counter
moves: an optimiser step, ``load_state_dict``, ``.to()``). It costs a second copy of the packed
weights in memory. The path is opt-in (the inference engine enters :func:`packed_inference`) and
applies only to CPU fp32 activations with gradients off, outside ``torch.compile``; everywhere else
the callers run their plain ``nn.Linear`` (training numerics untouched).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_ACTIVE: ContextVar[bool] = ContextVar("engramlm_packed_inference", default=False)
# module (the first of a fused group) -> {group key: (version key, packed weight, bias)}
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# rows the packed layout is tuned for (any row count is correct; 8 is the decode batch the bench runs)
PACK_HINT_ROWS = 8


@contextmanager
def packed_inference(enabled: bool = True) -> Iterator[None]:
    """While active (and oneDNN is available), inference matmuls read prepacked weights."""
    token = _ACTIVE.set(enabled and _AVAILABLE)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def packable(x: torch.Tensor) -> bool:
    """Whether the packed path applies to activations ``x`` here."""
    return (
        not torch.compiler.is_compiling()  # first: a traced step never reads the context variable
        and _ACTIVE.get()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def _version_key(params: list[torch.Tensor]) -> tuple:
    key = []
    for p in params:
        try:
            key.append((p.data_ptr(), p._version, p.dtype))
        except RuntimeError:  # an inference tensor has no version counter: its pointer must do
            key.append((p.data_ptr(), -1, p.dtype))
    return tuple(key)


def packed_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """``cat([layer(x) for layer in layers], -1)`` through one prepacked weight (call when :func:`packable`).

    Layers must all have a bias or none (the projections fused here are built alike)."""
    owner = layers[0]
    weights = [layer.weight for layer in layers]
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if biases and len(biases) != len(layers):
        raise ValueError("packed_linear: the fused layers must all have a bias or none")
    key = _version_key(weights + biases)
    group = _CACHE.setdefault(owner, {})
    gid = tuple(id(layer) for layer in layers)
    entry = group.get(gid)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            w = torch.cat(weights) if len(weights) > 1 else weights[0]
            w = w.detach().float().contiguous()
            b = (torch.cat(biases) if len(biases) > 1 else biases[0]).detach().float().contiguous() if biases else None
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT_ROWS), b)
        group[gid] = entry
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], entry[2], "none", [], "")


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``, through the packed weight when :func:`packable`."""
    return packed_linear(x, layer) if packable(x) else layer(x)
