# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""`FP4Linear`: the frozen NVFP4 / MXFP4 base layer of QeRL, stored packed and dequantized on the fly.

QeRL (https://huggingface.co/papers/2510.11696, Sec. 3.1) trains LoRA adapters on top of a base model frozen in a 4-bit
format; the memory saving (7B: 15.2 GB -> 5.9 GB) is the point. `FP4Linear` therefore holds only the packed E2M1 codes
and their scales (`weight_packed`, `weight_scale`, `per_tensor_scale`, the names of the compressed-tensors checkpoint
format) plus the frozen bias, and rebuilds the weight in every forward:
`F.linear(x, dequantize_weight(), bias)`, where `dequantize_weight()` is exactly `fake_quantize(original_weight)`.
The backward dequantizes again instead of keeping the weight alive between forward and backward, so a training step
never holds more than one layer's high-precision weight at a time.

PEFT integration. `FP4Linear` subclasses `nn.Linear` (without a `weight` parameter), so PEFT treats it as a plain
Linear: `LoraConfig(target_modules="all-linear")` selects it and `dispatch_default` wraps it in
`peft.tuners.lora.Linear` with high-precision LoRA A/B (nothing here ever quantizes them). Its `weight` is a
read-only property returning the dequantized weight as a `DequantizedWeight` tensor: it reads like any tensor, but
every in-place write (`add_`, `+=`, `copy_`, `.data = ...`) raises a `RuntimeError`. PEFT's in-place merge
(`merge_adapter`, `merge_and_unload`, also with `safe_merge=True`) writes `base_layer.weight.data` and therefore
raises instead of silently merging into a temporary copy (a silent no-op after which PEFT, believing the adapter
merged, would also skip the LoRA branch). Merge out of place instead:
`dequantized_weight(lora_layer.get_base_layer()) + scaling * B @ A` (what `qerl_repro.weight_sync` sends to vLLM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qerl_repro.quantization.formats import (
    BLOCK_SIZE,
    DEFAULT_MXFP4_SCALE_MODE,
    FP4_FORMATS,
    QuantizedFP4,
    dequantize,
    quantize_mxfp4,
    quantize_nvfp4,
)
from qerl_repro.quantization.ste import fake_quantize_activation_ste


__all__ = [
    "DequantizedWeight",
    "FP4Linear",
    "dequantized_weight",
    "is_bnb_linear4bit",
    "is_quantized_linear",
]

_QUANT_BUFFERS = ("weight_packed", "weight_scale", "per_tensor_scale")


# ---------------------------------------------------------------------------------------------------------------------
# The read-only weight view
# ---------------------------------------------------------------------------------------------------------------------


_AUGMENTED_ASSIGNMENTS = frozenset(
    f"__i{op}__"
    for op in (
        "add",
        "sub",
        "mul",
        "matmul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
    )
)


def _is_write(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name in ("__set__", "__setitem__", "__delitem__") or name in _AUGMENTED_ASSIGNMENTS:
        return True  # `.data = ...`, `w[i] = ...`, `w += ...`
    if name.endswith("_") and not name.startswith("_"):
        return True  # in-place methods: add_, copy_, zero_, requires_grad_, ...
    out = (kwargs or {}).get("out")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, DequantizedWeight) for o in outs)


class DequantizedWeight(torch.Tensor):
    """The weight of an `FP4Linear`, dequantized: a fresh tensor that reads like any tensor and refuses writes.

    Operations on it return plain tensors. In-place operations on it or on its `.data`, and assigning its `.data`,
    raise a `RuntimeError` naming the layer: the packed 4-bit weight cannot be changed through this copy, and silently
    changing only the copy (what PEFT's in-place LoRA merge would do) would corrupt the model.
    """

    _qerl_layer_name: str = "FP4Linear"

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, layer_name: str) -> DequantizedWeight:
        out = tensor.as_subclass(cls)
        out._qerl_layer_name = layer_name
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _is_write(func, kwargs):
            layer = next((a._qerl_layer_name for a in args if isinstance(a, DequantizedWeight)), cls._qerl_layer_name)
            raise RuntimeError(
                f"{layer}: the weight of an FP4Linear is a read-only dequantized copy of the packed 4-bit weight; "
                f"`{getattr(func, '__qualname__', func)}` would write to it. In-place LoRA merging (PEFT "
                "`merge_adapter()` / `merge_and_unload()`) is not supported on a quantized base: merge out of place, "
                "`dequantized_weight(layer.get_base_layer()) + scaling * B @ A` (see qerl_repro.weight_sync)."
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs or {})
        if getattr(func, "__name__", "") == "__get__" and getattr(func, "__self__", None) is torch.Tensor.data:
            # `.data` shares the storage: keep it read-only so `weight.data += delta` raises too.
            layer = next((a._qerl_layer_name for a in args if isinstance(a, DequantizedWeight)), cls._qerl_layer_name)
            return cls._wrap(out, layer)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# FP4Linear
# ---------------------------------------------------------------------------------------------------------------------


class _FP4LinearFunction(torch.autograd.Function):
    """`F.linear(x, W_hat, b)` that re-dequantizes `W_hat` in backward instead of saving it (the base is frozen).

    The input gradient is exact: `grad_x = grad_out @ W_hat` with the same quantized weight as the forward (a
    straight-through pass for the activations, no gradient for the packed weight).
    """

    @staticmethod
    def forward(ctx, x, bias, layer):
        weight = layer._weight_as(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer._weight_as(ctx.x_dtype)
            grad_x = grad_out.to(weight.dtype).matmul(weight)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class FP4Linear(nn.Linear):
    """A frozen Linear whose weight is stored in NVFP4 or MXFP4 (packed), dequantized in every forward.

    Buffers (all frozen, all in `state_dict`):

    - `weight_packed`: uint8 [out, in / 2], two E2M1 codes per byte, element 2i in the low nibble.
    - `weight_scale`: NVFP4: float8_e4m3fn [out, in / 16]; MXFP4: uint8 biased E8M0 exponents [out, in / 32].
    - `per_tensor_scale`: NVFP4: fp32 0-dim `amax / 2688` (torchao convention; compressed-tensors stores
      `1 / per_tensor_scale` as `weight_global_scale`). MXFP4: None.

    `bias` stays a frozen high-precision `nn.Parameter`. There is no `weight` parameter: `weight` is a read-only
    property (see `DequantizedWeight`) and `dequantize_weight()` rebuilds it. Build one with `FP4Linear.from_linear`.

    Args:
        in_features, out_features, bias: as for `nn.Linear`; `in_features` must be a multiple of the block size.
        fmt: "nvfp4" or "mxfp4".
        dtype: the dtype of the original weight (the default dtype of `dequantize_weight`) and of the bias.
        device: where the buffers live.
        mxfp4_scale_mode: MXFP4 only, recorded for reference (the scales are already in `weight_scale`); also the
            scale mode of the activations when `quantize_activations` is on.

    W4A4: with `quantize_activations = True` (set by `qerl_repro.w4a4.set_activation_quant_`) the forward also
    fake-quantizes its input to `fmt` with a straight-through estimator, `F.linear(Q(x), W_hat, b)` with
    `d Q(x) / dx = I` (`ste.fake_quantize_activation`: one token at a time, NVFP4 with a per-token FP32 scale). Off by
    default.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt: str = "nvfp4",
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        mxfp4_scale_mode: str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a high-precision weight
        if fmt not in FP4_FORMATS:
            raise ValueError(f"Unknown FP4 format {fmt!r}; valid formats are: {', '.join(FP4_FORMATS)}.")
        block = BLOCK_SIZE[fmt]
        if in_features % block:
            raise ValueError(f"in_features ({in_features}) must be a multiple of the {fmt} block size {block}.")
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.weight_dtype = dtype
        self.mxfp4_scale_mode = (mxfp4_scale_mode or DEFAULT_MXFP4_SCALE_MODE) if fmt == "mxfp4" else None
        self.layer_name = "FP4Linear"  # set to the module path by quantize_model_ (error messages)
        self.quantize_activations = False  # W4A4 (qerl_repro.w4a4)
        scale_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, in_features // block, device=device).to(scale_dtype)
        )
        if fmt == "nvfp4":
            self.register_buffer("per_tensor_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("per_tensor_scale", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str,
        *,
        per_tensor_scale=None,
        mxfp4_scale_mode: str = DEFAULT_MXFP4_SCALE_MODE,
        name: str | None = None,
    ) -> FP4Linear:
        """Quantize `linear.weight` to `fmt` and return the packed, frozen layer (the bias is shared, frozen).

        Args:
            linear: the layer to quantize (left unchanged).
            fmt: "nvfp4" or "mxfp4".
            per_tensor_scale: NVFP4 only: a shared FP32 scale `amax / 2688` (e.g. the max over q/k/v); default from
                this weight's amax.
            mxfp4_scale_mode: MXFP4 only: "floor", "even" (default, compressed-tensors/vLLM) or "rceil".
            name: the layer's name in error messages (e.g. "model.layers.0.self_attn.q_proj").
        """
        name = name or "linear"
        if fmt not in FP4_FORMATS:
            raise ValueError(f"{name}: unknown FP4 format {fmt!r}; valid formats are: {', '.join(FP4_FORMATS)}.")
        weight = linear.weight.detach()
        if fmt == "nvfp4":
            q = quantize_nvfp4(weight, per_tensor_scale, name=f"{name}.weight")
        else:
            if per_tensor_scale is not None:
                raise ValueError(f"{name}: per_tensor_scale is an NVFP4 parameter; MXFP4 has none.")
            q = quantize_mxfp4(weight, mxfp4_scale_mode, name=f"{name}.weight")
        layer = cls.__new__(cls)
        cls.__init__(
            layer,
            linear.in_features,
            linear.out_features,
            bias=False,
            fmt=fmt,
            dtype=weight.dtype,
            device="meta",
            mxfp4_scale_mode=mxfp4_scale_mode,
        )
        layer.weight_packed = q.packed
        layer.weight_scale = q.block_scale
        layer.per_tensor_scale = q.per_tensor_scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        layer.layer_name = name
        layer.train(linear.training)
        return layer

    # -- weight access --------------------------------------------------------------------------------------------

    @property
    def quantized(self) -> QuantizedFP4:
        """The stored weight as a `formats.QuantizedFP4` (views of the buffers, no copy)."""
        return QuantizedFP4(
            self.fmt,
            self.weight_packed,
            self.weight_scale,
            self.per_tensor_scale,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight [out, in]: exactly `fake_quantize(original_weight, fmt, ...)` (same per-tensor
        scale, same MXFP4 scale mode), the tensor training uses and the rollout engine receives.

        It is computed in the original weight's dtype (`weight_dtype`) and then cast to `dtype` if one is given, so
        the values never depend on the requested dtype (an fp32 copy of a bf16 layer holds the bf16 values).
        """
        weight = dequantize(self.quantized)
        return weight if dtype is None or dtype == weight.dtype else weight.to(dtype)

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_weight(dtype)

    @property
    def weight(self) -> DequantizedWeight:
        """Read-only dequantized weight (a new tensor at each access; in-place writes raise)."""
        return DequantizedWeight._wrap(self.dequantize_weight(), self.layer_name)

    def __setattr__(self, name, value) -> None:
        if name == "weight":
            raise AttributeError(
                f"{self.layer_name}: FP4Linear stores its weight packed ({self.fmt}); `weight` cannot be assigned. "
                "Build a new layer with FP4Linear.from_linear(...) instead."
            )
        super().__setattr__(name, value)

    @property
    def packed_nbytes(self) -> int:
        """Bytes held by the packed weight and its scales (bias excluded)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.weight_packed, self.weight_scale, self.per_tensor_scale)
            if t is not None
        )

    # -- module behaviour -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            mode = self.mxfp4_scale_mode or DEFAULT_MXFP4_SCALE_MODE
            x = fake_quantize_activation_ste(x, self.fmt, mxfp4_scale_mode=mode, name=f"{self.layer_name} input")
        return _FP4LinearFunction.apply(x, self.bias, self)

    def reset_parameters(self) -> None:
        """Nothing to initialise: the quantized weight is frozen (kept so `nn.Linear` code paths do not fail)."""

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` / `.half()` must move the quantized buffers but never cast them: the fp8 block scales and
        # the fp32 per-tensor scale would be rounded (or their dtype changed) and the weight silently corrupted.
        saved = {name: getattr(self, name) for name in _QUANT_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        mode = f", mxfp4_scale_mode={self.mxfp4_scale_mode}" if self.fmt == "mxfp4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fmt={self.fmt}, dtype={self.weight_dtype}{mode}"
            + (", quantize_activations=True" if self.quantize_activations else "")
        )


# ---------------------------------------------------------------------------------------------------------------------
# Any base linear: NF4 (bitsandbytes), FP4Linear, nn.Linear
# ---------------------------------------------------------------------------------------------------------------------


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (NF4/FP4), without importing bitsandbytes when it was never loaded."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and any(c.__name__ == "Linear4bit" for c in cls.__mro__)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a 4-bit base Linear: `FP4Linear` (NVFP4/MXFP4) or a bitsandbytes `Linear4bit` (NF4)."""
    return isinstance(module, FP4Linear) or is_bnb_linear4bit(module)


def _bnb_cpu_packed_dequantize(packed: torch.Tensor, quant_state, block_n: int = 32) -> torch.Tensor:
    """Dequantize an NF4 weight that bitsandbytes (>= 0.49, CPU with AVX512-BF16) repacked for its CPU kernel.

    bitsandbytes' `Linear4bit.forward` repacks the weight the first time it runs in eval mode on an input that needs
    no gradient (`_convert_weight_packed_for_cpu`): codes regrouped in tiles of `block_n` output rows, absmax
    de-nested and rounded to bf16, stored transposed [K / blocksize, N]. `dequantize_4bit` no longer understands that
    layout; this reads it without modifying the module (what the layer now computes with, up to matmul rounding).
    """
    n, k_half = packed.shape
    k = 2 * k_half
    tiles = packed.reshape(-1, 32)
    codes = torch.cat([tiles & 0x0F, tiles >> 4], dim=-1)  # 32 low nibbles, then 32 high nibbles
    codes = codes.reshape(n // block_n, k_half, block_n, 2).transpose(-3, -2).reshape(n, k)
    values = quant_state.code.to(torch.float32)[codes.long()]
    absmax = quant_state.absmax.to(torch.float32).T  # [N, K / blocksize]
    blocksize = quant_state.blocksize
    weight = values.reshape(n, k // blocksize, blocksize) * absmax.unsqueeze(-1)
    dtype = getattr(quant_state, "original_dtype", None) or quant_state.dtype
    return weight.reshape(n, k).to(dtype)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The high-precision weight [out, in] of any base Linear, as a new tensor detached from autograd.

    - `FP4Linear`: `dequantize_weight()` (original dtype; exactly the fake-quantized weight);
    - bitsandbytes `Linear4bit` (NF4): `bnb.functional.dequantize_4bit` (in the layer's stored dtype), or the same
      from bitsandbytes' CPU-repacked layout if an eval-mode forward already repacked it;
    - `nn.Linear`: its `weight` (detached, no copy);
    - a PEFT LoRA wrapper: the weight of its base layer (LoRA delta not included).
    """
    if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
        module = module.get_base_layer()
    if isinstance(module, FP4Linear):
        return module.dequantize_weight()
    if is_bnb_linear4bit(module):
        import bitsandbytes as bnb

        weight = module.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                f"{type(module).__name__} holds no quant_state: it was never quantized (not moved/loaded?)"
            )
        if getattr(quant_state, "packing_format_for_cpu", False):
            return _bnb_cpu_packed_dequantize(weight.data, quant_state)
        return bnb.functional.dequantize_4bit(weight.data, quant_state)
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(
        "dequantized_weight: expected a Linear layer (FP4Linear, bnb Linear4bit, nn.Linear), got "
        f"{type(module).__name__}."
    )
