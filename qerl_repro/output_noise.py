# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Seeded noise on module outputs through forward hooks: the mechanics shared by the activation variant of AQN
(`qerl_repro.activation_noise`, additive noise after each targeted RMSNorm) and the hardware-error simulation
(`qerl_repro.hardware_noise`, relative noise on Linear outputs).

How the noise is drawn (the reproducibility contract):

- every output element gets its own standard normal draw `z` (so every token, position and channel is perturbed
  independently), from a private `torch.Generator` on the output's device, seeded by a hash of
  `(kind, seed, step, index, forward)`: `step` is the optimizer step the noise belongs to, `index` the module's position
  in the naturally sorted target list, `forward` the number of model forward passes since the step began, counted by a
  forward pre-hook on the model's input embedding (one count per prefill / decode step of an engine, per HF `generate`
  step, per training forward). The global RNG is never touched.
- So the same `(seed, step)` and the same sequence of forward passes (same prompts, batching and sampling seed) give
  bit-identical noise, on every rank of a tensor-parallel engine too (the ranks see the same forward passes). Anything
  that changes the forward passes (other prompts, another batch split, prefix-cache hits) changes the draws.
- A module called again in the same forward pass with the same count draws the same noise. This is what keeps the
  noise of a training forward and of its gradient-checkpointing recomputation identical: the recomputation runs inside
  the backward pass, where the embedding is not called again.
- With the noise off (`scale == 0` or `enabled = False`) the hooks return nothing: outputs are bit-identical to an
  unhooked model.

vLLM modules return tuples (an RMSNorm with a residual returns `(normed, residual)`, a `LinearBase` returns
`(output, output_bias)`): only the first element is perturbed. The hooks need an eager engine: under torch.compile or
CUDA graphs a module's forward hooks are traced once or not at all, so `QeRLTrainer` builds the engine with
`enforce_eager=True` whenever hooks are used (and `QeRLConfig` refuses `vllm_enforce_eager=False` with them).
"""

import hashlib
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import nn


__all__ = ["OutputNoiseHooks", "input_embedding_module", "output_noise_seed", "standard_normal_like"]


def output_noise_seed(kind: str, seed: int, step: int, index: int, forward: int) -> int:
    """The 63-bit generator seed of one draw (a hash: nearby seeds, steps or indices give unrelated streams)."""
    text = f"qerl_repro.{kind}:{int(seed)}:{int(step)}:{int(index)}:{int(forward)}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def standard_normal_like(
    output: torch.Tensor, *, kind: str, seed: int, step: int, index: int, forward: int
) -> torch.Tensor:
    """`z ~ N(0, 1)` of `output`'s shape, fp32, on its device, from the private generator of the draw."""
    generator = torch.Generator(device=output.device)
    generator.manual_seed(output_noise_seed(kind, seed, step, index, forward))
    return torch.randn(output.shape, generator=generator, dtype=torch.float32, device=output.device)


_EMBEDDING_NAME_RE = re.compile(r"(?:.*\.)?(?:embed_tokens|wte|word_embeddings)")


def input_embedding_module(model: nn.Module) -> nn.Module:
    """The module called once at the start of every forward pass (the token embedding), HF, PEFT or vLLM model."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            module = get_embeddings()
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module):
            return module
    for name, module in model.named_modules():
        if _EMBEDDING_NAME_RE.fullmatch(name):
            return module
    raise ValueError(
        f"{type(model).__name__} has no input embedding (get_input_embeddings() or a module named embed_tokens): the "
        "noise hooks count forward passes there."
    )


class OutputNoiseHooks:
    """Forward hooks that replace the output `y` of each target module by `perturb(y, scale, z)` (z as in the module
    docstring) while `enabled` and `scale > 0`.

    Args:
        targets (`dict[str, nn.Module]`): the modules to perturb, in their noise-index order.
        forward_marker (`nn.Module`): a module called once per forward pass (`input_embedding_module(model)`).
        kind (`str`): names the noise stream (different kinds never share draws).
        perturb (`Callable[[Tensor, float, Tensor], Tensor]`): the pure noise formula, `(y, scale, z) -> y'`.
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        forward_marker: nn.Module,
        *,
        kind: str,
        perturb: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    ):
        if not targets:
            raise ValueError(f"No module to perturb ({kind}).")
        self.targets = dict(targets)
        self.kind = kind
        self.perturb = perturb
        self.scale = 0.0
        self.seed = 0
        self.step = -1
        self.enabled = True
        self.forward_index = 0
        self.num_noised_calls = 0  # target calls that were perturbed since the step began
        self._handles = [forward_marker.register_forward_pre_hook(self._count_forward)]
        for index, module in enumerate(self.targets.values()):
            self._handles.append(module.register_forward_hook(self._output_hook(index)))

    @property
    def active(self) -> bool:
        return self.enabled and self.scale > 0

    def set_step(self, scale: float, *, seed: int, step: int) -> int:
        """Noise of scale `scale` for optimizer step `step` from now on (the forward count restarts at 0); returns how
        many modules will be perturbed (0 when `scale == 0`)."""
        if not scale >= 0:
            raise ValueError(f"The noise scale must be >= 0, got {scale!r}.")
        self.scale, self.seed, self.step = float(scale), int(seed), int(step)
        self.forward_index = 0
        self.num_noised_calls = 0
        return len(self.targets) if scale > 0 else 0

    def begin_step(self, scale: float, *, seed: int, step: int) -> int:
        """`set_step` unless already at this `(scale, seed, step)` (e.g. the second micro-batch of a step)."""
        if (float(scale), int(seed), int(step)) != (self.scale, self.seed, self.step):
            return self.set_step(scale, seed=seed, step=step)
        return len(self.targets) if scale > 0 else 0

    def _count_forward(self, module, args):
        if self.active:
            self.forward_index += 1

    def _output_hook(self, index: int):
        def hook(module, args, output):
            if not self.active:
                return None
            value = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(value) or not value.is_floating_point():
                return None
            z = standard_normal_like(
                value, kind=self.kind, seed=self.seed, step=self.step, index=index, forward=self.forward_index
            )
            self.num_noised_calls += 1
            noisy = self.perturb(value, self.scale, z)
            return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

        return hook

    @contextmanager
    def paused(self):
        """No noise inside the block; the previous `enabled` state afterwards."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextmanager
    def switched(self, enabled: bool):
        """`enabled` set to the given value inside the block, restored afterwards."""
        previous, self.enabled = self.enabled, enabled
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Remove every hook (the model computes exactly as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
