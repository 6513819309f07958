"""``vtransfer check DATA --audit``: is the split worth trusting before anything trains on it?

:func:`audit_dataset` decodes a fingerprint of every video (its frames as small grey thumbnails,
:mod:`vtransfer.evaluation.audit`), lists near-duplicate pairs that sit in different splits,
and, when a backbone is given, embeds the training videos with it and flags the ones whose label
a linear probe that never saw them finds unlikely (confident learning). It also says when file
names carry a person or session id that no ``--group-pattern`` uses. Everything is reported,
nothing is changed; a video that cannot be decoded is skipped and listed with the reason.

The fine-tuning pipeline can call :func:`audit_dataset` with its dataset index and the model it
loaded (:func:`load_audit_model` gives the same thing from a backbone name).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from vtransfer.data.decode import probe_video, read_clip
from vtransfer.data.records import SPLITS, DatasetIndex, VideoRecord
from vtransfer.evaluation.audit import (
    DUPLICATE_THRESHOLD,
    PROBE_FOLDS,
    AuditReport,
    DuplicatePair,
    Fingerprint,
    LabelSuspect,
    find_duplicates,
    fingerprint,
    label_issues,
    out_of_fold_probabilities,
    sampling,
    suggest_group_pattern,
)
from vtransfer.utils.atomic import atomic_write_json
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.utils.runtime import resolve_device
from vtransfer.workflows.extract import FeatureModel, compute_embeddings, embedding_size, load_feature_model

#: The file written into ``out``.
AUDIT_FILE = "audit.json"
#: Short side (pixels) frames are decoded at for the fingerprint (it keeps 24x24 of them).
FINGERPRINT_SHORT_SIDE = 64
#: Evaluation clips per training video averaged into its embedding for the label probe.
LABEL_CLIPS = 3

Records = DatasetIndex | Mapping[str, Sequence[VideoRecord]] | Sequence[VideoRecord]
Progress = Callable[[str, int, int], None]


def check_audit_options(threshold: float = DUPLICATE_THRESHOLD, clips_per_video: int = LABEL_CLIPS,
                        folds: int = PROBE_FOLDS, out: str | Path | None = None) -> None:
    """Reject option values that cannot work, before any video is decoded."""
    if not 0 < threshold <= 255:
        raise ConfigError(f"--dup-threshold {threshold}: a grey-level difference between 0 (exclusive) and 255")
    if clips_per_video < 1:
        raise ConfigError(f"clips per video {clips_per_video}: must be at least 1")
    if folds < 2:
        raise ConfigError(f"folds {folds}: the out-of-fold probe needs at least 2")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for {AUDIT_FILE}")


def load_audit_model(backbone: str | None, weights: str | None = None, preset: str | None = None,
                     size: int | None = None) -> FeatureModel | None:
    """The backbone whose features the label audit probes (None without ``backbone``), checked on a blank clip.

    Raises ConfigError for an unknown name, missing weights (random features say nothing about
    labels) or weights without a backbone, all before any video is decoded.
    """
    if backbone is None:
        if weights is not None or preset is not None:
            raise ConfigError("--weights and --preset need --backbone (the model whose features the label audit uses)")
        return None
    loaded = load_feature_model(backbone, weights, preset, size=size)
    embedding_size(loaded.model, next(loaded.model.parameters()).device)
    return loaded


def _records(data: Records) -> list[VideoRecord]:
    """Records with a split each (``train`` when none was given)."""
    if isinstance(data, DatasetIndex):
        records = list(data.records)
    elif isinstance(data, Mapping):
        records = []
        for split, items in data.items():
            if split not in SPLITS:
                raise ConfigError(f"split {split!r}: choose {', '.join(SPLITS)}")
            records += [replace(r, split=split) for r in items]
    else:
        records = list(data)
    return [r if r.split else replace(r, split="train") for r in records]


def fingerprint_video(path: str | Path) -> Fingerprint:
    """Decode up to :data:`~vtransfer.evaluation.audit.MAX_FRAMES` evenly spread frames of a video, fingerprinted.

    Raises:
        VideoDecodeError: the file cannot be probed or decoded.
    """
    info = probe_video(path)
    count, stride = sampling(info.num_frames)
    frames = read_clip(path, 0, count, stride, short_side=FINGERPRINT_SHORT_SIDE)
    return fingerprint(frames.numpy(), info.fps / stride)


def _fingerprint_safely(path: Path) -> Fingerprint | str:
    try:
        return fingerprint_video(path)
    except VideoDecodeError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the audit
        return f"{type(e).__name__}: {e}"


def audit_dataset(
    data: Records,
    *,
    model: FeatureModel | None = None,
    threshold: float = DUPLICATE_THRESHOLD,
    clips_per_video: int = LABEL_CLIPS,
    folds: int = PROBE_FOLDS,
    group_pattern: str | None = None,
    out: str | Path | None = None,
    workers: int = 2,
    batch_size: int = 8,
    device: str = "auto",
    progress: Progress | None = None,
) -> AuditReport:
    """Audit a split dataset; see the module docstring. Writes ``out/audit.json`` when ``out`` is given.

    Args:
        data: a :class:`DatasetIndex`, ``{split: records}``, or records (no split: ``train``).
        model: the backbone for the label audit (:func:`load_audit_model`); without one the
            label audit is skipped and the report says so.
        threshold: largest fingerprint difference (grey levels) reported as a near-duplicate.
        clips_per_video, folds: clips embedded per training video; folds of the probe.
        group_pattern: the ``--group-pattern`` in use (records that carry groups count as one too).
        progress: ``progress(stage, done, total)`` with stage ``fingerprints`` or ``embeddings``.
    """
    check_audit_options(threshold, clips_per_video, folds, out)
    started = time.perf_counter()
    records = _records(data)
    key = None if model is not None else _split_key(records, threshold, group_pattern)
    if key is not None and _LAST_PIXEL_AUDIT is not None and _LAST_PIXEL_AUDIT[0] == key:
        report = copy.deepcopy(_LAST_PIXEL_AUDIT[1])
        return _written(report, out)
    splits = {s: sum(r.split == s for r in records) for s in SPLITS}
    report = AuditReport(videos=len(records), splits=splits, duplicate_threshold=threshold, group_pattern=group_pattern)

    grouped = group_pattern is not None or any(r.group for r in records)
    if not grouped:
        report.group_suggestion = suggest_group_pattern([r.path.name for r in records])

    prints: dict[int, Fingerprint] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (i, result) in enumerate(zip(range(len(records)), pool.map(_fingerprint_safely, [r.path for r in records])), 1):
            if isinstance(result, Fingerprint):
                prints[i] = result
            else:
                report.skipped.append((records[i].path, result))
            if progress is not None:
                progress("fingerprints", done, len(records))

    kept = sorted(prints)
    if len({records[i].split for i in kept}) < 2:
        report.notes.append("only one split has decodable videos: no pair across splits to compare")
    found, report.pairs_compared = find_duplicates([prints[i] for i in kept], [records[i].split for i in kept], threshold)
    for a, b, match in found:
        ra, rb = records[kept[a]], records[kept[b]]
        report.duplicates.append(DuplicatePair(ra.path, ra.split, ra.label, rb.path, rb.split, rb.label, match))

    train = [records[i] for i in kept if records[i].split == "train"]
    if model is None:
        report.label_audit = ("skipped: give --backbone and --weights; the pixel fingerprints say what a video "
                              "looks like, not what happens in it, so a probe on them means little")
    else:
        _audit_labels(report, model, train, clips_per_video, folds, batch_size, device, progress)
    report.seconds = time.perf_counter() - started
    if key is not None:
        _remember(key, report)
    return _written(report, out)


# The last audit without a label probe, and what it was of: compare-policies runs every policy and stream on one
# split, and decoding every video again for each run was most of an audit's cost (seconds per run on the demo).
_LAST_PIXEL_AUDIT: tuple[tuple, AuditReport] | None = None


def _split_key(records: list[VideoRecord], threshold: float, group_pattern: str | None) -> tuple | None:
    """What a pixel audit depends on: each file (path, size, modification time), its split and label, and the options."""
    try:
        files = tuple((str(r.path.resolve()), r.path.stat().st_size, r.path.stat().st_mtime_ns, r.split, r.label, r.group)
                      for r in records)
    except OSError:
        return None
    return files, threshold, group_pattern


def _remember(key: tuple, report: AuditReport) -> None:
    global _LAST_PIXEL_AUDIT
    _LAST_PIXEL_AUDIT = (key, copy.deepcopy(report))


def _written(report: AuditReport, out: str | Path | None) -> AuditReport:
    """``report``, written to ``out/audit.json`` first when ``out`` is given."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out) / AUDIT_FILE, report.to_dict())
    return report


def _audit_labels(report: AuditReport, model: FeatureModel, train: list[VideoRecord], clips_per_video: int,
                  folds: int, batch_size: int, device: str, progress: Progress | None) -> None:
    """Embed the training videos, probe them out of fold, and list what confident learning flags."""
    counts: dict[str, int] = {}
    for r in train:
        counts[r.label] = counts.get(r.label, 0) + 1
    few = sorted(c for c, n in counts.items() if n < 2)
    usable = [r for r in train if counts[r.label] >= 2]
    if few:
        report.notes.append(f"label audit leaves out class(es) with fewer than 2 training videos: {', '.join(few)}")
    if len({r.label for r in usable}) < 2:
        report.label_audit = "skipped: fewer than two classes have at least 2 training videos"
        return
    dev = resolve_device(device)
    model.model.to(dev)
    emb = compute_embeddings(
        model.model, usable, clips_per_video=clips_per_video, batch_size=batch_size, device=dev,
        progress=None if progress is None else (lambda done, total: progress("embeddings", done, total)),
    )
    report.skipped += [(Path(f["path"]), f["reason"]) for f in emb.failed]
    classes = sorted({r.label for r in emb.records})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r.label] for r in emb.records])
    try:
        probs = out_of_fold_probabilities(emb.video.numpy(), labels, len(classes), folds)
    except ConfigError as e:
        report.label_audit = f"skipped: {e}"
        return
    k = min(folds, int(np.bincount(labels).min()))
    report.label_audit = (f"confident learning (cleanlab find_label_issues) on out-of-fold probabilities of a "
                          f"logistic-regression probe, {k}-fold over {len(labels)} training videos, on "
                          f"{model.description} features ({clips_per_video} clip(s) per video)")
    report.label_audited = len(labels)
    for i in label_issues(labels, probs):
        row = probs[i].copy()
        given = labels[i]
        row[given] = -1.0
        other = int(row.argmax())
        report.label_suspects.append(LabelSuspect(emb.records[i].path, classes[given], classes[other],
                                                  float(probs[i, given]), float(probs[i, other])))
