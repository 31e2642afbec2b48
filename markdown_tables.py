"""Markdown tables: the one way the project writes them (run reports, audit, CLI output).

Standard library only: it is at the bottom of the import layers, beside `errors` and `checksums`,
so every package uses it without an import cycle (it is not input data, so not in `data/`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# One letter per column: "l" is the renderer's default (left), written `---` as GitHub does.
_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(
    header: Sequence[object], rows: Iterable[Sequence[object]], align: str | Sequence[str] | None = None
) -> str:
    """A GitHub-flavoured Markdown table: the header line, the rule, one line per row.

    Cells are written with `str()`; a `|` in a cell is escaped and a line break becomes a
    space, so a cell cannot break the table. `align` gives each column `l`, `r` or `c`
    (e.g. `"llr"` or `["l", "l", "r"]`); None leaves every column left-aligned.
    """
    width = len(header)
    align = "l" * width if align is None else align
    if len(align) != width or any(a not in _RULES for a in align):
        raise ValueError(f"align needs one of {tuple(_RULES)} per column ({width}), got {align!r}")
    lines = [_line(header), "|" + "|".join(_RULES[a] for a in align) + "|"]
    for row in rows:
        if len(row) != width:
            raise ValueError(f"a row has {len(row)} cells, the header {width}: {row!r}")
        lines.append(_line(row))
    return "\n".join(lines)


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
