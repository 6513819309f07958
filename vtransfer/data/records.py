"""Plain data types shared by the data package: what a dataset *is*.

A dataset is a list of :class:`VideoRecord` (file, class, split, group), the
sorted class names, and the files that were looked at and skipped, each with
the reason. Scanning, splitting, manifests and ``check`` all speak these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class VideoRecord:
    """One video of the dataset.

    Attributes:
        path: absolute path of the video file.
        label: class name (the folder it sits in).
        split: ``train``, ``val``, ``test`` or ``None`` before splitting.
        group: the ``--group-pattern`` capture (``g07``, ``person01``) or ``None``.
    """

    path: Path
    label: str
    split: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file that was looked at and not used, with the reason (shown by ``check``).

    ``left_out`` marks a readable video that the split manifest does not list:
    a choice (a few-shot draw, a user's own manifest), not a fault of the file.
    """

    path: Path
    reason: str
    left_out: bool = False


@dataclass
class VideoInfo:
    """What a cheap probe (container headers, no full decode) says about a video.

    ``num_frames`` is the stream's frame count when the container states it,
    otherwise an estimate from duration x fps (``frames_exact`` says which).
    """

    path: Path
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str
    frames_exact: bool = True


@dataclass
class DatasetIndex:
    """A scanned dataset: root, sorted class names, records and skipped files."""

    root: Path
    classes: list[str]
    records: list[VideoRecord]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class name -> label index (classes are sorted)."""
        return {c: i for i, c in enumerate(self.classes)}

    def split(self, name: str) -> list[VideoRecord]:
        """Records of one split (``train``, ``val`` or ``test``)."""
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{class: {split: count}}`` for every class (splits with no videos give 0)."""
        out = {c: {s: 0 for s in SPLITS} for c in self.classes}
        for r in self.records:
            out[r.label][r.split or "train"] += 1
        return out
