# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL (arXiv 2510.11696) Table 1, GSM8K, row "BF16 | Full": full-parameter GRPO on the BF16 model (no LoRA, no quantization).

Paper setting (Qwen2.5-3B-Instruct; on GPUs, with Hub access):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/gsm8k_bf16_full.py --config recipes/Qwen2.5-3B-Instruct/gsm8k_bf16_full.yaml

Trains fp32 master weights with bf16 compute (as every LoRA arm trains fp32 adapters): 49 GB of weights, gradients and
AdamW state for 3B. 7B (122 GB of it) needs several GPUs with ZeRO-3, which partitions them:
`--config_file accelerate_configs/deepspeed_zero3.yaml --config recipes/Qwen2.5-7B-Instruct/gsm8k_bf16_full.yaml`.
CPU (SmolLM2-135M-Instruct, local GSM8K):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gsm8k_bf16_full.py --config recipes/SmolLM2-135M-Instruct/gsm8k_bf16_full.yaml

Without `--config` the Qwen2.5-3B-Instruct YAML is used. Command-line flags override the YAML.
"""

from qerl_repro.grpo import main, parse_recipe_args


if __name__ == "__main__":
    main(*parse_recipe_args(__file__))
