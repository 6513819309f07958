"""``vtransfer check``: one cheap pass over a dataset that says what is usable.

Every video is probed from its headers (:func:`vtransfer.data.decode.probe_video`)
and decoded at two points only, near the start and near the end
(:func:`vtransfer.data.decode.verify_readable`), which catches truncated
files without decoding whole videos. Probes run in a thread pool: PyAV
releases the GIL while it demuxes and decodes, so a few hundred clips take
seconds.

A video is *usable* when both calls succeed. Videos shorter than one clip
(``(frames - 1) * stride + 1`` source frames) are usable -- the clip reader
loops or repeats frames -- but are listed as too short so the user knows.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vtransfer.data import decode
from vtransfer.data.records import SPLITS, DatasetIndex, SkippedFile, VideoInfo, VideoRecord
from vtransfer.utils.errors import ConfigError, VideoDecodeError


def printable(path: str | Path) -> str:
    """A path as text that any terminal or JSON parser accepts (undecodable bytes shown as ``\\xNN``)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class UnreadableFile:
    """A listed video that could not be probed or decoded, with the reason."""

    path: Path
    label: str
    split: str | None
    reason: str


@dataclass(frozen=True)
class ShortFile:
    """A readable video with fewer frames than one clip spans (usable, by looping)."""

    path: Path
    label: str
    split: str | None
    num_frames: int
    needed: int


@dataclass
class CheckReport:
    """What ``check`` found. ``counts`` and the ranges cover usable videos only.

    Attributes:
        root: the dataset folder (or manifest folder).
        classes: sorted class names.
        counts: ``{class: {split: usable videos}}``.
        total: videos listed by the dataset (before probing).
        usable: videos that probe and decode at both ends.
        frames, stride: the clip the check was made for; ``frames_needed`` is
            ``(frames - 1) * stride + 1`` source frames.
        unreadable: videos that failed, each with the reason.
        too_short: usable videos shorter than ``frames_needed``.
        skipped: files the scanner did not take as videos, with the reason.
        ranges: ``{"duration"|"fps"|"width"|"height"|"num_frames": (min, max)}``.
        codecs: ``{codec name: videos}``.
        warnings: sentences about the whole dataset (a class left without
            usable training videos, an empty split).
        seconds: wall time of the check.
        infos: probe results of usable videos, by path (not in :meth:`to_dict`).
    """

    root: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    total: int
    usable: int
    frames: int
    stride: int
    frames_needed: int
    unreadable: list[UnreadableFile] = field(default_factory=list)
    too_short: list[ShortFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    codecs: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    infos: dict[Path, VideoInfo] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when at least one video is usable."""
        return self.usable > 0

    def to_dict(self) -> dict:
        """A JSON-ready summary (paths as printable text; no per-video probe details)."""
        return {
            "root": printable(self.root),
            "classes": [printable(c) for c in self.classes],
            "counts": {printable(c): dict(v) for c, v in self.counts.items()},
            "total": self.total,
            "usable": self.usable,
            "frames": self.frames,
            "stride": self.stride,
            "frames_needed": self.frames_needed,
            "unreadable": [
                {"path": printable(u.path), "class": printable(u.label), "split": u.split, "reason": u.reason}
                for u in self.unreadable
            ],
            "too_short": [
                {"path": printable(s.path), "class": printable(s.label), "split": s.split,
                 "num_frames": s.num_frames, "needed": s.needed}
                for s in self.too_short
            ],
            "skipped": [{"path": printable(s.path), "reason": s.reason} for s in self.skipped],
            "ranges": {k: [v[0], v[1]] for k, v in self.ranges.items()},
            "codecs": dict(self.codecs),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


def _probe_one(record: VideoRecord) -> VideoInfo:
    """Probe headers and decode both ends; raise VideoDecodeError on any failure."""

    info = decode.probe_video(record.path)
    decode.verify_readable(record.path, info)
    return info


def _probe_safely(record: VideoRecord) -> VideoInfo | str:
    """The probe result, or the reason it failed (never raises: one bad file must not stop the check)."""
    try:
        return _probe_one(record)
    except VideoDecodeError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - any decoder surprise is reported per file
        return f"{type(e).__name__}: {e}"


def check_dataset(
    index: DatasetIndex,
    frames: int = 16,
    stride: int = 1,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Probe every video of ``index`` and report what is usable (see the module docstring).

    ``progress(done, total)`` is called from the calling thread after each video.
    Never raises for a bad video; each one is listed in ``unreadable`` with its reason.
    """
    if frames < 1 or stride < 1:

        raise ConfigError(f"--frames and --stride must be at least 1 (got {frames} and {stride})")

    started = time.perf_counter()
    records = list(index.records)
    needed = (frames - 1) * stride + 1
    results: list[VideoInfo | str | None] = [None] * len(records)
    if records:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(_probe_safely, r): i for i, r in enumerate(records)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, len(records))

    counts = {c: {s: 0 for s in SPLITS} for c in index.classes}
    report = CheckReport(
        root=index.root, classes=list(index.classes), counts=counts, total=len(records), usable=0,
        frames=frames, stride=stride, frames_needed=needed, skipped=list(index.skipped),
    )
    for record, result in zip(records, results):
        if not isinstance(result, VideoInfo):
            report.unreadable.append(UnreadableFile(record.path, record.label, record.split, str(result)))
            continue
        report.usable += 1
        report.infos[record.path] = result
        counts.setdefault(record.label, {s: 0 for s in SPLITS})[record.split or "train"] += 1
        report.codecs[result.codec] = report.codecs.get(result.codec, 0) + 1
        if result.num_frames < needed:
            report.too_short.append(ShortFile(record.path, record.label, record.split, result.num_frames, needed))
    infos = list(report.infos.values())
    if infos:
        for name in ("duration", "fps", "width", "height", "num_frames"):
            values = [float(getattr(i, name)) for i in infos]
            report.ranges[name] = (min(values), max(values))
    report.warnings = _warnings(report)
    report.seconds = time.perf_counter() - started
    return report


def _warnings(report: CheckReport) -> list[str]:
    """Dataset-level problems worth a sentence each."""
    out = []
    if report.usable == 0:
        out.append("no usable video: nothing can be trained or evaluated")
        return out
    no_train = [c for c, v in report.counts.items() if v["train"] == 0]
    if no_train:
        out.append(f"class(es) without a usable training video: {', '.join(no_train)}")
    for split in SPLITS:
        if sum(v[split] for v in report.counts.values()) == 0:
            out.append(f"the {split} split has no usable video")
        elif split != "train":
            missing = [c for c, v in report.counts.items() if v[split] == 0]
            if missing:
                out.append(f"class(es) without a usable {split} video (their {split} accuracy cannot be measured): "
                           f"{', '.join(missing)}")
    return out


def drop_unreadable(index: DatasetIndex, report: CheckReport) -> DatasetIndex:
    """A copy of ``index`` without the videos ``report`` found unreadable (moved to ``skipped`` with the reason)."""
    bad = {u.path: u.reason for u in report.unreadable}
    records = [r for r in index.records if r.path not in bad]
    skipped = list(index.skipped) + [SkippedFile(p, reason) for p, reason in bad.items()]
    return DatasetIndex(root=index.root, classes=list(index.classes), records=records, skipped=skipped)
