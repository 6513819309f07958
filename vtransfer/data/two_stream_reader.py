"""Clips of a two-stream model: the RGB frames and the optical flow at the same frame positions, side by side.

A fused two-stream model (:mod:`vtransfer.models.two_stream`) takes one clip
whose first three channels are RGB and whose others are the flow, so that
evaluation, prediction, feature extraction and export treat it as any model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtransfer.data.decode import ClipReader, DirectReader
from vtransfer.data.flow_reader import DirectFlowReader
from vtransfer.data.preprocessing import Preprocessing


class TwoStreamReader:
    """A :class:`~vtransfer.data.decode.ClipReader` joining an RGB reader's clips and a flow reader's, channel-wise.

    Both read the same frame positions; the video's length is the RGB
    reader's (the flow reader indexes the same frames). ``cache`` is the RGB
    reader's cache, so the worker count follows it.
    """

    def __init__(self, rgb: ClipReader, flow: ClipReader):
        self.rgb = rgb
        self.flow = flow
        self.cache = getattr(rgb, "cache", None)

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """uint8 ``T x (3 + F) x H x W``: the RGB frames, then the flow's ``F`` channels."""
        frames = self.rgb.read_clip(path, start, num_frames, stride, short_side)
        flow = self.flow.read_clip(path, start, num_frames, stride, short_side)
        if flow.shape[0] != frames.shape[0] or flow.shape[-2:] != frames.shape[-2:]:
            raise ValueError(f"{path}: the flow clip {tuple(flow.shape)} does not match the RGB clip {tuple(frames.shape)}")
        return torch.cat([frames, flow], dim=1)

    @property
    def prepares(self) -> bool:
        """Whether either stream's reader readies clips ahead (:meth:`prepare`)."""
        return any(getattr(r, "prepares", False) for r in (self.rgb, self.flow))

    def prepare(self, clips: list[tuple[Path, int]], num_frames: int, stride: int, threads: int | None = None) -> None:
        """Let each stream's reader ready the clips ``(path, start)`` before they are read."""
        for reader in (self.rgb, self.flow):
            ready = getattr(reader, "prepare", None)
            if ready is not None:
                ready(clips, num_frames, stride, threads)

    def num_frames(self, path: str | Path) -> int:
        """Frame count of ``path`` as the RGB reader indexes it."""
        return self.rgb.num_frames(path)


def direct_reader(preprocessing: Preprocessing) -> ClipReader:
    """A reader that decodes each clip from its file: frames, flow, or both, as ``preprocessing.stream`` says."""
    if preprocessing.stream == "flow":
        return DirectFlowReader(preprocessing.flow)
    if preprocessing.stream == "two-stream":
        return TwoStreamReader(DirectReader(), DirectFlowReader(preprocessing.flow))
    return DirectReader()
