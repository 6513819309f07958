"""Validated numpy views of model scores and labels, shared by the metrics and calibration."""

from __future__ import annotations

from typing import Any

import numpy as np


class NonFiniteScores(ValueError):
    """Model outputs with NaN or infinite values: the model diverged (or its input was broken)."""


def as_numpy(x: Any) -> np.ndarray:
    """``np.asarray`` that also accepts torch tensors (on any device, with grad)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bf16/fp16 have no numpy dtype
        x = x.numpy()
    return np.asarray(x)


def check_probs(probs: np.ndarray, name: str) -> np.ndarray:
    """Validate a 2-D ``[N, C]`` finite score array; return it as float64."""
    probs = as_numpy(probs)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array [N, C] with C >= 1, got shape {probs.shape}")
    probs = probs.astype(np.float64, copy=False)
    if not np.all(np.isfinite(probs)):
        raise NonFiniteScores(f"{name} contains NaN or infinite values")
    return probs


def check_labels(labels: Any, n: int, num_classes: int, name: str) -> np.ndarray:
    """Validate integer labels of length ``n`` in ``[0, num_classes)``."""
    labels = as_numpy(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {labels.shape}")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} has values outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")
    return labels
