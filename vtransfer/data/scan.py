"""Find the videos of a dataset folder and turn them into a split :class:`DatasetIndex`.

Two layouts are understood::

    DATA/<class>/<video>                     # split made by vtransfer (see splits.py)
    DATA/{train,val,test}/<class>/<video>    # split given by the folders

Videos may sit in sub-folders of a class folder. Files are recognised by their
content (:mod:`vtransfer.data.sniff`); everything looked at and not used is
listed in ``DatasetIndex.skipped`` with the reason. Scanning never decodes a
video, so it costs one ``stat`` and one small read per file.

:func:`load_dataset` is the single entry point the rest of vtransfer calls: it
scans (or reads a manifest), applies the split and checks the result.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vtransfer.data.records import SPLITS, DatasetIndex, SkippedFile, VideoRecord
from vtransfer.data.sniff import classify_file, is_hidden
from vtransfer.data.splits import (
    DEFAULT_RATIOS,
    apply_split_lists,
    assign_groups,
    check_ratios,
    read_manifest,
    stratified_split,
)
from vtransfer.utils.errors import DatasetError

_SPLIT_ORDER = {name: i for i, name in enumerate(SPLITS)}


def _dir_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of the directory ``path`` points to, following links; None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _list_dir(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


class _Walker:
    """Recursive directory walk that follows links but never loops.

    Every real directory (device, inode) is entered at most once; a link back
    to a folder on the current path is reported as a symlink loop, a second
    link to a folder already scanned elsewhere as a duplicate.
    """

    def __init__(self, skipped: list[SkippedFile]):
        self.skipped = skipped
        self.visited: set[tuple[int, int]] = set()

    def enter(self, path: str, ancestors: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
        """Return the directory key if ``path`` may be entered, else record why not and return None."""
        key = _dir_key(path)
        if key is None:
            self.skipped.append(SkippedFile(Path(path), "cannot open folder"))
            return None
        if key in ancestors:
            self.skipped.append(SkippedFile(Path(path), "symlink loop (links back to a folder above it)"))
            return None
        if key in self.visited:
            self.skipped.append(SkippedFile(Path(path), "folder already scanned through another link"))
            return None
        self.visited.add(key)
        return key

    def videos(self, folder: str, ancestors: tuple[tuple[int, int], ...]) -> list[Path]:
        """All video files under ``folder`` (already entered), in sorted order."""
        found: list[Path] = []
        try:
            entries = _list_dir(folder)
        except OSError as e:
            self.skipped.append(SkippedFile(Path(folder), f"cannot list folder ({e.strerror or e})"))
            return found
        for entry in entries:
            full = os.path.join(folder, entry.name)
            if is_hidden(entry.name):
                kind = "hidden folder" if _is_dir(entry) else "hidden file"
                self.skipped.append(SkippedFile(Path(full), kind))
                continue
            if entry.is_symlink() and not os.path.exists(full):
                self.skipped.append(SkippedFile(Path(full), "broken symbolic link"))
                continue
            if _is_dir(entry):
                key = self.enter(full, ancestors)
                if key is not None:
                    found.extend(self.videos(full, ancestors + (key,)))
                continue
            if not _is_regular_file(full):
                self.skipped.append(SkippedFile(Path(full), "not a regular file"))
                continue
            verdict = classify_file(full)
            if verdict.is_video:
                found.append(Path(full))
            else:
                self.skipped.append(SkippedFile(Path(full), verdict.skip_reason or "not a video"))
        return found


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _scan_class_folders(
    folder: str, split: str | None, walker: _Walker, ancestors: tuple[tuple[int, int], ...]
) -> list[VideoRecord]:
    """Records of every class folder directly inside ``folder`` (a dataset root or a split folder).

    All class folders are registered before any is walked, so a link from one
    class into another is reported as a duplicate instead of stealing its videos.
    """
    classes: list[tuple[str, str, tuple[int, int]]] = []
    for entry in _list_dir(folder):
        full = os.path.join(folder, entry.name)
        if is_hidden(entry.name):
            walker.skipped.append(SkippedFile(Path(full), "hidden folder" if _is_dir(entry) else "hidden file"))
            continue
        if entry.is_symlink() and not os.path.exists(full):
            walker.skipped.append(SkippedFile(Path(full), "broken symbolic link"))
            continue
        if not _is_dir(entry):
            walker.skipped.append(SkippedFile(Path(full), "not inside a class folder"))
            continue
        key = walker.enter(full, ancestors)
        if key is not None:
            classes.append((entry.name, full, key))
    records: list[VideoRecord] = []
    for name, full, key in classes:
        before = len(walker.skipped)
        videos = walker.videos(full, ancestors + (key,))
        if not videos:
            reasons = sorted({s.reason for s in walker.skipped[before:]})
            detail = f" ({len(walker.skipped) - before} file(s) skipped: {'; '.join(reasons)})" if reasons else ""
            raise DatasetError(
                f"class folder {full} contains no video files{detail}; add videos or remove the folder"
            )
        records.extend(VideoRecord(path=p, label=name, split=split) for p in videos)
    return records


def detect_split_folders(root: Path) -> list[str]:
    """Names of the ``train``/``val``/``test`` folders directly inside ``root`` (empty for the flat layout)."""
    try:
        names = {e.name for e in os.scandir(root) if _is_dir(e)}
    except OSError as e:
        raise DatasetError(f"cannot read dataset folder {root}: {e.strerror or e}") from e
    return [s for s in SPLITS if s in names]


def scan_dataset(root: Path) -> DatasetIndex:
    """Scan a dataset folder (either layout) without decoding anything.

    Returns an index whose records carry the split when the folder has
    ``train``/``val``/``test`` sub-folders (``split=None`` otherwise), classes
    sorted by name, and every file looked at and not used in ``skipped``.

    Raises:
        DatasetError: ``root`` is not a folder, a class folder holds no video
            (the message names it), or split folders are mixed with other folders.
    """
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (give a dataset folder or a manifest .csv)")
    skipped: list[SkippedFile] = []
    walker = _Walker(skipped)
    root_key = walker.enter(str(root), ())
    if root_key is None:
        raise DatasetError(f"cannot open dataset folder {root}")
    split_names = detect_split_folders(root)
    records: list[VideoRecord] = []
    if split_names:
        others = []
        for entry in _list_dir(str(root)):
            full = os.path.join(str(root), entry.name)
            if entry.name in split_names:
                continue
            if is_hidden(entry.name):
                skipped.append(SkippedFile(Path(full), "hidden folder" if _is_dir(entry) else "hidden file"))
            elif _is_dir(entry):
                others.append(entry.name)
            else:
                skipped.append(SkippedFile(Path(full), "not inside a split folder"))
        if others:
            raise DatasetError(
                f"dataset folder {root} mixes split folders ({', '.join(split_names)}) with other folders "
                f"({', '.join(sorted(others))}); use either DATA/<class>/ or DATA/{{train,val,test}}/<class>/"
            )
        for split in split_names:
            split_dir = os.path.join(str(root), split)
            key = walker.enter(split_dir, (root_key,))
            if key is not None:
                records.extend(_scan_class_folders(split_dir, split, walker, (root_key, key)))
    else:
        records = _scan_class_folders(str(root), None, walker, (root_key,))
    records.sort(key=lambda r: (_SPLIT_ORDER.get(r.split or "", -1), r.label, str(r.path)))
    classes = sorted({r.label for r in records})
    return DatasetIndex(root=root, classes=classes, records=records, skipped=skipped)


def load_dataset(
    source: Path,
    *,
    manifest: Path | None = None,
    split_files: Path | None = None,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    split_seed: int = 0,
    group_pattern: str | None = None,
) -> DatasetIndex:
    """Load a dataset with every record assigned to ``train``, ``val`` or ``test``.

    ``source`` is a dataset folder or a manifest ``.csv`` (as written by
    :func:`vtransfer.data.splits.write_manifest`). For a folder, the split is
    taken from, in this order:

    1. its ``train``/``val``/``test`` sub-folders (``manifest`` and
       ``split_files`` are then ignored); when there is no ``val`` folder, a
       validation set is carved out of ``train`` (stratified, by group, with
       ``ratios`` and ``split_seed``);
    2. ``manifest``, an existing manifest file (files it lists that are gone are
       an error naming them; videos in the folder it does not list are reported
       as skipped);
    3. ``split_files``, UCF-101 style ``trainlistNN.txt``/``testlistNN.txt`` (a
       folder holding them, or one of the files); validation is carved out of
       train by group (``group_pattern``, by default UCF's ``_gNN_``);
    4. otherwise a stratified split with ``ratios`` and ``split_seed``,
       keeping ``group_pattern`` groups together.

    Raises:
        DatasetError: nothing usable, a single class, a class in val/test that
            has no training video, missing files, or any scanning error.
        ConfigError: bad ``ratios`` or ``group_pattern``.
    """
    ratios = check_ratios(ratios)
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source} is a file; give a dataset folder or a manifest .csv")
        index = read_manifest(source)
        if any(r.split is None for r in index.records):
            if any(r.split is not None for r in index.records):
                raise DatasetError(f"manifest {source} gives a split for some rows but not for others")
            index.records = stratified_split(index.records, ratios, split_seed, group_pattern)
        return _validated(index, source)

    index = scan_dataset(source)
    if any(r.split is not None for r in index.records):
        records = index.records
        if group_pattern is not None:
            records = assign_groups(records, group_pattern)
        if not any(r.split == "val" for r in records) and ratios[1] > 0:
            records = _carve_validation(records, ratios, split_seed, group_pattern)
        index.records = records
    elif manifest is not None:
        index = _index_from_manifest(index, Path(manifest))
    elif split_files is not None:
        index = apply_split_lists(index, Path(split_files), ratios, split_seed, group_pattern)
    else:
        index.records = stratified_split(index.records, ratios, split_seed, group_pattern)
    return _validated(index, index.root)


def _carve_validation(
    records: list[VideoRecord], ratios: tuple[float, float, float], seed: int, group_pattern: str | None
) -> list[VideoRecord]:
    """Move a stratified, group-respecting share of ``train`` into ``val``."""
    train = [r for r in records if r.split == "train"]
    rest = [r for r in records if r.split != "train"]
    if not train:
        return records
    share = ratios[1] / (ratios[0] + ratios[1])
    carved = stratified_split(train, (1.0 - share, share, 0.0), seed, group_pattern)
    return carved + rest


def _index_from_manifest(scanned: DatasetIndex, manifest: Path) -> DatasetIndex:
    """Records from ``manifest``; videos found by the scan but not listed there are reported as skipped."""
    index = read_manifest(manifest)
    listed = {os.path.normcase(os.path.abspath(r.path)) for r in index.records}
    skipped = list(scanned.skipped)
    for r in scanned.records:
        if os.path.normcase(os.path.abspath(r.path)) not in listed:
            skipped.append(SkippedFile(r.path, f"not listed in manifest {manifest.name}", left_out=True))
    return DatasetIndex(root=scanned.root, classes=index.classes, records=index.records, skipped=skipped)


def _validated(index: DatasetIndex, where: Path) -> DatasetIndex:
    """Sort classes, and refuse datasets that cannot train a classifier."""
    if not index.records:
        raise DatasetError(f"no videos found in {where}")
    index.classes = sorted({r.label for r in index.records})
    if len(index.classes) < 2:
        raise DatasetError(
            f"{where} has a single class ({index.classes[0]}); a classifier needs at least two class folders"
        )
    in_train = {r.label for r in index.records if r.split == "train"}
    for split in ("val", "test"):
        orphans = sorted({r.label for r in index.records if r.split == split} - in_train)
        if orphans:
            raise DatasetError(
                f"{where}: class(es) {', '.join(orphans)} appear in {split} but have no training video"
            )
    return index
