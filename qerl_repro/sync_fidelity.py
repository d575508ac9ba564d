# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""How much of the policy's weight update the rollout engine really holds: `sync/update_lost_frac`.

A LoRA policy's Linear weight is `W = dequant(W_q) + dW` with `dW = scaling * B @ A` in fp32. A rollout engine holds
an approximation of it: merged into one bf16 tensor (TRL's sync: `bf16(dequant(W_q) + dW)`, where every element of `dW`
below half a bf16 step of `W` is rounded away), or unmerged (base and adapter kept apart, as QeRL served it). The
metric compares, on a fixed sample of rows of a few layers,

    update_lost_frac = max over probed layers of ||W_engine - W_exact|| / ||dW||,   W_exact = dequant(W_q).float() + dW

0 means the engine holds the policy exactly, 1 that none of the update arrived (the engine serves the base); values
above 1 mean the engine is further from the policy than the whole update (e.g. a base that does not match). With no
update yet (`dW = 0`, LoRA's B starts at 0) it is 0 when the engine holds the base exactly and `inf` otherwise.

Pure functions here (`update_lost_frac`, `probe_rows`, `choose_probe_layers`); `qerl_repro.trainer` reads the tensors.
"""

import math
import re
from collections.abc import Sequence

import torch


__all__ = ["PROBE_PROJECTIONS", "choose_probe_layers", "probe_rows", "update_lost_frac"]

# Row-parallel projections: vLLM keeps them unfused under the same name as transformers, so a row of the engine's
# weight is a row of the policy's weight (q/k/v and gate/up are fused in vLLM).
PROBE_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def update_lost_frac(engine_rows: torch.Tensor, base_rows: torch.Tensor, delta_rows: torch.Tensor) -> float:
    """`||engine - (base + delta)|| / ||delta||` in fp64 (see the module docstring for its meaning).

    Args:
        engine_rows: the rows the engine computes with (any dtype).
        base_rows: the policy's frozen base rows, `dequant(W_q)` in the dtype training uses.
        delta_rows: the policy's update on those rows (`scaling * B[rows] @ A`, fp32).

    >>> w = torch.tensor([[1.0, 2.0]])
    >>> update_lost_frac(w, w, torch.tensor([[0.5, 0.0]]))  # the engine kept the base: the whole update is lost
    1.0
    """
    if not (engine_rows.shape == base_rows.shape == delta_rows.shape):
        raise ValueError(
            f"Shapes differ: engine {tuple(engine_rows.shape)}, base {tuple(base_rows.shape)}, "
            f"delta {tuple(delta_rows.shape)}."
        )
    exact = base_rows.double() + delta_rows.double()
    error = torch.linalg.vector_norm(engine_rows.double() - exact).item()
    update = torch.linalg.vector_norm(delta_rows.double()).item()
    if update == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / update


def probe_rows(num_rows: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """A fixed, sorted sample of `min(num_samples, num_rows)` distinct row indices (same on every call and rank)."""
    if num_rows < 1 or num_samples < 1:
        raise ValueError(f"num_rows={num_rows} and num_samples={num_samples} must be >= 1.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[: min(num_samples, num_rows)].sort().values


def choose_probe_layers(lora_layer_names: Sequence[str], max_blocks: int = 3) -> list[str]:
    """The LoRA layers to probe: `o_proj` and `down_proj` of the first, middle and last decoder blocks that have them.

    `lora_layer_names` are canonical (transformers) module names such as `model.layers.3.mlp.down_proj`.
    """
    by_block: dict[int, list[str]] = {}
    for name in lora_layer_names:
        match = _LAYER_INDEX.search(f".{name}.")
        if match and name.endswith(PROBE_PROJECTIONS):
            by_block.setdefault(int(match.group(1)), []).append(name)
    blocks = sorted(by_block)
    if not blocks:
        return []
    picks = sorted({blocks[round(i * (len(blocks) - 1) / max(max_blocks - 1, 1))] for i in range(max_blocks)})
    return [name for block in picks for name in sorted(by_block[block])]
