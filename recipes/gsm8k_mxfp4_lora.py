# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL (arXiv 2510.11696) Table 1, GSM8K, row "MXFP4 | LoRA": LoRA on an MXFP4 base (E8M0 scales, blocks of 32).

Paper setting (Qwen2.5-3B-Instruct; on GPUs, with Hub access):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/gsm8k_mxfp4_lora.py --config recipes/Qwen2.5-3B-Instruct/gsm8k_mxfp4_lora.yaml

7B: `--config recipes/Qwen2.5-7B-Instruct/gsm8k_mxfp4_lora.yaml` (and `accelerate_configs/multi_gpu.yaml` to scale out).
CPU (SmolLM2-135M-Instruct, local GSM8K):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gsm8k_mxfp4_lora.py --config recipes/SmolLM2-135M-Instruct/gsm8k_mxfp4_lora.yaml

Without `--config` the Qwen2.5-3B-Instruct YAML is used. Command-line flags override the YAML.
"""

from qerl_repro.grpo import main, parse_recipe_args


if __name__ == "__main__":
    main(*parse_recipe_args(__file__))
