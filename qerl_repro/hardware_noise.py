# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Hardware-error simulation (`hw_error`, `hw_error_where`): relative Gaussian noise on the outputs of the decoder
blocks' Linear layers, `y <- y + eps * |y| * z`, `z ~ N(0, 1)` per output element, as the seed studies did (5 %
"matmul noise" to mimic numerical differences between GPUs and NPUs; reference/seed_studies.md).

Which layers: every Linear of every decoder block (`...layers.<i>.<...>`: q/k/v/o, gate/up/down or their fused vLLM
forms), never `lm_head` or the embeddings (the seeds' fake-quantization exclusions). A LoRA-wrapped layer is perturbed
at its output, `base(x) + B A x`, not inside it: the LoRA A/B products get no noise of their own, and the perturbed
value is the layer output in the training policy and in the rollout engine alike (vLLM merged: one Linear; vLLM
unmerged: its LoRA layer wrapper, whose `base_layer` forward vLLM bypasses). The packed 4-bit bases (`FP4Linear`,
bitsandbytes `Linear4bit`) are `nn.Linear`s and are found the same way.

Where: `"train"` the policy's forwards in the trainer (log-probabilities and the loss; off in evaluation, i.e. when the
module is not in training mode), `"rollout"` the rollout generation (vLLM engine, or HF `generate` on the policy),
`"both"`. Off in evaluation rollouts (`QeRLTrainer.clean_rollout_engine`).

Gradient: the perturbation is treated as a constant (`y + (eps * |y| * z).detach()`): it models a numerical error of
the result, not a function of the weights, so gradients flow as through the clean layer. Draws: `qerl_repro.output_noise`
(a gradient-checkpointing recomputation draws the same noise as the forward it repeats).
"""

import re

import torch
from torch import nn

from qerl_repro.noise import _active_named_modules, _natural_key
from qerl_repro.output_noise import OutputNoiseHooks, input_embedding_module


__all__ = ["HW_ERROR_WHERE", "HardwareErrorNoise", "find_hw_error_linears", "relative_output_noise"]

HW_ERROR_WHERE = ("train", "rollout", "both")

# A module inside a decoder block: `<anything>.layers.<i>.<anything>`.
_IN_BLOCK_RE = re.compile(r"(?:.*\.)?layers\.\d+\..+")
# LoRA's own pieces and the layer a wrapper calls (PEFT `base_layer`, `lora_A` / `lora_B` / `lora_dropout` dicts).
_LORA_PARTS = re.compile(r"(?:^|\.)(?:base_layer|lora_[A-Za-z_]+)(?:\.|$)")
# Linear classes by name along the MRO (no vLLM import): vLLM's LinearBase and its LoRA wrappers, PEFT's LoRA layer.
_LINEAR_CLASS_NAMES = frozenset({"LinearBase", "BaseLinearLayerWithLoRA", "LoraLayer"})


def relative_output_noise(output: torch.Tensor, eps: float, z: torch.Tensor) -> torch.Tensor:
    """`y + eps * |y| * z`, the perturbation computed in fp32 and detached (a constant for autograd).

    >>> relative_output_noise(torch.tensor([2.0, -4.0]), 0.05, torch.tensor([1.0, 1.0]))
    tensor([ 2.1000, -3.8000])
    """
    perturbation = (float(eps) * output.detach().float().abs() * z).to(output.dtype)
    return output + perturbation


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return any(cls.__name__ in _LINEAR_CLASS_NAMES for cls in type(module).__mro__)


def find_hw_error_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers of the decoder blocks of an HF, PEFT or vLLM model by canonical name, naturally sorted: a
    LoRA-wrapped layer as its wrapper (its base layer and A/B are not listed)."""
    found = {
        name: module
        for name, module in _active_named_modules(model).items()
        if _IN_BLOCK_RE.fullmatch(name) and not _LORA_PARTS.search(name) and _is_linear(module)
    }
    return {name: found[name] for name in sorted(found, key=_natural_key)}


class HardwareErrorNoise(OutputNoiseHooks):
    """Forward hooks applying `relative_output_noise` to every `find_hw_error_linears(model)` layer.

    `begin_step(eps, seed=, step=)` at each optimizer step (or weight sync), `switched(enabled)` / `paused()` to gate
    it, `only_in_training_mode=True` (the policy) leaves modules in eval mode (evaluation) untouched.
    """

    def __init__(self, model: nn.Module, *, kind: str, only_in_training_mode: bool = False, description: str = ""):
        targets = find_hw_error_linears(model)
        if not targets:
            raise ValueError(
                f"hw_error > 0 but {description or type(model).__name__} has no Linear layer inside a decoder block "
                "(`...layers.<i>...`): the run would silently have no hardware error."
            )
        self.only_in_training_mode = only_in_training_mode
        super().__init__(targets, input_embedding_module(model), kind=kind, perturb=relative_output_noise)

    def _output_hook(self, index: int):
        hook = super()._output_hook(index)
        if not self.only_in_training_mode:
            return hook

        def training_only(module, args, output):
            return hook(module, args, output) if module.training else None

        return training_only
