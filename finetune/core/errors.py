"""User-facing errors: a short message and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

# Exit code for bad input (config, data, paths), as argparse uses for usage errors.
EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""


class ConfigError(UserError):
    """One or more problems in the config, all reported together."""

    def __init__(self, problems: list[str], footer: str = "Run with --help to list every key."):
        self.problems = problems
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in the config:"]
        lines += [f"  - {p}" for p in problems]
        if footer:
            lines.append(footer)
        super().__init__("\n".join(lines))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_rank_zero() -> bool:
    """True on the global main process; readable before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def exit_on_user_error(main: F) -> F:
    """Turn a UserError raised by `main` into `error: ...` on stderr and exit code 2.

    Every process of a multi-process launch detects the same bad input; only rank 0 prints it.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if is_rank_zero():
                print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper  # type: ignore[return-value]
