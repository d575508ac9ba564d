# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Table 1's arms train at the same precision: every recipe's trainable parameters are fp32, and they move at the
recipe's own learning rate (1e-5 QeRL and QLoRA, 5e-6 BF16 LoRA, 1e-6 full fine-tuning). In bf16 an AdamW step of ~lr on a weight of ~0.02 is
below half a bf16 step and rounds away (NF4's adapter before the fix: 17 % of `lora_A` moved in 5 steps; full FT:
1.9 % of the weights), which would favour QeRL's arms in the comparison.

The recipes are built by `qerl_repro.grpo.build_trainer` (what `main` runs) from the Qwen2.5-3B YAMLs, with the model
swapped for a tiny bf16 Qwen2, HF generation instead of vLLM, a small batch, and a reward that varies within a group so
that every step has a gradient. Weight decay is switched off so that only gradient steps can move a weight."""

import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from qerl_repro.grpo import build_trainer, make_parser
from qerl_repro.testing import length_reward


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def _recipe_trainer(recipe, model_dir, output_dir):
    config = os.path.join(ROOT, "recipes", "Qwen2.5-3B-Instruct", f"{recipe}.yaml")
    overrides = {
        "model_name_or_path": model_dir,
        "output_dir": output_dir,
        "use_cpu": "true",
        "use_vllm": "false",
        "per_device_train_batch_size": "4",
        "num_generations": "4",
        "gradient_accumulation_steps": "2",
        "max_completion_length": "8",
        "mask_truncated_completions": "false",  # a random tiny model never stops: every completion is truncated
        "max_steps": str(STEPS),
        "weight_decay": "0.0",
        "warmup_steps": "0",
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": "false",
    }
    args = ["--config", config] + [item for key, value in overrides.items() for item in (f"--{key}", value)]
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(16)]
    dataset = Dataset.from_dict({"prompt": prompts, "solution": [str(2 * i) for i in range(16)]})
    trainer = build_trainer(
        script_args, training_args, model_args, model_dir, tokenizer, dataset, reward_funcs=[length_reward]
    )
    return trainer, training_args


# The recipes' learning rates (paper Table 4: 1e-5 for QeRL and QLoRA, 5e-6 for BF16 LoRA; full FT: TRL's default).
RECIPE_LR = {
    "gsm8k_bf16_full": 1e-6,
    "gsm8k_bf16_lora": 5e-6,
    "gsm8k_nf4_qlora": 1e-5,
    "gsm8k_mxfp4_lora": 1e-5,
    "gsm8k_nvfp4_lora": 1e-5,
    "gsm8k_nvfp4_aqn": 1e-5,
}


@pytest.mark.parametrize("recipe", list(RECIPE_LR))
def test_table1_arm_trains_fp32_parameters_that_move_at_the_recipe_lr(recipe, tiny_bf16_model_dir, tmp_path):
    trainer, training_args = _recipe_trainer(recipe, tiny_bf16_model_dir, str(tmp_path))
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable
    assert {name: p.dtype for name, p in trainable.items() if p.dtype != torch.float32} == {}
    assert training_args.learning_rate == RECIPE_LR[recipe]
    if recipe == "gsm8k_bf16_full":
        # every decoder weight matrix (embedding rows of tokens never seen get no gradient, in any precision)
        watched = {name: p for name, p in trainable.items() if p.ndim == 2 and ".layers." in name}
    else:
        watched = {name: p for name, p in trainable.items() if "lora_A" in name}
    assert watched
    before = {name: p.detach().clone() for name, p in watched.items()}
    trainer.train()
    assert trainer.state.global_step == STEPS
    moved = sum(int((p.detach() != before[name]).sum()) for name, p in watched.items())
    total = sum(p.numel() for p in before.values())
    assert moved / total >= 0.99, f"{recipe}: only {moved / total:.1%} of the watched elements moved in {STEPS} steps"
