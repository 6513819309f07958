"""Small real video files for tests, written with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """A flat grey frame whose level encodes ``i`` (8 * i), plus a bright moving bar."""
    img = np.full((height, width, 3), (8 * i) % 256, dtype=np.uint8)
    img[: height // 4, (3 * i) % width] = 255
    return img


def write_video(
    path: Path | bytes,
    num_frames: int,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: int = 25,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    lossless: bool = True,
    container_options: dict | None = None,
    rotation: int = 0,
) -> Path:
    """Encode ``num_frames`` frames of :func:`frame_image` (explicit ``pts`` make a variable frame rate).

    ``rotation`` (degrees counter-clockwise) goes into the container's display
    matrix, as phones tag portrait video. ``path`` may be bytes (non-UTF-8
    names); its folder is created.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(os.fsdecode(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "ultrafast"} if lossless else {"preset": "ultrafast", "threads": "1"}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for i in range(num_frames):
            img = frame_image(i, width, height)
            if pix_fmt == "gray":
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[..., 0]), format="gray")
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(os.fsdecode(path))


def write_frames(path: Path, frames: np.ndarray, fps: int = 25, crf: int | None = None) -> Path:
    """Write uint8 ``T x H x W x 3`` RGB frames as H.264 (even H and W): lossless, or lossy at ``crf``.

    The folder is created.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = ({"qp": "0", "preset": "ultrafast"} if crf is None
                          else {"crf": str(crf), "preset": "ultrafast", "threads": "1"})
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)
