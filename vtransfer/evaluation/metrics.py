"""Classification metrics for video models: clip and video level.

The evaluation protocol of Karpathy et al. (2014) and I3D: several clips are
taken from each video, each gets softmax probabilities, and a video's score is
the mean of its clips' probabilities. From these we report hit@1/hit@k (k = 5,
or the number of classes when there are fewer) at clip and video level, mean class accuracy, per-class precision/recall/F1
(scikit-learn), per-category accuracy, the confusion matrix and the most
confused class pairs, and calibration: the expected calibration error of the
video scores (and of the clip scores) with its reliability table
(:mod:`vtransfer.evaluation.calibration`), optionally after temperature scaling.

Everything here is plain numpy (torch tensors are accepted and converted);
nothing reads files or knows about models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from vtransfer.evaluation.arrays import as_numpy, check_labels, check_probs
from vtransfer.evaluation.calibration import Calibration, apply_temperature, expected_calibration_error

if TYPE_CHECKING:
    from vtransfer.evaluation.calibration import Calibration

UNCATEGORISED = "uncategorised"
"""Category given to classes missing from a categories mapping."""

LEGACY_HIT_K = 5
"""The k in the hit@k keys of reports written before keys were named by their k: ``video_hit5``
held hit@3 when there were 3 classes. Readers fall back to it (:func:`read_hit_k`)."""


def hit_key(prefix: str, k: int | str) -> str:
    """The report key of hit@k: ``hit_key("video", 3)`` -> ``"video_hit3"`` (``"test_video"`` -> ``"test_video_hit3"``)."""
    return f"{prefix}_hit{k}"


def views_text(views: dict[str, int] | None) -> str | None:
    """``{"clips": 10, "crops": 3}`` -> ``"views = 10 clips × 3 crops"`` (``None`` when unknown)."""
    if not views:
        return None
    clips, crops = int(views["clips"]), int(views["crops"])
    return f"views = {clips} clip{'s' * (clips != 1)} × {crops} crop{'s' * (crops != 1)}"


def read_hit_k(values: dict[str, Any], prefix: str, k: int) -> Any:
    """hit@k from a report mapping: the ``<prefix>_hit<k>`` key, else the legacy ``<prefix>_hit5`` one (``None`` if neither)."""
    key = hit_key(prefix, k)
    return values[key] if key in values else values.get(hit_key(prefix, LEGACY_HIT_K))


def _ranked(probs: np.ndarray) -> np.ndarray:
    """Class indices per row, best first; ties go to the lower index (as ``argmax``)."""
    return np.argsort(-probs, axis=1, kind="stable")


def aggregate_video_scores(clip_probs: np.ndarray, clip_video: np.ndarray, num_videos: int) -> np.ndarray:
    """Video scores as the mean of each video's clip probabilities.

    Args:
        clip_probs: ``[N_clips, C]`` softmax probabilities (numpy or torch).
        clip_video: ``[N_clips]`` index of the video each clip came from.
        num_videos: number of videos; every index in ``range(num_videos)`` must have a clip.

    Returns:
        ``[num_videos, C]`` float64 array; row ``v`` is the mean over video ``v``'s clips.

    Raises:
        ValueError: on mismatched shapes, out-of-range video indices, or a video with no clips.
    """
    probs = check_probs(clip_probs, "clip_probs")
    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    video = check_labels(clip_video, probs.shape[0], max(num_videos, 1), "clip_video")
    counts = np.bincount(video, minlength=num_videos).astype(np.float64)
    if num_videos and np.any(counts == 0):
        missing = np.flatnonzero(counts == 0)
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if missing.size > 10 else "")
        raise ValueError(f"{missing.size} video(s) have no clips: {shown}")
    sums = np.zeros((num_videos, probs.shape[1]), dtype=np.float64)
    np.add.at(sums, video, probs)
    return sums / np.maximum(counts, 1.0)[:, None]


def hit_at_k(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is among the ``k`` highest scores.

    ``k`` larger than the number of classes is capped (hit@k is then 1.0).
    Ties rank the lower class index first, so hit@1 agrees with ``argmax``.
    Returns ``nan`` for zero rows.
    """
    probs = check_probs(probs, "probs")
    labels = check_labels(labels, probs.shape[0], probs.shape[1], "labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if probs.shape[0] == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = _ranked(probs)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


@dataclass
class ClassMetrics:
    """Video-level metrics of one class.

    ``accuracy`` is the fraction of the class's videos predicted correctly
    (= recall), ``None`` when the class has no videos in the evaluated set.
    Precision/recall/F1 follow scikit-learn with ``zero_division=0``.
    """

    name: str
    category: str | None
    support: int
    accuracy: float | None
    precision: float
    recall: float
    f1: float


@dataclass
class CategoryMetrics:
    """Per-category accuracy: the mean accuracy of its classes that have videos.

    ``num_classes`` counts all classes of the category, ``classes_with_support``
    those that contributed; ``accuracy`` is ``None`` when none did.
    """

    name: str
    accuracy: float | None
    num_classes: int
    classes_with_support: int
    support: int


@dataclass
class ConfusedPair:
    """An off-diagonal confusion-matrix cell: ``count`` videos of ``true`` predicted as ``predicted``.

    ``fraction`` is ``count`` over the true class's support.
    """

    true: str
    predicted: str
    count: int
    fraction: float


@dataclass
class VideoPrediction:
    """One video's prediction: its index (and name, when given), labels and top-k probabilities."""

    index: int
    true: str
    predicted: str
    correct: bool
    top: list[tuple[str, float]]
    name: str | None = None


def _nan_to_none(x: float | None) -> float | None:
    """JSON-safe float: NaN becomes ``None``."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass
class EvalResult:
    """Everything :func:`classification_report` computes; ``to_dict`` is JSON-safe.

    Attributes:
        classes: class names, index order.
        num_videos, num_clips: sizes of the evaluated set.
        top_k: the k of hit@k (5, or the number of classes when there are fewer).
        clip_hit1, clip_hit_k, video_hit1, video_hit_k: hit@1 and hit@k, fractions in [0, 1];
            reports name the hit@k keys by their k (``video_hit3``, see :meth:`summary`).
        mean_class_accuracy: mean per-class video accuracy over classes with videos
            (scikit-learn's balanced accuracy).
        per_class: one :class:`ClassMetrics` per class, index order.
        per_category: one :class:`CategoryMetrics` per category (empty without categories).
        confusion: ``[C, C]`` video counts, rows true, columns predicted.
        most_confused: up to 10 largest off-diagonal cells, largest first.
        predictions: one :class:`VideoPrediction` per video.
        categories: the class -> category mapping used, or ``None``.
        views: evaluation views per video, ``{"clips": N, "crops": M}`` (``None``: not recorded).
        calibration: ECE and reliability table of the video scores
            (:class:`~vtransfer.evaluation.calibration.Calibration`); ``None`` for reports written before it.
        clip_ece: ECE of the clip scores (same bins), or ``None``.
        temperature: the temperature the clip probabilities were scaled by before
            every number here was computed; ``None`` when none was applied.
        unscaled_ece: video-level ECE without that temperature (only with ``temperature``).
    """

    classes: list[str]
    num_videos: int
    num_clips: int
    top_k: int
    clip_hit1: float
    clip_hit_k: float
    video_hit1: float
    video_hit_k: float
    mean_class_accuracy: float
    per_class: list[ClassMetrics]
    per_category: list[CategoryMetrics]
    confusion: np.ndarray
    most_confused: list[ConfusedPair]
    predictions: list[VideoPrediction]
    categories: dict[str, str] | None = None
    calibration: Calibration | None = None
    clip_ece: float | None = None
    temperature: float | None = None
    unscaled_ece: float | None = None
    views: dict[str, int] | None = None

    @property
    def ece(self) -> float | None:
        """Video-level expected calibration error, or ``None`` when the report has no calibration."""
        return None if self.calibration is None else self.calibration.ece

    def summary(self) -> dict[str, float | None]:
        """The headline numbers as ``{key: fraction}`` (``None`` where undefined).

        Keys: ``video_hit1``, ``video_hit<k>``, ``clip_hit1``, ``clip_hit<k>``,
        ``mean_class_accuracy``, with k = :attr:`top_k` (``video_hit3`` with 3 classes).
        """
        k = self.top_k
        values = {
            "video_hit1": self.video_hit1,
            hit_key("video", k): self.video_hit_k,
            "clip_hit1": self.clip_hit1,
            hit_key("clip", k): self.clip_hit_k,
            "mean_class_accuracy": self.mean_class_accuracy,
        }
        return {key: _nan_to_none(v) for key, v in values.items()}

    def collapsed_to(self) -> str | None:
        """The one class every video was predicted as, when videos of two or more classes were all
        given the same label (a model that learned nothing about the task); else ``None``."""
        predicted = self.confusion.sum(axis=0)
        true_classes = int((self.confusion.sum(axis=1) > 0).sum())
        if self.num_videos < 2 or true_classes < 2 or int((predicted > 0).sum()) != 1:
            return None
        return self.classes[int(predicted.argmax())]

    def collapse_warning(self) -> str | None:
        """``"all N test videos predicted as X"`` (with a hint) when :meth:`collapsed_to` finds one class."""
        cls = self.collapsed_to()
        if cls is None:
            return None
        return (f"all {self.num_videos} videos predicted as {cls!r}: the model collapsed to one class and learned "
                "nothing that separates the classes (try a pretrained --weights, another --lr, or more epochs)")

    def category_accuracy(self) -> dict[str, float | None]:
        """``{category: accuracy}`` in category order (empty without categories)."""
        return {c.name: c.accuracy for c in self.per_category}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN -> ``None``); :meth:`from_dict` reverses it."""
        return {
            "classes": list(self.classes),
            "num_videos": self.num_videos,
            "num_clips": self.num_clips,
            "top_k": self.top_k,
            "summary": self.summary(),
            "per_class": [
                {**asdict(c), "accuracy": _nan_to_none(c.accuracy)} for c in self.per_class
            ],
            "per_category": [
                {**asdict(c), "accuracy": _nan_to_none(c.accuracy)} for c in self.per_category
            ],
            "confusion": self.confusion.astype(int).tolist(),
            "most_confused": [asdict(p) for p in self.most_confused],
            "predictions": [
                {**asdict(p), "top": [[name, prob] for name, prob in p.top]} for p in self.predictions
            ],
            "categories": dict(self.categories) if self.categories is not None else None,
            "collapsed_to": self.collapsed_to(),
            "views": dict(self.views) if self.views else None,
            "calibration": None if self.calibration is None else {
                **self.calibration.to_dict(),
                "clip_ece": _nan_to_none(self.clip_ece),
                "temperature": self.temperature,
                "unscaled_ece": _nan_to_none(self.unscaled_ece),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        """Rebuild an :class:`EvalResult` from :meth:`to_dict` output (e.g. a ``report.json``).

        Also reads reports written before the hit@k keys carried their k (``video_hit5`` for any k)
        and before calibration was reported (``calibration`` is then ``None``).
        """

        summary = data["summary"]
        calibration = data.get("calibration")
        k = int(data["top_k"])

        def num(value: Any) -> float:
            return float("nan") if value is None else float(value)

        return cls(
            classes=list(data["classes"]),
            num_videos=int(data["num_videos"]),
            num_clips=int(data["num_clips"]),
            top_k=k,
            clip_hit1=num(summary.get("clip_hit1")),
            clip_hit_k=num(read_hit_k(summary, "clip", k)),
            video_hit1=num(summary.get("video_hit1")),
            video_hit_k=num(read_hit_k(summary, "video", k)),
            mean_class_accuracy=num(summary.get("mean_class_accuracy")),
            per_class=[ClassMetrics(**c) for c in data["per_class"]],
            per_category=[CategoryMetrics(**c) for c in data["per_category"]],
            confusion=np.asarray(data["confusion"], dtype=np.int64).reshape(len(data["classes"]), -1),
            most_confused=[ConfusedPair(**p) for p in data["most_confused"]],
            predictions=[
                VideoPrediction(**{**p, "top": [(str(n), float(v)) for n, v in p["top"]]})
                for p in data["predictions"]
            ],
            categories=data.get("categories"),
            views=data.get("views"),
            calibration=Calibration.from_dict(calibration) if calibration else None,
            clip_ece=(calibration or {}).get("clip_ece"),
            temperature=(calibration or {}).get("temperature"),
            unscaled_ece=(calibration or {}).get("unscaled_ece"),
        )


def _category_metrics(categories: dict[str, str], per_class: list[ClassMetrics]) -> list[CategoryMetrics]:
    """Group per-class accuracies by category, categories in first-appearance order."""
    order: list[str] = []
    for cat in list(categories.values()) + [c.category or UNCATEGORISED for c in per_class]:
        if cat not in order:
            order.append(cat)
    out = []
    for cat in order:
        members = [c for c in per_class if (c.category or UNCATEGORISED) == cat]
        if not members:
            continue  # a category of the file whose classes are all absent from this model
        supported = [c for c in members if c.support > 0 and c.accuracy is not None]
        acc = float(np.mean([c.accuracy for c in supported])) if supported else None
        out.append(
            CategoryMetrics(
                name=cat,
                accuracy=acc,
                num_classes=len(members),
                classes_with_support=len(supported),
                support=int(sum(c.support for c in members)),
            )
        )
    return out


def _most_confused(confusion: np.ndarray, classes: Sequence[str], limit: int = 10) -> list[ConfusedPair]:
    """The ``limit`` largest off-diagonal cells (ties: by true then predicted index)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    true_idx, pred_idx = np.nonzero(off)
    counts = off[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -counts))[:limit]
    support = confusion.sum(axis=1)
    return [
        ConfusedPair(
            true=classes[t],
            predicted=classes[p],
            count=int(off[t, p]),
            fraction=float(off[t, p] / support[t]),
        )
        for t, p in zip(true_idx[order], pred_idx[order])
    ]


def classification_report(
    clip_probs: np.ndarray,
    clip_video: np.ndarray,
    video_labels: np.ndarray,
    classes: Sequence[str],
    categories: dict[str, str] | None = None,
    *,
    video_names: Sequence[str] | None = None,
    top_k: int = 5,
    views: dict[str, int] | None = None,
    temperature: float | None = None,
    calibration_bins: int = 15,
) -> EvalResult:
    """Compute clip- and video-level metrics from per-clip probabilities.

    Args:
        clip_probs: ``[N_clips, C]`` softmax probabilities.
        clip_video: ``[N_clips]`` video index of each clip (``0 .. num_videos-1``).
        video_labels: ``[num_videos]`` true class index of each video.
        classes: the ``C`` class names, index order.
        categories: optional class name -> category name; classes it does not
            mention are put in the ``"uncategorised"`` category.
        video_names: optional name (e.g. path) per video, kept in the predictions.
        top_k: the k of hit@k (capped at ``C``) and of the per-video top list.
        views: the views each video was scored with, ``{"clips": N, "crops": M}``, kept in the result.
        temperature: scale the clip probabilities by this temperature
            (:func:`vtransfer.evaluation.calibration.apply_temperature`) before anything is
            computed, video scores included; ``None`` leaves them as given.
        calibration_bins: confidence bins of the expected calibration error.

    Returns:
        An :class:`EvalResult`.
    """

    classes = [str(c) for c in classes]
    probs = check_probs(clip_probs, "clip_probs")
    num_classes = probs.shape[1]
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for {num_classes} probability columns")
    labels = as_numpy(video_labels)
    num_videos = int(labels.shape[0]) if labels.ndim == 1 else -1
    labels = check_labels(labels, max(num_videos, 0), num_classes, "video_labels")
    if num_videos == 0:
        raise ValueError("cannot compute metrics on zero videos")
    if video_names is not None and len(video_names) != num_videos:
        raise ValueError(f"{len(video_names)} video names given for {num_videos} videos")
    video = check_labels(clip_video, probs.shape[0], num_videos, "clip_video")
    unscaled_ece = None
    if temperature is not None:
        unscaled = aggregate_video_scores(probs, video, num_videos)
        unscaled_ece = expected_calibration_error(unscaled, labels, calibration_bins).ece
        probs = apply_temperature(probs, temperature)
    video_probs = aggregate_video_scores(probs, video, num_videos)
    clip_labels = labels[video]
    k = min(top_k, num_classes)

    ranked = _ranked(video_probs)
    pred = ranked[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_acc = np.where(support > 0, correct / np.maximum(support, 1), np.nan)

    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, labels=np.arange(num_classes), zero_division=0
    )
    cat_of = None
    if categories is not None:
        cat_of = {c: categories.get(c, UNCATEGORISED) for c in classes}
    per_class = [
        ClassMetrics(
            name=name,
            category=cat_of[name] if cat_of else None,
            support=int(support[i]),
            accuracy=None if support[i] == 0 else float(class_acc[i]),
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
        )
        for i, name in enumerate(classes)
    ]
    per_category = _category_metrics(categories, per_class) if categories is not None else []

    predictions = [
        VideoPrediction(
            index=v,
            true=classes[labels[v]],
            predicted=classes[pred[v]],
            correct=bool(labels[v] == pred[v]),
            top=[(classes[j], float(video_probs[v, j])) for j in ranked[v, :k]],
            name=None if video_names is None else str(video_names[v]),
        )
        for v in range(num_videos)
    ]
    return EvalResult(
        classes=classes,
        num_videos=num_videos,
        num_clips=int(probs.shape[0]),
        top_k=k,
        clip_hit1=hit_at_k(probs, clip_labels, 1),
        clip_hit_k=hit_at_k(probs, clip_labels, k),
        video_hit1=hit_at_k(video_probs, labels, 1),
        video_hit_k=hit_at_k(video_probs, labels, k),
        mean_class_accuracy=float(np.nanmean(class_acc)),
        per_class=per_class,
        per_category=per_category,
        confusion=confusion,
        most_confused=_most_confused(confusion, classes),
        predictions=predictions,
        categories=dict(categories) if categories is not None else None,
        views=dict(views) if views else None,
        calibration=expected_calibration_error(video_probs, labels, calibration_bins, level="video"),
        clip_ece=expected_calibration_error(probs, clip_labels, calibration_bins, level="clip").ece,
        temperature=None if temperature is None else float(temperature),
        unscaled_ece=unscaled_ece,
    )
