"""Trivial non-deep baselines: motion energy + mean frame, or a histogram of flow, then logistic regression.

Every video becomes one vector from its frames in grey at 32x24:

* the per-pixel mean and standard deviation over time of ``|frame[t+1] - frame[t]|``
  (where and how much things move), and
* the per-pixel mean frame (what the scene looks like),

standardised on the training videos and classified by scikit-learn's
logistic regression. It has no notion of objects or learned features, so a
video model that cannot beat it on a dataset has not learned the task there.
``benchmarks/bench_transfer.py`` prints it beside the policies' table on the
same split.

The flow baseline instead sums a histogram of flow orientations over the
video (:func:`flow_histogram_features`). Its per-clip form
(:func:`flow_histogram_clip_features` with :func:`fit_and_score_clips`) sees
one clip at a time and averages its clips' probabilities per video, as a
video network does: where the two differ, the evidence is spread over the
whole video rather than held by any one clip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vtransfer.data.decode import read_video
from vtransfer.data.flow import FlowSettings, compute_flow, dequantise

GRID = (24, 32)  # (height, width) of the grey frames


def motion_features(path: str | Path, grid: tuple[int, int] = GRID) -> np.ndarray:
    """The feature vector of one video: |frame difference| mean and std, and the mean frame, at ``grid``.

    Raises:
        VideoDecodeError: the video cannot be decoded.
    """

    frames = read_video(path).to(torch.float32) / 255.0  # N x 3 x H x W
    grey = (0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2])[:, None]
    small = F.interpolate(grey, size=grid, mode="area")[:, 0].numpy()  # N x h x w
    diff = np.abs(np.diff(small, axis=0)) if len(small) > 1 else np.zeros_like(small)
    return np.concatenate([diff.mean(0).ravel(), diff.std(0).ravel(), small.mean(0).ravel()])


#: The flow a histogram baseline computes: DIS (fast), between frames 2 apart, at :data:`FLOW_SHORT_SIDE` px.
HISTOGRAM_FLOW = FlowSettings("dis-fast", 8.0, 2, "next-sampled")
FLOW_SHORT_SIDE = 96
FLOW_GRID = (4, 4)
ORIENTATION_BINS = 8


def _video_flow(path: str | Path, settings: FlowSettings, step: int) -> np.ndarray:
    """Flow in pixels, ``N x 2 x H x W``, between frames ``step`` apart over the whole video, at FLOW_SHORT_SIDE px."""
    frames = read_video(path, short_side=FLOW_SHORT_SIDE)
    indices = list(range(0, len(frames), step))
    if len(indices) < 2:
        indices = list(range(len(frames)))
    return dequantise(compute_flow(frames, settings, indices=indices, source=path), settings.bound, unit="px").numpy()


def _orientation_histogram(flow: np.ndarray, grid: tuple[int, int], bins: int) -> np.ndarray:
    """Magnitude-weighted orientation histogram per grid cell of ``flow`` (``N x 2 x H x W``), summed over N, normalised."""
    fx, fy = flow[:, 0], flow[:, 1]  # N x H x W
    magnitude = np.hypot(fx, fy)
    which = np.floor((np.arctan2(fy, fx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    h, w = fx.shape[1:]
    rows = np.minimum(np.arange(h) * grid[0] // h, grid[0] - 1)[:, None]
    cols = np.minimum(np.arange(w) * grid[1] // w, grid[1] - 1)[None, :]
    cell = np.broadcast_to(rows * grid[1] + cols, fx.shape)
    hist = np.bincount((cell * bins + which).ravel(), weights=magnitude.ravel(), minlength=grid[0] * grid[1] * bins)
    return hist / (hist.sum() + 1e-6)


def flow_histogram_features(path: str | Path, settings: FlowSettings = HISTOGRAM_FLOW, step: int = 2,
                            grid: tuple[int, int] = FLOW_GRID, bins: int = ORIENTATION_BINS) -> np.ndarray:
    """A histogram of flow orientations, weighted by magnitude, per cell of a ``grid`` over the frame.

    The flow between frames ``step`` apart (:func:`vtransfer.data.flow.compute_flow`, in pixels), summed
    over the video and normalised per video: ``grid[0] * grid[1] * bins`` numbers saying where and which
    way things move, and nothing of what they look like.

    Raises:
        VideoDecodeError: the video cannot be decoded; DatasetError: fewer than 2 frames.
    """
    return _orientation_histogram(_video_flow(path, settings, step), grid, bins)


def flow_histogram_clip_features(path: str | Path, frames: int = 8, stride: int = 4, clips: int = 10,
                                 settings: FlowSettings = HISTOGRAM_FLOW, grid: tuple[int, int] = FLOW_GRID,
                                 bins: int = ORIENTATION_BINS) -> np.ndarray:
    """The histogram of :func:`flow_histogram_features`, one per clip: ``clips x grid[0] * grid[1] * bins``.

    A clip is ``frames`` frames ``stride`` apart (its ``frames - 1`` flows between them), and the
    ``clips`` clips are spread uniformly over the video, as a video model's test clips are: what a
    model that sees one clip at a time could know of where and which way things move. A video
    shorter than one clip gives one clip of all its flows.

    Raises:
        VideoDecodeError: the video cannot be decoded; DatasetError: fewer than 2 frames.
    """
    flow = _video_flow(path, settings, stride)
    span = max(1, min(frames - 1, len(flow)))
    starts = np.unique(np.linspace(0, len(flow) - span, max(1, clips)).round().astype(int))
    return np.stack([_orientation_histogram(flow[s:s + span], grid, bins) for s in starts])


@dataclass
class BaselineResult:
    """Test accuracy of the baseline and its per-video predictions (class names)."""

    accuracy: float
    predictions: list[str]
    labels: list[str]


def fit_and_score(train: list[tuple[Path, str]], test: list[tuple[Path, str]], c: float = 1.0,
                  features: Callable[[Path], np.ndarray] | None = None) -> BaselineResult:
    """Fit on ``train`` (path, class) pairs, score video accuracy on ``test``.

    ``features`` turns a video into its vector: :func:`motion_features` (frame differences and the mean
    frame) or :func:`flow_histogram_features` (where and which way things move).
    """
    features = features or motion_features
    x_train = np.stack([features(p) for p, _ in train])
    x_test = np.stack([features(p) for p, _ in test])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(x_train, [label for _, label in train])
    return _scored([str(v) for v in clf.predict(x_test)], test)


def fit_and_score_clips(train: list[tuple[Path, str]], test: list[tuple[Path, str]],
                        features: Callable[[Path], np.ndarray], c: float = 1.0) -> BaselineResult:
    """:func:`fit_and_score` for features with a row per clip (``clips x D``, e.g. :func:`flow_histogram_clip_features`).

    Fits on every training clip, each labelled with its video's class; a test video's prediction is
    the class of its clips' averaged probabilities, as a video model's clip predictions are averaged.
    """
    rows = [(features(p), label) for p, label in train]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(np.concatenate([x for x, _ in rows]), [label for x, label in rows for _ in range(len(x))])
    classes = [str(v) for v in clf.classes_]
    return _scored([classes[int(clf.predict_proba(features(p)).mean(axis=0).argmax())] for p, _ in test], test)


def _scored(predicted: list[str], test: list[tuple[Path, str]]) -> BaselineResult:
    """The video accuracy of ``predicted`` against ``test``'s classes."""
    labels = [label for _, label in test]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, labels)])) if labels else 0.0
    return BaselineResult(accuracy, predicted, labels)
