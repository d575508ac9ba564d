# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""User errors on the command line: one `error: ...` line on stderr, a non-zero exit code, no traceback."""

import os
import subprocess
import sys

import pytest

import qerl_repro


REPO = os.path.dirname(os.path.dirname(os.path.abspath(qerl_repro.__file__)))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_one_error_line(process: subprocess.CompletedProcess, *expected: str) -> str:
    assert process.returncode != 0
    assert "Traceback" not in process.stderr
    # Libraries print import-time warnings to stderr; ours is the single line starting with "error:".
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, process.stderr
    for text in expected:
        assert text in errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "/no/such/model"], ["no such model folder: /no/such/model"]),  # the Hub's "Repo id must be ..."
        (["--model", "./no_such_run"], ["no such model folder: ./no_such_run"]),  # a relative path, same
        (["--model", "no_such_org/no_such_model"], ["no such model folder: no_such_org/no_such_model"]),  # Hub-shaped
        (["--model", "smollm2", "--adapter", "/no/such/adapter"], ["--adapter /no/such/adapter: no such folder"]),
    ],
)
def test_evaluation_cli_user_errors(args, expected):
    process = _run(["-m", "qerl_repro.evaluation", *args, "--backend", "hf", "--limit", "2"])
    line = _assert_one_error_line(process, *expected)
    assert "Repo id must be" not in line
    assert process.stdout == ""


def test_recipe_nonexistent_model_path():
    # qerl_repro.grpo (every recipe) resolves the model through qerl_repro.models, as the evaluation does.
    config = os.path.join("recipes", "SmolLM2-135M-Instruct", "gsm8k_nvfp4_aqn.yaml")
    process = _run(["recipes/gsm8k_nvfp4_aqn.py", "--config", config, "--model_name_or_path", "/no/such/model"])
    _assert_one_error_line(process, "no such model folder: /no/such/model")


def test_quantization_report_nonexistent_model_path():
    process = _run(["-m", "qerl_repro.quantization.report", "--model", "/no/such/model", "--format", "nvfp4"])
    _assert_one_error_line(process, "no such model folder: /no/such/model")
