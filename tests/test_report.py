# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Results table (ours vs QeRL Table 1) from synthetic eval JSONs written here, and training-curve plots."""

import json
import math
import os

import pytest

from qerl_repro.evaluation import summarize_records, wilson_interval, write_json
from qerl_repro.report import (
    PAPER_TABLE1,
    build_table,
    discover_runs,
    eval_sampling,
    format_ours,
    load_manifest,
    main,
    plot_training_curves,
)


MODEL = "Qwen2.5-3B-Instruct"


def _eval_json(path, num_correct, n, *, k=1, greedy=False, max_new_tokens=4096, limit=None):
    """An evaluation JSON as `evaluate_gsm8k` writes it, from synthetic per-question records."""
    records = [
        {"correct": [i < num_correct] * k, "numeric_correct": [i < num_correct] * k, "formatted": [True] * k}
        for i in range(n)
    ]
    sampling = {"greedy": greedy, "temperature": 0.0 if greedy else 0.6, "top_p": 1.0 if greedy else 0.95}
    config = {
        "criterion": "answer",
        "adapter_mode": "vllm_lora_request",
        "sampling": {**sampling, "max_new_tokens": max_new_tokens, "num_samples": k},
        "dataset": {"n": n, "limit": limit},
        "prefill": None,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_json({"config": config, **summarize_records(records)}, path)


@pytest.mark.parametrize(
    "results, expected",
    [
        ([], "–"),  # no run of ours
        ([{"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "k": 1}], "50.0 ± 10.0 (95 % CI [40.0, 60.0], n=100, k=1)"),
        ([{"accuracy": 0.0, "ci95": [0.0, 0.0713], "n": 50, "k": 1}], "0.0 ± 3.6 (95 % CI [0.0, 7.1], n=50, k=1)"),
        (
            [  # two seeds: mean ± sample std (std of 82 and 84 = 1.414)
                {"accuracy": 0.82, "ci95": [0.80, 0.84], "n": 1319, "k": 4},
                {"accuracy": 0.84, "ci95": [0.82, 0.86], "n": 1319, "k": 4},
            ],
            "83.0 ± 1.4 (mean ± std over 2 runs; per-run 95 % CI ± 2.0–2.0, n=1319, k=4)",
        ),
    ],
)
def test_format_ours(results, expected):
    assert format_ours(results) == expected


def test_paper_table_is_table1():
    assert len(PAPER_TABLE1[MODEL]) == len(PAPER_TABLE1["Qwen2.5-7B-Instruct"]) == 10
    assert PAPER_TABLE1[MODEL]["nvfp4_aqn"] == 83.7 and PAPER_TABLE1["Qwen2.5-7B-Instruct"]["nvfp4_aqn"] == 90.8
    assert PAPER_TABLE1[MODEL]["bf16"] == 61.2 and PAPER_TABLE1["Qwen2.5-7B-Instruct"]["nf4_qlora"] == 85.0


def test_table_from_discovered_runs(tmp_dir):
    run = os.path.join(tmp_dir, f"{MODEL}-gsm8k_nvfp4_aqn")
    _eval_json(os.path.join(run, "eval_after.json"), 660, 800)  # 82.5 %
    _eval_json(os.path.join(run, "eval_before.json"), 480, 800)  # 60.0 %, the untrained NVFP4 row
    lora = os.path.join(tmp_dir, f"{MODEL}-gsm8k_nvfp4_lora")
    _eval_json(os.path.join(lora, "eval_after.json"), 640, 800)
    _eval_json(os.path.join(lora, "eval_before.json"), 480, 800)  # same untrained row: counted once
    _eval_json(os.path.join(tmp_dir, "SmolLM2-135M-Instruct-gsm8k_nvfp4_aqn", "eval_after.json"), 1, 50, greedy=True,
               max_new_tokens=128, limit=50)  # fmt: skip
    entries = discover_runs(tmp_dir)
    assert sorted((e.model, e.method) for e in entries) == [
        ("Qwen2.5-3B-Instruct", "nvfp4"),
        ("Qwen2.5-3B-Instruct", "nvfp4_aqn"),
        ("Qwen2.5-3B-Instruct", "nvfp4_lora"),
        ("SmolLM2-135M-Instruct", "nvfp4_aqn"),
    ]
    rows = {(row["model"], row["method"]): row for row in build_table(entries)}
    low, high = wilson_interval(660, 800)
    aqn = rows[(MODEL, "nvfp4_aqn")]
    assert aqn["ours"] == (
        f"82.5 ± {100 * (high - low) / 2:.1f} (95 % CI [{100 * low:.1f}, {100 * high:.1f}], n=800, k=1)"
    )
    assert aqn["paper"] == 83.7 and aqn["label"] == "NVFP4 LoRA + AQN (QeRL)"
    assert rows[(MODEL, "nvfp4")]["ours"].startswith("60.0 ± ") and rows[(MODEL, "nvfp4")]["paper"] == 59.4
    assert rows[(MODEL, "bf16_full")]["ours"] == "–" and rows[(MODEL, "bf16_full")]["paper"] == 84.4  # not run
    assert rows[("SmolLM2-135M-Instruct", "nvfp4_aqn")]["paper"] is None
    assert len(rows) == 10 + 1  # the paper's ten 3B rows + the SmolLM2 row


def test_manifest_seeds_and_markdown(tmp_dir):
    for seed, correct in ((1, 656), (2, 672)):  # 82.0 % and 84.0 % on 800 questions
        _eval_json(os.path.join(tmp_dir, f"aqn_seed{seed}", "eval_after.json"), correct, 800, k=4)
    _eval_json(os.path.join(tmp_dir, "lora", "final.json"), 640, 800, k=4)
    manifest = os.path.join(tmp_dir, "runs.yaml")
    with open(manifest, "w") as f:
        f.write(
            "runs:\n"
            f"  - {{path: aqn_seed1, model: {MODEL}, method: nvfp4_aqn}}\n"  # relative to the manifest's folder
            f"  - {{path: {tmp_dir}/aqn_seed2, model: {MODEL}, method: nvfp4_aqn}}\n"
            f"  - {{path: lora, eval: final.json, model: {MODEL}, method: nvfp4_lora}}\n"
        )
    entries = load_manifest(manifest)
    json_manifest = os.path.join(tmp_dir, "runs.json")
    with open(json_manifest, "w") as f:  # the mapping form gives the same rows
        json.dump({e.eval_path: {"model": e.model, "method": e.method} for e in entries}, f)
    assert [(e.model, e.method) for e in load_manifest(json_manifest)] == [(e.model, e.method) for e in entries]

    rows = build_table(entries, include_paper_rows=False)
    assert [row["method"] for row in rows] == ["nvfp4_lora", "nvfp4_aqn"]  # the paper's order
    assert rows[1]["ours"].startswith("83.0 ± 1.4 (mean ± std over 2 runs;") and rows[1]["ours"].endswith("k=4)")

    output = os.path.join(tmp_dir, "table1.md")
    markdown = main(["--runs", manifest, "--output", output, "--include_paper_rows", "false"])
    with open(output) as f:
        assert f.read() == markdown
    assert "| Model | Method | GSM8K (ours) | GSM8K (paper) |" in markdown
    assert f"| {MODEL} | NVFP4 LoRA + AQN (QeRL) | {rows[1]['ours']} | 83.7 |" in markdown
    assert f"| {MODEL} | NVFP4 LoRA | {rows[0]['ours']} | 83.3 |" in markdown
    assert "python -m qerl_repro.report --runs" in markdown  # the command that regenerates the table


def test_markdown_states_protocol_deviations(tmp_dir):
    _eval_json(os.path.join(tmp_dir, "SmolLM2-135M-Instruct-gsm8k_nvfp4_aqn", "eval_after.json"), 2, 50, greedy=True,
               max_new_tokens=128, limit=50)  # fmt: skip
    markdown = main(["--results_dir", tmp_dir])
    assert "greedy decoding (paper: T=0.6, top-p 0.95)" in markdown
    assert "128 new tokens (paper: 4096)" in markdown
    assert "a fixed subset of 50 test questions" in markdown


def test_manifest_errors(tmp_dir):
    manifest = os.path.join(tmp_dir, "bad.json")
    with open(manifest, "w") as f:
        json.dump({"runs": [{"path": tmp_dir, "model": MODEL}]}, f)
    with pytest.raises(ValueError, match="lacks \\['method'\\]"):
        load_manifest(manifest)
    with open(manifest, "w") as f:
        json.dump({"runs": [{"path": tmp_dir, "model": MODEL, "method": "bf16"}]}, f)
    with pytest.raises(FileNotFoundError, match="No evaluation JSON"):
        load_manifest(manifest)


def _trainer_state(path, steps=12):
    history = []
    for step in range(1, steps + 1):
        history.append(
            {
                "step": step,
                "loss": 0.01 * step,
                "reward": 0.1 * step,
                "reward_std": 0.05,
                "rewards/format_reward/mean": min(0.2, 0.02 * step),
                "rewards/format_reward/std": 0.01,
                "rewards/answer_reward/mean": 0.0 if step < 6 else 2.0 * step / steps,
                "entropy": 1.0 - 0.03 * step,
                "aqn/sigma": 0.0 if step < 2 else 0.01 * 0.8**step,
                "completions/mean_length": 100 + step,
            }
        )
    history.append({"step": steps, "train_runtime": 10.0, "train_loss": 0.05})  # TRL's final summary entry
    with open(path, "w") as f:
        json.dump({"global_step": steps, "log_history": history}, f)
    return path


def test_plot_training_curves(tmp_dir):
    state = _trainer_state(os.path.join(tmp_dir, "trainer_state.json"))
    paths = plot_training_curves(state, os.path.join(tmp_dir, "plots"))
    names = [os.path.basename(p) for p in paths]
    assert names == [
        "reward.png",
        "reward_answer_reward.png",  # the accuracy reward
        "reward_format_reward.png",  # the format reward
        "entropy.png",
        "aqn_sigma.png",
        "completion_length.png",
        "training_curves.png",  # all panels in one figure
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # a real PNG
        assert os.path.getsize(path) > 5000  # with axes, lines and text, not an empty canvas


def test_plot_training_curves_without_metrics(tmp_dir):
    state = os.path.join(tmp_dir, "trainer_state.json")
    with open(state, "w") as f:
        json.dump({"log_history": [{"step": 1, "train_runtime": 1.0}]}, f)
    assert plot_training_curves(state, os.path.join(tmp_dir, "plots")) == []


def test_policy_eval_style_configs(tmp_dir):
    # qerl_repro.policy_eval (evaluation inside training) writes flat sampling keys and `reward`.
    path = _eval_json(os.path.join(tmp_dir, f"{MODEL}-gsm8k_bf16_lora", "eval_after.json"), 30, 40)
    with open(path) as f:
        result = json.load(f)
    result["config"] = {
        "policy": "trainer",
        "temperature": 0.0,
        "top_p": 0.95,
        "max_new_tokens": 256,
        "reward": "answer",
    }
    write_json(result, path)
    assert eval_sampling(result["config"]) == {
        "temperature": 0.0,
        "top_p": 0.95,
        "max_new_tokens": 256,
        "greedy": True,
    }
    markdown = main(["--results_dir", tmp_dir, "--include_paper_rows", "false"])
    assert f"| {MODEL} | BF16 LoRA | 75.0 ± " in markdown and "| 76.1 |" in markdown
    assert "greedy decoding" in markdown and "256 new tokens (paper: 4096)" in markdown
    assert "Correctness criterion: answer" in markdown


def test_run_summary_reward_trend_and_evals(tmp_path):
    from qerl_repro.report import format_run_summary, run_summary

    rewards = [0.1] * 10 + [0.2] * 5 + [0.5, 0.6] * 5  # first 10 steps: 0.1; last 10: mean 0.55
    history = [
        {"step": i + 1, "loss": 0.0, "reward": r, "step_time": 2.0, "aqn/num_noised_modules": 60}
        | {"sync/update_lost_frac": 0.9 - 0.01 * i}
        for i, r in enumerate(rewards)
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp_path / "eval_after.json").write_text(json.dumps({"accuracy": 0.1, "ci95": [0.05, 0.2], "n": 50, "k": 1}))
    summary = run_summary(str(tmp_path))
    trend = summary["reward_trend"]
    assert summary["steps"] == 25
    assert trend["first"]["mean"] == pytest.approx(0.1) and trend["last"]["mean"] == pytest.approx(0.55)
    assert trend["difference"] == pytest.approx(0.45)
    # Welch: se = sqrt(0/10 + var(last)/10); var of [0.5, 0.6] x 5 = 0.0027778
    half = 1.96 * math.sqrt(0.0027777777 / 10)
    assert trend["difference_ci95"] == pytest.approx([0.45 - half, 0.45 + half], rel=1e-4)
    assert summary["eval_after"]["n"] == 50 and "eval_before" not in summary
    text = format_run_summary(summary)
    assert "0.100 -> 0.550" in text and "60-60" in text
    assert summary["per_step"]["sync/update_lost_frac"] == pytest.approx({"min": 0.66, "max": 0.9})
    assert "update the engine lost (min-max) | 0.66-0.9 |" in text


def _write_rewards(run_dir, rewards):
    os.makedirs(run_dir, exist_ok=True)
    history = [{"step": i + 1, "loss": 0.0, "reward": r} for i, r in enumerate(rewards)]
    with open(os.path.join(run_dir, "trainer_state.json"), "w") as f:
        json.dump({"log_history": history}, f)
    return run_dir


def _write_eval(run_dir, name, correct):
    records = [{"index": q, "pass1": float(c), "correct": [bool(c)]} for q, c in enumerate(correct)]
    with open(os.path.join(run_dir, f"{name}.json"), "w") as f:
        json.dump({"accuracy": sum(map(float, correct)) / len(correct), "records": records}, f)


@pytest.mark.parametrize(
    "rises, significant",
    [
        ([0.30, 0.32, 0.29], True),  # three seeds rise by ~0.3, seed spread 0.015: p < 0.01
        ([0.30, -0.25, 0.02], False),  # mean +0.02 with a spread of 0.3: not distinguishable from no rise
    ],
)
def test_compare_seed_runs_tests_the_reward_rise_across_seeds(tmp_path, rises, significant):
    from qerl_repro.report import main

    runs = [_write_rewards(str(tmp_path / f"s{i}"), [0.1] * 10 + [0.1 + r] * 10) for i, r in enumerate(rises)]
    output = str(tmp_path / "seeds.json")
    main(["--compare_seeds", *runs, "--output", output])
    with open(output) as f:
        comparison = json.load(f)
    assert comparison["runs"] == runs
    assert [run["reward_rise"] for run in comparison["per_run"]] == pytest.approx(rises)
    assert comparison["reward_rise"]["mean"] == pytest.approx(sum(rises) / 3)
    assert (comparison["reward_rise"]["p_value"] < 0.05) is significant
    assert ("not distinguishable" in comparison["reward_rise"]["in_words"]) is not significant
    assert "accuracy_before_vs_after" not in comparison  # no evaluations in these folders


def test_compare_seed_runs_judges_learning_by_test_accuracy(tmp_path):
    # The reward rises in both seeds, but test accuracy on the same 100 questions does not move (a reward hack) in
    # the first case; in the second, 15 more questions are right after training in both seeds.
    from qerl_repro.report import compare_seed_runs

    before = [q < 30 for q in range(100)]
    for gained, significant in ((0, False), (15, True)):
        runs = []
        for seed in range(2):
            run_dir = _write_rewards(str(tmp_path / f"g{gained}_s{seed}"), [0.1] * 10 + [0.5] * 10)
            _write_eval(run_dir, "eval_before", before)
            _write_eval(run_dir, "eval_after", [q < 30 + gained for q in range(100)])
            runs.append(run_dir)
        comparison = compare_seed_runs(runs)
        accuracy = comparison["accuracy_before_vs_after"]
        assert accuracy["difference"] == pytest.approx(gained / 100)
        assert (accuracy["p_value"] < 0.05) is significant
        for run in comparison["per_run"]:
            assert (run["accuracy_before"], run["accuracy_after"]) == (0.30, (30 + gained) / 100)
            assert (run["mcnemar"]["b_only"], run["mcnemar"]["a_only"]) == (gained, 0)
            assert run["mcnemar"]["p_value"] == pytest.approx(1.0 if gained == 0 else 2 / 2**15)


def test_compare_seed_runs_needs_two_runs_with_enough_steps(tmp_path):
    from qerl_repro.report import compare_seed_runs

    short = _write_rewards(str(tmp_path / "short"), [0.1] * 5)
    with pytest.raises(ValueError, match="at least two run folders"):
        compare_seed_runs([short])
    with pytest.raises(ValueError, match="need at least 2 x window"):
        compare_seed_runs([short, short])


def test_committed_demo_seed_comparison_regenerates(monkeypatch):
    from qerl_repro.report import compare_seed_runs

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "results", "demo_seeds.json")) as f:
        committed = json.load(f)
    monkeypatch.chdir(root)
    assert json.loads(json.dumps(compare_seed_runs(committed["runs"]))) == committed


def test_run_summary_tests_the_accuracy_gain_on_the_same_questions(tmp_path):
    """`make demo`'s headline: after - before on the same questions, paired (bootstrap + McNemar on first samples)."""
    from qerl_repro.report import format_run_summary, run_summary

    run = str(tmp_path)
    before = [0] * 60 + [1] * 40  # 40 % right
    after = [0] * 40 + [1] * 60  # the same 40 stay right and 20 more become right: McNemar 20 vs 0
    _write_eval(run, "eval_before", before)
    _write_eval(run, "eval_after", after)
    summary = run_summary(run)
    gain = summary["test_gain"]
    assert gain["difference"] == pytest.approx(0.2) and gain["n"] == 100
    assert gain["mcnemar_first_sample"]["b_only"] == 20 and gain["mcnemar_first_sample"]["a_only"] == 0
    assert gain["mcnemar_first_sample"]["p_value"] == pytest.approx(
        2 * 0.5**20
    )  # exact: every discordant pair one way
    assert gain["ci95"][0] > 0.1 and gain["p_value"] < 1e-3
    text = format_run_summary(summary)
    assert "| test accuracy after - before (same 100 questions) | +20.0 points" in text
    assert "format rate" not in text  # no reply used <answer> tags: QeRL's format metrics would be meaningless zeros
    # a run whose evaluations are on different questions is an error, not a silent mismatch
    _write_eval(run, "eval_after", after[:50])
    with pytest.raises(ValueError, match="not on the same test questions"):
        run_summary(run)
