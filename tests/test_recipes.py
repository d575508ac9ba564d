# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Every recipe's documented command points at files that exist and parse; every recipe runs end to end (1 step, tiny
model, HF generate); the no-config paper setting fails with a clear message on a machine without GPU / Hub."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from qerl_repro.grpo import main, make_parser, parse_recipe_args


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.py")))
TABLE1_RECIPES = [
    "gsm8k_bf16_full",  # BF16 | Full
    "gsm8k_bf16_lora",  # BF16 | LoRA
    "gsm8k_nf4_qlora",  # NF4 | LoRA (QLoRA)
    "gsm8k_mxfp4_lora",  # MXFP4 | LoRA
    "gsm8k_nvfp4_lora",  # NVFP4 | LoRA
    "gsm8k_nvfp4_aqn",  # NVFP4 | +AQN (QeRL)
]
COMMAND = re.compile(r"accelerate launch --config_file (\S+) (recipes/\S+\.py) --config (\S+\.yaml)")


# Not a paper row: BF16 LoRA + AQN (QeRL issue #11's ablation), paper scale only (Qwen2.5-3B/7B YAMLs).
ABLATION_RECIPES = ["gsm8k_bf16_aqn"]
# QeRL with DAPO (loss `dapo`, clip 0.2 / 0.28, truncated completions masked, soft overlong punishment): on GSM8K, and
# Table 2's BigMath row "NVFP4 | +AQN" (Qwen2.5-7B-Instruct).
DAPO_RECIPES = ["gsm8k_nvfp4_aqn_dapo"]
BIGMATH_RECIPES = ["bigmath_nvfp4_aqn_dapo"]


def test_every_table1_row_has_a_recipe():
    gsm8k = [os.path.splitext(os.path.basename(p))[0] for p in RECIPES if os.path.basename(p).startswith("gsm8k_")]
    assert gsm8k == sorted(TABLE1_RECIPES + ABLATION_RECIPES + DAPO_RECIPES)
    others = [
        os.path.splitext(os.path.basename(p))[0] for p in RECIPES if not os.path.basename(p).startswith("gsm8k_")
    ]
    assert others == sorted(BIGMATH_RECIPES + ["testbed_grpo"])  # testbed_grpo: tests/test_testbed.py


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_docstring_commands_reference_existing_files_that_parse(recipe):
    with open(recipe) as f:
        source = f.read()
    commands = COMMAND.findall(source)
    assert len(commands) >= 2, "the docstring must give the GPU and the CPU launch commands"
    for accelerate_config, script, config in commands:
        for path in (accelerate_config, script, config):
            assert os.path.exists(os.path.join(ROOT, path)), path
        with open(os.path.join(ROOT, accelerate_config)) as f:
            assert "distributed_type" in yaml.safe_load(f)
        # The YAML parses into the three argument objects (unknown keys would raise).
        script_args, training_args, model_args = make_parser().parse_args_and_config(
            args=["--config", os.path.join(ROOT, config), "--output_dir", "/tmp/unused", "--use_cpu", "true"]
        )
        assert model_args.model_name_or_path
        assert training_args.quant_format in ("none", "nvfp4", "mxfp4", "nf4")


# recipes/testbed/*.yaml (the CPU testbed's rows) are checked in tests/test_testbed.py.
TABLE1_YAMLS = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")) if "/testbed/" not in p)


@pytest.mark.parametrize("config", TABLE1_YAMLS)
def test_recipe_yaml_matches_its_table1_row(config):
    recipe = os.path.splitext(os.path.basename(config))[0]
    with open(config) as f:
        values = yaml.safe_load(f)
    expected = {
        "gsm8k_bf16_full": ("none", False, False),
        "gsm8k_bf16_lora": ("none", False, True),
        "gsm8k_nf4_qlora": ("nf4", False, True),
        "gsm8k_mxfp4_lora": ("mxfp4", False, True),
        "gsm8k_nvfp4_lora": ("nvfp4", False, True),
        "gsm8k_nvfp4_aqn": ("nvfp4", True, True),
        "gsm8k_bf16_aqn": ("none", True, True),
        "gsm8k_nvfp4_aqn_dapo": ("nvfp4", True, True),
        "bigmath_nvfp4_aqn_dapo": ("nvfp4", True, True),  # Table 2 row "NVFP4 | +AQN"
    }[recipe]
    assert (values["quant_format"], values["aqn"], values["use_peft"]) == expected
    assert values.get("aqn_allow_unquantized", False) == (recipe == "gsm8k_bf16_aqn")
    if "Qwen2.5" in config and values["use_peft"]:
        assert values["train_norms"] is True  # QeRL's scripts all train the block norms (--ln True)
    assert values["push_to_hub"] is False and "hub_model_id" in values  # pushing is opt-in
    assert values["report_to"] == "tensorboard"


# QeRL Table 4 (reference/qerl.md §4.1) for GSM8K, as TRL settings of the paper-scale YAMLs (1 GPU: 128 completions
# per step = per_device_train_batch_size x gradient_accumulation_steps), and LoRA r 32 (§4.1).
TABLE4 = {
    "optim": "adamw_8bit",
    "learning_rate": 1e-5,  # QeRL and QLoRA; BF16 LoRA 5e-6 (below)
    "batch": 128,
    "num_generations": 8,
    "num_iterations": 4,
    "max_completion_length": 4096,
    "temperature": 1.0,
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "beta": 0.0,  # no KL loss
    "lora_r": 32,
    "aqn_sigma_start": 1e-2,
    "aqn_sigma_end": 5e-4,
}
# Table 4's BigMath column where it differs from GSM8K (DAPO on Big-Math, Table 2).
TABLE4_BIGMATH = {
    "num_generations": 16,
    "num_iterations": 1,  # on-policy
    "max_completion_length": 8192,
}
# (recipe, key) -> (value, why): every place a paper-scale YAML departs from Table 4, with its reason.
TABLE4_DEVIATIONS = {
    ("gsm8k_bf16_lora", "learning_rate"): (5e-6, "Table 4: BF16 LoRA 'can not be larger than 5e-6'"),
    ("gsm8k_bf16_aqn", "learning_rate"): (5e-6, "the BF16 LoRA recipe with AQN added: same lr"),
    ("gsm8k_bf16_full", "learning_rate"): (1e-6, "full fine-tuning lr is not in the paper; TRL's default"),
    ("gsm8k_bf16_full", "optim"): ("adamw_torch", "full fine-tuning optimizer is not in the paper"),
    ("gsm8k_bf16_full", "lora_r"): (None, "no LoRA"),
}


@pytest.mark.parametrize("config", [p for p in TABLE1_YAMLS if "/Qwen2.5-" in p], ids=lambda p: p.split("recipes/")[1])
def test_paper_scale_config_matches_table4_or_a_listed_deviation(config):
    recipe = os.path.splitext(os.path.basename(config))[0]
    _, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", config, "--output_dir", "/tmp/unused", "--use_cpu", "true"]
    )
    actual = {
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "learning_rate": training_args.learning_rate,
        "batch": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
        "num_generations": training_args.num_generations,
        "num_iterations": training_args.num_iterations,
        "max_completion_length": training_args.max_completion_length,
        "temperature": training_args.temperature,
        "epsilon": training_args.epsilon,
        "epsilon_high": training_args.epsilon_high,
        "beta": training_args.beta,
        "lora_r": model_args.lora_r if model_args.use_peft else None,
    }
    if training_args.aqn:
        actual["aqn_sigma_start"] = training_args.aqn_sigma_start
        actual["aqn_sigma_end"] = training_args.aqn_sigma_end
    table4 = {**TABLE4, **TABLE4_BIGMATH} if recipe.startswith("bigmath_") else TABLE4
    for key, value in actual.items():
        expected = TABLE4_DEVIATIONS.get((recipe, key), (table4[key], "Table 4"))[0]
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, (key, value)
    assert model_args.model_name_or_path.startswith("Qwen/Qwen2.5-") and "Instruct" in model_args.model_name_or_path


DAPO_YAMLS = sorted(p for p in TABLE1_YAMLS if os.path.basename(p)[:-5] in DAPO_RECIPES + BIGMATH_RECIPES)


@pytest.mark.parametrize("config", DAPO_YAMLS, ids=lambda p: p.split("recipes/")[1])
def test_dapo_recipes_use_dapo(config):
    """DAPO (arXiv 2503.14476) as QeRL ran it: token-level loss, clip-higher 0.2 / 0.28 (QeRL Table 4), truncated
    completions masked (QeRL's scripts), no KL; plus DAPO's soft overlong punishment inside the length limit."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", config, "--output_dir", "/tmp/unused", "--use_cpu", "true"]
    )
    assert training_args.loss_type == "dapo"
    assert (training_args.epsilon, training_args.epsilon_high) == (0.2, 0.28)
    assert training_args.mask_truncated_completions is True and training_args.beta == 0.0
    assert script_args.reward_funcs[-1] == "soft_overlong"
    assert len(training_args.reward_weights) == len(script_args.reward_funcs)
    assert training_args.reward_weights[-1] == 1.0  # DAPO's penalty factor
    assert 0 < script_args.overlong_buffer_length < training_args.max_completion_length
    assert training_args.aqn and training_args.quant_format == "nvfp4"
    if os.path.basename(config).startswith("bigmath_"):
        assert script_args.dataset_format == "bigmath"
        assert script_args.dataset_name == "open-r1/Big-Math-RL-Verified-Processed"
        assert script_args.dataset_config == "level_3_4_5"  # paper: levels 3-5 for 7B and 14B
        assert "math_verify_latex" in script_args.reward_funcs
        assert not (script_args.eval_at_start or script_args.eval_at_end)  # Table 2's benchmarks are not wired in
    else:
        assert script_args.dataset_format == "gsm8k"


# TRL's colocated vLLM sets these in the test process (and holds MASTER_PORT): a recipe subprocess must not inherit them.
_RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    return {**env, "HF_HUB_OFFLINE": "1"}


def test_no_config_uses_the_paper_setting_and_explains_what_is_missing(tmp_dir):
    recipe = os.path.join(ROOT, "recipes", "gsm8k_nvfp4_aqn.py")
    _, training_args, model_args = parse_recipe_args(recipe, ["--output_dir", tmp_dir, "--use_cpu", "true"])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert training_args.quant_format == "nvfp4" and training_args.aqn
    env = _subprocess_env()
    proc = subprocess.run(
        [sys.executable, recipe, "--output_dir", tmp_dir], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    message = proc.stderr + proc.stdout
    assert "Qwen/Qwen2.5-3B-Instruct" in message
    assert "CUDA GPU" in message and "Hub" in message
    assert "make demo" in message


@pytest.mark.parametrize("recipe", TABLE1_RECIPES + DAPO_RECIPES)
def test_recipe_runs_end_to_end_on_the_tiny_model(recipe, tiny_model_dir, tmp_dir):
    config = os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", f"{recipe}.yaml")
    argv = [
        "--config", config,
        "--model_name_or_path", tiny_model_dir,
        "--dtype", "float32",
        "--dataset_path", os.path.join(ROOT, "..", "shared", "data", "gsm8k"),
        "--output_dir", tmp_dir,
        "--max_steps", "1",
        "--use_vllm", "false",  # HF generate: the vLLM path is covered by tests/test_trainer_vllm.py
        "--per_device_train_batch_size", "3",  # one group of 3
        "--gradient_accumulation_steps", "1",
        "--num_generations", "3",
        "--max_completion_length", "8",
        "--train_limit", "6",
        "--eval_limit", "2",
        "--eval_max_new_tokens", "8",
        "--report_to", "none",
        "--save_strategy", "no",
    ]  # fmt: skip
    if recipe in DAPO_RECIPES:
        argv += ["--overlong_buffer_length", "4"]  # the buffer must fit in the 8-token completions
    results = main(*parse_recipe_args(os.path.join(ROOT, "recipes", f"{recipe}.py"), argv))
    for name in ("eval_before.json", "eval_after.json"):
        with open(os.path.join(tmp_dir, name)) as f:
            assert json.load(f)["n"] == 2
    assert set(results) == {"eval_before", "eval_after"}
    assert os.path.exists(os.path.join(tmp_dir, "README.md"))
    with open(os.path.join(tmp_dir, "README.md")) as f:
        card = f.read()
    assert "2510.11696" in card and "Command to reproduce" in card
    with open(os.path.join(tmp_dir, "recipe.yaml")) as copied, open(config) as original:
        assert copied.read() == original.read()  # the recipe travels with the weights
    if recipe != "gsm8k_bf16_full":
        assert os.path.exists(os.path.join(tmp_dir, "adapter_config.json"))


def test_bigmath_recipe_runs_end_to_end_on_a_local_copy(tiny_model_dir, tmp_path):
    """The Big-Math DAPO recipe on a local file in the Big-Math format (no Hub): 2 steps, adapter saved."""
    data_dir = tmp_path / "bigmath"
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        for a in range(1, 7):
            row = {"prompt": f"What is {a} + {a}?", "solution": str(2 * a), "source": "t", "domain": [], "x": 0.5}
            f.write(json.dumps(row) + "\n")
    output_dir = str(tmp_path / "out")
    argv = [
        "--config", os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "bigmath_nvfp4_aqn_dapo.yaml"),
        "--model_name_or_path", tiny_model_dir,
        "--dtype", "float32",
        "--dataset_path", str(data_dir),
        "--output_dir", output_dir,
        "--max_steps", "2",
        "--use_vllm", "false",
        "--per_device_train_batch_size", "3",
        "--gradient_accumulation_steps", "1",
        "--num_generations", "3",
        "--max_completion_length", "8",
        "--overlong_buffer_length", "4",
        "--report_to", "none",
        "--save_strategy", "no",
    ]  # fmt: skip
    results = main(*parse_recipe_args(os.path.join(ROOT, "recipes", "bigmath_nvfp4_aqn_dapo.py"), argv))
    assert results == {}  # no evaluation set for Big-Math here
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        state = json.load(f)
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 2
    for entry in logged:  # every reward of the recipe ran (TRL logs each under its function name)
        for name in ("format_reward", "math_verify_latex_reward", "soft_overlong_punishment_reward"):
            assert f"rewards/{name}/mean" in entry
    assert os.path.exists(os.path.join(output_dir, "adapter_config.json"))


def test_killed_run_resumes_from_its_last_checkpoint_with_the_same_command(tiny_model_dir, tmp_dir):
    """SIGKILL a real training process after its 2nd checkpoint, rerun the same command: no completed step is lost."""
    import signal
    import time

    recipe = os.path.join(ROOT, "recipes", "gsm8k_nvfp4_aqn.py")
    command = [
        sys.executable, recipe,
        "--config", os.path.join(ROOT, "recipes", "SmolLM2-135M-Instruct", "gsm8k_nvfp4_aqn.yaml"),
        "--model_name_or_path", tiny_model_dir,
        "--dtype", "float32",
        "--dataset_path", os.path.join(ROOT, "..", "shared", "data", "gsm8k"),
        "--output_dir", tmp_dir,
        "--max_steps", "40",
        "--save_steps", "2",
        "--save_total_limit", "3",
        "--use_vllm", "false",
        "--per_device_train_batch_size", "3",
        "--gradient_accumulation_steps", "1",
        "--num_generations", "3",
        "--max_completion_length", "8",
        "--train_limit", "120",
        "--eval_at_start", "false",
        "--eval_limit", "2",
        "--eval_max_new_tokens", "8",
        "--plots", "false",
        "--report_to", "none",
    ]  # fmt: skip
    env = _subprocess_env()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(tmp_dir, "checkpoint-4")) and process.poll() is None:
        assert time.time() < deadline, "no second checkpoint within 5 minutes"
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    time.sleep(0.5)  # let the checkpoint finish writing; the kill may still land mid-save of a later one
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_dir) if d.startswith("checkpoint-"))
    assert checkpoints and checkpoints[-1] < 40, checkpoints

    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming training at" in proc.stdout + proc.stderr
    with open(os.path.join(tmp_dir, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 40
    logged_steps = sorted({e["step"] for e in state["log_history"] if "loss" in e})
    assert logged_steps == list(range(1, 41))  # every step, before and after the kill, is in the history


def test_model_card_of_an_accelerate_launched_run_names_real_ids_and_the_full_command(tiny_model_dir, tmp_dir):
    """The card a push uploads (TRL's part + ours), from a run started as `make demo` starts one."""
    import shlex

    output_dir = os.path.join(tmp_dir, "tiny-nvfp4-aqn")
    dataset_path = os.path.join("..", "shared", "data", "gsm8k")
    launch = [
        "--config_file", "accelerate_configs/cpu.yaml",
        "recipes/gsm8k_nvfp4_aqn.py",
        "--config", "recipes/SmolLM2-135M-Instruct/gsm8k_nvfp4_aqn.yaml",
        "--model_name_or_path", tiny_model_dir,
        "--dtype", "float32",
        "--dataset_path", dataset_path,
        "--output_dir", output_dir,
        "--hub_model_id", "qerl-test/tiny-nvfp4-aqn",
        "--max_steps", "1",
        "--use_vllm", "false",
        "--per_device_train_batch_size", "3",
        "--gradient_accumulation_steps", "1",
        "--num_generations", "3",
        "--max_completion_length", "8",
        "--train_limit", "3",
        "--eval_at_start", "false",
        "--eval_limit", "1",
        "--eval_max_new_tokens", "8",
        "--plots", "false",
        "--report_to", "none",
        "--save_strategy", "no",
    ]  # fmt: skip
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {k: v for k, v in _subprocess_env().items() if not k.startswith("ACCELERATE_")}
    proc = subprocess.run([accelerate, "launch", *launch], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(output_dir, "README.md")) as f:
        card = f.read()
    assert "None" not in card  # "Model Card for None", "[None](https://huggingface.co/None)", model="None"
    assert "# Model Card for tiny-nvfp4-aqn" in card
    assert f"fine-tuned version of a local model folder, `{tiny_model_dir}` (not a Hub model id)" in card
    assert 'pipeline("text-generation", model="qerl-test/tiny-nvfp4-aqn"' in card  # the repo a push goes to
    assert "datasets: openai/gsm8k" in card
    assert f"| dataset | [openai/gsm8k](https://huggingface.co/datasets/openai/gsm8k) (main), read from a local copy at `{dataset_path}` |" in card  # fmt: skip
    command_lines = card.split("### Command to reproduce\n\n```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert len(command_lines) == 1
    words = shlex.split(command_lines[0])
    env_words = words[: words.index("accelerate")]
    assert "HF_HUB_OFFLINE=1" in env_words and all("=" in word for word in env_words)
    assert words[words.index("accelerate") :] == ["accelerate", "launch", *launch]  # exactly what was run
