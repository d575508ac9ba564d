# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""qerl_repro: a faithful, verified Hugging Face-native reproduction of QeRL (arXiv 2510.11696).

`QeRLConfig` and `QeRLTrainer` are imported lazily (TRL is heavy to import).
"""

__version__ = "0.1.0"
__all__ = ["QeRLConfig", "QeRLTrainer"]


def __getattr__(name):
    if name == "QeRLConfig":
        from qerl_repro.config import QeRLConfig

        return QeRLConfig
    if name == "QeRLTrainer":
        from qerl_repro.trainer import QeRLTrainer

        return QeRLTrainer
    raise AttributeError(f"module 'qerl_repro' has no attribute {name!r}")
