# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Sampling completions for evaluation: a vLLM engine or transformers `generate`, with the same settings on both.

- `build_vllm_engine`: a `vllm.LLM` for evaluation. On vLLM's CPU backend a seeded request crashes ("CPU Generator
  does not use offset") when its prompt prefill is split over several scheduler steps (chunked prefill), so engines
  built here disable chunked prefill on CPU, which makes per-request seeds work; they also run eagerly.
- `generate_vllm` / `generate_hf`: k samples per prompt from token ids, as `(text, finish_reason, num_tokens)` per
  sample, cut at the first stop token (`stop_token_ids`). vLLM seeds each request with `seed + index * k` (the
  question's row in the split), so a question gets the same samples whatever the subset, batch or order; HF seeds torch
  before every batch (`seed + first index`). A fresh `GenerationConfig` keeps a model's own sampling defaults (e.g.
  Qwen2.5's repetition penalty) out, so both backends sample with exactly `Sampling`.
"""

import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qerl_repro.weight_sync import vllm_max_lora_rank


logger = logging.getLogger(__name__)

__all__ = [
    "Sampling",
    "build_vllm_engine",
    "engine_chunked_prefill",
    "engine_lora_rank",
    "engine_model_path",
    "generate_hf",
    "generate_vllm",
    "model_context_length",
    "next_lora_id",
    "stop_token_ids",
]

_lora_ids = itertools.count(1)  # a fresh vLLM LoRA id per evaluation: an id reused for a changed adapter is cached


def next_lora_id() -> int:
    """A vLLM LoRA id never used before in this process (vLLM caches adapters by id)."""
    return next(_lora_ids)


@dataclass
class Sampling:
    """How to sample: k samples per prompt, greedy or temperature / top-p (no top-k), a completion token limit."""

    num_samples: int
    greedy: bool
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


def stop_token_ids(tokenizer, model_path: str | None, model=None) -> list[int]:
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
        context = max_model_len or model_context_length(model)
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(context, 4096))
        # Measured on 2 cores (SmolLM2-135M, 16 questions x 2 samples x 128 tokens): eager 139 s, compiled 265 s.
        kwargs["enforce_eager"] = True
    kwargs.update(llm_kwargs)
    logger.info("Building vLLM engine: %s", {k: v for k, v in kwargs.items()})
    return LLM(**kwargs)


def model_context_length(model_path: str) -> int:
    """The checkpoint's `max_position_embeddings` (4096 when its config has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    return int(getattr(config, "max_position_embeddings", 4096))


def engine_model_path(llm) -> str:
    """The model path (or Hub id) a `vllm.LLM` serves."""
    return llm.llm_engine.model_config.model


def engine_chunked_prefill(llm) -> bool:
    """Whether the engine splits prompt prefills over scheduler steps (per-request seeds then crash on CPU)."""
    return bool(llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill)


def engine_lora_rank(llm) -> int | None:
    """The engine's `max_lora_rank`, or None when it was built without LoRA support."""
    lora_config = llm.llm_engine.vllm_config.lora_config
    return None if lora_config is None else lora_config.max_lora_rank


def strip_stop(ids: Sequence[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated sequence after its first stop token: `(ids without the stop token, finish reason)`."""
    ids = list(ids)
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position], "stop"
    return ids, "length"


def generate_vllm(llm, prompt_ids, indices, sampling: Sampling, stop_ids, tokenizer, lora_request, per_request_seed):
    """k samples per prompt (token ids) from a `vllm.LLM`, with `lora_request` applied (None: the base).

    `indices` are the questions' rows in the split: with `per_request_seed`, request i is seeded with
    `sampling.seed + indices[i] * k`; otherwise the engine's own seed is used. Returns, per prompt, a list of
    `(text, finish_reason, num_tokens)` ("stop" or "length").
    """
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
            ids, reason = strip_stop(completion.token_ids, stop_set)
            samples.append((tokenizer.decode(ids, skip_special_tokens=True), reason, len(ids)))
        results.append(samples)
    return results


def generate_hf(model, tokenizer, prompt_ids, indices, sampling: Sampling, stop_ids, batch_size):
    """k samples per prompt (token ids) from transformers `generate`, left-padded batches of `batch_size` prompts;
    torch is seeded with `sampling.seed + indices[first]` before each batch. Same return format as `generate_vllm`."""
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
                ids, reason = strip_stop(generated[row * sampling.num_samples + j], stop_set)
                samples.append((tokenizer.decode(ids, skip_special_tokens=True), reason, len(ids)))
            results.append(samples)
        logger.info("HF generate: %d / %d questions", min(start + batch_size, len(prompt_ids)), len(prompt_ids))
    return results
