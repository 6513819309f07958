"""Few-shot learning curves: test accuracy against labelled training videos per class, per policy.

``compare-policies --shots 1,2,5,10,all`` answers "how much data do I need"
on the user's own data. Every point of the curve keeps the comparison's
validation and test videos; only the training split shrinks, to ``k`` videos
of each class drawn at random per seed (seed ``s`` draws the same subset for
every policy, so the policies are compared on the same videos, and the std
over seeds includes the luck of the draw). ``all`` is the comparison's own
table. A class with fewer than ``k`` training videos keeps all it has, and
the curve says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from vtransfer.data.splits import read_manifest, write_manifest
from vtransfer.reporting.plots import new_figure, to_png
from vtransfer.reporting.tables import Table, markdown_table
from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows import runs

ALL = "all"


def parse_shots(text: Any) -> list[int | None]:
    """``"1,2,5,10,all"`` (or a list) -> ``[1, 2, 5, 10, None]`` (``None`` = every training video); sorted, unique."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out: set[int] = set()
    with_all = False
    for item in (str(i).strip() for i in items):
        if item.lower() == ALL:
            with_all = True
            continue
        try:
            k = int(item)
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"--shots {text!r}: {item!r} is not a count; give positive whole numbers of videos per "
                              f"class and/or 'all', e.g. 1,2,5,10,all")
        out.add(k)
    if not out and not with_all:
        raise ConfigError(f"--shots {text!r}: give at least one count, e.g. 1,2,5,10,all")
    return [*sorted(out), *([None] if with_all else [])]


def shots_label(k: int | None) -> str:
    """``"5"``, or ``"all"`` for ``None``."""
    return ALL if k is None else str(k)


def subsample_train(index, k: int, seed: int):
    """``index`` with at most ``k`` training videos per class (seeded draw); validation and test unchanged."""
    rng = random.Random(f"shots:{k}:{seed}")
    kept = []
    for cls in index.classes:
        train = [r for r in index.records if r.split == "train" and r.label == cls]
        kept += rng.sample(train, min(k, len(train)))
    keep = set(kept)
    return replace(index, records=[r for r in index.records if r.split != "train" or r in keep])


@dataclass
class CurvePoint:
    """One policy at one number of shots: test video accuracy per seed, and how many training videos it had."""

    shots: int | None
    accuracy: list[float]
    train_videos: int
    capped: list[str] = field(default_factory=list)  # classes with fewer than `shots` training videos

    @property
    def mean(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)

    @property
    def std(self) -> float | None:
        n = len(self.accuracy)
        if n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracy) / (n - 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``shots`` as a number or ``"all"``)."""
        return {"shots": shots_label(self.shots), "mean": self.mean, "std": self.std, "per_seed": list(self.accuracy),
                "train_videos": self.train_videos, "capped_classes": list(self.capped)}


def capped_classes(index, k: int) -> list[str]:
    """Classes with fewer than ``k`` training videos in ``index``."""
    counts = {c: 0 for c in index.classes}
    for r in index.split("train"):
        counts[r.label] += 1
    return [c for c, n in counts.items() if n < k]


def curve_table(curve: dict[str, list[CurvePoint]]):
    """The curve as a :class:`~vtransfer.reporting.tables.Table`: one row per policy, one column per number of shots."""

    shots = sorted({p.shots for pts in curve.values() for p in pts}, key=lambda k: math.inf if k is None else k)
    rows = []
    for policy, points in curve.items():
        by = {p.shots: p for p in points}
        rows.append([policy] + [_cell(by[k]) if k in by else "—" for k in shots])
    return Table(title="Test video accuracy by labelled training videos per class",
                 headers=["policy"] + [f"{shots_label(k)} / class" if k is not None else ALL for k in shots],
                 rows=rows, right=set(range(1, len(shots) + 1)),
                 caption="mean ± std over seeds; the same validation and test videos at every point")


def _cell(p: CurvePoint) -> str:
    return f"{100 * p.mean:.1f}%" + (f" ± {100 * p.std:.1f}" if p.std is not None else "")


def curve_png(curve: dict[str, list[CurvePoint]], chance: float | None = None) -> bytes:
    """A line per policy: test video accuracy (%) against training videos per class, with ± std bars."""

    shots = sorted({p.shots for pts in curve.values() for p in pts}, key=lambda k: math.inf if k is None else k)
    x = {k: i for i, k in enumerate(shots)}
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for policy, points in curve.items():
        pts = sorted(points, key=lambda p: x[p.shots])
        ax.errorbar([x[p.shots] for p in pts], [100 * p.mean for p in pts],
                    yerr=[100 * (p.std or 0.0) for p in pts], marker="o", capsize=3, label=policy)
    if chance is not None:
        ax.axhline(100 * chance, color="#888888", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(shots)), [shots_label(k) for k in shots])
    ax.set_xlabel("labelled training videos per class")
    ax.set_ylabel("test video accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def write_curve(curve: dict[str, list[CurvePoint]], out_dir: Path, chance: float | None = None) -> dict[str, Path]:
    """``shots.json``, ``shots.csv``, ``shots.md`` and ``shots.png`` in ``out_dir``, each written atomically."""

    out_dir = Path(out_dir)
    paths = {"json": atomic_write_json(out_dir / "shots.json", {
        "chance": chance, "curve": {policy: [p.to_dict() for p in pts] for policy, pts in curve.items()}})}
    lines = ["policy,shots,mean,std,seeds,train_videos"]
    for policy, pts in curve.items():
        for p in pts:
            std = "" if p.std is None else f"{p.std:.6f}"
            lines.append(f"{policy},{shots_label(p.shots)},{p.mean:.6f},{std},{len(p.accuracy)},{p.train_videos}")
    paths["csv"] = atomic_write_text(out_dir / "shots.csv", "\n".join(lines) + "\n")
    paths["png"] = atomic_write_bytes(out_dir / "shots.png", curve_png(curve, chance))
    paths["markdown"] = atomic_write_text(out_dir / "shots.md", "\n".join(
        ["# How much labelled data?", "", markdown_table(curve_table(curve)), "", "![shots](shots.png)", ""]))
    return paths


def run_curve(shots: Sequence[int | None], policies: Sequence[str], seeds: Sequence[int], out_dir: Path,
              all_rows: dict[str, list[float]], all_train_videos: int, run_point) -> dict[str, list[CurvePoint]]:
    """Every point of the curve: ``run_point(manifest, sub_dir, policy, seed)`` trains one and returns its test accuracy.

    ``all_rows`` are the comparison's own per-seed test accuracies (the
    ``all`` point). Each ``k`` gets ``OUT/shots-K/split-seed-S.csv`` (the
    comparison's split with the training videos drawn) and its runs in
    ``OUT/shots-K/<policy>/seed-S``.
    """

    base = read_manifest(out_dir / runs.SPLIT_FILE)
    curve: dict[str, list[CurvePoint]] = {p: [] for p in policies}
    for k in shots:
        if k is None:
            for p in policies:
                if p in all_rows:
                    curve[p].append(CurvePoint(None, list(all_rows[p]), all_train_videos))
            continue
        point_dir = out_dir / f"shots-{k}"
        manifests = {}
        for seed in seeds:
            manifests[seed] = point_dir / f"split-seed-{seed}.csv"
            if not manifests[seed].is_file():
                point_dir.mkdir(parents=True, exist_ok=True)
                write_manifest(manifests[seed], subsample_train(base, k, seed))
        train_videos = len(read_manifest(manifests[seeds[0]], check_files=False).split("train"))
        for p in policies:
            if p not in all_rows:
                continue  # skipped in the comparison: skipped here too
            accs = [run_point(manifests[s], point_dir / p / f"seed-{s}", p, s) for s in seeds]
            curve[p].append(CurvePoint(k, accs, train_videos, capped_classes(base, k)))
    return {p: pts for p, pts in curve.items() if pts}
