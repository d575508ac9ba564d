# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL (arXiv 2510.11696) Table 2, BigMath, row "NVFP4 | +AQN": DAPO of a LoRA on an NVFP4 base with Adaptive
Quantization Noise, on open-r1/Big-Math-RL-Verified-Processed (levels 3-5) with a math-verify reward.

Paper setting (Qwen2.5-7B-Instruct; on GPUs, with Hub access):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/bigmath_nvfp4_aqn_dapo.py --config recipes/Qwen2.5-7B-Instruct/bigmath_nvfp4_aqn_dapo.yaml

CPU (SmolLM2-135M-Instruct) on a local copy of Big-Math (`--dataset_path` to a folder with `train.jsonl` or the Hub's
`train-*.parquet`, columns `prompt` and `solution`):

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/bigmath_nvfp4_aqn_dapo.py --config recipes/SmolLM2-135M-Instruct/bigmath_nvfp4_aqn_dapo.yaml --dataset_path <folder>

Without `--config` the Qwen2.5-7B-Instruct YAML is used (the smallest model of Table 2). Command-line flags override
the YAML. Table 2's benchmarks (MATH500, AIME 2024/2025, AMC 2023) are not evaluated by this recipe: it trains and saves
the adapter; evaluation on those sets is not implemented here.
"""

import os
import sys

from qerl_repro.grpo import main, parse_recipe_args


DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "Qwen2.5-7B-Instruct", "bigmath_nvfp4_aqn_dapo.yaml"
)


if __name__ == "__main__":
    argv = sys.argv[1:] if "--config" in sys.argv else ["--config", DEFAULT_CONFIG, *sys.argv[1:]]
    main(*parse_recipe_args(__file__, argv))
