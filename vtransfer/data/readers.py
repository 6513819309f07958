"""Choosing where clip frames come from: direct decoding or the decoded-frame cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vtransfer.data.frame_cache import CachedReader, DecodedFrameCache, available_memory_bytes, choose_cache_mode
from vtransfer.data.records import VideoRecord
from vtransfer.errors import ConfigError, VideoDecodeError
from vtransfer.models.base import Preprocessing

CACHE_CHOICES = ("auto", "memory", "disk", "none")


def make_reader(
    cache: str,
    cache_dir: Path | None,
    records: list[VideoRecord],
    preprocessing: Preprocessing,
    threads: int = 2,
) -> CachedReader | None:
    """A frame reader for ``--cache`` (``None`` means decode every clip directly).

    ``auto`` picks memory when the decoded dataset fits half the available
    memory, else disk, else none. A memory cache is filled up front with
    ``threads`` decoding threads (PyAV releases the GIL), so DataLoader
    workers forked afterwards share the frames instead of decoding again.
    """
    if cache not in CACHE_CHOICES:
        raise ConfigError(f"--cache must be one of {CACHE_CHOICES}, got {cache!r}")
    short = preprocessing.resize_short
    mode = cache
    if cache == "auto":
        mode = choose_cache_mode(records, short, available_memory_bytes(), cache_dir=cache_dir)
    if mode == "none":
        return None
    frame_cache = DecodedFrameCache(mode, cache_dir if mode == "disk" else None, short_side=short)
    if mode == "memory":
        prefill(frame_cache, [r.path for r in records], threads)
    return CachedReader(frame_cache)


def prefill(cache: DecodedFrameCache, paths: list[Path], threads: int) -> None:
    """Decode every video into ``cache`` now, in parallel; failures are left for the dataset to report."""

    def one(path: Path) -> None:
        try:
            cache.get(path)
        except VideoDecodeError:
            pass

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(one, paths))
