"""Errors a user can act on, and the one place that turns them into a clean exit.

A command-line entry point runs inside :func:`exit_on_user_error`: a :class:`UserError` (a bad name,
value or file, or a run that diverged) prints one line to stderr and exits non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
USER_ERROR_EXIT_CODE = 2
USER_ERROR_PREFIX = "error: "


class UserError(Exception):
    """Something the user can fix: printed as one line, without a traceback."""


class InvalidArgument(UserError, ValueError):
    """A value that makes no sense, or a name that names nothing."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class ModelNotFound(UserError, OSError):
    """A model name that neither resolves offline nor loads from the hub."""


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became inf or NaN (too high a learning rate, or weights that hold inf/NaN)."""


def exit_on_user_error(function: Callable[[], T]) -> T:
    """``function()``; a :class:`UserError` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        return function()
    except UserError as err:
        print(USER_ERROR_PREFIX + " ".join(str(err).split()), file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


def user_error_message(output: str) -> str | None:
    """The message of the ``error:`` line that a process stopped by :func:`exit_on_user_error` printed last in
    ``output`` (its stderr), or None."""
    return next((line[len(USER_ERROR_PREFIX):] for line in reversed(output.splitlines())
                 if line.startswith(USER_ERROR_PREFIX)), None)
