# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The FP4 base a GPU rollout engine serves (unmerged mode): vLLM's own compressed-tensors config reads our export and
dispatches every decoder Linear to its weight-only FP4 scheme, `lm_head` stays high precision. On vLLM's CPU backend
the scheme stops at kernel choice (no FP4 kernel), which is why the CPU engine holds the dequantized base instead."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig
from qerl_repro.quantization.base import quantize_model_
from qerl_repro.quantization.export import save_compressed_tensors
from qerl_repro.testing import build_tiny_qwen2


pytestmark = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

NUM_LAYERS = 2
# Fused as vLLM has them:
VLLM_LINEARS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def export(request, tmp_path_factory):
    model, tokenizer = build_tiny_qwen2(num_hidden_layers=NUM_LAYERS, dtype=torch.bfloat16)
    quantize_model_(model, request.param)
    folder = save_compressed_tensors(model, str(tmp_path_factory.mktemp(request.param)), tokenizer=tokenizer)
    return request.param, folder


def _vllm_quant_config(folder):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    with open(os.path.join(folder, "config.json")) as f:
        config = CompressedTensorsConfig.from_config(json.load(f)["quantization_config"])
    config.packed_modules_mapping = dict(Qwen2ForCausalLM.packed_modules_mapping)  # what the vLLM model sets
    return config


def _vllm_layer(name):
    """An (uninitialised) instance of the vLLM class that holds `name`: scheme matching reads only its class."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for suffix, cls in [
        ("qkv_proj", QKVParallelLinear),
        ("gate_up_proj", MergedColumnParallelLinear),
        ("o_proj", RowParallelLinear),
        ("down_proj", RowParallelLinear),
        ("lm_head", ParallelLMHead),
    ]:
        if name.endswith(suffix):
            return object.__new__(cls)
    raise KeyError(name)


def test_vllm_dispatches_every_decoder_linear_to_weight_only_fp4_and_leaves_lm_head(export):
    fmt, folder = export
    config = _vllm_quant_config(folder)
    names = [f"model.layers.{i}.{linear}" for i in range(NUM_LAYERS) for linear in VLLM_LINEARS]
    for name in names:
        scheme = config.get_scheme_dict(_vllm_layer(name), name)
        assert scheme is not None, name
        assert scheme["input_activations"] is None, name  # weight-only: activations stay bf16, as in training
        if fmt == "nvfp4":
            assert config._is_nvfp4_format(scheme["weights"]), name  # -> CompressedTensorsW4A4Fp4(use_a16=True)
        else:
            assert config._is_mxfp4(scheme["weights"]), name  # -> CompressedTensorsW4A4Mxfp4
    assert config.get_scheme_dict(_vllm_layer("lm_head"), "lm_head") is None  # unquantized lm_head


def test_vllm_cpu_backend_stops_at_fp4_kernel_choice(export):
    """The reason the CPU engine holds the dequantized base: vLLM picks the FP4 scheme, then finds no CPU kernel."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks the CPU backend")
    fmt, folder = export
    config = _vllm_quant_config(folder)
    name = "model.layers.0.self_attn.o_proj"
    with pytest.raises(ValueError, match="Marlin FP4 not available" if fmt == "nvfp4" else "MXFP4 linear layer"):
        config.get_scheme(_vllm_layer(name), name)


@pytest.mark.parametrize("export", ["nvfp4"], indirect=True)  # MXFP4 has no global scale
def test_fused_projections_share_one_global_scale(export):
    _, folder = export
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    for i in range(NUM_LAYERS):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            scales = [tensors[f"model.layers.{i}.{proj}.weight_global_scale"] for proj in group]
            assert all(torch.equal(scale, scales[0]) for scale in scales), (i, group)  # vLLM takes their max


def test_engine_base_export_only_where_a_gpu_engine_serves_it(tmp_dir, monkeypatch):
    from qerl_repro import trainer as trainer_module
    from qerl_repro.testing import lora_config

    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    quantize_model_(model, "nvfp4")

    def args(**kwargs):
        settings = dict(output_dir=tmp_dir, use_cpu=True, report_to="none", use_vllm=True, quant_format="nvfp4")
        return QeRLConfig(**{**settings, **kwargs})

    export = trainer_module.engine_base_export
    assert export(model, args(), lora_config(), "unmerged") is None  # vLLM CPU backend: no FP4 kernel
    monkeypatch.setattr("qerl_repro.vllm_cpu.is_vllm_cpu_platform", lambda: False)  # as on a GPU machine
    assert export(model, args(), lora_config(), "merged") is None  # merged: the engine receives bf16 weights
    assert export(model, args(), None, "unmerged") is None  # full fine-tuning syncs every weight
    assert export(model, args(quant_format="nf4"), lora_config(), "unmerged") is None
    assert export(model, args(vllm_enable_sleep_mode=True), lora_config(), "unmerged") is None
    folder = export(model, args(), lora_config(), "unmerged")
    assert folder == os.path.join(tmp_dir, "engine_base-nvfp4")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["quantization_config"]["format"] == "nvfp4-pack-quantized"
