"""Muon: SGD-momentum whose update is orthogonalised by a Newton-Schulz iteration (Jordan et al. 2024).

Used for the backbone's weight matrices (attention, FFN, experts, Engram's fused projection),
never for embeddings or the LM head. Stacked expert weights ``[E, out, in]`` are E matrices,
orthogonalised as one batch. The update is scaled by ``0.2 * sqrt(max(out, in))`` (Moonlight,
Liu et al. 2025) so its RMS matches AdamW's, which lets Muon share AdamW's learning rate and
decoupled weight decay: one ``lr`` for the whole backbone, as the paper's recipe assumes.
"""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients tuned for speed of convergence near singular values in [0, 1].
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of each matrix in ``g`` [..., m, n] (fp32; singular values ~ 1)."""
    a, b, c = NS_COEFFS
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        xx = x @ x.mT
        x = a * x + (b * xx + c * xx @ xx) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum + Newton-Schulz orthogonalisation + decoupled weight decay (params ndim >= 2)."""

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        nesterov: bool = True,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps})
        self.nesterov = nesterov
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon needs matrices (ndim >= 2), got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                g = p.grad.add(buf, alpha=mom) if self.nesterov else buf
                update = orthogonalize(g, group["ns_steps"]).to(p.dtype)
                scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        return None
