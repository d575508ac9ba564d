# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""compressed-tensors checkpoints: what is written, and that transformers + compressed-tensors load it back exactly."""

import json
import os

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from qerl_repro.quantization.base import load_base_model, quantize_model_
from qerl_repro.quantization.export import save_compressed_tensors
from qerl_repro.quantization.linear import FP4Linear
from qerl_repro.testing import build_tiny_qwen2


@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def exported(request, tiny_model_dir, tmp_path_factory):
    """(format, quantized model, checkpoint dir): the tiny Qwen2 quantized and saved once per format."""
    fmt = request.param
    model = load_base_model(tiny_model_dir, fmt, dtype=torch.bfloat16)
    out_dir = str(tmp_path_factory.mktemp(f"ct_{fmt}"))
    save_compressed_tensors(model, out_dir)
    return fmt, model, out_dir


def _tensors(out_dir):
    tensors = {}
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(out_dir, name)))
    return tensors


def test_checkpoint_tensors(exported):
    fmt, model, out_dir = exported
    tensors = _tensors(out_dir)
    for name, module in model.named_modules():
        if not isinstance(module, FP4Linear):
            continue
        assert f"{name}.weight" not in tensors and f"{name}.per_tensor_scale" not in tensors
        assert torch.equal(tensors[f"{name}.weight_packed"], module.weight_packed)  # our codes, not re-quantized
        assert torch.equal(tensors[f"{name}.weight_scale"], module.weight_scale)
        expected_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
        assert tensors[f"{name}.weight_scale"].dtype == expected_dtype
        if fmt == "nvfp4":
            global_scale = tensors[f"{name}.weight_global_scale"]
            assert global_scale.dtype == torch.float32 and global_scale.shape == (1,)
            assert torch.equal(global_scale, (1.0 / module.per_tensor_scale).reshape(1))  # compressed-tensors divisor
        else:
            assert f"{name}.weight_global_scale" not in tensors
        if module.bias is not None:
            assert torch.equal(tensors[f"{name}.bias"], module.bias)
    # High-precision tensors saved unchanged.
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(tensors["model.norm.weight"], model.model.norm.weight)


@pytest.mark.parametrize("exported", ["nvfp4"], indirect=True)  # MXFP4 has no global scale (test_checkpoint_tensors)
def test_global_scale_shared_within_qkv_and_gate_up(exported):
    _, _, out_dir = exported
    tensors = _tensors(out_dir)
    for i in range(2):
        prefix = f"model.layers.{i}"
        qkv = [tensors[f"{prefix}.self_attn.{p}_proj.weight_global_scale"] for p in "qkv"]
        assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
        gate, up = (tensors[f"{prefix}.mlp.{p}_proj.weight_global_scale"] for p in ("gate", "up"))
        assert torch.equal(gate, up)
        assert not torch.equal(qkv[0], gate)  # different groups, different amax


def test_config_is_valid_compressed_tensors(exported):
    fmt, model, out_dir = exported
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}[fmt]
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (4, "float", True)
    assert weights["group_size"] == {"nvfp4": 16, "mxfp4": 32}[fmt]
    assert weights["strategy"] == {"nvfp4": "tensor_group", "mxfp4": "group"}[fmt]
    assert qc["config_groups"]["group_0"]["input_activations"] is None  # weight-only (W4A16)
    # The installed compressed-tensors (extra="forbid" on its models) accepts it as is.
    parsed = QuantizationConfig.model_validate(
        {k: v for k, v in qc.items() if k not in ("version", "transform_config", "sparsity_config")}
    )
    assert parsed.format == qc["format"]


def test_transformers_loads_back_exactly(exported, tiny_model_dir):
    fmt, model, out_dir = exported
    loaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    num_checked = 0
    for name, module in model.named_modules():
        if isinstance(module, FP4Linear):
            restored = loaded.get_submodule(name)
            assert type(restored) is torch.nn.Linear
            assert restored.weight.dtype == torch.bfloat16
            assert torch.equal(restored.weight, module.dequantize_weight()), name  # bit-exact, every element
            num_checked += 1
    assert num_checked == 14
    input_ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_export_refuses_what_it_cannot_write(tmp_dir):
    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="quantize it first"):
        save_compressed_tensors(model, tmp_dir)
    quantize_model_(model, "nvfp4")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="without LoRA adapters"):
        save_compressed_tensors(peft_model, tmp_dir)
