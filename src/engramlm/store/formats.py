"""Row formats: how one table row is laid out as bytes in a store file or a packed buffer.

Every tier moves opaque fixed-size byte records and decodes them only at the end, so one
format object owns the byte layout and its vectorised encode/decode.
``fp8_e4m3_ue8m0`` is DeepSeek-V4.1's record (spec §11.3): ``dim`` e4m3 bytes followed by
``dim // 32`` ue8m0 scale bytes, value[i] = e4m3(q[i]) * 2^(s[i // 32] - 127).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from engramlm.errors import ConfigError

FP8_BLOCK = 32
E4M3_MAX = 448.0
_FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _prepare_out(out: torch.Tensor | None, n: int, dim: int) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dim, dtype=torch.float32)
    if out.shape != (n, dim):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, dim)}")
    if out.dtype not in _FLOAT_OUT:
        raise ValueError(f"out dtype must be a float type, got {out.dtype}")
    return out


def _check_raw(raw: torch.Tensor, row_bytes: int) -> torch.Tensor:
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != row_bytes:
        raise ValueError(f"raw rows must be uint8 [n, {row_bytes}], got {raw.dtype} {tuple(raw.shape)}")
    return raw.contiguous()


class RowFormat(ABC):
    """A fixed-size byte record per row; ``decode`` writes into a caller buffer to avoid copies."""

    name: str

    @abstractmethod
    def row_bytes(self, dim: int) -> int:
        """Bytes of one encoded row of ``dim`` values."""

    @abstractmethod
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """float [n, d] -> uint8 [n, row_bytes(d)]."""

    @abstractmethod
    def decode(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [n, row_bytes] -> ``out`` [n, d] (float32 when ``out`` is None)."""

    @abstractmethod
    def dim_of(self, row_bytes: int) -> int:
        """Inverse of ``row_bytes``: the row width a record size holds."""

    def __repr__(self) -> str:
        return f"RowFormat({self.name!r})"


class _PlainFormat(RowFormat):
    """A row stored as ``dim`` little-endian values of one torch dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()

    def row_bytes(self, dim: int) -> int:
        return dim * self.itemsize

    def dim_of(self, row_bytes: int) -> int:
        return row_bytes // self.itemsize

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        return rows.view(torch.uint8).reshape(rows.shape[0], -1)

    def decode(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = raw.shape[0]
        dim = self.dim_of(raw.shape[1])
        raw = _check_raw(raw, self.row_bytes(dim))
        out = _prepare_out(out, n, dim)
        out.copy_(raw.view(self.dtype))
        return out


class Fp8E4M3UE8M0(RowFormat):
    """DeepSeek-V4.1 fp8 row: e4m3 values + one power-of-two ue8m0 scale per 32 values."""

    name = "fp8_e4m3_ue8m0"

    def _blocks(self, dim: int) -> int:
        if dim <= 0 or dim % FP8_BLOCK:
            raise ConfigError(f"fp8_e4m3_ue8m0 needs dim a positive multiple of 32, got {dim}")
        return dim // FP8_BLOCK

    def row_bytes(self, dim: int) -> int:
        return dim + self._blocks(dim)

    def dim_of(self, row_bytes: int) -> int:
        return row_bytes * FP8_BLOCK // (FP8_BLOCK + 1)

    def quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [n, d] -> split form (float8_e4m3fn [n, d], float8_e8m0fnu [n, d/32])."""
        rows = rows.detach().to("cpu", torch.float32)
        n, dim = rows.shape
        nb = self._blocks(dim)
        blocks = rows.reshape(n, nb, FP8_BLOCK)
        amax = blocks.abs().amax(dim=-1).double()
        # Smallest power of two 2^e with amax / 2^e <= 448; all-zero blocks get the minimum.
        exp = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp_(-127, 127)
        exp = torch.nan_to_num(exp, nan=-127.0).to(torch.int32)
        scale = torch.pow(2.0, exp.double()).float()
        q = (blocks / scale.unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX)
        weight = q.reshape(n, dim).to(torch.float8_e4m3fn)
        scale_bytes = (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
        return weight, scale_bytes

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return pack_split(*self.quantize(rows))

    def decode(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        dim = self.dim_of(raw.shape[1])
        raw = _check_raw(raw, self.row_bytes(dim))
        weight = raw[:, :dim].view(torch.float8_e4m3fn)
        scale = raw[:, dim:].view(torch.float8_e8m0fnu)
        return decode_split(weight, scale, out)


def _lut(dtype: torch.dtype) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of a one-byte float dtype (NaNs included)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()


# Decoding through 256-entry tables is exact and ~2x faster on CPU than torch's fp8 -> fp32 cast.
_E4M3_LUT = _lut(torch.float8_e4m3fn)
_E8M0_LUT = _lut(torch.float8_e8m0fnu)


def decode_split(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise the checkpoint's split form (e4m3 [n, d] + e8m0 [n, d/32]) into ``out``."""
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float8_e8m0fnu:
        raise ValueError(
            f"split form needs float8_e4m3fn weight and float8_e8m0fnu scale, got {weight.dtype} and {scale.dtype}"
        )
    n, dim = weight.shape
    if dim % FP8_BLOCK or scale.shape != (n, dim // FP8_BLOCK):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {(n, dim)}")
    out = _prepare_out(out, n, dim)
    nb = dim // FP8_BLOCK
    if weight.device.type == "cpu" and scale.device.type == "cpu":
        direct = out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu"
        values = out.numpy() if direct else np.empty((n, dim), dtype=np.float32)
        np.take(_E4M3_LUT, weight.view(torch.uint8).numpy(), out=values)
        values.reshape(n, nb, FP8_BLOCK)[...] *= np.take(_E8M0_LUT, scale.view(torch.uint8).numpy())[:, :, None]
        if not direct:
            out.copy_(torch.from_numpy(values))
        return out
    values_t = weight.float().view(n, nb, FP8_BLOCK)
    values_t.mul_(scale.float().unsqueeze(-1))
    out.view(n, nb, FP8_BLOCK).copy_(values_t)
    return out


def pack_split(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Split form -> packed uint8 records [n, d + d/32] (values then scales)."""
    n = weight.shape[0]
    return torch.cat([weight.contiguous().view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1).reshape(
        n, -1
    )


def unpack_split(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 records -> split form views (weight e4m3 [n, d], scale e8m0 [n, d/32])."""
    dim = FP8.dim_of(raw.shape[1])
    raw = _check_raw(raw, FP8.row_bytes(dim))
    return raw[:, :dim].view(torch.float8_e4m3fn), raw[:, dim:].view(torch.float8_e8m0fnu)


FP32 = _PlainFormat("fp32", torch.float32)
BF16 = _PlainFormat("bf16", torch.bfloat16)
FP8 = Fp8E4M3UE8M0()
FORMATS: dict[str, RowFormat] = {f.name: f for f in (FP32, BF16, FP8)}


def get_format(fmt: str | RowFormat) -> RowFormat:
    """Resolve a format name (or pass a format through); unknown names list the valid ones."""
    if isinstance(fmt, RowFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        names = sorted(FORMATS)
        raise ConfigError(f"unknown row format {fmt!r}; expected one of {names}") from None
