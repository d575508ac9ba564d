# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Model card extras, Hub push and merged exports of a QeRL run.

- `build_model_card_extras(...)`: markdown appended to the card TRL writes (`trainer.create_model_card()` writes
  `README.md` in `output_dir` from `trl/templates/lm_model_card.md` and has no hook for extra sections, so the text is
  appended afterwards; `append_model_card_extras` does it idempotently): the command to reproduce, the
  hyperparameters with the quantization format and the AQN schedule, and GSM8K results with n, k and 95 % CIs.
- `push_folder_to_hub(folder, repo_id, ...)`: one commit holding exactly the files `upload_file_list(folder)` lists
  (the folder minus `checkpoint-*` by default). Offline mode, no token or no network raise a `RuntimeError` that says
  where the local copy is; the local folder is only read, never changed.
- `export_merged(adapter_dir, base_model, output_dir, fmt=...)`: merge a LoRA adapter (PEFT `merge_and_unload` in
  fp32) and save bf16 / fp32 weights, or NVFP4 / MXFP4 compressed-tensors weights for vLLM on GPUs.
"""

import enum
import fnmatch
import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "EXPORT_FORMATS",
    "HubUnreachableError",
    "append_model_card_extras",
    "build_model_card_extras",
    "export_merged",
    "launch_command",
    "pushed_repo_id",
    "push_folder_to_hub",
    "upload_file_list",
]

PAPER_URL = "https://huggingface.co/papers/2510.11696"
CARD_BEGIN = "<!-- qerl_repro: begin -->"
CARD_END = "<!-- qerl_repro: end -->"
DEFAULT_IGNORE_PATTERNS = ("checkpoint-*", ".git/*", ".cache/*")
"""Not uploaded by default: intermediate checkpoints (optimizer states) and VCS / cache folders."""
EXPORT_FORMATS = ("bf16", "fp32", "nvfp4", "mxfp4")


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def _get(obj, name, default=None):
    return getattr(obj, name, default) if obj is not None else default


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "–"
    return str(value)


COMMAND_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
)
"""Environment variables that change what a run does (`make demo` sets the last four); `launch_command` shows the
ones that are set."""
# Set by `accelerate launch` in the processes it starts (accelerate/utils/launch.py), not by Accelerator itself.
_ACCELERATE_LAUNCH_ENV = ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")


def _parent_argv() -> list[str] | None:
    """The command line of the parent process (Linux `/proc`), or None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg] or None


def _accelerate_launch_args(parent_argv: Sequence[str] | None) -> list[str] | None:
    """What followed `accelerate launch` (or `python -m accelerate.commands.launch`) in `parent_argv`, or None."""
    parent_argv = list(parent_argv or [])
    for i, arg in enumerate(parent_argv):
        if os.path.basename(arg) == "accelerate" and parent_argv[i + 1 : i + 2] == ["launch"]:
            return parent_argv[i + 2 :]
        if arg == "accelerate.commands.accelerate_cli" and parent_argv[i + 1 : i + 2] == ["launch"]:
            return parent_argv[i + 2 :]
        if arg == "accelerate.commands.launch":
            return parent_argv[i + 1 :]
    return None


def launch_command(argv=None, environ=None, parent_argv=None) -> str:
    """The command line that started this run, as far as it can be observed (for "Command to reproduce").

    `accelerate launch` starts the script in a child process (directly, or through torchrun's agent in the same
    process) and passes its own options (`--config_file`, `--num_processes`, ...) to no one: they are read from the
    parent's command line (`/proc/<ppid>/cmdline`) when its tail is this process's `sys.argv`. When the process was
    started by accelerate (its launcher's environment variables are set) but the parent's command line cannot be read,
    the command says so instead of guessing the options. Otherwise: `python` + `sys.argv`. The variables of
    `COMMAND_ENV_VARS` that are set are prefixed.

    Args:
        argv / environ / parent_argv (*optional*): default to `sys.argv`, `os.environ` and the parent's command line.

    Returns:
        `str`: a shell command line (one line, or a comment line and the command).
    """
    argv = list(sys.argv if argv is None else argv)
    environ = os.environ if environ is None else environ
    env = " ".join(f"{name}={shlex.quote(environ[name])}" for name in COMMAND_ENV_VARS if name in environ)
    prefix = f"{env} " if env else ""
    launch_args = _accelerate_launch_args(_parent_argv() if parent_argv is None else parent_argv)
    if launch_args is not None:
        script_args = argv[1:]
        tail_matches = not script_args or launch_args[-len(script_args) :] == script_args
        names_script = argv[0] in launch_args or "-m" in launch_args or "--module" in launch_args
        if tail_matches and names_script:
            return f"{prefix}accelerate launch {shlex.join(launch_args)}"
    if any(name in environ for name in _ACCELERATE_LAUNCH_ENV):
        return (
            "# started by `accelerate launch`, whose own options (e.g. --config_file) could not be read\n"
            f"{prefix}accelerate launch {shlex.join(argv)}"
        )
    return f"{prefix}python {shlex.join(argv)}"


def _command_text(command) -> str:
    if command is None:
        return launch_command()
    if isinstance(command, str):
        return command
    return shlex.join(list(command))


def pushed_repo_id(training_args) -> str:
    """The Hub repository a push of this run goes to: `hub_model_id`, else the output folder's name (what
    transformers' `Trainer` uses; the Hub adds the user's namespace)."""
    hub_model_id = _get(training_args, "hub_model_id")
    if hub_model_id:
        return hub_model_id
    return os.path.basename(os.path.abspath(_get(training_args, "output_dir") or "."))


def _dataset_text(script_args) -> str:
    name, config, path = (_get(script_args, k) for k in ("dataset_name", "dataset_config", "dataset_path"))
    hub = f"[{name}](https://huggingface.co/datasets/{name})" + (f" ({config})" if config else "") if name else None
    if path and hub:
        return f"{hub}, read from a local copy at `{path}`"
    return hub or (f"local files at `{path}`" if path else "–")


def _is_eval_result(value) -> bool:
    return isinstance(value, Mapping) and "accuracy" in value


def _eval_rows(eval_results) -> list[tuple[str, Mapping]]:
    if eval_results is None:
        return []
    if _is_eval_result(eval_results):
        return [("GSM8K", eval_results)]
    return [(str(name), result) for name, result in eval_results.items() if _is_eval_result(result)]


def _percent(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _eval_section(eval_results) -> list[str]:
    from qerl_repro.report import eval_sampling

    rows = _eval_rows(eval_results)
    if not rows:
        return []
    lines = [
        "### GSM8K evaluation",
        "",
        "pass@1 in %, mean over k samples per question; 95 % confidence interval over the n questions (Wilson for "
        "k = 1, normal approximation on per-question means for k > 1; `qerl_repro.evaluation`). The LoRA adapter is "
        "applied (QeRL's own `eval/gsm8k.py` never applied it).",
        "",
        "| Evaluation | pass@1 | 95 % CI | n | k | numeric-match | format rate | criterion | sampling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in rows:
        ci = result.get("ci95")
        ci_text = f"[{_percent(ci[0])}, {_percent(ci[1])}]" if ci else "–"
        config = result.get("config") or {}
        sampling = eval_sampling(config)
        if sampling.get("greedy"):
            sampling_text = f"greedy, {sampling.get('max_new_tokens')} tokens"
        elif sampling:
            sampling_text = (
                f"T={sampling.get('temperature')}, top-p={sampling.get('top_p')}, {sampling.get('max_new_tokens')} "
                "tokens"
            )
        else:
            sampling_text = "–"
        lines.append(
            f"| {name} | {_percent(result.get('accuracy'))} | {ci_text} | {_fmt(result.get('n'))} | "
            f"{_fmt(result.get('k', sampling.get('num_samples')))} | {_percent(result.get('numeric_accuracy'))} | "
            f"{_percent(result.get('format_rate'))} | {config.get('criterion') or config.get('reward') or '–'} | "
            f"{sampling_text} |"
        )
    return lines + [""]


def _rin_lines(training_args) -> list[str]:
    """RIN (`aqn_rin`): the per-block sigma multipliers from the SRDD JSON, as the trainer computed them."""
    mode = _get(training_args, "aqn_rin", "none")
    if mode in (None, "none"):
        return []
    from qerl_repro.rin import rin_plan_from_config

    plan = rin_plan_from_config(training_args)
    multipliers = ", ".join(f"{value:.4g}" for value in plan.block_multipliers)
    return [
        f"RIN `{mode}` (the seed studies' SRDD-guided AQN, `qerl_repro.rin`): each decoder block's σ is multiplied "
        f"by its factor, from the SRDD scan `{plan.srdd}` ({plan.srdd_format}); blocks 0..{len(plan.block_multipliers) - 1}: "
        f"[{multipliers}]; final norm (if noised): {plan.final_norm_multiplier:g}.",
        "",
    ]


def _aqn_section(training_args, total_steps) -> list[str]:
    lines = ["### Adaptive Quantization Noise (AQN)", ""]
    if not _get(training_args, "aqn", False):
        return lines + ["AQN off: the rollout engine's RMSNorm weights receive no noise.", ""]
    from qerl_repro.noise import aqn_schedule_table

    sigma_start = _get(training_args, "aqn_sigma_start", 1e-2)
    sigma_end = _get(training_args, "aqn_sigma_end", 5e-4)
    num_stages = _get(training_args, "aqn_num_stages", 10)
    schedule = _get(training_args, "aqn_schedule", "qerl_code")
    decay = _get(training_args, "aqn_decay", "exponential")
    lines += [
        f"Gaussian noise N(0, σ²) added to the rollout engine's RMSNorm weights after every weight sync ([QeRL]"
        f"({PAPER_URL}) §3.3): σ from {sigma_start:g} to {sigma_end:g} over K = {num_stages} stages, schedule "
        f"`{schedule}` (`qerl_code`: QeRL's released code, exponent (k-1)/(K-2); `paper`: Eq. 8, (k-1)/(K-1)); "
        "stage 0 is noise-free.",
        "",
    ]
    lines += _rin_lines(training_args)
    variant, epoch_aware = _get(training_args, "aqn_variant", "weight"), _get(training_args, "aqn_epoch_aware", False)
    if decay != "exponential" or variant != "weight" or epoch_aware:
        lines += [
            f"Variants: `{decay}` decay through the stages; "
            + (
                "noise added to the hidden state after each targeted RMSNorm (`aqn_variant=activation`), fresh per "
                "token and forward pass, instead of to the norm weights; "
                if variant == "activation"
                else ""
            )
            + (
                "the schedule restarts every epoch (`aqn_epoch_aware`: the table below is one schedule over all the "
                "steps; each epoch runs it over its own steps instead)."
                if epoch_aware
                else "one schedule over the run."
            ),
            "",
        ]
    if not total_steps or total_steps < 1:
        return lines + ["The per-step schedule depends on the total number of optimizer steps (unknown here).", ""]
    lines += [
        "Steps are `trainer.state.global_step` at the rollout (0 = the first one).",
        "",
        "| stage | optimizer steps | σ |",
        "|---|---|---|",
    ]
    for row in aqn_schedule_table(total_steps, sigma_start, sigma_end, num_stages, schedule, decay):
        lines.append(f"| {row['stage']} | {row['first_step']}–{row['last_step']} | {row['sigma']:.3g} |")
    return lines + [""]


def build_model_card_extras(
    script_args,
    training_args,
    model_args,
    eval_results=None,
    command=None,
    total_steps: int | None = None,
) -> str:
    """Markdown to append to TRL's model card: command, hyperparameters, AQN schedule and GSM8K results.

    Args:
        script_args / training_args / model_args: the recipe's `QeRLScriptArguments`, `QeRLConfig` and TRL
            `ModelConfig` (any objects with those attribute names; missing ones are shown as "–").
        eval_results (*optional*): one `evaluate_gsm8k` result, or a mapping `{name: result}` (e.g.
            `{"eval_before": ..., "eval_after": ...}`); each result needs `accuracy` and may have `ci95`, `n`, `k`,
            `numeric_accuracy`, `format_rate`, `config`.
        command (*optional*): the command line (a string or an argv list). Defaults to `launch_command()`.
        total_steps (*optional*): total optimizer steps for the AQN table; defaults to `training_args.max_steps`.

    Returns:
        `str`: markdown wrapped in `<!-- qerl_repro: begin/end -->` markers (see `append_model_card_extras`).
    """
    from qerl_repro.models import describe_base_model

    if total_steps is None:
        max_steps = _get(training_args, "max_steps", -1)
        total_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
    world_size = 1
    try:
        world_size = int(_get(training_args, "world_size", 1) or 1)
    except Exception:  # noqa: BLE001 - the property needs an initialised accelerator state
        world_size = 1
    per_device = _get(training_args, "per_device_train_batch_size")
    grad_accum = _get(training_args, "gradient_accumulation_steps", 1)
    completions_per_step = per_device * grad_accum * world_size if per_device else None
    quant_format = _get(training_args, "quant_format", "none")
    if quant_format == "mxfp4":
        quant_format = f"mxfp4 (scale mode {_get(training_args, 'mxfp4_scale_mode', 'even')})"

    def train(*names) -> str:
        return " / ".join(_fmt(_get(training_args, name)) for name in names)

    def lora(*names) -> str:
        return " / ".join(_fmt(_get(model_args, name)) for name in names)

    use_peft = _get(model_args, "use_peft")
    prefill = _get(script_args, "assistant_prefill")
    dataset = _dataset_text(script_args)
    rows = [
        ("base model", describe_base_model(_get(model_args, "model_name_or_path"))[1]),
        ("base quantization", quant_format),
        ("model dtype", _get(model_args, "dtype")),
        ("LoRA r / alpha / dropout", lora("lora_r", "lora_alpha", "lora_dropout") if use_peft else "off (full)"),
        ("LoRA target modules", lora("lora_target_modules") if use_peft else None),
        ("LoRA modules_to_save", lora("lora_modules_to_save") if use_peft else None),
        ("dataset", dataset),
        ("training questions (limit)", _get(script_args, "train_limit") or "all"),
        ("reward functions", _get(script_args, "reward_funcs")),
        ("reward weights", _get(training_args, "reward_weights") or "equal"),
        ("assistant prefill", repr(prefill) if prefill else None),
        ("optimizer steps", total_steps or f"{_get(training_args, 'num_train_epochs')} epochs"),
        ("learning rate / scheduler", train("learning_rate", "lr_scheduler_type")),
        ("warm-up ratio / steps", train("warmup_ratio", "warmup_steps")),
        ("optimizer / weight decay / max grad norm", train("optim", "weight_decay", "max_grad_norm")),
        ("completions per step (per device × accumulation × processes)", completions_per_step),
        ("generations per prompt G", _get(training_args, "num_generations")),
        ("max completion length", _get(training_args, "max_completion_length")),
        ("rollout temperature / top-p", train("temperature", "top_p")),
        ("loss type / beta (KL)", train("loss_type", "beta")),
        ("clip epsilon low / high", train("epsilon", "epsilon_high")),
        ("policy updates per generation μ", _get(training_args, "num_iterations")),
        ("vLLM rollouts / mode", train("use_vllm", "vllm_mode")),
        ("vLLM importance-sampling correction", _get(training_args, "vllm_importance_sampling_correction")),
        ("seed", _get(training_args, "seed")),
    ]
    lines = [
        CARD_BEGIN,
        "## QeRL reproduction",
        "",
        f"Trained with `qerl_repro`, a reproduction of [QeRL]({PAPER_URL}) (GRPO + LoRA on a 4-bit frozen base with "
        "Adaptive Quantization Noise) on TRL.",
        "",
        "### Command to reproduce",
        "",
        "```bash",
        _command_text(command),
        "```",
        "",
        "### Hyperparameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in rows],
        "",
        *_aqn_section(training_args, total_steps),
        *_eval_section(eval_results),
        CARD_END,
    ]
    return "\n".join(lines) + "\n"


def append_model_card_extras(path: str, extras: str) -> str:
    """Add `extras` (from `build_model_card_extras`) to a model card, replacing an earlier qerl_repro section.

    `path` is the card (`README.md`) or the folder holding it; a missing card is created. Returns the card's path.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin >= 0 and end > begin:
        text = text[:begin].rstrip("\n") + "\n\n" + text[end + len(CARD_END) :].lstrip("\n")
    text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + extras.rstrip("\n") + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------------


class HubUnreachableError(RuntimeError):
    """The Hugging Face Hub cannot be reached (offline mode, no network or no token); the local copy is intact."""


def upload_file_list(folder: str, ignore_patterns: Sequence[str] | None = DEFAULT_IGNORE_PATTERNS) -> list[str]:
    """The files `push_folder_to_hub` uploads: every file under `folder` (POSIX paths relative to it, sorted) except
    those matching `ignore_patterns` (`fnmatch`, where `*` also matches `/`)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Nothing to push: {folder!r} is not a folder")
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in ignore_patterns or ()):
                files.append(relative)
    if not files:
        raise FileNotFoundError(f"Nothing to push: {folder!r} holds no file outside {list(ignore_patterns or ())}")
    return sorted(files)


def _unreachable(folder: str, repo_id: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"Cannot push to the Hugging Face Hub repository {repo_id!r}: {reason}. Nothing was uploaded and the local "
        f"copy is unchanged at {os.path.abspath(folder)}; push it later from a machine with Hub access, e.g. "
        f"`python -c \"from qerl_repro.hub import push_folder_to_hub; push_folder_to_hub('{folder}', '{repo_id}')\"` "
        f"or `hf upload {repo_id} {folder}`."
    )


def push_folder_to_hub(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload QeRL reproduction (qerl_repro)",
    revision: str | None = None,
    ignore_patterns: Sequence[str] | None = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it in one commit; returns the commit URL.

    What is uploaded is exactly `upload_file_list(folder, ignore_patterns)`, each file under its relative path, so
    checking the local folder checks the upload. The folder is only read.

    Raises:
        FileNotFoundError: `folder` is missing or empty.
        HubUnreachableError (a `RuntimeError`): offline mode (`HF_HUB_OFFLINE=1`), no token, or no connection to the
            Hub; the message names the local copy.
        RuntimeError: the Hub refused the request (e.g. 401/403: the token cannot write to `repo_id`).
    """
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not repo_id:
        raise ValueError("push_folder_to_hub needs a repo_id (`--hub_model_id <user>/<name>`)")
    files = upload_file_list(folder, ignore_patterns)
    if constants.is_offline_mode():
        raise _unreachable(folder, repo_id, "offline mode is on (HF_HUB_OFFLINE=1)")
    token = token or get_token()
    if not token:
        raise _unreachable(folder, repo_id, "no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    api = HfApi(endpoint=endpoint, token=token)
    local = os.path.abspath(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(local, name)) for name in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model"
        )
    except (OfflineModeIsEnabled, httpx.TransportError, ConnectionError, TimeoutError) as exc:
        raise _unreachable(folder, repo_id, f"the Hub is unreachable ({type(exc).__name__}: {exc})") from exc
    except HfHubHTTPError as exc:
        raise RuntimeError(
            f"The Hub refused the push to {repo_id!r} ({exc}). The local copy is unchanged at {local}."
        ) from exc
    logger.info("Pushed %d files from %s to %s", len(files), local, info.commit_url)
    return info.commit_url


# ----------------------------------------------------------------------------------------------------------------------
# Merged exports
# ----------------------------------------------------------------------------------------------------------------------


def export_merged(
    adapter_dir: str,
    base_model: str | None,
    output_dir: str,
    *,
    fmt: str = "bf16",
    base_quant_format: str | None = None,
    allow_quant_format_mismatch: bool = False,
) -> str:
    """Merge a LoRA adapter into its base (PEFT `merge_and_unload` in fp32) and save a servable model.

    Args:
        adapter_dir: the PEFT adapter folder (a training `output_dir`).
        base_model: the base model path, Hub id or `"smollm2"`; None reads `base_model_name_or_path` from the adapter.
        output_dir: where to write the merged model, its tokenizer and `qerl_export.json` (provenance).
        fmt: `"bf16"` (default) or `"fp32"` weights; `"nvfp4"` / `"mxfp4"`: the merged weights cast to bf16, quantized
            with `qerl_repro.quantization.base.quantize_model_` and written as a compressed-tensors checkpoint
            (`qerl_repro.quantization.export.save_compressed_tensors`; vLLM serves it on GPUs).
        base_quant_format: the base the adapter was trained on; None (default) reads it (and the MXFP4 scale mode)
            from the training run's `training_args.bin` / `recipe.yaml` beside the adapter
            (`qerl_repro.loading.resolve_base_format`), `"none"` when nothing is recorded. `"nvfp4"` / `"mxfp4"` /
            `"nf4"` merge into the dequantized 4-bit base (`qerl_repro.loading.load_dequantized_base`), which is the
            policy the training rollouts sampled from (dequant(Q(W)) + BA); a format contradicting the record is an
            error unless `allow_quant_format_mismatch`. Re-quantizing a merged model (`fmt="nvfp4"`) quantizes
            W + BA: close to, not equal to, the trained policy.

    Returns:
        `str`: `output_dir`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qerl_repro.loading import (
        inspect_adapter,
        load_dequantized_base,
        resolve_base_format,
        resolve_model_and_adapter,
    )

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of {list(EXPORT_FORMATS)}")
    if base_model is None:
        base_path, adapter_dir = resolve_model_and_adapter(adapter_dir)
    else:
        base_path, adapter_dir = resolve_model_and_adapter(base_model, adapter_dir)
    adapter_info = inspect_adapter(adapter_dir)
    tokenizer_dir = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # QeRL: a quantized base cannot hold a merged LoRA; merge in fp32 into the high-precision (or dequantized) base.
    base_quant_format, mxfp4_scale_mode = resolve_base_format(
        adapter_dir,
        base_quant_format,
        allow_quant_format_mismatch,
        format_option="base_quant_format",
        override_option="allow_quant_format_mismatch=True",
        action="export",
    )
    scale_kwargs = {"mxfp4_scale_mode": mxfp4_scale_mode} if mxfp4_scale_mode else {}
    model = load_dequantized_base(base_path, base_quant_format, dtype=torch.float32, **scale_kwargs)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    os.makedirs(output_dir, exist_ok=True)
    if fmt in ("bf16", "fp32"):
        model = model.to(torch.bfloat16 if fmt == "bf16" else torch.float32)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    else:
        try:
            from qerl_repro.quantization.base import quantize_model_
            from qerl_repro.quantization.export import save_compressed_tensors
        except ImportError as exc:
            raise NotImplementedError(
                f"fmt={fmt!r} needs qerl_repro.quantization.export.save_compressed_tensors, which is not available "
                f"({exc}); export fmt='bf16' instead"
            ) from exc
        model = model.to(torch.bfloat16)
        quantize_model_(model, fmt, **(scale_kwargs if fmt == "mxfp4" else {}))
        save_compressed_tensors(model, output_dir, tokenizer=tokenizer)
    with open(os.path.join(output_dir, "qerl_export.json"), "w") as f:
        json.dump(
            {
                "format": fmt,
                "base_model": base_path,
                "base_quant_format": base_quant_format,
                "mxfp4_scale_mode": mxfp4_scale_mode,
                "merge": "peft merge_and_unload in fp32",
                "adapter": adapter_info,
            },
            f,
            indent=2,
        )
    logger.info("Merged %s into %s and saved %s weights to %s", adapter_dir, base_path, fmt, output_dir)
    return output_dir
