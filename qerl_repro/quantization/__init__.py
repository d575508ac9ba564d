# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""FP4 quantization for QeRL: E2M1 / NVFP4 / MXFP4 numerics (`formats`), straight-through estimators (`ste`), the
packed 4-bit base layer (`linear`), building bf16 / NF4 / MXFP4 / NVFP4 bases (`base`), compressed-tensors checkpoints
(`export`) and the per-layer error report (`report`)."""

from .base import linear_weight_bytes, load_base_model, quantize_model_
from .export import save_compressed_tensors
from .formats import (
    BLOCK_SIZE,
    DEFAULT_MXFP4_SCALE_MODE,
    E2M1_VALUES,
    FP4_FORMATS,
    MXFP4_SCALE_MODES,
    QuantizedFP4,
    deadzone_fraction,
    decode_packed_fp4,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    e2m1_round,
    fake_quantize,
    nvfp4_per_tensor_scale,
    pack_fp4,
    quantize_mxfp4,
    quantize_nvfp4,
    relative_frobenius_error,
    sqnr_db,
    unpack_fp4,
    validate_for_fp4,
)
from .linear import FP4Linear, dequantized_weight, is_quantized_linear
from .ste import FakeQuantizeSTE, FakeQuantLinear, apply_fake_quant_, fake_quantize_ste


__all__ = [
    "FP4Linear",
    "dequantized_weight",
    "is_quantized_linear",
    "linear_weight_bytes",
    "load_base_model",
    "quantize_model_",
    "save_compressed_tensors",
    "BLOCK_SIZE",
    "DEFAULT_MXFP4_SCALE_MODE",
    "E2M1_VALUES",
    "FP4_FORMATS",
    "MXFP4_SCALE_MODES",
    "FakeQuantLinear",
    "FakeQuantizeSTE",
    "QuantizedFP4",
    "apply_fake_quant_",
    "deadzone_fraction",
    "dequantize",
    "decode_packed_fp4",
    "e2m1_decode",
    "e2m1_encode",
    "e2m1_round",
    "fake_quantize",
    "fake_quantize_ste",
    "nvfp4_per_tensor_scale",
    "pack_fp4",
    "quantize_mxfp4",
    "quantize_nvfp4",
    "relative_frobenius_error",
    "sqnr_db",
    "unpack_fp4",
    "validate_for_fp4",
]
