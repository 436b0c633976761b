"""Causal multi-head / grouped-query attention with RoPE and a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.nn.packed import linear, packable, packed_linear
from engramlm.nn.rope import RotaryEmbedding


class KVCache:
    """Preallocated keys/values [B, n_kv, max_len, Dh] for one attention layer (inference only).

    ``lengths[b]`` counts the valid tokens of sequence b; new tokens are written at
    ``lengths[b] ..`` so sequences may have different lengths (e.g. a right-padded prefill followed
    by :meth:`set_lengths`). A host-side upper bound on the lengths avoids a device sync per step.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=self.k.device, dtype=torch.long)
        self.bound = 0  # >= lengths.max(), tracked on the host

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k, v [B, n_kv, T, Dh]; return cached k, v up to the bound and slots [B, T].

        Inside ``torch.compile`` (the compiled decode step, see :mod:`engramlm.infer.compiled`) it returns
        the whole buffers instead (the mask hides the unwritten slots) and leaves ``bound`` to the caller:
        a shape or a host int that changed every step would recompile the graph every step."""
        t = k.shape[2]
        if torch.compiler.is_compiling():
            # An indexed write (index_put_), not scatter_: inductor re-inplaces it into the input buffer,
            # whereas a functionalised scatter_ copied the whole cache twice per layer and step.
            slots = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
            rows = torch.arange(k.shape[0], device=self.lengths.device)[:, None]
            self.k[rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)  # [B, T, n_kv, Dh] at (b, :, slot)
            self.v[rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
            self.lengths += t
            return self.k, self.v, slots
        if self.bound + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.bound} + {t} > max_len {self.max_len}")
        slots = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        self.lengths += t
        self.bound += t
        return self.k[:, :, : self.bound], self.v[:, :, : self.bound], slots

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Trim sequences (never grow them): later tokens overwrite the slots past each length."""
        self.lengths.copy_(lengths)

    def reset(self) -> None:
        self.lengths.zero_()
        self.bound = 0

    def head(self, n: int, bound: int) -> KVCache:
        """The first ``n`` sequences as a cache sharing this one's storage (writes land here);
        ``bound`` (host) is an upper bound on their lengths, so a view over short sequences attends
        over ``bound`` slots only."""
        view = object.__new__(KVCache)
        view.k, view.v, view.lengths, view.bound = self.k[:n], self.v[:n], self.lengths[:n], bound
        return view

    def copy_row(self, dst: int, src: KVCache, src_row: int, length: int) -> None:
        """Make sequence ``dst`` a copy of ``src``'s sequence ``src_row`` (its first ``length`` slots)."""
        if length > self.max_len:
            raise ValueError(f"KV cache overflow: {length} > max_len {self.max_len}")
        self.k[dst, :, :length] = src.k[src_row, :, :length]
        self.v[dst, :, :length] = src.v[src_row, :, :length]
        self.lengths[dst] = length
        self.bound = max(self.bound, length)


class Attention(nn.Module):
    """Causal self-attention; GQA when n_kv_heads < n_heads. Projections: q/k/v/o_proj."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        hd = self.head_dim
        self.q_proj = nn.Linear(d_model, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(n_heads * hd, d_model, bias=bias)
        self.rope = RotaryEmbedding(hd, rope_theta)

    def new_cache(self, batch_size: int, max_len: int, *, device: torch.device, dtype: torch.dtype) -> KVCache:
        """A cache shaped for this layer."""
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, device=device, dtype=dtype)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_kv, L, Dh] -> [B, H, L, Dh], so SDPA sees plain MHA on any torch version."""
        rep = self.n_heads // self.n_kv_heads
        if rep == 1:
            return x
        b, n, length, d = x.shape
        return x[:, :, None].expand(b, n, rep, length, d).reshape(b, n * rep, length, d)

    def _one_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row over the cache, as product-sums inductor fuses into two loops
        (compiled decode step): at one query the SDPA kernel's setup costs more than the arithmetic.
        q [B, H, 1, Dh], k/v [B, n_kv, L, Dh], mask [B, 1, 1, L] -> [B, H, 1, Dh]."""
        b, h, _, dh = q.shape
        g = h // self.n_kv_heads
        qg = q.reshape(b, self.n_kv_heads, g, 1, dh) * dh**-0.5  # GQA: the query heads of one kv head together
        scores = (qg * k[:, :, None]).sum(-1)  # [B, n_kv, g, L]
        scores = scores.masked_fill(~mask[:, :, None, 0], float("-inf"))  # [B, 1, 1, L], over (n_kv, g)
        p = scores.softmax(-1)
        y = (p[..., None] * v[:, :, None]).sum(-2)  # [B, n_kv, g, Dh]
        return y.reshape(b, h, 1, dh)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. positions ([T] or [B, T]) only set the RoPE angles.

        Without a cache the mask is plain causal over the T tokens. With a cache the tokens are
        appended after each sequence's cached length and attend to every cached slot <= their own.
        """
        b, t, _ = x.shape
        if packable(x):  # inference: q, k, v from one prepacked matmul
            nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = packed_linear(x, self.q_proj, self.k_proj, self.v_proj).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_cache is None:
            max_len = t if positions is None else None
            if positions is None:
                positions = torch.arange(t, device=x.device)
            q = self.rope(q, positions, max_len)
            k = self.rope(k, positions, max_len)
            y = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True)
        else:
            slots = kv_cache.lengths[:, None] + torch.arange(t, device=x.device)
            max_len = kv_cache.max_len if positions is None else None
            if positions is None:
                positions = slots
            q = self.rope(q, positions, max_len)
            k = self.rope(k, positions, max_len)
            k_all, v_all, slots = kv_cache.update(k, v)
            keys = torch.arange(k_all.shape[2], device=x.device)
            mask = keys[None, None, None, :] <= slots[:, None, :, None]  # [B, 1, T, L]
            if t == 1 and torch.compiler.is_compiling():
                y = self._one_token(q, k_all, v_all, mask)
            else:
                y = F.scaled_dot_product_attention(q, self._repeat_kv(k_all), self._repeat_kv(v_all), attn_mask=mask)
        return linear(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), self.o_proj)
