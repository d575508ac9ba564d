# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL (arXiv 2510.11696) on GSM8K with DAPO instead of GRPO: LoRA on an NVFP4 base with Adaptive Quantization Noise,
TRL's `dapo` loss, clip 0.2 / 0.28, truncated completions masked and DAPO's soft overlong punishment (the loss QeRL's
own scripts call "DAPO"; Table 1 itself was trained with GRPO).

Paper setting (Qwen2.5-3B-Instruct; on GPUs, with Hub access):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/gsm8k_nvfp4_aqn_dapo.py --config recipes/Qwen2.5-3B-Instruct/gsm8k_nvfp4_aqn_dapo.yaml

7B: `--config recipes/Qwen2.5-7B-Instruct/gsm8k_nvfp4_aqn_dapo.yaml` (and `accelerate_configs/multi_gpu.yaml` to scale
out). CPU (SmolLM2-135M-Instruct, local GSM8K):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/gsm8k_nvfp4_aqn_dapo.py --config recipes/SmolLM2-135M-Instruct/gsm8k_nvfp4_aqn_dapo.yaml

Without `--config` the Qwen2.5-3B-Instruct YAML is used. Command-line flags override the YAML.
"""

from qerl_repro.grpo import main, parse_recipe_args


if __name__ == "__main__":
    main(*parse_recipe_args(__file__))
