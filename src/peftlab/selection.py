"""The selection file: the settings sweeps chose per grid cell, read by the grids.

Entries are keyed ``model/dataset/method`` and hold the winning trial's search-space parameters with
the study and trial they came from (written by :mod:`peftlab.sweep`). Parameters apply to train.py
arguments through :func:`apply_params`, which also computes derived ones, so a LoRA alpha/r ratio
chosen at r=16 transfers to r=8 as a ratio.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

DEFAULT_SELECTION_FILE = "configs/selected.yaml"
DERIVED = {"lora_alpha_per_r": ("lora_alpha", "lora_r")}  # space key -> (argument it sets, argument it scales)


def cell_key(cell: dict) -> str:
    return f"{cell['model']}/{cell['dataset']}/{cell['method']}"


def apply_params(args: dict, params: dict) -> dict:
    """train.py arguments with a trial's (or a selection's) parameters, derived ones computed."""
    merged = {**args, **{k: v for k, v in params.items() if k not in DERIVED}}
    for name, (target, scale) in DERIVED.items():
        if name in params:
            merged[target] = params[name] * merged.get(scale, 8)
    return merged


def read_selection(path: str | Path) -> dict:
    """``{cell key: entry}``; empty while no sweep has written the file."""
    with contextlib.suppress(FileNotFoundError):
        return yaml.safe_load(Path(path).read_text()) or {}
    return {}
