# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""GSM8K pass@1 of the policy a `QeRLTrainer` is training, with the trainer's own rollout machinery.

The quantized base + LoRA is evaluated exactly as it is trained: with vLLM, the trainer's engine (colocate, or the
server through TRL's `VLLMClient`) is synced (dequant(W_q) + LoRA delta) and sampled with AQN switched off
(`QeRLTrainer.clean_rollout_engine()`); without vLLM, the PEFT model itself generates. Scoring and confidence intervals
come from `qerl_repro.evaluation`. Used at step 0, every `gsm8k_eval_steps` and after training by
`qerl_repro.grpo.main`.
"""

import json
import logging
import os

import torch


logger = logging.getLogger(__name__)


@torch.no_grad()
def _generate_vllm(trainer, texts, num_samples, temperature, top_p, max_new_tokens) -> list[list[str]]:
    generation = trainer.vllm_generation
    generation.sync_weights()  # the current policy (AQN is re-applied for the step, then switched off below)
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    with trainer.clean_rollout_engine():
        if generation.mode == "server":
            return _generate_on_server(trainer, prompt_ids, num_samples, temperature, top_p, max_new_tokens)
        from vllm import SamplingParams

        params = SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens,
        )
        outputs = generation.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True)
    return [[completion.text for completion in output.outputs] for output in outputs]


def generate_with_server_client(
    client, tokenizer, prompt_ids, num_samples, temperature, top_p, max_new_tokens
) -> list[list[str]]:
    """`num_samples` completions (text) per prompt from the vLLM server behind TRL's `VLLMClient`."""
    output = client.generate(
        prompts=prompt_ids,
        n=num_samples,
        temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0,
        max_tokens=max_new_tokens,
        logprobs=None,
    )
    texts = tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
    return [texts[start : start + num_samples] for start in range(0, len(texts), num_samples)]


def _generate_on_server(trainer, prompt_ids, num_samples, temperature, top_p, max_new_tokens) -> list[list[str]]:
    """Server mode: the main process holds the client and generates for everyone; the others receive the texts."""
    from accelerate.utils import broadcast_object_list

    completions = None
    if trainer.accelerator.is_main_process:
        completions = generate_with_server_client(
            trainer.vllm_generation.vllm_client,
            trainer.processing_class,
            prompt_ids,
            num_samples,
            temperature,
            top_p,
            max_new_tokens,
        )
    if trainer.accelerator.num_processes > 1:
        completions = broadcast_object_list([completions], from_process=0)[0]
    return completions


@torch.no_grad()
def _generate_hf(trainer, texts, num_samples, temperature, top_p, max_new_tokens, batch_size=16) -> list[list[str]]:
    tokenizer = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else {}
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                do_sample=temperature > 0,
                pad_token_id=tokenizer.pad_token_id,
                **{k: v for k, v in sampling.items() if k != "do_sample"},
            )
            completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i in range(0, len(completions), num_samples):
                results.append(completions[i : i + num_samples])
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results


def evaluate_trainer_policy(
    trainer,
    dataset,
    *,
    num_samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 4096,
    reward: str = "answer",
    output_path: str | None = None,
) -> dict:
    """Pass@1 (mean over `num_samples`) of the trainer's current policy on `dataset` (from `load_gsm8k`).

    Returns the result dict (also written to `output_path` as JSON on the main process).
    """
    from qerl_repro.evaluation import render_prompts, score_completions, summarize_records

    texts = render_prompts(dataset, trainer.processing_class)
    if trainer.use_vllm:
        completions = _generate_vllm(trainer, texts, num_samples, temperature, top_p, max_new_tokens)
    else:
        completions = _generate_hf(trainer, texts, num_samples, temperature, top_p, max_new_tokens)
    prefills = dataset["prefill"] if "prefill" in dataset.column_names else [None] * len(texts)
    indices = dataset["index"] if "index" in dataset.column_names else list(range(len(texts)))
    records = []
    for index, question, gold, samples, prefill in zip(
        indices, dataset["question"], dataset["solution"], completions, prefills
    ):
        scores = score_completions(samples, gold, reward=reward, prefill=prefill)
        records.append({"index": index, "question": question, "gold": gold, "completions": samples, **scores})
    result = summarize_records(records)
    result["records"] = records
    result["config"] = {
        "policy": "trainer",
        "global_step": trainer.state.global_step,
        "quant_format": trainer.args.quant_format,
        "backend": "vllm" if trainer.use_vllm else "hf",
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "reward": reward,
    }
    if output_path is not None and trainer.accelerator.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        with open(output_path, "w") as f:
            json.dump(result, f, indent=2)
    logger.info(
        "GSM8K pass@1 at step %d: %.4f (95%% CI %s, n=%d)",
        trainer.state.global_step,
        result["accuracy"],
        result.get("ci95"),
        result["n"],
    )
    return result
