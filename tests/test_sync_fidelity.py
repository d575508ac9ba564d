# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""`sync/update_lost_frac` maths, the adapter folder handed to vLLM, and the sync-mode config (no engine here)."""

import json
import math
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from qerl_repro import QeRLConfig
from qerl_repro.sync_fidelity import choose_probe_layers, probe_rows, update_lost_frac
from qerl_repro.testing import build_tiny_qwen2
from qerl_repro.trainer import add_norms_to_modules_to_save, keep_trained_norms_in_fp32_, resolve_rollout_engine
from qerl_repro.weight_sync import iter_trained_extra_weights, save_engine_adapter, vllm_max_lora_rank


W = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
DELTA = torch.tensor([[1e-3, -2e-3, 0.0, 4e-3]], dtype=torch.float64)


@pytest.mark.parametrize(
    "engine, expected",
    [
        (W + DELTA, 0.0),  # the engine holds base + update exactly
        (W, 1.0),  # the engine holds the base: the whole update is lost
        (W + 0.5 * DELTA, 0.5),  # half of the update arrived
        (W + 2 * DELTA, 1.0),  # overshoot by one update: as far from the policy as the base is
        (W - DELTA, 2.0),  # the update went the wrong way
    ],
)
def test_update_lost_frac_table(engine, expected):
    assert math.isclose(update_lost_frac(engine, W, DELTA), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_update_lost_frac_in_a_bf16_engine_rounds_small_updates_away():
    """The measured trap: below half a bf16 step of W (~6e-5 at |W| = 0.02) a merged update vanishes in bf16."""
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(64, 576, generator=generator) * 0.02).bfloat16()  # dequant(W_q) lies on the bf16 grid
    for scale, low, high in [(1e-5, 0.8, 1.0), (1e-3, 0.0, 0.1)]:
        delta = torch.randn(base.shape, generator=generator) * scale
        merged = (base.float() + delta).bfloat16()
        assert low <= update_lost_frac(merged, base, delta) <= high, scale


def test_update_lost_frac_without_an_update():
    assert update_lost_frac(W, W, torch.zeros_like(W)) == 0.0  # nothing to lose, nothing lost
    assert update_lost_frac(W + 1e-3, W, torch.zeros_like(W)) == math.inf  # the engine's base does not match
    with pytest.raises(ValueError, match="Shapes differ"):
        update_lost_frac(W, W[:, :2], DELTA)


def test_probe_rows_fixed_distinct_sorted():
    rows = probe_rows(576, 64, seed=3)
    assert torch.equal(rows, probe_rows(576, 64, seed=3))  # the same rows at every sync and on every rank
    assert len(set(rows.tolist())) == 64 and torch.equal(rows, rows.sort().values) and rows.max() < 576
    assert probe_rows(10, 64).tolist() == list(range(10))  # small layers: every row
    with pytest.raises(ValueError):
        probe_rows(0, 4)


@pytest.mark.parametrize(
    "num_blocks, expected_blocks",
    [
        (1, [0]),
        (2, [0, 1]),
        (30, [0, 14, 29]),  # SmolLM2-135M: first, middle, last
        (36, [0, 18, 35]),  # Qwen2.5-3B
    ],
)
def test_choose_probe_layers_first_middle_last_unfused_projections(num_blocks, expected_blocks):
    names = [
        f"model.layers.{i}.{proj}"
        for i in range(num_blocks)
        for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ]
    expected = [f"model.layers.{i}.{p}" for i in expected_blocks for p in ("mlp.down_proj", "self_attn.o_proj")]
    assert choose_probe_layers(names) == expected
    assert choose_probe_layers(["model.layers.0.self_attn.q_proj"]) == []  # q/k/v, gate/up are fused in vLLM


@pytest.mark.parametrize("rank, expected", [(1, 1), (2, 8), (8, 8), (16, 16), (32, 32), (33, 64), (512, 512)])
def test_vllm_max_lora_rank(rank, expected):
    assert vllm_max_lora_rank(rank) == expected


def test_vllm_max_lora_rank_too_large():
    with pytest.raises(ValueError, match="exceeds"):
        vllm_max_lora_rank(513)


def test_config_adapter_sync_modes(tmp_dir):
    def config(**kwargs):
        return QeRLConfig(output_dir=tmp_dir, use_cpu=True, report_to="none", **kwargs)

    for kwargs, on_vllm_cpu, expected in [
        (dict(vllm_mode="colocate"), False, ("unmerged", None)),  # GPU: QeRL's engine
        (dict(vllm_mode="colocate"), True, ("merged", "float32")),  # vLLM CPU: lossless fp32 merge, fast kernels
        (dict(vllm_mode="colocate", vllm_dtype="bfloat16"), True, ("merged", "bfloat16")),  # explicit dtype kept
        (dict(vllm_mode="server"), False, ("merged", None)),  # TRL's server client has no LoRA path
        (dict(vllm_mode="colocate", vllm_adapter_sync="unmerged"), True, ("unmerged", None)),  # explicit mode kept
        (dict(vllm_mode="colocate", vllm_adapter_sync="merged"), False, ("merged", None)),
    ]:
        assert resolve_rollout_engine(config(use_vllm=True, **kwargs), on_vllm_cpu) == expected, kwargs
    with pytest.raises(ValueError, match="needs vllm_mode='colocate'"):
        config(use_vllm=True, vllm_mode="server", vllm_adapter_sync="unmerged")
    with pytest.raises(ValueError, match="vllm_adapter_sync='fused' is not one of"):
        config(vllm_adapter_sync="fused")
    with pytest.raises(ValueError, match="sync_fidelity_rows=-1"):
        config(sync_fidelity_rows=-1)


@pytest.fixture
def peft_tiny():
    model, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    config = add_norms_to_modules_to_save(model, config)
    peft_model = get_peft_model(model, config)
    keep_trained_norms_in_fp32_(peft_model)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return peft_model


def test_train_norms_config_names_exactly_the_aqn_target_norms(peft_tiny):
    assert sorted(peft_tiny.peft_config["default"].modules_to_save) == ["input_layernorm", "post_attention_layernorm"]
    extras = dict(iter_trained_extra_weights(peft_tiny))
    assert sorted(extras) == [
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    ]
    assert all(t.dtype == torch.float32 for t in extras.values())


def test_fp32_trained_norms_keep_the_bf16_model_running(peft_tiny):
    ids = torch.tensor([[3, 4, 5, 6]])
    logits = peft_tiny(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()  # gradients reach the fp32 norm masters
    norm = peft_tiny.base_model.model.model.layers[0].input_layernorm.modules_to_save["default"]
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_engine_adapter_holds_only_lora_tensors_and_loads_back_into_peft(peft_tiny, tmp_dir):
    folder = save_engine_adapter(peft_tiny, os.path.join(tmp_dir, "adapter"))
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks; no norms (they go by load_weights)
    assert all(name.startswith("base_model.model.model.layers.") for name in tensors)
    assert all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in tensors)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["modules_to_save"] is None and config["r"] == 8 and config["lora_alpha"] == 16
    # Independent reader: PEFT loads the folder into a fresh base and gets the same LoRA weights.
    fresh, _ = build_tiny_qwen2(dtype=torch.bfloat16)
    reloaded = PeftModel.from_pretrained(fresh, folder)
    original = {n: p for n, p in peft_tiny.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.float(), original[name].float()), name


def test_engine_adapter_refuses_what_vllm_cannot_serve(tmp_dir):
    model, _ = build_tiny_qwen2()
    with pytest.raises(ValueError, match="needs a PEFT model"):
        save_engine_adapter(model, tmp_dir)
    dora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"))
    with pytest.raises(NotImplementedError, match="no DoRA"):
        save_engine_adapter(dora, tmp_dir)


def test_train_norms_needs_a_peft_config():
    model, _ = build_tiny_qwen2()
    with pytest.raises(ValueError, match="pass a `peft_config`"):
        add_norms_to_modules_to_save(model, None)
