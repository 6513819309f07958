"""Clip transforms on uint8 video tensors ``T x C x H x W`` (torchvision.transforms.v2).

The same spatial crop and flip apply to every frame of a clip. Training
randomness comes from an explicit ``torch.Generator`` (never the global RNG)
so a dataset can derive it from (seed, epoch, index) and stay reproducible
with any number of DataLoader workers.

Normalisation is not done here: :func:`normalize_clips` runs on whole
batches in the training loop with the backbone's own mean/std.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from vtransfer.data.flow import flip_flow_x
from vtransfer.data.preprocessing import Preprocessing

ClipTransform = Callable[..., torch.Tensor]


def _as_video(clip: torch.Tensor) -> torch.Tensor:
    """Check a clip is ``T x C x H x W`` and wrap it so v2 treats it as video."""
    if clip.ndim != 4:
        raise ValueError(f"expected a clip T x C x H x W, got shape {tuple(clip.shape)}")
    return tv_tensors.Video(clip)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """One float uniform in [low, high) drawn from ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, high: int) -> int:
    """One int uniform in [0, high) drawn from ``generator``."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


class TrainClipTransform:
    """Random resized crop to ``crop_size`` and a horizontal flip with probability ½.

    The crop box covers a ``scale`` fraction of the frame area with an aspect
    ratio in ``ratio`` (log-uniform), the same rule as torchvision's
    RandomResizedCrop; it falls back to the largest centred box of a valid
    ratio when ten draws fail.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        flow_from: int | None = None,
    ):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.flow_from = flow_from  # channels from here on are quantised optical flow: a flip also negates its x

    def crop_box(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) of a random crop of a ``height x width`` frame."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop, resize and maybe flip ``clip`` (uint8 ``T x C x H x W``); returns a plain tensor."""
        video = _as_video(clip)
        top, left, h, w = self.crop_box(clip.shape[-2], clip.shape[-1], generator)
        video = F.resized_crop(video, top, left, h, w, list(self.crop_size), antialias=True)
        if float(torch.rand((), generator=generator)) < self.flip_p:
            video = F.horizontal_flip(video)
            if self.flow_from is not None:
                k = self.flow_from
                video = torch.cat([video[:, :k], flip_flow_x(video[:, k:])], dim=1) if k else flip_flow_x(video)
        return video.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"TrainClipTransform(crop_size={self.crop_size}, scale={self.scale}, ratio={self.ratio})"


class EvalClipTransform:
    """Centre crop to ``crop_size``; a frame smaller than the crop is first upscaled to cover it."""

    def __init__(self, crop_size: tuple[int, int]):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic crop of ``clip`` (uint8 ``T x C x H x W``); ``generator`` is ignored."""
        video = _as_video(clip)
        ch, cw = self.crop_size
        height, width = clip.shape[-2], clip.shape[-1]
        if height < ch or width < cw:
            factor = max(ch / height, cw / width)
            size = [max(ch, math.ceil(height * factor)), max(cw, math.ceil(width * factor))]
            video = F.resize(video, size, antialias=True)
        return F.center_crop(video, [ch, cw]).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"EvalClipTransform(crop_size={self.crop_size})"


DEFAULT_CROP_SCALE = (0.35, 1.0)


def train_clip_transform(crop_size: tuple[int, int], scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                         flow_from: int | None = None) -> TrainClipTransform:
    """Training augmentation: random resized crop (area fraction ``scale``) + horizontal flip.

    ``flow_from``: the clip's channels from this one on are quantised optical flow, whose x channel a flip negates.
    The returned callable takes ``(clip, generator=None)``.
    """
    return TrainClipTransform(crop_size, scale=scale, flow_from=flow_from)


def eval_clip_transform(crop_size: tuple[int, int]) -> EvalClipTransform:
    """Evaluation transform: centre crop (upscaling first if the frame is smaller than the crop)."""
    return EvalClipTransform(crop_size)


def normalize_clips(
    clips: torch.Tensor, preprocessing: Preprocessing, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``B x T x C x H x W`` -> float ``B x C x T x H x W`` with ``(x/255 - mean) / std``.

    This is the per-backbone normalisation hook: the backbone's
    :class:`~vtransfer.data.preprocessing.Preprocessing` supplies mean and std
    (I3D's [-1, 1] range is mean = std = 0.5). The arithmetic runs in
    float32 and the result is cast to ``dtype``. Works on any device.
    """
    if clips.ndim != 5:
        raise ValueError(f"expected clips B x T x C x H x W, got shape {tuple(clips.shape)}")
    channels = clips.shape[2]
    if channels != len(preprocessing.mean):
        raise ValueError(f"clips have {channels} channels, preprocessing expects {len(preprocessing.mean)}")
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=clips.device)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=clips.device)
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1, 1)
    x = clips.permute(0, 2, 1, 3, 4).to(torch.float32)
    x = torch.addcmul(-shift, x, scale)  # x * scale - shift
    return x.to(dtype).contiguous()
