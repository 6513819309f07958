"""Test-time spatial crops: 1 (centre) or 3 (start / centre / end of the frame's long side).

The I3D / SlowFast testing protocol scores every video with ``clips x
crops`` views: ``clips`` uniform windows in time, and for each ``crops``
square-ish windows in space. With 3 crops they are the left, centre and
right windows of a landscape frame (top, centre, bottom of a portrait one),
centred along the short side. The frame has already been resized to the
backbone's ``resize_short``, as for the centre crop; a frame smaller than the
crop is first upscaled to cover it, exactly as
:class:`~vtransfer.data.transforms.EvalClipTransform` does, and crop 1 of 3
is that transform's centre crop.
"""

from __future__ import annotations

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from vtransfer.utils.errors import ConfigError

TEST_CROPS = (1, 3)


def validate_test_crops(crops: int) -> None:
    """Raise :class:`ConfigError` unless ``crops`` is 1 or 3."""
    if crops not in TEST_CROPS:
        raise ConfigError(f"--test-crops must be 1 (centre) or 3 (both ends and centre of the long side), "
                          f"got {crops!r}")


def covering_size(height: int, width: int, crop_size: tuple[int, int]) -> tuple[int, int]:
    """The frame size after upscaling a frame smaller than the crop so that it covers it (else unchanged)."""
    ch, cw = crop_size
    if height >= ch and width >= cw:
        return height, width
    factor = max(ch / height, cw / width)
    return max(ch, math.ceil(height * factor)), max(cw, math.ceil(width * factor))


def crop_windows(height: int, width: int, crop_size: tuple[int, int], crops: int) -> list[tuple[int, int]]:
    """``(top, left)`` of each crop window of a ``height x width`` frame (already covering the crop).

    One crop: the centre (torchvision's rounding). Three: start, centre and
    end of the long side (width when ``width >= height``), centred on the other.
    """
    validate_test_crops(crops)
    ch, cw = crop_size
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    if crops == 1:
        return [(top, left)]
    if width >= height:
        return [(top, 0), (top, left), (top, width - cw)]
    return [(0, left), (top, left), (height - ch, left)]


class SpatialCropsTransform:
    """Crop ``crop`` (0-based) of ``crops`` spatial windows from a uint8 clip ``T x C x H x W``."""

    def __init__(self, crop_size: tuple[int, int], crops: int):
        validate_test_crops(crops)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.crops = crops

    def __call__(self, clip: torch.Tensor, crop: int = 0) -> torch.Tensor:
        """The ``crop``-th window of ``clip`` (upscaled first if the frame is smaller than the crop)."""
        if not 0 <= crop < self.crops:
            raise IndexError(f"crop {crop} out of range for {self.crops} crops")
        if clip.ndim != 4:
            raise ValueError(f"expected a clip T x C x H x W, got shape {tuple(clip.shape)}")
        video = tv_tensors.Video(clip)
        size = covering_size(clip.shape[-2], clip.shape[-1], self.crop_size)
        if size != (clip.shape[-2], clip.shape[-1]):
            video = F.resize(video, list(size), antialias=True)
        top, left = crop_windows(size[0], size[1], self.crop_size, self.crops)[crop]
        return F.crop(video, top, left, *self.crop_size).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"SpatialCropsTransform(crop_size={self.crop_size}, crops={self.crops})"
