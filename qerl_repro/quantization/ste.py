# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Straight-through estimators (STE) for FP4 fake quantization: weight-only (W4A16) and weight+activation (W4A4).

The forward pass uses the fake-quantized tensor `Q(x)`; the backward pass treats `dQ/dx` as the identity (the scales get
no gradient). In a linear layer `y = Q(a) Q(W)^T + b` this gives

- `grad_a = grad_y @ Q(W)`: the input gradient flows through the *quantized* weight, the one the forward used, and
- `grad_W = grad_y^T @ Q(a)`: the weight gradient passes straight through the rounding.

Two seed-report bugs this module exists to avoid (DESIGN.md traps 3 and 4): restoring the full-precision weight after
the forward, so that backward computes `grad_y @ W` (wrong input gradients), and quantizing activations without an STE
(rounding has zero gradient almost everywhere, so nothing upstream learns).

QeRL itself trains LoRA adapters on a frozen quantized base and needs none of this; it is for the full fine-tuning and
W4A4 ablations of the seed studies. `apply_fake_quant_` never touches PEFT's LoRA A/B layers (DESIGN.md trap 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import BLOCK_SIZE, DEFAULT_MXFP4_SCALE_MODE, FP4_FORMATS, MXFP4_SCALE_MODES, fake_quantize


class FakeQuantizeSTE(torch.autograd.Function):
    """`fake_quantize` in the forward pass, identity in the backward pass (no gradient to the scales)."""

    @staticmethod
    def forward(ctx, x, fmt, per_tensor_scale, mxfp4_scale_mode, name):
        return fake_quantize(x, fmt, per_tensor_scale=per_tensor_scale, mxfp4_scale_mode=mxfp4_scale_mode, name=name)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor,
    fmt: str,
    *,
    per_tensor_scale=None,
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
    name: str = "tensor",
) -> torch.Tensor:
    """Fake-quantize `x` to `fmt` with a straight-through gradient (`d out / d x = I`).

    Same arguments as `qerl_repro.quantization.fake_quantize`; the forward value is identical to it.
    """
    return FakeQuantizeSTE.apply(x, fmt, per_tensor_scale, mxfp4_scale_mode, name)


def _check_options(fmt: str, mxfp4_scale_mode: str, in_features: int, name: str) -> None:
    if fmt not in FP4_FORMATS:
        raise ValueError(f"Unknown FP4 format {fmt!r} for {name}; valid formats are: {', '.join(FP4_FORMATS)}.")
    if mxfp4_scale_mode not in MXFP4_SCALE_MODES:
        raise ValueError(
            f"Unknown MXFP4 scale mode {mxfp4_scale_mode!r} for {name}; valid modes are: "
            f"{', '.join(MXFP4_SCALE_MODES)}."
        )
    if in_features % BLOCK_SIZE[fmt]:
        raise ValueError(
            f"{name}: in_features={in_features} is not a multiple of the {fmt} block size {BLOCK_SIZE[fmt]}; "
            f"it cannot be fake-quantized along its reduction dimension."
        )


class FakeQuantLinear(nn.Linear):
    """`nn.Linear` whose forward uses the FP4 fake-quantized weight (and optionally input), with STE gradients.

    The weight stays a trainable full-precision parameter (the "master" weight); the forward computes
    `F.linear(a, Q(W), b)` with `a = Q(x)` if `quantize_activations` (W4A4) else `x` (W4A16). Quantization runs along
    the last dimension (`in_features`) of both, which must be a multiple of the block size. NVFP4 activations use a
    dynamic per-tensor scale from the amax of the whole input (all rows of the batch, as torchao's dynamic activation
    scale does); NVFP4 weights use their own amax.

    Args:
        in_features, out_features, bias, device, dtype: as for `nn.Linear`.
        fmt: "nvfp4" or "mxfp4".
        quantize_activations: also fake-quantize the input (W4A4).
        mxfp4_scale_mode: MXFP4 scale mode, "floor", "even" or "rceil".
        name: the module's qualified name, used in error messages (e.g. a NaN weight).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        fmt: str = "nvfp4",
        quantize_activations: bool = False,
        mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
        name: str = "linear",
    ):
        _check_options(fmt, mxfp4_scale_mode, in_features, name)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fmt = fmt
        self.quantize_activations = quantize_activations
        self.mxfp4_scale_mode = mxfp4_scale_mode
        self.name = name

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str,
        quantize_activations: bool = False,
        mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
        *,
        name: str = "linear",
    ) -> FakeQuantLinear:
        """Wrap an existing `nn.Linear`, sharing its parameter objects (`weight`, `bias`): nothing is copied."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            fmt=fmt,
            quantize_activations=quantize_activations,
            mxfp4_scale_mode=mxfp4_scale_mode,
            name=name,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """`Q(W)` as used by the forward pass (with the STE gradient)."""
        return fake_quantize_ste(
            self.weight, self.fmt, mxfp4_scale_mode=self.mxfp4_scale_mode, name=f"{self.name}.weight"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            x = fake_quantize_ste(x, self.fmt, mxfp4_scale_mode=self.mxfp4_scale_mode, name=f"{self.name} input")
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        mode = f", mxfp4_scale_mode={self.mxfp4_scale_mode}" if self.fmt == "mxfp4" else ""
        return f"{super().extra_repr()}, fmt={self.fmt}, quantize_activations={self.quantize_activations}{mode}"


def _has_float_weight_parameter(module: nn.Module) -> bool:
    # Already-quantized Linear subclasses (e.g. FP4Linear's packed buffers, bitsandbytes' uint8 Params4bit) have none.
    weight = module._parameters.get("weight")
    return isinstance(weight, nn.Parameter) and weight.is_floating_point()


def _is_skipped(name: str, skip_modules) -> bool:
    # A skip entry matches whole dotted components anywhere in the name: "lm_head" matches "base_model.model.lm_head"
    # and "lm_head.modules_to_save.default", but not "my_lm_head".
    return any(f".{skip}." in f".{name}." for skip in skip_modules)


def apply_fake_quant_(
    model: nn.Module,
    fmt: str,
    *,
    quantize_activations: bool = False,
    skip_modules=("lm_head",),
    mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
) -> list[str]:
    """Replace, in place, every `nn.Linear` of `model` by a `FakeQuantLinear` sharing its parameters.

    Skipped: modules whose qualified name contains a `skip_modules` entry (as whole dotted components), and any module
    whose name contains "lora_" (PEFT's LoRA A/B and their dropout/embedding siblings: LoRA stays full precision;
    DESIGN.md trap 5). A PEFT `lora.Linear` wrapper is not an `nn.Linear`; its `base_layer` is, and gets replaced.
    Linear subclasses without a floating-point `weight` Parameter (already 4-bit layers such as `FP4Linear` or
    bitsandbytes `Linear4bit`) are left alone: fake-quantizing them again would be a second quantization.
    Every eligible layer is checked (block size divides `in_features`) before any is replaced.

    Returns:
        The qualified names of the replaced modules.
    """
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, FakeQuantLinear):
            continue
        if not _has_float_weight_parameter(module):
            continue
        if "lora_" in name or _is_skipped(name, skip_modules):
            continue
        _check_options(fmt, mxfp4_scale_mode, module.in_features, name)
        targets.append((name, module))
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = FakeQuantLinear.from_linear(
            module, fmt, quantize_activations=quantize_activations, mxfp4_scale_mode=mxfp4_scale_mode, name=name
        )
        setattr(parent, child_name, new)
    return [name for name, _ in targets]


# ---------------------------------------------------------------------------------------------------------------------
# W4A4 activations of the packed base layers (`FP4Linear.quantize_activations`, `qerl_repro.w4a4`)
# ---------------------------------------------------------------------------------------------------------------------


def fake_quantize_activation(
    x: torch.Tensor, fmt: str, *, mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE, name: str = "activation"
) -> torch.Tensor:
    """Fake-quantize an activation [..., in_features] to `fmt` one token (row) at a time: the result for a token does
    not depend on the other tokens of the batch.

    MXFP4 has only block scales, so this is `fake_quantize`. NVFP4 gets a per-token FP32 scale `amax(token) / 2688`
    instead of one dynamic per-tensor scale: each row equals `fake_quantize(row, "nvfp4")`. A per-tensor amax over the
    whole input would make a token's logprob depend on its batch neighbours and on padding positions, and the
    trainer (padded micro-batches) and the rollout engine (its own token scheduling) batch differently; real W4A4
    NVFP4 kernels use a static, calibrated per-layer input scale, which is batch-invariant too.
    """
    from .formats import E2M1_MAX, E4M3_MAX, E4M3_MIN_NORMAL, _e2m1_round_f32, nvfp4_per_tensor_scale, validate_for_fp4

    if fmt != "nvfp4":
        return fake_quantize(x, fmt, mxfp4_scale_mode=mxfp4_scale_mode, name=name)
    validate_for_fp4(x, fmt, name)
    x32 = x.detach().to(torch.float32)
    blocks = x32.reshape(*x32.shape[:-1], x32.shape[-1] // BLOCK_SIZE["nvfp4"], BLOCK_SIZE["nvfp4"])
    pts = nvfp4_per_tensor_scale(x32.abs().amax(dim=-1, keepdim=True))  # [..., 1]: one FP32 scale per token
    pts = torch.where(pts == 0, torch.ones_like(pts), pts)  # an all-zero token: any scale gives exact zeros
    # QeRL (Eq. 6) with a per-token FP32 scale: the same fp32 steps as `fake_quantize(row, "nvfp4")` for each row.
    block_scale = ((blocks.abs().amax(dim=-1) / E2M1_MAX) / pts).clamp(min=E4M3_MIN_NORMAL, max=E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).to(torch.float32)
    scaled = blocks * ((1.0 / pts) / block_scale).unsqueeze(-1)
    out = _e2m1_round_f32(scaled) * (pts * block_scale).unsqueeze(-1)
    return out.reshape(x.shape).to(x.dtype)


class ActivationQuantizeSTE(torch.autograd.Function):
    """`fake_quantize_activation` in the forward pass, identity in the backward pass."""

    @staticmethod
    def forward(ctx, x, fmt, mxfp4_scale_mode, name):
        return fake_quantize_activation(x, fmt, mxfp4_scale_mode=mxfp4_scale_mode, name=name)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None


def fake_quantize_activation_ste(
    x: torch.Tensor, fmt: str, *, mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE, name: str = "activation"
) -> torch.Tensor:
    """`fake_quantize_activation` with a straight-through gradient (`d out / d x = I`)."""
    return ActivationQuantizeSTE.apply(x, fmt, mxfp4_scale_mode, name)
