"""Train/val/test splits: stratified and group-aware, saved to and read from manifests.

A *group* is what ``--group-pattern REGEX`` captures from a file name (its
first capture group, or the whole match when it has none): UCF-101's ``g07``
in ``v_Archery_g07_c02.avi``, KTH's ``person01``. Groups are global: every
video whose name yields the same group lands in the same split, whatever its
class, so near-duplicate clips (same person, same scene) never straddle train
and test. A file the pattern does not match is a group of its own.

The manifest is a CSV file with the columns ``path,class,split,group``. Paths
inside the manifest's folder are stored relative to it (the data can move
with its manifest); other paths are stored absolute (the manifest can move
alone). Writing a manifest that was just read gives the same bytes.

The split is hand-written rather than scikit-learn's on purpose. Its
splitters draw with NumPy and size a split over the whole set
(``StratifiedShuffleSplit`` rounds ``test_size`` globally, then spreads it
over the classes), so they would put other videos, in other per-class counts,
in train/val/test than every earlier run and ``vtransfer demo`` used; they
refuse a class of one video; and none combines stratification, groups shared
across classes and arbitrary ratios (``StratifiedGroupKFold`` makes 1/k folds
and needs at least k groups, ``GroupShuffleSplit`` does not stratify).
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from vtransfer.data.records import SPLITS, DatasetIndex, SkippedFile, VideoRecord
from vtransfer.run_config import parse_ratios
from vtransfer.utils.atomic import atomic_write_bytes
from vtransfer.utils.errors import ConfigError, DatasetError

DEFAULT_RATIOS: tuple[float, float, float] = (0.7, 0.15, 0.15)
#: UCF-101 names videos ``v_<Class>_g<group>_c<clip>.avi``; used to carve val out of a trainlist.
UCF_GROUP_PATTERN = r"_g(\d+)_c\d+"
MANIFEST_COLUMNS = ("path", "class", "split", "group")
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # file names that are not valid UTF-8 survive a round trip
_MAX_NAMED = 10


# ----------------------------------------------------------------------------- options


def check_ratios(ratios: Sequence[float] | str) -> tuple[float, float, float]:
    """Train/val/test ratios checked by :func:`~vtransfer.run_config.parse_ratios`'s rule, scaled to sum to exactly 1.

    Fractions summing to 1 and percentages summing to 100 are accepted
    (``(0.7, 0.15, 0.15)`` and ``(70, 15, 15)`` give the same split).

    Raises:
        ConfigError: not three numbers, a negative one, a zero train share, or a sum that is neither 1 nor 100.
    """
    values = parse_ratios(ratios if isinstance(ratios, str) else tuple(ratios))
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def compile_group_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a ``--group-pattern`` regex, turning a syntax error into a ConfigError."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--group-pattern {pattern!r} is not a valid regular expression: {e}") from e


def group_of(name: str, regex: re.Pattern[str]) -> str | None:
    """The group of a file name: first capture group if the regex has one, else the whole match; None if no match."""
    m = regex.search(name)
    if m is None:
        return None
    if regex.groups:
        value = m.group(1)
        return value if value is not None else m.group(0)
    return m.group(0)


def assign_groups(records: Iterable[VideoRecord], group_pattern: str) -> list[VideoRecord]:
    """Copies of ``records`` with ``group`` set from ``group_pattern`` applied to each file name."""
    regex = compile_group_pattern(group_pattern)
    return [replace(r, group=group_of(r.path.name, regex)) for r in records]


# ----------------------------------------------------------------------------- splitting


def _largest_remainder(n: int, ratios: Sequence[float], rng: random.Random) -> list[int]:
    """Integers summing to ``n`` proportional to ``ratios``; remainder ties broken by ``rng``."""
    exact = [n * r for r in ratios]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), rng.random()))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _required_splits(units: int, ratios: Sequence[float]) -> set[int]:
    """Splits that must hold at least one of a class's ``units`` videos (or groups)."""
    needed: set[int] = {0} if units >= 1 else set()
    if units >= 3:
        needed |= {s for s in (1, 2) if ratios[s] > 0}
    elif units == 2:
        candidates = [s for s in (2, 1) if ratios[s] > 0]  # test first on a tie
        if candidates:
            needed.add(max(candidates, key=lambda s: ratios[s]))
    return needed


def _class_targets(n: int, units: int, ratios: Sequence[float], rng: random.Random) -> list[int]:
    """Per-split video counts a class should get: proportional, then bumped so required splits are non-zero."""
    targets = _largest_remainder(n, ratios, rng)
    needed = _required_splits(units, ratios)
    for s in sorted(needed):
        if targets[s] > 0:
            continue
        donors = [d for d in range(3) if targets[d] > (1 if d in needed else 0)]
        if donors:
            donor = max(donors, key=lambda d: targets[d])
            targets[donor] -= 1
            targets[s] += 1
    return targets


def _class_rng(seed: int, label: str) -> random.Random:
    """A generator per (seed, class) so one class's rounding does not depend on the others."""
    return random.Random(f"{seed}/".encode() + label.encode(_ENCODING, _ERRORS))


_CostChange = Callable[[Counter, int, int], float]


def _fill_required_splits(
    order: list[str],
    composition: dict[str, Counter],
    split_of_unit: dict[str, int],
    counts: dict[str, list[int]],
    needed: dict[str, set[int]],
    change: _CostChange,
) -> None:
    """Move units so every class has a video in each split it requires, where that is possible.

    Greedy placement follows proportions and may leave a small class without
    val or test. Each repair moves the unit whose move costs least in
    proportions and leaves no other required split empty; it stops when no
    such move exists.
    """
    while True:
        moves = []
        for c in sorted(needed):
            for s in sorted(needed[c]):
                if counts[c][s] > 0:
                    continue
                for key in order:
                    per_class, d = composition[key], split_of_unit[key]
                    if c not in per_class or d == s:
                        continue
                    if any(counts[c2][d] == m and d in needed[c2] for c2, m in per_class.items()):
                        continue  # would empty another required split
                    cost = change(per_class, d, -1) + change(per_class, s, +1)
                    moves.append((round(cost, 9), key, d, s))
        if not moves:
            return
        _, key, d, s = min(moves)
        split_of_unit[key] = s
        for c, m in composition[key].items():
            counts[c][d] -= m
            counts[c][s] += m


def _improve_by_moves(
    order: list[str],
    composition: dict[str, Counter],
    split_of_unit: dict[str, int],
    counts: dict[str, list[int]],
    needed: dict[str, set[int]],
    change: _CostChange,
    allowed: list[int],
    passes: int = 20,
) -> None:
    """Hill-climb: move single units to another split while that brings the class counts closer to their targets.

    Greedy placement of large groups can overshoot; a few passes of improving
    moves fix most of it. A move never empties a split a class requires.
    """
    for _ in range(passes):
        improved = False
        for key in order:
            per_class, d = composition[key], split_of_unit[key]
            if any(counts[c][d] == m and d in needed[c] for c, m in per_class.items()):
                continue
            leave = change(per_class, d, -1)
            best, best_delta = d, -1e-9
            for s in allowed:
                if s != d:
                    delta = leave + change(per_class, s, +1)
                    if delta < best_delta:
                        best, best_delta = s, delta
            if best != d:
                split_of_unit[key] = best
                for c, m in per_class.items():
                    counts[c][d] -= m
                    counts[c][best] += m
                improved = True
        if not improved:
            return


def stratified_split(
    records: Sequence[VideoRecord],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    group_pattern: str | None = None,
) -> list[VideoRecord]:
    """Assign every record to ``train``/``val``/``test``, stratified per class and group-aware.

    Without groups, each class is split exactly in the proportions ``ratios``
    (largest-remainder rounding). With groups (``group_pattern``, or groups the
    records already carry), whole groups are placed greedily, largest first,
    into the split that brings every class's counts closest to its targets.
    Every class with at least 3 videos (or groups) gets at least one video in
    train, val and test (where that ratio is non-zero); a class with 2 gets
    train plus the larger of val/test; a class with 1 gets train.

    Deterministic for a given ``seed`` and set of records (input order does not
    matter). Returns copies of the records, in input order, with ``split`` (and
    ``group`` when a pattern is given) set.
    """
    ratios = check_ratios(ratios)
    records = list(records)
    if group_pattern is not None:
        records = assign_groups(records, group_pattern)
    if not records:
        return []

    # Units are what gets placed: a whole group, or a single ungrouped file.
    units: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        key = f"g:{r.group}" if r.group is not None else f"f:{r.label}\x00{r.path}"
        units.setdefault(key, []).append(i)
    classes = sorted({r.label for r in records})
    size = {c: 0 for c in classes}
    units_of = {c: 0 for c in classes}
    for members in units.values():
        for c in {records[i].label for i in members}:
            units_of[c] += 1
        for i in members:
            size[records[i].label] += 1

    targets = {c: _class_targets(size[c], units_of[c], ratios, _class_rng(seed, c)) for c in classes}
    needed = {c: _required_splits(units_of[c], ratios) for c in classes}
    counts = {c: [0, 0, 0] for c in classes}
    allowed = [s for s in range(3) if ratios[s] > 0]

    order = sorted(units)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda k: -len(units[k]))  # stable: ties keep the seeded order

    composition = {key: Counter(records[i].label for i in members) for key, members in units.items()}

    def change(per_class: Counter, s: int, sign: int) -> float:
        """Change of the squared-deviation cost when a unit joins (+1) or leaves (-1) split ``s``."""
        total = 0.0
        for c, m in per_class.items():
            x, t = counts[c][s], targets[c][s]
            total += ((x + sign * m - t) ** 2 - (x - t) ** 2) / size[c]
        return total

    split_of_unit: dict[str, int] = {}
    for key in order:
        best = min(allowed, key=lambda s: (round(change(composition[key], s, +1), 9), s))
        split_of_unit[key] = best
        for c, m in composition[key].items():
            counts[c][best] += m
    _fill_required_splits(order, composition, split_of_unit, counts, needed, change)
    _improve_by_moves(order, composition, split_of_unit, counts, needed, change, allowed)

    out = list(records)
    for key, members in units.items():
        for i in members:
            out[i] = replace(records[i], split=SPLITS[split_of_unit[key]])
    return out


# ----------------------------------------------------------------------------- manifests


def _manifest_path(video: Path, base: str) -> str:
    """``video`` relative to ``base`` (with ``/``) when it lies inside it, else absolute."""
    absolute = os.path.abspath(video)
    try:
        rel = os.path.relpath(absolute, base)
    except ValueError:  # another drive on Windows
        return absolute
    if rel == os.curdir or rel.split(os.sep)[0] == os.pardir or os.path.isabs(rel):
        return absolute
    return rel.replace(os.sep, "/")


def write_manifest(path: Path, index: DatasetIndex) -> None:
    """Save ``index``'s records (path, class, split, group) to a CSV manifest, atomically."""
    path = Path(path)
    base = os.path.abspath(path.parent)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in index.records:
        writer.writerow([_manifest_path(r.path, base), r.label, r.split or "", r.group or ""])
    atomic_write_bytes(path, buffer.getvalue().encode(_ENCODING, _ERRORS))


def _name_some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    return shown + (f" (and {len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def read_manifest(path: Path, *, check_files: bool = True) -> DatasetIndex:
    """Read a manifest written by :func:`write_manifest` into a :class:`DatasetIndex`.

    Relative paths are resolved against the manifest's folder. The index's
    ``root`` is the deepest folder holding every video's folder (the dataset
    folder, for a manifest of one dataset). Rows keep their order; classes are sorted.

    Raises:
        DatasetError: the file is missing or malformed (the message gives the
            line), a split name is unknown, a path is listed twice, or (with
            ``check_files``) listed videos do not exist (the message names them).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig", _ERRORS)
    except OSError as e:
        raise DatasetError(f"cannot read manifest {path}: {e.strerror or e}") from e
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise DatasetError(f"manifest {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("path", "class", "split") if c not in header]
    if missing:
        raise DatasetError(
            f"manifest {path} has no {', '.join(missing)} column(s); expected a header {','.join(MANIFEST_COLUMNS)}"
        )
    col = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
    base = Path(os.path.abspath(path.parent))
    records: list[VideoRecord] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DatasetError(f"manifest {path} line {line_no}: expected {len(header)} columns, got {len(row)}")
        raw, label, split = row[col["path"]], row[col["class"]], row[col["split"]].strip()
        group = row[col["group"]] if "group" in col else ""
        if not raw or not label:
            raise DatasetError(f"manifest {path} line {line_no}: empty path or class")
        if split and split not in SPLITS:
            raise DatasetError(
                f"manifest {path} line {line_no}: split {split!r} is not one of {', '.join(SPLITS)}"
            )
        video = Path(raw) if os.path.isabs(raw) else Path(os.path.abspath(base / raw))
        if str(video) in seen:
            raise DatasetError(f"manifest {path} line {line_no}: {raw} is listed twice")
        seen.add(str(video))
        records.append(VideoRecord(path=video, label=label, split=split or None, group=group or None))
    if not records:
        raise DatasetError(f"manifest {path} lists no videos")
    if check_files:
        gone = [str(r.path) for r in records if not r.path.is_file()]
        if gone:
            raise DatasetError(f"manifest {path} lists {len(gone)} video(s) that do not exist: {_name_some(gone)}")
    root = Path(os.path.commonpath([os.path.dirname(r.path) for r in records]))
    return DatasetIndex(root=root, classes=sorted({r.label for r in records}), records=records, skipped=[])


# ----------------------------------------------------------------------------- UCF-101 split lists


def find_split_lists(split_files: Path) -> tuple[Path, Path]:
    """Locate a ``trainlistNN.txt`` and its ``testlistNN.txt``.

    ``split_files`` is a folder (the lowest-numbered train list in it is used)
    or one of the two files (its partner is looked up beside it).
    """
    split_files = Path(split_files)
    if split_files.is_dir():
        trains = sorted(p for p in split_files.iterdir() if re.fullmatch(r"trainlist\w*\.txt", p.name, re.I))
        if not trains:
            raise DatasetError(f"split-files folder {split_files} holds no trainlistNN.txt")
        train = trains[0]
    elif split_files.is_file():
        m = re.fullmatch(r"(train|test)list(\w*)\.txt", split_files.name, re.I)
        if m is None:
            raise DatasetError(f"split file {split_files} should be named trainlistNN.txt or testlistNN.txt")
        train = split_files.with_name(f"trainlist{m.group(2)}.txt") if m.group(1).lower() == "test" else split_files
    else:
        raise DatasetError(f"split files {split_files} do not exist")
    suffix = re.fullmatch(r"trainlist(\w*)\.txt", train.name, re.I).group(1)  # type: ignore[union-attr]
    test = train.with_name(f"testlist{suffix}.txt")
    for p in (train, test):
        if not p.is_file():
            raise DatasetError(f"split file {p} does not exist (need both trainlist and testlist)")
    return train, test


def read_split_list(path: Path) -> list[str]:
    """Entries (``Class/video.avi``) of one UCF-style list; a trailing class number is dropped."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig", _ERRORS)
    except OSError as e:
        raise DatasetError(f"cannot read split file {path}: {e.strerror or e}") from e
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(.*\S)\s+\d+", line)
        entries.append((m.group(1) if m else line).replace("\\", "/"))
    return entries


def apply_split_lists(
    index: DatasetIndex,
    split_files: Path,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    group_pattern: str | None = None,
) -> DatasetIndex:
    """Split a scanned flat dataset by UCF-101 style train/test lists.

    Entries are matched to files by ``class/name`` relative to the dataset
    root, ignoring case (UCF-101's lists spell ``HandStandPushups`` where the
    folder says ``HandstandPushups``), then by file name alone when that is
    unique. Validation is carved out of train with ``ratios``' train:val share,
    keeping groups together (``group_pattern``, by default UCF's ``_gNN_``).
    Videos in the folder that neither list names are reported as skipped.

    Raises:
        DatasetError: a list names videos that are neither found nor already
            skipped by the scanner (the message names them), or a video is in both lists.
    """
    ratios = check_ratios(ratios)
    train_list, test_list = find_split_lists(split_files)
    root = index.root
    by_rel: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for i, r in enumerate(index.records):
        rel = os.path.relpath(os.path.abspath(r.path), root).replace(os.sep, "/").lower()
        by_rel[rel] = i
        by_name.setdefault(r.path.name.lower(), []).append(i)
    skipped_keys = {os.path.relpath(os.path.abspath(s.path), root).replace(os.sep, "/").lower() for s in index.skipped}
    skipped_keys |= {s.path.name.lower() for s in index.skipped}

    split_of: dict[int, str] = {}
    missing: list[str] = []
    for split, list_path in (("train", train_list), ("test", test_list)):
        for entry in read_split_list(list_path):
            key = entry.lower()
            i = by_rel.get(key)
            if i is None:
                candidates = by_name.get(key.rsplit("/", 1)[-1], [])
                i = candidates[0] if len(candidates) == 1 else None
            if i is None:
                if key not in skipped_keys and key.rsplit("/", 1)[-1] not in skipped_keys:
                    missing.append(entry)
                continue
            if split_of.get(i, split) != split:
                raise DatasetError(f"{entry} is listed in both {train_list.name} and {test_list.name}")
            split_of[i] = split
    if missing:
        raise DatasetError(
            f"split files {train_list.name}/{test_list.name} list {len(missing)} video(s) not found under "
            f"{root}: {_name_some(missing)}"
        )
    pattern = group_pattern if group_pattern is not None else UCF_GROUP_PATTERN
    skipped = list(index.skipped)
    train, test = [], []
    for i, r in enumerate(index.records):
        split = split_of.get(i)
        if split is None:
            skipped.append(SkippedFile(r.path, f"not listed in {train_list.name} or {test_list.name}"))
        elif split == "train":
            train.append(replace(r, split="train"))
        else:
            test.append(replace(r, split="test"))
    if ratios[1] > 0 and train:
        share = ratios[1] / (ratios[0] + ratios[1])
        train = stratified_split(train, (1.0 - share, share, 0.0), seed, pattern)
    test = assign_groups(test, pattern)
    records = train + test
    records.sort(key=lambda r: (SPLITS.index(r.split or "train"), r.label, str(r.path)))
    return DatasetIndex(root=root, classes=sorted({r.label for r in records}), records=records, skipped=skipped)
