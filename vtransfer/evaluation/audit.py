"""The split audit's arithmetic: near-duplicate videos, probable label errors, group ids in file names.

Nothing here decodes a video or runs a model (:mod:`vtransfer.workflows.audit` does); the
functions take frames or features as arrays and return findings.

**Near-duplicates** (the same clip re-encoded, flipped, trimmed or renamed) are found from a
*frame fingerprint*: every frame (up to :data:`MAX_FRAMES`, evenly spread) as a 24x24 grey
thumbnail with its mean removed. Two videos are compared by sliding one along the other in time
(and its mirror image, for a flipped copy) on 8x8 thumbnails, keeping the three best offsets
that overlap at least half of the shorter video, and at each of them measuring the *difference*:
the median over the aligned frames of the largest grey-level difference (0-255) between the two
24x24 thumbnails. A pair at most :data:`DUPLICATE_THRESHOLD` apart is reported, with
``similarity = 1 - difference / 255``. The largest difference, not the mean, is what tells a copy
from another take of the same scene: on ``real_actions`` consecutive takes of one person in one
room differ from each other by less than a re-encoded copy does on average, but never as little
at their most different spot (see ``benchmarks/bench_audit.py``). Pooled backbone embeddings are
not used for this: they put planted copies further apart (cosine 0.76-0.98 with effnet3d on
``real_actions``) than two different takes of the same scene (up to 0.998).

**Probable label errors** follow confident learning (Northcutt et al., 2021): out-of-fold
class probabilities of a linear probe (standardised features, logistic regression,
stratified k-fold over the training split), then ``cleanlab.filter.find_label_issues``, which
flags a video whose given label gets a low probability while another class is confidently
predicted, ranked by the given label's probability.

**Group ids**: file names such as ``s01_x.mp4``, ``person03_y.avi`` or ``P2-take1.mp4`` name the
person or session; clips of one person on both sides of a split measure how well the model
recognises that person, not the action. :func:`suggest_group_pattern` proposes a
``--group-pattern`` for them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cleanlab.filter import find_label_issues
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from vtransfer.data.check import printable
from vtransfer.data.records import SPLITS
from vtransfer.utils.errors import ConfigError

#: Side of the grey thumbnail each frame is reduced to (the fingerprint).
THUMB_SIZE = 24
#: Side of the coarser thumbnail used to find the time offset between two videos.
ALIGN_SIZE = 8
#: Frames fingerprinted per video; longer videos are sampled with an even stride.
MAX_FRAMES = 160
#: Largest *difference* (grey levels, 0-255) at which two videos are reported as near-duplicates.
DUPLICATE_THRESHOLD = 25.0
#: Share of the shorter video that two videos must overlap at the offset compared.
MIN_OVERLAP = 0.5
#: Cross-split pairs compared one by one; above this, each video is compared with its nearest few only.
PAIR_BUDGET = 20_000
#: Nearest videos (by mean thumbnail) compared in full per video when the pairs exceed :data:`PAIR_BUDGET`.
NEAREST = 10
#: Folds of the out-of-fold probe (fewer when the smallest class has fewer training videos).
PROBE_FOLDS = 5
#: Inverse regularisation of the linear probe (features are standardised first).
PROBE_C = 1.0

THRESHOLD_TEXT = (
    "median over the aligned frames of the largest grey-level difference (0-255) between "
    f"{THUMB_SIZE}x{THUMB_SIZE} grey thumbnails, at the best time offset, mirrored or not"
)


# -- fingerprints ---------------------------------------------------------------------------------


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` matrix that averages (area resampling) a length-``n_in`` axis to ``n_out`` cells."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo = np.maximum(edges[:-1, None], np.arange(n_in)[None])
    hi = np.minimum(edges[1:, None], np.arange(n_in)[None] + 1)
    weights = np.clip(hi - lo, 0.0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def grey_frames(frames: np.ndarray) -> np.ndarray:
    """``T x H x W`` float32 luma (BT.601) from uint8 RGB ``T x 3 x H x W`` or ``T x H x W x 3`` (grey passes through)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        return frames.astype(np.float32)
    if frames.ndim != 4:
        raise ValueError(f"frames must be T x H x W or T x 3 x H x W, got shape {frames.shape}")
    channel_axis = 1 if frames.shape[1] == 3 else 3
    r, g, b = (np.take(frames, c, axis=channel_axis).astype(np.float32) for c in range(3))
    return 0.299 * r + 0.587 * g + 0.114 * b


@dataclass
class Fingerprint:
    """A video's frames as small grey thumbnails (``T x S x S``, each frame's mean removed) and their rate."""

    thumbs: np.ndarray
    rate: float  # thumbnails per second of video
    coarse: np.ndarray = field(init=False, repr=False)  # T x 8 x 8 block means, for finding the time offset

    def __post_init__(self) -> None:
        self.coarse = _coarse(self.thumbs)


def fingerprint(frames: np.ndarray, rate: float) -> Fingerprint:
    """The fingerprint of a video from its frames (RGB or grey, any size; see :func:`grey_frames`).

    ``rate``: frames per second of video in ``frames`` (the stream's fps divided by the sampling stride).
    """
    grey = grey_frames(frames)
    if len(grey) == 0:
        raise ValueError("no frames")
    _, h, w = grey.shape
    rows, cols = _area_matrix(h, THUMB_SIZE), _area_matrix(w, THUMB_SIZE)
    thumbs = np.einsum("ih,thw,jw->tij", rows, grey, cols, optimize=True)
    thumbs -= thumbs.mean(axis=(1, 2), keepdims=True)
    return Fingerprint(thumbs.astype(np.float32), float(rate) if rate and rate > 0 else 1.0)


def sampling(num_frames: int, max_frames: int = MAX_FRAMES) -> tuple[int, int]:
    """``(count, stride)`` of the frames to fingerprint: every frame, or an even stride keeping at most ``max_frames``."""
    num_frames = max(1, int(num_frames))
    stride = max(1, math.ceil(num_frames / max_frames))
    return math.ceil(num_frames / stride), stride


# -- comparing two videos -------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """How two fingerprints line up best: the difference there, mirrored or not, offset, overlap."""

    difference: float  # grey levels, see THRESHOLD_TEXT
    flipped: bool
    offset_seconds: float  # time in b of a's first frame (negative: a starts before b)
    overlap: float  # share of the shorter video compared

    @property
    def similarity(self) -> float:
        return 1.0 - self.difference / 255.0


def _resampled(fp: Fingerprint, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """``fp``'s thumbnails and coarse thumbnails at ``rate`` per second (nearest frame); as they are within 5%."""
    if abs(fp.rate - rate) <= 0.05 * rate:
        return fp.thumbs, fp.coarse
    count = max(1, round(len(fp.thumbs) * rate / fp.rate))
    index = np.minimum(np.round(np.arange(count) * fp.rate / rate).astype(int), len(fp.thumbs) - 1)
    return fp.thumbs[index], fp.coarse[index]


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    """``T x 8 x 8``: block means of ``T x 24 x 24`` thumbnails (for finding the time offset)."""
    t, s = len(thumbs), thumbs.shape[1]
    k = s // ALIGN_SIZE
    return thumbs.reshape(t, ALIGN_SIZE, k, ALIGN_SIZE, k).mean(axis=(2, 4))


def _diagonal_means(dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, means)``: the mean of ``dist[i, i + k]`` for every offset ``k`` from ``1 - m`` to ``n - 1``.

    Each row is shifted left by its index (a zero-padded reshape, no fancy indexing), so that
    diagonal ``k`` becomes column ``m + k``.
    """
    m, n = dist.shape
    padded = np.zeros((m, m + n), dtype=dist.dtype)
    padded[:, m:] = dist
    skew = np.concatenate([padded.ravel(), np.zeros(m, dtype=dist.dtype)]).reshape(m, m + n + 1)
    sums = skew.sum(axis=0)[1:m + n]
    offsets = np.arange(1 - m, n)
    counts = np.minimum(m, n - offsets) - np.maximum(0, -offsets)
    return offsets, sums / counts


def _best_offsets(ca: np.ndarray, cb: np.ndarray, keep: int = 3) -> list[int]:
    """Offsets ``k`` (frame ``i`` of a against ``i + k`` of b) overlapping at least :data:`MIN_OVERLAP`
    of the shorter video, with the smallest mean squared coarse difference."""
    ta, tb = len(ca), len(cb)
    need = max(1, math.ceil(MIN_OVERLAP * min(ta, tb)))
    dist = (ca**2).sum(1)[:, None] + (cb**2).sum(1)[None] - 2.0 * ca @ cb.T
    offsets, means = _diagonal_means(dist)
    means = np.where((offsets >= -(ta - need)) & (offsets <= tb - need), means, np.inf)
    return [int(offsets[i]) for i in np.argsort(means)[:keep] if np.isfinite(means[i])]


def compare(a: Fingerprint, b: Fingerprint) -> Match:
    """The best alignment of ``a`` with ``b`` or with ``b`` mirrored left-right, and its difference."""
    rate = min(a.rate, b.rate)
    (ta, ca), (tb0, cb0) = _resampled(a, rate), _resampled(b, rate)
    ca = ca.reshape(len(ca), -1)
    best: Match | None = None
    for flipped in (False, True):
        tb = tb0[:, :, ::-1] if flipped else tb0
        cb = (cb0[:, :, ::-1] if flipped else cb0).reshape(len(cb0), -1)
        for k in _best_offsets(ca, cb):
            i0, j0 = (0, k) if k >= 0 else (-k, 0)
            n = min(len(ta) - i0, len(tb) - j0)
            worst = np.abs(ta[i0:i0 + n] - tb[j0:j0 + n]).reshape(n, -1).max(axis=1)
            match = Match(float(np.median(worst)), flipped, k / rate, n / min(len(ta), len(tb)))
            if best is None or match.difference < best.difference:
                best = match
    assert best is not None
    return best


# -- near-duplicates across splits -----------------------------------------------------------------


@dataclass(frozen=True)
class DuplicatePair:
    """Two videos in different splits that look like copies of one clip."""

    a: Path
    a_split: str
    a_label: str
    b: Path
    b_split: str
    b_label: str
    match: Match

    def to_dict(self) -> dict[str, Any]:
        m = self.match
        return {
            "a": printable(self.a), "a_split": self.a_split, "a_class": printable(self.a_label),
            "b": printable(self.b), "b_split": self.b_split, "b_class": printable(self.b_label),
            "similarity": round(m.similarity, 4), "difference": round(m.difference, 2),
            "flipped": m.flipped, "offset_seconds": round(m.offset_seconds, 3), "overlap": round(m.overlap, 3),
        }


def candidate_pairs(fingerprints: Sequence[Fingerprint], splits: Sequence[str],
                    budget: int = PAIR_BUDGET, nearest: int = NEAREST) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of videos in different splits to compare.

    Every cross-split pair while there are at most ``budget``; beyond that, each video with its
    ``nearest`` closest videos of other splits by mean thumbnail (mirrored or not).
    """
    n = len(fingerprints)
    split_ids = np.array([SPLITS.index(s) if s in SPLITS else len(SPLITS) for s in splits])
    cross = split_ids[:, None] != split_ids[None]
    total = int(np.triu(cross, 1).sum())
    if total <= budget:
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(cross, 1)))]
    means = np.stack([fp.thumbs.mean(0) for fp in fingerprints])
    flat = means.reshape(n, -1)
    mirrored = means[:, :, ::-1].reshape(n, -1)
    sq = (flat**2).sum(1)
    dist = np.minimum(sq[:, None] + sq[None] - 2 * flat @ flat.T, sq[:, None] + sq[None] - 2 * flat @ mirrored.T)
    dist = np.where(cross, dist, np.inf)
    pairs = set()
    k = min(nearest, n - 1)
    for i in range(n):
        for j in np.argpartition(dist[i], k)[:k]:
            if np.isfinite(dist[i, j]):
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def find_duplicates(
    fingerprints: Sequence[Fingerprint], splits: Sequence[str], threshold: float = DUPLICATE_THRESHOLD,
    budget: int = PAIR_BUDGET, nearest: int = NEAREST,
) -> tuple[list[tuple[int, int, Match]], int]:
    """Cross-split pairs at most ``threshold`` apart, most similar first, and how many pairs were compared."""
    pairs = candidate_pairs(fingerprints, splits, budget, nearest)
    found = []
    # Thousands of tiny matrix products: BLAS threads only wait for each other (8-25x slower on 2 busy cores).
    with threadpool_limits(1, user_api="blas"):
        for i, j in pairs:
            match = compare(fingerprints[i], fingerprints[j])
            if match.difference <= threshold:
                found.append((i, j, match))
    found.sort(key=lambda f: f[2].difference)
    return found, len(pairs)


# -- probable label errors -------------------------------------------------------------------------


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int,
                              folds: int = PROBE_FOLDS, seed: int = 0) -> np.ndarray:
    """``N x num_classes`` probabilities, each row from a linear probe that never saw that video.

    Standardised features, multinomial logistic regression (C = :data:`PROBE_C`), stratified
    ``min(folds, smallest class)`` folds; every class needs at least 2 videos.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < 2:
        raise ConfigError("the label audit needs at least two classes with at least 2 training videos each")
    k = int(min(folds, present.min()))
    probs = np.zeros((len(labels), num_classes))
    for train, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(features, labels):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=3000))
        probe.fit(features[train], labels[train])
        probs[np.ix_(held, probe.classes_)] = probe.predict_proba(features[held])
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> list[int]:
    """Indices that confident learning flags (cleanlab, prune by noise rate), least likely label first."""
    labels = np.asarray(labels, dtype=np.int64)
    used = np.unique(labels)
    # cleanlab wants every column to be a class that occurs: drop classes nobody is labelled with.
    remap = {int(c): i for i, c in enumerate(used)}
    sub = probs[:, used]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    issues = find_label_issues(np.array([remap[int(y)] for y in labels]), sub,
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    return [int(i) for i in issues]


@dataclass(frozen=True)
class LabelSuspect:
    """A training video whose given label the probe finds unlikely."""

    path: Path
    given: str
    suggested: str
    p_given: float
    p_suggested: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": printable(self.path), "given": printable(self.given), "suggested": printable(self.suggested),
                "p_given": round(self.p_given, 4), "p_suggested": round(self.p_suggested, 4)}


# -- group ids in file names ------------------------------------------------------------------------

#: Words that name a person or a recording session when digits follow them.
GROUP_WORDS = ("person", "subject", "subj", "sub", "actor", "participant", "performer", "user", "speaker",
               "signer", "session", "sess", "s", "p", "g")
_TOKEN = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(sorted(GROUP_WORDS, key=len, reverse=True))
                    + r")[_-]?(\d+)(?![0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class GroupSuggestion:
    """A ``--group-pattern`` that the file names seem to call for."""

    pattern: str
    word: str
    groups: int
    videos: int
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "groups": self.groups, "videos": self.videos, "examples": self.examples}


def suggest_group_pattern(names: Sequence[str]) -> GroupSuggestion | None:
    """A ``--group-pattern`` for file names that carry a person or session id (``s01_``, ``person3``, ``P2``).

    A word of :data:`GROUP_WORDS` followed by digits must occur in at least 80% of the names, take
    at least 2 values and repeat (fewer values than names). The pattern returned is checked to
    capture that id from every such name with :func:`re.search`, as ``--group-pattern`` does.
    """
    names = [str(n) for n in names]
    if len(names) < 3:
        return None
    found: dict[str, list[tuple[str, re.Match[str]]]] = {}
    for name in names:
        seen = set()
        for m in _TOKEN.finditer(name):
            word = m.group(1).lower()
            if word not in seen:
                seen.add(word)
                found.setdefault(word, []).append((name, m))
    best: GroupSuggestion | None = None
    for word, hits in found.items():
        values = Counter((m.group(1) + m.group(2)).lower() for _, m in hits)
        if len(hits) < 0.8 * len(names) or len(values) < 2 or len(values) >= len(hits):
            continue
        pattern = _pattern_for(word, hits)
        regex = re.compile(pattern)
        captured = [regex.search(name) for name, _ in hits]
        if not all(c is not None and c.group(1).lower() == (m.group(1) + m.group(2)).lower()
                   for c, (_, m) in zip(captured, hits)):
            continue
        suggestion = GroupSuggestion(pattern, word, len(values), len(hits),
                                     [name for name, _ in hits[:3]])
        if best is None or suggestion.videos > best.videos or (
                suggestion.videos == best.videos and len(word) > len(best.word)):
            best = suggestion
    return best


def _pattern_for(word: str, hits: list[tuple[str, re.Match[str]]]) -> str:
    """The regex capturing ``word``+digits as written in ``hits``: anchored at the start when every id starts its name."""
    spellings = {m.group(0)[: len(m.group(1))] for _, m in hits}
    joiners = {m.group(0)[len(m.group(1)):-len(m.group(2))] for _, m in hits}
    text = spellings.pop() if len(spellings) == 1 else None
    head = re.escape(text) if text is not None else "(?i:" + re.escape(word) + ")"
    joiner = re.escape(joiners.pop()) if len(joiners) == 1 else "[_-]?"
    token = f"({head}{joiner}\\d+)"
    if all(m.start() == 0 for _, m in hits):
        after = {name[m.end():m.end() + 1] for name, m in hits}
        if len(after) == 1 and (sep := after.pop()) and not sep.isalnum():
            return f"^{token}{re.escape(sep)}"
        return f"^{token}(?![0-9])"
    return f"(?<![A-Za-z0-9]){token}(?![0-9])"


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """What ``check --audit`` found: warnings naming files, never a change to the data."""

    videos: int
    splits: dict[str, int]
    duplicates: list[DuplicatePair] = field(default_factory=list)
    duplicate_threshold: float = DUPLICATE_THRESHOLD
    pairs_compared: int = 0
    label_suspects: list[LabelSuspect] = field(default_factory=list)
    label_audit: str = ""  # how the label audit ran, or why it did not
    label_audited: int = 0
    group_suggestion: GroupSuggestion | None = None
    group_pattern: str | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def warnings(self) -> list[str]:
        """One sentence per finding, each naming its files."""
        out = []
        for d in self.duplicates:
            m = d.match
            how = ", mirrored" if m.flipped else ""
            out.append(f"near-duplicate across splits ({d.a_split} / {d.b_split}): {printable(d.a)} and {printable(d.b)} "
                       f"(similarity {m.similarity:.3f}, difference {m.difference:.1f}{how}, "
                       f"overlap {m.overlap:.0%})")
        for s in self.label_suspects:
            out.append(f"probably mislabelled: {printable(s.path)} is labelled {s.given!r} (p={s.p_given:.2f}) "
                       f"but looks like {s.suggested!r} (p={s.p_suggested:.2f})")
        g = self.group_suggestion
        if g is not None:
            out.append(f"file names carry a person or session id ({g.groups} values of {g.word!r}+digits in "
                       f"{g.videos} of {self.videos} names, e.g. {', '.join(g.examples[:2])}) and no --group-pattern "
                       f"was given, so clips of one person can land in several splits: "
                       f"try --group-pattern '{g.pattern}'")
        for path, reason in self.skipped:
            out.append(f"not audited: {printable(path)}: {reason}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "videos": self.videos,
            "splits": dict(self.splits),
            "duplicates": {
                "threshold_difference": self.duplicate_threshold,
                "threshold_similarity": round(1.0 - self.duplicate_threshold / 255.0, 4),
                "measure": THRESHOLD_TEXT,
                "pairs_compared": self.pairs_compared,
                "pairs": [d.to_dict() for d in self.duplicates],
            },
            "labels": {
                "method": self.label_audit,
                "audited": self.label_audited,
                "suspects": [s.to_dict() for s in self.label_suspects],
            },
            "groups": {
                "group_pattern": self.group_pattern,
                "suggestion": self.group_suggestion.to_dict() if self.group_suggestion else None,
            },
            "skipped": [{"path": printable(p), "reason": r} for p, r in self.skipped],
            "notes": list(self.notes),
            "warnings": self.warnings(),
            "seconds": round(self.seconds, 2),
        }
