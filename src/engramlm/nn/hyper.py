"""Multi-branch residual stream: manifold-constrained hyper-connections (mHC, Xie et al. 2025).

The stream H [B, T, M, d] holds M branches. Around each sublayer F (attention, FFN/MoE):

    x  = Σ_m H_pre[m] · H^(m)                      (read; H_pre >= 0)
    H' = H_res @ H + H_post ⊗ F(x)                 (write; H_post >= 0, H_res doubly stochastic)

with H_pre = σ(·), H_post = 2σ(·), H_res = Sinkhorn(·), each argument a static logit plus
``alpha * (RMSNorm(flatten(H)) @ proj)``, computed per token (mHC). Engram (spec §7.1) instead
takes H itself and adds its own output to every branch.

Initialisation (static logits; the dynamic part is added on top, scaled by alpha = 1e-2):
  * H_pre = 1/M per branch (logit -ln(M-1)): the read is the mean of the branches;
  * H_post = 1 per branch (logit 0): every branch receives the full sublayer output;
  * H_res = Sinkhorn(exp(c·I)), c = 4: exactly doubly stochastic (symmetric, constant rows),
    diagonal e^c / (e^c + M - 1) ≈ 0.948 for M = 4, so branches stay mostly separate.
Starting from ``expand_stream`` (M identical copies) the branches stay identical, because a
doubly stochastic H_res maps equal rows to themselves. Hence with alpha = 0 (or dynamic=False)
every sublayer sees exactly the plain-residual hidden state and the stream is M copies of it;
with the default alpha the deviation is O(alpha). M = 1 is exactly the plain residual.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engramlm.nn.norm import RMSNorm
from engramlm.nn.packed import linear


def _sinkhorn_rows_py(z: np.ndarray, n_iters: int) -> np.ndarray:
    """:func:`sinkhorn` on z [K, M, M] float32, one small matrix at a time in float64 (compiled by Numba).

    Scaling form: K = exp(z - max z), then rows and columns divided by their sums, which is the
    log-domain iteration (subtract each row's / column's logsumexp) exponentiated: the same matrix to
    float64 rounding, with M^2 exponentials per matrix instead of 2 * M * (M + 1) per iteration
    (~10x less work; the prefill of 8 x 32 tokens spent ~1.4 ms per hyper-connection here). A matrix
    whose logits spread over 300 or more takes the log-domain loop: a row scaling can leave an entry at
    e^-(spread) times the next column's scale, so a whole column could underflow to zeros (a zero sum to divide
    by); below 300 every entry and every scaled entry stays far above float64's smallest normal (e^-708).
    """
    k_, m, _ = z.shape
    out = np.empty_like(z)
    w = np.empty((m, m), dtype=np.float64)
    for k in range(k_):
        mx = -np.inf
        mn = np.inf
        for i in range(m):
            for j in range(m):
                w[i, j] = z[k, i, j]
                mx = max(mx, w[i, j])
                mn = min(mn, w[i, j])
        scaled = mx - mn < 300.0
        if scaled:
            for i in range(m):
                for j in range(m):
                    w[i, j] = math.exp(w[i, j] - mx)
            for _ in range(n_iters):
                for i in range(m):  # rows
                    acc = 0.0
                    for j in range(m):
                        acc += w[i, j]
                    inv = 1.0 / acc
                    for j in range(m):
                        w[i, j] *= inv
                for j in range(m):  # columns
                    acc = 0.0
                    for i in range(m):
                        acc += w[i, j]
                    inv = 1.0 / acc
                    for i in range(m):
                        w[i, j] *= inv
        else:
            for _ in range(n_iters):
                for i in range(m):  # rows: w -= logsumexp over the row
                    rmx = w[i, 0]
                    for j in range(1, m):
                        rmx = max(rmx, w[i, j])
                    acc = 0.0
                    for j in range(m):
                        acc += math.exp(w[i, j] - rmx)
                    lse = rmx + math.log(acc)
                    for j in range(m):
                        w[i, j] -= lse
                for j in range(m):  # columns
                    cmx = w[0, j]
                    for i in range(1, m):
                        cmx = max(cmx, w[i, j])
                    acc = 0.0
                    for i in range(m):
                        acc += math.exp(w[i, j] - cmx)
                    lse = cmx + math.log(acc)
                    for i in range(m):
                        w[i, j] -= lse
            for i in range(m):
                for j in range(m):
                    w[i, j] = math.exp(w[i, j])
        for i in range(m):
            row = 0.0
            for j in range(m):
                row += w[i, j]
            for j in range(m):
                out[k, i, j] = max(w[i, j] + (1.0 - row) / m, 0.0)
    return out


_SINKHORN_KERNEL: list = []  # the compiled kernel, built on first use (Numba compiles in ~1 s)


def _sinkhorn_kernel():  # a Numba dispatcher, or None without Numba
    if not _SINKHORN_KERNEL:
        try:
            from numba import njit

            _SINKHORN_KERNEL.append(njit(nogil=True, boundscheck=False)(_sinkhorn_rows_py))
        except ImportError:  # pragma: no cover - numba is a declared dependency
            _SINKHORN_KERNEL.append(None)
    return _SINKHORN_KERNEL[0]


# Low-level registration (not ``torch.library.custom_op``, whose Python wrapper layers cost ~10 µs a
# call; the compiled decode step makes 16 of these calls): see ``engramlm.nn.packed`` for the same choice.
_LIB = torch.library.Library("engramlm", "FRAGMENT")
_LIB.define("sinkhorn(Tensor logits, int n_iters) -> Tensor")


def _sinkhorn_impl(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """:func:`sinkhorn` as one opaque op for ``torch.compile``: the compiled decode step calls the same
    Numba loop as eager inference (bit-identical H_res) instead of tracing 2 * n_iters tiny reductions,
    which would multiply the generated kernels and the compile time. Inference only (no autograd).
    Host fp32 goes straight to the Numba loop (the same call :func:`sinkhorn` makes, without its checks and
    copies: ~8 µs less per call, 16 calls per decode step)."""
    m = logits.shape[-1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() >= 2 and logits.shape[-2] == m:
        kernel = _sinkhorn_kernel()
        if kernel is not None:
            flat = logits.detach().contiguous().numpy().reshape(-1, m, m)
            return torch.from_numpy(kernel(flat, n_iters)).view(logits.shape)
    return sinkhorn(logits, n_iters)


_LIB.impl("sinkhorn", _sinkhorn_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("engramlm::sinkhorn", lib=_LIB)
def _(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)


_sinkhorn_op = torch.ops.engramlm.sinkhorn.default


def sinkhorn(logits: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """Doubly stochastic matrix from exp(logits) [..., M, M]: log-domain Sinkhorn–Knopp in fp32.

    Log domain keeps large logits finite. Convergence is only linear, and slow for the
    near-identity matrices used here (~1e-4 row error after 20 steps), so a final correction adds
    (1 - rowsum_i) / M to every entry of row i: rows then sum to 1 exactly and columns are
    unchanged (the row sums total M). The entries it may lower are >> 1e-5 in practice; the clamp
    only guards degenerate inputs.
    """
    if torch.compiler.is_compiling() and not (torch.is_grad_enabled() and logits.requires_grad):
        return _sinkhorn_op(logits, n_iters)
    z = logits.float()
    if z.device.type == "cpu" and not (torch.is_grad_enabled() and z.requires_grad) and z.shape[-1] == z.shape[-2]:
        kernel = _sinkhorn_kernel()  # inference on the host: 40 small kernels per call -> one compiled loop
        if kernel is not None:
            flat = z.detach().reshape(-1, z.shape[-2], z.shape[-1]).contiguous().numpy()
            return torch.from_numpy(kernel(flat, n_iters)).view(z.shape)
    for _ in range(n_iters):  # z - logsumexp(z) as ONE fused kernel each (log_softmax), not ~8 small ops
        z = z.log_softmax(-1)
        z = z.log_softmax(-2)
    p = z.exp()
    return (p + (1 - p.sum(-1, keepdim=True)) / p.shape[-1]).clamp_min(0)


def expand_stream(x: torch.Tensor, n_branches: int) -> torch.Tensor:
    """x [B, T, d] -> [B, T, M, d], a copy of x in every branch."""
    return x.unsqueeze(2).repeat(1, 1, n_branches, 1)


class HCContext(NamedTuple):
    """What ``write`` needs from ``read``: both are computed from the stream before the sublayer."""

    post: torch.Tensor  # [B, T, M] or [M], fp32
    res: torch.Tensor  # [B, T, M, M] or [M, M], fp32


class MultiBranchResidual(nn.Module):
    """The hyper-connection around one sublayer; see the module docstring for maths and init."""

    def __init__(
        self,
        d_model: int,
        n_branches: int,
        dynamic: bool = True,
        *,
        alpha_init: float = 1e-2,
        res_init_logit: float = 4.0,
        sinkhorn_iters: int = 20,
    ) -> None:
        super().__init__()
        m = n_branches
        self.n_branches, self.dynamic, self.sinkhorn_iters = m, dynamic, sinkhorn_iters
        if m == 1:
            return  # plain residual, no parameters
        self.pre_logits = nn.Parameter(torch.full((m,), -math.log(m - 1)))
        self.post_logits = nn.Parameter(torch.zeros(m))
        self.res_logits = nn.Parameter(res_init_logit * torch.eye(m))
        if dynamic:
            self.norm = RMSNorm(m * d_model)
            self.proj = nn.Linear(m * d_model, 2 * m + m * m, bias=False)
            self.alpha_pre = nn.Parameter(torch.tensor(alpha_init))
            self.alpha_post = nn.Parameter(torch.tensor(alpha_init))
            self.alpha_res = nn.Parameter(torch.tensor(alpha_init))

    def coefficients(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre [.., M], H_post [.., M], H_res [.., M, M] in fp32 ([B, T] leading if dynamic)."""
        pre, post, res = self.pre_logits, self.post_logits, self.res_logits
        if self.dynamic and not torch.is_grad_enabled():  # inference: 4 ops instead of ~12
            m = self.n_branches
            base, scale = self._static_and_scale()
            logits = torch.addcmul(base, scale, linear(self.norm(h.flatten(-2)), self.proj).float())
            gates = logits[..., : 2 * m].sigmoid()
            return (
                gates[..., :m],
                gates[..., m:] * 2,
                sinkhorn(logits[..., 2 * m :].unflatten(-1, (m, m)), self.sinkhorn_iters),
            )
        if self.dynamic:
            m = self.n_branches
            z = self.proj(self.norm(h.flatten(-2))).float()
            d_pre, d_post, d_res = z.split([m, m, m * m], dim=-1)
            pre = pre + self.alpha_pre * d_pre
            post = post + self.alpha_post * d_post
            res = res + self.alpha_res * d_res.unflatten(-1, (m, m))
        return pre.sigmoid(), 2 * post.sigmoid(), sinkhorn(res, self.sinkhorn_iters)

    def _static_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[pre | post | res] static logits and the matching alphas as two [2M + M^2] vectors (inference).

        Rebuilt whenever a parameter is replaced or changed in place (its version counter moves), so an
        optimiser step or ``load_state_dict`` between inference calls is always seen.
        """
        if torch.compiler.is_compiling():  # a compiled graph folds these few ops; no version keys to trace
            return self._static_and_scale_uncached()
        params = (self.pre_logits, self.post_logits, self.res_logits, self.alpha_pre, self.alpha_post, self.alpha_res)
        key = tuple((q.data_ptr(), q._version) for q in params)
        cached = getattr(self, "_static_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, *self._static_and_scale_uncached())
            self._static_cache = cached
        return cached[1], cached[2]

    def _static_and_scale_uncached(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.n_branches
        base = torch.cat([self.pre_logits, self.post_logits, self.res_logits.flatten()]).float()
        scale = torch.cat([self.alpha_pre.expand(m), self.alpha_post.expand(m), self.alpha_res.expand(m * m)]).float()
        return base, scale

    def read(self, h: torch.Tensor) -> tuple[torch.Tensor, HCContext | None]:
        """H [B, T, M, d] -> sublayer input x [B, T, d] and the context for :meth:`write`."""
        if self.n_branches == 1:
            return h[:, :, 0], None
        pre, post, res = self.coefficients(h)
        x = (pre.to(h.dtype).unsqueeze(-2) @ h).squeeze(-2)
        return x, HCContext(post, res)

    def write(self, h: torch.Tensor, y: torch.Tensor, ctx: HCContext | None) -> torch.Tensor:
        """H' = H_res @ H + H_post ⊗ y, with y [B, T, d] the sublayer output."""
        if ctx is None:
            return h + y.unsqueeze(2)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # compiled decode: the M x M mix as a product-sum inductor fuses with the write (an extern
            # bmm per hyper-connection costs more in call overhead than the [M, M] x [M, d] product)
            mix = (ctx.res.to(h.dtype).unsqueeze(-1) * h.unsqueeze(-3)).sum(-2)
            return mix + ctx.post.to(h.dtype).unsqueeze(-1) * y.unsqueeze(-2)
        mixed = ctx.res.to(h.dtype) @ h
        if not torch.is_grad_enabled():  # inference: accumulate into the matmul's output, no [B, T, M, d] temporary
            return mixed.addcmul_(ctx.post.to(h.dtype).unsqueeze(-1), y.unsqueeze(-2))
        return mixed + ctx.post.to(h.dtype).unsqueeze(-1) * y.unsqueeze(-2)

    def extra_repr(self) -> str:
        return f"n_branches={self.n_branches}, dynamic={self.dynamic}"


class BranchReadout(nn.Module):
    """Final aggregation of the branches before the final norm / LM head.

    Per-branch, per-channel weights softplus(weight) >= 0, initialised to 1/M (the mean); for M = 1
    it is the identity with no parameters.
    """

    def __init__(self, d_model: int, n_branches: int) -> None:
        super().__init__()
        self.n_branches = n_branches
        if n_branches > 1:
            init = math.log(math.expm1(1.0 / n_branches))  # softplus^-1(1/M)
            self.weight = nn.Parameter(torch.full((n_branches, d_model), init))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.n_branches == 1:
            return h[:, :, 0]
        return (F.softplus(self.weight.float()).to(h.dtype) * h).sum(2)
