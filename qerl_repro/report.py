# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Results -> the GSM8K table (ours vs QeRL Table 1, with confidence intervals) and training-curve plots, from any
folders of evaluation JSONs (`make reproduce-table1` uses `qerl_repro.table1`, which reads its own per-row JSONs).

```
python -m qerl_repro.report --results_dir data --output results/table1.md                 # infer rows from run dirs
python -m qerl_repro.report --runs results/runs.yaml --output results/table1.md --plots    # explicit rows
```

Rows come from evaluation JSONs written by `qerl_repro.evaluation` (`evaluate_gsm8k`). Without a manifest, every run
folder named `<Model>-gsm8k_<method>` (the recipes' `output_dir`) gives the row (Model, method) from its
`eval_after.json`, and the untrained row of its base format (e.g. `nvfp4`) from its `eval_before.json` (the first run
per model and format). A manifest (`--runs`, JSON or YAML) lists rows explicitly::

    runs:
      - {path: data/Qwen2.5-3B-Instruct-gsm8k_nvfp4_aqn, model: Qwen2.5-3B-Instruct, method: nvfp4_aqn}
      - {path: data/Qwen2.5-3B-Instruct-gsm8k_nvfp4_aqn/eval_before.json, model: Qwen2.5-3B-Instruct, method: nvfp4}

(a mapping `{path: {model: ..., method: ...}}` works too; `eval:` names the JSON inside a run folder). Several entries
on the same row are independent runs (seeds): the table shows their mean ± std. Method keys are the recipe stems
without `gsm8k_` (`bf16_lora`, `nvfp4_aqn`, ...) or a bare format for an untrained model (`bf16`, `nvfp4`, ...).
Numbers are never typed by hand: the paper column is the literal `PAPER_TABLE1` (reference/qerl.md §5), ours is read
from the JSONs.
"""

import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)

__all__ = [
    "METHOD_LABELS",
    "PAPER_TABLE1",
    "RunEntry",
    "build_table",
    "discover_runs",
    "eval_sampling",
    "format_ours",
    "load_manifest",
    "main",
    "plot_training_curves",
    "render_markdown",
]

# QeRL Table 1 (GSM8K, GRPO), exactly as printed (reference/qerl.md §5). Keys: method (see METHOD_LABELS).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Qwen2.5-3B-Instruct": {
        "bf16": 61.2,
        "nf4": 57.5,
        "mxfp4": 59.8,
        "nvfp4": 59.4,
        "bf16_full": 84.4,
        "bf16_lora": 76.1,
        "nf4_qlora": 76.1,
        "mxfp4_lora": 73.4,
        "nvfp4_lora": 83.3,
        "nvfp4_aqn": 83.7,
    },
    "Qwen2.5-7B-Instruct": {
        "bf16": 76.3,
        "nf4": 70.5,
        "mxfp4": 71.3,
        "nvfp4": 73.4,
        "bf16_full": 91.2,
        "bf16_lora": 88.1,
        "nf4_qlora": 85.0,
        "mxfp4_lora": 86.4,
        "nvfp4_lora": 88.5,
        "nvfp4_aqn": 90.8,
    },
}

# Row labels in the paper's order: (W#, training).
METHOD_LABELS: dict[str, str] = {
    "bf16": "BF16 (untrained)",
    "nf4": "NF4 (untrained)",
    "mxfp4": "MXFP4 (untrained)",
    "nvfp4": "NVFP4 (untrained)",
    "bf16_full": "BF16 full fine-tuning",
    "bf16_lora": "BF16 LoRA",
    "nf4_qlora": "NF4 LoRA (QLoRA)",
    "mxfp4_lora": "MXFP4 LoRA",
    "nvfp4_lora": "NVFP4 LoRA",
    "nvfp4_aqn": "NVFP4 LoRA + AQN (QeRL)",
}

PAPER_PROTOCOL = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 4096}
_RUN_DIR_RE = re.compile(r"^(?P<model>.+)-gsm8k_(?P<method>[a-z0-9_]+)$")
_EVAL_CANDIDATES = ("eval_after.json", "eval.json")


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RunEntry:
    """One evaluation JSON assigned to a table row."""

    eval_path: str
    model: str
    method: str


def _resolve_eval_path(path: str, eval_name: str | None = None) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in [eval_name] if eval_name else _EVAL_CANDIDATES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"No evaluation JSON ({eval_name or ' or '.join(_EVAL_CANDIDATES)}) in {path}")
    raise FileNotFoundError(f"{path} is neither an evaluation JSON nor a run folder")


def load_manifest(path: str) -> list[RunEntry]:
    """Rows from a JSON/YAML manifest (`runs:` list of `{path, model, method[, eval]}`, or `{path: {model, method}}`).

    Relative paths are taken from the current folder, else from the manifest's folder.
    """
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f)
        else:
            data = json.load(f)
    items = data.get("runs", data) if isinstance(data, Mapping) else data
    if isinstance(items, Mapping):
        items = [{"path": key, **value} for key, value in items.items()]
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of runs or a mapping of run paths to rows")
    entries = []
    base = os.path.dirname(os.path.abspath(path))
    for i, item in enumerate(items):
        missing = [key for key in ("path", "model", "method") if not item.get(key)]
        if missing:
            raise ValueError(f"{path}: run #{i} lacks {missing} (got {item})")
        run_path = item["path"]
        if not os.path.exists(run_path) and os.path.exists(os.path.join(base, run_path)):
            run_path = os.path.join(base, run_path)
        entries.append(RunEntry(_resolve_eval_path(run_path, item.get("eval")), item["model"], item["method"]))
    return entries


def discover_runs(results_dir: str) -> list[RunEntry]:
    """Rows inferred from run folders named `<Model>-gsm8k_<method>` under `results_dir` (see the module docstring)."""
    entries, untrained_seen = [], set()
    for root, dirs, _ in sorted(os.walk(results_dir)):
        dirs.sort()
        match = _RUN_DIR_RE.match(os.path.basename(root))
        if not match:
            continue
        model, method = match.group("model"), match.group("method")
        for name in _EVAL_CANDIDATES:
            if os.path.isfile(os.path.join(root, name)):
                entries.append(RunEntry(os.path.join(root, name), model, method))
                break
        before = os.path.join(root, "eval_before.json")
        base_format = method.split("_")[0]
        if os.path.isfile(before) and (model, base_format) not in untrained_seen:
            untrained_seen.add((model, base_format))
            entries.append(RunEntry(before, model, base_format))
    return entries


# ----------------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------------


def _load(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    if "accuracy" not in result:
        raise ValueError(f"{path} is not an evaluation JSON (no 'accuracy')")
    return result


def format_ours(results: list[dict]) -> str:
    """The "GSM8K (ours)" cell, in %: one run `acc ± half-width (95 % CI [lo, hi], n=…, k=…)` (the ± is half the CI
    width; Wilson intervals are asymmetric, the bounds are exact); several runs: `mean ± std (N runs, …)`.

    >>> format_ours([{"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 100, "k": 1}])
    '50.0 ± 10.0 (95 % CI [40.0, 60.0], n=100, k=1)'
    """
    if not results:
        return "–"
    ns = sorted({r.get("n") for r in results}, key=str)
    ks = sorted({r.get("k") for r in results}, key=str)
    n_text = "/".join(map(str, ns))
    k_text = "/".join(map(str, ks))
    if len(results) == 1:
        result = results[0]
        low, high = result["ci95"]
        return (
            f"{100 * result['accuracy']:.1f} ± {100 * (high - low) / 2:.1f} "
            f"(95 % CI [{100 * low:.1f}, {100 * high:.1f}], n={n_text}, k={k_text})"
        )
    accuracies = [100 * r["accuracy"] for r in results]
    mean = sum(accuracies) / len(accuracies)
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1))
    half_widths = [100 * (r["ci95"][1] - r["ci95"][0]) / 2 for r in results]
    return (
        f"{mean:.1f} ± {std:.1f} (mean ± std over {len(results)} runs; per-run 95 % CI ± "
        f"{min(half_widths):.1f}–{max(half_widths):.1f}, n={n_text}, k={k_text})"
    )


def _method_order(method: str) -> tuple[int, str]:
    keys = list(METHOD_LABELS)
    return (keys.index(method), method) if method in keys else (len(keys), method)


def build_table(entries: list[RunEntry], *, include_paper_rows: bool = True) -> list[dict]:
    """Table rows `{model, method, label, ours, paper, results, eval_paths}` ordered by model then paper order.

    With `include_paper_rows`, the paper's rows of every model that has at least one run are listed even without a
    run of ours ("–"), so the table shows what is missing.
    """
    grouped: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    models: list[str] = []
    for entry in entries:
        grouped.setdefault((entry.model, entry.method), []).append((entry.eval_path, _load(entry.eval_path)))
        if entry.model not in models:
            models.append(entry.model)
    rows = []
    for model in models:
        methods = {method for (m, method) in grouped if m == model}
        if include_paper_rows:
            methods |= set(PAPER_TABLE1.get(model, {}))
        for method in sorted(methods, key=_method_order):
            found = grouped.get((model, method), [])
            results = [result for _, result in found]
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "label": METHOD_LABELS.get(method, method),
                    "ours": format_ours(results),
                    "paper": PAPER_TABLE1.get(model, {}).get(method),
                    "accuracy": [r["accuracy"] for r in results],
                    "ci95": [r.get("ci95") for r in results],
                    "n": [r.get("n") for r in results],
                    "k": [r.get("k") for r in results],
                    "eval_paths": [path for path, _ in found],
                    "configs": [r.get("config", {}) for r in results],
                }
            )
    return rows


def eval_sampling(config: Mapping) -> dict:
    """The sampling settings of an eval JSON's `config`: `evaluate_gsm8k`'s `config["sampling"]`, or the flat keys
    (`temperature`, `top_p`, `max_new_tokens`, `num_samples`) of `qerl_repro.policy_eval`; `greedy` is derived from a
    zero temperature when absent."""
    sampling = dict(config.get("sampling") or {})
    for key in ("temperature", "top_p", "max_new_tokens", "num_samples"):
        if key not in sampling and key in config:
            sampling[key] = config[key]
    if "greedy" not in sampling and "temperature" in sampling:
        sampling["greedy"] = sampling["temperature"] == 0
    return sampling


def _protocol_notes(rows: list[dict]) -> list[str]:
    """Sentences on how our evaluations differ from the paper's protocol (read from the eval configs)."""
    deviations: dict[str, set[str]] = {}
    criteria, adapter_modes = set(), set()
    for row in rows:
        for config in row["configs"]:
            sampling = eval_sampling(config)
            label = f"{row['model']} / {row['method']}"
            if sampling.get("greedy"):
                deviations.setdefault("greedy decoding (paper: T=0.6, top-p 0.95)", set()).add(label)
            else:
                for key in ("temperature", "top_p"):
                    if key in sampling and sampling[key] != PAPER_PROTOCOL[key]:
                        text = f"{key} {sampling[key]} (paper: {PAPER_PROTOCOL[key]})"
                        deviations.setdefault(text, set()).add(label)
            tokens = sampling.get("max_new_tokens")
            if tokens is not None and tokens != PAPER_PROTOCOL["max_new_tokens"]:
                deviations.setdefault(f"{tokens} new tokens (paper: 4096)", set()).add(label)
            if config.get("prefill"):
                deviations.setdefault(f"assistant prefill {config['prefill']!r}", set()).add(label)
            dataset = config.get("dataset") or {}
            if dataset.get("limit"):
                deviations.setdefault(f"a fixed subset of {dataset.get('n')} test questions", set()).add(label)
            if config.get("criterion") or config.get("reward"):
                criteria.add(config.get("criterion") or config.get("reward"))
            if config.get("adapter_mode"):
                adapter_modes.add(config["adapter_mode"])
    notes = []
    if criteria:
        notes.append(
            f"Correctness criterion: {', '.join(sorted(criteria))} (`answer`: QeRL's exact match of the `<answer>` "
            "text)."
        )
    if adapter_modes:
        notes.append(f"LoRA adapters applied via: {', '.join(sorted(adapter_modes))}.")
    for text, labels in sorted(deviations.items()):
        notes.append(f"Deviation from the paper's evaluation: {text} for {', '.join(sorted(labels))}.")
    return notes


def render_markdown(rows: list[dict], command: str | None = None) -> str:
    """The markdown table `Model | Method | GSM8K (ours) | GSM8K (paper)` with the regenerating command above it."""
    lines = []
    if command:
        lines += ["Regenerate with:", "", "```bash", command, "```", ""]
    lines += ["| Model | Method | GSM8K (ours) | GSM8K (paper) |", "|---|---|---|---|"]
    for row in rows:
        paper = f"{row['paper']:.1f}" if row["paper"] is not None else "–"
        lines.append(f"| {row['model']} | {row['label']} | {row['ours']} | {paper} |")
    lines += [
        "",
        "Ours: pass@1 in % (mean over k samples per question) on n GSM8K test questions; ± is half the width of the "
        "95 % confidence interval (Wilson for k = 1, normal approximation on per-question means for k > 1), or the "
        "std over runs when a row has several. Paper: QeRL Table 1 (arXiv 2510.11696), as printed.",
    ]
    notes = _protocol_notes(rows)
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------

_CURVES = (  # (log key, title, file stem)
    ("reward", "Total reward", "reward"),
    ("entropy", "Entropy", "entropy"),
    ("aqn/sigma", "AQN noise sigma", "aqn_sigma"),
    ("completions/mean_length", "Mean completion length", "completion_length"),
    ("gsm8k/accuracy", "GSM8K accuracy (eval subset)", "gsm8k_accuracy"),
)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if "step" in entry and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def _std_key(key: str) -> str | None:
    if key == "reward":
        return "reward_std"
    return key[: -len("/mean")] + "/std" if key.endswith("/mean") else None


def plot_training_curves(trainer_state_json: str, output_dir: str) -> list[str]:
    """PNG plots of a run's `trainer_state.json` log history, one per metric present, plus an overview.

    Plotted keys: `reward` (± `reward_std`), every `rewards/<name>/mean` (± `rewards/<name>/std`: the format and
    accuracy rewards), `entropy`, `aqn/sigma`, `completions/mean_length` and `gsm8k/accuracy`, each against the
    optimizer step. Returns the paths written (`<output_dir>/<metric>.png`, `training_curves.png`); metrics absent
    from the log are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trainer_state_json) as f:
        history = json.load(f).get("log_history", [])
    keys = sorted({key for entry in history for key in entry})
    curves = list(_CURVES[:1])
    for key in keys:
        match = re.fullmatch(r"rewards/(.+)/mean", key)
        if match:
            curves.append((key, f"Reward: {match.group(1)}", f"reward_{re.sub(r'[^A-Za-z0-9_.-]', '_', match[1])}"))
    curves += list(_CURVES[1:])
    panels = []
    for key, title, stem in curves:
        steps, values = _series(history, key)
        if steps:
            std = dict(zip(*_series(history, _std_key(key)))) if _std_key(key) else {}
            panels.append((key, title, stem, steps, values, std))
    if not panels:
        logger.warning("No plottable metric in %s", trainer_state_json)
        return []
    os.makedirs(output_dir, exist_ok=True)
    run_name = os.path.basename(os.path.dirname(os.path.abspath(trainer_state_json)))

    def draw(ax, key, title, steps, values, std):
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        if std and all(s in std for s in steps):
            lower = [v - std[s] for s, v in zip(steps, values)]
            upper = [v + std[s] for s, v in zip(steps, values)]
            ax.fill_between(steps, lower, upper, alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)

    paths = []
    for key, title, stem, steps, values, std in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, key, f"{title} ({run_name})", steps, values, std)
        fig.tight_layout()
        path = os.path.join(output_dir, f"{stem}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (key, title, _, steps, values, std) in zip(axes.flat, panels):
        draw(ax, key, title, steps, values, std)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(run_name)
    fig.tight_layout()
    path = os.path.join(output_dir, "training_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ReportArguments:
    """Arguments of `python -m qerl_repro.report`."""

    results_dir: str = field(default="data", metadata={"help": "Folder searched for `<Model>-gsm8k_<method>` runs."})
    runs: str | None = field(default=None, metadata={"help": "Manifest (JSON/YAML) mapping runs to table rows."})
    output: str | None = field(default=None, metadata={"help": "Markdown output (default: print only)."})
    json_output: str | None = field(default=None, metadata={"help": "Also write the rows as JSON here."})
    plots: bool = field(default=False, metadata={"help": "Plot training curves of every run into <run>/plots."})
    include_paper_rows: bool = field(default=True, metadata={"help": "List paper rows we have no run for."})
    summary: str | None = field(
        default=None,
        metadata={"help": "Print (and save as <run>/summary.json) the summary of one run folder instead."},
    )
    compare_seeds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Two or more run folders of the same recipe with different seeds: test accuracy before vs after "
            "(McNemar per seed, paired bootstrap across seeds) and the reward rise with a t-test across seeds "
            "(written to --output as JSON when given).",
            "nargs": "+",
        },
    )


def _window_stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": n}


def run_summary(run_dir: str, window: int = 10) -> dict:
    """Headline numbers of one training run folder: eval before/after (with CIs) and the reward trend.

    The learning signal is the mean total reward of the last `window` logged steps minus that of the first `window`,
    with a 95 % interval from the step-to-step spread (Welch, normal approximation). That spread is within-run noise:
    it is not a run-to-run (seed) interval.
    """
    summary: dict = {"run_dir": run_dir}
    for name in ("eval_before", "eval_after"):
        path = os.path.join(run_dir, f"{name}.json")
        if os.path.isfile(path):
            result = _load(path)
            summary[name] = {
                k: result.get(k) for k in ("accuracy", "ci95", "n", "k", "numeric_accuracy", "format_rate")
            }
            # QeRL's format metrics only mean something for a task whose replies use <answer> tags (not the testbed)
            summary[name]["answer_tags_seen"] = any(
                "<answer>" in completion
                for record in result.get("records", [])
                for completion in record.get("completions", [])
            )
    gain = _test_gain(run_dir)
    if gain is not None:
        summary["test_gain"] = gain
    state_path = os.path.join(run_dir, "trainer_state.json")
    if os.path.isfile(state_path):
        with open(state_path) as f:
            history = json.load(f).get("log_history", [])
        steps = [entry for entry in history if "reward" in entry and "loss" in entry]
        rewards = [float(entry["reward"]) for entry in steps]
        summary["steps"] = len(steps)
        if len(rewards) >= 2 * window:
            first, last = _window_stats(rewards[:window]), _window_stats(rewards[-window:])
            diff = last["mean"] - first["mean"]
            se = math.sqrt(first["std"] ** 2 / first["n"] + last["std"] ** 2 / last["n"])
            summary["reward_trend"] = {
                "first": first,
                "last": last,
                "difference": diff,
                "difference_ci95": [diff - 1.96 * se, diff + 1.96 * se],
                "noise": "within-run step-to-step spread (Welch), not a run-to-run interval",
            }
        for key in ("aqn/num_noised_modules", "step_time", "sync/update_lost_frac"):
            values = [entry[key] for entry in steps if key in entry]
            if values:
                summary.setdefault("per_step", {})[key] = {"min": min(values), "max": max(values)}
        step_times = sorted(entry["step_time"] for entry in steps if "step_time" in entry)
        if step_times:
            summary["step_time_median_s"] = step_times[len(step_times) // 2]
    return summary


def _rewards_per_step(run_dir: str) -> tuple[list[float], list[float]]:
    from qerl_repro.errors import UserError

    path = os.path.join(run_dir, "trainer_state.json")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a training run folder (no trainer_state.json)")
    with open(path) as f:
        history = json.load(f).get("log_history", [])
    steps = [entry for entry in history if "reward" in entry and "loss" in entry]
    return [float(entry["step"]) for entry in steps], [float(entry["reward"]) for entry in steps]


def _per_question(result: dict) -> tuple[dict, dict]:
    """Per question: pass@1 (mean over its samples) and whether its first sample was right (McNemar's one 0/1 outcome
    per question, as in `qerl_repro.table1`)."""
    records = result["records"]
    pass1 = {record["index"]: float(record["pass1"]) for record in records}
    first = {
        record["index"]: bool(record["correct"][0]) if "correct" in record else record["pass1"] >= 1
        for record in records
    }
    return pass1, first


def compare_seed_runs(run_dirs: list[str], window: int = 10) -> dict:
    """Did a recipe learn, judged across its seeds (run folders of the same recipe with different seeds)?

    - Test accuracy, the evidence that matters: each run's `eval_before` vs `eval_after` on the same questions (exact
      McNemar per seed on each question's first sample), and all seeds together with the paired bootstrap over questions and
      seeds (`qerl_repro.stats.paired_bootstrap`).
    - Reward: each run's rise (mean of the last `window` logged steps minus the first `window`) and its reward AUC, with a
      t-interval across seeds and a one-sample t-test of the rise against 0 (the AUC compares arms, not a run with 0). A reward can rise through a hack the
      accuracy never sees, which is why the accuracy comparison comes first.
    """
    from qerl_repro.errors import UserError
    from qerl_repro.stats import (
        describe_difference,
        mcnemar_exact,
        one_sample_t_test,
        paired_bootstrap,
        reward_auc,
        t_interval,
    )

    if len(run_dirs) < 2:
        raise UserError("compare_seed_runs needs at least two run folders (seeds) of the same recipe.")
    per_run, rises, aucs, before_table, after_table, questions = [], [], [], [], [], None
    for run_dir in run_dirs:
        steps, rewards = _rewards_per_step(run_dir)
        if len(rewards) < 2 * window:
            raise UserError(f"{run_dir}: {len(rewards)} logged steps, need at least 2 x window = {2 * window}.")
        rise = sum(rewards[-window:]) / window - sum(rewards[:window]) / window
        auc = reward_auc(steps, rewards)
        rises.append(rise)
        aucs.append(auc)
        run = {"run_dir": run_dir, "steps": len(rewards), "reward_rise": rise, "reward_auc": auc}
        evals = [os.path.join(run_dir, f"{name}.json") for name in ("eval_before", "eval_after")]
        if all(os.path.isfile(path) for path in evals):
            (before, before_first), (after, after_first) = (_per_question(_load(path)) for path in evals)
            if questions is None:
                questions = sorted(before)
            if sorted(before) != questions or sorted(after) != questions:
                raise UserError(f"{run_dir}: its evaluations are not on the same questions as the other runs'.")
            before_table.append([before[q] for q in questions])
            after_table.append([after[q] for q in questions])
            run["accuracy_before"] = sum(before_table[-1]) / len(questions)
            run["accuracy_after"] = sum(after_table[-1]) / len(questions)
            run["mcnemar"] = mcnemar_exact([before_first[q] for q in questions], [after_first[q] for q in questions])
        per_run.append(run)
    comparison = {
        "runs": run_dirs,
        "per_run": per_run,
        "window": window,
        "reward_rise": one_sample_t_test(rises),
        "reward_auc": t_interval(aucs),  # for comparing arms (welch_t_test); no test against 0 (rewards are >= 0)
    }
    comparison["reward_rise"]["in_words"] = describe_difference(
        f"the first {window} steps",
        f"reward over the last {window} steps",
        comparison["reward_rise"]["mean"],
        comparison["reward_rise"]["p_value"],
    )
    if len(before_table) == len(run_dirs):
        test = paired_bootstrap(before_table, after_table)
        test["in_words"] = describe_difference(
            "test accuracy before training", "after training", test["difference"], test["p_value"]
        )
        comparison["accuracy_before_vs_after"] = test
    return comparison


def _test_gain(run_dir: str) -> dict | None:
    """After minus before training on the same test questions, from the two evaluations' per-question records: the
    paired bootstrap over questions (one run: the interval says what new questions would do, not a new seed) and exact
    McNemar on each question's first sample. None when either evaluation or its records are missing."""
    from qerl_repro.stats import mcnemar_exact, paired_bootstrap

    records = {}
    for name in ("eval_before", "eval_after"):
        path = os.path.join(run_dir, f"{name}.json")
        if not os.path.isfile(path):
            return None
        result = _load(path)
        if not result.get("records"):
            return None
        records[name] = {record["index"]: record for record in result["records"]}
    index = sorted(records["eval_before"])
    if sorted(records["eval_after"]) != index:
        raise ValueError(f"{run_dir}: eval_before.json and eval_after.json are not on the same test questions")
    before = [records["eval_before"][q] for q in index]
    after = [records["eval_after"][q] for q in index]
    boot = paired_bootstrap([[r["pass1"] for r in before]], [[r["pass1"] for r in after]])
    mcnemar = mcnemar_exact([r["correct"][0] for r in before], [r["correct"][0] for r in after])
    return {
        "difference": boot["difference"],
        "ci95": boot["ci"],
        "p_value": boot["p_value"],
        "num_resamples": boot["num_resamples"],
        "n": len(index),
        "mcnemar_first_sample": mcnemar,
        "noise": "paired bootstrap over questions: one training run, so a new seed's variation is not in the interval",
    }


def format_run_summary(summary: dict) -> str:
    lines = [f"Run: {summary['run_dir']}", "", "| metric | value |", "|---|---|"]

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f} %"

    for name in ("eval_before", "eval_after"):
        result = summary.get(name)
        if result:
            low, high = result.get("ci95") or (None, None)
            lines.append(
                f"| {name} accuracy (n={result.get('n')}, k={result.get('k')}) | {pct(result.get('accuracy'))} "
                f"[{pct(low)}, {pct(high)}] |"
            )
            if result.get("format_rate") or result.get("numeric_accuracy") or result.get("answer_tags_seen"):
                lines.append(
                    f"| {name} format rate / numeric accuracy | {pct(result.get('format_rate'))} / "
                    f"{pct(result.get('numeric_accuracy'))} |"
                )
    gain = summary.get("test_gain")
    if gain:
        low, high = gain["ci95"]
        p_text = f"p < {1 / gain['num_resamples']:.1g}" if gain["p_value"] == 0 else f"p = {gain['p_value']:.2g}"
        m = gain["mcnemar_first_sample"]
        lines.append(
            f"| test accuracy after - before (same {gain['n']} questions) | {100 * gain['difference']:+.1f} points, "
            f"95 % CI [{100 * low:+.1f}, {100 * high:+.1f}] ({p_text}, paired bootstrap over questions; McNemar on "
            f"first samples p = {m['p_value']:.2g}; one run, not a seed interval) |"
        )
    if "steps" in summary:
        lines.append(f"| logged steps | {summary['steps']} |")
    trend = summary.get("reward_trend")
    if trend:
        low, high = trend["difference_ci95"]
        lines.append(
            f"| reward, first {trend['first']['n']} steps -> last {trend['last']['n']} | "
            f"{trend['first']['mean']:.3f} -> {trend['last']['mean']:.3f} (diff {trend['difference']:+.3f}, "
            f"95 % CI [{low:+.3f}, {high:+.3f}], within-run noise) |"
        )
    if "step_time_median_s" in summary:
        lines.append(f"| median step time | {summary['step_time_median_s']:.1f} s |")
    noised = summary.get("per_step", {}).get("aqn/num_noised_modules")
    if noised:
        lines.append(f"| AQN noised norms per step (min-max) | {noised['min']}-{noised['max']} |")
    lost = summary.get("per_step", {}).get("sync/update_lost_frac")
    if lost:
        lines.append(f"| share of the update the engine lost (min-max) | {lost['min']:.3g}-{lost['max']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Entry point of `python -m qerl_repro.report` (run summaries, seed comparisons, and a table from any folders of
    evaluation JSONs; `make reproduce-table1` writes its own table with `qerl_repro.table1`). Returns the text."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.compare_seeds:
        comparison = compare_seed_runs(args.compare_seeds)
        text = json.dumps(comparison, indent=2)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(text + "\n")
        print(text)
        return text
    if args.summary:
        summary = run_summary(args.summary)
        with open(os.path.join(args.summary, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        text = format_run_summary(summary)
        print(text)
        return text
    entries = load_manifest(args.runs) if args.runs else discover_runs(args.results_dir)
    if not entries:
        raise SystemExit(f"No evaluation results found ({args.runs or args.results_dir}).")
    rows = build_table(entries, include_paper_rows=args.include_paper_rows)
    markdown = render_markdown(rows, command=shlex.join(["python", "-m", "qerl_repro.report", *argv]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(markdown)
    if args.json_output:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_output)), exist_ok=True)
        with open(args.json_output, "w") as f:
            json.dump([{k: v for k, v in row.items() if k != "configs"} for row in rows], f, indent=2)
    if args.plots:
        for run_dir in sorted({os.path.dirname(os.path.abspath(e.eval_path)) for e in entries}):
            state = os.path.join(run_dir, "trainer_state.json")
            if os.path.isfile(state):
                for path in plot_training_curves(state, os.path.join(run_dir, "plots")):
                    print(path)
    print(markdown)
    return markdown


if __name__ == "__main__":
    from qerl_repro.errors import run_cli

    run_cli(main)
