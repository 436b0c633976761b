"""The Engram block (spec §2, §5, §6): rows -> fused value/key projection -> per-branch gate ->
optional short causal conv -> added to every residual branch.

The table is its own parameter (``embed.weight``, the V4.1 checkpoint name) and the forward pass
also accepts rows gathered elsewhere, so training can update it sparsely and inference can keep
it in host memory, on SSD or in a remote pool. The value and all M keys come from ONE matmul
(``wkv``; output order keys 0..M-1 then the value, as reported for V4.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.errors import ConfigError
from engramlm.nn.packed import linear

# Output blocks of the fused projection, in order (spec §11.2, A16).
WKV_SPLIT_ORDER = ("keys", "value")
GATE_CLAMP = 1e-6
# Elements per chunk of the inference conv (4M fp32 = 16 MiB): below glibc's largest mmap threshold
# (32 MiB), so after the first forward the chunk buffers come from the heap instead of fresh,
# page-faulted mappings, and a chunk's passes stay closer to the caches.
FUSED_CHUNK_ELEMS = 1 << 22

# Set by :func:`external_tables`: called instead of allocating a block's table.
_TABLE_SINK: list[Callable[[int, int, float], None]] = []


@contextmanager
def external_tables(sink: Callable[[int, int, float], None]) -> Iterator[None]:
    """While active, an :class:`EngramBlock` allocates no table: ``embed.weight`` is ``[0, d_h]`` and
    ``sink(num_rows, head_dim, init_std)`` is called where the table would have been initialised.

    For tables kept outside the model (training with the table on SSD). A sink that must reproduce the
    in-memory init bit for bit draws the same numbers from torch's RNG with :func:`stream_table_init`;
    one that does not (the weights come from a checkpoint next) may draw nothing.
    """
    _TABLE_SINK.append(sink)
    try:
        yield
    finally:
        _TABLE_SINK.pop()


def stream_table_init(
    num_rows: int, dim: int, init_std: float, write: Callable[[int, torch.Tensor], None], chunk_rows: int = 1 << 16
) -> None:
    """The rows an in-memory ``EngramBlock`` table gets at init, produced in chunks: ``write(start, rows)``.

    The in-memory init is ``nn.Embedding`` (``normal_(0, 1)`` over the table) then ``normal_(0, init_std)``:
    two passes of torch's CPU normal fill. That fill draws one uniform per element and transforms blocks
    of 16, recomputing the last 16 of a tensor whose size is not a multiple of 16; so chunks whose sizes
    are multiples of 16 (the last one at least 16) draw and produce exactly what one call over the whole
    table would. Tested equal, RNG state after included.
    """
    total = num_rows * dim
    unit = math.lcm(16, dim)  # chunks of whole rows and of whole 16-blocks
    step = max(unit, (chunk_rows * dim) // unit * unit)
    scratch = torch.empty(min(step + 16, max(total, 1)))
    for std, keep in ((1.0, False), (init_std, True)):
        i = 0
        while i < total:
            j = min(total, i + step)
            if total - j < 16:  # the tail joins this chunk so no chunk is shorter than 16
                j = total
            if not keep:
                scratch[: j - i].normal_(0.0, std)
            else:
                rows = torch.empty(j - i).normal_(0.0, std).view(-1, dim)
                write(i // dim, rows)
            i = j


def signed_sqrt_gate(score: torch.Tensor, signed_sqrt: bool = True) -> torch.Tensor:
    """alpha = sigmoid(sign(s) * sqrt(max(|s|, 1e-6))) (spec E8); plain sigmoid for the ablation."""
    if not signed_sqrt:
        return torch.sigmoid(score)
    return torch.sigmoid(torch.sign(score) * score.abs().clamp_min(GATE_CLAMP).sqrt())


def _rms(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def check_row_ids(
    row_ids: torch.Tensor, num_rows: int, num_heads: int, what: str = "row_ids", *, values: bool = True
) -> None:
    """Refuse ids with the wrong head count or (``values``) outside a table of ``num_rows`` rows, in one clear line.

    The value check reads min and max: a host-device synchronisation on an accelerator, so callers check on the host.
    """
    if row_ids.shape[-1] != num_heads:
        raise ValueError(f"{what}: last dim must be H_e={num_heads}, got shape {tuple(row_ids.shape)}")
    # (not inside the compiled decode step: its ids come from the hasher, in range by construction)
    if values and row_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(row_ids.min()), int(row_ids.max())
        if lo < 0 or hi >= num_rows:
            raise IndexError(
                f"{what}: row ids must lie in [0, {num_rows}) (offset-applied ids of this layer's table); "
                f"got min {lo}, max {hi}"
            )


@dataclass
class ConvState:
    """Decode state of one ShortConv: ``hist`` [B, (w-1)*delta, M*d] fp32, the normalised pre-conv
    values of the positions just before the next chunk. Mutable, so the block advances it in place."""

    hist: torch.Tensor


class ShortConv(nn.Module):
    """Y = V + SiLU(DWConv_{w, delta}(RMSNorm_c(V))) over M*d branch-major channels (spec §6).

    Taps are applied as shifted multiply-adds so that in ``reset`` mode a tap never reads a
    position before the current document's start (it reads zero, as at sequence start).
    """

    def __init__(
        self,
        hidden_size: int,
        n_branches: int,
        kernel_size: int = 4,
        dilation: int = 3,
        norm_eps: float = 1e-5,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size, self.dilation, self.norm_eps = kernel_size, dilation, norm_eps
        self.norm_weight = nn.Parameter(torch.ones(n_branches, hidden_size))
        channels = n_branches * hidden_size
        conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        self.weight = nn.Parameter(conv.weight.detach().clone())  # [M*d, 1, w], PyTorch layout
        if zero_init:
            nn.init.zeros_(self.weight)

    @property
    def history(self) -> int:
        """Pre-conv positions a token reads back, (w - 1) * delta: the size of the decode state."""
        return (self.kernel_size - 1) * self.dilation

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> ConvState:
        """Decode state at the sequence start (zeros)."""
        shape = (batch_size, self.history, self.weight.shape[0])
        return ConvState(torch.zeros(shape, device=device, dtype=torch.float32))

    def forward(self, v: torch.Tensor, window_start: torch.Tensor | None = None) -> torch.Tensor:
        """Full sequence; :meth:`step` continues a decoded sequence from its state."""
        b, t, m, d = v.shape
        u = (_rms(v.float(), self.norm_eps) * self.norm_weight.float()).reshape(b, t, m * d)
        w = self.weight.float()[:, 0, :]  # [C, w]
        pos = torch.arange(t, device=v.device)
        acc = torch.zeros_like(u)
        for j in range(self.kernel_size):  # w = 4 taps: a loop over taps, never over tokens
            lag = (self.kernel_size - 1 - j) * self.dilation
            if lag >= t:
                continue
            shifted = F.pad(u[:, : t - lag], (0, 0, lag, 0)) if lag else u
            if window_start is not None and lag:
                valid = (pos - lag >= window_start).unsqueeze(-1)  # [B, T, 1]
                shifted = shifted * valid
            acc = acc + shifted * w[:, j]
        return v + F.silu(acc).reshape(b, t, m, d).to(v.dtype)

    def fused_forward(
        self,
        hidden: torch.Tensor,
        alpha: torch.Tensor,
        value: torch.Tensor,
        window_start: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        chunk_elems: int = FUSED_CHUNK_ELEMS,
    ) -> torch.Tensor:
        """``hidden + keep * forward(alpha * value)`` for inference, without the [B, T, M, d] temporaries.

        ``alpha`` [B, T, M, 1], ``value`` [B, T, 1, d], ``keep`` [B, T, 1, 1] or None. Same maths as
        :meth:`forward` on V = alpha * value, rearranged: RMSNorm_c(V)[t, m] = c[t, m] * value[t] *
        norm_weight[m] with the scalar c = alpha / sqrt(alpha^2 * ms(value[t]) + eps), so the norm
        never reads V; the norm weight is folded into the tap weights; the taps accumulate in place
        into the output, chunk by chunk over the batch, and SiLU, the gated value, ``keep`` and the
        residual are applied in place. Not for autograd (in-place writes): the block calls it only
        when nothing needs a gradient.
        """
        b, t, m, d = hidden.shape
        n = b * t
        k, dil = self.kernel_size, self.dilation
        flat = value.reshape(n, 1, d)
        ms = torch.bmm(flat, flat.transpose(1, 2)).view(b, t, 1, 1) / d  # mean square, no [B,T,d] temporary
        c = alpha * torch.rsqrt(alpha * alpha * ms + self.norm_eps)  # [B, T, M, 1]
        taps = (self.weight[:, 0, :] * self.norm_weight.reshape(m * d, 1)).T.reshape(k, m, d)
        pos = torch.arange(t, device=hidden.device)
        out = torch.empty_like(hidden)
        rows = max(1, chunk_elems // max(1, t * m * d))
        for b0 in range(0, b, rows):  # a loop over batch chunks (and 4 taps), never over tokens
            sl = slice(b0, b0 + rows)
            u = torch.mul(c[sl], value[sl])  # normalised conv input without the norm weight
            acc = out[sl]
            torch.mul(u, taps[k - 1], out=acc)  # lag 0
            for j in range(k - 1):
                lag = (k - 1 - j) * dil
                if lag >= t:
                    continue
                src = u[:, : t - lag]
                if window_start is not None:
                    valid = pos[lag:] - lag >= window_start[sl, lag:]
                    src = src * valid[..., None, None]
                acc[:, lag:].addcmul_(src, taps[j])
            F.silu(acc, inplace=True)
            acc.addcmul_(alpha[sl], value[sl])
            if keep is not None:
                acc.mul_(keep[sl])
            acc.add_(hidden[sl])
        return out

    def step(
        self,
        v: torch.Tensor,
        state: torch.Tensor,
        window_start: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: a chunk v [B, T, M, d] that continues each sequence -> (Y, new state).

        ``state`` [B, S, M*d] holds the normalised pre-conv values of the S = (w-1)*delta positions
        before the chunk (zeros before the sequence start), so the taps read the same values the
        full forward reads. Positions are relative to the chunk (history is -S..-1);
        ``window_start`` [B, T] may be negative and masks taps exactly like the full forward
        (``pos - lag >= window_start``). ``lengths`` [B] (default T) counts each row's real tokens
        in a right-padded chunk: the new state is the S positions before that length.
        """
        b, t, m, d = v.shape
        s = self.history
        u = (_rms(v.float(), self.norm_eps) * self.norm_weight.float()).reshape(b, t, m * d)
        full = torch.cat([state.to(u.dtype), u], dim=1)  # [B, S + T, C]: positions -S .. T-1
        w = self.weight.float()[:, 0, :]
        pos = torch.arange(t, device=v.device)
        acc = torch.zeros_like(u)
        for j in range(self.kernel_size):
            lag = (self.kernel_size - 1 - j) * self.dilation
            shifted = full[:, s - lag : s - lag + t]
            if window_start is not None and lag:
                shifted = shifted * (pos - lag >= window_start).unsqueeze(-1)
            acc = acc + shifted * w[:, j]
        if lengths is None:
            new_state = full[:, t:]
        else:
            idx = lengths.to(v.device).reshape(b, 1) + torch.arange(s, device=v.device)
            new_state = full.gather(1, idx.unsqueeze(-1).expand(b, s, full.shape[-1]))
        return v + F.silu(acc).reshape(b, t, m, d).to(v.dtype), new_state


class EngramBlock(nn.Module):
    """One Engram layer: ``forward(H [B,T,M,d], row_ids=... | rows=...) -> H + Y``.

    ``row_ids`` are offset-applied ids [B, T, H_e] into ``embed.weight`` [R, d_h]; ``rows``
    [B, T, H_e, d_h] are rows already gathered from an external store. ``window_start`` [B, T]
    (from :func:`engramlm.hashing.batch.window_starts`) confines the conv to the current document;
    ``dead`` [B, T] zeroes the output at DEAD positions (spec §11.4).
    """

    # Inference (nothing needs a gradient, fp32) takes the fused in-place path; False forces the
    # autograd path everywhere (parity checks, and the benchmark's "before" contender).
    fused_inference: bool = True

    def __init__(
        self,
        *,
        hidden_size: int,
        num_rows: int,
        num_heads: int,
        head_dim: int,
        n_branches: int = 1,
        proj_bias: bool = False,
        gate: bool = True,
        gate_signed_sqrt: bool = True,
        gate_norm_eps: float | None = 1e-6,
        use_short_conv: bool = True,
        kernel_size: int = 4,
        conv_dilation: int = 3,
        conv_norm_eps: float = 1e-5,
        conv_zero_init: bool = True,
        embed_init_std: float = 1.0,
        value_init_scale: float = 1.0,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.n_branches, self.num_rows = n_branches, num_rows
        self.use_gate, self.gate_signed_sqrt, self.gate_norm_eps = gate, gate_signed_sqrt, gate_norm_eps
        self.sparse_grad = sparse_grad
        if _TABLE_SINK:  # the table lives elsewhere (external_tables)
            self.embed = nn.Embedding(0, head_dim, sparse=sparse_grad)
            _TABLE_SINK[-1](num_rows, head_dim, embed_init_std)
        else:
            self.embed = nn.Embedding(num_rows, head_dim, sparse=sparse_grad)
            nn.init.normal_(self.embed.weight, std=embed_init_std)
        mem_dim = num_heads * head_dim
        self.wkv = nn.Linear(mem_dim, (n_branches + 1) * hidden_size, bias=proj_bias)
        if value_init_scale != 1.0:  # the value rows come last (WKV_SPLIT_ORDER): scale the output at insertion
            with torch.no_grad():
                self.wkv.weight[n_branches * hidden_size :].mul_(value_init_scale)
                if proj_bias:
                    self.wkv.bias[n_branches * hidden_size :].mul_(value_init_scale)
        self.q_weight = nn.Parameter(torch.ones(n_branches, hidden_size))
        self.k_weight = nn.Parameter(torch.ones(n_branches, hidden_size))
        self.conv = (
            ShortConv(hidden_size, n_branches, kernel_size, conv_dilation, conv_norm_eps, conv_zero_init)
            if use_short_conv
            else None
        )

    @property
    def memory_dim(self) -> int:
        return self.num_heads * self.head_dim

    def lookup(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Rows [B, T, H_e, d_h] of the block's own table.

        Ids are range-checked with a clear error only on the host, where it costs no synchronisation;
        on an accelerator the model's callers check them when they build ``EngramInputs``.
        """
        if self.embed.weight.shape[0] == 0 and self.num_rows:
            raise ConfigError(
                "engram: this model's tables are kept outside it (trained with engram.table_tier=ssd); serve them "
                "from a store: `engramlm store build CHECKPOINT --out DIR`, then pass the store (--store DIR)"
            )
        check_row_ids(row_ids, self.num_rows, self.num_heads, values=row_ids.device.type == "cpu")
        return F.embedding(row_ids.long(), self.embed.weight, sparse=self.sparse_grad)

    def gate_values(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """alpha [B, T, M, 1] in fp32 (spec E7-E8)."""
        q = _rms(hidden.float(), self.gate_norm_eps) * self.q_weight.float()
        k = _rms(keys.float(), self.gate_norm_eps) * self.k_weight.float()
        score = (q * k).sum(-1, keepdim=True) / math.sqrt(self.hidden_size)
        return signed_sqrt_gate(score, self.gate_signed_sqrt)

    def _inference_path(self, hidden: torch.Tensor, e: torch.Tensor) -> bool:
        """Whether the fused in-place forward applies: fp32 and nothing that autograd must track."""
        if not self.fused_inference or hidden.dtype != torch.float32 or self.wkv.weight.dtype != torch.float32:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (hidden.requires_grad or e.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _gate_fused(self, hid: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """alpha [N, M] from ``hid`` and ``keys`` [N, M, d] (``keys`` is overwritten).

        q.k = rsqrt(ms(h) + eps) * rsqrt(ms(k) + eps) * sum(h * k * q_w * k_w): the sums of squares and
        the dot product are the diagonals of three small batched matmuls (M x M per token), so no
        normalised copy of ``hidden`` or the keys is made.
        """
        d = self.hidden_size
        eps = torch.finfo(torch.float32).eps if self.gate_norm_eps is None else self.gate_norm_eps
        if torch.compiler.is_compiling():  # compiled decode: plain reductions, fused by inductor into one loop
            ssq_h, ssq_k = (hid * hid).sum(-1), (keys * keys).sum(-1)
            dot = (hid * keys * (self.q_weight * self.k_weight)).sum(-1)
            score = dot * torch.rsqrt(ssq_h / d + eps) * torch.rsqrt(ssq_k / d + eps) / math.sqrt(d)
            return signed_sqrt_gate(score, self.gate_signed_sqrt)
        ssq_h = torch.bmm(hid, hid.transpose(1, 2)).diagonal(dim1=1, dim2=2)
        ssq_k = torch.bmm(keys, keys.transpose(1, 2)).diagonal(dim1=1, dim2=2)
        keys.mul_(self.q_weight * self.k_weight)
        dot = torch.bmm(hid, keys.transpose(1, 2)).diagonal(dim1=1, dim2=2)
        score = dot * torch.rsqrt(ssq_h / d + eps) * torch.rsqrt(ssq_k / d + eps) / math.sqrt(d)
        return signed_sqrt_gate(score, self.gate_signed_sqrt)

    def _forward_fused(
        self,
        hidden: torch.Tensor,
        e: torch.Tensor,
        window_start: torch.Tensor | None,
        dead: torch.Tensor | None,
        conv_state: ConvState | None,
        lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference forward (no autograd): the maths of :meth:`forward` with in-place accumulation and
        without full-size [B, T, M, d] temporaries beyond the output (the projection's own output aside)."""
        b, t, m, d = hidden.shape
        n = b * t
        kv = linear(e.reshape(n, self.memory_dim), self.wkv)  # [N, (M+1) d]
        if self.use_gate:
            alpha = self._gate_fused(hidden.reshape(n, m, d), kv[:, : m * d].view(n, m, d))
        else:
            alpha = torch.ones(n, m, device=hidden.device)
        alpha, value = alpha.view(b, t, m, 1), kv[:, m * d :].view(b, t, 1, d)
        keep = None if dead is None else (~dead.bool()).to(alpha.dtype)[..., None, None]
        if self.conv is not None and conv_state is None:
            out = self.conv.fused_forward(hidden, alpha, value, window_start, keep)
        else:
            y = alpha * value
            if self.conv is not None:
                y, conv_state.hist = self.conv.step(y, conv_state.hist, window_start, lengths)  # type: ignore[union-attr]
            if keep is not None:
                y = y.mul_(keep)
            out = y.add_(hidden)
        if keep is not None:
            alpha = alpha * keep
        return out, alpha

    def forward(
        self,
        hidden: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        window_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        return_gate: bool = False,
        conv_state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``conv_state`` (decode) is read and advanced in place, so the block continues a cached
        sequence (``window_start`` is then chunk-relative and ``lengths`` counts the real tokens
        per row; see :meth:`ShortConv.step`)."""
        b, t, m, d = hidden.shape
        if m != self.n_branches or d != self.hidden_size:
            raise ValueError(f"hidden must be [B, T, {self.n_branches}, {self.hidden_size}], got {tuple(hidden.shape)}")
        if (row_ids is None) == (rows is None):
            raise ValueError("pass exactly one of row_ids (ids into embed.weight) or rows (gathered rows)")
        e = self.lookup(row_ids) if rows is None else rows
        e = e.reshape(b, t, self.memory_dim).to(self.wkv.weight.dtype)
        if self._inference_path(hidden, e):
            out, alpha = self._forward_fused(hidden, e, window_start, dead, conv_state, lengths)
            return (out, alpha) if return_gate else out
        kv = self.wkv(e).view(b, t, m + 1, d)  # one matmul: M keys then the shared value
        keys, value = kv[:, :, :m], kv[:, :, m:]
        if self.use_gate:
            alpha = self.gate_values(hidden, keys)
        else:
            alpha = torch.ones(b, t, m, 1, device=hidden.device)
        gated = (alpha * value.float()).to(hidden.dtype)  # [B, T, M, d]
        if self.conv is None:
            y = gated
        elif conv_state is not None:
            y, conv_state.hist = self.conv.step(gated, conv_state.hist, window_start, lengths)
        else:
            y = self.conv(gated, window_start)
        if dead is not None:
            keep = (~dead.bool())[..., None, None]
            y = y * keep
            alpha = alpha * keep
        out = hidden + y
        return (out, alpha) if return_gate else out
