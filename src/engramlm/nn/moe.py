"""DeepSeek-V3 style mixture of experts with auxiliary-loss-free load balancing.

Shared experts see every token. Routed experts are picked by top-k over sigmoid affinities plus a
per-expert bias that only steers *selection*; the gate weights are the unbiased affinities of the
chosen experts, normalised to sum to 1. After each optimiser step, :meth:`MoE.update_bias` nudges
the bias towards balance (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.nn.mlp import SwiGLU


class Experts(nn.Module):
    """n SwiGLU experts stored as stacked 3-D weights, so counting and sharding stay simple."""

    def __init__(self, n_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])  # nn.Linear's default init, per expert
            nn.init.uniform_(w, -bound, bound)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e applied to x [n, d]."""
        h = F.silu(x @ self.gate_proj[e].T) * (x @ self.up_proj[e].T)
        return h @ self.down_proj[e].T

    def params_per_expert(self) -> int:
        return self.gate_proj[0].numel() + self.up_proj[0].numel() + self.down_proj[0].numel()


class MoE(nn.Module):
    """Shared + top-k routed SwiGLU experts. x [B, T, d] -> [B, T, d].

    Buffers: ``expert_bias`` (persistent, selection-only bias, keep it fp32), ``expert_counts``
    (tokens routed per expert since the last :meth:`update_bias`, training only) and ``last_load``
    (tokens per expert in the last forward).
    """

    def __init__(
        self,
        d_model: int,
        expert_hidden: int,
        n_routed: int,
        n_shared: int,
        top_k: int,
        score_func: str = "sigmoid",
        bias_update_speed: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"need 1 <= top_k <= n_routed, got top_k={top_k}, n_routed={n_routed}")
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        self.n_routed, self.n_shared, self.top_k = n_routed, n_shared, top_k
        self.score_func = score_func
        self.bias_update_speed = bias_update_speed
        # n_shared experts of width h equal one SwiGLU of width n_shared * h (outputs add up).
        self.shared = SwiGLU(d_model, n_shared * expert_hidden) if n_shared > 0 else None
        self.router = nn.Linear(d_model, n_routed, bias=False)
        self.experts = Experts(n_routed, d_model, expert_hidden)
        self.register_buffer("expert_bias", torch.zeros(n_routed))
        self.register_buffer("expert_counts", torch.zeros(n_routed, dtype=torch.long), False)
        self.register_buffer("last_load", torch.zeros(n_routed, dtype=torch.long), False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> gate weights [N, k] (fp32, sum 1), expert ids [N, k], scores [N, E]."""
        logits = self.router(x).float()
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(-1)
        idx = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights, idx, scores

    # The expert loop reads the routing back to the host (one sync per layer), so a compiled decode step
    # (engramlm.infer.compiled) runs this layer eagerly between two graphs instead of recompiling per routing.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, _ = self.route(x)
        flat = idx.flatten()
        counts = torch.bincount(flat, minlength=self.n_routed)
        self.last_load = counts.detach()
        if self.training:
            self.expert_counts += counts.detach()
        # Sort the (token, slot) pairs by expert, then run each expert once on its contiguous run.
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k
        gates = weights.flatten()[order].to(x.dtype)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer, a loop over experts
            if n:
                tok = tokens[start : start + n]
                y = self.experts.expert(e, x[tok]) * gates[start : start + n, None]
                out.index_add_(0, tok, y)
                start += n
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += speed * sign(mean_count - count), then reset the counts. Call after opt.step().

        Under data parallelism all-reduce ``expert_counts`` first so every rank moves alike.
        """
        counts = self.expert_counts.float()
        self.expert_bias += self.bias_update_speed * torch.sign(counts.mean() - counts)
        self.expert_counts.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def activated_parameters(self) -> int:
        """Parameters used per token: shared experts, router and top_k routed experts."""
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared else 0
        router = self.router.weight.numel()
        return shared + router + self.top_k * self.experts.params_per_expert()
