"""Late fusion of two streams' class probabilities: pairing their clips, and choosing the weight on validation.

The fused probability is ``(1 - w) * p_rgb + w * p_flow``, or with the
``geometric`` rule ``p_rgb^(1 - w) * p_flow^w`` renormalised
(:func:`fuse_probabilities`); ``w`` is the flow
stream's share. Each clip is fused, then a video's fused clips are averaged,
as the saved model's predictions are. Two-stream papers average
(``w = 0.5``); vtransfer also tries the grid 0, 0.1, ..., 1 on the validation
split and keeps the most accurate weight, the one nearest 0.5 among ties
(small validation splits tie often, and then the papers' average is the prior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vtransfer.data.flow_settings import FUSION_RULES
from vtransfer.evaluation.metrics import aggregate_video_scores
from vtransfer.utils.errors import ConfigError

#: The flow weights tried on validation: 0, 0.1, ..., 1.
FUSION_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class FusionChoice:
    """The chosen flow weight, the fusion rule, and the validation video accuracy of every weight tried."""

    weight: float
    accuracies: dict[float, float]
    chosen_on: str = "validation"
    rule: str = "mean"

    def to_dict(self) -> dict:
        """JSON form: the weight, the rule, where the weight was chosen, and the accuracy of each weight tried."""
        return {"flow_weight": self.weight, "fusion_rule": self.rule, "chosen_on": self.chosen_on,
                "val_video_acc": {f"{w:.1f}": a for w, a in self.accuracies.items()}}


def check_fusion_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`~vtransfer.data.flow_settings.FUSION_RULES`, else :class:`ConfigError`."""
    if rule not in FUSION_RULES:
        raise ConfigError(f"the fusion rule must be one of {', '.join(FUSION_RULES)}; got {rule!r}")
    return rule


def fuse_probabilities(p_rgb, p_flow, flow_weight: float, rule: str = "mean"):
    """The fused class probabilities of two streams, ``... x C`` tensors or arrays of the same shape.

    ``mean``: ``(1 - w) * p_rgb + w * p_flow``. ``geometric``: ``p_rgb^(1 - w) * p_flow^w`` renormalised over
    the last axis, computed in logs (a probability of 0 counts as the smallest positive float, so that
    a weight of 0 ignores a stream exactly).
    """
    w = float(flow_weight)
    if check_fusion_rule(rule) == "mean":
        return (1.0 - w) * p_rgb + w * p_flow
    if isinstance(p_rgb, torch.Tensor):
        tiny = torch.finfo(p_rgb.dtype).tiny
        return torch.softmax((1.0 - w) * p_rgb.clamp_min(tiny).log() + w * p_flow.clamp_min(tiny).log(), dim=-1)
    p_rgb, p_flow = np.asarray(p_rgb), np.asarray(p_flow)
    tiny = np.finfo(np.result_type(p_rgb, np.float32)).tiny
    logs = (1.0 - w) * np.log(np.maximum(p_rgb, tiny)) + w * np.log(np.maximum(p_flow, tiny))
    fused = np.exp(logs - logs.max(axis=-1, keepdims=True))
    return fused / fused.sum(axis=-1, keepdims=True)


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
                         grid: tuple[float, ...] = FUSION_GRID, rule: str = "mean") -> FusionChoice:
    """The flow weight whose fused video predictions are most often right; ties go to the weight nearest 0.5.

    Args:
        probs_rgb, probs_flow: paired clip probabilities ``N x C`` of the two streams.
        video: ``N`` video index of each clip row (``0 .. len(labels)-1``; every video has a clip).
        labels: true class of each video.
        rule: ``mean`` or ``geometric`` (:func:`fuse_probabilities`).
    """
    labels = np.asarray(labels)
    probs_rgb, probs_flow = np.asarray(probs_rgb, dtype=np.float64), np.asarray(probs_flow, dtype=np.float64)

    def accuracy(w: float) -> float:
        fused = aggregate_video_scores(fuse_probabilities(probs_rgb, probs_flow, w, rule), video, len(labels))
        return float(np.mean(fused.argmax(1) == labels))

    accuracies = {w: accuracy(w) for w in grid}
    best = max(accuracies.values())
    weight = min((w for w, a in accuracies.items() if a == best), key=lambda w: (abs(w - 0.5), w))
    return FusionChoice(weight, accuracies, rule=rule)
