# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Straight-through estimators: input gradients through Q(W) (DESIGN.md trap 3), gradient flow through quantized
activations (trap 4), and `apply_fake_quant_` leaving lm_head and LoRA A/B alone (trap 5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qerl_repro.quantization import FakeQuantLinear, apply_fake_quant_, fake_quantize, fake_quantize_ste
from qerl_repro.testing import build_tiny_qwen2


FORMATS = ["nvfp4", "mxfp4"]


def _linear(in_features, out_features, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantize_ste_forward_value_and_identity_gradient(fmt):
    x = torch.randn(4, 64, requires_grad=True)
    out = fake_quantize_ste(x, fmt)
    assert torch.equal(out, fake_quantize(x.detach(), fmt))
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(x.grad, g)  # d Q(x) / dx = I


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_linear_gradients_are_straight_through(fmt, dtype):
    layer = FakeQuantLinear.from_linear(_linear(64, 48, seed=0, dtype=dtype), fmt)
    x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(5, 48, dtype=dtype)
    w_q = fake_quantize(layer.weight.detach(), fmt)

    out = layer(x)
    out.backward(grad_out)

    # forward: F.linear with the quantized weight
    assert torch.equal(out, F.linear(x.detach(), w_q, layer.bias.detach()))
    # grad_input flows through Q(W), the weight the forward used...
    torch.testing.assert_close(x.grad, grad_out @ w_q, rtol=0, atol=0)
    # ...which is not the same as through the full-precision W (the seed reports' bug, trap 3)
    wrong = grad_out @ layer.weight.detach()
    assert (x.grad - wrong).abs().max() > 1e-3 * wrong.abs().max()
    # grad_W passes straight through the rounding; grad_b as usual
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x.detach(), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_w4a4_stack_matches_hand_computed_ste(fmt):
    torch.manual_seed(0)
    dims = [64, 96, 64, 32]
    layers = [
        FakeQuantLinear.from_linear(_linear(i, o, seed=k), fmt, quantize_activations=True)
        for k, (i, o) in enumerate(zip(dims[:-1], dims[1:]))
    ]
    x = torch.randn(6, 64, requires_grad=True)
    grad_out = torch.randn(6, 32)

    h = x
    for k, layer in enumerate(layers):
        h = layer(h)
        if k < len(layers) - 1:
            h = torch.tanh(h)
    h.backward(grad_out)

    # The same network by hand with explicitly quantized tensors; STE: d Q(t) / dt = I for weights and activations.
    with torch.no_grad():
        acts, pre, w_qs = [], [], []
        a = x.detach()
        for k, layer in enumerate(layers):
            a_q = fake_quantize(a, fmt)
            w_q = fake_quantize(layer.weight, fmt)
            z = a_q @ w_q.t() + layer.bias
            acts.append(a_q)
            w_qs.append(w_q)
            pre.append(z)
            a = torch.tanh(z) if k < len(layers) - 1 else z
        torch.testing.assert_close(h.detach(), a, rtol=0, atol=0)

        grad_z = grad_out
        expected_w, expected_b = [None] * len(layers), [None] * len(layers)
        for k in reversed(range(len(layers))):
            expected_w[k] = grad_z.t() @ acts[k]  # grad_W = grad_z^T @ Q(a)
            expected_b[k] = grad_z.sum(0)
            grad_a = grad_z @ w_qs[k]  # through Q(W), then straight through Q(a)
            if k > 0:
                grad_z = grad_a * (1 - torch.tanh(pre[k - 1]) ** 2)
        expected_x = grad_a

    for k, layer in enumerate(layers):
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
        torch.testing.assert_close(layer.weight.grad, expected_w[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, expected_b[k], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_rounding_without_ste_has_no_gradient(fmt):
    # Why the STE is needed (trap 4): the quantizer is piecewise constant, so its exact derivative is zero almost
    # everywhere. A finite difference shows it: nudging every input that does not set a block scale (the largest
    # magnitude of each 16-element block) by 1e-4 of itself leaves (almost) every output unchanged, and plain fake
    # quantization builds no autograd graph at all.
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    blocks = x.abs().view(16, -1, 16)
    sets_scale = (blocks == blocks.amax(dim=-1, keepdim=True)).view_as(x)
    y = fake_quantize(x, fmt)
    nudged = fake_quantize(torch.where(sets_scale, x, x * (1 + 1e-4)), fmt)
    assert (nudged == y).float().mean() > 0.99
    assert not fake_quantize(x.clone().requires_grad_(), fmt).requires_grad
    # The STE passes the gradient straight through instead: d(sum Q(x))/dx = 1 everywhere.
    leaf = x.clone().requires_grad_()
    fake_quantize_ste(leaf, fmt).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))


def test_from_linear_shares_parameters_and_validates():
    linear = _linear(32, 8, seed=0)
    layer = FakeQuantLinear.from_linear(linear, "mxfp4", mxfp4_scale_mode="rceil", name="mlp.up_proj")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert "fmt=mxfp4" in repr(layer) and "mxfp4_scale_mode=rceil" in repr(layer)
    no_bias = FakeQuantLinear.from_linear(nn.Linear(32, 8, bias=False), "nvfp4")
    assert no_bias.bias is None and no_bias(torch.randn(2, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match=r"mlp\.down_proj: in_features=24 .*nvfp4 block size 16"):
        FakeQuantLinear.from_linear(nn.Linear(24, 8), "nvfp4", name="mlp.down_proj")
    with pytest.raises(ValueError, match=r"Unknown FP4 format 'fp4'.*nvfp4, mxfp4"):
        FakeQuantLinear(32, 8, fmt="fp4")
    # A NaN weight fails loudly, naming the module.
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight.*1 NaN"):
        layer(torch.randn(2, 32))


def _peft_tiny_model():
    peft = pytest.importorskip("peft")
    model, _ = build_tiny_qwen2()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
    )
    return peft.get_peft_model(model, config)


def test_apply_fake_quant_skips_lm_head_on_plain_model():
    model, _ = build_tiny_qwen2()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights = {n: m.weight for n, m in linears.items()}
    state_keys = set(model.state_dict())
    input_ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        ref_logits = model(input_ids).logits

    replaced = apply_fake_quant_(model, "nvfp4")

    assert "lm_head" not in replaced and type(model.lm_head) is nn.Linear
    assert sorted(replaced) == sorted(n for n in linears if n != "lm_head")
    assert len(replaced) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    for name in replaced:
        module = model.get_submodule(name)
        assert isinstance(module, FakeQuantLinear) and module.name == name
        assert module.weight is weights[name]  # same Parameter objects: optimizers and state dicts keep working
    assert set(model.state_dict()) == state_keys  # checkpoints load and save as before
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, ref_logits)
    assert apply_fake_quant_(model, "nvfp4") == []  # idempotent: FakeQuantLinear is not wrapped again


def test_apply_fake_quant_never_touches_lora_and_lets_it_train():
    model = _peft_tiny_model()
    state_keys = set(model.state_dict())

    replaced = apply_fake_quant_(model, "mxfp4", quantize_activations=True)

    assert replaced and all("lora_" not in n and "lm_head" not in n for n in replaced)
    assert all(n.endswith(".base_layer") for n in replaced)  # PEFT's frozen base Linear of each target
    assert len(replaced) == 7 * model.config.num_hidden_layers
    lora_linears = [(n, m) for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear)]
    assert len(lora_linears) == 2 * len(replaced)
    assert all(type(m) is nn.Linear for _, m in lora_linears)  # LoRA A/B stay full precision (trap 5)
    assert set(model.state_dict()) == state_keys

    base_layer = model.get_submodule(replaced[0])
    assert not base_layer.weight.requires_grad  # still frozen
    out = model(torch.tensor([[1, 5, 9, 3]])).logits
    out.float().pow(2).mean().backward()
    lora_b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b_grads and all(g is not None and torch.isfinite(g).all() for g in lora_b_grads)
    assert sum(g.abs().sum() for g in lora_b_grads) > 0
    assert base_layer.weight.grad is None


class _PackedLinear(nn.Linear):
    """Stands for an already-quantized Linear subclass (FP4Linear, bnb Linear4bit): no floating weight Parameter."""

    def __init__(self):
        super().__init__(32, 8)
        del self.weight
        self.register_buffer("weight", torch.zeros(8, 16, dtype=torch.uint8))


def test_apply_fake_quant_leaves_already_quantized_linears_alone():
    model = nn.Sequential(nn.Linear(32, 32), _PackedLinear())
    assert apply_fake_quant_(model, "nvfp4") == ["0"]
    assert type(model[1]) is _PackedLinear


def test_apply_fake_quant_custom_skip_list_and_block_check():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(32, 32))
    model.add_module("head", nn.Linear(32, 8))
    model.add_module("router", nn.Linear(32, 8))
    assert apply_fake_quant_(model, "mxfp4", skip_modules=("head", "router")) == ["proj"]
    # Checked before anything is replaced: an incompatible layer raises and the model is left untouched.
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(40, 8))
    with pytest.raises(ValueError, match=r"1: in_features=40 .*mxfp4 block size 32"):
        apply_fake_quant_(model, "mxfp4")
    assert all(type(m) is nn.Linear for m in model)
