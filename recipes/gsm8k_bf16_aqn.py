# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL (arXiv 2510.11696) GSM8K ablation, not a Table 1 row: BF16 LoRA + AQN (asked for in QeRL issue #11, never run
there): the BF16 LoRA recipe with Adaptive Quantization Noise on the unquantized base (`aqn_allow_unquantized`).

Paper setting (Qwen2.5-3B-Instruct; on GPUs, with Hub access):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/gsm8k_bf16_aqn.py --config recipes/Qwen2.5-3B-Instruct/gsm8k_bf16_aqn.yaml

7B:

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/gsm8k_bf16_aqn.py --config recipes/Qwen2.5-7B-Instruct/gsm8k_bf16_aqn.yaml

CPU testbed version: `recipes/testbed_grpo.py --config recipes/testbed/testbed_bf16_aqn.yaml`.
Without `--config` the Qwen2.5-3B-Instruct YAML is used. Command-line flags override the YAML.
"""

from qerl_repro.grpo import main, parse_recipe_args


if __name__ == "__main__":
    main(*parse_recipe_args(__file__))
