"""SwiGLU feed-forward: the dense FFN and the per-expert function of the MoE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.nn.packed import packable, packed_linear


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj x) * up_proj x) (Shazeer 2020), as in Llama and DeepSeek."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packable(x):  # inference: gate and up from one prepacked matmul
            g, u = packed_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)
            return packed_linear(F.silu(g).mul_(u), self.down_proj)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
