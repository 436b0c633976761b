"""RMSNorm with fp32 maths, used by the backbone and by the Engram gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back to x's dtype.

    ``eps=None`` means the machine epsilon of the input dtype (PyTorch's default, used by the demo).
    """

    def __init__(self, dim: int, eps: float | None = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused kernel, same maths
            return F.rms_norm(x, self.weight.shape, self.weight, eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
