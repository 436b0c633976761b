"""Row formats: exact fp32, bf16 rounding, fp8 e4m3+ue8m0 error bound and hand-computed bytes."""

from __future__ import annotations

import pytest
import torch

from engramlm.errors import ConfigError
from engramlm.store.formats import (
    BF16,
    FP8,
    FP32,
    decode_split,
    get_format,
    pack_split,
    unpack_split,
)


def _rows(n: int = 64, d: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 4, n).unsqueeze(1)  # rows spanning 8 decades
    return torch.randn(n, d, generator=g) * scale


def test_row_bytes() -> None:
    assert FP32.row_bytes(64) == 256
    assert BF16.row_bytes(80) == 160
    assert FP8.row_bytes(256) == 264
    assert FP8.row_bytes(64) == 66
    for fmt in (FP32, BF16, FP8):
        assert fmt.dim_of(fmt.row_bytes(256)) == 256
    with pytest.raises(ConfigError, match="multiple of 32"):
        FP8.row_bytes(48)
    with pytest.raises(ConfigError, match="expected one of"):
        get_format("fp4")


def test_fp32_roundtrip_exact() -> None:
    x = _rows()
    raw = FP32.encode(x)
    assert raw.dtype == torch.uint8 and raw.shape == (64, 1024)
    assert torch.equal(FP32.decode(raw), x)


def test_bf16_rounds_to_nearest() -> None:
    x = _rows()
    y = BF16.decode(BF16.encode(x))
    assert torch.equal(y, x.to(torch.bfloat16).float())
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    assert BF16.decode(BF16.encode(x), out) is out
    assert torch.equal(out, x.to(torch.bfloat16))


def test_fp8_error_bound_relative_to_block_max() -> None:
    x = _rows()
    raw = FP8.encode(x)
    assert raw.shape == (64, 264)
    y = FP8.decode(raw)
    block_max = x.view(64, 8, 32).abs().amax(-1, keepdim=True)
    err = (y - x).view(64, 8, 32).abs()
    # e4m3 has 3 mantissa bits (relative step 2^-3, half that when rounding); the power-of-two
    # scale puts the block max in [224, 448], so the error is at most 2^-4 * 2 * block max.
    assert bool((err <= block_max * 2.0**-3 + 1e-30).all())
    # Scale bytes are the minimal power of two that fits the block max under 448.
    scales = raw[:, 256:].long() - 127
    assert bool((block_max.squeeze(-1) / 2.0 ** scales.double() <= 448).all())
    assert bool((block_max.squeeze(-1) / 2.0 ** (scales.double() - 1) > 448).all())


def test_fp8_hand_computed_bytes() -> None:
    raw = torch.zeros(1, 264, dtype=torch.uint8)
    raw[0, 0] = 0x38  # e4m3 1.0: sign 0, exponent 0111 (bias 7), mantissa 000
    raw[0, 1] = 0xB0  # e4m3 -0.5: sign 1, exponent 0110, mantissa 000
    raw[0, 32] = 0x3C  # e4m3 1.5 in block 1
    raw[0, 256] = 127  # block 0 scale 2^0
    raw[0, 257] = 129  # block 1 scale 2^2
    y = FP8.decode(raw)
    assert y[0, 0].item() == 1.0 and y[0, 1].item() == -0.5 and y[0, 32].item() == 6.0
    assert int(torch.count_nonzero(y)) == 3
    # Encoding [1.0, -0.5, 0...]: block max 1 -> scale 2^-8 (byte 119), q = 256, -128.
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1] = 1.0, -0.5
    enc = FP8.encode(x)
    assert enc[0, :2].tolist() == [0x78, 0xF0] and enc[0, 256].item() == 119
    assert torch.equal(FP8.decode(enc), x)


def test_fp8_zero_block_and_split_form() -> None:
    x = _rows(8, 256)
    x[3] = 0
    weight, scale = FP8.quantize(x)
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (8, 8)
    packed = pack_split(weight, scale)
    assert torch.equal(packed, FP8.encode(x))
    w2, s2 = unpack_split(packed)
    assert torch.equal(w2.view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(s2.view(torch.uint8), scale.view(torch.uint8))
    out = torch.empty(8, 256)
    assert torch.equal(decode_split(weight, scale, out), FP8.decode(packed))
    assert torch.equal(out[3], torch.zeros(256))


def test_decode_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        FP32.decode(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="out has shape"):
        FP32.decode(FP32.encode(torch.zeros(2, 4)), torch.empty(3, 4))
