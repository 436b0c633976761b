"""The decode state ``generate()`` keeps for an Engram model, and the padding layout it can hold.

:class:`EngramCache` is a HF ``Cache`` around one :class:`~engramlm.models.decode.DecodeCache`: attention
keys/values, each Engram layer's ShortConv history and the streaming hasher's last N-1 compressed ids, i.e. the
n-gram history lives in the cache (as ``qwen4_exp`` keeps its last n-1 ids as a conv state). The decode cache
holds right-padded rows (each row continues after its own last real token); HF batches are left-padded, so
:func:`runs` / :func:`compact` / :func:`expand` move each row's one run of real tokens to the front and the
logits back to the caller's columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

from engramlm.models.decode import DecodeCache
from engramlm.nn.attention import KVCache

if TYPE_CHECKING:
    from engramlm.models.model import EngramLM

__all__ = ["EngramCache", "compact", "expand", "runs"]


# ------------------------------------------------------------------------------------ padding


def runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first real column, real tokens) per row of a 2-D 0/1 mask whose ones form one run per row."""
    m = mask.to(torch.bool)
    t = m.shape[1]
    n = m.sum(1)
    if bool((n == 0).any()):
        raise ValueError("attention_mask: a row has no real token (all zeros)")
    first = m.to(torch.int32).argmax(1)  # the first maximum: where the run starts
    idx = torch.arange(t, device=m.device)
    run = (idx >= first[:, None]) & (idx < (first + n)[:, None])
    if not bool(torch.equal(run, m)):
        raise ValueError(
            "attention_mask: each row's ones must form one run (left or right padding); padding between "
            "real tokens is not supported"
        )
    return first, n


def compact(ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens moved to the front (right padding); the tail repeats real tokens (ignored)."""
    t = ids.shape[1]
    idx = (first[:, None] + torch.arange(t, device=ids.device)).clamp(max=t - 1)
    return ids.gather(1, idx)


def expand(logits: torch.Tensor, first: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Compacted logits [B, T, V] back at the caller's columns; zeros at padding."""
    b, t, v = logits.shape
    src = torch.arange(t, device=logits.device) - first[:, None].to(logits.device)
    valid = (src >= 0) & (src < n[:, None].to(logits.device))
    out = logits.gather(1, src.clamp(0, t - 1)[..., None].expand(b, t, v))
    return out.masked_fill(~valid[..., None], 0.0)


# ------------------------------------------------------------------------------------ the cache


class EngramCache(Cache):
    """A HF ``Cache`` holding an engramlm :class:`DecodeCache` (KV, ShortConv state, streaming hasher).

    Made empty (``EngramCache()``, or by ``generate()`` sized for its ``max_length``); the first forward
    that gets it sizes the decode state for its batch. It grows (copying the keys/values) when a sequence
    outgrows ``max_len``. ``get_seq_length()`` counts the columns of the caller's sequence consumed so far,
    padding included, which is what HF's generation loop slices new tokens by.
    """

    def __init__(self, max_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.max_len = max_len
        self.decode: DecodeCache | None = None
        self.columns = 0

    def __repr__(self) -> str:
        b = None if self.decode is None else self.decode.batch_size
        return f"EngramCache(batch={b}, columns={self.columns}, max_len={self.max_len})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows on demand

    @property
    def batch_size(self) -> int:
        return -1 if self.decode is None else self.decode.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.decode is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        self.decode, self.columns = None, 0

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"EngramCache: {what} is not supported (the streaming n-gram hasher and the ShortConv state cannot be "
            "rewound or reordered); use greedy or sampling without beams or an assistant"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def state(self, model: EngramLM, batch_size: int, new_tokens: int) -> DecodeCache:
        """The decode state for ``batch_size`` sequences, made or grown so ``new_tokens`` more fit."""
        if self.decode is None:
            self.decode = DecodeCache(model, batch_size, max(self.max_len or 0, new_tokens))
        elif self.decode.batch_size != batch_size:
            raise ValueError(f"cache: made for batch {self.decode.batch_size}, got input_ids of batch {batch_size}")
        need = int(self.decode.pos.max()) + new_tokens
        if need > self.decode.max_len:
            self._grow(max(need, 2 * self.decode.max_len))
        return self.decode

    def _grow(self, max_len: int) -> None:
        dc = self.decode
        for i, old in dc.kv.items():
            b, n_kv, _, hd = old.k.shape
            new = KVCache(b, n_kv, max_len, hd, device=old.k.device, dtype=old.k.dtype)
            new.k[:, :, : old.max_len] = old.k
            new.v[:, :, : old.max_len] = old.v
            new.lengths.copy_(old.lengths)
            new.bound = old.bound
            dc.kv[i] = new
        dc.max_len = self.max_len = max_len
