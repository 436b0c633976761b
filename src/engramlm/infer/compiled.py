"""Opt-in ``torch.compile`` of the one-token decode step (``Engine(model, compile=True)``).

Why: at small batch a decode step is ~70 small matmuls and a few hundred element-wise ops, so the
interpreter and per-op dispatch cost as much as the FLOPs; inductor fuses the element-wise work
into a few C++ loops and runs the step with one Python call. What keeps it to ONE graph for all
steps of a batch (no recompilation per step):

* the KV caches return their whole preallocated buffers inside the graph (the causal mask hides
  the unwritten slots), so no shape grows with the step, and the host-side ``bound`` is advanced
  here, after the call, not traced (:meth:`engramlm.nn.attention.KVCache.update`);
* hyper-connection Sinkhorn is one opaque custom op (``engramlm::sinkhorn``, the same Numba loop
  as eager), the static logits are recomputed in-graph instead of cached by version counters;
* MoE layers (their expert loop reads the routing back to the host) run eagerly between graphs.

What keeps a step cheap: each engine compiles its own copy of the step function (dynamo caches graphs
per code object, so two engines never check each other's guards); inside the graph the KV write is an
indexed ``index_put_`` that inductor does in place, and the one-query attention, the mHC mix and the
Engram gate are reductions inductor fuses rather than extern calls.

Loop-invariant checks are hoisted out of the step. The model's parameters and buffers are graph inputs
(read fresh on every call), and dynamo guards each of them on every step (~220 tensor guards: identity,
dtype, device, shape, strides), as inductor asserts their sizes and strides; yet nothing changes them
during a batch. The graphs are compiled without those guards and asserts (``guard_filter_fn``,
``size_asserts``; every guard on the step's own inputs stays: x, KV buffers, Engram inputs, conv
history, batch size) and :meth:`CompiledDecode.check_model` compares each parameter's and buffer's
identity and metadata with what the graphs were compiled for, once per batch (``Engine.stream`` calls it
before the first step): on any difference it drops the graphs (a fresh code object) and the next step
compiles anew. The model must therefore not be changed while a batch is being decoded.

The prefill (variable length) stays eager. Inductor needs a C++ compiler: without one, or on any
error while compiling, the engine warns once and decodes eagerly; the step it was running is
rolled back (KV lengths, conv history) and re-run eagerly, so the output is unaffected.
Compilation happens on the first decode step of each new batch size and takes seconds to
minutes on a CPU (reported as ``compile_seconds``).
"""

from __future__ import annotations

import shutil
import time
import types
import warnings
import weakref
from collections.abc import Mapping, Sequence

import torch

from engramlm.models.decode import DecodeCache
from engramlm.models.interface import EngramInputs
from engramlm.models.model import EngramLM


def _decode_logits(model: EngramLM, x: torch.Tensor, engram: EngramInputs | None, kv: Mapping) -> torch.Tensor:
    return model(x, engram=engram, kv=kv).logits


def _own_code(fn, tag: str):
    """``fn`` with a code object of its own (named ``<name>_<tag>``).

    Dynamo keeps its graphs and their guards on the code object, and a call checks the cached entries in
    turn: with one shared ``_decode_logits``, two engines (two models, or a model with and without Engram)
    put their graphs in one list, and every step of one engine first ran the other's whole guard set to a
    failure (~1 ms per step at batch 1 in ``bench_decode``). A code object per engine keeps each cache to
    its own model's graphs (one per batch size); nothing is skipped, every guard still runs."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _standard(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides (size-1 dims included): graphs guard on strides, and the conv
    history arrives as a view of the prefill, as a gather, or as inductor's (padded) output."""
    want, acc = [], 1
    for n in reversed(x.shape):
        want.append(acc)
        acc *= n
    if x.stride() == tuple(reversed(want)):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the host (``torch._inductor.config.cpp.cxx``), or None."""
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    for name in names:
        found = shutil.which(name) if name is not None else None
        if found:
            return found
    return None


def model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` by name (tied ones under each of their names)."""
    named = list(model.named_parameters(remove_duplicate=False))
    return named + [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]


def _meta(t: torch.Tensor) -> tuple:
    return (type(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad)


class ModelSignature:
    """What a compiled graph assumed of the model's tensors: per name, the tensor itself (weakly held) and
    its type, dtype, device, shape, strides and ``requires_grad``. :meth:`matches` is one pass of tuple
    compares (~0.5 ms for the benchmark's 216 tensors, once per batch instead of their guards on every step)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.names = tuple(n for n, _ in named)
        self.refs = tuple(weakref.ref(t) for _, t in named)
        self.meta = tuple(_meta(t) for _, t in named)

    def matches(self, named: Sequence[tuple[str, torch.Tensor]]) -> bool:
        if len(named) != len(self.names):
            return False
        for (name, t), want, ref, meta in zip(named, self.names, self.refs, self.meta, strict=True):
            if name != want or ref() is not t or _meta(t) != meta:
                return False
        return True


class CompiledDecode:
    """The compiled one-token step of ``model``; ``__call__`` returns the logits or None (run eagerly).

    ``compile_seconds`` sums the wall time of the calls that compiled a graph (first step per batch
    size), ``calls`` counts compiled steps, ``resets`` the times :meth:`check_model` found the model's
    tensors changed and dropped the graphs; after a failure ``error`` says why and every later call
    returns None.
    """

    def __init__(self, model: EngramLM) -> None:
        self.model = model
        self.error: str | None = None
        self.compile_seconds = 0.0
        self.calls = 0
        self.resets = 0
        self._reset()
        if model.training:
            self._fail("the model is in training mode")
        elif next(model.parameters()).device.type == "cpu" and cxx_compiler() is None:
            self._fail("no C++ compiler found (inductor needs one on the CPU)")

    def _reset(self) -> None:
        """Start over with a fresh code object (no graphs) compiled for the model's tensors as they are now."""
        self._seen: set[tuple] = set()
        named = model_tensors(self.model)
        self.signature = ModelSignature(named)
        own = {id(t) for _, t in named}

        def keep(entries: list) -> list[bool]:
            # drop the guards whose value is one of the model's own tensors (check_model checks those once
            # per batch); keep the rest: module structure, globals and every input of the step itself
            return [not (e.has_value and id(e.value) in own) for e in entries]

        step = _own_code(_decode_logits, f"{id(self):x}_{self.resets}")
        self.code = step.__code__  # where dynamo keeps this engine's graphs (one per batch size)
        # cpp_wrapper: the graph's wrapper in C++ rather than Python (~0.45 ms a step of wrapper code and ~210
        # reinterpret_tensor calls at batch 1; 1.6-5% less per step measured, for a longer cold compile)
        self._fn = torch.compile(
            step, dynamic=False, options={"guard_filter_fn": keep, "size_asserts": False, "cpp_wrapper": True}
        )

    def check_model(self) -> bool:
        """Whether the model's parameters and buffers are still the tensors (and layouts) the graphs were
        compiled for; if not, drop the graphs so that the next step compiles for the model as it is.

        Called once per batch (``Engine.stream``), never per step: the hoisted form of the per-step tensor
        guards the graphs are compiled without. Returns False when it dropped the graphs."""
        if self.signature.matches(model_tensors(self.model)):
            return True
        self.resets += 1
        self._reset()
        return False

    def _fail(self, why: str) -> None:
        self.error = why
        warnings.warn(f"Engine(compile=True): decoding eagerly: {why}", RuntimeWarning, stacklevel=3)

    def __call__(self, x: torch.Tensor, engram: EngramInputs | None, cache: DecodeCache) -> torch.Tensor | None:
        if self.error is not None:
            return None
        key = (tuple(x.shape), engram is None or engram.window_start is None, engram is None or engram.dead is None)
        first = key not in self._seen
        lengths = {i: kv.lengths.clone() for i, kv in cache.kv.items()}
        hist = {i: c.hist for i, c in cache.conv.items()}
        for c in cache.conv.values():
            c.hist = _standard(c.hist)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                logits = self._fn(self.model, x, engram, cache.kv)
        except Exception as exc:  # any compile failure means: fall back, once, loudly
            for i, kv in cache.kv.items():  # undo what a partly run step wrote, then the caller re-runs it
                kv.lengths.copy_(lengths[i])
            for i, c in cache.conv.items():
                c.hist = hist[i]
            self._fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return None
        if first:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - t0
        self.calls += 1
        bound = int(cache.pos.max()) + x.shape[1]  # the graph left KVCache.bound alone: advance it here
        for kv in cache.kv.values():
            kv.bound = max(kv.bound, bound)
        return logits
