# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""CPU testbed for QeRL (arXiv 2510.11696) Table 1: GRPO from the 3-digit-addition model organism
(`qerl_repro.testbed`), one YAML per Table 1 row in `recipes/testbed/`. The organism is built first if missing.

NVFP4 LoRA + AQN (QeRL) and NVFP4 LoRA:

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/testbed_grpo.py --config recipes/testbed/testbed_nvfp4_aqn.yaml
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/testbed_grpo.py --config recipes/testbed/testbed_nvfp4_lora.yaml

Other rows: `testbed_bf16_full.yaml`, `testbed_bf16_lora.yaml`, `testbed_nf4_qlora.yaml`, `testbed_mxfp4_lora.yaml`;
the BF16 LoRA + AQN ablation (QeRL issue #11): `testbed_bf16_aqn.yaml`; not in the grid: W4A4 training
(`testbed_nvfp4_w4a4.yaml`) and QeRL with the DAPO loss (`testbed_nvfp4_aqn_dapo.yaml`).
Without `--config`, `recipes/testbed/testbed_nvfp4_aqn.yaml` is used. Command-line flags override the YAML.
"""

import os
import sys

from qerl_repro.grpo import parse_recipe_args
from qerl_repro.testbed import grpo_main


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testbed", "testbed_nvfp4_aqn.yaml")


if __name__ == "__main__":
    argv = sys.argv[1:] if "--config" in sys.argv else ["--config", DEFAULT_CONFIG, *sys.argv[1:]]
    grpo_main(*parse_recipe_args(__file__, argv))
