"""Screening a dataset before training: what a run will not use, and why.

:func:`screen_dataset` lists the files the scanner skipped (not videos,
empty, left out by a few-shot manifest), then probes and decodes every video
at its start and end (as ``vtransfer check`` does) and removes the unreadable
ones from every split, so neither training nor evaluation ever sees them. A
run stops here, before any training, when more than ``--max-bad-fraction`` of
its training videos cannot be read.

Also the two helpers that turn bad files into the run folder's
``bad_videos.json`` entries (:func:`summarize_decode_errors`) and into one
readable line (:func:`describe_bad_videos`); the trainer uses them for clips
that fail to decode during an epoch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from vtransfer.data.check import CheckReport, check_dataset, drop_unreadable, printable
from vtransfer.data.records import DatasetIndex
from vtransfer.data.sniff import VIDEO_EXTENSIONS
from vtransfer.utils.errors import DatasetError
from vtransfer.utils.hashing import file_stamp


class MessageSink(Protocol):
    """Anything that takes one line of text (a run's reporter)."""

    def message(self, text: str) -> None:
        """Show one line to the user."""


def summarize_decode_errors(errors: list[tuple[str, str]], epoch: int) -> list[dict[str, Any]]:
    """``(path, reason)`` pairs of failed clips -> one ``{path, reason, epoch, count}`` per video, sorted by path.

    Paths are made printable (undecodable bytes as ``\\xNN``) so the entries are valid UTF-8 JSON.
    """
    counts = Counter((printable(path), str(reason)) for path, reason in errors)
    return [{"path": path, "reason": reason, "epoch": epoch, "count": n} for (path, reason), n in sorted(counts.items())]


def describe_bad_videos(entries: list[dict[str, Any]], limit: int = 10, root: str | None = None) -> str:
    """A human list of bad files: ``a.mp4 (reason), b.mp4 (reason) and N more`` (paths relative to ``root``)."""

    def name(path: str) -> str:
        return path[len(root) + 1:] if root and path.startswith(root.rstrip("/") + "/") else path

    shown = ", ".join(f"{name(e['path'])} ({e['reason']})" for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def screen_dataset(index: DatasetIndex, max_bad_fraction: float, workers: int = 2, reporter: MessageSink | None = None):
    """Report the files a run will not use, and drop the videos that cannot be decoded, before training.

    Files the scanner skipped (``index.skipped``: zero-byte, text, images,
    symlink loops, ...) are listed. Every video is then probed and decoded at
    its start and end as ``vtransfer check`` does
    (:func:`vtransfer.data.check.check_dataset`); unreadable ones are removed
    from every split, so neither training nor evaluation ever sees them. The
    reporter gets one warning line for each kind of problem.

    Returns ``(index, skipped, unreadable)``: the index without unreadable
    videos (classes unchanged), ``[{path, reason}]`` of skipped files, and
    ``[{path, reason, epoch: 0, count: 1}]`` of unreadable videos.

    Raises:
        DatasetError: more than ``max_bad_fraction`` of the train split is unreadable
            (names the first files and the reasons).
    """

    def say(text: str) -> None:
        if reporter is not None:
            reporter.message(text)

    skipped = [{"path": printable(s.path), "reason": s.reason} for s in index.skipped]
    # Notes and CSVs beside the class folders (README, categories.csv) are expected: listed, not warned about.
    # Videos the manifest leaves out (a few-shot draw) were chosen: one line says how many.
    notable = [s for s, raw in zip(skipped, index.skipped) if not raw.left_out
               and not (raw.path.parent == index.root and raw.path.suffix.lower() not in VIDEO_EXTENSIONS)]
    left_out = [raw for raw in index.skipped if raw.left_out]
    if left_out:
        say(f"{len(left_out)} video(s) in {printable(index.root)} are not used: {left_out[0].reason}")
    if notable:
        say(f"warning: {len(notable)} file(s) in {printable(index.root)} are not used: "
            f"{describe_bad_videos(notable, root=printable(index.root))}")
    report = _checked(index, workers)
    unreadable = summarize_decode_errors([(u.path, u.reason) for u in report.unreadable], epoch=0)
    if not unreadable:
        return index, skipped, unreadable
    train = [r for r in index.records if r.split == "train"]
    bad_train = [u for u in report.unreadable if u.split == "train"]
    if train and (len(bad_train) == len(train) or len(bad_train) / len(train) > max_bad_fraction):
        raise DatasetError(
            f"{len(bad_train)} of {len(train)} training videos in {printable(index.root)} cannot be decoded "
            f"(more than --max-bad-fraction {max_bad_fraction:g}): {describe_bad_videos(unreadable)}; "
            "run `vtransfer check` for the full list"
        )
    say(f"warning: {len(unreadable)} video(s) in {printable(index.root)} cannot be decoded and are "
        f"left out of every split: {describe_bad_videos(unreadable, root=printable(index.root))}")
    for warning in report.warnings:
        say(f"warning: {warning}")
    return drop_unreadable(index, report), skipped, unreadable


# check results of this process, so the runs of one compare-policies screen the videos once
_CHECKS: dict[tuple, CheckReport] = {}


def _checked(index: DatasetIndex, workers: int) -> CheckReport:
    """``check_dataset(index)``, reused while no file (path, size, mtime) or split has changed."""
    key = tuple((str(r.path), r.split, *file_stamp(r.path)) for r in index.records)
    if key not in _CHECKS:
        _CHECKS.clear()
        _CHECKS[key] = check_dataset(index, workers=max(1, workers))
    return _CHECKS[key]
