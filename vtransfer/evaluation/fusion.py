"""Late fusion of two streams' class probabilities: pairing their clips, and choosing the weight on validation.

The fused probability is ``(1 - w) * p_rgb + w * p_flow``
(:func:`vtransfer.models.two_stream.fuse_probabilities`); ``w`` is the flow
stream's share. Two-stream papers average (``w = 0.5``); vtransfer also
tries the grid 0, 0.1, ..., 1 on the validation split and keeps the most
accurate weight, the one nearest 0.5 among ties (small validation splits tie
often, and then the papers' average is the prior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vtransfer.evaluation.metrics import aggregate_video_scores

#: The flow weights tried on validation: 0, 0.1, ..., 1.
FUSION_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class FusionChoice:
    """The chosen flow weight and the validation video accuracy of every weight tried."""

    weight: float
    accuracies: dict[float, float]
    chosen_on: str = "validation"

    def to_dict(self) -> dict:
        """JSON form: the weight, where it was chosen, and the accuracy of each weight tried."""
        return {"flow_weight": self.weight, "chosen_on": self.chosen_on,
                "val_video_acc": {f"{w:.1f}": a for w, a in self.accuracies.items()}}


def paired_clips(video_a: np.ndarray, video_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices pairing two streams' clips of the same videos, clip by clip, in ``a``'s order.

    Both streams score the same clips of each video in the same order, so a
    video is paired when both have the same number of clips for it; a video
    one stream could not score (a clip failed to decode, no flow for a
    one-frame video) is left out of both.
    """
    video_a, video_b = np.asarray(video_a), np.asarray(video_b)
    if video_a.shape == video_b.shape and np.array_equal(video_a, video_b):
        rows = np.arange(len(video_a))
        return rows, rows
    rows_a, rows_b = [], []
    for v in np.unique(video_a):
        in_a, in_b = np.flatnonzero(video_a == v), np.flatnonzero(video_b == v)
        if len(in_a) == len(in_b):
            rows_a.append(in_a)
            rows_b.append(in_b)
    if not rows_a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows_a), np.concatenate(rows_b)


def choose_fusion_weight(probs_rgb: np.ndarray, probs_flow: np.ndarray, video: np.ndarray, labels: np.ndarray,
                         grid: tuple[float, ...] = FUSION_GRID) -> FusionChoice:
    """The flow weight whose fused video predictions are most often right; ties go to the weight nearest 0.5.

    Args:
        probs_rgb, probs_flow: paired clip probabilities ``N x C`` of the two streams.
        video: ``N`` video index of each clip row (``0 .. len(labels)-1``; every video has a clip).
        labels: true class of each video.
    """
    labels = np.asarray(labels)
    rgb = aggregate_video_scores(probs_rgb, video, len(labels))
    flow = aggregate_video_scores(probs_flow, video, len(labels))
    accuracies = {w: float(np.mean(((1 - w) * rgb + w * flow).argmax(1) == labels)) for w in grid}
    best = max(accuracies.values())
    weight = min((w for w, a in accuracies.items() if a == best), key=lambda w: (abs(w - 0.5), w))
    return FusionChoice(weight, accuracies)
