# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures. Everything is built locally: the Hub is unreachable on CI machines."""

import os


# Set before anything imports huggingface_hub / vllm.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from qerl_repro.testing import build_tiny_qwen2  # noqa: E402


@pytest.fixture
def tmp_dir(tmp_path):
    """TRL-style temporary directory (a str, like `TrlTestCase.tmp_dir`)."""
    return str(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint + locally trained tokenizer, saved once per session (read-only for tests)."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_qwen2(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_bf16_model_dir(tmp_path_factory):
    """The same tiny Qwen2 saved in bf16: the dtype users train and serve in (the vLLM engine runs it in bf16)."""
    path = tmp_path_factory.mktemp("tiny_qwen2_bf16")
    build_tiny_qwen2(str(path), dtype=torch.bfloat16)
    return str(path)
