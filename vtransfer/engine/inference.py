"""Run a model over clips and collect softmax probabilities per clip."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from vtransfer.data.transforms import normalize_clips
from vtransfer.models.base import Preprocessing, VideoBackbone
from vtransfer.utils.runtime import autocast


@dataclass
class ClipPredictions:
    """Per-clip class probabilities and which video each clip came from."""

    probs: np.ndarray  # N_clips x C, float32
    video: np.ndarray  # N_clips, int64 index into the dataset's records
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of clips that failed to decode


def batch_inputs(batch: dict, preprocessing: Preprocessing, device: torch.device) -> torch.Tensor:
    """uint8 clips of a collated batch -> normalised float ``B x 3 x T x H x W`` on ``device``."""
    clips = batch["clip"].to(device, non_blocking=True)
    return normalize_clips(clips, preprocessing)


@torch.inference_mode()
def predict_clip_probs(
    model: VideoBackbone,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    on_batch=None,
) -> ClipPredictions:
    """Softmax probabilities for every clip ``loader`` yields (model in eval mode)."""
    model.eval()
    probs, videos, errors = [], [], []
    for batch in loader:
        errors.extend(batch["errors"])
        if batch["clip"].shape[0] == 0:
            if on_batch:
                on_batch()
            continue
        x = batch_inputs(batch, model.preprocessing, device)
        with autocast(device, precision):
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        videos.append(batch["video"])
        if on_batch:
            on_batch()
    if probs:
        p = torch.cat(probs).numpy().astype(np.float32)
        v = torch.cat(videos).numpy().astype(np.int64)
    else:
        p = np.zeros((0, model.num_classes), dtype=np.float32)
        v = np.zeros((0,), dtype=np.int64)
    return ClipPredictions(probs=p, video=v, errors=errors)
