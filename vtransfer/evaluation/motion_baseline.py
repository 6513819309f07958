"""A trivial non-deep baseline: motion energy + mean frame, standardised, logistic regression.

Every video becomes one vector from its frames in grey at 32x24:

* the per-pixel mean and standard deviation over time of ``|frame[t+1] - frame[t]|``
  (where and how much things move), and
* the per-pixel mean frame (what the scene looks like),

standardised on the training videos and classified by scikit-learn's
logistic regression. It has no notion of objects or learned features, so a
video model that cannot beat it on a dataset has not learned the task there.
``benchmarks/bench_transfer.py`` prints it beside the policies' table on the
same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vtransfer.data.decode import read_video

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


@dataclass
class BaselineResult:
    """Test accuracy of the baseline and its per-video predictions (class names)."""

    accuracy: float
    predictions: list[str]
    labels: list[str]


def fit_and_score(train: list[tuple[Path, str]], test: list[tuple[Path, str]], c: float = 1.0) -> BaselineResult:
    """Fit on ``train`` (path, class) pairs, score video accuracy on ``test``."""

    x_train = np.stack([motion_features(p) for p, _ in train])
    x_test = np.stack([motion_features(p) for p, _ in test])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(x_train, [label for _, label in train])
    predicted = [str(v) for v in clf.predict(x_test)]
    labels = [label for _, label in test]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, labels)])) if labels else 0.0
    return BaselineResult(accuracy, predicted, labels)
