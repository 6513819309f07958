"""The compare-policies table in the papers' form: on screen and as files.

Rows are plain data, duck-typed as :class:`PolicyRowLike` (the compare-policies
workflow builds and aggregates them: :mod:`vtransfer.workflows.compare_rows`).
:func:`policy_table` lays them out as a :class:`~vtransfer.reporting.tables.Table`
that :func:`render_policy_table` prints and :func:`write_policy_table` writes
(JSON, CSV, Markdown, a per-category bar chart and one self-contained HTML page
rendered from ``templates/compare.html.j2``), each file atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from vtransfer.evaluation.metrics import hit_key
from vtransfer.reporting import plots
from vtransfer.reporting.formatting import format_count, format_duration, format_pct
from vtransfer.reporting.html_page import render_page
from vtransfer.reporting.tables import Table, best_cells, markdown_table, print_table, run_table
from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vtransfer.utils.jsonable import to_jsonable

HIT_K_FIELD = "test_video_hit_k"
"""The row attribute holding test video hit@k; files call it ``test_video_hit<k>``."""

POLICY_METRICS = (
    "train_time_s",
    "val_video_acc",
    "test_video_hit1",
    HIT_K_FIELD,
    "test_clip_hit1",
    "mean_class_acc",
)
"""The metric attributes of a row, each of which may carry a standard deviation in ``row.std`` (over seeds)."""


def row_label(row: "PolicyRowLike") -> str:
    """A row's name in tables and charts: its policy, and its stream in a two-stream comparison (``top-layer (flow)``)."""
    stream = getattr(row, "stream", None)
    return f"{row.policy} ({stream})" if stream else row.policy


class PolicyRowLike(Protocol):
    """What the compare-policies table reads from a row (:class:`vtransfer.workflows.compare_rows.PolicyRow` is one).

    Accuracies are fractions in [0, 1] or ``None``; ``std`` maps a name of
    :data:`POLICY_METRICS` to its standard deviation over seeds,
    ``per_category_std`` the same per category; ``top_k`` is the k of
    ``test_video_hit_k``.
    """

    policy: str
    seeds: list[int]
    trainable_params: int
    total_params: int
    train_time_s: float
    val_video_acc: float | None
    test_video_hit1: float | None
    test_video_hit_k: float | None
    test_clip_hit1: float | None
    mean_class_acc: float | None
    per_category: dict[str, float | None]
    std: dict[str, float]
    per_category_std: dict[str, float]
    top_k: int
    run_dir: str | None

    @property
    def hit_k_is_trivial(self) -> bool:
        """Whether hit@k covers every class (always 100%)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-safe dict (what compare.json holds)."""
        ...


def row_categories(rows: Sequence[PolicyRowLike]) -> list[str]:
    """Category names over all rows, in first-appearance order."""
    return list(dict.fromkeys(c for r in rows for c in r.per_category))


def _share(fraction: float) -> str:
    """A parameter share as a short percentage: ``100%``, ``38%``, ``0.4%``."""
    pct = 100 * fraction
    return f"{pct:.0f}%" if pct >= 1 else f"{pct:.1g}%"


def _shared_k(rows: Sequence[PolicyRowLike]) -> str:
    """The k of the rows' hit@k as text (``"3"``), or ``"k"`` when rows differ (each row's ``top_k`` says)."""
    ks = {r.top_k for r in rows}
    return str(ks.pop()) if len(ks) == 1 else "k"


def policy_table(rows: Sequence[PolicyRowLike], title: str = "Freezing policies compared") -> Table:
    """The compare-policies table in the papers' form; the best value of each accuracy column is bold.

    Columns: Policy, (Seeds when any row has several), Trainable params, Train time,
    Val acc, Test hit@1, Test hit@k (left out when k covers every class: it would read 100%
    for any model), Mean class acc, one column per category.
    """
    rows = list(rows)
    categories = row_categories(rows)
    multi_seed = any(len(r.seeds) > 1 for r in rows)
    show_k = not all(r.hit_k_is_trivial for r in rows)
    headers = ["Policy"] + (["Seeds"] if multi_seed else [])
    headers += ["Trainable", "Train time", "Val acc", "Test hit@1",
                *([f"Test hit@{_shared_k(rows)}"] if show_k else []), "Mean class acc"]
    headers += categories
    acc_fields = ["val_video_acc", "test_video_hit1", *([HIT_K_FIELD] if show_k else []), "mean_class_acc"]
    first_acc = len(headers) - len(categories) - len(acc_fields)

    cells: list[list[str]] = []
    numbers: list[list[float | None]] = []
    for r in rows:
        share = r.trainable_params / r.total_params if r.total_params else float("nan")
        row = [row_label(r)] + ([",".join(str(s) for s in r.seeds)] if multi_seed else [])
        row += [
            f"{format_count(r.trainable_params)} {_share(share)}" if not math.isnan(share)
            else format_count(r.trainable_params),
            format_duration(r.train_time_s, r.std.get("train_time_s")),
        ]
        row += [format_pct(getattr(r, f), r.std.get(f)) for f in acc_fields]
        row += [format_pct(r.per_category.get(c), r.per_category_std.get(c)) for c in categories]
        cells.append(row)
        numbers.append(
            [None] * first_acc
            + [getattr(r, f) for f in acc_fields]
            + [r.per_category.get(c) for c in categories]
        )
    total = {r.total_params for r in rows}
    caption_parts = []
    if len(total) == 1:
        caption_parts.append(f"Total parameters: {format_count(total.pop())}.")
    if multi_seed:
        caption_parts.append("Mean ± sample std over seeds.")
    if categories:
        caption_parts.append("Category columns: mean test accuracy of the category's classes.")
    return Table(
        title,
        headers,
        cells,
        right=set(range(1 + int(multi_seed), len(headers))),
        bold=best_cells(numbers, range(first_acc, len(headers))),
        caption=" ".join(caption_parts) or None,
    )


def render_policy_table(rows: Sequence[PolicyRowLike], console: Any, title: str = "Freezing policies compared") -> None:
    """Print the compare-policies table (see :func:`policy_table`) on a Rich ``console``."""
    print_table(console, policy_table(rows, title))


def _policy_csv(rows: Sequence[PolicyRowLike]) -> str:
    """``compare.csv``: raw numbers (fractions, seconds), a ``_std`` column beside each metric.

    The hit@k column is named by its k (``test_video_hit3``), as in compare.json.
    """
    categories = row_categories(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["policy", "seeds", "top_k", "trainable_params", "total_params"]
    for name in POLICY_METRICS:
        column = hit_key("test_video", _shared_k(rows)) if name == HIT_K_FIELD else name
        header += [column, f"{column}_std"]
    for cat in categories:
        header += [f"category:{cat}", f"category:{cat}_std"]
    streams = any(getattr(r, "stream", None) for r in rows)
    writer.writerow(header + ["run_dir"] + (["stream"] if streams else []))

    def num(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.6g}"

    for r in rows:
        line = [r.policy, ";".join(str(s) for s in r.seeds), r.top_k, r.trainable_params, r.total_params]
        for name in POLICY_METRICS:
            line += [num(getattr(r, name)), num(r.std.get(name))]
        for cat in categories:
            line += [num(r.per_category.get(cat)), num(r.per_category_std.get(cat))]
        writer.writerow(line + [r.run_dir or ""] + ([getattr(r, "stream", None) or ""] if streams else []))
    return buf.getvalue()


def policy_category_png(rows: Sequence[PolicyRowLike], title: str | None = None) -> bytes:
    """Grouped bars: accuracy per policy per category, plus ``overall`` (test video hit@1), with std error bars."""

    categories = row_categories(rows)
    groups = categories + ["overall"]
    series = {row_label(r): [r.per_category.get(c) for c in categories] + [r.test_video_hit1] for r in rows}
    errors = {
        row_label(r): [r.per_category_std.get(c) for c in categories] + [r.std.get("test_video_hit1")] for r in rows
    }
    return plots.category_bars_png(groups, series, errors, title=title or "Test accuracy per category and policy")


def write_policy_table(
    rows: Sequence[PolicyRowLike],
    out_dir: str | Path,
    *,
    title: str = "Freezing policies compared",
    extra: Mapping[str, Any] | None = None,
    figures: Sequence[tuple[str, str, bytes]] = (),
) -> dict[str, Path]:
    """Write the compare-policies table into ``out_dir``, each file atomically.

    Files and their keys: ``json`` compare.json (``title``, ``categories``,
    ``rows`` as each row's ``to_dict()``, ``extra``), ``csv`` compare.csv,
    ``markdown`` compare.md, ``categories_png`` compare_categories.png,
    ``html`` compare.html (self-contained). ``figures`` are more
    ``(heading, file name, PNG bytes)`` sections (the few-shot curve), whose
    files the caller has written beside the table.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("write_policy_table needs at least one row")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    table = policy_table(rows, title)
    paths: dict[str, Path] = {}
    doc = {
        "title": title,
        "categories": row_categories(rows),
        "rows": [r.to_dict() for r in rows],
        "extra": to_jsonable(extra),
    }
    paths["json"] = atomic_write_json(out / "compare.json", doc)
    paths["csv"] = atomic_write_text(out / "compare.csv", _policy_csv(rows))
    png = policy_category_png(rows)
    paths["categories_png"] = atomic_write_bytes(out / "compare_categories.png", png)

    run = run_table(extra) if extra else None
    results_table = dataclasses.replace(table, title="Results")
    md = [f"# {title}", ""]
    if run is not None:
        md.append(markdown_table(run))
    md += [markdown_table(results_table), "## Accuracy per category\n", "![compare_categories](compare_categories.png)\n"]
    md += [f"## {heading}\n\n![{name}]({name})\n" for heading, name, _ in figures]
    paths["markdown"] = atomic_write_text(out / "compare.md", "\n".join(md))

    page = render_page(
        "compare.html.j2",
        title=title,
        run=run,
        results=results_table,
        figures=[("Accuracy per category", "accuracy per category and policy", png)]
        + [(heading, heading, figure) for heading, _, figure in figures],
    )
    paths["html"] = atomic_write_text(out / "compare.html", page)
    return paths
