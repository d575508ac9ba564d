# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""QeRL Table 1 as a grid: every row (and seed) run once, one results JSON each, and the report built from the JSONs.

```
python -m qerl_repro.table1 run --scale cpu --seeds 3                      # the CPU testbed (recipes/testbed/*.yaml)
python -m qerl_repro.table1 run --scale gpu --model Qwen2.5-3B-Instruct    # paper scale (recipes/<Model>/*.yaml)
python -m qerl_repro.table1 report --scale cpu                             # results/table1_cpu.md + .png
```

Rows (`ROWS`): the untrained bases (`bf16`, `nf4`, `mxfp4`, `nvfp4`: one evaluation each), then the training rows
(`bf16_full`, `bf16_lora`, `nf4_qlora`, `mxfp4_lora`, `nvfp4_lora`, `nvfp4_aqn`, and `bf16_aqn`, the BF16 LoRA + AQN
ablation of QeRL issue #11), each repeated with seeds 42, 43, ... (`--seeds n`). `EXTRA_ROWS` (the CPU testbed's
seed-study extensions: RIN, AQN variants, hardware error, W4A4, DAPO) run only when named in `--rows`; the report shows
them when present. Runs go one at a time. A row/seed is finished when its results JSON exists
(`results/table1_<scale>/<model>/<row>-seed<seed>.json`, or `<row>.json` for an untrained base) and is then skipped; an
unfinished one reruns the same command in the same output folder (`runs/table1_<scale>/<model>/...`), where the recipe
resumes from its last checkpoint.

Each JSON holds the exact command, the recipe's config, git commit, package versions, machine, wall time and the
metrics: test pass@1 before/after (mean over k samples per question, with the per-question normal 95 % interval, and
the first sample's Wilson interval), per-question pass@1 (no completions), reward and entropy per step, reward AUC.
The report (`report`) reads only those JSONs; its statistics come from `qerl_repro.stats`.
"""

import argparse
import glob
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass


logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "qerl_repro.table1.run/v1"
FIRST_SEED = 42
CPU_MODEL = "adder3"  # the testbed organism (qerl_repro.testbed), data/testbed/adder3
DEFAULT_GPU_MODEL = "Qwen2.5-3B-Instruct"


@dataclass(frozen=True)
class Row:
    key: str  # method key of qerl_repro.report.PAPER_TABLE1 / METHOD_LABELS
    weights: str  # W# column of the paper
    training: str  # Training column of the paper ("–": no training)
    base_format: str  # quant_format of the base

    @property
    def trained(self) -> bool:
        return self.training != "–"


ROWS: dict[str, Row] = {
    row.key: row
    for row in (
        Row("bf16", "BF16", "–", "none"),
        Row("nf4", "NF4", "–", "nf4"),
        Row("mxfp4", "MXFP4", "–", "mxfp4"),
        Row("nvfp4", "NVFP4", "–", "nvfp4"),
        Row("bf16_full", "BF16", "Full", "none"),
        Row("bf16_lora", "BF16", "LoRA", "none"),
        Row("nf4_qlora", "NF4", "LoRA (QLoRA)", "nf4"),
        Row("mxfp4_lora", "MXFP4", "LoRA", "mxfp4"),
        Row("nvfp4_lora", "NVFP4", "LoRA", "nvfp4"),
        Row("nvfp4_aqn", "NVFP4", "LoRA + AQN (QeRL)", "nvfp4"),
        Row("bf16_aqn", "BF16", "LoRA + AQN (QeRL #11 ablation)", "none"),
    )
}
# The seed studies' extensions (issue 11) as CPU testbed rows outside the default grid: RIN (SRDD-guided per-block AQN,
# qerl_repro.rin), the AQN variants (activation noise, linear and cosine decay), the hardware-error simulation, W4A4
# training and QeRL with TRL's DAPO loss. They run only when named (`make reproduce-table1 SCALE=cpu
# ROWS=nvfp4_rin_targeted,...`); the report shows them when present. Recipes: recipes/testbed/testbed_<row>.yaml.
EXTRA_ROWS: dict[str, Row] = {
    row.key: row
    for row in (
        Row("nvfp4_rin_targeted", "NVFP4", "LoRA + RIN targeted (seeds' SRDD-guided AQN)", "nvfp4"),
        Row("nvfp4_rin_variable", "NVFP4", "LoRA + RIN variable (seeds' SRDD-guided AQN)", "nvfp4"),
        Row("nvfp4_aqn_act", "NVFP4", "LoRA + AQN (activation variant)", "nvfp4"),
        Row("nvfp4_aqn_linear", "NVFP4", "LoRA + AQN (linear decay)", "nvfp4"),
        Row("nvfp4_aqn_cosine", "NVFP4", "LoRA + AQN (cosine decay)", "nvfp4"),
        Row("bf16_hw_error", "BF16", "LoRA, 5 % hardware error", "none"),
        Row("bf16_hw_error_aqn", "BF16", "LoRA + AQN, 5 % hardware error", "none"),
        Row("nvfp4_w4a4", "NVFP4", "LoRA, W4A4 (FP4 activations, STE)", "nvfp4"),
        Row("nvfp4_aqn_dapo", "NVFP4", "LoRA + AQN, DAPO loss", "nvfp4"),
    )
}
ALL_ROWS: dict[str, Row] = {**ROWS, **EXTRA_ROWS}
# The seed studies' claims about their extensions (../shared/reference/seed_studies.md: Qwen2.5-1.5B-Instruct, GSM8K
# validation accuracy, one run per arm), and the paper's schedule ablation, as (A, B, the claim, what they found).
EXTENSION_CLAIMS = [
    (
        "bf16_lora",
        "bf16_hw_error",
        "5 % hardware error on every Linear output, training and rollouts",
        "seed studies: 76.4 -> 68.9 %, BF16 full FT",
    ),
    ("bf16_hw_error", "bf16_hw_error_aqn", "AQN under hardware error", "seed studies: 68.9 -> 70.6 %, BF16 full FT"),
    (
        "nvfp4_aqn",
        "nvfp4_rin_variable",
        "RIN variable vs global AQN",
        "seed studies: 70.6 -> 71.2 % under BF16 hardware error",
    ),
    ("nvfp4_aqn", "nvfp4_rin_targeted", "RIN targeted vs global AQN", "seed studies: speed only, no accuracy claim"),
    (
        "nvfp4_aqn",
        "nvfp4_aqn_act",
        "additive noise on activations (the seeds' AQN) vs QeRL's weight noise",
        "never compared: the seed studies ran only the activation form",
    ),
    (
        "nvfp4_aqn",
        "nvfp4_aqn_linear",
        "linear vs exponential sigma decay",
        "paper Fig. 9: exponential the most stable late in training, no numbers",
    ),
    (
        "nvfp4_aqn",
        "nvfp4_aqn_cosine",
        "cosine vs exponential sigma decay",
        "paper Fig. 9: exponential the most stable late in training, no numbers",
    ),
    ("nvfp4_lora", "nvfp4_w4a4", "W4A4 vs W4A16, NVFP4 LoRA", "seed studies: 68.2 -> 60.9 %"),
    ("nvfp4_aqn", "nvfp4_aqn_dapo", "DAPO loss vs QeRL's bnpo, NVFP4 + AQN", "not compared in the seed studies"),
]
# The paired comparisons of the report: (reference A, arm B); B - A is reported.
COMPARISONS = [("bf16_lora", key) for key in ROWS if ROWS[key].trained and key != "bf16_lora"]
COMPARISONS += [("nvfp4_lora", "nvfp4_aqn")] + [(a, b) for a, b, _, _ in EXTENSION_CLAIMS]


def row_spec(row: str) -> Row:
    """The `Row` of a grid row or an extra row."""
    return ALL_ROWS[row]


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------


def recipe_config(scale: str, model: str, row: str) -> str:
    """The YAML a training row runs from (relative to the repository)."""
    if scale == "cpu":
        return f"recipes/testbed/testbed_{row}.yaml"
    return f"recipes/{model}/gsm8k_{row}.yaml"


def _eval_settings(scale: str, model: str) -> dict:
    """The evaluation settings every training row of this scale uses (read from its BF16 LoRA YAML), so the untrained
    bases are measured exactly as the trained arms are."""
    import yaml

    with open(os.path.join(ROOT, recipe_config(scale, model, "bf16_lora"))) as f:
        values = yaml.safe_load(f)
    return {
        "num_samples": values.get("eval_num_samples", 1),
        "temperature": values.get("eval_temperature", 0.6),
        "top_p": values.get("eval_top_p", 0.95),
        "max_new_tokens": values.get("eval_max_new_tokens", 4096),
        "model_name_or_path": values["model_name_or_path"],
    }


def accelerate_config(scale: str, model: str, row: str) -> str:
    """The launcher config of a training row: the CPU, one GPU, or ZeRO-3 across GPUs for 7B full fine-tuning (its fp32
    weights, gradients and AdamW state, 122 GB, do not fit on one 80 GB GPU: `python -m qerl_repro.memory`)."""
    if scale == "cpu":
        return "accelerate_configs/cpu.yaml"
    if row == "bf16_full" and "7B" in model:
        return "accelerate_configs/deepspeed_zero3.yaml"
    return "accelerate_configs/single_gpu.yaml"


def build_command(
    scale: str,
    model: str,
    row: str,
    seed: int | None,
    run_dir: str,
    *,
    model_dir: str | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = None,
    dataset_path: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The exact command of one row/seed (paths relative to the repository root, where it runs). `dataset_path`: a
    local GSM8K folder (paper scale); `extra`: more flags for the training recipes."""
    extra = list(extra or [])
    settings = _eval_settings(scale, model)
    if ALL_ROWS[row].trained:
        accelerate = accelerate_config(scale, model, row)
        script = "recipes/testbed_grpo.py" if scale == "cpu" else f"recipes/gsm8k_{row}.py"
        command = ["accelerate", "launch", "--config_file", accelerate, script]
        command += ["--config", recipe_config(scale, model, row), "--output_dir", run_dir, "--seed", str(seed)]
        if model_dir:
            command += ["--model_name_or_path", model_dir]
        if max_steps is not None:
            command += ["--max_steps", str(max_steps)]
        if eval_limit is not None:
            command += ["--eval_limit", str(eval_limit)]
        if dataset_path and scale != "cpu":
            command += ["--dataset_path", dataset_path]
        return command + extra
    output = os.path.join(run_dir, "eval.json")
    base = model_dir or settings["model_name_or_path"]
    if scale == "cpu":
        command = ["python", "-m", "qerl_repro.testbed", "evaluate", "--model", base]
        command += ["--quant_format", ALL_ROWS[row].base_format, "--output", output, "--no_hf_check"]
        command += ["--num_samples", str(settings["num_samples"]), "--temperature", str(settings["temperature"])]
        if eval_limit is not None:
            command += ["--limit", str(eval_limit)]
        return command
    command = ["python", "-m", "qerl_repro.evaluation", "--model", base, "--quant_format", ALL_ROWS[row].base_format]
    command += ["--num_samples", str(settings["num_samples"]), "--temperature", str(settings["temperature"])]
    command += ["--top_p", str(settings["top_p"]), "--max_new_tokens", str(settings["max_new_tokens"])]
    command += ["--output", output]
    if eval_limit is not None:
        command += ["--limit", str(eval_limit)]
    if dataset_path:
        command += ["--dataset_path", dataset_path]
    return command


def _executable(command: list[str]) -> list[str]:
    """`python` / `accelerate` of the recorded command -> this interpreter's (the venv's)."""
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "accelerate":
        return [os.path.join(os.path.dirname(sys.executable), "accelerate"), *command[1:]]
    return command


def result_name(row: str, seed: int | None) -> str:
    return f"{row}.json" if seed is None else f"{row}-seed{seed}.json"


# ----------------------------------------------------------------------------------------------------------------------
# One results JSON
# ----------------------------------------------------------------------------------------------------------------------


def _machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def test_metrics(result: dict) -> tuple[dict, dict]:
    """(summary, per-question) of an evaluation JSON (`evaluate_trainer_policy`, `evaluate_gsm8k` or the testbed's
    `evaluate_base`): pass@1 = mean over the k samples of each question, then over questions."""
    from qerl_repro.evaluation import wilson_interval

    records = sorted(result["records"], key=lambda r: r["index"])
    pass1 = [sum(r["correct"]) / len(r["correct"]) for r in records]
    first = [int(bool(r["correct"][0])) for r in records]
    sampled = result.get("sampled", result)  # evaluate_base nests the sampled metrics
    n = len(records)
    summary = {
        "pass1": sampled.get("pass1", sampled.get("accuracy")),
        "ci95": sampled["ci95"],
        "ci_method": sampled.get("ci_method", "normal_per_question_mean"),
        "n": n,
        "k": sampled.get("k", len(records[0]["correct"])),
        "first_sample": {"rate": sum(first) / n, "ci95": list(wilson_interval(sum(first), n)), "ci_method": "wilson"},
    }
    return summary, {"index": [r["index"] for r in records], "pass1": pass1, "first_sample": first}


def _curve(history: list[dict], key: str) -> dict:
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if (
            "step" in entry
            and isinstance(value, (int, float))
            and math.isfinite(value)
            and "train_runtime" not in entry
        ):
            steps.append(entry["step"])
            values.append(float(value))
    return {"steps": steps, "values": values}


def collect(
    scale: str,
    model: str,
    row: str,
    seed: int | None,
    run_dir: str,
    command: list[str],
    wall_seconds: float,
    git: dict | None = None,
) -> dict:
    """The results JSON of one finished row/seed, from the files its command wrote into `run_dir`; `git`: the
    commit the command was started from (default: the current one)."""
    import yaml

    from qerl_repro.evaluation import _git_info
    from qerl_repro.stats import reward_auc
    from qerl_repro.testbed import _versions

    result = {
        "schema": SCHEMA,
        "scale": scale,
        "model": model,
        "row": row,
        "weights": ALL_ROWS[row].weights,
        "training": ALL_ROWS[row].training,
        "seed": seed,
        "command": shlex.join(command),
        "run_dir": run_dir,
        "git": git or _git_info(),
        "versions": _versions(),
        "machine": _machine(),
        "wall_seconds": round(wall_seconds, 1),
    }
    metrics: dict = {}
    if ALL_ROWS[row].trained:
        with open(os.path.join(ROOT, run_dir, "recipe.yaml")) as f:
            values = yaml.safe_load(f)
        # the recipe YAML as run, and the flags of the command that override it
        overrides = command[command.index("--config") + 2 :]
        result["config"] = {"recipe": recipe_config(scale, model, row), "values": values, "overrides": overrides}
        per_question = {}
        for when, name in (("before", "eval_before.json"), ("after", "eval_after.json")):
            with open(os.path.join(ROOT, run_dir, name)) as f:
                evaluation = json.load(f)
            metrics[f"test_{when}"], per_question[when] = test_metrics(evaluation)
            metrics[f"test_{when}"]["eval_config"] = evaluation.get("config", {})
        with open(os.path.join(ROOT, run_dir, "trainer_state.json")) as f:
            state = json.load(f)
        history = state["log_history"]
        summary = next((h for h in history if "train_runtime" in h), {})
        metrics["steps"] = state["global_step"]
        metrics["train_seconds"] = summary.get("train_runtime")
        metrics["reward"] = _curve(history, "reward")
        metrics["entropy"] = _curve(history, "entropy")
        reward = metrics["reward"]
        metrics["reward_auc"] = reward_auc(reward["steps"], reward["values"]) if len(reward["steps"]) > 1 else None
        result["per_question"] = {
            "index": per_question["after"]["index"],
            "pass1_before": per_question["before"]["pass1"],
            "pass1_after": per_question["after"]["pass1"],
            "first_sample_after": per_question["after"]["first_sample"],
        }
    else:
        with open(os.path.join(ROOT, run_dir, "eval.json")) as f:
            evaluation = json.load(f)
        result["config"] = {"base_format": ALL_ROWS[row].base_format, "eval_config": evaluation.get("config", {})}
        result["config"]["eval_config"].pop("versions", None)
        metrics["test_after"], per_question = test_metrics(evaluation)
        result["per_question"] = {
            "index": per_question["index"],
            "pass1_after": per_question["pass1"],
            "first_sample_after": per_question["first_sample"],
        }
    result["metrics"] = metrics
    return result


def _write_json(data: dict, path: str) -> None:
    """Written whole, then renamed: a results JSON exists only once it is complete (the skip test relies on it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    text = json.dumps(data, indent=1)
    # numeric lists (per-question pass@1, curves) on one line each: the JSONs stay small and diffable
    text = re.sub(
        r"\[\s*[\d.eE+-]+(?:,\s*[\d.eE+-]+)*\s*\]",  # separators mandatory: no exponential backtracking
        lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]",
        text,
    )
    with open(partial, "w") as f:
        f.write(text + "\n")
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------------


def plan(rows: list[str], seeds: int) -> list[tuple[str, int | None]]:
    """(row, seed) in the order they run: untrained bases once (seed None), then seed 42 of every training row, then
    seed 43 of every row, ...: a grid stopped part-way leaves every arm at the same number of seeds (give or take one)."""
    unknown = [row for row in rows if row not in ALL_ROWS]
    if unknown:
        raise SystemExit(
            f"error: unknown rows {unknown}; valid rows: {', '.join(ROWS)}; extra rows: {', '.join(EXTRA_ROWS)}"
        )
    if seeds < 1:
        raise SystemExit(f"error: --seeds {seeds} must be >= 1")
    jobs = [(row, None) for row in rows if not ALL_ROWS[row].trained]
    for i in range(seeds):
        jobs += [(row, FIRST_SEED + i) for row in rows if ALL_ROWS[row].trained]
    return jobs


def run_grid(
    scale: str,
    model: str,
    rows: list[str],
    seeds: int,
    *,
    results_dir: str,
    runs_dir: str,
    model_dir: str | None = None,
    max_steps: int | None = None,
    eval_limit: int | None = None,
    dataset_path: str | None = None,
    extra: list[str] | None = None,
) -> list[dict]:
    """Run every unfinished (row, seed) one after the other; returns one `{row, seed, status, path}` per job."""
    no_recipe = [
        row
        for row in rows
        if row in EXTRA_ROWS and not os.path.isfile(os.path.join(ROOT, recipe_config(scale, model, row)))
    ]
    if no_recipe:  # the RIN rows exist for the CPU testbed only (they need an SRDD JSON of the base)
        raise SystemExit(
            f"error: rows {no_recipe} have no recipe at scale {scale} ({recipe_config(scale, model, no_recipe[0])})"
        )
    done = []
    for row, seed in plan(rows, seeds):
        path = os.path.join(results_dir, model, result_name(row, seed))
        if os.path.isfile(os.path.join(ROOT, path)):
            logger.info("skip %s seed %s: finished (%s exists)", row, seed, path)
            done.append({"row": row, "seed": seed, "status": "skipped", "path": path})
            continue
        run_dir = os.path.join(runs_dir, model, result_name(row, seed)[: -len(".json")])
        command = build_command(
            scale,
            model,
            row,
            seed,
            run_dir,
            model_dir=model_dir,
            max_steps=max_steps,
            eval_limit=eval_limit,
            dataset_path=dataset_path,
            extra=extra,
        )
        os.makedirs(os.path.join(ROOT, run_dir), exist_ok=True)
        log_path = os.path.join(ROOT, run_dir + ".log")
        logger.info("run %s seed %s: %s (log: %s)", row, seed, shlex.join(command), log_path)
        from qerl_repro.evaluation import _git_info

        git = _git_info()  # the code the run starts from (the tree may change while it runs)
        started = time.perf_counter()
        with open(log_path, "a") as log:
            process = subprocess.run(_executable(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-40:])
            raise SystemExit(f"error: {row} seed {seed} failed (exit {process.returncode}); log {log_path}:\n{tail}")
        _write_json(collect(scale, model, row, seed, run_dir, command, seconds, git), os.path.join(ROOT, path))
        logger.info("finished %s seed %s in %.0f s -> %s", row, seed, seconds, path)
        done.append({"row": row, "seed": seed, "status": "ran", "path": path, "seconds": seconds})
    return done


# ----------------------------------------------------------------------------------------------------------------------
# Statistics across seeds and between arms (qerl_repro.stats)
# ----------------------------------------------------------------------------------------------------------------------


def load_results(results_dir: str) -> dict[str, dict[str, list[dict]]]:
    """`{model: {row: [results JSON per seed, by seed]}}` from every `*.json` under `results_dir`."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if result.get("schema") != SCHEMA:
            continue
        result["_file"] = os.path.relpath(path, os.path.dirname(os.path.normpath(results_dir)))
        grouped.setdefault(result["model"], {}).setdefault(result["row"], []).append(result)
    for rows in grouped.values():
        for runs in rows.values():
            runs.sort(key=lambda r: (r["seed"] is None, r["seed"]))
    return grouped


def _scores(runs: list[dict]) -> tuple[list[int], list[list[float]]]:
    index = runs[0]["per_question"]["index"]
    for run in runs:
        if run["per_question"]["index"] != index:
            raise ValueError(f"{run['_file']}: not the same test questions as {runs[0]['_file']}")
    return index, [run["per_question"]["pass1_after"] for run in runs]


def row_summary(runs: list[dict]) -> dict:
    """Across seeds: mean, std and Student-t interval of test pass@1 (one seed: its own 95 % interval)."""
    from qerl_repro.stats import t_interval

    values = [run["metrics"]["test_after"]["pass1"] for run in runs]
    summary = t_interval(values)
    if summary["n"] == 1:
        summary["ci"] = runs[0]["metrics"]["test_after"]["ci95"]
        summary["ci_method"] = runs[0]["metrics"]["test_after"].get("ci_method", "the one run's own interval")
    else:
        summary["ci_method"] = "Student-t over seeds"
    aucs = [run["metrics"].get("reward_auc") for run in runs if run["metrics"].get("reward_auc") is not None]
    summary["reward_auc"] = t_interval(aucs) if aucs else None
    return summary


def compare(runs_a: list[dict], runs_b: list[dict], *, num_resamples: int = 5000) -> dict:
    """B - A on the same questions: paired bootstrap over questions and seeds; Welch's t across seeds when both have
    >= 2 seeds, and a paired t on the seeds both ran when there are >= 2 of them; with one seed each, exact McNemar on
    the first sample of each question. Reward AUC: the same seed-level tests."""
    from qerl_repro.stats import mcnemar_exact, paired_bootstrap, welch_t_test

    index_a, scores_a = _scores(runs_a)
    index_b, scores_b = _scores(runs_b)
    if index_a != index_b:
        raise ValueError(f"{runs_a[0]['_file']} and {runs_b[0]['_file']} are not on the same test questions")
    out = {"bootstrap": paired_bootstrap(scores_a, scores_b, num_resamples=num_resamples)}
    acc_a = [run["metrics"]["test_after"]["pass1"] for run in runs_a]
    acc_b = [run["metrics"]["test_after"]["pass1"] for run in runs_b]
    if len(runs_a) >= 2 and len(runs_b) >= 2:
        out["welch"] = welch_t_test(acc_a, acc_b)
    paired = _paired_by_seed(runs_a, runs_b)
    if paired is not None:
        out["paired_seeds"] = paired_t_by_seed(*paired, key=lambda run: run["metrics"]["test_after"]["pass1"])
    if len(runs_a) == 1 and len(runs_b) == 1:
        out["mcnemar"] = mcnemar_exact(
            runs_a[0]["per_question"]["first_sample_after"], runs_b[0]["per_question"]["first_sample_after"]
        )
    auc_a = [run["metrics"].get("reward_auc") for run in runs_a]
    auc_b = [run["metrics"].get("reward_auc") for run in runs_b]
    if None not in auc_a + auc_b:
        out["auc_difference"] = sum(auc_b) / len(auc_b) - sum(auc_a) / len(auc_a)
        if len(auc_a) >= 2 and len(auc_b) >= 2:
            out["auc_welch"] = welch_t_test(auc_a, auc_b)
        if paired is not None:
            out["auc_paired_seeds"] = paired_t_by_seed(*paired, key=lambda run: run["metrics"]["reward_auc"])
    return out


def _paired_by_seed(runs_a: list[dict], runs_b: list[dict]) -> tuple[list[dict], list[dict]] | None:
    """The two arms' runs matched on the seeds both ran, when there are >= 2 of them (else None); an arm's extra seeds
    (a grid stopped part-way) are left out of the pairing."""
    seeds_a = {run["seed"]: run for run in runs_a}
    seeds_b = {run["seed"]: run for run in runs_b}
    common = sorted(seed for seed in seeds_a.keys() & seeds_b.keys() if seed is not None)
    if len(common) < 2:
        return None
    return [seeds_a[seed] for seed in common], [seeds_b[seed] for seed in common]


def paired_t_by_seed(runs_a: list[dict], runs_b: list[dict], key) -> dict:
    """B - A with the seed as the pairing unit: a one-sample t-test on the per-seed differences `key(b) - key(a)`.

    Runs of one seed share the prompt order, the sampling seeds and the LoRA initialisation across arms (the curves of
    all arms move together step by step), so the per-seed difference removes what the seed does to both arms; the test
    is exact under the null that the arm labels within each seed are exchangeable (normal differences assumed)."""
    from qerl_repro.stats import one_sample_t_test

    differences = [key(b) - key(a) for a, b in zip(runs_a, runs_b, strict=True)]
    test = one_sample_t_test(differences)
    return {"difference": test["mean"], "ci": test["ci"], "p_value": test["p_value"], "n": test["n"]}


def training_gain(runs: list[dict], *, num_resamples: int = 5000) -> dict:
    """After minus before training on the same questions (paired bootstrap over questions and seeds)."""
    from qerl_repro.stats import paired_bootstrap

    before = [run["per_question"]["pass1_before"] for run in runs]
    after = [run["per_question"]["pass1_after"] for run in runs]
    return paired_bootstrap(before, after, num_resamples=num_resamples)


def _p_text(p_value: float, num_resamples: int | None = None) -> str:
    if p_value == 0 and num_resamples:  # no resample on the other side of 0
        return f"p < {1 / num_resamples:.1g}"
    return f"p = {p_value:.2g}"


def in_words(
    name_a: str,
    name_b: str,
    difference: float,
    p_value: float,
    unit: str,
    alpha: float = 0.05,
    num_resamples: int | None = None,
) -> str:
    """One sentence for B - A (difference already in `unit`; `num_resamples` for a bootstrap p-value)."""
    p_text = _p_text(p_value, num_resamples)
    if p_value >= alpha:
        return f"not distinguishable at this sample size ({difference:+.2f} {unit}, {p_text})"
    direction = "higher" if difference > 0 else "lower"
    return f"{name_b} is {direction} than {name_a} by {abs(difference):.2f} {unit} ({p_text})"


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _label(row: str) -> str:
    return (
        f"{ALL_ROWS[row].weights} {ALL_ROWS[row].training}"
        if ALL_ROWS[row].trained
        else f"{ALL_ROWS[row].weights} (untrained)"
    )


def _paper_columns(scale: str, model: str) -> list[str]:
    from qerl_repro.report import PAPER_TABLE1

    if scale == "cpu" or model not in PAPER_TABLE1:
        return list(PAPER_TABLE1)
    return [model]


# The parenthesised deltas vs the BF16 base as QeRL Table 1 prints them (reference/qerl.md §5); three differ from the
# printed accuracies' difference by 0.1 (rounding) and one by 1.0 (7B +AQN: 90.8 - 76.3 = 14.5, printed 13.5).
PAPER_PRINTED_DELTAS = {
    "Qwen2.5-3B-Instruct": {
        "nf4": -3.7, "mxfp4": -1.4, "nvfp4": -1.8, "bf16_full": 23.2, "bf16_lora": 14.9,
        "nf4_qlora": 14.9, "mxfp4_lora": 12.2, "nvfp4_lora": 22.2, "nvfp4_aqn": 22.6,
    },
    "Qwen2.5-7B-Instruct": {
        "nf4": -5.8, "mxfp4": -5.0, "nvfp4": -2.9, "bf16_full": 14.9, "bf16_lora": 11.8,
        "nf4_qlora": 8.7, "mxfp4_lora": 10.1, "nvfp4_lora": 12.2, "nvfp4_aqn": 13.5,
    },
}  # fmt: skip


def _paper_cell(paper_model: str, row: str) -> str:
    from qerl_repro.report import PAPER_TABLE1

    values = PAPER_TABLE1[paper_model]
    if row not in values:
        return "–"
    if row == "bf16":
        return f"{values[row]:.1f}"
    printed = PAPER_PRINTED_DELTAS[paper_model][row]
    cell = f"{values[row]:.1f} ({printed:+.1f})"
    computed = values[row] - values["bf16"]
    if abs(computed - printed) > 0.5:
        cell += f" [sic: {values[row]:.1f} - {values['bf16']:.1f} = {computed:+.1f}]"
    return cell


def render_report(results_dir: str, scale: str, figure: str | None = None) -> str:
    """The markdown of `results/table1_<scale>.md`, from the results JSONs under `results_dir` only."""
    grouped = load_results(results_dir)
    lines = [f"# QeRL Table 1: ours vs the paper ({'CPU testbed' if scale == 'cpu' else 'paper scale'})", ""]
    lines += [
        f"Generated by `python -m qerl_repro.table1 report` from the JSONs in `{os.path.basename(results_dir)}/`; "
        "do not edit by hand.",
        "",
    ]
    if grouped:
        lines += ["The command that produced these results (finished rows are skipped: it also resumes the grid):", ""]
        lines += ["```bash", *(grid_command_of(scale, model, rows) for model, rows in grouped.items()), "```", ""]
    if scale == "cpu":
        lines += [
            "**Not comparable in level.** Ours is the CPU testbed: a 3.4M-parameter Llama trained from scratch on "
            "3-digit addition (`qerl_repro.testbed`), 1000 fixed test questions, exact-reply reward. The paper columns "
            "are Qwen2.5-3B/7B-Instruct on GSM8K (QeRL Table 1, as printed; parenthesised: minus the BF16 base). "
            "Only the ordering of the arms and the signs and rough sizes of the deltas can be compared.",
            "",
        ]
    if not grouped:
        return "\n".join(lines + ["No results yet."]) + "\n"
    for model, rows in grouped.items():
        paper_models = _paper_columns(scale, model)
        present = [row for row in ALL_ROWS if row in rows]
        summaries = {row: row_summary(rows[row]) for row in present}
        base = rows.get("bf16")
        lines += [f"## {model}", ""]
        k = {run["metrics"]["test_after"]["k"] for runs in rows.values() for run in runs}
        n = {run["metrics"]["test_after"]["n"] for runs in rows.values() for run in runs}
        lines += [
            f"Test pass@1 in % (mean over k = {'/'.join(map(str, sorted(k)))} samples per question, n = "
            f"{'/'.join(map(str, sorted(n)))} questions). One seed: that run's 95 % interval (normal, over per-question "
            "means); several seeds: mean ± std over seeds and the 95 % Student-t interval of the mean. Minus BF16 base: "
            "points, paired over questions (bootstrap over questions and seeds, 95 %). Reward AUC: mean reward per "
            "completion over training (trapezoid area / steps), mean ± std over seeds.",
            "",
        ]
        header = "| W# | Training | seeds | test pass@1 % (ours) [95 % CI] | before training % | after - before, "
        header += "points [95 % CI] | minus BF16 base (ours), points [95 % CI] | "
        header += " | ".join(f"{m} GSM8K (paper)" for m in paper_models) + " | reward AUC |"
        lines += [header, "|" + "---|" * (8 + len(paper_models))]
        for row in ALL_ROWS:
            if row in EXTRA_ROWS and row not in rows:
                continue  # rows outside the default grid appear only when run
            paper = " | ".join(_paper_cell(m, row) for m in paper_models)
            if row not in rows:
                lines.append(
                    f"| {ALL_ROWS[row].weights} | {ALL_ROWS[row].training} | 0 | not run | – | – | – | {paper} | – |"
                )
                continue
            s = summaries[row]
            ours = _pct(s["mean"]) + (f" ± {_pct(s['std'])}" if s["std"] is not None else "")
            ours += f" [{_pct(s['ci'][0])}, {_pct(s['ci'][1])}]"
            delta = "–"
            if base is not None and row != "bf16":
                b = compare(base, rows[row])["bootstrap"]
                delta = f"{100 * b['difference']:+.1f} [{100 * b['ci'][0]:+.1f}, {100 * b['ci'][1]:+.1f}]"
            auc = s["reward_auc"]
            auc_text = "–" if auc is None else f"{auc['mean']:.3f}" + (f" ± {auc['std']:.3f}" if auc["std"] else "")
            seeds = len(rows[row]) if ALL_ROWS[row].trained else "–"
            before, gain = "–", "–"
            if ALL_ROWS[row].trained:
                before_values = [run["metrics"]["test_before"]["pass1"] for run in rows[row]]
                before = _pct(sum(before_values) / len(before_values))
                g = training_gain(rows[row])
                gain = f"{100 * g['difference']:+.1f} [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}]"
            lines.append(
                f"| {ALL_ROWS[row].weights} | {ALL_ROWS[row].training} | {seeds} | {ours} | {before} | {gain} | {delta} | "
                f"{paper} | {auc_text} |"
            )
        lines += ["", "### Paired comparisons (B minus A, same test questions)", ""]
        lines += [
            "Accuracy: paired bootstrap over questions and seeds (`qerl_repro.stats.paired_bootstrap`; conservative: "
            "its interval is wider than nominal); across seeds, a paired t-test on the per-seed differences over the "
            ">= 2 seeds both arms ran (runs of one seed share the prompt order and the LoRA initialisation, so "
            "pairing by seed removes what the seed does to both arms), else Welch's t when both have >= 2 seeds, else "
            "exact McNemar on each question's first sample (one seed each). Reward AUC (the paper's 'faster reward "
            "growth'): the same seed-level tests (one seed each: the difference only, no test). Words: p < 0.05 "
            "two-sided. The seed-level test is the one that answers 'do the arms differ' (a new seed is a new training "
            "run); with one seed per arm the tests compare two training runs, so a 'higher' there is a hypothesis for "
            "more seeds, not a finding about the arms.",
            "",
            "| A | B | B - A pass@1, points [95 % CI] | bootstrap (questions and seeds) | across seeds | "
            "reward AUC B - A |",
            "|---|---|---|---|---|---|",
        ]
        any_comparison = False
        for a, b in COMPARISONS:
            if a not in rows or b not in rows:
                continue
            any_comparison = True
            c = compare(rows[a], rows[b])
            boot = c["bootstrap"]
            words = in_words(
                _label(a),
                _label(b),
                100 * boot["difference"],
                boot["p_value"],
                "points",
                num_resamples=boot["num_resamples"],
            )
            if "paired_seeds" in c:
                w = c["paired_seeds"]
                second = f"paired t over {w['n']} seeds: " + in_words(
                    _label(a), _label(b), 100 * w["difference"], w["p_value"], "points"
                )
                second += f" [{100 * w['ci'][0]:+.1f}, {100 * w['ci'][1]:+.1f}]"
            elif "welch" in c:
                w = c["welch"]
                second = "Welch: " + in_words(_label(a), _label(b), 100 * w["difference"], w["p_value"], "points")
            elif "mcnemar" in c:
                m = c["mcnemar"]
                second = f"McNemar (first sample; A only {m['a_only']}, B only {m['b_only']}): " + in_words(
                    _label(a), _label(b), 100 * m["difference"], m["p_value"], "points"
                )
            else:
                second = "–"
            if "auc_paired_seeds" in c:
                w = c["auc_paired_seeds"]
                auc = "paired t: " + in_words(_label(a), _label(b), w["difference"], w["p_value"], "reward")
            elif "auc_welch" in c:
                w = c["auc_welch"]
                auc = "Welch: " + in_words(_label(a), _label(b), w["difference"], w["p_value"], "reward")
            elif "auc_difference" in c:
                auc = f"{c['auc_difference']:+.3f} (one seed: no test)"
            else:
                auc = "–"
            ci = boot["ci"]
            lines.append(
                f"| {_label(a)} | {_label(b)} | {100 * boot['difference']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] "
                f"| {words} | {second} | {auc} |"
            )
        if not any_comparison:
            lines.append("| – | – | no pair of arms run yet | – | – | – |")
        from qerl_repro.entropy import grid_entropy_table, summarize_grid_entropy

        entropy = summarize_grid_entropy({row: rows[row] for row in ALL_ROWS if row in rows and ALL_ROWS[row].trained})
        if entropy:
            lines += ["", "### Rollout entropy per arm", "", grid_entropy_table(entropy)]
            if scale == "cpu":
                lines += [
                    "",
                    "The bases' entropy without training (BF16, NF4, MXFP4, NVFP4, and NVFP4 + AQN across its sigma "
                    "schedule, with intervals): `results/testbed/entropy.md` (`make testbed-entropy`).",
                ]
        lines += [
            "",
            "### Runs",
            "",
            "| file | seed | steps | wall time | git commit | command |",
            "|---|---|---|---|---|---|",
        ]
        for row in ALL_ROWS:
            for run in rows.get(row, []):
                commit = (run["git"].get("git_commit") or "?")[:10] + (
                    " (dirty)" if run["git"].get("git_dirty") else ""
                )
                steps = run["metrics"].get("steps", "–")
                lines.append(
                    f"| `{run['_file']}` | {run['seed'] if run['seed'] is not None else '–'} | {steps} | "
                    f"{run['wall_seconds'] / 60:.1f} min | {commit} | `{run['command']}` |"
                )
        total = sum(run["wall_seconds"] for runs in rows.values() for run in runs)
        machines = {run["machine"].get("platform") for runs in rows.values() for run in runs}
        lines += ["", f"Total wall time of these runs: {total / 3600:.2f} h on {', '.join(sorted(machines))}.", ""]
    if figure:
        lines += [
            f"![reward and entropy per step]({figure})",
            "",
            f"`{figure}`: reward (left) and token entropy (right) per GRPO step of every training arm; thin lines are "
            "single seeds, the thick line the mean over seeds and the band mean ± 1 std over seeds (only with >= 2 "
            "seeds); curves are moving averages over 10 steps.",
            "",
        ]
    if scale == "cpu":
        lines += [
            "What these CPU numbers can tell: whether, on a model whose 4-bit bases keep their skill, the arms' order "
            "and deltas look like the paper's (e.g. NVFP4 LoRA vs BF16 LoRA, AQN vs no AQN), with honest intervals. "
            "What they cannot tell: anything about GSM8K levels, Qwen2.5, long reasoning completions or GPU speed; "
            "a difference the tests call 'not distinguishable' may also be too few seeds.",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(results_dir: str, output: str, window: int = 10) -> list[str]:
    """One PNG: reward and entropy per step of every training arm (seeds overlaid, mean and ± 1 std band); returns
    the arms drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grouped = load_results(results_dir)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    drawn = []
    colors = plt.get_cmap("tab10")
    for model, rows in grouped.items():
        trained = [row for row in ALL_ROWS if ALL_ROWS[row].trained and row in rows]
        for i, row in enumerate(trained):
            color = colors(i % 10)
            label = f"{_label(row)} ({len(rows[row])} seed{'s' if len(rows[row]) > 1 else ''})"
            if len(grouped) > 1:
                label = f"{model}: {label}"
            for ax, key in zip(axes, ("reward", "entropy")):
                curves = [run["metrics"][key] for run in rows[row] if run["metrics"][key]["steps"]]
                if not curves:
                    continue
                length = min(len(c["steps"]) for c in curves)
                steps = curves[0]["steps"][:length]
                smoothed = np.array([_smooth(c["values"][:length], window) for c in curves])
                for values in smoothed:
                    ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
                mean = smoothed.mean(0)
                ax.plot(steps, mean, color=color, linewidth=2, label=label if key == "reward" else None)
                if len(curves) > 1:
                    std = smoothed.std(0, ddof=1)
                    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
            drawn.append(row)
    axes[0].set_ylabel("mean reward per completion (exact answer pays 2)")
    axes[0].set_title("Reward")
    axes[1].set_ylabel("mean token entropy of rollouts (nats)")
    axes[1].set_title("Entropy")
    for ax in axes:
        ax.set_xlabel("GRPO step (optimizer steps)")
        ax.grid(alpha=0.3)
    if drawn:
        fig.legend(loc="lower center", ncol=min(4, len(drawn)), fontsize=8, frameon=False)
    fig.suptitle(
        f"Training curves, {window}-step moving average; thin: one seed, thick: mean over seeds, band: mean ± 1 std "
        "over seeds",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return drawn


def grid_command_of(scale: str, model: str, rows: dict[str, list[dict]]) -> str:
    """The `make` line(s) that produce (and resume) these results, read from them: the Table 1 rows present (all: no
    ROWS=) with their largest seed count, then the extra rows present (`EXTRA_ROWS`) with theirs, one line each."""
    base = ["make reproduce-table1", f"SCALE={scale}"] + ([] if scale == "cpu" else [f"MODEL={model}"])
    lines = []
    for group, default_all in ((ROWS, True), (EXTRA_ROWS, False)):
        present = [row for row in group if row in rows]
        if not present:
            continue
        seeds = max((len(rows[row]) for row in present if group[row].trained), default=1)
        parts = [*base, f"SEEDS={seeds}"]
        if not (default_all and set(present) == set(group)):
            parts.append(f"ROWS={','.join(present)}")
        lines.append(" ".join(parts))
    return "\n".join(lines)


# The paper's claims that the README's results section tests on the grid: (A, B, the claim about B - A). The paper's
# own B - A is computed from `report.PAPER_TABLE1` (never typed here).
README_CLAIMS = [
    ("bf16_lora", "nvfp4_lora", "NVFP4 LoRA vs BF16 LoRA"),
    ("bf16_lora", "mxfp4_lora", "MXFP4 LoRA vs BF16 LoRA"),
    ("bf16_lora", "nf4_qlora", "NF4 QLoRA vs BF16 LoRA"),
    ("nvfp4_lora", "nvfp4_aqn", "AQN on the NVFP4 base (QeRL vs NVFP4 LoRA)"),
    ("bf16_lora", "nvfp4_aqn", "QeRL vs BF16 LoRA"),
    ("bf16_lora", "bf16_aqn", "AQN without quantization (QeRL #11's ablation)"),
    ("bf16_lora", "bf16_full", "full fine-tuning vs BF16 LoRA"),
]
README_BEGIN = (
    "<!-- BEGIN generated: python -m qerl_repro.table1 report --scale {scale} (from results/table1_{scale}/) -->"
)
README_END = "<!-- END generated: table1_{scale} -->"


def _paper_difference(a: str, b: str) -> str:
    """The paper's B - A on GSM8K for each model of `report.PAPER_TABLE1` that has both rows."""
    from qerl_repro.report import PAPER_TABLE1

    parts = [
        f"{values[b] - values[a]:+.1f} on {model}"
        for model, values in PAPER_TABLE1.items()
        if a in values and b in values
    ]
    return "paper, GSM8K points: " + ", ".join(parts) if parts else "not in the paper"


def _seed_level(c: dict, key: str = "") -> tuple[str, dict | None]:
    """The across-seeds test of a `compare` result: paired by seed, else Welch, else none (one seed)."""
    if f"{key}paired_seeds" in c:
        return f"paired t over {c[f'{key}paired_seeds']['n']} seeds", c[f"{key}paired_seeds"]
    if f"{key}welch" in c:
        return "Welch's t over seeds", c[f"{key}welch"]
    return "", None


def _readme_table(rows: dict, names: list[str], model: str, folder: str) -> list[str]:
    """The README's table of `names`: seeds, test pass@1 with its interval, the training gain, the JSONs."""
    lines = [
        "| row | seeds | test pass@1 % [95 % CI] | after - before training, points | from |",
        "|---|---|---|---|---|",
    ]
    for row in names:
        s = row_summary(rows[row])
        ours = _pct(s["mean"]) + f" [{_pct(s['ci'][0])}, {_pct(s['ci'][1])}]"
        trained = ALL_ROWS[row].trained
        gain = f"{100 * training_gain(rows[row])['difference']:+.1f}" if trained else "–"
        source = f"{model}/{row}-seed*.json" if trained else f"{model}/{row}.json"
        seeds = len(rows[row]) if trained else "–"
        lines.append(f"| {_label(row)} | {seeds} | {ours} | {gain} | `{folder}/{source}` |")
    return lines


def _readme_claims(rows: dict, claims: list[tuple[str, str, str, str]]) -> list[str]:
    """One line per claim (A, B, what it says, what the paper or the seed studies found) whose two arms have run: B - A
    with the across-seeds test, its Holm-adjusted p over the claims of this list that have one, and the same for reward
    AUC (Holm over the AUC tests of the list)."""
    from qerl_repro.stats import holm_adjust

    def holm_by_pair(tests: dict) -> dict:  # Holm over the pairs that have a test
        tested = [pair for pair, test in tests.items() if test is not None]
        return dict(zip(tested, holm_adjust([tests[pair]["p_value"] for pair in tested])))

    present = [(a, b, claim, prior) for a, b, claim, prior in claims if a in rows and b in rows]
    compared = {(a, b): compare(rows[a], rows[b]) for a, b, _, _ in present}
    named_tests = {pair: _seed_level(c) for pair, c in compared.items()}
    auc_tests = {pair: _seed_level(c, key="auc_")[1] for pair, c in compared.items()}
    holm = holm_by_pair({pair: test for pair, (_, test) in named_tests.items()})
    auc_holm = holm_by_pair(auc_tests)
    lines = []
    for a, b, claim, prior in present:
        c = compared[(a, b)]
        test_name, test = named_tests[(a, b)]
        if test is None:
            seeds = f"{c['bootstrap']['num_seeds'][0]} and {c['bootstrap']['num_seeds'][1]} seeds"
            verdict = f"{100 * c['bootstrap']['difference']:+.1f} points, {seeds}: not yet a test across seeds"
        else:
            verdict = (
                f"{100 * test['difference']:+.1f} points [{100 * test['ci'][0]:+.1f}, {100 * test['ci'][1]:+.1f}], "
                f"{test_name}, p = {test['p_value']:.2g} (Holm {holm[(a, b)]:.2g}): "
                + (
                    "not distinguishable at this sample size"
                    if test["p_value"] >= 0.05
                    else f"{_label(b)} {'higher' if test['difference'] > 0 else 'lower'}"
                )
            )
            auc = auc_tests[(a, b)]
            if auc is not None:
                verdict += (
                    f"; reward AUC {auc['difference']:+.3f}, p = {auc['p_value']:.2g} (Holm {auc_holm[(a, b)]:.2g})"
                ) + (
                    " (not distinguishable)"
                    if auc["p_value"] >= 0.05
                    else f" ({_label(b)} {'higher' if auc['difference'] > 0 else 'lower'})"
                )
        lines.append(f"- {claim} ({prior}): {verdict}.")
    return lines


def readme_section(results_dir: str, scale: str) -> str:
    """The README's results block for `scale`, from the grid's JSONs only: per row the seeds, test pass@1 with its
    interval and the JSONs it comes from, then the paper's claims tested across seeds, in words; then the same for the
    extension rows that have run, with the seed studies' claims."""
    grouped = load_results(results_dir)
    folder = os.path.join("results", os.path.basename(os.path.normpath(results_dir)))
    lines = [README_BEGIN.format(scale=scale)]
    if not grouped:
        return "\n".join(lines + ["No results yet.", README_END.format(scale=scale)]) + "\n"
    for model, rows in grouped.items():
        runs_all = [run for runs in rows.values() for run in runs]
        hours = sum(run["wall_seconds"] for run in runs_all) / 3600
        trained = [row for row in ROWS if ROWS[row].trained and row in rows]
        seed_counts = sorted({len(rows[row]) for row in trained})
        n = {run["metrics"]["test_after"]["n"] for run in runs_all}
        k = {run["metrics"]["test_after"]["k"] for run in runs_all}
        lines += [
            " and ".join(f"`{command}`" for command in grid_command_of(scale, model, rows).splitlines())
            + f" ({model}): {len(runs_all)} runs, {hours:.1f} h of wall time on "
            f"this 2-core CPU; {'/'.join(map(str, seed_counts))} seed(s) per Table 1 training row. Test pass@1 on n = "
            f"{'/'.join(map(str, sorted(n)))} fixed questions x k = {'/'.join(map(str, sorted(k)))} samples at T 1.0; "
            "mean over seeds with the 95 % Student-t interval across seeds (one run: its own interval over "
            f"questions). Full table, runs and curves: `{folder}.md`.",
            "",
        ]
        lines += _readme_table(rows, [row for row in ROWS if row in rows], model, folder)
        lines += [
            "",
            "The paper's claims, B - A on the same questions, tested across seeds (a new seed is a new training run; "
            "p < 0.05 two-sided; `Holm` is the p-value adjusted over the claims of the list, which keeps the chance of "
            "any false 'higher' or 'lower' among them below 5 %):",
            "",
        ]
        lines += _readme_claims(rows, [(a, b, claim, _paper_difference(a, b)) for a, b, claim in README_CLAIMS])
        extension_rows = [row for row in EXTRA_ROWS if row in rows]
        if extension_rows:
            lines += [
                "",
                "The seed studies' extensions (`table1.EXTRA_ROWS`, run when named in `ROWS=`), same statistics:",
                "",
            ]
            lines += _readme_table(rows, extension_rows, model, folder)
            lines += ["", "Their claims, B - A, tested the same way (Holm over this list):", ""]
            lines += _readme_claims(rows, EXTENSION_CLAIMS)
    lines.append(README_END.format(scale=scale))
    return "\n".join(lines) + "\n"


def update_readme(readme: str, section: str, scale: str) -> bool:
    """Replace the README's generated block for `scale` (between its BEGIN/END markers) with `section`; False when the
    README does not exist or has no such block (nothing written)."""
    if not os.path.isfile(readme):
        return False
    with open(readme) as f:
        text = f.read()
    begin, end = README_BEGIN.format(scale=scale), README_END.format(scale=scale)
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = head + section.rstrip("\n") + tail
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return True


def write_report(results_dir: str, output: str, scale: str) -> str:
    """`output` (markdown) and the figure next to it (same name, .png), from the JSONs under `results_dir`."""
    figure_path = os.path.splitext(output)[0] + ".png"
    drawn = plot_curves(results_dir, figure_path)
    figure = os.path.basename(figure_path) if drawn else None
    text = render_report(results_dir, scale, figure=figure)
    with open(output, "w") as f:
        f.write(text)
    return output


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qerl_repro.table1", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--scale", choices=("cpu", "gpu"), default="gpu")
        p.add_argument("--model", default=None, help="gpu: Qwen2.5-3B-Instruct (default) or Qwen2.5-7B-Instruct")
        p.add_argument("--results_dir", default=None, help="default: results/table1_<scale>")
    run = sub.choices["run"]
    run.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated, of: {','.join(ALL_ROWS)} (default: all but {','.join(EXTRA_ROWS)})",
    )
    run.add_argument("--seeds", type=int, default=1, help="training rows run with seeds 42 .. 42 + n - 1")
    run.add_argument("--runs_dir", default=None, help="default: runs/table1_<scale>")
    run.add_argument("--model_dir", default=None, help="override the base model path (e.g. a tiny organism)")
    run.add_argument("--max_steps", type=int, default=None, help="override the recipes' max_steps")
    run.add_argument("--eval_limit", type=int, default=None, help="evaluate only the first N test questions")
    run.add_argument("--dataset_path", default=None, help="gpu: local GSM8K folder (train/test.jsonl)")
    run.add_argument("--extra", default="", help="more flags for the training recipes (one string)")
    report = sub.choices["report"]
    report.add_argument("--output", default=None, help="default: results/table1_<scale>.md (and .png)")
    report.add_argument(
        "--readme",
        default="README.md",
        help="README (relative to the current folder) whose generated block for this scale is rewritten when the results "
        "are its results/table1_<scale>; skipped when it does not exist or has no such block; '' to skip",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    model = CPU_MODEL if args.scale == "cpu" else (args.model or DEFAULT_GPU_MODEL)
    results_dir = args.results_dir or f"results/table1_{args.scale}"
    if args.command == "run":
        rows = [row for row in args.rows.split(",") if row]
        done = run_grid(
            args.scale,
            model,
            rows,
            args.seeds,
            results_dir=results_dir,
            runs_dir=args.runs_dir or f"runs/table1_{args.scale}",
            model_dir=args.model_dir,
            max_steps=args.max_steps,
            eval_limit=args.eval_limit,
            dataset_path=args.dataset_path,
            extra=shlex.split(args.extra),
        )
        for job in done:
            sys.stdout.write(f"{job['status']}: {job['row']} seed {job['seed']} -> {job['path']}\n")
    else:
        output = args.output or f"results/table1_{args.scale}.md"
        sys.stdout.write(write_report(results_dir, output, args.scale) + "\n")
        # The README's block describes the committed grid only: another results folder (a smoke test) never rewrites it
        canonical = os.path.join(
            os.path.dirname(os.path.abspath(args.readme or ".")), "results", f"table1_{args.scale}"
        )
        if (
            args.readme
            and os.path.abspath(results_dir) == canonical
            and update_readme(args.readme, readme_section(results_dir, args.scale), args.scale)
        ):
            sys.stdout.write(f"{args.readme}: results section regenerated\n")


if __name__ == "__main__":
    main()
