"""Rotary position embeddings (RoPE), half-split (GPT-NeoX / Llama) convention."""

from __future__ import annotations

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + Dh/2]) by the angles whose cos/sin are given (broadcast to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE with a lazily grown cos/sin table per (device, dtype).

    The table is a plain cache, not a buffer, so ``model.to(bf16)`` cannot degrade the angles:
    they are always computed in fp32 and only cast when cached.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [>= length, Dh/2]; regrown (doubling) only when too short."""
        cached = self._cache.get((device, dtype))
        if cached is not None and cached[0].shape[0] >= length:
            return cached
        n = max(length, 2 * cached[0].shape[0] if cached is not None else length)
        idx = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (idx / self.head_dim))
        freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
        cached = (freqs.cos().to(dtype), freqs.sin().to(dtype))
        self._cache[(device, dtype)] = cached
        return cached

    def apply_rotary(self, x: torch.Tensor, positions: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Rotate x [B, H, T, Dh] by integer positions [T] or [B, T].

        ``max_len`` (an upper bound on positions) avoids reading ``positions.max()`` back from the
        device; callers that know it (full sequence, KV cache) should pass it.
        """
        if max_len is None:
            max_len = int(positions.max()) + 1
        cos, sin = self.tables(max_len, x.device, x.dtype)
        cos, sin = cos[positions], sin[positions]  # [T, Dh/2] or [B, T, Dh/2]
        if positions.dim() == 1:
            cos, sin = cos[None, None], sin[None, None]
        else:
            cos, sin = cos[:, None], sin[:, None]
        return rotate(x, cos, sin)

    forward = apply_rotary

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
