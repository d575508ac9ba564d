# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The weights the rollout engine receives: dequant(W_q) + LoRA delta, merged out of place in fp32.

TRL 1.16 syncs a PEFT model by `merge_adapter()` / `unmerge_adapter()`, i.e. `W += dW; W -= dW` in the base dtype: in
bf16 this drifts the frozen base a little at every sync (TRL issue #6688), and on a packed 4-bit base it cannot work at
all. `iter_rollout_weights(model)` instead yields, for every parameter the engine has, the tensor it should hold:

- LoRA-wrapped Linear: `(dequantized_weight(base).float() + sum_a scale_a * B_a @ A_a).to(base dtype)`;
- quantized Linear without LoRA (NVFP4/MXFP4 `FP4Linear`, bitsandbytes NF4): its dequantized weight;
- everything else (embeddings, norms, biases, `modules_to_save` copies): the parameter as is,
under the Hugging Face parameter name (PEFT prefixes removed), so `vllm_model.load_weights` maps it as TRL does.
Nothing is written to the model: the frozen base stays bit-identical however many syncs run.
"""

from collections.abc import Iterator

import torch
from torch import nn


def _canonical_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for fragment in (".base_layer", "_checkpoint_wrapped_module.", "modules_to_save.default."):
        name = name.replace(fragment, "")
    return name


def lora_delta_weight(layer: nn.Module) -> torch.Tensor | None:
    """Sum over the active adapters of `scaling * B @ A` in fp32 (`None` when adapters are disabled or absent)."""
    if getattr(layer, "disable_adapters", False):
        return None
    delta = None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter, False) or adapter in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"Adapter {adapter!r} uses a LoRA variant (e.g. DoRA); only plain LoRA can be synced to the rollout "
                "engine by qerl_repro's out-of-place merge."
            )
        a = layer.lora_A[adapter].weight.float()
        b = layer.lora_B[adapter].weight.float()
        term = (b @ a) * layer.scaling[adapter]
        if getattr(layer, "fan_in_fan_out", False):
            term = term.T
        delta = term if delta is None else delta + term
    return delta


def _is_lora_linear(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and hasattr(module, "scaling")


def iter_rollout_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight of the rollout engine; see the module docstring."""
    from qerl_repro.quantization.linear import dequantized_weight, is_quantized_linear

    emitted_params: set[int] = set()
    handled_modules: set[int] = set()
    for module_name, module in model.named_modules():
        if id(module) in handled_modules:
            continue
        if _is_lora_linear(module):
            base = module.get_base_layer()
            base_weight = dequantized_weight(base)
            delta = lora_delta_weight(module)
            weight = base_weight if delta is None else (base_weight.float() + delta).to(base_weight.dtype)
        elif is_quantized_linear(module):
            base = module
            weight = dequantized_weight(module)
        else:
            continue
        handled_modules.add(id(base))
        raw_weight = base._parameters.get("weight")  # not `base.weight`: on FP4Linear that dequantizes again
        if raw_weight is not None:
            emitted_params.add(id(raw_weight))
        yield _canonical_name(module_name) + ".weight", weight

    for name, param in model.named_parameters():
        if id(param) in emitted_params or "lora_" in name or "original_module" in name:
            continue
        yield _canonical_name(name), param.data
