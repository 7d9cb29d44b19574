"""Run a measurement in a fresh Python process, so its peak memory and warm-up are its own."""

from __future__ import annotations

import json
import subprocess
import sys

_MARK = "PEFTLAB_RESULT "


def call_in_fresh_process(target: str, **kwargs):
    """``module:function`` called with JSON-able ``kwargs`` in a new interpreter; returns its JSON result."""
    module, function = target.split(":")
    code = (f"import json, sys; from {module} import {function}; "
            f"print({_MARK!r} + json.dumps({function}(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"{target}({kwargs}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_MARK):])
