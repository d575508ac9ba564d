# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The fast FP4 paths (issue 12) against their independent references, bit for bit: the arithmetic E2M1 rounding
against the midpoint-threshold table, the integer E4M3 rounding against torch's float8 cast, the chunked in-place
`fake_quantize` against the whole-tensor step-by-step `fake_quantize_reference` and torchao 0.18 (several chunks and a
partial last chunk), and the one-pass `dequantize` against the nibble-by-nibble `dequantize_reference`."""

import pytest
import torch

from qerl_repro.quantization import formats
from qerl_repro.quantization.formats import (
    MXFP4_SCALE_MODES,
    dequantize,
    dequantize_reference,
    fake_quantize,
    fake_quantize_reference,
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_reference,
)


torchao_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
torchao_nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
torchao_config = pytest.importorskip("torchao.prototype.mx_formats.config")

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (tells -0.0 from 0.0, which `torch.equal` does not)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))
    )


def _wide_range_tensor(shape, dtype, seed=0):
    """Gaussian times a per-column magnitude from 1e-6 to 1e4, with exact zeros, negative zeros and sign flips."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 4, shape[-1])
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::13] = -0.0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# E2M1 rounding by magic-number addition
# ---------------------------------------------------------------------------------------------------------------------

E2M1_MAGNITUDE_CASES = [
    (0.0, 0.0),  # zero
    (2.0**-149, 0.0),  # smallest fp32 subnormal
    (0.25, 0.0),  # tie -> even (0)
    (0.75, 1.0),  # tie -> even (1)
    (1.25, 1.0),  # tie -> even (1), step 0.5 below 2
    (1.75, 2.0),  # tie across the 2 boundary -> even (2)
    (1.9999999, 2.0),  # just below 2, still step 0.5
    (2.5, 2.0),  # tie -> even (2), step 1 in [2, 4)
    (3.5, 4.0),  # tie across the 4 boundary -> even (4)
    (3.9999998, 4.0),  # just below 4
    (5.0, 4.0),  # tie -> even (4), step 2 in [4, 6]
    (5.0000005, 6.0),  # one ulp above the tie
    (6.0, 6.0),  # max
    (6.9999995, 6.0),  # saturation below the (6, 8) tie
    (7.0, 6.0),  # saturation at the (6, 8) tie, which ties-to-even alone would send to 8
    (3.0e38, 6.0),  # saturation, far out
]


@pytest.mark.parametrize("magnitude, expected", E2M1_MAGNITUDE_CASES)
def test_round_e2m1_magnitude_literal_cases(magnitude, expected):
    a = torch.tensor([magnitude], dtype=torch.float32)
    assert formats._round_e2m1_magnitude_(a, torch.empty_like(a)).item() == expected


def test_round_e2m1_magnitude_matches_threshold_table_on_dense_sweep():
    # Every fp32 around every E2M1 midpoint and value (+-64 ulps), plus a log-uniform sweep over the whole fp32 range.
    anchors = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0])
    offsets = torch.arange(-64, 65, dtype=torch.int32)
    near = (anchors.view(torch.int32)[:, None] + offsets[None, :]).view(torch.float32).flatten()
    near = near[torch.isfinite(near) & (near >= 0)]
    g = torch.Generator().manual_seed(0)
    sweep = torch.exp2(torch.empty(1 << 20).uniform_(-149, 127.9, generator=g))
    x = torch.cat([near, sweep])
    for sign in (1.0, -1.0):
        signed = sign * x
        expected = formats._e2m1_round_f32_table(signed)
        assert _bits_equal(formats._e2m1_round_f32(signed), expected)


# ---------------------------------------------------------------------------------------------------------------------
# E4M3 block-scale rounding on the bit pattern
# ---------------------------------------------------------------------------------------------------------------------


def test_round_to_e4m3_normal_matches_torch_float8_cast():
    # Every E4M3 normal value, every midpoint between neighbours (ties) and +-1..3 fp32 ulps around both.
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    values = torch.unique(e4m3[torch.isfinite(e4m3) & (e4m3 >= formats.E4M3_MIN_NORMAL)])
    midpoints = (values[:-1] + values[1:]) / 2  # exact in fp32
    anchors = torch.cat([values, midpoints])
    offsets = torch.tensor([-3, -2, -1, 0, 1, 2, 3], dtype=torch.int32)
    x = (anchors.view(torch.int32)[:, None] + offsets[None, :]).view(torch.float32).flatten()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([x, torch.exp2(torch.empty(1 << 18).uniform_(-6, 8.807, generator=g))])
    x = x.clamp(min=formats.E4M3_MIN_NORMAL, max=formats.E4M3_MAX)
    assert torch.equal(formats._round_to_e4m3_normal_f32(x), x.to(torch.float8_e4m3fn).to(torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Chunked fake_quantize
# ---------------------------------------------------------------------------------------------------------------------

RECIPES = [
    ("nvfp4", {}),  # per-tensor scale from the tensor's amax
    ("nvfp4", {"per_tensor_scale": 1e-5}),  # a too-small shared scale: block scales clamp at 448, elements saturate
    ("nvfp4", {"per_tensor_scale": 1e3}),  # a too-large shared scale: block scales clamp at 2^-6
    *[("mxfp4", {"mxfp4_scale_mode": mode}) for mode in MXFP4_SCALE_MODES],
]


@pytest.mark.parametrize("fmt, kwargs", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 96), (96,), (2, 3, 64)])
def test_fake_quantize_matches_reference(fmt, kwargs, dtype, shape, monkeypatch):
    # A chunk of 2 rows (3 chunks for 5 rows, the last one partial) exercises the buffer reuse across chunks.
    monkeypatch.setattr(formats, "FAKE_QUANTIZE_CHUNK_ELEMENTS", 2 * shape[-1])
    x = _wide_range_tensor(shape, dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    out = fake_quantize(x, fmt, **kwargs)
    assert _bits_equal(out, fake_quantize_reference(x, fmt, **kwargs))


@pytest.mark.parametrize("fmt, kwargs", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_reference(fmt, kwargs, dtype, monkeypatch):
    # Packed codes (every code 0..15 occurs, -0.0 included), stored block scales and per-tensor scale, chunk by chunk.
    monkeypatch.setattr(formats, "FAKE_QUANTIZE_CHUNK_ELEMENTS", 2 * 96)
    x = _wide_range_tensor((5, 96), dtype, seed=2)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    if fmt == "nvfp4":
        q = quantize_nvfp4(x, kwargs.get("per_tensor_scale"))
    else:
        q = quantize_mxfp4(x, kwargs["mxfp4_scale_mode"])
    ref = quantize_reference(x, fmt, **kwargs)
    assert torch.equal(q.packed, ref.packed)
    assert q.block_scale.dtype == ref.block_scale.dtype
    assert torch.equal(q.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
    assert (q.per_tensor_scale is None) == (ref.per_tensor_scale is None)
    if q.per_tensor_scale is not None:
        assert torch.equal(q.per_tensor_scale, ref.per_tensor_scale)
    assert (q.shape, q.dtype) == (ref.shape, ref.dtype)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quantize_all_zero_and_float64(fmt):
    zeros = torch.zeros(3, 64, dtype=torch.bfloat16)
    assert _bits_equal(fake_quantize(zeros, fmt), zeros)
    x64 = _wide_range_tensor((4, 64), torch.float64)
    assert torch.equal(fake_quantize(x64, fmt), fake_quantize_reference(x64, fmt))  # fp64 takes the reference path


def _torchao_fake_quantize(x, fmt):
    if fmt == "nvfp4":
        scale = torchao_nvfp4.per_tensor_amax_to_scale(x.abs().amax())
        return torchao_nvfp4.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(x.dtype)
    mode = torchao_config.ScaleCalculationMode.EVEN
    return torchao_mx.MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=mode).dequantize(x.dtype)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quantize_bit_identical_to_torchao_over_several_chunks(fmt):
    # 150 rows of 4096 = 3 chunks of the default size (64 rows each), the last one partial: the bench's row width.
    g = torch.Generator().manual_seed(3)
    x = (0.02 * torch.randn(150, 4096, generator=g)).to(torch.bfloat16)
    x[7, :100] *= 300  # an outlier row segment: large block scales next to small ones
    assert formats.FAKE_QUANTIZE_CHUNK_ELEMENTS // 4096 < 150
    assert _bits_equal(fake_quantize(x, fmt), _torchao_fake_quantize(x, fmt))


# ---------------------------------------------------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("weights", ["gaussian", "wide_range"])
def test_dequantize_matches_nibble_reference(fmt, out_dtype, weights):
    # Gaussian bf16 weights give full-precision NVFP4 scales `pts * s_b`, where rounding the product once (fp32 then
    # `out_dtype`) differs from multiplying in bf16 on ~8 % of the elements: a wrong order of operations shows.
    g = torch.Generator().manual_seed(4)
    if weights == "gaussian":
        x = (0.02 * torch.randn(64, 256, generator=g)).to(torch.bfloat16)
    else:
        x = _wide_range_tensor((6, 128), torch.bfloat16, seed=4)
    q = quantize_nvfp4(x) if fmt == "nvfp4" else quantize_mxfp4(x)
    out, ref = dequantize(q, out_dtype), dequantize_reference(q, out_dtype)
    assert out.dtype == ref.dtype == (out_dtype or torch.bfloat16)
    if out.dtype == torch.float64:
        assert torch.equal(out, ref) and torch.equal(torch.signbit(out), torch.signbit(ref))
    else:
        assert _bits_equal(out, ref)
    if out_dtype is None:
        assert _bits_equal(out, fake_quantize(x, fmt))


def test_e4m3_table_matches_torch_cast_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    out, ref = formats._e4m3_to_f32(codes), codes.to(torch.float32)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))  # bit patterns: NaNs, -0.0 and subnormals too


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_e8m0_nan_code(out_dtype):
    # E8M0 255 is NaN (OCP MX): the block dequantizes to NaN, the others do not change.
    q = quantize_mxfp4(_wide_range_tensor((2, 64), torch.bfloat16, seed=5))
    q.block_scale[1, 0] = formats.E8M0_NAN
    out, ref = dequantize(q, out_dtype), dequantize_reference(q, out_dtype)
    assert torch.isnan(out[1, :32]).all() and not torch.isnan(out[1, 32:]).any() and not torch.isnan(out[0]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0))
