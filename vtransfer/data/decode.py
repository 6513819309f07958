"""Video decoding with PyAV: probe headers, read clips, read whole videos.

Frame indices are counted on the stream's *presentation-time grid*: frame
``i`` is the picture on screen at time ``start_time + i / fps`` (``fps`` is
the stream's average rate). Precisely, it is the last decoded frame whose
timestamp is at most half a frame period after that time. For a constant
frame-rate video this is simply the i-th frame; for a variable frame-rate
video it is what a player would show, and it needs neither a frame count
nor a duration in the container. :func:`read_clip` and :func:`read_video`
use the same rule, so ``read_clip(p, s, n, k)`` equals the frames
``s, s+k, ...`` of ``read_video(p)`` (indices past the end repeat the last
frame).

Frames come out upright: a rotation stored in the display matrix (portrait
phone video) is applied, and ``short_side`` refers to the upright picture.

Decoded tensors have shape ``T x 3 x H x W`` but channels-last strides (the
RGB bytes stay interleaved as the decoder wrote them); call ``.contiguous()``
if you need a plain layout. :func:`vtransfer.data.transforms.normalize_clips`
returns contiguous tensors.

Every failure raises :class:`~vtransfer.utils.errors.VideoDecodeError` naming the
file and the reason.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Protocol

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from vtransfer.data.records import VideoInfo
from vtransfer.utils.errors import VideoDecodeError

# Frame periods to back off before the requested time when seeking, against
# rounding in timestamp conversion (a seek that still lands after the target
# is detected and redone from the start).
_SEEK_MARGIN_FRAMES = 1
# A gap this many frame periods long between two frames is a broken timestamp,
# not a still scene: read_video refuses rather than filling memory with repeats.
_MAX_GAP_FRAMES = 100_000


class ClipReader(Protocol):
    """Where a dataset gets its frames from: direct decoding or a decoded-frame cache."""

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """uint8 ``T x C x H x W`` RGB frames ``start, start+stride, ...`` (see :func:`read_clip`)."""
        ...

    def num_frames(self, path: str | Path) -> int:
        """Number of frames the reader will index for ``path``."""
        ...


class DirectReader:
    """A :class:`ClipReader` that decodes every clip from the file with PyAV."""

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """Decode a clip with :func:`read_clip`."""
        return read_clip(path, start, num_frames, stride=stride, short_side=short_side)

    def num_frames(self, path: str | Path) -> int:
        """Frame count from the container header (:func:`probe_video`)."""
        return probe_video(path).num_frames


# -- probing ---------------------------------------------------------------------------


def _open(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading, turning every failure into a VideoDecodeError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VideoDecodeError(path, "file not found") from None
    except OSError as e:
        raise VideoDecodeError(path, f"cannot read file ({e.strerror or e})") from None
    if path.is_dir():
        raise VideoDecodeError(path, "is a directory, not a video file")
    if size == 0:
        raise VideoDecodeError(path, "zero-byte file")
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"unreadable container ({_describe(e)})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoDecodeError(path, f"unreadable container ({e})") from None


def _describe(e: Exception) -> str:
    """Short text for an FFmpeg error (its strerror without the repeated file name)."""
    text = getattr(e, "strerror", None) or str(e)
    return str(text).strip() or type(e).__name__


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    """The first video stream of ``container`` (attached cover pictures are ignored)."""
    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            continue
        return stream
    raise VideoDecodeError(path, "no video stream")


def _stream_fps(stream: av.video.stream.VideoStream, path: Path) -> Fraction:
    """Nominal frame rate: average rate, else FFmpeg's guess, else the base rate."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0 and math.isfinite(float(rate)) and float(rate) < 10_000:
            return Fraction(rate)
    raise VideoDecodeError(path, "unknown frame rate (the stream states none)")


def _stream_start_seconds(stream: av.video.stream.VideoStream) -> float:
    """Stream start time in seconds (0 when the container does not say)."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _stream_duration_seconds(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Duration from the stream header, else from the container header, else ``None``."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[int, float | None]:
    """Demux (no decoding) to count the stream's packets and find its last timestamp."""
    count, last = 0, None
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        count += 1
        if packet.pts is not None:
            t = float(packet.pts * stream.time_base)
            last = t if last is None else max(last, t)
    return count, last


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's header: frame count, fps, duration, size, codec. No full decode.

    ``num_frames`` is the stream's stated frame count when the container has
    one (``frames_exact=True``); otherwise duration x fps from the headers;
    when even the duration is missing (live-recorded WebM/MKV) the packets
    are demuxed, not decoded, and counted (``frames_exact=False`` in both
    estimated cases).

    Raises:
        VideoDecodeError: missing or zero-byte file, unreadable container, no
            video stream, unknown frame rate or frame size.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream, path)
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise VideoDecodeError(path, "video stream has no frame size (corrupt header)")
        duration = _stream_duration_seconds(container, stream)
        exact = bool(stream.frames and stream.frames > 0)
        if exact:
            num_frames = int(stream.frames)
            if duration is None:
                duration = num_frames / float(fps)
        elif duration is not None:
            num_frames = max(1, int(round(duration * float(fps))))
        else:
            count, last = _count_packets(container, stream)
            if count == 0:
                raise VideoDecodeError(path, "video stream has no packets")
            num_frames = count
            start = _stream_start_seconds(stream)
            duration = (last - start + 1 / float(fps)) if last is not None else count / float(fps)
        return VideoInfo(
            path=path,
            num_frames=num_frames,
            fps=float(fps),
            duration=float(duration),
            width=width,
            height=height,
            codec=ctx.name or "unknown",
            frames_exact=exact,
        )
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"unreadable stream ({_describe(e)})") from None
    finally:
        container.close()


# -- decoding --------------------------------------------------------------------------


def _output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after resizing so the short side is ``short_side`` (aspect kept)."""
    if short_side is None:
        return width, height
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    if width <= height:
        return short_side, max(1, int(round(height * short_side / width)))
    return max(1, int(round(width * short_side / height))), short_side


class _GridDecoder:
    """Decode one stream and hand out the frame shown at each grid index (see module doc)."""

    def __init__(self, path: Path, container: av.container.InputContainer, stream, short_side: int | None):
        self.path = path
        self.container = container
        self.stream = stream
        self.short_side = short_side
        self.fps = _stream_fps(stream, path)
        self.time_base = stream.time_base
        self.t0 = _stream_start_seconds(stream)
        self.size: tuple[int, int] | None = None  # upright output (width, height)
        self.quarter_turns = 0
        self._started = False
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None
        # One reformatter per decode keeps its swscale context between frames.
        self._reformatter = VideoReformatter()
        # The decoder runs one thread: DataLoader workers already use the cores,
        # and frame threading delays the first frame after every seek.
        stream.codec_context.thread_count = 1
        for other in container.streams:
            if other.index != stream.index:
                other.discard = "all"  # do not even demux audio/subtitles

    def slot_bound(self, index: int) -> float:
        """Latest frame time (s) that can still be shown for grid index ``index``."""
        return self.t0 + (index + 0.5) / float(self.fps)

    def frames_from(self, seek_index: int | None) -> Iterator[tuple[float, av.VideoFrame]]:
        """(time, frame) pairs in presentation order.

        ``seek_index=None`` decodes from the beginning; otherwise the demuxer
        seeks to the keyframe before grid index ``seek_index`` (minus a margin).
        """
        if seek_index is not None:
            seek_t = self.t0 + (seek_index - _SEEK_MARGIN_FRAMES) / float(self.fps)
            self.container.seek(max(0, int(math.floor(seek_t / self.time_base))), stream=self.stream, backward=True)
        elif self._started:
            self.container.seek(0, stream=self.stream, backward=True)
        self._started = True
        last_t: float | None = None
        for frame in self.container.decode(self.stream):
            if frame.pts is not None:
                t = float(frame.pts * self.time_base)
            elif seek_index is None:
                # No timestamps at all: count frames from the start instead.
                t = self.t0 if last_t is None else last_t + 1 / float(self.fps)
            else:
                raise _NeedRestart()
            last_t = t
            yield t, frame

    def to_array(self, frame: av.VideoFrame) -> np.ndarray:
        """RGB ``H x W x 3`` uint8 as a player shows it, resized to the output size (fixed by the first frame).

        A rotation in the display matrix (phones store portrait video as
        landscape pictures plus a rotation) is applied in quarter turns; the
        short side refers to the upright picture. Flips in the matrix are not
        applied. The latest conversion is remembered, so a repeated frame
        converts once.
        """
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        if self.size is None:
            self.quarter_turns = quarter_turns(frame.rotation)
            upright = (frame.height, frame.width) if self.quarter_turns % 2 else (frame.width, frame.height)
            self.size = _output_size(*upright, self.short_side)
        width, height = self.size
        if self.quarter_turns % 2:
            width, height = height, width  # scale the stored picture, then turn it
        rgb = self._reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="BILINEAR", threads=1
        )
        array = rgb.to_ndarray()
        if self.quarter_turns:
            array = np.rot90(array, self.quarter_turns)  # counter-clockwise, as the display matrix says
        self._last = (frame, array)
        return array


def quarter_turns(rotation: float) -> int:
    """Counter-clockwise quarter turns (0-3) for a display-matrix rotation in degrees (nearest multiple of 90).

    A singular matrix has no rotation (NaN): the picture is used as stored.
    """
    if not math.isfinite(rotation):
        return 0
    return int(round(rotation / 90.0)) % 4


class _NeedRestart(Exception):
    """Timestamps are missing after a seek: decode again from the start."""


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """``H x W x 3`` arrays -> uint8 ``N x 3 x H x W`` tensor with channels-last strides.

    No transpose copy: the decoder's interleaved RGB stays as it is, which is
    also the layout torch's uint8 antialiased resize is fastest on.
    """
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _decode_indices(path: Path, indices: list[int], short_side: int | None) -> torch.Tensor:
    """Frames at sorted grid ``indices``, seeking near the first one; see :func:`read_clip`."""
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        grid = _GridDecoder(path, container, stream, short_side)
        # Seek when the clip does not start at 0; if the seek lands after the
        # target or loses timestamps, decode again from the beginning.
        attempts: list[int | None] = [indices[0], None] if indices[0] > 0 else [None]
        for seek_index in attempts:
            try:
                picked = _pick(grid, grid.frames_from(seek_index), indices, require_start=seek_index is not None)
            except _NeedRestart:
                continue
            if picked is not None:
                return picked
        raise VideoDecodeError(path, "no frame could be decoded")
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"decode error ({_describe(e)})") from None
    finally:
        container.close()


def _pick(
    grid: _GridDecoder, frames: Iterator[tuple[float, av.VideoFrame]], indices: list[int], require_start: bool
) -> torch.Tensor | None:
    """Assign to each grid index the last frame shown by then; ``None`` if the seek overshot.

    With ``require_start`` the first decoded frame must not come after the
    first index's slot (else the seek skipped frames and we must restart).
    """
    out: list[np.ndarray] = []
    prev: av.VideoFrame | None = None
    for t, frame in frames:
        if prev is None and require_start and t > grid.slot_bound(indices[0]):
            return None
        while len(out) < len(indices) and t > grid.slot_bound(indices[len(out)]):
            out.append(grid.to_array(prev if prev is not None else frame))
        if len(out) == len(indices):
            break
        prev = frame
    if prev is None:
        return None
    while len(out) < len(indices):  # past the end: repeat the last decoded frame
        out.append(grid.to_array(prev))
    return _stack(out)


def read_clip(
    path: str | Path,
    start: int,
    num_frames: int,
    stride: int = 1,
    short_side: int | None = None,
    info: VideoInfo | None = None,
) -> torch.Tensor:
    """Decode frames ``start, start+stride, ..., start+(num_frames-1)*stride`` of a video.

    Seeks to the keyframe before the clip's start time and decodes only up to
    its last frame; frames are converted to RGB (grayscale and every YUV
    variant included) and resized so the short side is ``short_side`` (aspect
    kept; ``None`` keeps the size) in the same swscale call. Frame indices
    follow the presentation-time grid of the module docstring, which handles
    variable frame rate and missing duration metadata.

    **Past the end of the video the last decoded frame is repeated**, so a
    video shorter than the clip still yields ``num_frames`` frames.

    Args:
        path: the video file.
        start: grid index of the first frame (>= 0).
        num_frames: clip length T (>= 1).
        stride: step between frames (>= 1).
        short_side: output short side in pixels, or ``None``.
        info: unused for decoding (the stream is read directly); accepted so
            callers holding a probe result can pass it.

    Returns:
        uint8 tensor ``T x 3 x H x W`` (channels-last strides, see the module doc).

    Raises:
        VideoDecodeError: the file cannot be opened or decoded (names file and reason).
    """
    if start < 0 or num_frames < 1 or stride < 1:
        raise ValueError(f"need start >= 0, num_frames >= 1, stride >= 1; got {start}, {num_frames}, {stride}")
    indices = [start + i * stride for i in range(num_frames)]
    return _decode_indices(Path(path), indices, short_side)


def read_video(path: str | Path, short_side: int | None = None) -> torch.Tensor:
    """Decode a whole video into uint8 ``N x 3 x H x W`` RGB (channels-last strides) on the presentation-time grid.

    ``N`` is the number of grid slots up to the last decoded frame (the frame
    count for a constant frame-rate video). Frame ``i`` equals frame 0 of
    ``read_clip(path, i, 1, short_side=short_side)``.

    Raises:
        VideoDecodeError: the file cannot be opened, or no frame decodes.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        grid = _GridDecoder(path, container, stream, short_side)
        out: list[np.ndarray] = []
        prev: av.VideoFrame | None = None
        for t, frame in grid.frames_from(None):
            if t > grid.slot_bound(len(out) + _MAX_GAP_FRAMES):
                raise VideoDecodeError(path, f"timestamp jump to {t:.1f} s after frame {len(out)} (corrupt timestamps)")
            while t > grid.slot_bound(len(out)):
                out.append(grid.to_array(prev if prev is not None else frame))
            prev = frame
        if prev is None:
            raise VideoDecodeError(path, "no frame could be decoded")
        out.append(grid.to_array(prev))
        return _stack(out)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"decode error ({_describe(e)})") from None
    finally:
        container.close()


def verify_readable(path: str | Path, info: VideoInfo | None = None) -> None:
    """Decode one frame near the start and the frames near the end; raise if that fails.

    Catches truncated files whose header is intact (the frames stop well
    before the duration the header states) and files whose packets do not
    decode. Costs two short decodes, not a full pass.

    Raises:
        VideoDecodeError: names the file and what is wrong.
    """
    path = Path(path)
    info = info or probe_video(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        grid = _GridDecoder(path, container, stream, None)
        first = next(iter(grid.frames_from(None)), None)
        if first is None:
            raise VideoDecodeError(path, "no frame could be decoded")
        expected_last = grid.t0 + (info.num_frames - 1) / float(grid.fps)
        tail_index = max(0, int(info.num_frames) - 1 - int(math.ceil(float(grid.fps) * 0.5)))
        last_t: float | None = None
        try:
            for t, _frame in grid.frames_from(tail_index):
                last_t = t if last_t is None else max(last_t, t)
        except _NeedRestart:
            last_t = None
            for t, _frame in grid.frames_from(None):
                last_t = t
        if last_t is None:
            raise VideoDecodeError(
                path, f"truncated or corrupt: no frame decodes near the end (header says {info.duration:.2f} s)"
            )
        tolerance = max(0.5, 0.05 * info.duration, 2 / float(grid.fps))
        if last_t < expected_last - tolerance:
            raise VideoDecodeError(
                path,
                f"truncated: frames stop at {last_t - grid.t0:.2f} s but the header promises "
                f"{info.num_frames} frames ({info.num_frames / float(grid.fps):.2f} s)",
            )
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"truncated or corrupt: decode error ({_describe(e)})") from None
    finally:
        container.close()

