"""Decoded-frame cache: decode each video once, sample every later clip from memory or disk.

Each video is decoded whole (:func:`~vtransfer.data.decode.read_video`) at
the working resolution (short side = the backbone's ``resize_short``) into
uint8 frames, stored ``N x H x W x 3`` (the decoder's interleaved layout;
clips come out as ``T x 3 x H x W`` views with channels-last strides). Entries are keyed by the SHA-256 of the
file's bytes plus the decode settings, so an edited file or a different
resolution is never served stale frames.

* ``memory`` - numpy arrays in this process. Fill it (:meth:`DecodedFrameCache.prefill`,
  done by :func:`make_reader`) before starting DataLoader workers: forked
  workers then share the pages instead of each decoding and holding its own
  copy; a worker meeting a video that was not prefilled decodes just the clip.
* ``disk`` - one ``<key>.npy`` per video under ``cache_dir``, written
  atomically (temporary file + rename) and memory-mapped on every read, so
  any number of worker processes (and later runs) share it and the resident
  set does not grow across epochs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import get_worker_info

from vtransfer.data.decode import DirectReader, probe_video, read_video
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.records import VideoRecord
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.utils.hashing import file_sha256

CACHE_MODES = ("memory", "disk")
# Bump when decoding changes in a way that changes the frames (grid rule, scaler).
_DECODE_VERSION = "grid-v1|rgb24|bilinear|nhwc|upright"
_COUNTER_SLOTS = 65


def entry_key(content: str, settings: str) -> str:
    """A cache entry's key: SHA-256 of a content identity and the settings that made the entry (40 hex digits)."""
    return hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:40]


class DecodedFrameCache:
    """Whole-video uint8 frames, decoded once per (file content, decode settings).

    Args:
        mode: ``"memory"`` or ``"disk"``.
        cache_dir: folder for ``disk`` mode (created if missing); ignored for memory.
        short_side: working resolution (short side in pixels); ``None`` keeps the source size.

    A subclass that stores something else per video (``N x H x W x C``
    uint8, one row per frame) overrides :meth:`_compute`, :meth:`settings`
    and ``entry_channels``; keys, storage and failure memory stay as here.
    """

    #: Channels (last axis) of a stored entry; a disk entry with another count is rewritten.
    entry_channels = 3

    def __init__(self, mode: str, cache_dir: Path | str | None = None, short_side: int | None = None):
        if mode not in CACHE_MODES:
            raise ConfigError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        if mode == "disk":
            if cache_dir is None:
                raise ConfigError("the disk cache needs a cache directory (--cache-dir)")
            cache_dir = Path(cache_dir)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--cache-dir {cache_dir}: cannot create ({e.strerror or e})") from None
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.short_side = short_side
        self._memory: dict[str, np.ndarray] = {}
        self._failed: dict[str, str] = {}
        self._digests: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (stat, content hash)
        # (hits, misses) per process slot (0 = main, 1 + worker id), in shared
        # memory so DataLoader workers' reads are counted without racing.
        self._counters = torch.zeros(_COUNTER_SLOTS, 2, dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self.write_error: str | None = None

    # -- pickling for spawned workers (locks do not pickle) ---------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- keys ------------------------------------------------------------------------
    def settings(self) -> str:
        """The decode settings that are part of every key."""
        return f"{_DECODE_VERSION}|short_side={self.short_side}"

    def key(self, path: str | Path) -> str:
        """Cache key of ``path``: SHA-256 of (content hash, decode settings).

        The content hash is recomputed whenever the file's size, mtime or
        inode change, so a rewritten file gets a new key. In disk mode the
        (stat, content hash) pairs are also kept under ``cache_dir/digests``
        so worker processes and later runs do not re-hash unchanged files.
        """
        path = Path(path)
        try:
            st = path.stat()
        except OSError as e:
            raise VideoDecodeError(path, f"cannot read file ({e.strerror or e})") from None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        digest = self._known_digest(path, stamp)
        if digest is None:
            try:
                digest = file_sha256(path)
            except OSError as e:
                raise VideoDecodeError(path, f"cannot read file ({e.strerror or e})") from None
            self._remember_digest(path, stamp, digest)
        return entry_key(digest, self.settings())

    def _digest_file(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.cache_dir / "digests" / name

    def _known_digest(self, path: Path, stamp: tuple[int, int, int]) -> str | None:
        """The remembered content hash of ``path`` if its stat is unchanged."""
        memo = self._digests.get(str(path))
        if memo is not None and memo[0] == stamp:
            return memo[1]
        record = self._digest_file(path)
        if record is None:
            return None
        try:
            size, mtime, ino, digest = record.read_text().split()
        except (OSError, ValueError):
            return None
        if (int(size), int(mtime), int(ino)) != stamp:
            return None
        self._digests[str(path)] = (stamp, digest)
        return digest

    def _remember_digest(self, path: Path, stamp: tuple[int, int, int], digest: str) -> None:
        self._digests[str(path)] = (stamp, digest)
        record = self._digest_file(path)
        if record is None:
            return
        try:
            record.parent.mkdir(exist_ok=True)
            tmp = record.with_name(f".{record.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(f"{stamp[0]} {stamp[1]} {stamp[2]} {digest}\n")
            os.replace(tmp, record)
        except OSError:
            pass  # only a speed-up

    def contains(self, path: str | Path) -> bool:
        """True when ``path``'s frames are stored (does not decode; may hash the file)."""
        key = self.key(path)
        if self.mode == "memory":
            return key in self._memory
        return self._entry_path(key).is_file()

    def _entry_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.npy"

    # -- reading ---------------------------------------------------------------------
    def get(self, path: str | Path) -> np.ndarray:
        """All frames of ``path`` as uint8 ``N x H x W x 3`` (a read-only memmap in disk mode).

        Decodes and stores the video on a miss. Raises VideoDecodeError for a
        file that cannot be decoded (remembered, so it is not retried each epoch).
        """
        key = self.key(path)
        if key in self._failed:
            self._count(hit=False)
            raise VideoDecodeError(path, self._failed[key])
        if self.mode == "memory":
            frames = self._memory.get(key)
            if frames is not None:
                self._count(hit=True)
                return frames
        else:
            frames = self._load(key)
            if frames is not None:
                self._count(hit=True)
                return frames
        self._count(hit=False)
        try:
            decoded = self._compute(path)
        except VideoDecodeError as e:
            self._failed[key] = e.reason
            raise
        if self.mode == "memory":
            with self._lock:
                self._memory[key] = decoded
            return decoded
        self._store(key, decoded)
        return decoded

    def _compute(self, path: str | Path) -> np.ndarray:
        """The entry for ``path`` on a miss: the whole video decoded, uint8 ``N x H x W x 3`` (stores nothing)."""
        return read_video(path, short_side=self.short_side).permute(0, 2, 3, 1).numpy()  # no copy

    def _load(self, key: str) -> np.ndarray | None:
        """Memory-map a disk entry, or ``None`` if it is missing or unreadable."""
        entry = self._entry_path(key)
        try:
            frames = np.load(entry, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)  # a corrupt entry is rewritten
            return None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != self.entry_channels:
            entry.unlink(missing_ok=True)
            return None
        return frames

    def _store(self, key: str, frames: np.ndarray) -> None:
        """Write an entry atomically: a private temporary file renamed into place.

        A failed write (disk full, read-only folder) is remembered in
        ``write_error`` and otherwise ignored: the frames are still served,
        only not cached.
        """
        entry = self._entry_path(key)
        tmp = entry.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, frames, allow_pickle=False)
            os.replace(tmp, entry)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.write_error = f"{self.cache_dir}: cannot write cache entry ({e.strerror or e})"

    def _count(self, hit: bool) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)
        with self._lock:
            self._counters[slot, 0 if hit else 1] += 1

    def num_frames(self, path: str | Path) -> int:
        """Number of cached frames of ``path`` (decodes it on a miss)."""
        return int(self.get(path).shape[0])

    def read_clip(self, path: str | Path, start: int, num_frames: int, stride: int = 1) -> torch.Tensor:
        """Frames ``start, start+stride, ...`` as uint8 ``T x 3 x H x W`` (channels-last strides, like
        :func:`~vtransfer.data.decode.read_clip`); past the end repeats the last frame."""
        frames = self.get(path)
        last = frames.shape[0] - 1
        indices = [min(start + i * stride, last) for i in range(num_frames)]
        return torch.from_numpy(np.ascontiguousarray(frames[indices])).permute(0, 3, 1, 2)

    def prefill(
        self,
        paths: Iterable[str | Path],
        on_error: Callable[[Path, str], None] | None = None,
        progress: Callable[[Path], None] | None = None,
        threads: int = 1,
    ) -> None:
        """Decode every video now (call before starting DataLoader workers).

        ``threads > 1`` decodes several videos at once (PyAV releases the GIL
        while decoding and scaling). Failures are reported to
        ``on_error(path, reason)`` instead of raising; ``progress(path)`` is
        called after each video.
        """

        def one(p: str | Path) -> tuple[Path, str | None]:
            try:
                self.get(p)
            except VideoDecodeError as e:
                return Path(p), e.reason
            return Path(p), None

        paths = list(paths)
        if threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                results = pool.map(one, paths)
                self._report(results, on_error, progress)
        else:
            self._report(map(one, paths), on_error, progress)

    @staticmethod
    def _report(results, on_error, progress) -> None:
        for path, reason in results:
            if reason is not None and on_error is not None:
                on_error(path, reason)
            if progress is not None:
                progress(path)

    # -- reporting -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """``hits``, ``misses`` (all processes sharing this object), ``bytes`` and ``entries`` stored.

        Memory mode counts this process's arrays; disk mode counts the
        ``.npy`` files in ``cache_dir``.
        """
        hits, misses = (int(v) for v in self._counters.sum(0).tolist())
        if self.mode == "memory":
            with self._lock:
                size = sum(a.nbytes for a in self._memory.values())
                entries = len(self._memory)
        else:
            assert self.cache_dir is not None
            files = [f for f in self.cache_dir.glob("*.npy") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            entries = len(files)
        return {"hits": hits, "misses": misses, "bytes": size, "entries": entries}

    def hit_rate(self) -> float:
        """hits / (hits + misses), 0 before any read."""
        s = self.stats()
        total = s["hits"] + s["misses"]
        return s["hits"] / total if total else 0.0


class CachedReader:
    """A :class:`~vtransfer.data.decode.ClipReader` serving clips from a :class:`DecodedFrameCache`.

    In memory mode a DataLoader worker cannot add to the parent's cache (its
    copy dies with the worker), so a worker that meets a video the parent did
    not prefill decodes just the clip, like :class:`~vtransfer.data.decode.DirectReader`.
    """

    def __init__(self, cache: DecodedFrameCache):
        self.cache = cache
        self._direct = DirectReader()

    def _bypass(self, path: str | Path) -> bool:
        return (
            self.cache.mode == "memory"
            and get_worker_info() is not None
            and not self.cache.contains(path)
        )

    def read_clip(
        self, path: str | Path, start: int, num_frames: int, stride: int, short_side: int | None
    ) -> torch.Tensor:
        """Clip from the cache; ``short_side`` must match the cache's working resolution."""
        if short_side != self.cache.short_side:
            raise ValueError(
                f"clip asked at short side {short_side}, but the frame cache holds short side {self.cache.short_side}"
            )
        if self._bypass(path):
            return self._direct.read_clip(path, start, num_frames, stride, short_side)
        return self.cache.read_clip(path, start, num_frames, stride)

    def num_frames(self, path: str | Path) -> int:
        """Number of decoded frames of ``path`` (decodes it into the cache on first use)."""
        if self._bypass(path):
            return self._direct.num_frames(path)
        return self.cache.num_frames(path)


def make_reader(
    mode: str,
    cache_dir: Path | str | None,
    records: list[VideoRecord],
    preprocessing: Preprocessing,
    *,
    available_memory: int | None = None,
    on_error: Callable[[Path, str], None] | None = None,
    progress: Callable[[Path], None] | None = None,
) -> CachedReader | None:
    """The clip reader for ``--cache {auto,memory,disk,none}``; ``None`` means decode directly.

    ``auto`` picks with :func:`choose_cache_mode` from the decoded size of
    ``records`` at ``preprocessing.resize_short`` and the available memory.
    Memory mode decodes ``records`` now, on all cores, so DataLoader workers
    inherit the frames; disk mode fills lazily (workers share the files).
    """
    short_side = preprocessing.resize_short
    mode, cache_dir = resolve_cache_mode(mode, cache_dir, records, short_side, available_memory=available_memory)
    if mode == "none":
        return None
    cache = DecodedFrameCache(mode, cache_dir, short_side=short_side)
    if mode == "memory":
        cache.prefill([r.path for r in records], on_error=on_error, progress=progress, threads=os.cpu_count() or 1)
    return CachedReader(cache)


# -- choosing a mode ---------------------------------------------------------------------


def resolve_cache_mode(
    mode: str,
    cache_dir: Path | str | None,
    records: list[VideoRecord],
    short_side: int | None,
    *,
    available_memory: int | None = None,
    channels: int = 3,
) -> tuple[str, Path | None]:
    """``--cache`` as a concrete mode and folder: ``("memory", None)``, ``("disk", folder)`` or ``("none", None)``.

    ``auto`` picks with :func:`choose_cache_mode` (entries of ``channels``
    uint8 channels per pixel); disk without a folder uses
    ``<temp>/vtransfer-frame-cache``.

    Raises:
        ConfigError: ``mode`` is not auto, memory, disk or none.
    """
    if mode not in ("auto", "none", *CACHE_MODES):
        raise ConfigError(f"--cache must be auto, memory, disk or none, got {mode!r}")
    if mode == "auto":
        memory = available_memory if available_memory is not None else available_memory_bytes()
        mode = choose_cache_mode(records, short_side, memory, cache_dir=cache_dir, channels=channels)
    if mode != "disk":
        return mode, None
    return mode, Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "vtransfer-frame-cache"


def available_memory_bytes() -> int:
    """Memory the OS says is available now (``MemAvailable``), or physical memory as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def estimate_cache_bytes(records: Iterable[VideoRecord], short_side: int | None, channels: int = 3) -> int:
    """Decoded size of all videos at ``short_side``, ``channels`` bytes a pixel (3: RGB), from header probes only.

    Files that cannot be probed count as 0 (they will be skipped anyway).
    """
    total = 0
    for r in records:
        try:
            info = probe_video(r.path)
        except VideoDecodeError:
            continue
        if short_side is None:
            w, h = info.width, info.height
        elif info.width <= info.height:
            w, h = short_side, round(info.height * short_side / info.width)
        else:
            w, h = round(info.width * short_side / info.height), short_side
        total += info.num_frames * channels * w * h
    return total


def choose_cache_mode(
    records: list[VideoRecord],
    short_side: int | None,
    available_memory: int,
    *,
    cache_dir: Path | str | None = None,
    memory_fraction: float = 0.5,
    channels: int = 3,
) -> str:
    """``"memory"`` if the decoded dataset fits ``memory_fraction`` of available memory,
    else ``"disk"`` if it fits (with 20% slack) on the disk holding ``cache_dir``
    (default: the temp folder), else ``"none"``. ``channels``: bytes per
    pixel of an entry (3 for RGB frames; a flow cache stores 2 or 3).
    """
    need = estimate_cache_bytes(records, short_side, channels)
    if need <= memory_fraction * available_memory:
        return "memory"
    target = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        free = shutil.disk_usage(target).free
    except OSError:
        return "none"
    return "disk" if need * 1.2 <= free else "none"
