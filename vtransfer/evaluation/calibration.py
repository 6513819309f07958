"""Calibration: does a model's confidence match its accuracy, and temperature scaling when it does not.

Expected calibration error (ECE, Naeini et al. 2015; Guo et al. 2017): sort the
predictions into equal-width bins of confidence (the top probability), and
average ``|accuracy - mean confidence|`` over the bins, each weighted by its
share of the predictions. 0 means "when the model says 80 %, it is right 80 %
of the time". The per-bin table is what a reliability diagram draws.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar
``T > 0`` before the softmax: ``T > 1`` softens overconfident outputs, ``T < 1``
sharpens underconfident ones, and a clip's top class never changes.

Level. ``T`` is fitted on *clip* probabilities of the validation split (each
clip labelled with its video's class) and applied to clip probabilities; video
scores are then formed exactly as :func:`vtransfer.evaluation.metrics.classification_report`
forms them, as the mean of the (scaled) clip probabilities. Clip level because
that is what the model outputs, because there the negative log-likelihood is
convex in ``1/T`` (one optimum, found by a bounded 1-D search), and because a
validation split has ``val_clips`` times more clips than videos. Two
consequences: a video's top class can change (a mean of sharper or flatter
distributions), and the video-level ECE a report leads with was not itself
minimised, so a report made with a temperature also gives the unscaled ECE.

Everything here is plain numpy and reads no files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vtransfer.evaluation.arrays import as_numpy, check_labels, check_probs

DEFAULT_BINS = 15
"""Confidence bins of the ECE and the reliability diagram (Guo et al. use 15)."""

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The range :func:`fit_temperature` searches; a fit at either end means the validation data cannot pin ``T`` down."""

LEVELS = ("video", "clip")

# float32 softmax underflows to exactly 0 for very confident outputs; log(0) = -inf would make the
# NLL infinite, so log-probabilities are floored at the smallest normal float32 (about 1e-38).
_LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))


@dataclass
class ReliabilityBin:
    """One confidence bin ``(lower, upper]`` (the first also holds 0): how many predictions, how right, how sure.

    ``accuracy`` and ``confidence`` (mean top probability) are fractions, ``None`` for an empty bin.
    """

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass
class Calibration:
    """The ECE of a set of predictions and the per-bin table behind it.

    Attributes:
        ece: expected calibration error, a fraction in [0, 1].
        level: ``"video"`` or ``"clip"``: what one prediction is.
        bins: one :class:`ReliabilityBin` per equal-width confidence bin, low to high.
    """

    ece: float
    level: str
    bins: list[ReliabilityBin]

    @property
    def num_bins(self) -> int:
        """The number of confidence bins."""
        return len(self.bins)

    @property
    def count(self) -> int:
        """The number of predictions binned."""
        return sum(b.count for b in self.bins)

    def describe(self) -> str:
        """One line: ``"ECE 0.083 (15 bins, video level)"``."""
        return f"ECE {self.ece:.3f} ({self.num_bins} bins, {self.level} level)"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; :meth:`from_dict` reverses it."""
        return {"ece": self.ece, "level": self.level, "bins": [dataclasses.asdict(b) for b in self.bins]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        """Rebuild from :meth:`to_dict` output (other keys of ``data`` are ignored)."""
        return cls(
            ece=float(data["ece"]),
            level=str(data["level"]),
            bins=[ReliabilityBin(**b) for b in data["bins"]],
        )


def expected_calibration_error(probs: Any, labels: Any, bins: int = DEFAULT_BINS, *, level: str = "video") -> Calibration:
    """ECE of ``[N, C]`` probabilities against true labels, with the per-bin reliability table.

    The prediction is the ``argmax`` (ties to the lower class, as in
    :mod:`vtransfer.evaluation.metrics`) and its confidence the top probability. Bin ``i``
    of ``bins`` equal-width bins holds confidences in ``(i/bins, (i+1)/bins]``
    (confidence 0 goes to the first bin). ``ECE = sum_i (n_i / N) |acc_i - conf_i|``.

    Args:
        probs: ``[N, C]`` probabilities (numpy or torch), N >= 1.
        labels: ``[N]`` true class indices.
        bins: number of confidence bins, >= 1.
        level: what one row is (``"video"`` or ``"clip"``), recorded in the result.

    Returns:
        A :class:`Calibration`.

    Raises:
        ValueError: on bad shapes, labels out of range, no rows, ``bins < 1`` or an unknown level.
    """
    probs = check_probs(probs, "probs")
    labels = check_labels(labels, probs.shape[0], probs.shape[1], "labels")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("cannot compute a calibration error on zero predictions")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # side="left": edges[i] < conf <= edges[i+1] lands in bin i
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    acc_sum = np.bincount(index, weights=correct, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    table = []
    ece = 0.0
    for i in range(bins):
        c = int(counts[i])
        acc = float(acc_sum[i] / c) if c else None
        conf = float(conf_sum[i] / c) if c else None
        if c:
            ece += c / n * abs(acc - conf)
        table.append(ReliabilityBin(lower=float(edges[i]), upper=float(edges[i + 1]), count=c, accuracy=acc, confidence=conf))
    return Calibration(ece=float(ece), level=level, bins=table)


def log_probabilities(probs: Any) -> np.ndarray:
    """``log(probs)`` as float64, floored so that underflowed zeros stay finite."""
    probs = check_probs(probs, "probs")
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(probs), _LOG_FLOOR)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, numerically stable."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """Softmax probabilities rescaled by ``temperature``: ``softmax(log(probs) / T)``, float64.

    Equal to ``softmax(logits / T)`` for the logits ``probs`` came from (see
    :func:`fit_temperature`). ``T == 1`` returns the probabilities unchanged.
    Each row's top class is kept.

    Raises:
        ValueError: bad shapes, non-finite values or ``T <= 0``.
    """
    t = _check_temperature(temperature)
    probs = check_probs(probs, "probs")
    if t == 1.0:
        return probs.copy()
    return np.exp(_log_softmax(log_probabilities(probs) / t))


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    """Mean ``-log p(true class)`` of ``[N, C]`` probabilities (floored like :func:`log_probabilities`)."""
    probs = check_probs(probs, "probs")
    labels = check_labels(labels, probs.shape[0], probs.shape[1], "labels")
    if probs.shape[0] == 0:
        raise ValueError("cannot compute a likelihood on zero predictions")
    return float(-np.mean(log_probabilities(probs)[np.arange(probs.shape[0]), labels]))


def _scaled_nll(scores: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of ``softmax(scores / T)``."""
    logp = _log_softmax(scores / temperature)
    return float(-np.mean(logp[np.arange(scores.shape[0]), labels]))


def fit_temperature(
    log_probs: Any,
    labels: Any,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tol: float = 1e-6,
) -> float:
    """The temperature ``T`` that minimises the NLL of ``softmax(log_probs / T)`` on labelled (validation) rows.

    ``log_probs`` may be log-softmax outputs (e.g. :func:`log_probabilities` of
    the clip probabilities a :class:`~vtransfer.engine.inference.ClipPredictions`
    holds) or raw logits: the result is the same, because a log-softmax differs
    from its logits by a per-row constant (``log sum exp``), and a per-row
    constant divided by ``T`` is still a per-row constant, which softmax
    ignores: ``softmax(log p / T) = softmax(logits / T)``.

    The NLL is convex in ``1/T``, so it has one minimum along ``log T``; a
    golden-section search over ``log T`` in ``bounds`` finds it to ``tol``
    (relative). A result at a bound means the data want a more extreme ``T``
    (e.g. every validation clip right: the NLL keeps falling as ``T -> 0``).

    Args:
        log_probs: ``[N, C]`` log-probabilities or logits, N >= 1.
        labels: ``[N]`` true class indices.
        bounds: ``(T_min, T_max)``, ``0 < T_min < T_max``.
        tol: stop when the bracket on ``log T`` is narrower than this.

    Returns:
        ``T`` as a float.

    Raises:
        ValueError: on bad shapes, non-finite scores, no rows or bad bounds.
    """
    scores = check_probs(log_probs, "log_probs")
    labels = check_labels(labels, scores.shape[0], scores.shape[1], "labels")
    if scores.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero predictions")
    lo_t, hi_t = (float(b) for b in bounds)
    if not (0 < lo_t < hi_t and math.isfinite(hi_t)):
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max, got {bounds!r}")

    def loss(log_t: float) -> float:
        return _scaled_nll(scores, labels, math.exp(log_t))

    golden = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(lo_t), math.log(hi_t)
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = loss(d)
    best = (a + b) / 2.0
    # the minimum may sit on a bound, where the interior search can only approach it
    candidates = [(loss(best), best), (loss(math.log(lo_t)), math.log(lo_t)), (loss(math.log(hi_t)), math.log(hi_t))]
    return float(math.exp(min(candidates)[1]))


@dataclass
class TemperatureFit:
    """A temperature fitted on validation clips, with what it did there.

    ``nll_before``/``nll_after`` are the mean clip NLL at ``T = 1`` and at ``temperature``;
    ``at_bound`` is true when the fit stopped at an end of the searched range
    (the validation split could not pin ``T`` down: better not to use it).
    """

    temperature: float
    clips: int
    nll_before: float
    nll_after: float
    at_bound: bool

    def describe(self) -> str:
        """One line: ``"temperature 1.42 fitted on 120 validation clips (NLL 0.810 -> 0.620)"``."""
        text = (f"temperature {self.temperature:.3g} fitted on {self.clips} validation clips "
                f"(NLL {self.nll_before:.3f} -> {self.nll_after:.3f})")
        return text + (": at the end of the searched range, the validation split cannot pin it down" if self.at_bound else "")


def calibrate_on_validation(
    val_preds: Any,
    video_labels: Sequence[int] | np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> TemperatureFit:
    """Fit the temperature on a validation split's clip predictions (clip level, see the module docstring).

    Args:
        val_preds: the :class:`~vtransfer.engine.inference.ClipPredictions` of the validation
            videos (``probs`` ``[N_clips, C]``, ``video`` ``[N_clips]``), as
            ``evaluate_records`` returns them.
        video_labels: true class index of each validation video, indexed by ``val_preds.video``.
        bounds: the range searched (:data:`TEMPERATURE_BOUNDS`).

    Returns:
        A :class:`TemperatureFit`; store ``fit.temperature`` with
        :func:`vtransfer.weights.checkpoint.set_checkpoint_temperature`.

    Raises:
        ValueError: no clips, or clip/video indices that do not match ``video_labels``.
    """
    probs = check_probs(val_preds.probs, "val_preds.probs")
    labels = as_numpy(video_labels)
    labels = check_labels(labels, labels.shape[0] if labels.ndim == 1 else -1, probs.shape[1], "video_labels")
    video = check_labels(val_preds.video, probs.shape[0], max(labels.shape[0], 1), "val_preds.video")
    if probs.shape[0] == 0:
        raise ValueError("cannot fit a temperature: the validation split has no clips")
    clip_labels = labels[video]
    t = fit_temperature(log_probabilities(probs), clip_labels, bounds=bounds)
    lo, hi = bounds
    return TemperatureFit(
        temperature=t,
        clips=int(probs.shape[0]),
        nll_before=negative_log_likelihood(probs, clip_labels),
        nll_after=negative_log_likelihood(apply_temperature(probs, t), clip_labels),
        at_bound=bool(math.isclose(t, lo, rel_tol=1e-4) or math.isclose(t, hi, rel_tol=1e-4)),
    )


def scaled(preds: Any, temperature: float | None) -> Any:
    """``preds`` (a :class:`~vtransfer.engine.inference.ClipPredictions`) with its clip probabilities temperature-scaled.

    ``None`` (an uncalibrated checkpoint) or ``1.0`` returns ``preds`` itself.
    Probabilities keep their dtype (float32); video indices and errors are kept.
    """
    if temperature is None or _check_temperature(temperature) == 1.0:
        return preds
    probs = apply_temperature(preds.probs, temperature).astype(np.asarray(preds.probs).dtype, copy=False)
    return dataclasses.replace(preds, probs=probs)
