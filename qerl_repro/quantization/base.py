# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Build the frozen 4-bit base of QeRL from a Hugging Face causal LM: NVFP4 / MXFP4 (`FP4Linear`), NF4 (bitsandbytes).

- `quantize_model_(model, "nvfp4" | "mxfp4")` replaces, in place, every `nn.Linear` except the output head (and
  anything belonging to a LoRA adapter) by a packed `FP4Linear`. Embeddings and norms stay in high precision. For
  NVFP4, q/k/v share one FP32 per-tensor scale and so do gate/up (the max amax of the group), as vLLM requires for
  its fused `qkv_proj` / `gate_up_proj` layers (it keeps one global scale per fused layer).
- `load_base_model(path, quant_format)` loads a checkpoint as the base QeRL trains on: "none" (bf16 or the given
  dtype), "nf4" (bitsandbytes at load time, QLoRA's recipe: NF4 + double quantization) or "nvfp4" / "mxfp4".
- `linear_weight_bytes(model)` counts the bytes the Linear layers hold for their weights (packed codes and scales
  included), for the memory benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qerl_repro.quantization.formats import (
    DEFAULT_MXFP4_SCALE_MODE,
    FP4_FORMATS,
    nvfp4_per_tensor_scale,
    validate_for_fp4,
)
from qerl_repro.quantization.linear import FP4Linear, is_bnb_linear4bit, is_quantized_linear


__all__ = [
    "QUANT_FORMATS",
    "SHARED_SCALE_GROUPS",
    "QuantizationPlan",
    "disable_bnb_cpu_repacking_",
    "fp4_quantization_plan",
    "linear_weight_bytes",
    "load_base_model",
    "quant_format_of",
    "quantize_model_",
]

QUANT_FORMATS = ("none", "nf4", "mxfp4", "nvfp4")
# Sibling Linear layers that vLLM fuses into one layer with a single NVFP4 global scale (qkv_proj, gate_up_proj).
SHARED_SCALE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Attribute names recorded on `model.config` so other code (trainer, export, model card) can tell what the base is.
CONFIG_FORMAT_ATTR = "qerl_quant_format"
CONFIG_SCALE_MODE_ATTR = "qerl_mxfp4_scale_mode"


def _check_quant_format(quant_format: str, valid=QUANT_FORMATS) -> None:
    if quant_format not in valid:
        raise ValueError(f"Unknown quant_format {quant_format!r}; valid formats are: {', '.join(valid)}.")


def _matches(name: str, patterns) -> bool:
    """True if one of `patterns` is a dotted path segment of `name` ("lm_head" matches "model.lm_head")."""
    dotted = f".{name}."
    return any(f".{pattern}." in dotted for pattern in patterns)


def _is_adapter_module(name: str) -> bool:
    # LoRA's own layers (lora_A, lora_B, lora_embedding_*, lora_magnitude_vector) and PEFT's trainable copies.
    return any(part.startswith("lora_") or part == "modules_to_save" for part in name.split("."))


def _canonical(name: str) -> str:
    """Module path without PEFT's `.base_layer` levels (so q_proj / k_proj / v_proj are siblings again)."""
    return name.replace(".base_layer", "")


def _shared_scale_key(name: str) -> tuple[str, int] | None:
    parent, _, leaf = _canonical(name).rpartition(".")
    for index, group in enumerate(SHARED_SCALE_GROUPS):
        if leaf in group:
            return parent, index
    return None


def _replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quant_format_of(model: nn.Module) -> str:
    """The base format of `model`: recorded on its config by this module, else inferred from its layers."""
    recorded = getattr(getattr(model, "config", None), CONFIG_FORMAT_ATTR, None)
    if recorded is not None:
        return recorded
    for module in model.modules():
        if isinstance(module, FP4Linear):
            return module.fmt
        if is_bnb_linear4bit(module):
            return "nf4"
    return "none"


def _record_format(model: nn.Module, quant_format: str, mxfp4_scale_mode: str | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    setattr(config, CONFIG_FORMAT_ATTR, quant_format)
    if quant_format == "mxfp4":
        setattr(config, CONFIG_SCALE_MODE_ATTR, mxfp4_scale_mode)
    elif hasattr(config, CONFIG_SCALE_MODE_ATTR):
        delattr(config, CONFIG_SCALE_MODE_ATTR)


@dataclass
class QuantizationPlan:
    """Which Linear layers of a model `quantize_model_` converts, and with which NVFP4 per-tensor scales."""

    fmt: str
    targets: list[str]  # module names to quantize, in model order
    skipped: list[str]  # Linear layers kept in high precision (skip_modules)
    per_tensor_scales: dict[str, torch.Tensor | None]  # NVFP4: the (shared) fp32 scale per target; MXFP4: None
    shared_scale_groups: list[list[str]]  # NVFP4: names sharing one per-tensor scale (q/k/v, gate/up)


@torch.no_grad()
def fp4_quantization_plan(model: nn.Module, fmt: str, *, skip_modules=("lm_head",)) -> QuantizationPlan:
    """Select the Linear layers to quantize to `fmt` and compute their NVFP4 per-tensor scales (shared in groups).

    Validates every selected weight (finite, last dimension a multiple of the block size) and raises a `ValueError`
    naming the layer otherwise; also raises for a weight tied to another module. See `quantize_model_`.
    """
    _check_quant_format(fmt, FP4_FORMATS)
    param_names: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(param), []).append(pname)

    targets: list[str] = []
    skipped: list[str] = []
    amax: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized_linear(module) or _is_adapter_module(name):
            continue
        if _matches(name, skip_modules) or _matches(_canonical(name), skip_modules):
            skipped.append(name)
            continue
        weight = module.weight
        tied = [n for n in param_names.get(id(weight), []) if n != f"{name}.weight"]
        if tied:
            raise ValueError(
                f"{name}.weight is shared with {', '.join(tied)} (tied weights): quantizing it would untie them. Add "
                f"{name!r} to skip_modules."
            )
        validate_for_fp4(weight.detach(), fmt, f"{name}.weight")
        targets.append(name)
        amax[name] = weight.detach().abs().amax().float()

    groups: dict[tuple[str, int], list[str]] = {}
    if fmt == "nvfp4":
        for name in targets:
            key = _shared_scale_key(name)
            if key is not None:
                groups.setdefault(key, []).append(name)
    per_tensor_scales: dict[str, torch.Tensor | None] = dict.fromkeys(targets)
    for members in groups.values():
        # QeRL/vLLM: one FP32 global scale per fused layer (qkv_proj, gate_up_proj) = max amax of the group / 2688.
        group_amax = torch.stack([amax[member] for member in members]).max()
        if float(group_amax) > 0:  # an all-zero group keeps formats' own scale for zero tensors
            for member in members:
                per_tensor_scales[member] = nvfp4_per_tensor_scale(group_amax)
    return QuantizationPlan(
        fmt=fmt,
        targets=targets,
        skipped=skipped,
        per_tensor_scales=per_tensor_scales,
        shared_scale_groups=[members for members in groups.values() if len(members) > 1],
    )


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    quant_format: str,
    *,
    skip_modules=("lm_head",),
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
) -> dict:
    """Replace, in place, every `nn.Linear` of `model` by a packed, frozen `FP4Linear` (NVFP4 or MXFP4).

    Skipped: modules matching `skip_modules` (dotted path segments, e.g. "lm_head" or "model.layers.0.mlp"), LoRA's
    own layers (`lora_*`) and PEFT `modules_to_save` copies. Embeddings, norms and every non-Linear parameter keep
    their values (CPU tensors are copied once, so that a memory-mapped checkpoint is released). For NVFP4, the
    per-tensor scale of q_proj/k_proj/v_proj (and of gate_proj/up_proj) under the same parent is computed from the max
    amax over the group (`SHARED_SCALE_GROUPS`). The model's config records the format
    (`config.qerl_quant_format`, plus `config.qerl_mxfp4_scale_mode`).

    Every weight is validated first (finite, last dimension a multiple of the block size), so a bad layer raises a
    `ValueError` naming it before anything is changed. Weights shared with another module (tied embeddings) raise too:
    add the layer to `skip_modules`.

    Args:
        model: the model (any `nn.Module`; a `PreTrainedModel` or a PEFT-wrapped one).
        quant_format: "nvfp4" or "mxfp4" (NF4 is quantized by bitsandbytes at load time: `load_base_model`).
        skip_modules: Linear layers to keep in high precision.
        mxfp4_scale_mode: MXFP4 only: "floor", "even" (default; compressed-tensors / vLLM) or "rceil".

    Returns:
        A summary dict: `quant_format`, `mxfp4_scale_mode` (or None), `num_quantized`, `quantized` (module names),
        `skipped` (Linear layers left in high precision), `shared_scale_groups` (lists of module names sharing one
        NVFP4 per-tensor scale), `bytes_before` / `bytes_after` (weight storage of the quantized layers) and `ratio`.
    """
    if quant_format == "nf4":
        raise ValueError(
            "quant_format='nf4' is quantized by bitsandbytes at load time: use load_base_model(path, 'nf4')."
        )
    _check_quant_format(quant_format, FP4_FORMATS)
    if any(is_quantized_linear(m) for m in model.modules()):
        raise ValueError(
            f"The model already holds quantized Linear layers ({quant_format_of(model)}); not quantizing twice."
        )

    plan = fp4_quantization_plan(model, quant_format, skip_modules=skip_modules)

    bytes_before = bytes_after = 0
    for name, per_tensor_scale in plan.per_tensor_scales.items():
        linear = model.get_submodule(name)
        new = FP4Linear.from_linear(
            linear, quant_format, per_tensor_scale=per_tensor_scale, mxfp4_scale_mode=mxfp4_scale_mode, name=name
        )
        bytes_before += linear.weight.numel() * linear.weight.element_size()
        bytes_after += new.packed_nbytes
        _replace_submodule(model, name, new)
        del linear

    _release_checkpoint_mapping_(model)
    scale_mode = mxfp4_scale_mode if quant_format == "mxfp4" else None
    _record_format(model, quant_format, scale_mode)
    return {
        "quant_format": quant_format,
        "mxfp4_scale_mode": scale_mode,
        "num_quantized": len(plan.targets),
        "quantized": plan.targets,
        "skipped": plan.skipped,
        "shared_scale_groups": plan.shared_scale_groups,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_after / bytes_before if bytes_before else float("nan"),
    }


def load_base_model(
    model_name_or_path: str,
    quant_format: str = "none",
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    skip_modules=("lm_head",),
    **from_pretrained_kwargs,
):
    """Load a causal LM as QeRL's frozen base in `quant_format`.

    - "none": `AutoModelForCausalLM.from_pretrained(..., dtype=dtype)`.
    - "nf4": bitsandbytes NF4 at load time, QLoRA's recipe (`load_in_4bit`, `bnb_4bit_quant_type="nf4"`, double
      quantization, compute dtype `dtype`). Works on CPU with bitsandbytes 0.50 (no `device_map` needed);
      bitsandbytes' CPU weight repacking is switched off (`disable_bnb_cpu_repacking_`).
    - "nvfp4" / "mxfp4": loaded in `dtype`, then `quantize_model_` (the summary is stored on
      `model.qerl_quantization_summary`).

    `model.config.qerl_quant_format` records the format. Extra keyword arguments go to `from_pretrained`.
    """
    _check_quant_format(quant_format)
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if "torch_dtype" in from_pretrained_kwargs:
        dtype = from_pretrained_kwargs.pop("torch_dtype")
    if quant_format == "nf4":
        from transformers import BitsAndBytesConfig

        if "quantization_config" in from_pretrained_kwargs:
            raise ValueError(
                "load_base_model(quant_format='nf4') builds its own quantization_config; do not pass one."
            )
        compute_dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        from_pretrained_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, **from_pretrained_kwargs)
    if quant_format == "nf4":
        disable_bnb_cpu_repacking_(model)
    if quant_format in FP4_FORMATS:
        model.qerl_quantization_summary = quantize_model_(
            model, quant_format, skip_modules=skip_modules, mxfp4_scale_mode=mxfp4_scale_mode
        )
    else:
        _record_format(model, quant_format, None)
    return model


@torch.no_grad()
def _release_checkpoint_mapping_(model: nn.Module) -> None:
    """Copy the CPU tensors that may still be views of the memory-mapped checkpoint (embeddings, norms, biases).

    transformers loads CPU weights as views of the mmapped safetensors file. After quantization the bf16 Linear
    weights are gone, but one remaining view keeps the whole mapping alive, and every page read while quantizing
    stays resident: measured on SmolLM2-135M, ~150 MB of RSS for nothing. The packed FP4 buffers are fresh tensors.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.device.type == "cpu":
                param.data = param.data.clone()
        if isinstance(module, FP4Linear):
            continue  # its packed buffers are fresh tensors
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "cpu":
                module._buffers[name] = buffer.clone()


def disable_bnb_cpu_repacking_(model: nn.Module) -> int:
    """Keep bitsandbytes from repacking NF4 weights for its CPU inference kernel; returns the number of layers.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 `Linear4bit.forward` rewrites the weight in place the first time
    it runs in eval mode on an input without gradient: the absmax is rounded to bf16 (the frozen base changes by ~0.2 %
    relative) and, measured here, later train-mode forwards break: layers without bias no longer propagate the input
    gradient through the base weight (silently; only LoRA's path gets gradients), layers with bias raise "a view of a
    leaf Variable that requires grad is being used in an in-place operation". So an evaluation before training would
    break QLoRA training.
    Setting `support_avx512bf16_for_cpu = False` keeps the standard layout and the autograd path.
    """
    count = 0
    for module in model.modules():
        if is_bnb_linear4bit(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _bnb_weight_bytes(module: nn.Module) -> int:
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    while state is not None:  # absmax (+ the double-quantization state of absmax), offset, code book
        for attr in ("absmax", "offset", "code"):
            tensor = getattr(state, attr, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        state = getattr(state, "state2", None)
    return total


def linear_weight_bytes(model: nn.Module, skip_modules=()) -> int:
    """Bytes held by the weight storage of the Linear layers of `model` (biases excluded).

    `FP4Linear`: packed codes + block scales + per-tensor scale; bitsandbytes `Linear4bit`: packed NF4 + its
    quantization state (absmax, double-quantized absmax, code books); `nn.Linear`: the weight. LoRA layers and the
    modules matching `skip_modules` are not counted; a storage shared by several layers (tied weights) counts once.
    """
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if _is_adapter_module(name) or _matches(_canonical(name), skip_modules):
            continue
        if isinstance(module, FP4Linear):
            total += module.packed_nbytes
        elif is_bnb_linear4bit(module):
            total += _bnb_weight_bytes(module)
        elif isinstance(module, nn.Linear):
            weight = module.weight
            key = weight.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += weight.numel() * weight.element_size()
    return total
