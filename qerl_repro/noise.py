# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Adaptive Quantization Noise (AQN) of QeRL (https://huggingface.co/papers/2510.11696, Section 3.3, Eq. 8-12).

Pure torch maths, no TRL import. Three parts:

1. **Schedule** (`aqn_stage`, `aqn_sigma`, `aqn_schedule_table`, `aqn_epoch_step`): the noise standard deviation
   for an optimizer step: K stages, an exponential (QeRL), linear or cosine decay (`DECAYS`, the paper's Fig. 9
   ablation), over the whole run or restarted in every epoch (the seed studies' epoch-aware schedule).
   `python -m qerl_repro.noise --total_steps 600 [--decay cosine] [--plot sigma.png]` prints (and plots) a schedule.
2. **Target discovery** (`find_norm_weights`, `find_norm_modules`, `norm_weight_offset`, `require_norm_targets`): the
   RMSNorm weights that feed the attention (q/k/v) and MLP (gate/up) projections of every decoder block, found by
   module *name and structure*, so one function works on a vLLM model, a Hugging Face model and a PEFT-wrapped model.
   QeRL's released code selects by `isinstance(module, (Qwen2RMSNorm, LlamaRMSNorm))` (transformers classes) on the
   vLLM model, whose norms are `vllm.model_executor.layers.layernorm.RMSNorm`: it matches nothing and adds no noise.
3. **Noise** (`aqn_noise`, `apply_aqn_`, `aqn_noised`, `snapshot_norm_weights`, `restore_norm_weights_`): one Gaussian
   vector per targeted norm, drawn in fp32 from a private CPU `torch.Generator` seeded by `(seed, step, index)` (the
   global RNG is never touched; every tensor-parallel rank and every re-sync within a step get the same noise), written
   as `w = clean + z` so noise never accumulates across steps.

Additive noise on the weight is the paper's multiplicative noise (Eq. 10-12). With `x̂ = x / rms(x)`:

    (w + z) ⊙ x̂ = (1 + z / w) ⊙ (w ⊙ x̂) = (Z/w + I) ⊙ RMSNorm(x)

and `((Z/w + I) ⊙ RMSNorm(x)) W = RMSNorm(x) ((Z/w + I)ᵀ ⊙ W)`: every projection that reads this norm (q, k, v for
`input_layernorm`; gate, up for the MLP-input norm) sees the same per-input-channel multiplicative noise of relative
std `sigma / |w_j|`, without touching the quantized weights. For Gemma-style norms that compute `x̂ ⊙ (1 + w)` (vLLM
`GemmaRMSNorm`, transformers `Gemma*RMSNorm`), adding `z` to the stored `w` adds it to the effective scale `s = 1 + w`:
`(s + z) ⊙ x̂ = (1 + z / s) ⊙ (s ⊙ x̂)`, the same multiplicative form with relative std `sigma / |1 + w_j|`
(`norm_weight_offset` returns that 1.0).

Usage on a rollout engine (restore, sync, snapshot, noise: the snapshot is always clean, even for norms the weight
sync does not rewrite, such as the final norm):

    targets = require_norm_targets(find_norm_weights(vllm_model), "vLLM rollout model")
    restore_norm_weights_(targets, clean)     # from the previous step (skip at the first step)
    ...weight sync...
    clean = snapshot_norm_weights(targets)
    num_noised = apply_aqn_(targets, clean, aqn_sigma(step, total_steps), seed=seed, step=step)
    llm.reset_prefix_cache()                  # cached KV blocks were computed with the previous norm weights
"""

import argparse
import contextlib
import hashlib
import math
import numbers
import re
import sys
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn


__all__ = [
    "DECAYS",
    "SCHEDULES",
    "AQNTargetError",
    "aqn_noise",
    "aqn_epoch_step",
    "aqn_noised",
    "aqn_schedule_table",
    "aqn_sigma",
    "aqn_stage",
    "apply_aqn_",
    "find_norm_modules",
    "find_norm_weights",
    "main",
    "norm_weight_offset",
    "require_norm_targets",
    "restore_norm_weights_",
    "snapshot_norm_weights",
]

SCHEDULES = ("qerl_code", "paper")
DECAYS = ("exponential", "linear", "cosine")


# ---------------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _check_schedule_args(step, total_steps, num_stages, schedule, decay="exponential") -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown AQN schedule {schedule!r}; valid schedules are {list(SCHEDULES)}.")
    if decay not in DECAYS:
        raise ValueError(f"Unknown AQN decay {decay!r}; valid decays are {list(DECAYS)}.")
    _check_int("step", step, 0)
    _check_int("total_steps", total_steps, 1)
    # qerl_code divides the exponent by K - 2, the paper by K - 1.
    _check_int("num_stages", num_stages, 3 if schedule == "qerl_code" else 2)


def _check_sigmas(sigma_start, sigma_end) -> None:
    for name, value in (("sigma_start", sigma_start), ("sigma_end", sigma_end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"`{name}` must be a finite number > 0 (geometric decay), got {value!r}.")


def _stage(step: int, total_steps: int, num_stages: int, schedule: str) -> int:
    if schedule == "qerl_code":
        # QeRL code (`noise_scheduler.get_sigma_by_step`): step clamped to M, interval = int(step // (M / K)), float
        # division M / K.
        stage = int(min(step, total_steps) // (total_steps / num_stages))
    else:
        # QeRL (Algorithm 1): steps_per_stage = floor(M / K); k = floor((t - 1) / steps_per_stage) for the 1-based step
        # t = step + 1. steps_per_stage is floored at 1 when M < K (the paper would divide by zero).
        stage = step // max(1, total_steps // num_stages)
    return min(stage, num_stages - 1)


def _sigma(stage: int, sigma_start: float, sigma_end: float, num_stages: int, schedule: str, decay: str) -> float:
    if stage == 0:
        return 0.0  # warm-up stage: quantization noise only
    if schedule == "qerl_code":
        # QeRL code: sigma_trend[i] with i = min(k - 1, K - 2) over K - 2 intervals.
        progress = min(stage - 1, num_stages - 2) / (num_stages - 2)
    else:
        # QeRL (Eq. 8): exponent (k - 1) / (K - 1).
        progress = (stage - 1) / (num_stages - 1)
    if decay == "exponential":
        # QeRL (Eq. 8): sigma(k) = sigma_start * (sigma_end / sigma_start) ** progress.
        return sigma_start * (sigma_end / sigma_start) ** progress
    if decay == "linear":
        return sigma_start + (sigma_end - sigma_start) * progress
    # cosine: half a cosine period from sigma_start (progress 0) to sigma_end (progress 1).
    return sigma_end + (sigma_start - sigma_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def aqn_stage(step: int, total_steps: int, num_stages: int = 10, schedule: str = "qerl_code") -> int:
    """The AQN stage (0 = noise-free warm-up, ..., `num_stages - 1`) of an optimizer step (QeRL Section 3.3).

    `step` is `trainer.state.global_step` at the rollout (0 at the first rollout), `total_steps` the total number of
    optimizer steps M, `num_stages` K.

    - `"qerl_code"`: QeRL's `get_sigma_by_step`, `int(min(step, M) // (M / K))` with float `M / K`, bit for bit.
      Stage K (reached only at `step >= M`) is clamped to K - 1; its sigma is the same, so only the label changes.
      QeRL's trainer passes `update_step`, which reference/qerl.md reports as 1 at the first optimizer step; with
      `step = global_step` every stage therefore starts one step later than in QeRL's runs (pass `global_step + 1`
      to replicate that offset exactly).
    - `"paper"` (Algorithm 1): `steps_per_stage = M // K` (at least 1), `k = (t - 1) // steps_per_stage` with the
      1-based step `t = step + 1`, i.e. `k = step // steps_per_stage`, clamped to K - 1 (when K does not divide M
      the paper's last partial stage would reach k = K).
    """
    _check_schedule_args(step, total_steps, num_stages, schedule)
    return _stage(step, total_steps, num_stages, schedule)


def aqn_sigma(
    step: int,
    total_steps: int,
    sigma_start: float = 1e-2,
    sigma_end: float = 5e-4,
    num_stages: int = 10,
    schedule: str = "qerl_code",
    decay: str = "exponential",
) -> float:
    """Noise std of AQN at an optimizer step: a noise-free stage, then K - 1 decaying stages.

    QeRL Section 3.3, Eq. 8 and Algorithm 1 (https://huggingface.co/papers/2510.11696). Defaults are the paper's
    Table 4 range 1e-2 -> 5e-4 with K = 10 stages (QeRL's scripts use 1e-2 -> 1e-4).

    - `"qerl_code"` (default, QeRL's released code): stage k >= 1 has
      `sigma_start * (sigma_end / sigma_start) ** (min(k - 1, K - 2) / (K - 2))`, ending exactly at `sigma_end`.
    - `"paper"` (Eq. 8): `sigma_start * (sigma_end / sigma_start) ** ((k - 1) / (K - 1))`, which never reaches
      `sigma_end`.

    `decay` changes only the curve through the same stages (the paper's Fig. 9 / Fig. 15 ablation), with the same
    progress `p` of stage k >= 1 (`min(k - 1, K - 2) / (K - 2)` for `"qerl_code"`, `(k - 1) / (K - 1)` for `"paper"`):

    - `"exponential"` (default, QeRL): `sigma_start * (sigma_end / sigma_start) ** p`;
    - `"linear"`: `sigma_start + (sigma_end - sigma_start) * p`;
    - `"cosine"`: `sigma_end + (sigma_start - sigma_end) * (1 + cos(pi * p)) / 2`.

    All three give 0 in stage 0, `sigma_start` in stage 1 and (for `"qerl_code"`) exactly `sigma_end` in stage K - 1
    and beyond (the clamp).

    See `aqn_stage` for the stage index and the step convention (`step` = `trainer.state.global_step`, 0-based).

    Args:
        step (`int`): optimizer step (>= 0); steps at or beyond `total_steps` stay in the last stage.
        total_steps (`int`): total optimizer steps M (> 0).
        sigma_start (`float`, *optional*, defaults to `1e-2`): sigma of stage 1 (> 0).
        sigma_end (`float`, *optional*, defaults to `5e-4`): sigma the decay heads to (> 0).
        num_stages (`int`, *optional*, defaults to `10`): K (>= 3 for `"qerl_code"`, >= 2 for `"paper"`).
        schedule (`str`, *optional*, defaults to `"qerl_code"`): one of `SCHEDULES`.
        decay (`str`, *optional*, defaults to `"exponential"`): one of `DECAYS`.

    Returns:
        `float`: the noise std (0.0 in the first stage).

    >>> aqn_sigma(0, 600), aqn_sigma(60, 600), aqn_sigma(599, 600)
    (0.0, 0.01, 0.0005)
    """
    _check_schedule_args(step, total_steps, num_stages, schedule, decay)
    _check_sigmas(sigma_start, sigma_end)
    stage = _stage(step, total_steps, num_stages, schedule)
    return _sigma(stage, sigma_start, sigma_end, num_stages, schedule, decay)


def aqn_schedule_table(
    total_steps: int,
    sigma_start: float = 1e-2,
    sigma_end: float = 5e-4,
    num_stages: int = 10,
    schedule: str = "qerl_code",
    decay: str = "exponential",
) -> list[dict]:
    """The schedule of a run as rows `{"stage", "first_step", "last_step", "sigma"}` over steps 0 .. total_steps - 1.

    Stages that contain no step (possible when `total_steps < num_stages`) are left out.
    """
    _check_schedule_args(0, total_steps, num_stages, schedule, decay)
    _check_sigmas(sigma_start, sigma_end)
    rows: list[dict] = []
    for step in range(total_steps):
        stage = _stage(step, total_steps, num_stages, schedule)
        if rows and rows[-1]["stage"] == stage:
            rows[-1]["last_step"] = step
        else:
            sigma = _sigma(stage, sigma_start, sigma_end, num_stages, schedule, decay)
            rows.append({"stage": stage, "first_step": step, "last_step": step, "sigma": sigma})
    return rows


def aqn_epoch_step(step: int, total_steps: int, steps_per_epoch: int) -> tuple[int, int]:
    """`(step_in_epoch, epoch_steps)` for the epoch-aware schedule: `aqn_sigma(step_in_epoch, epoch_steps, ...)` is the
    sigma of optimizer step `step` when every epoch runs its own schedule (warm-up stage, then the decay from
    `sigma_start` to `sigma_end`), as the seed studies did instead of one decay over all epochs.

    Epoch `e = step // steps_per_epoch` covers steps `[e * S, e * S + S)` (`S = steps_per_epoch`, the Trainer's
    `num_update_steps_per_epoch`) cut at `total_steps` (the Trainer's `max_steps`): a last partial epoch decays over
    the steps the run still takes, so every run ends in its last stage. With one epoch (or `total_steps <= S`) this is
    `(step, total_steps)`, the plain schedule. Steps at or beyond `total_steps` stay in the last epoch.

    (QeRL's code restarts its schedule every epoch by accident, against the all-epoch M, so with two epochs each epoch
    only reaches the middle of the decay; reference/qerl.md 1.2.)

    >>> [aqn_epoch_step(step, 10, 4) for step in (0, 3, 4, 8, 9)]
    [(0, 4), (3, 4), (0, 4), (0, 2), (1, 2)]
    """
    _check_int("step", step, 0)
    _check_int("total_steps", total_steps, 1)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    last_epoch = (total_steps - 1) // steps_per_epoch
    epoch = min(step // steps_per_epoch, last_epoch)
    epoch_start = epoch * steps_per_epoch
    return step - epoch_start, min(steps_per_epoch, total_steps - epoch_start)


# ---------------------------------------------------------------------------------------------------------------------
# Target discovery
# ---------------------------------------------------------------------------------------------------------------------


class AQNTargetError(ValueError):
    """AQN is enabled but no RMSNorm weight of the model matched: the run would silently be a no-noise baseline."""


# A decoder block: `<anything>.layers.<i>` (HF and vLLM `model.layers.0`; multimodal `model.language_model.layers.0`).
_BLOCK_RE = re.compile(r"(?:(?P<stack_parent>.*)\.)?layers\.\d+")
# Path components added by wrappers around a module (torch.compile, activation checkpointing, FSDP).
_TRANSPARENT_CHILDREN = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_FINAL_NORM_NAMES = ("norm", "final_layernorm")
# Norm classes computing x̂ ⊙ (1 + w) (grep of transformers 5.17 and vLLM 0.31 for `1.0 + self.weight`), matched by
# name along the MRO so vLLM and HF classes and their subclasses are all recognised without importing either library.
_ONE_PLUS_WEIGHT_RE = re.compile(r"\w*Gemma\d*RMSNorm")  # Gemma/Gemma2/Gemma3/RecurrentGemma/T5Gemma/VaultGemma, vLLM
_ONE_PLUS_WEIGHT_CLASSES = frozenset(
    {
        "Qwen3NextRMSNorm",
        "Qwen3_5RMSNorm",
        "Qwen3_5MoeRMSNorm",
        "Qwen4ExpTextRMSNorm",
        "MiniMaxM3VLRMSNorm",
        "MuseGlimmerTextCenteredRMSNorm",
        "Step3p7RMSNorm",
        "NemotronLayerNorm1P",
    }
)


def _natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def _unwrap_root(model: nn.Module) -> nn.Module:
    while True:
        inner = model._modules.get("module")
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._modules["_orig_mod"]
        else:
            return model


def _active_copy(module: nn.Module) -> nn.Module:
    """The module a PEFT `ModulesToSaveWrapper` runs in forward (same rule as its `forward`); others unchanged."""
    copies = module._modules.get("modules_to_save")
    original = module._modules.get("original_module")
    if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
        return module
    active = getattr(module, "active_adapters", None) or []
    if isinstance(active, str):
        active = [active]
    if getattr(module, "disable_adapters", False) or not active or any(name not in copies for name in active):
        return original
    return copies[active[0]]


def _canonical_prefix(model: nn.Module) -> str:
    class_names = {cls.__name__ for cls in type(model).__mro__}
    if "PeftModel" in class_names:
        return "base_model.model."  # PeftModel -> LoraModel (base_model) -> the HF model (model)
    if "BaseTuner" in class_names:
        return "model."  # a bare LoraModel
    return ""


def _active_named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`{canonical name: module}` as used in forward: PEFT prefixes stripped, modules_to_save resolved to the active
    copy (its `original_module` / inactive copies are not listed), wrapper path components removed."""
    root = _unwrap_root(model)
    prefix = _canonical_prefix(root)
    found: dict[str, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> None:
        module = _active_copy(module)
        found[name] = module
        for child_name, child in module.named_children():
            if child_name in _TRANSPARENT_CHILDREN:
                visit(name, child)
            else:
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", root)
    return {name.removeprefix(prefix): module for name, module in found.items() if name.startswith(prefix)}


def _has_norm_weight(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None) if module is not None else None
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and weight.is_floating_point()


def find_norm_modules(
    model: nn.Module, *, include_final_norm: bool = False, include_qk_norm: bool = False
) -> dict[str, nn.Module]:
    """AQN target norm modules by canonical module name (no `.weight` suffix), in natural sorted order.

    Same selection as `find_norm_weights`, which documents it; useful for `norm_weight_offset`.
    """
    modules = _active_named_modules(model)
    targets: dict[str, nn.Module] = {}
    for block in modules:
        match = _BLOCK_RE.fullmatch(block)
        if match is None or f"{block}.input_layernorm" not in modules:
            continue  # not a pre-norm decoder block
        # QeRL (Eq. 12): q/k/v share the noise of the norm that feeds them, gate/up the noise of the MLP-input norm.
        # Gemma2/3 ("sandwich" norms) apply post_attention_layernorm to the attention *output* and feed the MLP from
        # pre_feedforward_layernorm.
        mlp_norm = (
            "pre_feedforward_layernorm"
            if f"{block}.pre_feedforward_layernorm" in modules
            else "post_attention_layernorm"
        )
        leaves = ["input_layernorm", mlp_norm]
        if include_qk_norm:
            leaves += ["self_attn.q_norm", "self_attn.k_norm"]
        for leaf in leaves:
            candidate = modules.get(f"{block}.{leaf}")
            if _has_norm_weight(candidate):
                targets[f"{block}.{leaf}"] = candidate
        if include_final_norm:
            stack_parent = match.group("stack_parent")
            for leaf in _FINAL_NORM_NAMES:
                name = f"{stack_parent}.{leaf}" if stack_parent else leaf
                if _has_norm_weight(modules.get(name)):
                    targets[name] = modules[name]
    return {name: targets[name] for name in sorted(targets, key=_natural_key)}


def find_norm_weights(
    model: nn.Module, *, include_final_norm: bool = False, include_qk_norm: bool = False
) -> dict[str, nn.Parameter]:
    """The RMSNorm weights AQN perturbs, keyed by canonical HF/vLLM name (`model.layers.0.input_layernorm.weight`).

    QeRL Section 3.3 / Fig. 6: noise goes into "the LayerNorm of each block"; q/k/v share the noise of the attention-
    input norm and gate/up the noise of the MLP-input norm. Works on the vLLM model inside an engine
    (`llm.llm_engine.model_executor.driver_worker.model_runner.model`), a transformers model and a PEFT model, because
    it matches module *names and structure*, not classes (QeRL matches transformers classes and finds 0 norms in vLLM).

    Selection, for every decoder block `<...>.layers.<i>` that has an `input_layernorm` child (pre-norm blocks):

    - `input_layernorm` (feeds q/k/v) and the MLP-input norm: `pre_feedforward_layernorm` when the block has one
      (Gemma2/Gemma3, whose `post_attention_layernorm` normalises the attention output), else
      `post_attention_layernorm` (Llama, Qwen2/3, Mistral, Gemma).
    - `include_qk_norm`: also `self_attn.q_norm` / `self_attn.k_norm` (Qwen3, Gemma3).
    - `include_final_norm`: also the final norm of each block stack (`model.norm`). QeRL's class-based selector would
      include it; the final norm is not re-synced by the trainer, which is why `apply_aqn_` always starts from a clean
      snapshot.

    A module qualifies only if its `weight` is a 1-D floating `nn.Parameter` (vLLM `RMSNorm(has_weight=False)` is
    skipped). PEFT: the `base_model.model.` prefix is stripped, and a norm listed in `modules_to_save` resolves to the
    copy its wrapper runs in forward (`modules_to_save.default` while the adapter is active, `original_module` when
    adapters are disabled), so the returned parameter is the one the forward pass reads.

    Returns:
        `dict[str, nn.Parameter]`: naturally sorted (`layers.2` before `layers.10`); may be empty, see
        `require_norm_targets`.
    """
    modules = find_norm_modules(model, include_final_norm=include_final_norm, include_qk_norm=include_qk_norm)
    return {f"{name}.weight": module.weight for name, module in modules.items()}


def norm_weight_offset(module: nn.Module) -> float:
    """1.0 for Gemma-style norms that compute `x̂ ⊙ (1 + w)`, 0.0 for standard RMSNorm (`x̂ ⊙ w`).

    The effective scale is `offset + w`; additive noise on `w` is multiplicative noise on that scale with relative std
    `sigma / |offset + w|` (QeRL Eq. 10 with `w` replaced by `1 + w`). Recognised by class name along the MRO (vLLM
    `GemmaRMSNorm`, transformers `GemmaRMSNorm`, `Gemma2RMSNorm`, `Gemma3RMSNorm`, `Qwen3NextRMSNorm`, ...).
    """
    for cls in type(module).__mro__:
        if _ONE_PLUS_WEIGHT_RE.fullmatch(cls.__name__) or cls.__name__ in _ONE_PLUS_WEIGHT_CLASSES:
            return 1.0
    return 0.0


def require_norm_targets(targets: Mapping[str, torch.Tensor], model_description: str) -> Mapping[str, torch.Tensor]:
    """Raise `AQNTargetError` if AQN found nothing to perturb in `model_description`; return `targets` otherwise."""
    if not targets:
        raise AQNTargetError(
            f"AQN is enabled but no RMSNorm weight matched in {model_description}: the run would be a noise-free "
            "baseline. Expected decoder blocks named `<...>.layers.<i>` with an `input_layernorm` child (and "
            "`post_attention_layernorm` or `pre_feedforward_layernorm`) holding a 1-D `weight` parameter. Disable AQN "
            "or use a model with this layout."
        )
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------------------


def _generator_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.blake2b(f"qerl_repro.aqn:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def aqn_noise(
    shape: int | Sequence[int] | torch.Size, sigma: float, *, seed: int, step: int, index: int
) -> torch.Tensor:
    """One AQN noise vector `z ~ N(0, sigma^2 I)` (QeRL Eq. 7/10), fp32 on CPU.

    Drawn as `sigma * randn(shape)` from a private CPU `torch.Generator` seeded by a hash of `(seed, step, index)`
    (`index` = the target's position in the sorted target list): the global RNG is untouched, the noise is the same on
    every rank and every call for that triple, independent across modules and steps, and proportional to `sigma`.
    The noise is drawn once per step (weight sync) and shared by all rollouts of that step, as in QeRL's code (not per
    forward pass as the paper's Eq. 7 wording suggests).
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"`sigma` must be a finite number >= 0, got {sigma!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    _check_int("step", step, 0)
    _check_int("index", index, 0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_generator_seed(int(seed), int(step), int(index)))
    # QeRL (Eq. 7): Z ~ N(0, sigma^2), drawn in fp32.
    return torch.randn(shape, generator=generator, dtype=torch.float32) * float(sigma)


def _check_clean(targets: Mapping[str, torch.Tensor], clean: Mapping[str, torch.Tensor]) -> None:
    missing = [name for name in targets if name not in clean]
    if missing:
        raise ValueError(f"No clean snapshot for {missing}; take one with `snapshot_norm_weights(targets)`.")
    for name, weight in targets.items():
        if tuple(clean[name].shape) != tuple(weight.shape):
            raise ValueError(
                f"Clean snapshot of {name} has shape {tuple(clean[name].shape)}, weight {tuple(weight.shape)}."
            )


@torch.no_grad()
def snapshot_norm_weights(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached clones of the target weights (same dtype and device): the clean values `apply_aqn_` starts from."""
    return {name: weight.detach().clone() for name, weight in targets.items()}


@torch.no_grad()
def restore_norm_weights_(targets: Mapping[str, torch.Tensor], clean: Mapping[str, torch.Tensor]) -> None:
    """Copy the clean values back into the target weights, in place (bit-exact for a same-dtype snapshot)."""
    _check_clean(targets, clean)
    for name, weight in targets.items():
        weight.copy_(clean[name])


@torch.no_grad()
def apply_aqn_(
    targets: Mapping[str, torch.Tensor],
    clean: Mapping[str, torch.Tensor],
    sigma: float,
    *,
    seed: int,
    step: int,
    multipliers: Mapping[str, float] | None = None,
) -> int:
    """Set every target weight to `clean + z` in place (QeRL Section 3.3, Eq. 10-12); return how many were noised.

    `w.copy_((clean.float() + z).to(w.dtype))` with `z = aqn_noise(w.shape, sigma, seed=seed, step=step, index=i)`
    and `i` the position of the name in the naturally sorted target list. The weight is rebuilt from the clean value,
    so noise never accumulates, also for weights the trainer's sync does not rewrite (e.g. the final norm). Additive
    noise on the norm weight is the paper's multiplicative noise on the normalised activation,
    `(w + z) ⊙ x̂ = (1 + z / w) ⊙ (w ⊙ x̂)`, i.e. `W' = W diag(1 + z / w)` for every projection reading the norm. The
    noise is drawn in fp32 and the sum rounded once to the weight dtype (in bf16, noise far below the weight's ulp is
    rounded away, as with QeRL's bf16 `add_`). In-place writes keep the parameter storage that vLLM (and CUDA graphs)
    hold.

    With `sigma == 0` the clean values are restored and 0 is returned. After changing weights in a vLLM engine, call
    `llm.reset_prefix_cache()`: cached KV blocks were computed with the previous weights.

    `multipliers` (RIN, `qerl_repro.rin`): `{name: m}` for every target; the noise becomes `m * z` (same draw `z`), a
    target with `m == 0` gets its clean value and is not counted as noised.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"`sigma` must be a finite number >= 0, got {sigma!r}.")
    _check_clean(targets, clean)
    if multipliers is not None:
        _check_multipliers(targets, multipliers)
    if sigma == 0:
        restore_norm_weights_(targets, clean)
        return 0
    num_noised = 0
    for index, name in enumerate(sorted(targets, key=_natural_key)):
        weight, reference = targets[name], clean[name]
        multiplier = 1.0 if multipliers is None else float(multipliers[name])
        if multiplier == 0:
            weight.copy_(reference)
            continue
        noise = aqn_noise(weight.shape, sigma, seed=seed, step=step, index=index).to(reference.device)
        if multipliers is not None:
            noise = noise * multiplier  # RIN: this block's share of the noise
        # QeRL (Eq. 10): RMSNorm_noise(x) = (w + Z) ⊙ x / rms(x) = (Z / w + I) ⊙ RMSNorm(x).
        weight.copy_((reference.float() + noise).to(weight.dtype))
        num_noised += 1
    return num_noised


def _check_multipliers(targets: Mapping[str, torch.Tensor], multipliers: Mapping[str, float]) -> None:
    missing = [name for name in targets if name not in multipliers]
    if missing:
        raise ValueError(f"No RIN multiplier for {missing}.")
    bad = {
        name: multipliers[name]
        for name in targets
        if not (math.isfinite(multipliers[name]) and multipliers[name] >= 0)
    }
    if bad:
        raise ValueError(f"RIN multipliers must be finite and >= 0, got {bad}.")


@contextlib.contextmanager
def aqn_noised(
    targets: Mapping[str, torch.Tensor],
    sigma: float,
    *,
    seed: int,
    step: int,
    multipliers: Mapping[str, float] | None = None,
) -> Iterator[int]:
    """Context manager: noise the targets on entry (`apply_aqn_`), restore them bit-exactly on exit.

    For rollouts with HF `generate` on the training model. Yields the number of noised modules.

    >>> with aqn_noised(find_norm_weights(model), sigma, seed=0, step=step) as num_noised:  # doctest: +SKIP
    ...     completions = model.generate(**inputs)
    """
    clean = snapshot_norm_weights(targets)
    try:
        yield apply_aqn_(targets, clean, sigma, seed=seed, step=step, multipliers=multipliers)
    finally:
        restore_norm_weights_(targets, clean)


# ---------------------------------------------------------------------------------------------------------------------
# CLI: python -m qerl_repro.noise --total_steps 600 [--decay cosine] [--plot sigma.png]
# ---------------------------------------------------------------------------------------------------------------------


def _format_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"AQN schedule ({args.schedule}): total_steps={args.total_steps}, num_stages={args.num_stages}, "
        f"sigma {args.sigma_start:.3g} -> {args.sigma_end:.3g} ({args.decay} decay); "
        "step = trainer.state.global_step (0 = first rollout)",
        f"{'stage':>5}  {'first_step':>10}  {'last_step':>9}  {'steps':>5}  {'sigma':>9}",
    ]
    for row in rows:
        steps = row["last_step"] - row["first_step"] + 1
        lines.append(
            f"{row['stage']:>5}  {row['first_step']:>10}  {row['last_step']:>9}  {steps:>5}  {row['sigma']:>9.3e}"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for row in rows for step in (row["first_step"], row["last_step"] + 1)]
    sigmas = [row["sigma"] for row in rows for _ in range(2)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, sigmas)
    ax.set_xlabel("optimizer step (trainer.state.global_step)")
    ax.set_ylabel("AQN sigma")
    ax.set_title(
        f"AQN ({args.schedule}, {args.decay}): {args.sigma_start:.3g} -> {args.sigma_end:.3g}, {args.num_stages} stages"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Print (and optionally plot) the AQN schedule of a config before training; returns the table rows."""
    parser = argparse.ArgumentParser(prog="python -m qerl_repro.noise", description=main.__doc__)
    parser.add_argument("--total_steps", type=int, required=True, help="total optimizer steps (max_steps)")
    parser.add_argument("--sigma_start", type=float, default=1e-2, help="sigma of stage 1 (aqn_sigma_start)")
    parser.add_argument("--sigma_end", type=float, default=5e-4, help="final sigma (aqn_sigma_end)")
    parser.add_argument("--num_stages", type=int, default=10, help="number of stages K (aqn_num_stages)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="qerl_code", help="QeRL's code or the paper's Eq. 8")
    parser.add_argument("--decay", choices=DECAYS, default="exponential", help="decay curve (aqn_decay)")
    parser.add_argument("--plot", default=None, help="write a sigma-vs-step plot to this PNG path")
    args = parser.parse_args(argv)
    try:
        rows = aqn_schedule_table(
            args.total_steps, args.sigma_start, args.sigma_end, args.num_stages, args.schedule, args.decay
        )
    except ValueError as err:
        parser.error(str(err))
    sys.stdout.write(_format_table(rows, args) + "\n")
    if args.plot:
        _plot(rows, args, args.plot)
        sys.stdout.write(f"plot written to {args.plot}\n")
    return rows


if __name__ == "__main__":
    main()
