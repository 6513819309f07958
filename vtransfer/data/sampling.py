"""Where clips start: one random clip for training, N uniform clips for evaluation.

A clip of ``clip_len`` frames at ``stride`` spans ``(clip_len - 1) * stride + 1``
frames. Starts are chosen so the span fits inside the video when it can;
a video shorter than the span starts at 0 and the decoder repeats its last
frame (see :func:`vtransfer.data.decode.read_clip`).
"""

from __future__ import annotations

import torch


def clip_span(clip_len: int, stride: int) -> int:
    """Number of source frames a clip covers: ``(clip_len - 1) * stride + 1``."""
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
    return (clip_len - 1) * stride + 1


def random_clip_start(num_frames: int, clip_len: int, stride: int, generator: torch.Generator) -> int:
    """A start frame drawn uniformly from every position where the clip fits (0 if none does)."""
    last_start = max(0, num_frames - clip_span(clip_len, stride))
    return int(torch.randint(0, last_start + 1, (1,), generator=generator).item())


def uniform_clip_starts(num_frames: int, clip_len: int, stride: int, n: int) -> list[int]:
    """``n`` start frames spread evenly from the first to the last position where the clip fits.

    ``n == 1`` gives the centred clip; a video shorter than the clip span
    gives ``n`` zeros.
    """
    if n < 1:
        raise ValueError(f"number of clips must be >= 1, got {n}")
    last_start = max(0, num_frames - clip_span(clip_len, stride))
    if n == 1:
        return [last_start // 2]
    return [int(round(i * last_start / (n - 1))) for i in range(n)]
