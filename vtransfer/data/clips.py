"""Clips for a run: the preprocessing a run's options ask for, clip datasets, and the shared decoded-frame reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtransfer.data.dataset import ClipDataset
from vtransfer.data.flow_reader import make_flow_reader
from vtransfer.data.frame_cache import make_reader
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.two_stream_reader import TwoStreamReader
from vtransfer.run_config import ClipConfig
from vtransfer.utils.hashing import file_stamp


def adapt_preprocessing(base: Preprocessing, frames: int | None, stride: int | None, size: int | None) -> Preprocessing:
    """The backbone's preprocessing with user overrides; the resize keeps the crop/short-side ratio."""
    resize_short = None
    if size is not None:
        ratio = base.resize_short / max(base.crop_size)
        resize_short = max(size, int(round(size * ratio)))
    return base.replace(frames=frames, stride=stride, crop_size=(size, size) if size else None, resize_short=resize_short)


def make_clip_dataset(records, class_to_idx, preprocessing, mode, opts: ClipConfig, seed: int, clips: int | None = None,
                      reader=None, views: int | None = None, crops: int = 1):
    """A :class:`~vtransfer.data.dataset.ClipDataset` for ``mode`` (train or eval; ``crops`` spatial crops per eval clip)."""

    return ClipDataset(
        records,
        class_to_idx,
        preprocessing,
        mode=mode,
        clips_per_video=clips or opts.clips_per_video,
        fixed_views=views,
        seed=seed,
        reader=reader,
        crop_scale=opts.crop_scale,
        crops=crops,
    )


# In-memory frame caches of this process, shared by the runs of compare-policies (and the demo): decode settings ->
# (the files it holds, the reader). One dataset's frames, and its flow, at a time.
_READERS: dict[tuple, tuple[frozenset, Any]] = {}


def _held(settings: tuple, files: frozenset) -> Any:
    """The in-memory reader for ``settings`` that holds every file of ``files`` (a run's later subset too), or None."""
    held = _READERS.get(settings)
    return held[1] if held is not None and files <= held[0] else None


def shared_reader(cache: str, cache_dir: Path, records, preprocessing: Preprocessing, flow_frames=None, cache_format=None):
    """The decoded-frame (or flow) reader for ``--cache``; an in-memory one is reused by later runs on the same videos.

    Memory caches are keyed by the decode settings and each file's path, size and
    modification time, so a changed file is decoded again; a request for some of
    the videos a cache holds (scoring the validation and test splits) is served
    from it. For a flow stream,
    ``flow_frames(n)`` is called with each video's flow-field count as it is computed.
    ``cache_format``: ``--cache-format`` (``None``: the default), part of the reuse key.
    """

    if preprocessing.stream == "two-stream":  # the two streams' readers, each cached (and shared) as for one stream
        rgb, flow = preprocessing.split_streams()
        return TwoStreamReader(shared_reader(cache, cache_dir, records, rgb, cache_format=cache_format),
                               shared_reader(cache, cache_dir, records, flow, flow_frames, cache_format))
    flow = preprocessing.flow.key() if preprocessing.flow is not None else None
    settings = (preprocessing.resize_short, flow, preprocessing.stride if flow else cache_format)
    files = frozenset((str(r.path), *file_stamp(r.path)) for r in records)
    memory = cache in ("auto", "memory")
    if memory and _held(settings, files) is not None:
        return _held(settings, files)
    if preprocessing.stream == "flow":
        def video_done(path, done: int, total: int) -> None:
            if done == total:
                flow_frames(total)

        # the RGB stream's decoded frames, when this process holds them (a two-stream run): decode each video once
        rgb = _held((preprocessing.resize_short, None, cache_format), files) if memory else None
        frames = getattr(rgb, "cache", None)
        reader = make_flow_reader(cache, cache_dir, records, preprocessing, frames=frames,
                                  frame_progress=video_done if flow_frames is not None else None)
    else:
        reader = make_reader(cache, cache_dir, records, preprocessing, cache_format=cache_format)
    cached = getattr(reader, "cache", None)
    if cached is not None and cached.mode == "memory":
        for other in [k for k, (held, _) in _READERS.items() if held != files or (k[1] is None) == (flow is None)]:
            del _READERS[other]
        _READERS[settings] = (files, reader)
    return reader
