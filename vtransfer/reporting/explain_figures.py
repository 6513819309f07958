"""Pictures of where and when a model looks: a heat-map GIF of a clip, and a strip of its frames over a bar.

The heat map is laid over the frames the model saw (after resize and crop): its
colour (``inferno``) gives the map's value, its opacity grows with it, so cold
places show the frame untouched. For drawing, one clip's map is stretched to
[0, 1] between its minimum and maximum over the whole clip (a Grad-CAM map
rarely falls to zero), so a frame the model hardly uses stays clear.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from vtransfer.reporting.plots import new_figure, to_png, write_png
from vtransfer.utils.atomic import atomic_write_bytes

#: Colour map of the heat map, and the opacity of its hottest point.
CMAP = "inferno"
MAX_ALPHA = 0.6
#: Frames shown in a strip.
STRIP_FRAMES = 8
#: A GIF frame is shown at least this long, and at most this long (ms); in between, at the clip's own pace.
GIF_FRAME_MS = (100, 500)
#: GIF frames are scaled up until their short side is at least this many pixels.
GIF_MIN_SIDE = 160


def heat_overlay(frames: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 ``T x H x W x 3`` frames with the ``T x H x W`` map laid over them (stretched to its range)."""
    if frames.shape[:3] != cam.shape:
        raise ValueError(f"frames {frames.shape[:3]} and map {cam.shape} differ in size")
    low, high = float(cam.min()), float(cam.max())
    value = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
    colour = matplotlib.colormaps[CMAP](value)[..., :3]
    alpha = (MAX_ALPHA * value)[..., None]
    out = (1.0 - alpha) * (frames.astype(np.float32) / 255.0) + alpha * colour
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def shown_frames(frames: int, count: int = STRIP_FRAMES) -> list[int]:
    """The ``count`` frame indices a strip shows: the frame under the middle of each of ``count`` equal tiles."""
    if frames <= count:
        return list(range(frames))
    return [min(frames - 1, int((j + 0.5) * frames / count)) for j in range(count)]


def frame_ms(stride: int, fps: float | None) -> int:
    """How long one GIF frame shows: the clip's real pace (``stride / fps``), kept within :data:`GIF_FRAME_MS`."""
    low, high = GIF_FRAME_MS
    real = 1000.0 * stride / fps if fps else low
    return int(min(high, max(low, real)))


def write_gif(path: str | Path, panels: Sequence[np.ndarray], duration_ms: int) -> Path:
    """An endlessly looping GIF of ``panels`` (each uint8 ``T x H x W x 3``) side by side, scaled up when small."""
    strip = np.concatenate(list(panels), axis=2) if len(panels) > 1 else panels[0]
    h, w = strip.shape[1:3]
    scale = max(1, math.ceil(GIF_MIN_SIDE / min(h, w)))
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in strip]
    if scale > 1:
        images = [im.resize((w * scale, h * scale), Image.Resampling.BILINEAR) for im in images]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0,
                   optimize=False)
    return atomic_write_bytes(path, buf.getvalue())


def strip_png(
    frames: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray | None]],
    importance: np.ndarray,
    *,
    title: str,
    note: str | None = None,
    frame_numbers: Sequence[int] | None = None,
    count: int = STRIP_FRAMES,
) -> bytes:
    """PNG bytes: ``count`` frames of the clip per row, each row with its map laid over, and the temporal bar below.

    Args:
        frames: uint8 ``T x H x W x 3``, the clip as the model saw it.
        rows: ``(label, map or None)`` per row (``T x H x W`` maps; ``None`` shows the frames bare).
        importance: per frame of the clip, how much the class score drops when that frame is occluded.
        title: the line above the strip.
        note: a sentence below the bar (why there is no map, what the bar means), wrapped.
        frame_numbers: the clip's frames' numbers in the video, for the bar's ticks (default 0..T-1).
    """
    t, h, w = frames.shape[:3]
    idx = shown_frames(t, count)
    tiles = len(idx)
    width_in = 8.0
    row_in = width_in * h / (w * tiles)
    bar_in = 1.3
    note_lines = textwrap.wrap(note, 120) if note else []
    height = len(rows) * row_in + bar_in + 0.45 + 0.16 * len(note_lines)
    fig = new_figure(width_in, height)
    top = 1.0 - 0.4 / height
    bottom_bar = (0.3 + 0.16 * len(note_lines)) / height
    bar_h = (bar_in - 0.35) / height
    row_h = (top - bottom_bar - bar_h - 0.12 / height) / max(1, len(rows))
    for r, (label, cam) in enumerate(rows):
        shown = frames[idx] if cam is None else heat_overlay(frames[idx], cam[idx])
        ax = fig.add_axes((0.06, top - (r + 1) * row_h, 0.93, row_h))
        ax.imshow(np.concatenate(list(shown), axis=1), extent=(0, t, h, 0), aspect="auto", interpolation="bilinear")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8)
        for j in range(1, tiles):
            ax.axvline(j * t / tiles, color="white", linewidth=1)
    bar = fig.add_axes((0.06, bottom_bar, 0.93, bar_h))
    values = np.asarray(importance, dtype=np.float64)
    colours = np.where(values >= 0, "#c0392b", "#7f8c8d")
    bar.bar(np.arange(t) + 0.5, values, width=0.8, color=colours)
    bar.axhline(0, color="black", linewidth=0.6)
    bar.set_xlim(0, t)
    numbers = list(frame_numbers) if frame_numbers is not None else list(range(t))
    step = max(1, math.ceil(t / 16))
    bar.set_xticks(np.arange(0, t, step) + 0.5, [str(numbers[i]) for i in range(0, t, step)], fontsize=7)
    bar.tick_params(axis="y", labelsize=7)
    bar.set_ylabel("score drop", fontsize=7)
    bar.set_xlabel("frame of the video (occluded in turn)", fontsize=7)
    fig.suptitle(title, fontsize=9, y=1.0 - 0.08 / height, va="top")
    if note_lines:
        fig.text(0.06, 0.02 / height, "\n".join(note_lines), fontsize=7, va="bottom", ha="left", color="#444444")
    return to_png(fig)


def write_strip(path: str | Path, *args, **kwargs) -> Path:
    """:func:`strip_png` written to ``path`` atomically."""
    return write_png(strip_png(*args, **kwargs), path)
