# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The one `main()` every `recipes/*.py` shares: GSM8K GRPO with QeRLTrainer (quantized base, LoRA, AQN).

Skeleton (open-r1 order): seed -> logging -> resume point -> data -> tokenizer -> model -> rewards -> trainer ->
eval at step 0 -> train -> save -> model card -> final eval -> plots -> push.
"""

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from qerl_repro.config import QeRLConfig


logger = logging.getLogger(__name__)

# Where `accelerate launch recipes/<recipe>.py` without `--config` takes its settings from: the paper's model.
DEFAULT_RECIPE_MODEL = "Qwen2.5-3B-Instruct"


@dataclass
class QeRLScriptArguments(ScriptArguments):
    """Script arguments of the QeRL GSM8K recipes (besides `QeRLConfig` and TRL's `ModelConfig`).

    Args:
        dataset_path (`str`, *optional*):
            Local folder with `train.jsonl` / `test.jsonl` (e.g. `../shared/data/gsm8k`). Unset: the Hub dataset
            `dataset_name` / `dataset_config`.
        train_limit (`int`, *optional*):
            Use only the first `train_limit` training questions (after shuffling with `seed`).
        reward_funcs (`list[str]`, *optional*, defaults to `["format", "answer"]`):
            Reward names from `qerl_repro.rewards.REWARD_FUNCS`; QeRL's are `format` (0.2) and `answer` (2.0).
        assistant_prefill (`str`, *optional*):
            Text every assistant reply starts with (the CPU demo uses `<think>`); applied to training and evaluation.
        eval_limit (`int`, *optional*):
            Evaluate on this many GSM8K test questions (a fixed subset drawn with `eval_subset_seed`); unset: all 1319.
        eval_subset_seed (`int`, *optional*, defaults to `0`):
            Seed of the fixed evaluation subset.
        eval_num_samples (`int`, *optional*, defaults to `1`):
            Samples per question; pass@1 is their mean.
        eval_temperature (`float`, *optional*, defaults to `0.6`), eval_top_p (`float`, *optional*, defaults to
        `0.95`), eval_max_new_tokens (`int`, *optional*, defaults to `4096`):
            Sampling of the evaluation (paper §4.1). `eval_temperature=0` is greedy.
        eval_reward (`str`, *optional*, defaults to `"answer"`):
            Correctness criterion: `answer` (QeRL's exact `<answer>` match), `numeric_answer` or `math_verify`. The
            numeric-normalised accuracy and the format rate are always reported too.
        eval_at_start (`bool`, *optional*, defaults to `True`), eval_at_end (`bool`, *optional*, defaults to `True`):
            Evaluate before the first step (`eval_before.json`) and after the last (`eval_after.json`).
        gsm8k_eval_steps (`int`, *optional*, defaults to `0`):
            Also evaluate every this many steps (`eval_step_<N>.json`, logged as `gsm8k/accuracy`); 0 disables.
        plots (`bool`, *optional*, defaults to `True`):
            Write PNG training curves to `<output_dir>/plots`.
        dataset_format (`str`, *optional*, defaults to `"gsm8k"`):
            `"gsm8k"` (`qerl_repro.data.load_gsm8k`) or `"bigmath"` (`load_bigmath`: QeRL Table 2's
            open-r1/Big-Math-RL-Verified-Processed, `dataset_config` `level_3_4_5` or `level_4_5`; `dataset_path` takes a
            local JSONL/parquet copy). Big-Math has no test split and Table 2's benchmarks (MATH500, AIME, AMC) are not
            wired in: a `bigmath` run needs `eval_at_start`, `eval_at_end` and `gsm8k_eval_steps` off.
        overlong_buffer_length (`int`, *optional*):
            The overlong buffer of the `soft_overlong` reward (DAPO Eq. 13); required when that reward is used.
        recipe_config (`str`, *optional*):
            The YAML the run was configured from; `parse_recipe_args` sets it, and the run copies the file to
            `<output_dir>/recipe.yaml` (so checkpoints and Hub pushes carry their recipe).
    """

    dataset_name: str | None = field(default="openai/gsm8k", metadata={"help": "Hub dataset of GSM8K."})
    dataset_config: str | None = field(default="main", metadata={"help": "Hub dataset configuration."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local folder with train.jsonl / test.jsonl."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only this many training questions."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "answer"], metadata={"help": "Reward names (qerl_repro.rewards)."}
    )
    assistant_prefill: str | None = field(default=None, metadata={"help": "Text every assistant reply starts with."})
    eval_limit: int | None = field(default=None, metadata={"help": "Number of GSM8K test questions to evaluate."})
    eval_subset_seed: int = field(default=0, metadata={"help": "Seed of the fixed evaluation subset."})
    eval_num_samples: int = field(default=1, metadata={"help": "Samples per question (pass@1 is their mean)."})
    eval_temperature: float = field(default=0.6, metadata={"help": "Evaluation temperature (0: greedy)."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Evaluation top-p."})
    eval_max_new_tokens: int = field(default=4096, metadata={"help": "Evaluation completion length."})
    eval_reward: str = field(
        default="answer", metadata={"help": "Correctness criterion: answer (QeRL), numeric_answer or math_verify."}
    )
    eval_at_start: bool = field(default=True, metadata={"help": "Evaluate before the first step."})
    eval_at_end: bool = field(default=True, metadata={"help": "Evaluate after the last step."})
    gsm8k_eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: never)."})
    plots: bool = field(default=True, metadata={"help": "Write PNG training curves."})
    dataset_format: str = field(
        default="gsm8k", metadata={"help": "Training data: gsm8k or bigmath.", "choices": ["gsm8k", "bigmath"]}
    )
    overlong_buffer_length: int | None = field(
        default=None, metadata={"help": "Overlong buffer of the soft_overlong reward (DAPO Eq. 13)."}
    )
    recipe_config: str | None = field(
        default=None, metadata={"help": "The run's YAML (set from --config); copied to <output_dir>/recipe.yaml."}
    )

    def __post_init__(self):
        if self.eval_num_samples < 1:
            raise ValueError(f"eval_num_samples={self.eval_num_samples} must be >= 1.")
        if self.gsm8k_eval_steps < 0:
            raise ValueError(f"gsm8k_eval_steps={self.gsm8k_eval_steps} must be >= 0.")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit={self.eval_limit} must be >= 1 (or unset for all 1319 questions).")
        from qerl_repro.rewards import check_reward_names

        check_reward_names(self.reward_funcs)  # unknown names fail here, before any model is loaded
        if "soft_overlong" in self.reward_funcs and self.overlong_buffer_length is None:
            raise ValueError("reward_funcs has soft_overlong: set overlong_buffer_length (its buffer, in tokens).")
        if self.dataset_format not in ("gsm8k", "bigmath"):
            raise ValueError(f"dataset_format={self.dataset_format!r} is not one of ['gsm8k', 'bigmath'].")
        if self.dataset_format == "bigmath" and (self.eval_at_start or self.eval_at_end or self.gsm8k_eval_steps):
            raise ValueError(
                "dataset_format='bigmath' has no evaluation here (Table 2's MATH500 / AIME / AMC are not wired in): "
                "set eval_at_start: false, eval_at_end: false and gsm8k_eval_steps: 0."
            )


def make_parser() -> TrlParser:
    return TrlParser((QeRLScriptArguments, QeRLConfig, ModelConfig))


def default_recipe_config(recipe_file: str) -> str:
    """The paper-setting YAML of a recipe script: `recipes/<DEFAULT_RECIPE_MODEL>/<recipe>.yaml`."""
    recipe = os.path.splitext(os.path.basename(recipe_file))[0]
    return os.path.join(os.path.dirname(os.path.abspath(recipe_file)), DEFAULT_RECIPE_MODEL, f"{recipe}.yaml")


def parse_recipe_args(recipe_file: str, argv: list[str] | None = None):
    """Parse `--config <yaml>` plus overrides; without `--config`, use the recipe's paper setting (Qwen2.5-3B)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", default_recipe_config(recipe_file), *argv]
    config_path = argv[argv.index("--config") + 1]
    try:
        script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
        script_args.recipe_config = script_args.recipe_config or config_path
        return script_args, training_args, model_args
    except ValueError as exc:
        if "bf16/gpu" not in str(exc):
            raise
        # transformers rejects a bf16 GPU configuration on a machine without a GPU: say what is missing instead.
        args = make_parser().parse_args_and_config(args=[*argv, "--use_cpu", "true"])
        check_can_run(*args, extra_missing=["a CUDA GPU (this configuration trains in bf16 on GPUs)"])
        raise


def _hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        import requests

        requests.head("https://huggingface.co", timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "cannot reach the Hub"
        return False


def preflight(script_args: QeRLScriptArguments, training_args: QeRLConfig, model_args: ModelConfig) -> list[str]:
    """What this machine lacks to run the configuration (empty when it can run)."""
    from qerl_repro.models import MODEL_ALIASES

    missing = []
    model = model_args.model_name_or_path
    if model is None:
        return ["a model: set `model_name_or_path` (or pass --config)"]
    needs_hub = (model not in MODEL_ALIASES and not os.path.isdir(model)) or (
        script_args.dataset_path is None and script_args.dataset_name is not None
    )
    if needs_hub and not _hub_reachable():
        what = [f"the model {model!r}"] if model not in MODEL_ALIASES and not os.path.isdir(model) else []
        what += [f"the dataset {script_args.dataset_name!r}"] if script_args.dataset_path is None else []
        missing.append(f"Hugging Face Hub access to download {' and '.join(what)}")
    if not torch.cuda.is_available() and not training_args.use_cpu:
        missing.append("a CUDA GPU (this configuration trains on GPUs; `use_cpu: true` runs on the CPU)")
    return missing


def check_can_run(script_args, training_args, model_args, extra_missing: list[str] | None = None) -> None:
    """Exit with a message naming what is missing (GPU, Hub access) and pointing to `make demo`; a model path that
    does not exist exits with one line saying so."""
    from qerl_repro.errors import UserError
    from qerl_repro.models import check_model_name_or_path

    if model_args.model_name_or_path is not None:
        try:
            check_model_name_or_path(model_args.model_name_or_path)
        except UserError as exc:
            raise SystemExit(f"error: {exc}") from None
    missing = [*(extra_missing or []), *preflight(script_args, training_args, model_args)]
    if missing:
        message = (
            f"This run ({model_args.model_name_or_path}, quant_format={training_args.quant_format}, "
            f"aqn={training_args.aqn}) cannot start on this machine. Missing:\n"
            + "\n".join(f"  - {item}" for item in missing)
            + "\nTo try QeRL on a CPU without the Hub, run `make demo` (SmolLM2-135M, NVFP4 + LoRA + AQN, local GSM8K)."
        )
        raise SystemExit(message)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` that was fully written (Trainer writes `trainer_state.json` last): a run killed
    in the middle of a save resumes from the checkpoint before, instead of failing on the partial one."""
    if not os.path.isdir(output_dir):
        return None
    while (checkpoint := get_last_checkpoint(output_dir)) is not None:
        if os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
            return checkpoint
        partial = f"{checkpoint}.incomplete"
        logger.warning(f"{checkpoint} was not fully written (killed while saving?): moved to {partial}.")
        os.replace(checkpoint, partial)
    return None


class GSM8KAccuracyCallback(TrainerCallback):
    """Evaluates the current policy on the fixed GSM8K subset every `every` steps; logs `gsm8k/accuracy`."""

    def __init__(self, trainer, evaluate_fn, every: int):
        self.trainer, self.evaluate_fn, self.every = trainer, evaluate_fn, every

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            result = self.evaluate_fn(f"eval_step_{state.global_step}.json")
            self.trainer._metrics["train"]["gsm8k/accuracy"].append(result["accuracy"])


def build_trainer(
    script_args,
    training_args: QeRLConfig,
    model_args: ModelConfig,
    model_path,
    tokenizer,
    train_dataset,
    reward_funcs=None,
):
    """The recipe's `QeRLTrainer`: the base loaded from `model_path` in the recipe's dtype (and quantized to
    `quant_format` by the trainer), its LoRA config (None: full fine-tuning) and its reward functions (or
    `reward_funcs`)."""
    from qerl_repro.rewards import get_reward_funcs
    from qerl_repro.trainer import QeRLTrainer

    training_args.model_init_kwargs = {
        **(training_args.model_init_kwargs or {}),
        "dtype": model_args.dtype,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
    }
    return QeRLTrainer(
        model=model_path,
        reward_funcs=reward_funcs
        or get_reward_funcs(
            script_args.reward_funcs,
            max_completion_length=training_args.max_completion_length,
            overlong_buffer_length=getattr(script_args, "overlong_buffer_length", None),
        ),
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def main(
    script_args: QeRLScriptArguments,
    training_args: QeRLConfig,
    model_args: ModelConfig,
    *,
    train_dataset=None,
    eval_dataset=None,
) -> dict:
    """Train and evaluate; `train_dataset` / `eval_dataset` (rows with `prompt`, `solution`, `question`) replace
    GSM8K when given (the CPU testbed, `qerl_repro.testbed.grpo_main`)."""
    from qerl_repro.data import add_assistant_prefill, load_bigmath, load_gsm8k
    from qerl_repro.evaluation import load_eval_dataset
    from qerl_repro.hub import launch_command
    from qerl_repro.models import resolve_model_path
    from qerl_repro.policy_eval import evaluate_trainer_policy

    check_can_run(script_args, training_args, model_args)
    command = launch_command()  # for the model card; read before the trainer or vLLM change the environment

    # Seed
    set_seed(training_args.seed)

    # Logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Script parameters {script_args}")
    logger.info(f"Training parameters {training_args}")
    logger.info(f"Model parameters {model_args}")

    # Resume from the last checkpoint (re-running the same command after a kill continues the run)
    last_checkpoint = last_complete_checkpoint(training_args.output_dir)
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.warning(f"Checkpoint detected, resuming training at {last_checkpoint}.")
    resume_from = training_args.resume_from_checkpoint or last_checkpoint

    # The recipe next to the weights (a push or a copied checkpoint folder says how it was trained)
    if script_args.recipe_config and training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        shutil.copyfile(script_args.recipe_config, os.path.join(training_args.output_dir, "recipe.yaml"))

    # Data
    data_kwargs = dict(
        dataset_path=script_args.dataset_path,
        dataset_name=script_args.dataset_name,
        dataset_config=script_args.dataset_config,
    )
    if train_dataset is None and script_args.dataset_format == "bigmath":
        train_dataset = load_bigmath("train", limit=script_args.train_limit, seed=training_args.seed, **data_kwargs)
    if train_dataset is None:
        train_dataset = load_gsm8k("train", limit=script_args.train_limit, seed=training_args.seed, **data_kwargs)
    evaluates = script_args.eval_at_start or script_args.eval_at_end or script_args.gsm8k_eval_steps
    if eval_dataset is None and evaluates:
        eval_dataset = load_eval_dataset(
            "test", limit=script_args.eval_limit, subset_seed=script_args.eval_subset_seed, **data_kwargs
        )

    # Tokenizer
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if script_args.assistant_prefill:
        train_dataset = add_assistant_prefill(train_dataset, tokenizer, script_args.assistant_prefill)
        if eval_dataset is not None:
            eval_dataset = add_assistant_prefill(eval_dataset, tokenizer, script_args.assistant_prefill)

    # Model, rewards and trainer (QeRLTrainer loads and quantizes the base: `quant_format`)
    trainer = build_trainer(script_args, training_args, model_args, model_path, tokenizer, train_dataset)

    def evaluate(filename: str) -> dict:
        return evaluate_trainer_policy(
            trainer,
            eval_dataset,
            num_samples=script_args.eval_num_samples,
            temperature=script_args.eval_temperature,
            top_p=script_args.eval_top_p,
            max_new_tokens=script_args.eval_max_new_tokens,
            reward=script_args.eval_reward,
            output_path=os.path.join(training_args.output_dir, filename),
        )

    if script_args.gsm8k_eval_steps:
        trainer.add_callback(GSM8KAccuracyCallback(trainer, evaluate, script_args.gsm8k_eval_steps))

    results = {}
    before_path = os.path.join(training_args.output_dir, "eval_before.json")
    if script_args.eval_at_start and not os.path.exists(before_path):
        results["eval_before"] = evaluate("eval_before.json")

    # Train
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # Save model and create model card
    trainer.save_model(training_args.output_dir)
    if script_args.eval_at_end:
        results["eval_after"] = evaluate("eval_after.json")
    if trainer.accelerator.is_main_process:
        from qerl_repro.hub import append_model_card_extras, build_model_card_extras

        trainer.create_model_card(dataset_name=script_args.dataset_name, tags=["qerl"])
        extras = build_model_card_extras(
            script_args, training_args, model_args, eval_results=results or None, command=command
        )
        append_model_card_extras(os.path.join(training_args.output_dir, "README.md"), extras)
        if script_args.plots:
            from qerl_repro.report import plot_training_curves

            plot_training_curves(
                os.path.join(training_args.output_dir, "trainer_state.json"),
                os.path.join(training_args.output_dir, "plots"),
            )
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as f:
            json.dump({k: {m: v[m] for m in ("accuracy", "ci95", "n") if m in v} for k, v in results.items()}, f)

    # Push
    if training_args.push_to_hub:
        from qerl_repro.hub import push_folder_to_hub

        push_folder_to_hub(
            training_args.output_dir, training_args.hub_model_id, private=training_args.hub_private_repo
        )
    return results
