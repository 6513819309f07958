"""The evaluation report of one model, from a :class:`vtransfer.evaluation.metrics.EvalResult`.

On screen (:func:`render_eval_table`, Rich tables) and as files
(:func:`write_eval_report`: JSON, CSV, Markdown, PNG plots and one
self-contained HTML page rendered from ``templates/eval_report.html.j2``).
Both draw the same :class:`~vtransfer.reporting.tables.Table` objects
(:func:`eval_tables`), so the screen and the files never disagree. Every file
is written atomically.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.rule import Rule

from vtransfer.evaluation.metrics import EvalResult, views_text
from vtransfer.reporting import plots
from vtransfer.reporting.formatting import format_pct
from vtransfer.reporting.gallery import GalleryItem, gallery_sections
from vtransfer.reporting.html_page import render_page
from vtransfer.reporting.tables import Table, markdown_table, print_table, run_table
from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vtransfer.utils.jsonable import to_jsonable


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
    console.print(Rule(title))
    for table in eval_tables(result).values():
        if table.rows:
            print_table(console, table)


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
    gallery: Sequence[GalleryItem] | None = None,
    gallery_note: str | None = None,
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
    ``gallery``: strips of the videos behind the numbers (:mod:`vtransfer.reporting.gallery`; their PNGs
    already in ``out_dir``, named relative to it), shown in report.html and listed in report.json;
    ``gallery_note`` says what the strips show.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    history = list(history or [])
    paths: dict[str, Path] = {}

    doc = {"title": title, **result.to_dict(), "extra": to_jsonable(extra), "history": to_jsonable(history),
           **({"gallery": [to_jsonable(asdict(item)) for item in gallery]} if gallery else {})}
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
    head = ([run_table(extra)] if extra else []) + [tables["summary"]]
    head += [tables["per_category"]] if "per_category" in tables else []
    tail = [tables["per_class"], tables["confused"]]
    sections = head + tail
    history_table = _history_table(history) if history else None
    wrong = _predictions_table(result, only_wrong=True)

    md = [f"# {title}", ""]
    md += [markdown_table(t) for t in sections if t.rows or t.caption]
    md.append("## Plots\n")
    md += [f"![{name}]({name})\n" for name, _ in pngs.values()]
    if history_table is not None:
        md.append(markdown_table(history_table))
    if wrong.rows:
        md.append(markdown_table(wrong))
    if gallery:
        md.append("## The videos behind the numbers\n")
        md += [f"![{item.name}]({item.strip}) {item.name}: {item.true} -> {item.predicted} ({100 * item.confidence:.0f}%)\n"
               for item in gallery if item.strip]
    paths["markdown"] = atomic_write_text(out / "report.md", "\n".join(md))

    page = render_page(
        "eval_report.html.j2",
        title=title,
        head=head,
        plots=list(pngs.values()),
        tail=tail,
        history=history_table,
        predictions=_predictions_table(result, only_wrong=False),
        wrong=len(wrong.rows),
        galleries=gallery_sections(result, gallery) if gallery else [],
        gallery_note=gallery_note,
    )
    paths["html"] = atomic_write_text(out / "report.html", page)
    return paths
