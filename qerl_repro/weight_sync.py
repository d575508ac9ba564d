# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The weights the rollout engine receives: dequant(W_q) + LoRA delta, merged out of place in fp32.

TRL 1.16 syncs a PEFT model by `merge_adapter()` / `unmerge_adapter()`, i.e. `W += dW; W -= dW` in the base dtype: in
bf16 this drifts the frozen base a little at every sync (TRL issue #6688), and on a packed 4-bit base it cannot work at
all. `iter_rollout_weights(model)` instead yields, for every parameter the engine has, the tensor it should hold:

- LoRA-wrapped Linear: `dequantized_weight(base).float() + sum_a scale_a * B_a @ A_a`, in fp32 (an fp32 engine then
  holds it exactly; a bf16 engine rounds it once when it copies it in) or cast to `merged_dtype`;
- quantized Linear without LoRA (NVFP4/MXFP4 `FP4Linear`, bitsandbytes NF4): its dequantized weight;
- everything else (embeddings, norms, biases, `modules_to_save` copies): the parameter as is,
under the Hugging Face parameter name (PEFT prefixes removed), so `vllm_model.load_weights` maps it as TRL does.
Nothing is written to the model: the frozen base stays bit-identical however many syncs run.
"""

from collections.abc import Iterator

import torch
from torch import nn


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.31)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}).")


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


def iter_rollout_weights(
    model: nn.Module, *, merge_lora: bool = True, merged_dtype: torch.dtype | None = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight of the rollout engine; see the module docstring.

    `merge_lora=False` yields the dequantized base without the LoRA delta (the base an engine that serves the adapter
    unmerged must hold). `merged_dtype` is the dtype of the merged LoRA layers: fp32 by default (the engine rounds once
    to its own dtype), `None` for the base's dtype (half the bytes, e.g. over the network to a vLLM server)."""
    from qerl_repro.quantization.linear import dequantized_weight, is_quantized_linear

    emitted_params: set[int] = set()
    handled_modules: set[int] = set()
    for module_name, module in model.named_modules():
        if id(module) in handled_modules:
            continue
        if _is_lora_linear(module):
            base = module.get_base_layer()
            base_weight = dequantized_weight(base)
            delta = lora_delta_weight(module) if merge_lora else None
            if delta is None:
                weight = base_weight
            else:
                weight = (base_weight.float() + delta).to(merged_dtype or base_weight.dtype)
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


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA-wrapped Linear layers of `model`, keyed by canonical (transformers) module name."""
    return {_canonical_name(name): module for name, module in model.named_modules() if _is_lora_linear(module)}


def iter_trained_extra_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, tensor)` of the trained parameters that are not LoRA A/B: PEFT `modules_to_save` copies (e.g. the
    RMSNorm weights QeRL trains with `--ln`). An engine that serves the adapter unmerged receives these with
    `load_weights`, since vLLM's LoRA does not carry `modules_to_save` for causal LMs."""
    for name, param in model.named_parameters():
        if "modules_to_save." in name:
            yield _canonical_name(name), param.data


def save_engine_adapter(model: nn.Module, folder: str) -> str:
    """Write the policy's LoRA A/B tensors as a PEFT adapter folder that vLLM loads with a `LoRARequest`.

    Only the LoRA tensors go in (`modules_to_save` reach the engine through `load_weights`), under the names PEFT's
    `save_pretrained` uses (`base_model.model.<module>.lora_A.weight`), in the dtype training keeps them (vLLM casts
    them to its `lora_dtype` and folds `lora_alpha / r` into B when loading). Returns `folder`.
    """
    import json
    import os

    from safetensors.torch import save_file

    peft_configs = getattr(model, "peft_config", None)
    if not peft_configs:
        raise ValueError("save_engine_adapter needs a PEFT model with a LoRA adapter.")
    active = getattr(model, "active_adapters", None) or list(peft_configs)
    if len(active) != 1:
        raise NotImplementedError(f"Serving the adapter unmerged supports one active adapter, got {list(active)}.")
    adapter = active[0]
    config = peft_configs[adapter]
    if (
        getattr(config, "use_dora", False)
        or getattr(config, "rank_pattern", None)
        or getattr(config, "alpha_pattern", None)
    ):
        raise NotImplementedError(
            "Serving the adapter unmerged supports plain LoRA with one rank and alpha (no DoRA, rank_pattern or "
            "alpha_pattern); use vllm_adapter_sync='merged'."
        )
    tensors = {}
    for name, layer in lora_layers(model).items():
        if adapter not in layer.lora_A:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().contiguous()
    if not tensors:
        raise ValueError("The PEFT model has no LoRA Linear layer to serve.")
    config_dict = config.to_dict()
    config_dict["modules_to_save"] = None
    if isinstance(config_dict.get("target_modules"), set):
        config_dict["target_modules"] = sorted(config_dict["target_modules"])
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config_dict, f, default=str)
    return folder
