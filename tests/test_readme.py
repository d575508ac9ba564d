# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Every command the README documents is exercised: make targets dry-run, CLIs run or parse, files exist."""

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme() -> str:
    with open(README) as f:
        return f.read()


def _shell_commands() -> list[str]:
    """Commands in ```bash blocks (continuation lines joined, comments dropped) and in `inline code`."""
    text = _readme()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    commands += re.findall(r"`((?:make|python -m|accelerate launch) [^`]+)`", text)
    return commands


def _make_targets() -> list[str]:
    return sorted(set(re.findall(r"\bmake ([a-z][a-z0-9_-]*)", _readme())))


def _python_m_commands() -> list[tuple[str, ...]]:
    # A bare module mention ("see `python -m qerl_repro.evaluation`") is exercised as `--help`.
    argvs = {tuple(shlex.split(c)[2:]) for c in _shell_commands() if c.startswith("python -m ")}
    return sorted({argv if len(argv) > 1 else (argv[0], "--help") for argv in argvs})


def _accelerate_commands() -> list[list[str]]:
    return [shlex.split(c) for c in _shell_commands() if c.startswith("accelerate launch ")]


def test_readme_documents_the_two_setup_commands():
    assert {"demo", "test"} <= set(_make_targets())
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()  # CI runs the README's test command


@pytest.mark.parametrize("target", _make_targets())
def test_make_target_exists_and_expands(target):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Dry run: the target exists and its recipe expands (variables such as MODEL given as the README shows them).
    result = subprocess.run(
        ["make", "-n", target, "MODEL=smollm2", "ADAPTER=runs/demo"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert re.search(rf"^\.PHONY:.*\b{re.escape(target)}\b", f.read(), flags=re.MULTILINE)


@pytest.mark.parametrize("argv", _python_m_commands(), ids=" ".join)
def test_python_m_command_runs(argv, tmp_path, monkeypatch):
    module, args = argv[0], list(argv[1:])
    importlib.import_module(module)
    # Run it for real from a scratch folder holding what the command reads (runs/demo = the committed demo results).
    if any(a.startswith("runs/") for a in args):
        for run in {a for a in args if a.startswith("runs/")}:
            shutil.copytree(os.path.join(ROOT, "results", run.removeprefix("runs/")), tmp_path / run)
    for folder in {a for a in args if a.startswith("results/") and os.path.isdir(os.path.join(ROOT, a))}:
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder)
    if "--output" in args:
        args[args.index("--output") + 1] = str(tmp_path / "out.json")
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("argv", _accelerate_commands(), ids=lambda a: " ".join(a[2:6]))
def test_accelerate_command_parses(argv):
    from qerl_repro.grpo import make_parser

    config_file = argv[argv.index("--config_file") + 1]
    recipe = next(a for a in argv if a.startswith("recipes/") and a.endswith(".py"))
    assert os.path.isfile(os.path.join(ROOT, config_file)) and os.path.isfile(os.path.join(ROOT, recipe))
    overrides = argv[argv.index(recipe) + 1 :]
    overrides[overrides.index("--config") + 1] = os.path.join(ROOT, overrides[overrides.index("--config") + 1])
    # The YAML and every flag are valid for the recipe's parser (use_cpu only because this machine has no GPU).
    script_args, training_args, _ = make_parser().parse_args_and_config(args=[*overrides, "--use_cpu", "true"])
    assert training_args.max_steps > 0 and script_args.dataset_name


def test_vllm_serve_worker_extension_resolves():
    commands = [c for c in _shell_commands() if "--worker-extension-cls" in c]
    assert commands
    for command in commands:
        path = shlex.split(command)[shlex.split(command).index("--worker-extension-cls") + 1]
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name)


def test_every_test_the_readme_names_exists():
    """`tests/test_x.py::name` in the README: the file exists and defines that class or function."""
    references = re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", _readme())
    assert references
    for filename, name in references:
        path = os.path.join(ROOT, "tests", filename)
        assert os.path.isfile(path), filename
        if name:
            with open(path) as f:
                assert re.search(rf"^\s*(def|class) {name}\b", f.read(), flags=re.MULTILINE), f"{filename}::{name}"
