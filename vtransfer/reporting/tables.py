"""Renderer-neutral report tables and their Rich (screen) and Markdown renderings.

A report is first laid out as a few plain :class:`Table` objects; the Rich
renderer here, the Markdown renderer here and the HTML templates
(:mod:`vtransfer.reporting.html_page`) all draw those same tables, so the screen and
the files never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from rich import box
from rich.table import Table as RichTable

from vtransfer.reporting.formatting import format_value


@dataclass
class Table:
    """A renderer-neutral table: string cells, right-aligned columns and bold cells.

    ``bold`` holds ``(row, column)`` positions (the best value of a column).
    """

    title: str
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)
    bold: set[tuple[int, int]] = field(default_factory=set)
    caption: str | None = None


def rich_table(table: Table) -> RichTable:
    """The :class:`Table` as a ``rich.table.Table`` (best cells bold green, caption left out: see :func:`print_table`)."""
    # A light box and an unwrapped first column keep wide tables legible in an 80-column terminal.
    out = RichTable(title=table.title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for j, header in enumerate(table.headers):
        # durations ("7m 47s") must not break across lines either
        out.add_column(header, justify="right" if j in table.right else "left", no_wrap=(j == 0 or "time" in header.lower()))
    for i, row in enumerate(table.rows):
        out.add_row(*(f"[bold green]{cell}[/]" if (i, j) in table.bold else cell for j, cell in enumerate(row)))
    return out


def print_table(console: Any, table: Table) -> None:
    """Print a :class:`Table` on a Rich console, its caption as a dim line below (never squeezed)."""
    console.print(rich_table(table))
    if table.caption:
        console.print(table.caption, style="dim", markup=False, highlight=False)


def _md_cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table, heading_level: int = 2) -> str:
    """The :class:`Table` as a Markdown section: heading, pipe table (best cells bold), italic caption."""
    lines = [f"{'#' * heading_level} {table.title}", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---:" if j in table.right else "---" for j in range(len(table.headers))) + "|")
    for i, row in enumerate(table.rows):
        cells = [f"**{_md_cell(c)}**" if (i, j) in table.bold else _md_cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", f"_{_md_cell(table.caption)}_"]
    return "\n".join(lines) + "\n"


def best_cells(rows: list[list[float | None]], columns: Iterable[int]) -> set[tuple[int, int]]:
    """Positions of the highest value in each of ``columns`` (all ties), when there are two or more rows.

    ``rows`` holds the numbers behind a table's cells (``None`` or NaN where a cell has none);
    the result is meant for :attr:`Table.bold`.
    """
    best: set[tuple[int, int]] = set()
    if len(rows) < 2:
        return best
    for j in columns:
        values = [r[j] for r in rows]
        finite = [v for v in values if v is not None and not math.isnan(v)]
        if not finite:
            continue
        top = max(finite)
        best |= {(i, j) for i, v in enumerate(values) if v is not None and v == top}
    return best


def run_table(extra: Mapping[str, Any]) -> Table:
    """Free-form run information (backbone, policy, config…) as the two-column "Run" table."""
    return Table("Run", ["Key", "Value"], [[str(k), format_value(v)] for k, v in extra.items()])
