"""The one Markdown table writer behind every generated table (results, report, benchmarks, memory)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` rows under a header and its ``|---|---|`` rule, newline-terminated."""
    lines = [_row(header), "|" + "---|" * len(header)] + [_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
