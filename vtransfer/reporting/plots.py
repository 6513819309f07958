"""PNG plots for reports: training curves, confusion matrix, per-class and per-category bars, reliability diagram.

Every ``*_png`` function returns the PNG file's bytes (the report module
writes them atomically and embeds them in HTML). Figures are drawn on an
explicit Agg canvas (``FigureCanvasAgg``) with matplotlib's object API and
never touch ``pyplot``: no GUI backend is ever loaded (headless-safe), no
global figure state leaks between calls, and we do not call
``matplotlib.use`` because that would switch a notebook user's backend.
Sizes and fonts adapt from 2 to 101+ classes (UCF-101): bigger figures,
smaller labels, no per-cell numbers when crowded.

Accuracies are given as fractions in [0, 1] and drawn as percentages.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vtransfer.utils.atomic import atomic_write_bytes

DPI = 110
_MISSING_COLOUR = "#bbbbbb"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches attached to its own Agg canvas (no ``pyplot``, headless-safe)."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render ``fig`` to PNG bytes: the one place every plot becomes bytes (tests swap it for a stub)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure from :func:`new_figure` to PNG bytes (white background, cropped to its content)."""
    return _to_png(fig, dpi)


def write_png(data: bytes, path: str | Path) -> Path:
    """Write PNG bytes from one of this module's functions to ``path`` atomically."""
    return atomic_write_bytes(path, data)


def category_colours(categories: Sequence[str]) -> dict[str, Any]:
    """A stable colour per category name (tab10, then tab20 beyond ten)."""
    names = list(dict.fromkeys(categories))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _label_fontsize(n: int) -> float:
    """Confusion-matrix tick font size for ``n`` classes: 9pt up to 15, about 5pt at 101."""
    if n <= 15:
        return 9.0
    return max(5.0, 9.0 - (n - 15) * 0.045)


def _legend_columns(names: Sequence[str], width_in: float, fontsize: float) -> int:
    """How many legend entries of these names fit side by side in ``width_in`` inches."""
    entry_in = (max(len(n) for n in names) + 5) * fontsize * 0.6 / 72
    return max(1, min(len(names), int(width_in / entry_in)))


def _pct(values: Sequence[float | None]) -> np.ndarray:
    """Fractions to percentages, ``None`` to NaN."""
    return np.array([np.nan if v is None else 100.0 * float(v) for v in values], dtype=np.float64)


def training_curves_png(history: Sequence[Mapping[str, Any]], *, title: str | None = None) -> bytes:
    """Two panels per epoch: losses (and learning rate) on the left, accuracies on the right.

    ``history`` is a list of per-epoch dicts with keys ``epoch``, ``train_loss``,
    ``train_acc``, ``val_video_acc`` and ``lr``; ``val_loss``, ``val_clip_acc`` and
    ``raw_val_video_acc`` (the raw weights' accuracy when EMA is on) are drawn too
    when present. Missing or ``None`` values are skipped. The
    epoch with the best validation video accuracy is marked.
    """
    if not history:
        raise ValueError("training_curves_png needs at least one epoch of history")
    epochs = np.array([float(h.get("epoch", i + 1)) for i, h in enumerate(history)])

    def series(key: str, scale: float = 1.0) -> np.ndarray | None:
        vals = [h.get(key) for h in history]
        if all(v is None for v in vals):
            return None
        return np.array([np.nan if v is None else scale * float(v) for v in vals])

    fig = new_figure(11.0, 4.0)
    ax_loss, ax_acc = fig.subplots(1, 2)
    marker = "o" if len(history) <= 30 else None

    for key, label, colour in (("train_loss", "train loss", "tab:blue"), ("val_loss", "val loss", "tab:orange")):
        ys = series(key)
        if ys is not None:
            ax_loss.plot(epochs, ys, marker=marker, ms=3, label=label, color=colour)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    lr = series("lr")
    handles, labels = ax_loss.get_legend_handles_labels()
    if lr is not None:
        ax_lr = ax_loss.twinx()
        (line,) = ax_lr.plot(epochs, lr, ls=":", color="tab:gray", label="learning rate")
        ax_lr.set_ylabel("learning rate", color="tab:gray")
        ax_lr.tick_params(axis="y", labelcolor="tab:gray", labelsize=8)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(line)
        labels.append("learning rate")
    if handles:
        ax_loss.legend(handles, labels, fontsize=8, loc="upper right")

    for key, label, colour in (
        ("train_acc", "train clip acc", "tab:blue"),
        ("val_clip_acc", "val clip acc", "tab:green"),
        ("val_video_acc", "val video acc", "tab:orange"),
        ("raw_val_video_acc", "val video acc, raw weights (EMA on)", "tab:red"),
    ):
        ys = series(key, 100.0)
        if ys is not None:
            ax_acc.plot(epochs, ys, marker=marker, ms=3, label=label, color=colour,
                        ls="--" if key.startswith("raw") else "-")
    val = series("val_video_acc", 100.0)
    if val is not None and np.any(np.isfinite(val)):
        best = int(np.nanargmax(val))
        ax_acc.axvline(epochs[best], color="tab:orange", ls="--", lw=0.8, alpha=0.7)
        ax_acc.annotate(
            f"best {val[best]:.1f}% @ epoch {epochs[best]:g}",
            xy=(epochs[best], val[best]),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=8,
            color="tab:orange",
        )
    ax_acc.set_ylim(0, 102)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _to_png(fig)


def confusion_png(
    confusion: np.ndarray,
    classes: Sequence[str],
    *,
    categories: Sequence[str | None] | None = None,
    title: str | None = None,
) -> bytes:
    """Confusion matrix, rows normalised to the true class's videos, class names on both axes.

    Cells show counts when there are at most 25 classes. With ``categories``
    (one per class) the tick labels are coloured by category with a legend.
    Rows of classes without videos are drawn grey.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} classes")
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    masked = np.ma.masked_where(np.repeat(support == 0, n, axis=1), norm)

    side = min(max(5.0, 0.16 * n + 3.0), 20.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad=_MISSING_COLOUR)
    # Without per-cell numbers, a square-root colour scale keeps rare confusions (1 of 10 videos) visible.
    colour_norm = Normalize(0.0, 1.0) if n <= 25 else PowerNorm(0.5, 0.0, 1.0)
    image = ax.imshow(masked, cmap=cmap, norm=colour_norm, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of the true class's videos" + ("" if n <= 25 else " (square-root scale)"))

    fs = _label_fontsize(n)
    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    ax.set_xticklabels(classes, rotation=90, fontsize=fs)
    ax.set_yticklabels(classes, fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n > 1:
        ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", lw=0.5 if n <= 40 else 0.2)
        ax.tick_params(which="minor", length=0)

    if n <= 25:
        cell_fs = 9 if n <= 12 else 7
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    colour = "white" if norm[i, j] > 0.55 else "black"
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=cell_fs, color=colour)

    legend_rows = 0
    if categories is not None:
        cats = [c or "uncategorised" for c in categories]
        if len(cats) != n:
            raise ValueError(f"{len(cats)} categories given for {n} classes")
        colours = category_colours(cats)
        for tick, cat in zip(ax.get_xticklabels(), cats):
            tick.set_color(colours[cat])
        for tick, cat in zip(ax.get_yticklabels(), cats):
            tick.set_color(colours[cat])
        ncol = _legend_columns(list(colours), side, 8)
        legend_rows = math.ceil(len(colours) / ncol)
        ax.legend(
            handles=[Patch(color=c, label=name) for name, c in colours.items()],
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncol=ncol,
            fontsize=8,
            frameon=False,
            title="tick colour = category",
            title_fontsize=8,
            alignment="left",
        )
    ax.set_title(title or "Confusion matrix (video level)", pad=8 + 14 * (legend_rows + 1 if legend_rows else 0))
    return _to_png(fig, dpi=DPI if n <= 40 else 150)


def per_class_accuracy_png(
    classes: Sequence[str],
    accuracies: Sequence[float | None],
    *,
    categories: Sequence[str | None] | None = None,
    mean_class_accuracy: float | None = None,
    title: str | None = None,
) -> bytes:
    """Horizontal bars of per-class accuracy, coloured (and grouped) by category.

    Classes appear in index order, grouped by category in first-appearance
    order when ``categories`` is given. Classes without videos (``None``) are
    labelled "no videos". A dashed line marks ``mean_class_accuracy``.
    """
    n = len(classes)
    if len(accuracies) != n:
        raise ValueError(f"{len(accuracies)} accuracies given for {n} classes")
    cats = [c or "uncategorised" for c in categories] if categories is not None else [None] * n
    if categories is not None and len(cats) != n:
        raise ValueError(f"{len(cats)} categories given for {n} classes")
    order = list(range(n))
    colours: dict[str, Any] = {}
    if categories is not None:
        cat_order = list(dict.fromkeys(cats))
        order.sort(key=lambda i: cat_order.index(cats[i]))
        colours = category_colours(cat_order)
    acc = _pct([accuracies[i] for i in order])
    names = [classes[i] for i in order]
    bar_colours = [colours.get(cats[i], "tab:blue") if cats[i] else "tab:blue" for i in order]

    fig = new_figure(8.0, max(2.5, 0.2 * n + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(acc), color=bar_colours, height=0.75)
    fs = 9.0 if n <= 15 else 7.0
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_ylim(n - 0.5, -0.5)  # first class on top, no empty margin
    ax.set_xlim(0, 112)
    ax.set_xlabel("video accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    for yi, value in zip(y, acc):
        if math.isnan(value):
            ax.text(1, yi, "no videos", va="center", fontsize=fs - 1, color="#777777", style="italic")
        else:
            ax.text(value + 1, yi, f"{value:.0f}", va="center", fontsize=fs - 1)
    if mean_class_accuracy is not None and not math.isnan(mean_class_accuracy):
        ax.axvline(100 * mean_class_accuracy, color="black", ls="--", lw=0.8)
        ax.text(
            100 * mean_class_accuracy,
            1.0,
            f"mean {100 * mean_class_accuracy:.1f}%",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if colours:
        ax.legend(
            handles=[Patch(color=c, label=name) for name, c in colours.items()],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            frameon=False,
            title="category",
            title_fontsize=8,
            alignment="left",
        )
    ax.set_title(title or "Per-class accuracy", pad=16)
    return _to_png(fig)


def category_bars_png(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    errors: Mapping[str, Sequence[float | None]] | None = None,
    *,
    title: str | None = None,
    ylabel: str = "accuracy (%)",
) -> bytes:
    """Grouped bar chart: one group of bars per entry of ``groups``, one bar per series.

    For compare-policies: ``groups`` are the categories plus ``"overall"``,
    ``series`` maps each policy to its accuracy per group (fractions, ``None``
    for no value) and ``errors`` optionally gives a std per value, drawn as
    error bars. Values are printed on the bars when there are few of them.
    """
    groups = list(groups)
    names = list(series)
    if not names:
        raise ValueError("category_bars_png needs at least one series")
    for name in names:
        if len(series[name]) != len(groups):
            raise ValueError(f"series {name!r} has {len(series[name])} values for {len(groups)} groups")
    n_groups, n_series = len(groups), len(names)
    width = 0.8 / n_series
    x = np.arange(n_groups)
    fig = new_figure(max(6.0, 0.35 * n_groups * n_series + 2.5), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab10" if n_series <= 10 else "tab20"]
    annotate = n_groups * n_series <= 40
    for s, name in enumerate(names):
        values = _pct(series[name])
        err = None
        if errors is not None and name in errors:
            err_vals = _pct(errors[name])
            if np.any(np.isfinite(err_vals) & (err_vals > 0)):
                err = np.nan_to_num(err_vals)
        xs = x - 0.4 + width * (s + 0.5)
        bars = ax.bar(
            xs, np.nan_to_num(values), width=width * 0.92, color=cmap(s % cmap.N), label=name,
            yerr=err, capsize=2 if err is not None else 0, error_kw={"lw": 0.8},
        )
        if annotate:
            tops = np.nan_to_num(values) + (err if err is not None else 0.0)
            for bar, value, top in zip(bars, values, tops):
                text = "n/a" if math.isnan(value) else f"{value:.0f}"
                ax.text(bar.get_x() + bar.get_width() / 2, top + 1, text, ha="center", va="bottom", fontsize=7)
    long_names = max((len(g) for g in groups), default=0) > 12
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20 if long_names else 0, ha="right" if long_names else "center", fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title or "Accuracy per category", pad=6)
    fig.tight_layout()
    return _to_png(fig)


def reliability_png(
    lower: Sequence[float],
    upper: Sequence[float],
    accuracy: Sequence[float | None],
    confidence: Sequence[float | None],
    counts: Sequence[int],
    *,
    ece: float | None = None,
    level: str = "video",
    title: str | None = None,
) -> bytes:
    """A reliability diagram: accuracy per confidence bin against the diagonal, bin counts below.

    One entry per equal-width confidence bin ``(lower, upper]`` (fractions),
    ``None`` accuracy/confidence for empty bins. The top panel draws each
    bin's accuracy as a bar, its mean confidence as a black line and the gap
    between them hatched red (above the bar: an overconfident bin, whose
    confidence exceeds its accuracy); the dashed diagonal is perfect calibration. The bottom
    panel counts the predictions in each bin. ``ece`` is printed in a corner.
    """
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    n = len(lo)
    if not (len(hi) == len(accuracy) == len(confidence) == len(counts) == n) or n == 0:
        raise ValueError("reliability_png needs one lower/upper edge, accuracy, confidence and count per bin")
    acc, conf = _pct(accuracy), _pct(confidence)
    count = np.asarray(counts, dtype=np.int64)
    left, width = 100 * lo, 100 * (hi - lo)

    fig = new_figure(5.5, 6.2)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    filled = count > 0
    ax.bar(left[filled], acc[filled], width=width[filled], align="edge", color="tab:blue", edgecolor="white",
           lw=0.6, label="accuracy")
    ax.bar(left[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
           fill=False, edgecolor="tab:red", hatch="///", lw=0.6, label="gap to mean confidence")
    ax.hlines(conf[filled], left[filled], (left + width)[filled], color="black", lw=1.4, label="mean confidence")
    ax.plot([0, 100], [0, 100], ls="--", color="#555555", lw=1.0, label="perfect calibration")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if ece is not None and not math.isnan(ece):
        ax.text(0.97, 0.04, f"ECE {ece:.3f}\n{n} bins, {level} level", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=9, bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#cccccc"})
    ax.set_title(title or f"Reliability diagram ({level} level)")

    ax_n.bar(left, count, width=width, align="edge", color="tab:gray", edgecolor="white", lw=0.6)
    ax_n.set_xlabel(f"confidence, top {level} probability (%)")
    ax_n.set_ylabel("predictions")
    ax_n.grid(axis="y", alpha=0.3)
    top = max(int(count.max()), 1)
    ax_n.set_ylim(0, top * 1.3)
    if n <= 20:
        for x, w, c in zip(left, width, count):
            if c:
                ax_n.text(x + w / 2, c + top * 0.03, str(int(c)), ha="center", va="bottom", fontsize=7)
    return _to_png(fig)
