# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Save an NVFP4 / MXFP4 base as a compressed-tensors checkpoint, the format vLLM serves on GPUs.

Per quantized Linear the checkpoint holds (compressed-tensors `nvfp4-pack-quantized` / `mxfp4-pack-quantized`):

- `weight_packed`: uint8 [out, in / 2], our E2M1 codes as they are (element 2i in the low nibble);
- `weight_scale`: NVFP4 float8_e4m3fn [out, in / 16]; MXFP4 uint8 biased E8M0 exponents [out, in / 32];
- `weight_global_scale` (NVFP4 only): fp32 [1] `= 1 / per_tensor_scale` (compressed-tensors and vLLM divide by it;
  our `per_tensor_scale` is torchao's multiplier `amax / 2688`). Shared within q/k/v and within gate/up.

The codes and scales are written as they are, never re-quantized with compressed-tensors' own numerics (which differ
from torchao's on bf16 weights), so decompressing the checkpoint gives back exactly our dequantized weights in bf16.
Every other tensor (embeddings, norms, lm_head, biases) is saved unchanged. `config.json` gets the
`quantization_config` built with compressed-tensors' own classes (`QuantizationConfig`, the NVFP4A16 / MXFP4A16 preset
schemes) and written by its `ModelCompressor.update_config`; layers left in high precision go to `ignore`.

Load it back with `AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(
dequantize=True))` (transformers decompresses to bf16 `nn.Linear`), or serve it with vLLM on a GPU (NVFP4: Marlin
W4A16 on Ampere/Hopper, native on Blackwell; not on the vLLM CPU backend).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qerl_repro.quantization.linear import FP4Linear, is_bnb_linear4bit


__all__ = ["CT_FORMAT", "build_quantization_config", "compressed_state_dict", "save_compressed_tensors"]

CT_FORMAT = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_CT_PRESET = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}  # weight-only: QeRL's base is W4A16


def _fp4_format(model: nn.Module) -> str:
    if hasattr(model, "peft_config") or any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError(
            "save_compressed_tensors expects a quantized base model without LoRA adapters (got a PEFT model). Save "
            "the adapter with `save_pretrained`, or export the base (`peft_model.get_base_model()` after "
            "`unload()`)."
        )
    if any(is_bnb_linear4bit(m) for m in model.modules()):
        raise ValueError("save_compressed_tensors exports NVFP4/MXFP4 (FP4Linear) models, not bitsandbytes NF4 ones.")
    formats = {m.fmt for m in model.modules() if isinstance(m, FP4Linear)}
    if not formats:
        raise ValueError("The model holds no FP4Linear layer: quantize it first with quantize_model_(model, 'nvfp4').")
    if len(formats) > 1:
        raise ValueError(f"The model mixes FP4 formats {sorted(formats)}; a compressed-tensors checkpoint holds one.")
    return formats.pop()


def build_quantization_config(fmt: str, ignore: list[str]):
    """compressed-tensors `QuantizationConfig` for a weight-only NVFP4 / MXFP4 checkpoint (status "compressed")."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    scheme = preset_name_to_scheme(_CT_PRESET[fmt], targets=["Linear"])
    return QuantizationConfig(
        config_groups={"group_0": scheme},
        format=CT_FORMAT[fmt],
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(ignore),
    )


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint tensors of a quantized model and the names of its high-precision Linear layers (`ignore`)."""
    state_dict = dict(model.state_dict())
    ignore: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FP4Linear):
            prefix = f"{name}." if name else ""
            pts = state_dict.pop(prefix + "per_tensor_scale", None)
            if module.fmt == "nvfp4":
                # compressed-tensors' divisor convention: x_hat = code * weight_scale / weight_global_scale.
                state_dict[prefix + "weight_global_scale"] = (1.0 / pts.to(torch.float32)).reshape(1)
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    return state_dict, ignore


def save_compressed_tensors(model: nn.Module, output_dir: str, *, tokenizer=None, max_shard_size="5GB") -> str:
    """Write `model` (quantized with `quantize_model_`, no LoRA) as a compressed-tensors checkpoint in `output_dir`.

    NVFP4 -> `nvfp4-pack-quantized`, MXFP4 -> `mxfp4-pack-quantized` (see the module docstring for the tensors).
    `tokenizer`, if given, is saved next to it. Returns `output_dir`.
    """
    from compressed_tensors.compressors import ModelCompressor

    fmt = _fp4_format(model)
    state_dict, ignore = compressed_state_dict(model)
    quantization_config = build_quantization_config(fmt, ignore)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    # compressed-tensors' own writer: adds `quantization_config` (with its version) to the saved config.json.
    ModelCompressor(quantization_config=quantization_config).update_config(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir
