"""The one Markdown table writer behind every generated table (results, report, benchmarks, memory), and its
reader (the report quotes cells of the generated tables)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` rows under a header and its ``|---|---|`` rule, newline-terminated."""
    lines = [_row(header), "|" + "---|" * len(header)] + [_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def read_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table in Markdown ``text`` laid out as :func:`table` writes them: (header, rows of cells)."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if i and line.startswith("|---") and lines[i - 1].startswith("|"):
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            tables.append((_cells(lines[i - 1]), rows))
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
