"""Clips of optical flow for the flow stream: a whole-video flow cache, its clip reader, and a direct reader.

A flow clip holds, at each of the clip's frame positions (``start, start +
stride, ...``, past the end repeating the last, exactly as RGB clips), the
quantised optical flow *at* that frame (:mod:`vtransfer.data.flow`: uint8,
128 = no motion), as uint8 ``T x C x H x W`` with ``C = settings.channels``.
An RGB clip and a flow clip read with the same arguments are therefore
aligned frame by frame.

**The flow at frame i** (:func:`flow_pair`) is the motion from frame ``i`` to
frame ``i + span``, where ``span`` is 1 for ``pairing="next-frame"`` and the
clip stride for ``"next-sampled"``. A frame with no frame ``span`` after it
gets the motion *into* it, from ``i - span`` to ``i`` (for next-frame this is
exactly what :func:`~vtransfer.data.flow.flow_pairs` does for the last frame),
and in a video of at most ``span`` frames every frame gets the motion over the
whole video, ``(0, N - 1)``. Every flow thus spans the same number of frames
(save in such short videos), so the quantisation's ``bound`` means the same
throughout. For next-sampled the pairs inside a clip are
:func:`~vtransfer.data.flow.flow_pairs`' consecutive sampled frames; a clip
that runs past the end gets the motion into the last frame instead of none.

A video of fewer than 2 frames has no flow: it raises
:class:`~vtransfer.utils.errors.VideoDecodeError` with :data:`TOO_SHORT`, so
the dataset skips and reports it like any undecodable file.

* :class:`FlowCache` - whole-video flow ``N x H x W x C`` uint8 (one flow per
  decoded frame), computed once per video from the frames of a
  :class:`~vtransfer.data.frame_cache.DecodedFrameCache` at the working
  resolution and kept in memory or in ``.npy`` files exactly as that cache
  keeps frames (it is a subclass: same keys, atomic writes, memory maps,
  remembered failures; always raw uint8, never JPEG). The key is the raw
  frame cache's key (file content + decode settings) combined with
  :meth:`FlowCache.settings` (the flow settings' key, the OpenCV version,
  and the span for next-sampled).
  In memory mode beside the RGB stream's raw frames (a two-stream run) an
  entry is a :class:`LazyFlow`: a field is computed where a clip first reads
  it, and :meth:`FlowCache.prepare` computes the fields of the clips a loader
  is about to read on all cores, so a run computes the fields its clips use,
  not one per frame.
* :class:`FlowReader` - the :class:`~vtransfer.data.decode.ClipReader` over a
  :class:`FlowCache`.
* :class:`DirectFlowReader` - ``--cache none``: decodes only each sampled
  frame and its pair partner (one seek, one pass) and computes their flow.
* :func:`make_flow_reader` - the reader for ``--cache auto|memory|disk|none``.
* :func:`flip_flow_x` - the value half of a horizontal flip of flow.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vtransfer.data.decode import DirectReader, _decode_indices
from vtransfer.data.flow import FlowSettings, import_cv2, iter_flow
from vtransfer.data.frame_cache import (
    CachedReader,
    DecodedFrameCache,
    PicklesWithoutLock,
    clip_indices,
    entry_key,
    resolve_cache_mode,
)
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.records import VideoRecord
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.utils.phase_times import phase

#: The reason a video with fewer than 2 frames is skipped.
TOO_SHORT = "fewer than 2 frames: no optical flow"
# Bump when the stored flow changes for the same settings (pair rule, layout).
_FLOW_VERSION = "flow-at-frame-v1|nhwc"
#: Sub-folder of ``--cache-dir`` that holds flow entries (apart from the frame entries).
FLOW_SUBDIR = "flow"

FrameProgress = Callable[[Path, int, int], None]


# -- which frames are paired -------------------------------------------------------------


def flow_span(settings: FlowSettings, stride: int) -> int:
    """Frames between the two frames of each flow: 1 for next-frame, ``stride`` for next-sampled."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a whole number >= 1, got {stride!r}")
    return stride if settings.pairing == "next-sampled" else 1


def flow_pair(index: int, num_frames: int, span: int = 1) -> tuple[int, int]:
    """The frame pair ``(a, b)`` whose flow stands at frame ``index`` of a ``num_frames``-frame video.

    ``(index, index + span)`` when that frame exists; else the motion into
    the frame, ``(index - span, index)``; in a video of at most ``span``
    frames, ``(0, num_frames - 1)``. See the module docstring.

    Raises:
        ValueError: fewer than 2 frames, ``index`` outside the video, or ``span < 1``.
    """
    if num_frames < 2:
        raise ValueError(f"flow needs at least 2 frames, got {num_frames}")
    if not 0 <= index < num_frames:
        raise ValueError(f"frame index {index} is outside 0..{num_frames - 1}")
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if index + span < num_frames:
        return index, index + span
    if index - span >= 0:
        return index - span, index
    return 0, num_frames - 1


def _fill_flow(
    out: np.ndarray,
    frames: np.ndarray | torch.Tensor,
    pairs: list[tuple[int, int]],
    settings: FlowSettings,
    source: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """``out[i]`` (``H x W x C``) = quantised flow of ``pairs[i]`` (indices into ``frames``); each distinct pair once."""
    slots: dict[tuple[int, int], list[int]] = {}
    for i, pair in enumerate(pairs):
        slots.setdefault(pair, []).append(i)
    flows = iter_flow(frames, settings, pairs=list(slots), source=source)
    for done, (pair, q) in enumerate(zip(slots, flows, strict=True), start=1):
        out[slots[pair]] = q.transpose(1, 2, 0)
        if progress is not None:
            progress(done, len(slots))


def _check_opencv(settings: FlowSettings) -> str:
    """OpenCV's version, or the :class:`ConfigError` naming what to install (before any video is read)."""
    return str(import_cv2(contrib=settings.method == "tvl1").__version__)


def _as_clip(flow: np.ndarray) -> torch.Tensor:
    """``T x H x W x C`` uint8 -> ``T x C x H x W`` tensor with channels-last strides, as decoded clips."""
    return torch.from_numpy(flow).permute(0, 3, 1, 2)


# -- the cache ---------------------------------------------------------------------------


class LazyFlow(PicklesWithoutLock):
    """One video's flow at each of its frames (``N x H x W x C`` uint8), each field computed when first read.

    What a :class:`FlowCache` in memory mode keeps for a video whose decoded
    frames the RGB stream's frame cache holds: the clips of a run sit at a few
    of a video's frames (10 evaluation clips of 8 frames, a few training views),
    so only the fields there are computed, not one per frame. The fields live
    in one array whose untouched pages cost no memory; ``done`` marks the
    computed ones. A field is the same whenever it is computed
    (:func:`flow_pair`), so reading a clip gives what the whole-video flow would.

    Indexing (``entry[indices]``) computes the fields it reads; ``np.asarray``
    computes all of them. ``on_fill(n)`` is told after each batch of ``n`` new fields.

    Raises:
        VideoDecodeError: fewer than 2 frames (:data:`TOO_SHORT`).
    """

    def __init__(self, frames: np.ndarray, span: int, settings: FlowSettings, source: str | Path,
                 on_fill: Callable[[int], None] | None = None):
        n, h, w = frames.shape[:3]
        if n < 2:
            raise VideoDecodeError(source, TOO_SHORT)
        self.frames = frames
        self.fields = np.empty((n, h, w, settings.channels), dtype=np.uint8)
        self.done = np.zeros(n, dtype=bool)
        self.span = span
        self.settings = settings
        self.source = source
        self.on_fill = on_fill
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, ...]:
        """``N x H x W x C``, as the whole-video flow."""
        return self.fields.shape

    def __len__(self) -> int:
        return len(self.done)

    @property
    def nbytes(self) -> int:
        """Bytes of the fields computed so far."""
        return int(self.done.sum()) * self.fields[0].nbytes

    def fill(self, indices: Iterable[int]) -> int:
        """Compute the fields at frames ``indices`` that are not computed yet; returns how many were."""
        with self._lock:
            todo = sorted({int(i) for i in indices if not self.done[i]})
            if not todo:
                return 0
            n = len(self.done)
            with phase("flow") as fields_done:
                block = np.empty((len(todo), *self.fields.shape[1:]), dtype=np.uint8)
                _fill_flow(block, self.frames, [flow_pair(i, n, self.span) for i in todo], self.settings, self.source)
                self.fields[todo] = block
                self.done[todo] = True
                fields_done(len(todo))
        if self.on_fill is not None:
            self.on_fill(len(todo))
        return len(todo)

    def __getitem__(self, indices) -> np.ndarray:
        self.fill(np.arange(len(self))[indices].reshape(-1).tolist())
        return self.fields[indices]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.fill(range(len(self)))
        return self.fields if dtype is None else self.fields.astype(dtype)


class FlowCache(DecodedFrameCache):
    """Whole-video quantised flow, uint8 ``N x H x W x C``, computed once per (frames, flow settings).

    Args:
        mode: ``"memory"`` or ``"disk"`` (as :class:`DecodedFrameCache`).
        cache_dir: folder of the flow entries (and file digests) in disk mode.
        short_side: working resolution; ``None`` takes ``frames``' (or keeps the source size).
        settings: the flow (default :class:`FlowSettings()`).
        stride: the clip stride; part of the key only for next-sampled pairing.
        frames: the frame cache to take frames from, and to keep them in: the
            RGB stream's cache, so that a two-stream run decodes each video
            once. ``None``: each video is decoded for its flow and the frames
            are dropped (a private frame cache at ``short_side`` only makes
            the keys). A ``jpeg`` frame cache is not read (its frames are
            lossy): the flow is always computed from the exact decoded
            frames, so it is the same whatever ``--cache-format``, at the
            cost of a second decode of each video in a two-stream run.

    ``frame_progress``, when set, is called as ``frame_progress(path, done,
    total)`` after each flow field computed (from prefill's threads too).

    In memory mode with the RGB stream's raw frames (a two-stream run), an
    entry is a :class:`LazyFlow`: a video's fields are computed where its
    clips are read, not at every frame (``lazy``), on all cores when the
    clips are known ahead (:meth:`prepare`). ``fields_computed`` counts them.

    Raises:
        ConfigError: a bad mode or folder, or OpenCV missing.
        ValueError: ``short_side`` differs from ``frames.short_side``, or a bad stride.
    """

    def __init__(
        self,
        mode: str,
        cache_dir: Path | str | None = None,
        short_side: int | None = None,
        *,
        settings: FlowSettings | None = None,
        stride: int = 1,
        frames: DecodedFrameCache | None = None,
    ):
        if frames is not None and short_side is not None and short_side != frames.short_side:
            raise ValueError(f"flow at short side {short_side} from a frame cache at short side {frames.short_side}")
        super().__init__(mode, cache_dir, short_side if frames is None else frames.short_side)
        self.flow = settings or FlowSettings()
        self.span = flow_span(self.flow, stride)
        self.entry_channels = self.flow.channels
        self.phase_name = "flow"
        self.opencv = _check_opencv(self.flow)
        self.frames = frames if frames is not None else DecodedFrameCache(mode, self.cache_dir, self.short_side)
        self._keep_frames = frames is not None
        self.frame_progress: FrameProgress | None = None
        self.lazy = mode == "memory" and self._keep_frames and self.frames.cache_format == "raw"
        self.fields_computed = 0

    def settings(self) -> str:
        """What the flow of given frames depends on: these settings' key, OpenCV, the span (next-sampled)."""
        span = f"|span={self.span}" if self.flow.pairing == "next-sampled" else ""
        return f"{_FLOW_VERSION}|opencv={self.opencv}|{self.flow.key()}{span}"

    def key(self, path: str | Path) -> str:
        """The key of ``path``'s decoded frames (content + decode settings, :meth:`DecodedFrameCache.source_key`)
        combined with :meth:`settings`."""
        return entry_key(self.frames.source_key(path), self.settings())

    def _counted(self, n: int) -> None:
        with self._lock:
            self.fields_computed += n

    def _units(self, entry) -> int:
        return 0 if isinstance(entry, LazyFlow) else len(entry)  # a lazy entry counts its fields as they are computed

    def _compute(self, path: str | Path) -> np.ndarray | LazyFlow:
        """Flow at every frame of ``path`` (see :func:`flow_pair`), ``N x H x W x C`` uint8, from the exact frames;
        when ``lazy``, a :class:`LazyFlow` over the frame cache's frames that computes nothing yet."""
        if self.lazy:
            return LazyFlow(self.frames.get(path), self.span, self.flow, path, on_fill=self._counted)
        if self._keep_frames and self.frames.cache_format == "raw":
            frames = self.frames.get(path)
        else:
            frames = self.frames._compute(path)  # the whole video, not stored (a jpeg frame cache's frames are lossy)
        n = frames.shape[0]
        if n < 2:
            raise VideoDecodeError(path, TOO_SHORT)
        out = np.empty((n, frames.shape[1], frames.shape[2], self.flow.channels), dtype=np.uint8)
        report = self.frame_progress
        progress = None if report is None else (lambda done, total: report(Path(path), done, total))
        _fill_flow(out, frames, [flow_pair(i, n, self.span) for i in range(n)], self.flow, path, progress)
        self._counted(n)
        return out

    def prepare(self, clips: list[tuple[Path, int]], num_frames: int, stride: int, threads: int | None = None) -> None:
        """Compute the fields of the clips ``(path, start)`` that a lazy cache lacks, a video per thread.

        A video that cannot be read is left for its clip's reading to report.
        """
        if not self.lazy:
            return
        wanted: dict[str, tuple[LazyFlow, set[int]]] = {}
        for path, start in clips:
            try:
                entry = self.get(path)
            except VideoDecodeError:
                continue
            wanted.setdefault(str(path), (entry, set()))[1].update(clip_indices(start, num_frames, stride, len(entry)))
        jobs = [(entry, indices) for entry, indices in wanted.values() if not entry.done[list(indices)].all()]
        if not jobs:
            return
        with phase(self.phase_name) as fields_done:
            workers = max(1, min(threads or os.cpu_count() or 1, len(jobs)))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                fields_done(sum(pool.map(lambda job: job[0].fill(job[1]), jobs)))


# -- readers -----------------------------------------------------------------------------


class DirectFlowReader(DirectReader):
    """A :class:`~vtransfer.data.decode.ClipReader` of flow that decodes only the frames a clip needs.

    Each clip decodes its sampled frames and their pair partners (one seek,
    one pass; only those frames are converted) and computes their flow. The
    video's length is the container's frame count (:func:`probe_video`), as
    for RGB clips; where that count is an estimate that overshoots, a pair
    past the real end sees the last frame twice (no motion).

    Raises:
        ConfigError: OpenCV missing.
    """

    def __init__(self, settings: FlowSettings | None = None):
        self.settings = settings or FlowSettings()
        _check_opencv(self.settings)

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """Flow at frames ``start, start+stride, ...`` as uint8 ``T x C x H x W`` (see the module docstring)."""
        if start < 0 or num_frames < 1 or stride < 1:
            raise ValueError(f"need start >= 0, num_frames >= 1, stride >= 1; got {start}, {num_frames}, {stride}")
        path = Path(path)
        n = self.num_frames(path)
        if n < 2:
            raise VideoDecodeError(path, TOO_SHORT)
        span = flow_span(self.settings, stride)
        pairs = [flow_pair(min(start + j * stride, n - 1), n, span) for j in range(num_frames)]
        needed = sorted({f for pair in pairs for f in pair})
        frames = _decode_indices(path, needed, short_side)
        local = {f: k for k, f in enumerate(needed)}
        out = np.empty((num_frames, frames.shape[2], frames.shape[3], self.settings.channels), dtype=np.uint8)
        _fill_flow(out, frames, [(local[a], local[b]) for a, b in pairs], self.settings, path)
        return _as_clip(out)


class FlowReader(CachedReader):
    """A :class:`~vtransfer.data.decode.ClipReader` serving flow clips from a :class:`FlowCache`.

    As :class:`~vtransfer.data.frame_cache.CachedReader`: a DataLoader worker
    meeting a video a memory cache does not hold computes just the clip
    (:class:`DirectFlowReader`).
    """

    def __init__(self, cache: FlowCache):
        super().__init__(cache)
        self.cache: FlowCache = cache
        self._direct = DirectFlowReader(cache.flow)

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """Flow clip from the cache; ``short_side`` (and for next-sampled, ``stride``) must match the cache's."""
        if self.cache.flow.pairing == "next-sampled" and stride != self.cache.span:
            raise ValueError(
                f"clip asked at stride {stride}, but the next-sampled flow cache pairs frames {self.cache.span} apart"
            )
        return super().read_clip(path, start, num_frames, stride, short_side)


def make_flow_reader(
    mode: str,
    cache_dir: Path | str | None,
    records: list[VideoRecord],
    preprocessing: Preprocessing,
    settings: FlowSettings | None = None,
    *,
    stride: int | None = None,
    frames: DecodedFrameCache | None = None,
    available_memory: int | None = None,
    on_error: Callable[[Path, str], None] | None = None,
    progress: Callable[[Path], None] | None = None,
    frame_progress: FrameProgress | None = None,
    threads: int | None = None,
) -> FlowReader | DirectFlowReader:
    """The flow clip reader for ``--cache {auto,memory,disk,none}`` (as :func:`~vtransfer.data.frame_cache.make_reader`).

    ``settings`` defaults to ``preprocessing.flow`` and ``stride`` to
    ``preprocessing.stride``. ``auto`` sizes the flow (``settings.channels``
    bytes a pixel) against memory and disk. ``none`` gives a
    :class:`DirectFlowReader` (never ``None``: the dataset's default reader
    reads RGB). Disk entries go to ``<cache_dir>/flow`` and fill lazily;
    memory mode computes the flow of all ``records`` now, on ``threads``
    threads (default: all cores), calling ``progress(path)`` after each
    video and ``frame_progress(path, done, total)`` after each flow field
    (from those threads), and ``on_error(path, reason)`` for each video
    that has no flow. ``frames``: share the RGB stream's frame cache (see
    :class:`FlowCache`).

    Raises:
        ConfigError: a bad mode, no flow settings, or OpenCV missing.
    """
    settings = settings if settings is not None else getattr(preprocessing, "flow", None)
    if settings is None:
        raise ConfigError("a flow reader needs flow settings (preprocessing.flow or settings=)")
    _check_opencv(settings)
    short_side = preprocessing.resize_short
    mode, cache_dir = resolve_cache_mode(
        mode, cache_dir, records, short_side, available_memory=available_memory, channels=settings.channels
    )
    if mode == "none":
        return DirectFlowReader(settings)
    stride = preprocessing.stride if stride is None else stride
    flow_dir = cache_dir / FLOW_SUBDIR if cache_dir is not None else None
    cache = FlowCache(mode, flow_dir, short_side, settings=settings, stride=stride, frames=frames)
    if mode == "memory":
        cache.frame_progress = frame_progress
        try:
            cache.prefill([r.path for r in records], on_error=on_error, progress=progress, threads=threads or os.cpu_count() or 1)
        finally:
            cache.frame_progress = None  # only prefill reports (not DataLoader workers)
    return FlowReader(cache)


# -- augmentation ------------------------------------------------------------------------
