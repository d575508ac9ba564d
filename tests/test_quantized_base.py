# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The frozen 4-bit base: packed `FP4Linear` (NVFP4/MXFP4), `quantize_model_`, NF4 via bitsandbytes, PEFT LoRA."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from qerl_repro.quantization.base import (
    linear_weight_bytes,
    load_base_model,
    quant_format_of,
    quantize_model_,
)
from qerl_repro.quantization.formats import BLOCK_SIZE, fake_quantize, nvfp4_per_tensor_scale
from qerl_repro.quantization.linear import (
    DequantizedWeight,
    FP4Linear,
    dequantized_weight,
    is_quantized_linear,
)
from qerl_repro.testing import build_tiny_qwen2


FORMATS = ["nvfp4", "mxfp4"]
ALL_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _linear(in_features=64, out_features=32, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)  # LLM-like weight scale
        if bias:
            layer.bias.normal_(0, 0.02)
    return layer.to(dtype)


def _tiny_bf16():
    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    return model


def _base_state(model):
    """Every tensor of the frozen base (buffers of the quantized layers, biases, norms, embeddings), cloned."""
    state = {n: b.detach().clone() for n, b in model.named_buffers()}
    state.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n})
    return state


def _train_steps(model, vocab_size, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    torch.manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, 12))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss  # toy LM loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


class TestFP4Linear:
    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_forward_and_input_grad_match_fake_quantize(self, fmt, dtype):
        linear = _linear(dtype=dtype)
        layer = FP4Linear.from_linear(linear, fmt)
        w_hat = fake_quantize(linear.weight.detach(), fmt)
        assert torch.equal(layer.dequantize_weight(), w_hat)
        assert torch.equal(layer.weight, w_hat)

        x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y = layer(x)
        y_ref = F.linear(x_ref, w_hat, linear.bias.detach())
        assert torch.equal(y, y_ref)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        assert torch.equal(x.grad, x_ref.grad)  # grad_x = grad_y @ Q(W): the quantized weight, not the original

    def test_shared_per_tensor_scale(self):
        linear = _linear()
        pts = nvfp4_per_tensor_scale(torch.tensor(0.5))  # larger than this weight's own amax, as in a q/k/v group
        layer = FP4Linear.from_linear(linear, "nvfp4", per_tensor_scale=pts)
        assert torch.equal(layer.per_tensor_scale, pts)
        assert torch.equal(
            layer.dequantize_weight(), fake_quantize(linear.weight.detach(), "nvfp4", per_tensor_scale=pts)
        )
        with pytest.raises(ValueError, match="NVFP4 parameter"):
            FP4Linear.from_linear(linear, "mxfp4", per_tensor_scale=pts)

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_storage_is_packed(self, fmt):
        layer = FP4Linear.from_linear(_linear(in_features=64, out_features=32), fmt)
        block = BLOCK_SIZE[fmt]
        assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (32, 32)  # half the columns
        scale_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8  # E4M3 / biased E8M0
        assert layer.weight_scale.dtype == scale_dtype and layer.weight_scale.shape == (32, 64 // block)
        if fmt == "nvfp4":
            assert layer.per_tensor_scale.dtype == torch.float32 and layer.per_tensor_scale.dim() == 0
        else:
            assert layer.per_tensor_scale is None
        # No high-precision weight anywhere: only the (frozen) bias is a parameter.
        assert [n for n, _ in layer.named_parameters()] == ["bias"]
        assert not layer.bias.requires_grad
        expected_keys = {"weight_packed", "weight_scale", "bias"} | ({"per_tensor_scale"} if fmt == "nvfp4" else set())
        assert set(layer.state_dict()) == expected_keys

    def test_packed_layout_literal(self):
        # One MXFP4 block of exact E2M1 values: amax 6 gives scale 2^0, so the codes are the values themselves.
        values = [0.5, -1.0, 6.0, 0.0] + [0.0] * 28
        linear = nn.Linear(32, 1, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([values]))
        layer = FP4Linear.from_linear(linear, "mxfp4")
        assert layer.weight_packed[0, 0].item() == 0xA1  # 0.5 -> code 1 (low nibble), -1.0 -> code 8|2 (high nibble)
        assert layer.weight_packed[0, 1].item() == 0x07  # 6.0 -> code 7 (low), 0.0 -> code 0 (high)
        assert layer.weight_scale[0, 0].item() == 127  # 2^(127 - 127) = 1
        assert torch.equal(layer.dequantize_weight(), linear.weight.detach())

    def test_weight_is_read_only(self):
        layer = FP4Linear.from_linear(_linear(), "nvfp4", name="layers.0.q_proj")
        weight = layer.weight
        assert isinstance(weight, DequantizedWeight)
        assert type(weight * 2) is torch.Tensor  # reading works and gives plain tensors
        writes = [
            lambda: weight.add_(1.0),
            lambda: weight.data.add_(1.0),
            lambda: weight.data.__iadd__(1.0),  # PEFT merge: `base_layer.weight.data += delta`
            lambda: setattr(weight, "data", torch.zeros_like(weight)),  # PEFT safe_merge: `weight.data = merged`
            lambda: weight.copy_(torch.zeros_like(weight)),
            lambda: weight.__setitem__(0, 1.0),
        ]
        for write in writes:
            with pytest.raises(RuntimeError, match="layers.0.q_proj.*read-only"):
                write()
        with pytest.raises(AttributeError, match="cannot be assigned"):
            layer.weight = nn.Parameter(torch.zeros(32, 64))

    def test_to_dtype_moves_but_never_casts_quantized_buffers(self):
        layer = FP4Linear.from_linear(_linear(), "nvfp4")
        before = layer.dequantize_weight()
        pts = layer.per_tensor_scale.clone()
        layer.to(torch.float16)
        assert layer.weight_scale.dtype == torch.float8_e4m3fn
        assert layer.per_tensor_scale.dtype == torch.float32 and torch.equal(layer.per_tensor_scale, pts)
        assert layer.bias.dtype == torch.float16  # the bias follows the module dtype, like nn.Linear's
        assert torch.equal(layer.dequantize_weight(), before)

    def test_bad_input(self):
        linear = _linear()
        with torch.no_grad():
            linear.weight[3, 7] = float("nan")
        with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight.*1 NaN"):
            FP4Linear.from_linear(linear, "nvfp4", name="layers.1.mlp.up_proj")
        with pytest.raises(ValueError, match="valid formats are: nvfp4, mxfp4"):
            FP4Linear.from_linear(_linear(), "int4")
        with pytest.raises(ValueError, match="multiple of the mxfp4 block size 32"):
            FP4Linear.from_linear(_linear(in_features=48), "mxfp4")


class TestQuantizeModel:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_every_linear_but_lm_head_is_packed(self, fmt):
        model = _tiny_bf16()
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        bf16_bytes = linear_weight_bytes(model, skip_modules=("lm_head",))
        summary = quantize_model_(model, fmt)

        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert [n for n in linear_names if not isinstance(model.get_submodule(n), FP4Linear)] == ["lm_head"]
        assert summary["num_quantized"] == 14 and summary["skipped"] == ["lm_head"]
        assert quant_format_of(model) == fmt and model.config.qerl_quant_format == fmt
        # Embeddings, norms, lm_head and biases untouched (bit-identical, same dtype).
        for name, param in model.named_parameters():
            assert torch.equal(param, original[name]), name
        assert not any(p.requires_grad for n, p in model.named_parameters() if "proj" in n)  # frozen biases
        # Each layer holds exactly the fake-quantized weight.
        v_proj = model.model.layers[0].self_attn.v_proj
        pts = v_proj.per_tensor_scale if fmt == "nvfp4" else None
        expected = fake_quantize(original["model.layers.0.self_attn.v_proj.weight"], fmt, per_tensor_scale=pts)
        assert torch.equal(v_proj.dequantize_weight(), expected)
        # Memory: <= 0.30x of bf16 (NVFP4 4.5 bits + FP32 scale, MXFP4 4.25 bits per weight).
        ratio = linear_weight_bytes(model, skip_modules=("lm_head",)) / bf16_bytes
        assert ratio <= 0.30
        assert ratio == pytest.approx(summary["ratio"])
        assert summary["bytes_before"] == bf16_bytes

    def test_qkv_and_gate_up_share_one_per_tensor_scale(self):
        model = _tiny_bf16()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        summary = quantize_model_(model, "nvfp4")
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{i}"
            qkv_amax = max(weights[f"{prefix}.self_attn.{p}_proj.weight"].abs().max() for p in "qkv").float()
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                assert torch.equal(proj.per_tensor_scale, nvfp4_per_tensor_scale(qkv_amax))
            gate_up_amax = max(weights[f"{prefix}.mlp.{p}_proj.weight"].abs().max() for p in ("gate", "up")).float()
            assert torch.equal(mlp.gate_proj.per_tensor_scale, nvfp4_per_tensor_scale(gate_up_amax))
            assert torch.equal(mlp.up_proj.per_tensor_scale, mlp.gate_proj.per_tensor_scale)
            # o_proj and down_proj keep their own scale.
            own = weights[f"{prefix}.mlp.down_proj.weight"].abs().max().float()
            assert torch.equal(mlp.down_proj.per_tensor_scale, nvfp4_per_tensor_scale(own))
        assert summary["shared_scale_groups"][0] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
        assert summary["shared_scale_groups"][1] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]

    def test_mxfp4_scale_mode_recorded(self):
        model = _tiny_bf16()
        weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        summary = quantize_model_(model, "mxfp4", mxfp4_scale_mode="rceil")
        assert summary["mxfp4_scale_mode"] == "rceil" and model.config.qerl_mxfp4_scale_mode == "rceil"
        expected = fake_quantize(weight, "mxfp4", mxfp4_scale_mode="rceil")
        assert torch.equal(model.model.layers[0].mlp.down_proj.dequantize_weight(), expected)

    def test_nan_weight_names_the_layer_and_changes_nothing(self):
        model = _tiny_bf16()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
            quantize_model_(model, "nvfp4")
        assert not any(isinstance(m, FP4Linear) for m in model.modules())  # validated before any replacement

    def test_unknown_format_and_misuse(self, tiny_model_dir):
        model = _tiny_bf16()
        with pytest.raises(ValueError, match="valid formats are: nvfp4, mxfp4"):
            quantize_model_(model, "fp8")
        with pytest.raises(ValueError, match="load_base_model"):
            quantize_model_(model, "nf4")
        with pytest.raises(ValueError, match="valid formats are: none, nf4, mxfp4, nvfp4"):
            load_base_model(tiny_model_dir, "int4")
        quantize_model_(model, "nvfp4")
        with pytest.raises(ValueError, match="not quantizing twice"):
            quantize_model_(model, "nvfp4")

    def test_tied_weights_refused(self):
        model = _tiny_bf16()
        model.lm_head.weight = model.model.embed_tokens.weight  # tie_word_embeddings, as in SmolLM2
        with pytest.raises(ValueError, match="tied weights.*skip_modules"):
            quantize_model_(model, "nvfp4", skip_modules=())

    @pytest.mark.parametrize("fmt", ["none", "nvfp4", "mxfp4"])
    def test_load_base_model(self, tiny_model_dir, fmt):
        model = load_base_model(tiny_model_dir, fmt, dtype=torch.bfloat16)
        assert model.config.qerl_quant_format == fmt == quant_format_of(model)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, FP4Linear) == (fmt != "none")
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        if fmt != "none":
            assert model.qerl_quantization_summary["num_quantized"] == 14
            assert q_proj.weight_dtype == torch.bfloat16


class TestPeftLoRA:
    @pytest.mark.parametrize(
        "fmt,target_modules",
        [
            ("nvfp4", "all-linear"),
            ("mxfp4", "all-linear"),
            ("nvfp4", ALL_LINEAR_NAMES),
            ("mxfp4", ["q_proj", "v_proj"]),
        ],
    )
    def test_lora_trains_and_base_stays_bit_identical(self, fmt, target_modules):
        model = _tiny_bf16()
        quantize_model_(model, fmt)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
        expected = 14 if target_modules == "all-linear" else 2 * len(target_modules)
        wrapped = [m for m in peft_model.modules() if hasattr(m, "lora_A")]
        assert len(wrapped) == expected
        assert all(isinstance(m.get_base_layer(), FP4Linear) for m in wrapped)
        assert not hasattr(peft_model.base_model.model.lm_head, "lora_A")  # "all-linear" leaves the head alone

        trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)  # no trainable base weight
        for m in wrapped:  # LoRA A/B: plain high-precision Linear, never FP4 (DESIGN trap 5)
            for lora in (m.lora_A["default"], m.lora_B["default"]):
                assert type(lora) is nn.Linear and lora.weight.dtype == torch.float32

        base_before = _base_state(peft_model)
        lora_before = {n: p.detach().clone() for n, p in trainable.items()}
        losses = _train_steps(peft_model, model.config.vocab_size)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(p, lora_before[n]) for n, p in trainable.items())  # LoRA learned
        for name, tensor in _base_state(peft_model).items():  # packed codes, scales, biases, norms, embeddings
            assert torch.equal(tensor, base_before[name]), name

    def test_in_place_merge_raises_and_out_of_place_merge_works(self):
        model = _tiny_bf16()
        quantize_model_(model, "nvfp4")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        base_before = _base_state(peft_model)
        for merge in (
            peft_model.merge_adapter,
            lambda: peft_model.merge_adapter(safe_merge=True),
            peft_model.merge_and_unload,
        ):
            with pytest.raises(RuntimeError, match="read-only.*merge out of place"):
                merge()
            assert not layer.merged  # PEFT did not record a (silently lost) merge
        for name, tensor in _base_state(peft_model).items():
            assert torch.equal(tensor, base_before[name]), name

        # The documented alternative: W_hat + scaling * B @ A, out of place in fp32, equals the LoRA layer's output.
        merged = dequantized_weight(layer.get_base_layer()).float() + layer.get_delta_weight("default").float()
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        expected = F.linear(x.float(), merged, layer.base_layer.bias.float())
        # The layer runs in bf16 (8 significant bits): its output is within a bf16 step (2^-7 relative) of the fp32
        # reference, while leaving the LoRA delta out would move it by about 2 (random B, init_lora_weights=False).
        torch.testing.assert_close(layer(x).float(), expected, rtol=2**-7, atol=2**-7)
        base_only = F.linear(
            x.float(), dequantized_weight(layer.get_base_layer()).float(), layer.base_layer.bias.float()
        )
        assert (expected - base_only).abs().max() > 50 * 2**-7

    def test_quantizing_a_peft_model_skips_lora(self):
        model = _tiny_bf16()
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        summary = quantize_model_(peft_model, "nvfp4")
        assert summary["num_quantized"] == 14
        assert all("lora_" not in name for name in summary["quantized"])
        q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj.base_layer, FP4Linear) and type(q_proj.lora_A["default"]) is nn.Linear
        k_proj = peft_model.base_model.model.model.layers[0].self_attn.k_proj
        assert torch.equal(q_proj.base_layer.per_tensor_scale, k_proj.base_layer.per_tensor_scale)  # via base_layer


class TestNF4:
    def test_nf4_loads_on_cpu_and_lora_trains(self, tiny_model_dir):
        import bitsandbytes as bnb

        reference = load_base_model(tiny_model_dir, "none", dtype=torch.bfloat16)
        model = load_base_model(tiny_model_dir, "nf4", dtype=torch.bfloat16)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, bnb.nn.Linear4bit) and is_quantized_linear(q_proj)
        assert model.config.qerl_quant_format == "nf4" and model.is_loaded_in_4bit
        assert not isinstance(model.lm_head, bnb.nn.Linear4bit)

        w = dequantized_weight(q_proj)
        w_ref = reference.model.layers[0].self_attn.q_proj.weight
        assert w.shape == w_ref.shape and w.dtype == torch.bfloat16
        rel = ((w.float() - w_ref.float()).norm() / w_ref.float().norm()).item()
        assert 0 < rel < 0.15  # NF4 on Gaussian weights: ~0.09
        ratio = linear_weight_bytes(model, ("lm_head",)) / linear_weight_bytes(reference, ("lm_head",))
        # 4-bit codes + double-quantized absmax per 64 weights (~0.26x), plus ~1.1 KB of per-layer code books that
        # weigh a lot on these 64x64 layers (0.36x here).
        assert ratio <= 0.40

        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
        # An evaluation forward first (eval mode, no grad): bitsandbytes would repack the CPU weights here.
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=torch.tensor([[1, 2, 3]]))
        peft_model.train()  # as Trainer does
        trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        losses = _train_steps(peft_model, model.config.vocab_size)
        assert all(torch.isfinite(torch.tensor(losses)))
        now = dict(peft_model.named_parameters())
        assert all(not torch.equal(now[n], p) for n, p in trainable.items())  # every LoRA matrix got gradients
        for name, tensor in base_before.items():  # NF4 codes, biases, norms, embeddings: bit-identical
            assert torch.equal(now[name], tensor), name

    def test_dequantized_weight_reads_bnb_cpu_repacked_layout(self, tiny_model_dir):
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, quantization_config=config)
        layer = model.model.layers[0].mlp.down_proj
        if not layer.support_avx512bf16_for_cpu:
            pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
        x = torch.randn(3, 128, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.eval()
            y = layer(x)  # repacks the weight in place (bitsandbytes 0.50 CPU inference path)
        assert layer.weight.quant_state.packing_format_for_cpu
        w = dequantized_weight(layer)
        assert w.shape == (64, 128)
        torch.testing.assert_close(F.linear(x, w, layer.bias), y, rtol=0, atol=2e-3)  # what the layer computes
        assert isinstance(layer, bnb.nn.Linear4bit)


class TestDequantizedWeight:
    def test_each_base_type(self):
        linear = _linear()
        assert torch.equal(dequantized_weight(linear), linear.weight) and not dequantized_weight(linear).requires_grad
        for fmt in FORMATS:
            layer = FP4Linear.from_linear(linear, fmt)
            out = dequantized_weight(layer)
            assert type(out) is torch.Tensor and torch.equal(out, fake_quantize(linear.weight.detach(), fmt))
        # A LoRA wrapper gives its base layer's weight (the delta is not included).
        model = nn.Sequential()
        model.add_module("proj", FP4Linear.from_linear(linear, "nvfp4"))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
        wrapper = peft_model.base_model.model.proj
        assert torch.equal(dequantized_weight(wrapper), fake_quantize(linear.weight.detach(), "nvfp4"))
        with pytest.raises(TypeError, match="expected a Linear"):
            dequantized_weight(nn.Embedding(4, 4))
