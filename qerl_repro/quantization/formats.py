# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""FP4 number formats: the E2M1 element, NVFP4 and MXFP4 (pure torch, fp32 math, eager).

QeRL (https://huggingface.co/papers/2510.11696, Sec. 3) freezes the base model in NVFP4 or MXFP4. Both formats store
4-bit E2M1 elements in blocks along the last (reduction) dimension, with one scale per block:

- **NVFP4**: blocks of 16, an FP8 E4M3 block scale and an FP32 per-tensor scale `amax / (448 * 6)` (two levels).
- **MXFP4** (OCP Microscaling v1.0): blocks of 32 and a power-of-two E8M0 block scale (8-bit biased exponent).

The numerics are those of torchao 0.18 (`NVFP4Tensor.to_nvfp4(x, per_tensor_scale=amax / 2688)` and
`MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=...)`, quantize then `dequantize`), reproduced bit for bit
for fp32 and bf16 inputs: same operations, same order, same fp32 rounding. The MXFP4 "even" mode is also bit-exact with
compressed-tensors' MXFP4 fake quantization, i.e. with the `mxfp4-pack-quantized` checkpoints vLLM loads.

Layouts follow the compressed-tensors / vLLM checkpoint format: E2M1 codes are `sign << 3 | index` and two codes share a
byte, element `2i` in the low nibble. Unlike compressed-tensors, `per_tensor_scale` here is torchao's multiplier
`amax / 2688`; compressed-tensors stores its reciprocal as `weight_global_scale`.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch


FP4_FORMATS = ("nvfp4", "mxfp4")
BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32}
MXFP4_SCALE_MODES = ("floor", "even", "rceil")
# "even" rounds the block amax to one mantissa bit before taking its power of two. It is what compressed-tensors,
# llm-compressor and vLLM (`mxfp4-pack-quantized`) compute, so it is what QeRL's MXFP4 checkpoints would hold; it also has
# the lowest error of the three on Gaussian weights. "floor" is the OCP spec's minimal recipe and torchao's `to_mx`
# default; "rceil" (2^ceil(log2(amax / 6))) is torchao's MX inference/QAT default and the Blackwell hardware conversion.
DEFAULT_MXFP4_SCALE_MODE = "even"

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # torch.finfo(torch.float8_e4m3fn).tiny: torchao's lower clamp of NVFP4 block scales
NVFP4_PER_TENSOR_DIVISOR = E4M3_MAX * E2M1_MAX  # 2688
E8M0_BIAS = 127
E8M0_NAN = 255
E2M1_EMAX = 2  # floor(log2(6)): exponent of the largest power of two representable in E2M1

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_F32_MANTISSA_BITS = 23
_F32_MIN_NORMAL = 2.0**-126

# Decision thresholds on |x| between consecutive E2M1 magnitudes. A tie goes to the even index (round half to even):
# 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. `torch.bucketize(right=False)` counts
# thresholds strictly below |x|, so the thresholds whose tie rounds up are moved down by one fp32 ulp.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)


def _threshold_tensor(device: torch.device) -> torch.Tensor:
    t = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=device)
    up = torch.tensor([m in _E2M1_TIES_UP for m in _E2M1_MIDPOINTS], device=device)
    return torch.where(up, torch.nextafter(t, torch.zeros_like(t)), t)


def _e2m1_index(x32: torch.Tensor) -> torch.Tensor:
    """Magnitude index 0..7 (int64) of fp32 `x32` after RNE rounding and saturation at 6."""
    return torch.bucketize(x32.abs(), _threshold_tensor(x32.device), right=False)


def _e2m1_lut(device: torch.device) -> torch.Tensor:
    """The 16 code values (codes 8..15 are the negatives, 8 is -0.0)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


_F32_SIGN_BIT = -(2**31)  # 0x80000000 as an int32
_F32_EXPONENT_BITS = 0x7F800000
# Adding 2^22 * 2^floor(log2(max(a, 1))) to a magnitude a in [0, 6] rounds it (fp32 addition, ties to even) to a
# multiple of 0.5 below 2, of 1 in [2, 4) and of 2 in [4, 6]: the E2M1 grid. The exponent of that magic number is the
# exponent of max(a, 1) plus 22.
_E2M1_MAGIC_EXPONENT_OFFSET = 22 << _F32_MANTISSA_BITS


def _round_e2m1_magnitude_(a: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Round fp32 magnitudes `a` (>= 0, no NaN) in place to E2M1 (ties to even, saturating at 6); returns `a`.

    Arithmetic instead of a table lookup, so it runs as a few vectorised passes: clamp to 6, build the magic number
    of each element in `scratch` (fp32, same shape), then `(a + magic) - magic`. Equal to the midpoint thresholds of
    `_e2m1_index` on every fp32 input (tested against it and against torchao on a dense sweep).
    """
    a.clamp_(max=E2M1_MAX)
    torch.clamp(a, min=1.0, out=scratch)
    magic = scratch.view(torch.int32)
    magic.bitwise_and_(_F32_EXPONENT_BITS).add_(_E2M1_MAGIC_EXPONENT_OFFSET)
    return a.add_(scratch).sub_(scratch)


def _e2m1_round_f32(x32: torch.Tensor) -> torch.Tensor:
    rounded = _round_e2m1_magnitude_(x32.abs(), torch.empty_like(x32))
    return torch.copysign(rounded, x32)


def _e2m1_round_f32_table(x32: torch.Tensor) -> torch.Tensor:
    """`_e2m1_round_f32` by midpoint thresholds and a table lookup: the independent reference of the tests."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x32.device)
    return torch.copysign(mags[_e2m1_index(x32)], x32)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value, ties to even, saturating at +-6 (the input is already scaled).

    Computed in fp32; returned in `x.dtype` (every E2M1 value is exact in any float dtype). Negative inputs that round
    to zero give -0.0, as the sign bit of the code is kept.

    >>> e2m1_round(torch.tensor([0.25, 0.75, 2.5, 3.5, 7.0, -1.3]))
    tensor([ 0.0000,  1.0000,  2.0000,  4.0000,  6.0000, -1.5000])
    """
    return _e2m1_round_f32(x.float()).to(x.dtype)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15, `sign << 3 | index` into `E2M1_VALUES`) of the already scaled `x`, RNE + saturation."""
    x32 = x.float()
    index = _e2m1_index(x32).to(torch.uint8)
    sign = torch.signbit(x32).to(torch.uint8)
    return index | (sign << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (uint8 0..15; only the low nibble is read)."""
    return _e2m1_lut(codes.device)[(codes & 0x0F).long()]


@functools.cache
def _packed_byte_lut(device: torch.device) -> torch.Tensor:
    """[256] int64: the two float32 E2M1 values of every packed byte (low nibble first) as one 8-byte word each, so
    that decoding is a 1-D `index_select` of 8-byte scalars (built once per device)."""
    codes = torch.arange(256, device=device)
    lut = _e2m1_lut(device)
    pairs = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=-1).contiguous()
    return pairs.view(torch.int64).reshape(256)


def decode_packed_fp4(packed: torch.Tensor) -> torch.Tensor:
    """float32 values [..., 2k] of packed bytes [..., k]; equal to `e2m1_decode(unpack_fp4(packed))`.

    One lookup per byte in a cached 256-entry table of value pairs (`index_select` on a 1-D int64 table with int32
    indices; 5-50x faster on CPU than `F.embedding` on a [256, 2] table, which copies rows one by one): this runs in
    every forward and backward of `FP4Linear`.
    """
    words = _packed_byte_lut(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return words.view(torch.float32).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


_scratch = threading.local()


def _scratch_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D buffer of at least `numel` elements, per thread (grown, never shrunk), on CPU; elsewhere a new
    tensor (CUDA's caching allocator already reuses memory without page faults)."""
    if torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        setattr(_scratch, name, buffer)
    return buffer[:numel]


def _decode_packed_fp4_scratch(packed: torch.Tensor) -> torch.Tensor:
    """`decode_packed_fp4` into per-thread scratch buffers (the result is overwritten by the next call).

    `FP4Linear` dequantizes every layer in every forward and backward: reusing the index and value buffers instead of
    allocating them each time saves the page faults of fresh memory, a large part of the decode's cost on CPU.
    """
    numel = packed.numel()
    index = _scratch_buffer("index", numel, torch.int32, packed.device)
    index.copy_(packed.reshape(-1))
    words = _scratch_buffer("words", numel, torch.int64, packed.device)
    torch.index_select(_packed_byte_lut(packed.device), 0, index, out=words)
    return words.view(torch.float32).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [..., 2k] into bytes [..., k]: element 2i in the low nibble, element 2i+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8) & 0x0F
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 bytes [..., k] -> codes [..., 2k]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


@dataclass
class QuantizedFP4:
    """A tensor stored in NVFP4 or MXFP4.

    Attributes:
        fmt: "nvfp4" or "mxfp4".
        packed: uint8 [..., n / 2], two E2M1 codes per byte (element 2i in the low nibble).
        block_scale: NVFP4: torch.float8_e4m3fn [..., n / 16]. MXFP4: uint8 biased E8M0 exponent [..., n / 32]
            (the scale is 2^(e - 127)).
        per_tensor_scale: NVFP4: fp32 0-dim tensor `amax / 2688` (torchao's convention; the dequantized value is
            `code * block_scale * per_tensor_scale`). None for MXFP4.
        shape: the original shape.
        dtype: the original dtype (the default output dtype of `dequantize`).
    """

    fmt: str
    packed: torch.Tensor
    block_scale: torch.Tensor
    per_tensor_scale: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE[self.fmt]

    def codes(self) -> torch.Tensor:
        """Unpacked E2M1 codes (uint8), in the original shape."""
        return unpack_fp4(self.packed).reshape(self.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def _check_format(fmt: str, name: str) -> None:
    if fmt not in FP4_FORMATS:
        raise ValueError(f"Unknown FP4 format {fmt!r} for {name}; valid formats are: {', '.join(FP4_FORMATS)}.")


def _check_scale_mode(mode: str, name: str) -> None:
    if mode not in MXFP4_SCALE_MODES:
        raise ValueError(
            f"Unknown MXFP4 scale mode {mode!r} for {name}; valid modes are: {', '.join(MXFP4_SCALE_MODES)}."
        )


def validate_for_fp4(x: torch.Tensor, fmt: str, name: str = "tensor") -> None:
    """Raise a `ValueError` naming `name` if `x` cannot be quantized to `fmt`.

    Checks: known format, a floating-point tensor (fp32, bf16, fp16 or fp64), at least one dimension, not empty, last
    dimension a multiple of the block size (16 for NVFP4, 32 for MXFP4), and no NaN or Inf (the reference
    implementations turn them silently into NaN blocks, a NaN tensor, or finite garbage).
    """
    _validate_layout(x, fmt, name)
    if not bool(torch.isfinite(x).all()):
        _raise_non_finite(x, fmt, name)


def _validate_layout(x: torch.Tensor, fmt: str, name: str) -> None:
    """`validate_for_fp4` without the NaN/Inf check (which `fake_quantize` folds into its amax pass)."""
    _check_format(fmt, name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor to quantize to {fmt}, got {type(x).__name__}.")
    if x.dtype not in _SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _SUPPORTED_DTYPES)
        raise ValueError(
            f"{name}: {fmt} quantization needs a floating-point tensor ({supported}), got dtype {x.dtype}."
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: {fmt} quantization needs at least one dimension, got a 0-dim tensor.")
    if x.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(x.shape)}) to {fmt}.")
    block = BLOCK_SIZE[fmt]
    if x.shape[-1] % block:
        raise ValueError(
            f"{name}: the last dimension ({x.shape[-1]}, shape {tuple(x.shape)}) must be a multiple of the {fmt} "
            f"block size {block}."
        )


def _raise_non_finite(x: torch.Tensor, fmt: str, name: str) -> None:
    finite = torch.isfinite(x)
    num_nan = int(torch.isnan(x).sum())
    num_inf = int((~finite).sum()) - num_nan
    raise ValueError(
        f"{name}: cannot quantize to {fmt}: the tensor (shape {tuple(x.shape)}) contains {num_nan} NaN and "
        f"{num_inf} Inf values out of {x.numel()}."
    )


def _as_per_tensor_scale(per_tensor_scale, name: str) -> torch.Tensor:
    pts = torch.as_tensor(per_tensor_scale).detach()
    if pts.numel() != 1:
        raise ValueError(f"{name}: per_tensor_scale must hold a single value, got shape {tuple(pts.shape)}.")
    pts = pts.to(torch.float32).reshape(())
    if not bool(torch.isfinite(pts)) or float(pts) <= 0.0:
        raise ValueError(f"{name}: per_tensor_scale must be finite and > 0 (amax / 2688), got {float(pts)}.")
    return pts


# ---------------------------------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------------------------------


def nvfp4_per_tensor_scale(amax) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale `amax / (448 * 6)`: the largest block then uses the full E4M3 scale range.

    Pass the max amax over a group (q/k/v, gate/up) to share one scale, as vLLM requires for fused layers.
    """
    return torch.as_tensor(amax).to(torch.float32) / NVFP4_PER_TENSOR_DIVISOR


def _nvfp4_scale_and_scaled(x: torch.Tensor, per_tensor_scale, name: str):
    """Shared NVFP4 steps: fp32 blocks [..., nb, 16], scaled to the E2M1 range, plus the E4M3 block scales."""
    x32 = x.detach().to(torch.float32)
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK_SIZE["nvfp4"], BLOCK_SIZE["nvfp4"])
    if per_tensor_scale is None:
        pts = nvfp4_per_tensor_scale(x32.abs().amax())
        if float(pts) == 0.0:
            # An all-zero tensor: amax / 2688 = 0 would make every scale NaN (torchao); any positive scale gives
            # exact zeros. 1.0 is also what compressed-tensors stores for it (global scale nan_to_num'd to 1).
            pts = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        pts = _as_per_tensor_scale(per_tensor_scale, name).to(x.device)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / E2M1_MAX) / pts
    block_scale_fp8 = block_scale.clamp(min=E4M3_MIN_NORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
    # One fp32 multiplier per block, (1 / pts) / s_b, as torchao computes it (multiply, do not divide).
    multiplier = (1.0 / pts) / block_scale_fp8.to(torch.float32)
    scaled = blocks * multiplier.unsqueeze(-1)
    return scaled, block_scale_fp8, pts


def _nvfp4_dequantize_values(values: torch.Tensor, block_scale_fp8: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    # QeRL (Eq. 6): W_hat = W_fp4 * S_fp8 * S_fp32, one E4M3 scale per block of 16 and one FP32 scale per tensor.
    return values * (pts * block_scale_fp8.to(torch.float32)).unsqueeze(-1)


def quantize_nvfp4(x: torch.Tensor, per_tensor_scale=None, *, name: str = "tensor") -> QuantizedFP4:
    """Two-level NVFP4 quantization, bit-exact with torchao 0.18 `NVFP4Tensor.to_nvfp4(x, 16, amax / 2688)`.

    Computed in fp32: `pts = amax / 2688`, `s_b = e4m3(clamp((amax_b / 6) / pts, 2^-6, 448))`,
    `code = E2M1_rne(x * ((1 / pts) / s_b))`.

    Args:
        x: floating tensor, last dimension a multiple of 16.
        per_tensor_scale: FP32 scale `amax / 2688` to use instead of this tensor's own (e.g. shared by q/k/v from the
            max amax of the group; see `nvfp4_per_tensor_scale`). Default: from `x`'s amax.
        name: names `x` in error messages.
    """
    if isinstance(x, torch.Tensor) and x.dtype in _FAST_DTYPES:
        scales, pts = _validated_chunk_scales(x, "nvfp4", per_tensor_scale, DEFAULT_MXFP4_SCALE_MODE, name)
        packed, block_scale = _quantize_chunked(x.detach(), BLOCK_SIZE["nvfp4"], scales)
        return QuantizedFP4("nvfp4", packed, _e4m3_from_normal_f32(block_scale), pts, x.shape, x.dtype)
    return quantize_reference(x, "nvfp4", per_tensor_scale=per_tensor_scale, name=name)


def quantize_reference(
    x: torch.Tensor,
    fmt: str,
    *,
    per_tensor_scale=None,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    name: str = "tensor",
) -> QuantizedFP4:
    """`quantize_nvfp4` / `quantize_mxfp4` step by step on whole fp32 tensors, in torchao's order of operations (used
    for fp64 inputs, and by the tests as the reference of the chunked path)."""
    validate_for_fp4(x, fmt, name)
    if fmt == "nvfp4":
        scaled, block_scale_fp8, pts = _nvfp4_scale_and_scaled(x, per_tensor_scale, name)
        codes = e2m1_encode(scaled).reshape(x.shape)
        return QuantizedFP4("nvfp4", pack_fp4(codes), block_scale_fp8, pts, x.shape, x.dtype)
    _check_scale_mode(mxfp4_scale_mode, name)
    scaled, biased = _mxfp4_scale_and_scaled(x, mxfp4_scale_mode)
    codes = e2m1_encode(scaled).reshape(x.shape)
    return QuantizedFP4("mxfp4", pack_fp4(codes), biased, None, x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------------------------------


def _pow2_from_biased(biased: torch.Tensor) -> torch.Tensor:
    """fp32 2^(b - 127) for biased exponents b in 1..254 (bits `b << 23`); b = 0 gives 0.0, b = 255 gives +Inf."""
    return torch.bitwise_left_shift(biased.to(torch.int32), _F32_MANTISSA_BITS).view(torch.float32)


def _mxfp4_scale_and_scaled(x: torch.Tensor, scale_mode: str):
    """Shared MXFP4 steps: fp32 blocks [..., nb, 32], divided by the block scale, plus the biased E8M0 exponents."""
    x32 = x.detach().to(torch.float32)
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK_SIZE["mxfp4"], BLOCK_SIZE["mxfp4"])
    amax = blocks.abs().amax(dim=-1)
    if scale_mode == "rceil":
        # 2^ceil(log2(amax / 6)), with fp32 log2 as torchao's eager code computes it.
        exponent = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(min=-E8M0_BIAS, max=E8M0_BIAS)
        biased = (exponent + E8M0_BIAS).to(torch.uint8)
        # torchao multiplies by 2^(127 - b), and by 1.0 when b == 0 (the block is zero, or below 2^-124).
        multiplier = torch.where(biased == 0, 1.0, torch.exp2(E8M0_BIAS - biased.to(torch.float32)))
        scaled = blocks * multiplier.unsqueeze(-1)
        return scaled, biased
    bits = amax.view(torch.int32)
    if scale_mode == "even":
        # Round amax to one mantissa bit (E2M1's), carrying into the exponent: [1.75, 2) * 2^k -> 2^(k + 1).
        bits = (bits + (1 << (_F32_MANTISSA_BITS - 2))) & ~((1 << _F32_MANTISSA_BITS) - 1)
    # OCP MX (Sec. 6.3): shared exponent = floor(log2(amax)) - emax(E2M1), read from the fp32 exponent bits.
    unbiased = ((bits >> _F32_MANTISSA_BITS) & 0xFF) - E8M0_BIAS - E2M1_EMAX
    biased = (unbiased.clamp(min=-E8M0_BIAS, max=E8M0_BIAS + 1) + E8M0_BIAS).to(torch.uint8)
    # torchao divides by the scale, held at least at the smallest fp32 normal 2^-126.
    divisor = _pow2_from_biased(biased).clamp(min=_F32_MIN_NORMAL)
    scaled = blocks / divisor.unsqueeze(-1)
    return scaled, biased


def _mxfp4_dequantize_values(values: torch.Tensor, biased: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # OCP MX: x_hat = P_i * 2^(e - 127). torchao multiplies in the output dtype (fp32 or bf16: exact, same result);
    # other dtypes multiply in fp32 and round once, so that fp16 does not flush scales below 2^-24 to zero.
    scale = torch.exp2(biased.to(torch.float32) - E8M0_BIAS)
    scale = torch.where(biased == E8M0_NAN, float("nan"), scale)
    compute_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    return (values.to(compute_dtype) * scale.to(compute_dtype).unsqueeze(-1)).to(dtype)


def quantize_mxfp4(
    x: torch.Tensor, scale_mode: str = DEFAULT_MXFP4_SCALE_MODE, *, name: str = "tensor"
) -> QuantizedFP4:
    """MXFP4 quantization (E2M1 elements, E8M0 scale per block of 32).

    Bit-exact with torchao 0.18 `MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=...)` for each mode;
    "even" is also bit-exact with compressed-tensors' MXFP4. See `DEFAULT_MXFP4_SCALE_MODE` for the choice of modes.
    Block exponents (unbiased, before the clamp to [-127, 127]):

    - "floor": floor(log2(amax)) - 2 (OCP spec); blocks with amax in (6, 8) * 2^e saturate at 6 * 2^e.
    - "even": the same after rounding amax to one mantissa bit.
    - "rceil": ceil(log2(amax / 6)); never saturates.
    """
    _check_scale_mode(scale_mode, name)
    if isinstance(x, torch.Tensor) and x.dtype in _FAST_DTYPES:
        scales, _ = _validated_chunk_scales(x, "mxfp4", None, scale_mode, name)
        packed, biased = _quantize_chunked(x.detach(), BLOCK_SIZE["mxfp4"], scales)
        return QuantizedFP4("mxfp4", packed, biased, None, x.shape, x.dtype)
    return quantize_reference(x, "mxfp4", mxfp4_scale_mode=scale_mode, name=name)


# ---------------------------------------------------------------------------------------------------------------------
# Dequantize and fake quantize
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def _e4m3_lut(device: torch.device) -> torch.Tensor:
    """[256] float32: the value of every float8_e4m3fn bit pattern (built once per device)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).to(torch.float32)


def _e4m3_to_f32(x: torch.Tensor) -> torch.Tensor:
    """`x.to(torch.float32)` for a float8_e4m3fn tensor by table lookup (torch's fp8 cast is a slow scalar loop)."""
    index = x.view(torch.uint8).reshape(-1).to(torch.int32)
    return _e4m3_lut(x.device).index_select(0, index).reshape(x.shape)


def _block_scales_f32(q: QuantizedFP4) -> torch.Tensor:
    """fp32 multiplier of each block [..., n / block]: NVFP4 `pts * s_b`, MXFP4 `2^(e - 127)` (NaN for e = 255)."""
    if q.fmt == "nvfp4":
        # QeRL (Eq. 6): W_hat = W_fp4 * S_fp8 * S_fp32, one E4M3 scale per block of 16 and one FP32 scale per tensor.
        return q.per_tensor_scale * _e4m3_to_f32(q.block_scale)
    scale = torch.exp2(q.block_scale.to(torch.float32) - E8M0_BIAS)
    return torch.where(q.block_scale == E8M0_NAN, float("nan"), scale)


def dequantize(q: QuantizedFP4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the original dtype), exactly as torchao's `dequantize(dtype)` does.

    Every value is the fp32 product `E2M1 value * fp32 block scale`, rounded once to `dtype`. That is torchao's result:
    NVFP4 multiplies in fp32 and casts; MXFP4 multiplies in the output dtype, which for bf16 is also an fp32 product
    rounded once (its scales are powers of two, so the fp32 product is exact anyway). For bf16 / fp16 / fp32 outputs
    the products come from a table of all (block scale, byte) pairs (`_dequantize_by_scaled_table`, one lookup per
    byte); otherwise the bytes are decoded to fp32 and multiplied (`torch.mul(..., out=...)` casts on store).
    """
    _check_format(q.fmt, "QuantizedFP4")
    dtype = q.dtype if dtype is None else dtype
    if dtype in _TABLE_WORD_DTYPE and (q.fmt == "mxfp4" or q.block_scale.dtype == torch.float8_e4m3fn):
        return _dequantize_by_scaled_table(q, dtype)
    block = BLOCK_SIZE[q.fmt]
    values = _decode_packed_fp4_scratch(q.packed).reshape(*q.shape[:-1], q.shape[-1] // block, block)
    scale = _block_scales_f32(q).unsqueeze(-1)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return (values * scale).to(dtype).reshape(q.shape)
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    return torch.mul(values, scale, out=out).reshape(q.shape)


# The two dequantized values of one packed byte, as one word: two 2-byte or two 4-byte floats.
_TABLE_WORD_DTYPE = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def _scaled_byte_table(q: QuantizedFP4, dtype: torch.dtype) -> torch.Tensor:
    """[256 * 256] words: entry `scale_code * 256 + byte` holds the two values of `byte` dequantized with the block
    scale whose stored code (E4M3 or E8M0 bit pattern) is `scale_code`, rounded to `dtype` exactly as `dequantize`
    rounds them (fp32 product, one rounding)."""
    codes = torch.arange(256, dtype=torch.uint8, device=q.packed.device)
    if q.fmt == "nvfp4":
        scale = q.per_tensor_scale * _e4m3_lut(codes.device)  # QeRL (Eq. 6): S_fp32 * S_fp8, every E4M3 code
    else:
        scale = torch.exp2(codes.to(torch.float32) - E8M0_BIAS)  # every E8M0 code
        scale = torch.where(codes == E8M0_NAN, float("nan"), scale)
    pairs = _packed_byte_lut(codes.device).view(torch.float32).view(1, 256, 2)
    table = torch.empty(256, 256, 2, dtype=dtype, device=codes.device)
    torch.mul(pairs, scale.view(256, 1, 1), out=table)
    return table.view(_TABLE_WORD_DTYPE[dtype]).reshape(-1)


def _dequantize_by_scaled_table(q: QuantizedFP4, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` with one lookup per packed byte in a table of pre-scaled value pairs (`_scaled_byte_table`).

    A layer has at most 256 distinct block scales, so the 65536 products of (scale, byte) are computed once per call
    and every byte of the weight is then one 1-D `index_select` straight into the output: no fp32 intermediate the
    size of the weight and no separate scaling pass (this runs in every forward and backward of `FP4Linear`).
    """
    bytes_per_block = BLOCK_SIZE[q.fmt] // 2
    packed = q.packed.reshape(-1, bytes_per_block)
    index = _scratch_buffer("index", packed.numel(), torch.int32, packed.device).view(packed.shape)
    index.copy_(packed)
    scale_codes = q.block_scale.view(torch.uint8).reshape(-1, 1).to(torch.int32)
    index.bitwise_or_(scale_codes.bitwise_left_shift_(8))
    out = torch.empty(q.shape, dtype=dtype, device=packed.device)
    words = out.view(_TABLE_WORD_DTYPE[dtype]).view(-1)
    torch.index_select(_scaled_byte_table(q, dtype), 0, index.view(-1), out=words)
    return out


def dequantize_reference(q: QuantizedFP4, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize` by unpacking nibbles and decoding each code, in torchao's order of operations (the independent
    reference of the tests; slow)."""
    _check_format(q.fmt, "QuantizedFP4")
    dtype = q.dtype if dtype is None else dtype
    block = BLOCK_SIZE[q.fmt]
    values = e2m1_decode(unpack_fp4(q.packed)).reshape(*q.shape[:-1], q.shape[-1] // block, block)
    if q.fmt == "nvfp4":
        out = _nvfp4_dequantize_values(values, q.block_scale, q.per_tensor_scale).to(dtype)
    else:
        out = _mxfp4_dequantize_values(values, q.block_scale, dtype)
    return out.reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    per_tensor_scale=None,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    name: str = "tensor",
) -> torch.Tensor:
    """Quantize-dequantize `x` to `fmt` ("nvfp4" or "mxfp4"): same shape and dtype as `x`.

    Equal to `dequantize(quantize_<fmt>(x, ...))` (without the packing round trip), hence bit-exact with torchao's
    quantize-then-dequantize for fp32 and bf16. The last dimension must be a multiple of the block size (16 / 32).
    No gradient flows through it; use `qerl_repro.quantization.fake_quantize_ste` for a straight-through estimator.

    Args:
        x: the tensor.
        fmt: "nvfp4" or "mxfp4".
        per_tensor_scale: NVFP4 only: a shared FP32 per-tensor scale (`amax / 2688`), default from `x`.
        mxfp4_scale_mode: MXFP4 only: "floor", "even" or "rceil".
        name: names `x` in error messages.
    """
    if fmt == "mxfp4":
        _check_scale_mode(mxfp4_scale_mode, name)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FAST_DTYPES:
        return fake_quantize_reference(
            x, fmt, per_tensor_scale=per_tensor_scale, mxfp4_scale_mode=mxfp4_scale_mode, name=name
        )
    scales, _ = _validated_chunk_scales(x, fmt, per_tensor_scale, mxfp4_scale_mode, name)
    return _fake_quantize_chunked(x.detach(), BLOCK_SIZE[fmt], scales)


def _validated_chunk_scales(x: torch.Tensor, fmt: str, per_tensor_scale, mxfp4_scale_mode: str, name: str):
    """Validate `x` (NaN/Inf found by the one amax pass over `x`) and return `(scales, per_tensor_scale)`: the
    per-chunk block-scale function of `_rounded_chunks` and, for NVFP4, the FP32 per-tensor scale (None for MXFP4)."""
    _validate_layout(x, fmt, name)
    low, high = torch.aminmax(x.detach())
    amax = torch.maximum(-low, high).to(torch.float32)
    if not bool(torch.isfinite(amax)):
        _raise_non_finite(x, fmt, name)
    if fmt == "mxfp4":
        return functools.partial(_mxfp4_chunk_scales, scale_mode=mxfp4_scale_mode), None
    if per_tensor_scale is None:
        pts = nvfp4_per_tensor_scale(amax)
        if float(pts) == 0.0:  # all zero: see `_nvfp4_scale_and_scaled`
            pts = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        pts = _as_per_tensor_scale(per_tensor_scale, name).to(x.device)
    return functools.partial(_nvfp4_chunk_scales, pts=pts), pts


def _e4m3_from_normal_f32(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn tensor of fp32 values that are E4M3 normals (>= 2^-6, <= 448): the bits, rebiased (exponent bias
    127 -> 7) and shifted, without torch's slow scalar fp8 cast."""
    bits = (x.view(torch.int32) >> _E4M3_DROPPED_BITS) - ((E8M0_BIAS - 7) << 3)
    return bits.to(torch.uint8).view(torch.float8_e4m3fn)


def fake_quantize_reference(
    x: torch.Tensor,
    fmt: str,
    *,
    per_tensor_scale=None,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    name: str = "tensor",
) -> torch.Tensor:
    """`fake_quantize` step by step on whole fp32 tensors, in torchao's order of operations (used for fp64 inputs;
    slower, several full-size temporaries)."""
    validate_for_fp4(x, fmt, name)
    if fmt == "nvfp4":
        scaled, block_scale_fp8, pts = _nvfp4_scale_and_scaled(x, per_tensor_scale, name)
        out = _nvfp4_dequantize_values(_e2m1_round_f32(scaled), block_scale_fp8, pts).to(x.dtype)
    else:
        _check_scale_mode(mxfp4_scale_mode, name)
        scaled, biased = _mxfp4_scale_and_scaled(x, mxfp4_scale_mode)
        out = _mxfp4_dequantize_values(_e2m1_round_f32(scaled), biased, x.dtype)
    return out.reshape(x.shape)


# Rows are processed in chunks of about this many elements, so that the fp32 working set (three buffers of 4 bytes per
# element) stays in the CPU's L2 cache across the ~12 in-place passes of `_fake_quantize_chunked`.
FAKE_QUANTIZE_CHUNK_ELEMENTS = 1 << 18
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nvfp4_chunk_scales(block_amax: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """NVFP4 (multiplier into the E2M1 range, dequantization scale, fp32 E4M3 block scale) per block, as
    `_nvfp4_scale_and_scaled`."""
    block_scale = _round_to_e4m3_normal_f32(((block_amax / E2M1_MAX) / pts).clamp(min=E4M3_MIN_NORMAL, max=E4M3_MAX))
    return (1.0 / pts) / block_scale, pts * block_scale, block_scale


_E4M3_DROPPED_BITS = _F32_MANTISSA_BITS - 3  # E4M3 keeps 3 of fp32's 23 mantissa bits


def _round_to_e4m3_normal_f32(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x.to(float8_e4m3fn).to(float32)` for fp32 `x` in E4M3's normal range [2^-6, 448]: round the mantissa to
    3 bits, ties to even, on the bit pattern (vectorised integer ops; torch's fp8 cast is a slow scalar loop on CPU)."""
    bits = x.view(torch.int32)
    half_minus_one = (1 << (_E4M3_DROPPED_BITS - 1)) - 1
    rounded = (bits + half_minus_one + ((bits >> _E4M3_DROPPED_BITS) & 1)) & ~((1 << _E4M3_DROPPED_BITS) - 1)
    return rounded.view(torch.float32)


def _mxfp4_chunk_scales(block_amax: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, ...]:
    """MXFP4 (multiplier into the E2M1 range, dequantization scale, biased E8M0 exponent) per block, as
    `_mxfp4_scale_and_scaled`.

    The multiplier is exact: torchao divides by a power of two 2^k (k >= -126), the same as multiplying by 2^-k.
    """
    if scale_mode == "rceil":
        exponent = torch.ceil(torch.log2(block_amax / E2M1_MAX)).clamp(min=-E8M0_BIAS, max=E8M0_BIAS)
        biased = (exponent + E8M0_BIAS).to(torch.uint8)
        multiplier = torch.where(biased == 0, 1.0, torch.exp2(E8M0_BIAS - biased.to(torch.float32)))
    else:
        bits = block_amax.view(torch.int32)
        if scale_mode == "even":
            bits = (bits + (1 << (_F32_MANTISSA_BITS - 2))) & ~((1 << _F32_MANTISSA_BITS) - 1)
        unbiased = ((bits >> _F32_MANTISSA_BITS) & 0xFF) - E8M0_BIAS - E2M1_EMAX
        biased = (unbiased.clamp(min=-E8M0_BIAS, max=E8M0_BIAS + 1) + E8M0_BIAS).to(torch.uint8)
        multiplier = 1.0 / _pow2_from_biased(biased).clamp(min=_F32_MIN_NORMAL)
    scale = torch.exp2(biased.to(torch.float32) - E8M0_BIAS)
    return multiplier, torch.where(biased == E8M0_NAN, float("nan"), scale), biased


def _rounded_chunks(x: torch.Tensor, block: int, scales):
    """Yield `(start, magnitudes, signs, scale, stored_scale)` for each chunk of rows of `x` (reused buffers, valid until
    the next chunk): the fp32 magnitudes already scaled into the E2M1 range and rounded, their sign bits (int32), the
    dequantization scale and the stored block scale of each block.

    Per chunk: fp32 copy, sign bits set aside, magnitudes, block amax, `scales(block_amax)` -> (multiplier, scale,
    stored), multiply into the E2M1 range, round (`_round_e2m1_magnitude_`). Every fp32 operation is torchao's, on the
    same operands, in the same order, on |x| instead of x, which rounds symmetrically.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    chunk_rows = max(1, FAKE_QUANTIZE_CHUNK_ELEMENTS // n)
    buffer_rows = min(chunk_rows, rows.shape[0])
    work = torch.empty(buffer_rows, n, dtype=torch.float32, device=x.device)
    scratch = torch.empty_like(work)
    signs = torch.empty(buffer_rows, n, dtype=torch.int32, device=x.device)
    for start in range(0, rows.shape[0], chunk_rows):
        source = rows[start : start + chunk_rows]
        k = source.shape[0]
        a, m, sign = work[:k], scratch[:k], signs[:k]
        a.copy_(source)
        bits = a.view(torch.int32)
        torch.bitwise_and(bits, _F32_SIGN_BIT, out=sign)
        bits.bitwise_and_(~_F32_SIGN_BIT)  # |x|
        # The largest magnitude of each block, as the largest bit pattern (the same order for non-negative floats;
        # an int32 max is several times faster than a float max on CPU).
        block_amax = bits.view(k, n // block, block).amax(dim=-1).view(torch.float32)
        multiplier, scale, stored = scales(block_amax)
        a.view(k, n // block, block).mul_(multiplier.unsqueeze(-1))
        _round_e2m1_magnitude_(a, m)
        yield start, a, sign, scale, stored


def _fake_quantize_chunked(x: torch.Tensor, block: int, scales) -> torch.Tensor:
    """Quantize-dequantize `x` chunk by chunk (`_rounded_chunks`): multiply the rounded magnitudes by the scale,
    restore the signs (the products are exact up to the same fp32 rounding either way) and cast into the output."""
    n = x.shape[-1]
    out = torch.empty_like(x).reshape(-1, n)
    for start, a, sign, scale, _ in _rounded_chunks(x, block, scales):
        k = a.shape[0]
        a.view(k, n // block, block).mul_(scale.unsqueeze(-1))
        a.view(torch.int32).bitwise_or_(sign)
        out[start : start + k].copy_(a)
    return out.reshape(x.shape)


_E2M1_ONE_INDEX_SHIFT = _F32_MANTISSA_BITS - 1  # bits >> 22 of an E2M1 value >= 1 is its index + 252
_E2M1_ONE_INDEX_OFFSET = 252  # 1.0 (biased exponent 127, mantissa bit 0: bits >> 22 = 254) is index 2


def _quantize_chunked(x: torch.Tensor, block: int, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 codes (uint8 [..., n / 2]) and stored block scales ([..., n / block]) of `x`, chunk by chunk.

    The index of a rounded magnitude r is read from its fp32 bits: `(bits >> 22) - 252` for r >= 1 (exponent and the
    one mantissa bit), and `min(2 r, 1)` for r in {0, 0.5}; the larger of the two is the index in both cases.
    """
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    packed = torch.empty(rows.shape[0], n // 2, dtype=torch.uint8, device=x.device)
    stored_chunks = []
    index = small = None
    for start, a, sign, _, stored in _rounded_chunks(x, block, scales):
        k = a.shape[0]
        if index is None:
            index = torch.empty(a.shape, dtype=torch.int32, device=x.device)
            small = torch.empty(a.shape, dtype=torch.int32, device=x.device)
        idx, low = index[:k], small[:k]
        torch.bitwise_right_shift(a.view(torch.int32), _E2M1_ONE_INDEX_SHIFT, out=idx)
        idx.sub_(_E2M1_ONE_INDEX_OFFSET)
        low.copy_(a.mul_(2.0).clamp_(max=1.0))  # a is no longer needed: 0 -> 0, 0.5 -> 1, anything >= 1 -> 1
        torch.maximum(idx, low, out=idx)
        idx.bitwise_or_(sign.bitwise_right_shift_(28).bitwise_and_(8))  # the sign bit -> bit 3 of the code
        codes = idx.view(k, n // 2, 2)
        torch.bitwise_or(codes[..., 0], codes[..., 1] << 4, out=low.view(-1)[: k * n // 2].view(k, n // 2))
        packed[start : start + k].copy_(low.view(-1)[: k * n // 2].view(k, n // 2))
        stored_chunks.append(stored)
    scales_out = torch.cat(stored_chunks).reshape(*x.shape[:-1], n // block)
    return packed.reshape(*x.shape[:-1], n // 2), scales_out


# ---------------------------------------------------------------------------------------------------------------------
# Error metrics
# ---------------------------------------------------------------------------------------------------------------------


def _check_pair(w: torch.Tensor, w_hat: torch.Tensor) -> None:
    if w.shape != w_hat.shape:
        raise ValueError(f"shape mismatch: w {tuple(w.shape)} vs w_hat {tuple(w_hat.shape)}")


def relative_frobenius_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """`||w - w_hat||_F / ||w||_F`, computed in float64 (nan when w is all zero)."""
    _check_pair(w, w_hat)
    w64 = w.detach().double()
    den = torch.linalg.vector_norm(w64)
    num = torch.linalg.vector_norm(w64 - w_hat.detach().double())
    return float(num / den) if float(den) > 0 else float("nan")


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio `10 log10(sum w^2 / sum (w - w_hat)^2)` in dB (inf when exact)."""
    rel = relative_frobenius_error(w, w_hat)
    if rel == 0.0:
        return math.inf
    return -20.0 * math.log10(rel)


def deadzone_fraction(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Share of the non-zero weights of `w` that quantize to exactly zero in `w_hat` (nan when w is all zero)."""
    _check_pair(w, w_hat)
    nonzero = w.detach() != 0
    count = int(nonzero.sum())
    if count == 0:
        return float("nan")
    return int((nonzero & (w_hat.detach() == 0)).sum()) / count
