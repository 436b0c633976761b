"""A plain, literal Engram module in the reference (demo) structure, for parity tests and benchmarks.

Separate value and key projections, a Python loop over branches, ``nn.Conv1d`` with symmetric
padding then truncation: the shape of the official demo's code, not its text. The production
:class:`~engramlm.nn.engram.EngramBlock` must match it to float tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.nn.engram import EngramBlock, signed_sqrt_gate


class ReferenceEngram(nn.Module):
    def __init__(self, block: EngramBlock) -> None:
        """Copy ``block``'s weights into the reference structure."""
        super().__init__()
        d, m = block.hidden_size, block.n_branches
        self.d, self.m, self.block_cfg = d, m, block
        self.embed = nn.Embedding.from_pretrained(block.embed.weight.detach().clone(), freeze=False)
        w = block.wkv.weight.detach()
        bias = block.wkv.bias.detach() if block.wkv.bias is not None else None
        self.key_projs = nn.ModuleList()
        for i in range(m):
            lin = nn.Linear(w.shape[1], d, bias=bias is not None)
            lin.weight.data.copy_(w[i * d : (i + 1) * d])
            if bias is not None:
                lin.bias.data.copy_(bias[i * d : (i + 1) * d])
            self.key_projs.append(lin)
        self.value_proj = nn.Linear(w.shape[1], d, bias=bias is not None)
        self.value_proj.weight.data.copy_(w[m * d :])
        if bias is not None:
            self.value_proj.bias.data.copy_(bias[m * d :])
        eps = block.gate_norm_eps
        self.norm_q = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in range(m))
        self.norm_k = nn.ModuleList(nn.RMSNorm(d, eps=eps) for _ in range(m))
        for i in range(m):
            self.norm_q[i].weight.data.copy_(block.q_weight.detach()[i])
            self.norm_k[i].weight.data.copy_(block.k_weight.detach()[i])
        self.conv = None
        if block.conv is not None:
            c = block.conv
            self.dilation, self.kernel = c.dilation, c.kernel_size
            self.conv_norms = nn.ModuleList(nn.RMSNorm(d, eps=c.norm_eps) for _ in range(m))
            for i in range(m):
                self.conv_norms[i].weight.data.copy_(c.norm_weight.detach()[i])
            pad = (c.kernel_size - 1) * c.dilation
            self.conv = nn.Conv1d(
                m * d, m * d, c.kernel_size, groups=m * d, bias=False, padding=pad, dilation=c.dilation
            )
            self.conv.weight.data.copy_(c.weight.detach())

    def forward(self, hidden: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        b, t, _, _ = hidden.shape
        e = self.embed(row_ids).reshape(b, t, -1)
        value = self.value_proj(e)
        gated = []
        for i in range(self.m):
            key = self.key_projs[i](e)
            score = (self.norm_q[i](hidden[:, :, i]) * self.norm_k[i](key)).sum(-1) / math.sqrt(self.d)
            alpha = signed_sqrt_gate(score, self.block_cfg.gate_signed_sqrt)
            gated.append(alpha.unsqueeze(-1) * value)
        v = torch.stack(gated, dim=2)
        if self.conv is not None:
            u = torch.cat([self.conv_norms[i](v[:, :, i]) for i in range(self.m)], dim=-1)
            c = self.conv(u.transpose(1, 2))[..., :t].transpose(1, 2)
            v = v + F.silu(c).reshape(v.shape)
        return hidden + v
