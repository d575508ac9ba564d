# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Post-install check: the pinned stack imports together (``python -m qerl_repro.env_check``)."""

import importlib
import sys


REQUIRED = [
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "vllm",
    "compressed_tensors",
    "bitsandbytes",
]


def main() -> int:
    versions = {}
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every import failure with its cause
            print(f"qerl_repro env check: cannot import {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        versions[name] = getattr(module, "__version__", "?")
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        print("qerl_repro env check: trl does not see vllm as available", file=sys.stderr)
        return 1
    print("qerl_repro env check OK: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
