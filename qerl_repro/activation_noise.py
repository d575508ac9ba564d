# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The activation variant of AQN (`aqn_variant="activation"`): additive Gaussian noise on the hidden state right after
each targeted RMSNorm, during rollout generation only.

This is the variant the seed studies first ported to verl (reference/seed_studies.md): `h' = RMSNorm(x) + sigma * z`,
`z ~ N(0, I)` drawn independently for every token and channel at every forward pass, instead of QeRL's one noise vector
per norm weight and step (`w + z`, which multiplies the normalised activation by `1 + z / w`: see `qerl_repro.noise`).
Differences worth knowing when comparing the two:

- scale: the activation noise is absolute (`sigma` on a hidden state whose entries are of the size of the norm weight,
  ~1 for a fresh model), the weight noise relative (`sigma / |w|` times the activation);
- correlation: the weight noise is one perturbation of the model per step, shared by every token of every rollout of
  that step; the activation noise is fresh for every token, position and forward pass (draws: `qerl_repro.output_noise`).

Same targets (`find_norm_modules`: each block's attention-input and MLP-input norms, optionally the final and q/k
norms), same schedule (`aqn_sigma` with `aqn_decay`, `aqn_epoch_aware`), same seed (`aqn_seed`), same metrics
(`aqn/num_noised_modules` = hooked norms when sigma > 0; also `aqn/activation_noised_calls`). Off in evaluation
rollouts (`QeRLTrainer.clean_rollout_engine`) and never in the training forward: in vLLM the hooks live on the engine's
modules; with HF `generate` they are registered on the policy only for the duration of the generation.
"""

from contextlib import contextmanager

import torch
from torch import nn

from qerl_repro.noise import find_norm_modules, require_norm_targets
from qerl_repro.output_noise import OutputNoiseHooks, input_embedding_module


__all__ = ["ACTIVATION_NOISE_KIND", "ActivationNoise", "activation_noised", "add_activation_noise"]

ACTIVATION_NOISE_KIND = "aqn_activation"


def add_activation_noise(hidden: torch.Tensor, sigma: float, z: torch.Tensor) -> torch.Tensor:
    """`hidden + sigma * z`, computed in fp32 and rounded once to `hidden`'s dtype (the seeds' additive AQN).

    >>> add_activation_noise(torch.ones(2), 0.1, torch.tensor([1.0, -2.0]))
    tensor([1.1000, 0.8000])
    """
    return (hidden.float() + float(sigma) * z).to(hidden.dtype)


class ActivationNoise(OutputNoiseHooks):
    """Forward hooks adding `sigma * z` to the output of every targeted norm of `model` (vLLM, HF or PEFT model).

    `set_step(sigma, seed=, step=)` after every weight sync; `paused()` for evaluation rollouts; `remove()` to unhook.
    """

    def __init__(
        self, model: nn.Module, *, include_final_norm: bool = False, include_qk_norm: bool = False, description=""
    ):
        targets = find_norm_modules(model, include_final_norm=include_final_norm, include_qk_norm=include_qk_norm)
        require_norm_targets(targets, description or type(model).__name__)
        super().__init__(
            targets, input_embedding_module(model), kind=ACTIVATION_NOISE_KIND, perturb=add_activation_noise
        )


@contextmanager
def activation_noised(
    model: nn.Module,
    sigma: float,
    *,
    seed: int,
    step: int,
    include_final_norm: bool = False,
    include_qk_norm: bool = False,
    description: str = "",
):
    """Activation noise on `model` inside the block only (HF `generate` on the policy); yields the `ActivationNoise`
    (its `num_noised_calls` counts the perturbed norm calls). The hooks are removed on exit."""
    noise = ActivationNoise(
        model, include_final_norm=include_final_norm, include_qk_norm=include_qk_norm, description=description
    )
    noise.set_step(sigma, seed=seed, step=step)
    try:
        yield noise
    finally:
        noise.remove()
