"""Decode state of an :class:`~engramlm.models.model.EngramLM`: everything a chunk of new tokens needs
from the tokens before it, so prefill + one-token steps give the logits of one full forward.

Per sequence: attention keys/values (one :class:`KVCache` per layer), the ShortConv history of every
Engram layer (:class:`ConvState`), the streaming hasher's last N-1 compressed ids, the committed
length and the current lookback-window start (document reset, DEAD rule). :meth:`DecodeCache.begin`
computes a chunk's row ids and windows from the tokens alone and returns them as the step's
:class:`~engramlm.models.interface.EngramInputs`, so a caller can start fetching rows from an external
store before the forward; the caller runs ``model(chunk, engram=step.engram, kv=cache.kv)`` and then
:meth:`DecodeCache.commit` advances lengths and windows (:meth:`DecodeCache.run` does all three).
The model never imports this module: the cache owns the decode state, the forward only reads it.
Chunks may be right-padded (``lengths`` real tokens per row).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from engramlm.hashing.streaming import StreamingHasher
from engramlm.models.interface import EngramInputs, LMOutput
from engramlm.nn.attention import KVCache
from engramlm.nn.engram import ConvState


@dataclass
class DecodeStep:
    """One chunk's precomputed inputs: made by :meth:`DecodeCache.begin`, read by the forward, then
    handed to :meth:`DecodeCache.commit`."""

    row_ids: torch.Tensor | None  # [L, B, T, H_e] offset-applied, on CPU (None: no Engram layers)
    window_start: torch.Tensor  # [B, T] first readable position, relative to the chunk start (may be < 0)
    lengths: torch.Tensor  # [B] real tokens per row (right padding after them)
    next_start: torch.Tensor  # [B] absolute window start for the token after the chunk
    full: bool  # every row uses all T tokens
    engram: EngramInputs | None  # the forward's Engram inputs (None: no Engram layers)


class DecodeCache:
    """Per-sequence decode state for ``batch_size`` sequences of at most ``max_len`` tokens of ``model``
    (an :class:`~engramlm.models.model.EngramLM`)."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        ref = next(model.parameters())
        self.device = torch.device(device) if device is not None else ref.device
        dtype = dtype or ref.dtype
        self.batch_size, self.max_len = batch_size, max_len
        self.kv: dict[int, KVCache] = {
            blk.index: blk.attn.new_cache(batch_size, max_len, device=self.device, dtype=dtype) for blk in model.layers
        }
        self.conv: dict[int, ConvState] = {
            i: e.conv.new_state(batch_size, self.device) for i, e in model.engram_layers.items() if e.conv is not None
        }
        self.layout = model.layout
        self.hasher = model.hasher
        self.stream = StreamingHasher(self.layout, batch_size) if self.layout is not None else None
        self.reset_mode = self.layout is not None and self.layout.spec.boundary_mode == "reset"
        self.pos = torch.zeros(batch_size, dtype=torch.long)  # committed tokens per sequence (host)
        self.start = torch.zeros(batch_size, dtype=torch.long)  # window start of the next token (absolute)
        # Engram layers the forward skips; fixed by the first chunk: a skipped layer's ShortConv history
        # does not advance, so switching a layer on or off mid-sequence would convolve over stale values.
        self.skip_engram: frozenset[int] | None = None

    @property
    def fresh(self) -> bool:
        return not bool(self.pos.any())

    def begin(
        self,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        skip_engram: bool | Collection[int] = False,
    ) -> DecodeStep:
        """Row ids and windows of the chunk ``input_ids`` [B, T]; advances the streaming hasher.

        Call once per chunk, run the forward with ``engram=step.engram, kv=cache.kv``, then
        :meth:`commit`. A fresh cache hashes the chunk in one batched call; a one-token step uses the
        O(1) streaming hasher. ``skip_engram`` (True or layer ids) is fixed by the first chunk.
        """
        ids = input_ids.detach().to("cpu", torch.long)
        b, t = ids.shape
        if b != self.batch_size:
            raise ValueError(f"input_ids has batch {b}, the cache was made for {self.batch_size}")
        if t == 1 and doc_start is None and dead is None and lengths is None:
            return self._begin_token(ids, skip_engram)
        if t < 1:
            raise ValueError("a decode chunk needs at least one token")
        n = torch.full((b,), t, dtype=torch.long) if lengths is None else lengths.detach().to("cpu", torch.long)
        if n.shape != (b,) or int(n.min()) < 1 or int(n.max()) > t:
            raise ValueError(f"lengths must be [B] in [1, {t}], got {n.tolist()}")
        if int((self.pos + t).max()) > self.max_len:
            raise ValueError(f"decode cache overflow: {int(self.pos.max())} + {t} > max_len {self.max_len}")
        ds = doc_start.detach().to("cpu").bool() if doc_start is not None and self.reset_mode else None
        dd = dead.detach().to("cpu").bool() if dead is not None else None
        for name, mask in (("doc_start", ds), ("dead", dd)):
            if mask is not None and mask.shape != ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(ids.shape)}")
        # Window starts (spec §4.2, §11.4), continuing the carried start: -1 = no reset in the chunk yet.
        idx = torch.arange(t)
        local = torch.full((b, t), -1, dtype=torch.long)
        if ds is not None:
            local = torch.cummax(torch.where(ds, idx, -1), dim=1).values
        after = None
        if dd is not None:
            after = torch.cummax(torch.where(dd, idx + 1, -1), dim=1).values
            local = torch.maximum(local, torch.cat([torch.full((b, 1), -1), after[:, :-1]], dim=1))
        ws_abs = torch.where(local >= 0, self.pos[:, None] + local, self.start[:, None])
        last = (n - 1)[:, None]
        next_start = ws_abs.gather(1, last)[:, 0]
        if after is not None:
            a = after.gather(1, last)[:, 0]
            next_start = torch.where(a >= 0, torch.maximum(next_start, self.pos + a), next_start)
        skip = self._skip(skip_engram)
        full = bool((n == t).all())
        window = ws_abs - self.pos[:, None]
        row_ids, engram = None, None
        if self.layout is not None:
            row_ids = self._hash(ids, ds, dd, n, next_start)
            # No reset or DEAD token so far in any row: every tap reads a real position or the zeros
            # the conv history holds before the sequence start, so the windows mask nothing (skip the ops).
            unmasked = ds is None and dd is None and not bool(next_start.any())
            engram = EngramInputs(
                row_ids=self.layout.split(row_ids),
                window_start=None if unmasked else window,
                dead=dd,
                skip=skip,
                conv=self.conv,
                lengths=None if full else n,
            )
        return DecodeStep(row_ids, window, n, next_start, full, engram)

    def _begin_token(self, ids: torch.Tensor, skip_engram: bool | Collection[int]) -> DecodeStep:
        """:meth:`begin` for the decode step's common case, one token per row and no reset or DEAD mask:
        the window start carries over unchanged, so the general path's dozen small tensor ops reduce to one
        subtraction (same results; ``test_decode`` checks both paths against the full forward)."""
        if int(self.pos.max()) + 1 > self.max_len:
            raise ValueError(f"decode cache overflow: {int(self.pos.max())} + 1 > max_len {self.max_len}")
        skip = self._skip(skip_engram)
        next_start = self.start.clone()
        window = (next_start - self.pos)[:, None]
        row_ids, engram = None, None
        if self.layout is not None:
            row_ids = self.stream.step(ids[:, 0])[:, :, None]
            engram = EngramInputs(
                row_ids=self.layout.split(row_ids),
                window_start=window if bool(next_start.any()) else None,
                skip=skip,
                conv=self.conv,
            )
        return DecodeStep(row_ids, window, torch.ones(ids.shape[0], dtype=torch.long), next_start, True, engram)

    def _skip(self, skip_engram: bool | Collection[int]) -> frozenset[int]:
        if isinstance(skip_engram, bool):
            skip = frozenset(self.layout.layer_ids) if skip_engram and self.layout is not None else frozenset()
        else:
            skip = frozenset(int(i) for i in skip_engram)
        if self.skip_engram is None or self.fresh:
            self.skip_engram = skip
        elif self.skip_engram != skip:
            raise ValueError(
                f"skip_engram: this decode cache was started skipping layers {sorted(self.skip_engram)}, "
                f"got {sorted(skip)}; the skipped set must stay the same for a cached sequence"
            )
        return skip

    def _hash(
        self,
        ids: torch.Tensor,
        ds: torch.Tensor | None,
        dd: torch.Tensor | None,
        n: torch.Tensor,
        next_start: torch.Tensor,
    ) -> torch.Tensor:
        t = ids.shape[1]
        stream = self.stream

        def column(i: int) -> torch.Tensor:
            return stream.step(ids[:, i], None if ds is None else ds[:, i], None if dd is None else dd[:, i])

        if t == 1:
            return column(0)[:, :, None]
        if self.fresh:
            rows = self.hasher(ids, ds, dd)
        else:  # a multi-token chunk after history (rare: chunked prefill): one batched step per column
            rows = torch.stack([column(i) for i in range(t)], dim=2)
        # Streaming state after each row's last real token: its last N-1 compressed ids inside the window.
        keep = stream.state.shape[1]
        x = self.layout.compression.compress(ids)
        ext = torch.cat([stream.state.flip(1), x], dim=1)  # column j = position pos - keep + j
        k = torch.arange(keep)
        col = keep + n[:, None] - 1 - k  # [B, keep]
        position = self.pos[:, None] + n[:, None] - 1 - k
        stream.state = torch.where(position >= next_start[:, None], ext.gather(1, col), stream.pad)
        return rows

    def commit(self, step: DecodeStep) -> None:
        """Advance lengths and windows after the forward over ``step``'s chunk (the caller's job)."""
        self.pos += step.lengths
        self.start = step.next_start
        if not step.full:
            lengths = self.pos.to(self.device)
            for kv in self.kv.values():
                kv.set_lengths(lengths)

    # Per-sequence slots (continuous batching): a server keeps one cache of B slots, copies each new
    # request's prefilled state into a free slot, compacts retired slots away and steps the first n.

    def load_row(self, dst: int, src: DecodeCache, src_row: int) -> None:
        """Make slot ``dst`` a copy of sequence ``src_row`` of ``src`` (e.g. a request's own prefill cache):
        KV slots, conv history, hasher state, length and window start. ``src`` may be this cache."""
        if src.skip_engram is not None and self.skip_engram is not None and src.skip_engram != self.skip_engram:
            raise ValueError("load_row: the two caches skip different Engram layers")
        if self.skip_engram is None:
            self.skip_engram = src.skip_engram
        length = int(src.pos[src_row])
        for i, kv in self.kv.items():
            kv.copy_row(dst, src.kv[i], src_row, length)
        for i, conv in self.conv.items():
            conv.hist[dst] = src.conv[i].hist[src_row]
        if self.stream is not None:
            self.stream.state[dst] = src.stream.state[src_row]
        self.pos[dst] = length
        self.start[dst] = src.start[src_row]

    def head(self, n: int) -> DecodeCache:
        """The first ``n`` sequences as a cache for one step: KV storage, lengths and ``pos`` are shared
        (written in place), the conv history, hasher state and window starts are the view's own until
        :meth:`absorb` writes them back (the forward and the hasher replace those tensors)."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"head: n must lie in [1, {self.batch_size}], got {n}")
        view = object.__new__(DecodeCache)
        view.device, view.max_len, view.batch_size = self.device, self.max_len, n
        view.layout, view.hasher, view.reset_mode = self.layout, self.hasher, self.reset_mode
        bound = int(self.pos[:n].max())
        view.kv = {i: kv.head(n, bound) for i, kv in self.kv.items()}
        view.conv = {i: ConvState(c.hist[:n]) for i, c in self.conv.items()}
        view.stream = None
        if self.stream is not None:
            view.stream = copy.copy(self.stream)
            view.stream.state = self.stream.state[:n].clone()
        view.pos, view.start = self.pos[:n], self.start[:n].clone()
        view.skip_engram = self.skip_engram
        return view

    def absorb(self, view: DecodeCache) -> None:
        """Write back what a :meth:`head` view replaced during its step."""
        n = view.batch_size
        for i, c in view.conv.items():
            self.conv[i].hist[:n] = c.hist
        if self.stream is not None:
            self.stream.state[:n] = view.stream.state
        self.start[:n] = view.start

    def run(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        skip_engram: bool | Collection[int] = False,
    ) -> LMOutput:
        """Continue every sequence with the chunk ``input_ids``: :meth:`begin`, the forward, :meth:`commit`."""
        step = self.begin(input_ids, doc_start, dead, lengths, skip_engram=skip_engram)
        out = model(input_ids.to(self.device), engram=step.engram, kv=self.kv)
        self.commit(step)
        return out
