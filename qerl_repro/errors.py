# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Errors in what a user asked for, and how command-line entry points report them.

A `UserError` is a mistake in the command (a model folder that does not exist, options that contradict each other):
the message says what is wrong and what to do. Command-line entry points print it as one line, `error: <message>`,
and exit with status 1, without a traceback (`run_cli`). Anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable
from typing import TypeVar


__all__ = ["UserError", "run_cli"]

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in the command or arguments; CLIs print the message as one line instead of a traceback."""


def run_cli(main: Callable[..., T], *args, **kwargs) -> T:
    """Call a CLI `main`; on a `UserError`, print `error: <message>` (one line) to stderr and exit with status 1."""
    try:
        return main(*args, **kwargs)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message's layout
        sys.exit(f"error: {message}")
