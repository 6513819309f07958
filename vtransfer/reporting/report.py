"""Reports people can read: Rich tables on screen, JSON/CSV/Markdown files, PNG plots, one HTML page.

Two reports live here:

* the evaluation report of one model (:func:`render_eval_table`,
  :func:`write_eval_report`) built from a :class:`vtransfer.evaluation.metrics.EvalResult`;
* the compare-policies table in the papers' form (:class:`PolicyRow`,
  :func:`aggregate_seed_rows`, :func:`render_policy_table`, :func:`write_policy_table`).

Each report is first laid out as a few plain :class:`Table` objects; the Rich,
Markdown and HTML renderers all draw those same tables, so the screen and the
files never disagree. Every file is written atomically, and ``report.html`` /
``compare.html`` embed their PNGs as base64 data URIs (no external assets).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vtransfer.utils.jsonable import to_jsonable
from vtransfer.evaluation.metrics import LEGACY_HIT_K, EvalResult, hit_key, views_text

# --------------------------------------------------------------------------- formatting


def format_pct(value: float | None, std: float | None = None, digits: int = 1) -> str:
    """A fraction as a percentage (``0.641`` -> ``"64.1%"``), with ``" ± std"`` when given; ``"—"`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if std is None or math.isnan(std):
        return f"{100 * value:.{digits}f}%"
    return f"{100 * value:.{digits}f} ± {100 * std:.{digits}f}%"


def format_count(n: int | float | None) -> str:
    """A parameter count in short form: ``950``, ``12.3K``, ``4.56M``, ``1.2B``."""
    if n is None:
        return "—"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float | None, std: float | None = None) -> str:
    """Seconds as ``"8.2s"``, ``"3m 05s"`` or ``"1h 02m"``, with ``" ± 4.1s"`` when ``std`` is given."""
    if seconds is None or math.isnan(seconds):
        return "—"

    def one(s: float) -> str:
        if s < 60:
            return f"{s:.1f}s"
        if s < 3600:
            return f"{int(s // 60)}m {int(round(s % 60)):02d}s"
        return f"{int(s // 3600)}h {int(round(s % 3600 / 60)):02d}m"

    return one(seconds) if std is None or math.isnan(std) else f"{one(seconds)} ± {one(std)}"


def _scalar_text(value: Any) -> str:
    """A value of ``extra`` as one line of text (nested values as compact JSON)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    return str(value)


# --------------------------------------------------------------------------- tables and renderers


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


def _rich_table(table: Table) -> Any:
    """The :class:`Table` as a ``rich.table.Table``."""
    from rich import box
    from rich.table import Table as RichTable

    # A light box and an unwrapped first column keep wide tables legible in an 80-column terminal.
    out = RichTable(title=table.title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for j, header in enumerate(table.headers):
        # durations ("7m 47s") must not break across lines either
        out.add_column(header, justify="right" if j in table.right else "left", no_wrap=(j == 0 or "time" in header.lower()))
    for i, row in enumerate(table.rows):
        out.add_row(*(f"[bold green]{cell}[/]" if (i, j) in table.bold else cell for j, cell in enumerate(row)))
    return out


def _print_table(console: Any, table: Table) -> None:
    """Print a :class:`Table` on a Rich console, its caption as a dim line below (never squeezed)."""
    console.print(_rich_table(table))
    if table.caption:
        console.print(table.caption, style="dim", markup=False, highlight=False)


def _md_cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table, heading_level: int = 2) -> str:
    """The :class:`Table` as a Markdown section (heading, pipe table, caption)."""
    lines = [f"{'#' * heading_level} {table.title}", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---:" if j in table.right else "---" for j in range(len(table.headers))) + "|")
    for i, row in enumerate(table.rows):
        cells = [f"**{_md_cell(c)}**" if (i, j) in table.bold else _md_cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", f"_{_md_cell(table.caption)}_"]
    return "\n".join(lines) + "\n"


def _html_table(table: Table, heading_level: int = 2) -> str:
    """The :class:`Table` as an HTML section."""
    esc = html.escape
    parts = [f"<h{heading_level}>{esc(table.title)}</h{heading_level}>", "<table>"]
    parts.append(
        "<thead><tr>"
        + "".join(f'<th class="{"num" if j in table.right else ""}">{esc(h)}</th>' for j, h in enumerate(table.headers))
        + "</tr></thead><tbody>"
    )
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            text = f"<b>{esc(cell)}</b>" if (i, j) in table.bold else esc(cell)
            cells.append(f'<td class="{"num" if j in table.right else ""}">{text}</td>')
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    if table.caption:
        parts.append(f'<p class="caption">{esc(table.caption)}</p>')
    return "\n".join(parts)


def _html_image(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; } th { background: #f4f4f4; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
.caption { color: #666; font-size: 0.85em; } details { margin: 1em 0; }
"""


def _html_page(title: str, body: Iterable[str]) -> str:
    """A complete self-contained HTML document (inline CSS, no external assets)."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _best_cells(rows: list[list[float | None]], columns: Iterable[int]) -> set[tuple[int, int]]:
    """Positions of the highest value in each of ``columns`` (all ties), when there are two or more rows."""
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


def _extra_table(extra: Mapping[str, Any]) -> Table:
    """The ``extra`` mapping (run information) as a two-column table."""
    return Table("Run", ["Key", "Value"], [[str(k), _scalar_text(v)] for k, v in extra.items()])


# --------------------------------------------------------------------------- evaluation report


def eval_tables(result: EvalResult) -> dict[str, Table]:
    """The evaluation report's tables: ``summary``, ``per_category`` (if categories), ``per_class``, ``confused``."""
    k = result.top_k
    trivial = k >= len(result.classes)  # hit@k over every class says nothing
    clips_per_video = result.num_clips / max(result.num_videos, 1)
    views = views_text(result.views)  # "views = 10 clips × 3 crops", or None when not recorded
    summary = Table(
        "Summary",
        ["Metric", "Value"],
        [
            *([["Warning", collapse]] if (collapse := result.collapse_warning()) else []),
            ["Video hit@1", format_pct(result.video_hit1)],
            *([] if trivial else [[f"Video hit@{k}", format_pct(result.video_hit_k)]]),
            ["Clip hit@1", format_pct(result.clip_hit1)],
            *([] if trivial else [[f"Clip hit@{k}", format_pct(result.clip_hit_k)]]),
            ["Mean class accuracy", format_pct(result.mean_class_accuracy)],
            *([["Calibration", calibration_text(result)]] if result.calibration is not None else []),
            *([["Temperature", temperature_text(result)]] if result.temperature is not None else []),
            ["Videos", str(result.num_videos)],
            ["Clips", f"{result.num_clips} ({clips_per_video:.3g} per video)"],
            *([["Views", views]] if views else []),
            ["Classes", str(len(result.classes))],
        ],
        right={1},
        caption=("Video score = mean of its clips' softmax probabilities. " if not views else
                 f"Video score = mean of its views' softmax probabilities ({views}). ")
        + "Mean class accuracy = mean over classes with test videos."
        + (f" Hit@{k} is left out: with {len(result.classes)} classes it is always 100%." if trivial else "")
        + (" ECE = expected calibration error: |accuracy - confidence| over equal-width confidence bins, "
           "weighted by their share of predictions (0 = the model is right as often as it is sure)."
           if result.calibration is not None else ""),
    )
    tables = {"summary": summary}
    if result.per_category:
        tables["per_category"] = Table(
            "Per category",
            ["Category", "Accuracy", "Classes", "Videos"],
            [
                [
                    c.name,
                    format_pct(c.accuracy),
                    str(c.num_classes) if c.classes_with_support == c.num_classes
                    else f"{c.classes_with_support} of {c.num_classes}",
                    str(c.support),
                ]
                for c in result.per_category
            ],
            right={1, 2, 3},
            caption="Category accuracy = mean accuracy of its classes that have videos.",
        )
    has_cat = any(c.category is not None for c in result.per_class)
    headers = ["Class"] + (["Category"] if has_cat else []) + ["Videos", "Accuracy", "Precision", "Recall", "F1"]
    off = 1 + int(has_cat)
    rows = []
    for c in result.per_class:
        row = [c.name] + ([c.category or ""] if has_cat else [])
        row += [str(c.support), format_pct(c.accuracy), format_pct(c.precision), format_pct(c.recall), format_pct(c.f1)]
        rows.append(row)
    tables["per_class"] = Table("Per class", headers, rows, right=set(range(off, off + 5)))
    tables["confused"] = Table(
        "Most confused pairs",
        ["True class", "Predicted as", "Videos", "Share of class"],
        [[p.true, p.predicted, str(p.count), format_pct(p.fraction)] for p in result.most_confused],
        right={2, 3},
        caption=None if result.most_confused else "No misclassified videos.",
    )
    return tables


def calibration_text(result: EvalResult) -> str:
    """The calibration of ``result`` in one line: ``"ECE 0.083 (15 bins, video level; clip level 0.120)"``."""
    cal = result.calibration
    if cal is None:
        return "—"
    clip = f"; clip level {result.clip_ece:.3f}" if result.clip_ece is not None else ""
    return f"ECE {cal.ece:.3f} ({cal.num_bins} bins, {cal.level} level{clip})"


def temperature_text(result: EvalResult) -> str:
    """The temperature applied to ``result``'s clip scores: ``"1.42 on clip scores (video ECE 0.083 without)"``."""
    if result.temperature is None:
        return "—"
    text = f"{result.temperature:.3g} on clip scores"
    return text + (f" (video ECE {result.unscaled_ece:.3f} without)" if result.unscaled_ece is not None else "")


def render_eval_table(result: EvalResult, console: Any, title: str = "Evaluation") -> None:
    """Print the evaluation report on a Rich ``console``: summary, per-category, per-class, most confused."""
    from rich.rule import Rule

    console.print(Rule(title))
    for table in eval_tables(result).values():
        if table.rows:
            _print_table(console, table)


def _history_table(history: Sequence[Mapping[str, Any]]) -> Table:
    """Per-epoch training history as a table (known keys first, in a fixed order)."""
    known = ["epoch", "train_loss", "train_acc", "val_loss", "val_clip_acc", "val_video_acc", "raw_val_video_acc", "lr"]
    keys = [k for k in known if any(h.get(k) is not None for h in history)]
    rows = []
    for h in history:
        row = []
        for k in keys:
            v = h.get(k)
            if v is None:
                row.append("—")
            elif k.endswith("_acc"):
                row.append(format_pct(float(v)))
            elif k == "epoch":
                row.append(str(v))
            else:
                row.append(f"{float(v):.4g}")
        rows.append(row)
    return Table("Training history", keys, rows, right=set(range(1, len(keys))))


def _predictions_table(result: EvalResult, only_wrong: bool) -> Table:
    """Per-video predictions (optionally only the misclassified ones) with their top-k."""
    rows = []
    for p in result.predictions:
        if only_wrong and p.correct:
            continue
        top = ", ".join(f"{name} {100 * prob:.1f}%" for name, prob in p.top)
        rows.append([p.name if p.name is not None else str(p.index), p.true, p.predicted, top])
    title = "Misclassified videos" if only_wrong else "Predictions"
    return Table(title, ["Video", "True", "Predicted", f"Top {result.top_k}"], rows)


def _per_class_csv(result: EvalResult) -> str:
    """``per_class.csv``: one row per class, raw fractions (empty accuracy for classes without videos)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "category", "support", "accuracy", "precision", "recall", "f1"])
    for c in result.per_class:
        writer.writerow(
            [
                c.name,
                c.category or "",
                c.support,
                "" if c.accuracy is None else f"{c.accuracy:.6f}",
                f"{c.precision:.6f}",
                f"{c.recall:.6f}",
                f"{c.f1:.6f}",
            ]
        )
    return buf.getvalue()


def _confusion_csv(result: EvalResult) -> str:
    """``confusion.csv``: header ``true\\predicted,<classes...>``, then one row per true class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true\\predicted", *result.classes])
    for name, row in zip(result.classes, result.confusion):
        writer.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def write_eval_report(
    result: EvalResult,
    out_dir: str | Path,
    *,
    title: str = "Evaluation report",
    extra: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the evaluation report files into ``out_dir`` (created if needed), each atomically.

    Files and the keys they are returned under:
    ``json`` report.json (``title``, everything of ``result.to_dict()``, ``extra``, ``history``),
    ``per_class_csv`` per_class.csv, ``confusion_csv`` confusion.csv (class names on both axes),
    ``markdown`` report.md, ``confusion_png`` confusion.png, ``per_class_png`` per_class.png,
    ``training_curves_png`` training_curves.png (only when ``history`` is non-empty),
    ``reliability_png`` reliability.png (the video-level reliability diagram; only when
    ``result.calibration`` is set, i.e. not for results read from reports older than it),
    ``html`` report.html (self-contained: tables plus the PNGs as data URIs).

    ``extra`` is free-form run information (backbone, policy, checkpoint, config…)
    shown as a "Run" table; ``history`` is the per-epoch list of dicts with keys
    ``epoch``, ``train_loss``, ``train_acc``, ``val_video_acc``, ``lr``.
    """
    from vtransfer.reporting import plots  # matplotlib costs ~0.4 s to import; only pay it when writing

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    history = list(history or [])
    paths: dict[str, Path] = {}

    doc = {"title": title, **result.to_dict(), "extra": to_jsonable(extra), "history": to_jsonable(history)}
    paths["json"] = atomic_write_json(out / "report.json", to_jsonable(doc))
    paths["per_class_csv"] = atomic_write_text(out / "per_class.csv", _per_class_csv(result))
    paths["confusion_csv"] = atomic_write_text(out / "confusion.csv", _confusion_csv(result))

    cats = [c.category for c in result.per_class] if result.categories is not None else None
    pngs: dict[str, tuple[str, bytes]] = {
        "confusion_png": ("confusion.png", plots.confusion_png(result.confusion, result.classes, categories=cats)),
        "per_class_png": (
            "per_class.png",
            plots.per_class_accuracy_png(
                result.classes,
                [c.accuracy for c in result.per_class],
                categories=cats,
                mean_class_accuracy=result.mean_class_accuracy,
            ),
        ),
    }
    cal = result.calibration
    if cal is not None:
        pngs["reliability_png"] = ("reliability.png", plots.reliability_png(
            [b.lower for b in cal.bins], [b.upper for b in cal.bins], [b.accuracy for b in cal.bins],
            [b.confidence for b in cal.bins], [b.count for b in cal.bins], ece=cal.ece, level=cal.level,
        ))
    if history:
        pngs["training_curves_png"] = ("training_curves.png", plots.training_curves_png(history, title=title))
    for key, (name, png) in pngs.items():
        paths[key] = atomic_write_bytes(out / name, png)

    tables = eval_tables(result)
    head = ([_extra_table(extra)] if extra else []) + [tables["summary"]]
    head += [tables["per_category"]] if "per_category" in tables else []
    tail = [tables["per_class"], tables["confused"]]
    sections = head + tail
    history_table = _history_table(history) if history else None
    wrong = _predictions_table(result, only_wrong=True)

    md = [f"# {title}", ""]
    md += [_md_table(t) for t in sections if t.rows or t.caption]
    md.append("## Plots\n")
    md += [f"![{name}]({name})\n" for name, _ in pngs.values()]
    if history_table is not None:
        md.append(_md_table(history_table))
    if wrong.rows:
        md.append(_md_table(wrong))
    paths["markdown"] = atomic_write_text(out / "report.md", "\n".join(md))

    body = [_html_table(t) for t in head]
    body.append("<h2>Plots</h2>")
    body += [_html_image(png, name) for name, png in pngs.values()]
    body += [_html_table(t) for t in tail]
    if history_table is not None:
        body.append(_html_table(history_table))
    all_predictions = _predictions_table(result, only_wrong=False)
    body.append(
        f"<details><summary>All {len(all_predictions.rows)} video predictions "
        f"({len(wrong.rows)} misclassified)</summary>\n{_html_table(all_predictions, 3)}\n</details>"
    )
    paths["html"] = atomic_write_text(out / "report.html", _html_page(title, body))
    return paths


# --------------------------------------------------------------------------- compare-policies table

_HIT_K_FIELD = "test_video_hit_k"
"""The :class:`PolicyRow` field of test video hit@k; files call it ``test_video_hit<k>``."""


def _hit_k_as_field(values: dict[str, Any], k: int) -> dict[str, Any]:
    """``values`` with ``test_video_hit<k>`` (or the legacy ``test_video_hit5``) renamed to ``test_video_hit_k``."""
    for key in (hit_key("test_video", k), hit_key("test_video", LEGACY_HIT_K)):
        if key in values:
            values[_HIT_K_FIELD] = values.pop(key)
            break
    return values


POLICY_METRICS = (
    "train_time_s",
    "val_video_acc",
    "test_video_hit1",
    "test_video_hit_k",
    "test_clip_hit1",
    "mean_class_acc",
)
"""The :class:`PolicyRow` fields that are averaged over seeds (and may carry a std)."""


@dataclass
class PolicyRow:
    """One line of the compare-policies table: a policy's cost and accuracy.

    Accuracies are fractions in [0, 1] (``None`` when not measured). With
    several seeds the fields hold the mean and ``std`` maps a field name of
    :data:`POLICY_METRICS` to its standard deviation (``per_category_std`` the
    same per category). ``top_k`` is the k of ``test_video_hit_k`` (5, or the
    number of classes when there are fewer); files name it by its k
    (``test_video_hit3``, see :meth:`to_dict`). ``per_category`` maps
    category -> mean class accuracy on the test split.
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
    per_category: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    per_category_std: dict[str, float] = field(default_factory=dict)
    top_k: int = 5
    run_dir: str | None = None
    num_classes: int | None = None

    @property
    def hit_k_is_trivial(self) -> bool:
        """Whether hit@k covers every class (always 100%); rows without ``num_classes`` know it when k was capped."""
        return self.top_k >= self.num_classes if self.num_classes is not None else self.top_k < 5

    @classmethod
    def from_eval(
        cls,
        policy: str,
        seed: int,
        *,
        trainable_params: int,
        total_params: int,
        train_time_s: float,
        val_video_acc: float | None,
        test: EvalResult,
        run_dir: str | Path | None = None,
    ) -> "PolicyRow":
        """A single-seed row from a policy's test-split :class:`EvalResult` and its training numbers."""
        return cls(
            policy=policy,
            seeds=[int(seed)],
            trainable_params=int(trainable_params),
            total_params=int(total_params),
            train_time_s=float(train_time_s),
            val_video_acc=val_video_acc,
            test_video_hit1=test.video_hit1,
            test_video_hit_k=test.video_hit_k,
            test_clip_hit1=test.clip_hit1,
            mean_class_acc=test.mean_class_accuracy,
            per_category=test.category_accuracy(),
            top_k=test.top_k,
            run_dir=None if run_dir is None else str(run_dir),
            num_classes=len(test.classes),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN -> ``None``) with hit@k named by its k (``test_video_hit3``, also in ``std``).

        :meth:`from_dict` reverses it.
        """
        data = dataclasses.asdict(self)
        key = hit_key("test_video", self.top_k)
        data[key] = data.pop(_HIT_K_FIELD)
        if _HIT_K_FIELD in data["std"]:
            data["std"][key] = data["std"].pop(_HIT_K_FIELD)
        return to_jsonable(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyRow":
        """Rebuild a row from :meth:`to_dict` output (unknown keys are an error).

        Also reads rows written before hit@k keys carried their k (``test_video_hit5`` for any k).
        """
        k = int(data.get("top_k", 5))
        fields = _hit_k_as_field(dict(data), k)
        if "std" in fields:
            fields["std"] = _hit_k_as_field(dict(fields["std"]), k)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown PolicyRow field(s): {', '.join(sorted(unknown))}")
        return cls(**fields)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the non-``None`` values; std is ``None`` below two."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return mean, std


def aggregate_seed_rows(rows_per_seed: Sequence[PolicyRow]) -> PolicyRow:
    """Combine one policy's per-seed rows into a mean ± std row.

    Means are over the seeds that have a value; std is the sample standard
    deviation (ddof=1), present only when two or more seeds have a value.
    ``seeds`` lists all seeds in order, ``run_dir`` is dropped.

    Raises:
        ValueError: no rows, rows of different policies, or differing parameter counts.
    """
    rows = list(rows_per_seed)
    if not rows:
        raise ValueError("aggregate_seed_rows needs at least one row")
    policies = {r.policy for r in rows}
    if len(policies) > 1:
        raise ValueError(f"rows of different policies cannot be aggregated: {', '.join(sorted(policies))}")
    for attr in ("trainable_params", "total_params", "top_k", "num_classes"):
        values = {getattr(r, attr) for r in rows}
        if len(values) > 1:
            raise ValueError(f"policy {rows[0].policy!r}: seeds disagree on {attr}: {sorted(values)}")
    first = rows[0]
    means: dict[str, Any] = {}
    std: dict[str, float] = {}
    for name in POLICY_METRICS:
        mean, sd = _mean_std([getattr(r, name) for r in rows])
        means[name] = mean
        if sd is not None:
            std[name] = sd
    if means["train_time_s"] is None:
        means["train_time_s"] = float("nan")
    categories = list(dict.fromkeys(c for r in rows for c in r.per_category))
    per_category: dict[str, float | None] = {}
    per_category_std: dict[str, float] = {}
    for cat in categories:
        mean, sd = _mean_std([r.per_category.get(cat) for r in rows])
        per_category[cat] = mean
        if sd is not None:
            per_category_std[cat] = sd
    return PolicyRow(
        policy=first.policy,
        seeds=[s for r in rows for s in r.seeds],
        trainable_params=first.trainable_params,
        total_params=first.total_params,
        per_category=per_category,
        std=std,
        per_category_std=per_category_std,
        top_k=first.top_k,
        run_dir=None,
        num_classes=first.num_classes,
        **means,
    )


def _row_categories(rows: Sequence[PolicyRow]) -> list[str]:
    """Category names over all rows, in first-appearance order."""
    return list(dict.fromkeys(c for r in rows for c in r.per_category))


def _share(fraction: float) -> str:
    """A parameter share as a short percentage: ``100%``, ``38%``, ``0.4%``."""
    pct = 100 * fraction
    return f"{pct:.0f}%" if pct >= 1 else f"{pct:.1g}%"


def policy_table(rows: Sequence[PolicyRow], title: str = "Freezing policies compared") -> Table:
    """The compare-policies table in the papers' form; the best value of each accuracy column is bold.

    Columns: Policy, (Seeds when any row has several), Trainable params, Train time,
    Val acc, Test hit@1, Test hit@k (left out when k covers every class: it would read 100%
    for any model), Mean class acc, one column per category.
    """
    rows = list(rows)
    categories = _row_categories(rows)
    multi_seed = any(len(r.seeds) > 1 for r in rows)
    show_k = not all(r.hit_k_is_trivial for r in rows)
    headers = ["Policy"] + (["Seeds"] if multi_seed else [])
    headers += ["Trainable", "Train time", "Val acc", "Test hit@1",
                *([f"Test hit@{_shared_k(rows)}"] if show_k else []), "Mean class acc"]
    headers += categories
    acc_fields = ["val_video_acc", "test_video_hit1", *([_HIT_K_FIELD] if show_k else []), "mean_class_acc"]
    first_acc = len(headers) - len(categories) - len(acc_fields)

    cells: list[list[str]] = []
    numbers: list[list[float | None]] = []
    for r in rows:
        share = r.trainable_params / r.total_params if r.total_params else float("nan")
        row = [r.policy] + ([",".join(str(s) for s in r.seeds)] if multi_seed else [])
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
        bold=_best_cells(numbers, range(first_acc, len(headers))),
        caption=" ".join(caption_parts) or None,
    )


def render_policy_table(rows: Sequence[PolicyRow], console: Any, title: str = "Freezing policies compared") -> None:
    """Print the compare-policies table (see :func:`policy_table`) on a Rich ``console``."""
    _print_table(console, policy_table(rows, title))


def _shared_k(rows: Sequence[PolicyRow]) -> str:
    """The k of the rows' hit@k as text (``"3"``), or ``"k"`` when rows differ (each row's ``top_k`` says)."""
    ks = {r.top_k for r in rows}
    return str(ks.pop()) if len(ks) == 1 else "k"


def _policy_csv(rows: Sequence[PolicyRow]) -> str:
    """``compare.csv``: raw numbers (fractions, seconds), a ``_std`` column beside each metric.

    The hit@k column is named by its k (``test_video_hit3``), as in compare.json.
    """
    categories = _row_categories(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["policy", "seeds", "top_k", "trainable_params", "total_params"]
    for name in POLICY_METRICS:
        column = hit_key("test_video", _shared_k(rows)) if name == _HIT_K_FIELD else name
        header += [column, f"{column}_std"]
    for cat in categories:
        header += [f"category:{cat}", f"category:{cat}_std"]
    writer.writerow(header + ["run_dir"])

    def num(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.6g}"

    for r in rows:
        line = [r.policy, ";".join(str(s) for s in r.seeds), r.top_k, r.trainable_params, r.total_params]
        for name in POLICY_METRICS:
            line += [num(getattr(r, name)), num(r.std.get(name))]
        for cat in categories:
            line += [num(r.per_category.get(cat)), num(r.per_category_std.get(cat))]
        writer.writerow(line + [r.run_dir or ""])
    return buf.getvalue()


def policy_category_png(rows: Sequence[PolicyRow], title: str | None = None) -> bytes:
    """Grouped bars: accuracy per policy per category, plus ``overall`` (test video hit@1), with std error bars."""
    from vtransfer.reporting import plots

    categories = _row_categories(rows)
    groups = categories + ["overall"]
    series = {r.policy: [r.per_category.get(c) for c in categories] + [r.test_video_hit1] for r in rows}
    errors = {
        r.policy: [r.per_category_std.get(c) for c in categories] + [r.std.get("test_video_hit1")] for r in rows
    }
    return plots.category_bars_png(groups, series, errors, title=title or "Test accuracy per category and policy")


def write_policy_table(
    rows: Sequence[PolicyRow],
    out_dir: str | Path,
    *,
    title: str = "Freezing policies compared",
    extra: Mapping[str, Any] | None = None,
    figures: Sequence[tuple[str, str, bytes]] = (),
) -> dict[str, Path]:
    """Write the compare-policies table into ``out_dir``, each file atomically.

    Files and their keys: ``json`` compare.json (``title``, ``categories``,
    ``rows`` as :meth:`PolicyRow.to_dict`, ``extra``), ``csv`` compare.csv,
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
        "categories": _row_categories(rows),
        "rows": [r.to_dict() for r in rows],
        "extra": to_jsonable(extra),
    }
    paths["json"] = atomic_write_json(out / "compare.json", doc)
    paths["csv"] = atomic_write_text(out / "compare.csv", _policy_csv(rows))
    png = policy_category_png(rows)
    paths["categories_png"] = atomic_write_bytes(out / "compare_categories.png", png)

    results_table = dataclasses.replace(table, title="Results")
    md = [f"# {title}", ""]
    if extra:
        md.append(_md_table(_extra_table(extra)))
    md += [_md_table(results_table), "## Accuracy per category\n", "![compare_categories](compare_categories.png)\n"]
    md += [f"## {heading}\n\n![{name}]({name})\n" for heading, name, _ in figures]
    paths["markdown"] = atomic_write_text(out / "compare.md", "\n".join(md))

    body = ([_html_table(_extra_table(extra))] if extra else []) + [
        _html_table(results_table),
        "<h2>Accuracy per category</h2>",
        _html_image(png, "accuracy per category and policy"),
    ]
    for heading, _, figure in figures:
        body += [f"<h2>{html.escape(heading)}</h2>", _html_image(figure, heading)]
    paths["html"] = atomic_write_text(out / "compare.html", _html_page(title, body))
    return paths
