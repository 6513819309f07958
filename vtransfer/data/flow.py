"""Dense optical flow between video frames, quantised to uint8 images the two-stream way.

The flow stream of two-stream networks (Simonyan & Zisserman 2014; I3D,
Carreira & Zisserman 2017) does not see RGB frames but the optical flow
between them: per pixel, how far (in pixels) the picture moved from one frame
to the next, horizontally (x) and vertically (y). This module computes that
flow with OpenCV and stores it compactly:

* each frame is converted to grayscale; the flow of a pair ``(a, b)`` is the
  motion from frame ``a`` to frame ``b`` (``frame_a[y, x] ~ frame_b[y + fy,
  x + fx]``), so a picture moving right by 2 px per frame gives ``fx = +2``;
* x and y are clipped to ``[-bound, +bound]`` px and mapped linearly to
  uint8 with **128 = no motion**: ``q = 128 + round(f * 127 / bound)``, so
  ``-bound -> 1``, ``0 -> 128``, ``+bound -> 255`` (one step is
  ``bound / 127`` px; the value 0 is never produced). This is the usual
  two-stream quantisation (``(f + bound) * 255 / (2 * bound)``, as in the
  ``dense_flow`` tool I3D-era code used) to within half a step, but exactly
  symmetric, so that zero motion dequantises to exactly 0;
* optionally a third channel holds the magnitude ``sqrt(fx^2 + fy^2)``,
  clipped to ``bound`` and scaled to ``0..255`` (``round(m * 255 / bound)``).

:func:`dequantise` is the inverse the model side uses: x and y back to
``[-1, 1]`` (units of ``bound``; I3D's flow input range) or to pixels.

Methods (:data:`FLOW_METHODS`): DIS (Kroeger et al. 2016) at OpenCV's three
presets, Farneback (2003) and TV-L1 (Zach et al. 2007; the flow I3D used,
from ``cv2.optflow`` in opencv-contrib, and by far the slowest). OpenCV is an
optional dependency, imported only when flow is computed (:func:`import_cv2`).

This module only computes and quantises flow; it knows nothing of models or
caches. Which frames are paired is :func:`flow_pairs`'s job:
``pairing="next-frame"`` pairs every sampled frame with the frame right after
it in the video (the motion at that instant, whatever the sampling stride);
``pairing="next-sampled"`` pairs consecutive *sampled* frames (with a
sampling stride ``k``, the motion over ``k`` frames: larger, so better
resolved by the quantisation, but harder for the flow method to track).

Example::

    from vtransfer.data.decode import read_video
    from vtransfer.data.flow import FlowSettings, compute_flow, dequantise

    video = read_video("clip.mp4", short_side=128)          # T x 3 x H x W uint8
    settings = FlowSettings("dis-medium", bound=20.0, channels=2)
    q = compute_flow(video, settings, indices=[0, 30, 60], source="clip.mp4")  # 3 x 2 x H x W uint8
    x = dequantise(q, settings.bound)                       # float32 in [-1, 1]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from vtransfer.data.flow_settings import FLOW_METHODS, PAIRINGS, FlowSettings
from vtransfer.utils.errors import ConfigError, DatasetError

#: The pip package that provides ``cv2`` including ``cv2.optflow`` (TV-L1).
OPENCV_PACKAGE = "opencv-contrib-python-headless"

#: Normalisation of quantised flow as a model input, per channel: ``(q / 255 - FLOW_MEAN) / FLOW_STD = (q - 128) / 127``,
#: so x and y land in [-1, 1] in units of the bound (I3D's flow input range).
FLOW_MEAN = 128 / 255
FLOW_STD = 127 / 255

#: The uint8 value that means "no motion" in the x and y channels.
ZERO_LEVEL = 128
#: Steps from zero to +-bound in the x and y channels (so +-bound quantise to 255 and 1).
HALF_RANGE = 127

_DIS_PRESETS = {
    "dis-ultrafast": "DISOpticalFlow_PRESET_ULTRAFAST",
    "dis-fast": "DISOpticalFlow_PRESET_FAST",
    "dis-medium": "DISOpticalFlow_PRESET_MEDIUM",
}
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags):
# the values of OpenCV's own sample (samples/python/opt_flow.py).
_FARNEBACK_ARGS = (0.5, 3, 15, 3, 5, 1.2, 0)


# -- OpenCV ---------------------------------------------------------------------------------


def import_cv2(contrib: bool = False) -> ModuleType:
    """Import and return OpenCV's ``cv2``, or raise a :class:`ConfigError` that says what to install.

    ``contrib=True`` also requires ``cv2.optflow`` (TV-L1), which only the
    opencv-contrib wheels have.

    Raises:
        ConfigError: ``cv2`` cannot be imported, or ``contrib`` is asked and
            the installed OpenCV lacks ``cv2.optflow``. The message names
            :data:`OPENCV_PACKAGE`.
    """
    try:
        import cv2  # optional dependency, imported on first use
    except ImportError as e:
        raise ConfigError(
            f"optical flow needs OpenCV, which is not installed ({e}): run `pip install {OPENCV_PACKAGE}`"
        ) from None
    if contrib and not hasattr(cv2, "optflow"):
        raise ConfigError(
            "flow method 'tvl1' needs OpenCV's contrib modules (cv2.optflow), which the installed OpenCV lacks: "
            f"uninstall opencv-python / opencv-python-headless and run `pip install {OPENCV_PACKAGE}` "
            "(only one OpenCV wheel may be installed: they all provide cv2)"
        )
    return cv2


# -- settings ---------------------------------------------------------------------------------


# -- pairing ------------------------------------------------------------------------------------


def flow_pairs(num_frames: int, indices: Sequence[int] | None = None, pairing: str = "next-frame") -> list[tuple[int, int]]:
    """Which frame pairs ``(a, b)`` to compute flow for, given the sampled frame ``indices``.

    * ``indices=None``: every frame is sampled; the pairs are ``(i, i + 1)``
      for ``i < num_frames - 1`` (``num_frames - 1`` pairs; both pairings agree).
    * ``"next-frame"``: one pair per sampled index ``i``: ``(i, i + 1)``, the
      motion right after that frame; the last frame of the video, which has
      no successor, gets ``(i - 1, i)``, the motion into it. ``len(indices)``
      pairs.
    * ``"next-sampled"``: consecutive sampled frames, ``(indices[j],
      indices[j + 1])``: ``len(indices) - 1`` pairs. With a clip sampled at
      stride ``k`` this is the motion over ``k`` frames.

    Raises:
        ConfigError: an unknown pairing.
        ValueError: an index outside ``0 .. num_frames - 1``, or fewer than 2 frames.
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown flow pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")
    if num_frames < 2:
        raise ValueError(f"flow needs at least 2 frames, got {num_frames}")
    if indices is None:
        return [(i, i + 1) for i in range(num_frames - 1)]
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < num_frames]
    if bad:
        raise ValueError(f"frame indices {bad[:5]} are outside 0..{num_frames - 1}")
    if pairing == "next-frame":
        return [(i, i + 1) if i + 1 < num_frames else (i - 1, i) for i in idx]
    return list(itertools.pairwise(idx))


# -- quantisation ------------------------------------------------------------------------------


def quantise(flow: np.ndarray, bound: float, channels: int = 2) -> np.ndarray:
    """Quantise float flow in pixels, ``H x W x 2`` (x, y; OpenCV's layout), to uint8 ``C x H x W``.

    x and y: clipped to ``[-bound, bound]``, then ``128 + round(f * 127 / bound)``
    (``1 .. 255``, 128 = no motion). With ``channels=3`` the third channel is
    the magnitude ``sqrt(x^2 + y^2)`` of the *unclipped* flow, clipped to
    ``bound``, as ``round(m * 255 / bound)`` (``0 .. 255``). Rounding is to
    nearest, so dequantising is off by at most half a step
    (``bound / 254`` px for x and y, ``bound / 510`` px for magnitude).

    Raises:
        ValueError: ``flow`` is not ``H x W x 2``, ``bound`` is not positive, or channels not 2 or 3.
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be H x W x 2 (x, y), got shape {flow.shape}")
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    if channels not in (2, 3):
        raise ValueError(f"channels must be 2 or 3, got {channels}")
    xy = np.clip(flow, -bound, bound) * (HALF_RANGE / bound)
    out = np.empty((channels,) + flow.shape[:2], dtype=np.uint8)
    out[0] = np.rint(xy[..., 0]) + ZERO_LEVEL
    out[1] = np.rint(xy[..., 1]) + ZERO_LEVEL
    if channels == 3:
        mag = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2)
        out[2] = np.rint(np.minimum(mag, bound) * (255.0 / bound))
    return out


def dequantise(flow: np.ndarray | torch.Tensor, bound: float, unit: str = "bound") -> torch.Tensor:
    """The inverse of :func:`quantise`: uint8 ``... x C x H x W`` flow to float32 (a new tensor).

    ``C`` is 2 (x, y) or 3 (x, y, magnitude); any leading dimensions (frames,
    batch) are kept.

    * ``unit="bound"`` (what a network gets): x and y in ``[-1, 1]``
      (``(q - 128) / 127``; ±1 is ±``bound`` px, I3D's flow range), magnitude in
      ``[0, 1]`` (``q / 255``).
    * ``unit="px"``: x, y and magnitude in pixels (the above times ``bound``).

    Raises:
        ValueError: not uint8, no channel axis of size 2 or 3 at dim -3,
            a non-positive bound, or an unknown unit.
    """
    t = torch.as_tensor(flow)
    if t.dtype != torch.uint8:
        raise ValueError(f"quantised flow must be uint8, got {t.dtype}")
    if t.dim() < 3 or t.shape[-3] not in (2, 3):
        raise ValueError(f"quantised flow must be ... x C x H x W with C = 2 or 3, got shape {tuple(t.shape)}")
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    if unit not in ("bound", "px"):
        raise ValueError(f"unit must be 'bound' or 'px', got {unit!r}")
    out = t.to(torch.float32)
    out[..., :2, :, :].sub_(ZERO_LEVEL).div_(HALF_RANGE)
    if t.shape[-3] == 3:
        out[..., 2, :, :].div_(255.0)
    if unit == "px":
        out.mul_(float(bound))
    return out


# -- computing flow ---------------------------------------------------------------------------


def _frames_hwc(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """``T x H x W x 3`` uint8 numpy view of RGB frames given as ``T x H x W x 3`` or ``T x 3 x H x W``."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        frames = frames.detach().cpu()
        if frames.dim() == 4 and frames.shape[-1] != 3 and frames.shape[1] == 3:
            frames = frames.permute(0, 2, 3, 1)  # read_video's T x 3 x H x W (channels-last strides: free)
        arr = frames.numpy()
    else:
        arr = np.asarray(frames)
        if arr.ndim == 4 and arr.shape[-1] != 3 and arr.shape[1] == 3:
            arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be T x H x W x 3 or T x 3 x H x W RGB, got shape {tuple(arr.shape)}")
    return arr


def _estimator(method: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function ``(gray_a, gray_b) -> H x W x 2 float32 flow in px`` for ``method``."""
    cv2 = import_cv2(contrib=method == "tvl1")
    if method in _DIS_PRESETS:
        dis = cv2.DISOpticalFlow_create(getattr(cv2, _DIS_PRESETS[method]))
        return lambda a, b: dis.calc(a, b, None)
    if method == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, *_FARNEBACK_ARGS)
    if method == "tvl1":
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda a, b: tvl1.calc(a, b, None)
    raise ConfigError(f"unknown flow method {method!r}: choose one of {', '.join(FLOW_METHODS)}")


def _too_short(num_frames: int, source: str | Path | None) -> DatasetError:
    """The error for a video with fewer than 2 frames (naming ``source`` when known)."""
    what = f"{source}: " if source is not None else ""
    return DatasetError(f"{what}optical flow needs at least 2 frames, but the video has {num_frames}")


def _resolve_pairs(num_frames: int, settings: FlowSettings, indices: Sequence[int] | None,
                   pairs: Sequence[tuple[int, int]] | None, source: str | Path | None) -> list[tuple[int, int]]:
    """The frame pairs to compute: ``pairs`` checked, or those ``indices`` give (:func:`flow_pairs`)."""
    if num_frames < 2:
        raise _too_short(num_frames, source)
    if pairs is not None and indices is not None:
        raise ValueError("give frame indices or explicit pairs, not both")
    if pairs is None:
        return flow_pairs(num_frames, indices, settings.pairing)
    pairs = [(int(a), int(b)) for a, b in pairs]
    bad = [p for p in pairs if not (0 <= p[0] < num_frames and 0 <= p[1] < num_frames)]
    if bad:
        raise ValueError(f"frame pairs {bad[:5]} are outside 0..{num_frames - 1}")
    return pairs


def iter_flow(
    frames: np.ndarray | torch.Tensor,
    settings: FlowSettings | None = None,
    *,
    indices: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    source: str | Path | None = None,
    raw: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the flow of each frame pair, one at a time (for progress display or streaming).

    Arguments as for :func:`compute_flow`. Yields uint8 ``C x H x W``
    quantised flow, or with ``raw=True`` the float32 ``H x W x 2`` flow in
    pixels before clipping and quantisation (``settings.bound`` and
    ``channels`` then play no part). Each frame is converted to grayscale
    once, however many pairs it is in. The checks (frame count, shapes,
    OpenCV present) happen on the first ``next()``.

    Raises:
        DatasetError: fewer than 2 frames (naming ``source`` when given).
        ConfigError: OpenCV missing (names the package to install).
        ValueError: bad frame array, indices or pairs.
    """
    settings = settings or FlowSettings()
    arr = _frames_hwc(frames)
    pairs = _resolve_pairs(arr.shape[0], settings, indices, pairs, source)
    estimate = _estimator(settings.method)
    cv2 = import_cv2()
    gray: dict[int, np.ndarray] = {}

    def to_gray(i: int) -> np.ndarray:
        if i not in gray:
            if len(gray) > 8:  # pairs mostly move forward: keep only a few recent frames
                gray.pop(next(iter(gray)))
            gray[i] = cv2.cvtColor(np.ascontiguousarray(arr[i]), cv2.COLOR_RGB2GRAY)
        return gray[i]

    for a, b in pairs:
        flow = estimate(to_gray(a), to_gray(b))
        yield flow if raw else quantise(flow, settings.bound, settings.channels)


def compute_flow(
    frames: np.ndarray | torch.Tensor,
    settings: FlowSettings | None = None,
    *,
    indices: Sequence[int] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    source: str | Path | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> np.ndarray:
    """Quantised optical flow of a video: uint8 ``N x C x H x W`` (C = ``settings.channels``).

    Args:
        frames: uint8 RGB frames, ``T x H x W x 3`` (numpy or torch) or
            ``T x 3 x H x W`` as :func:`vtransfer.data.decode.read_video`
            returns them (a trailing axis of size 3 is taken as the channels).
        settings: method, bound, channels, pairing (default :class:`FlowSettings()`).
        indices: the sampled frames; the pairs follow ``settings.pairing``
            (:func:`flow_pairs`): ``len(indices)`` flows for ``next-frame``,
            ``len(indices) - 1`` for ``next-sampled``. ``None``: every
            consecutive pair, ``T - 1`` flows.
        pairs: explicit ``(a, b)`` frame pairs instead of ``indices``.
        source: the video's path, named in errors.
        progress: called as ``progress(done, total)`` after each pair (e.g.
            to show frames per second).

    Raises:
        DatasetError: fewer than 2 frames (naming ``source`` when given).
        ConfigError: OpenCV missing (names the package to install).
        ValueError: bad frame array, indices or pairs.
    """
    settings = settings or FlowSettings()
    arr = _frames_hwc(frames)
    pairs = _resolve_pairs(arr.shape[0], settings, indices, pairs, source)
    total = len(pairs)
    out = np.empty((total, settings.channels) + arr.shape[1:3], dtype=np.uint8)
    for n, q in enumerate(iter_flow(arr, settings, pairs=pairs, source=source)):
        out[n] = q
        if progress is not None:
            progress(n + 1, total)
    return out


def flip_flow_x(clip: torch.Tensor) -> torch.Tensor:
    """Negate the x channel of quantised flow ``... x C x H x W`` (C = 2 or 3): the value half of a horizontal flip.

    Mirroring the picture (``horizontal_flip``) moves the flow vectors but not
    their values; motion to the right becomes motion to the left, so x must
    become -x: ``q -> 256 - q`` (128 stays 128, 1 <-> 255), clamped to
    ``1..255``. y and the magnitude are unchanged. Call it with the pixel
    flip, before or after. Returns a new tensor of ``clip``'s type.

    Raises:
        ValueError: not uint8, or no flow channel axis (2 or 3) at dim -3.
    """
    if clip.dtype != torch.uint8 or clip.dim() < 3 or clip.shape[-3] not in (2, 3):
        raise ValueError(f"expected uint8 flow ... x C x H x W with C = 2 or 3, got {clip.dtype} {tuple(clip.shape)}")
    out = clip.clone()
    out[..., 0, :, :] = (256 - clip[..., 0, :, :].to(torch.int16)).clamp_(1, 255).to(torch.uint8)
    return out
