"""Parsing dataclass arguments the Hugging Face way, with bad values reported as user errors."""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from .errors import InvalidArgument


def parse_dataclasses(types: tuple[type, ...], argv: list[str] | None = None) -> tuple:
    """The command line, or one JSON/YAML file holding the same keys. A value the dataclasses' own checks
    refuse (``__post_init__``, ``TrainingArguments``' rules) is the user's to fix: :class:`InvalidArgument`."""
    parser = HfArgumentParser(types)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(argv[0])
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(argv[0])
        return parser.parse_args_into_dataclasses(argv)
    except FileNotFoundError as err:
        raise InvalidArgument(f"no such arguments file: {err.filename}") from None
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def parse_dict(types: tuple[type, ...], args: dict) -> tuple:
    """The dataclasses from a dict of the same keys (a sweep trial's arguments), checked the same way."""
    try:
        return HfArgumentParser(types).parse_dict(args)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def switch(text: str) -> bool:
    """An argparse ``type``: 0 or 1, as False or True (argparse prints the error, no traceback)."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return text == "1"


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (argparse prints the error, no traceback)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value
