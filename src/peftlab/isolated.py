"""Run a measurement in a fresh Python process, so its peak memory and warm-up are its own."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from .errors import USER_ERROR_EXIT_CODE, UserError, exit_on_user_error, user_error_message

_RESULT = "PEFTLAB_RESULT "


def call_in_fresh_process(target: str, **kwargs):
    """``module:function`` called with JSON-able ``kwargs`` in a new interpreter; returns its JSON result. A
    :class:`UserError` there (a model name that loads nothing) is raised here as one, with its message."""
    done = subprocess.run([sys.executable, "-c", "from peftlab.isolated import _call; _call()", target,
                           json.dumps(kwargs)], capture_output=True, text=True)
    message = user_error_message(done.stderr) if done.returncode == USER_ERROR_EXIT_CODE else None
    if message is not None:
        raise UserError(message)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT) and not done.returncode:
            return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"{target}({kwargs}) failed:\n{done.stderr[-3000:]}")


def _call() -> None:
    """The fresh process's side: ``sys.argv`` is ``[-c, target, kwargs as JSON]``."""
    module, function = sys.argv[1].split(":")
    result = exit_on_user_error(lambda: getattr(importlib.import_module(module), function)(**json.loads(sys.argv[2])))
    print(_RESULT + json.dumps(result), flush=True)
