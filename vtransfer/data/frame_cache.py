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

Two storage formats (``--cache-format``, :data:`STORAGE_FORMATS`; its default,
``auto``, takes raw when the raw frames fit in half the available memory, else
jpeg: :func:`resolve_cache`):

* ``raw`` - the uint8 array itself: exact, and a clip is a slice.
* ``jpeg`` - each frame a JPEG image at the working resolution (quality
  :data:`JPEG_QUALITY`, libjpeg-turbo through OpenCV), all of a
  video's in one :class:`JpegFrames` buffer (a ``<key>.jpeg.npy`` on disk):
  1/13 to 1/17 of raw on real videos at 256 px, and a clip decodes only its own
  frames. A miss returns the JPEG round trip too, so a video's frames are the
  same whether it was just decoded or read back. The key adds the JPEG
  settings, so raw and jpeg entries never share a key and raw keys are those
  raw entries always had.
"""

from __future__ import annotations

import hashlib
import math
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
from vtransfer.run_config import CACHE_FORMATS, DEFAULT_CACHE_FORMAT
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.utils.hashing import file_sha256
from vtransfer.utils.phase_times import phase
from vtransfer.utils import memory_budget

CACHE_MODES = ("memory", "disk")
#: What an entry can be stored as (``--cache-format auto`` resolves to one of them: :func:`resolve_cache`).
STORAGE_FORMATS = ("raw", "jpeg")
# Bump when decoding changes in a way that changes the frames (grid rule, scaler).
_DECODE_VERSION = "grid-v1|rgb24|bilinear|nhwc|upright"
_COUNTER_SLOTS = 65
#: JPEG quality of ``jpeg`` entries (libjpeg's scale; chroma subsampled 4:2:0, as in the videos themselves).
JPEG_QUALITY = 90
#: What to install for the jpeg format (a dependency of vtransfer; also the optical flow's).
OPENCV_PACKAGE = "opencv-contrib-python-headless"
# Part of a jpeg entry's key; bump when the encoding or the buffer layout changes.
_JPEG_VERSION = f"jpeg-v1|q={JPEG_QUALITY}"
_JPEG_MAGIC = 0x3176_6765_706A_7476  # b"vtjpegv1" read as little-endian int64: ends every JpegFrames buffer
#: ``--cache auto``'s estimate of a JPEG frame of ``w x h`` pixels (short side ``s``):
#: ``JPEG_FRAME_OVERHEAD + JPEG_BYTES_PER_PIXEL * (256 / s) ** 0.7 * w * h`` bytes. Smaller frames
#: hold more detail a pixel: the largest frames measured (benchmarks/bench_frame_cache.py, quality
#: 90) took 0.24 bytes a pixel at 256 px, 0.40 at 128 and 0.56 at 72 (160x120 sources; phone
#: videos 0.22, 0.23, 0.38); this bound is 1.3x the first three. The headers take about 630 bytes.
JPEG_BYTES_PER_PIXEL = 0.33
JPEG_FRAME_OVERHEAD = 700


def _opencv():
    """OpenCV's ``cv2`` (the JPEG codec: libjpeg-turbo), or a :class:`ConfigError` naming what to install."""
    try:
        import cv2  # 0.1 s to import: only the jpeg format (and optical flow) load it
    except ImportError as e:
        raise ConfigError(f"--cache-format jpeg needs OpenCV, which is not installed ({e}): run "
                          f"`pip install {OPENCV_PACKAGE}`, or use --cache-format raw") from None
    return cv2


def entry_key(content: str, settings: str) -> str:
    """A cache entry's key: SHA-256 of a content identity and the settings that made the entry (40 hex digits)."""
    return hashlib.sha256(f"{content}|{settings}".encode()).hexdigest()[:40]


class JpegFrames:
    """A video's frames as one JPEG image each, in one flat uint8 buffer (a ``jpeg`` cache entry).

    The buffer (``blob``; a disk entry is exactly this, saved as a 1-D
    ``.npy`` and memory-mapped) holds the JPEG streams back to back, then
    ``N + 1`` little-endian int64 offsets (frame ``i`` is
    ``blob[offsets[i]:offsets[i + 1]]``), then four int64: ``N``, ``H``,
    ``W`` and a magic number. One buffer per video keeps a memory entry to
    two Python objects, so forked DataLoader workers share its pages.

    Frame-array-like where the cache needs it: ``shape`` (``N x H x W x 3``),
    ``len()``, ``nbytes`` (the stored bytes), and ``entry[indices]`` decoding
    those frames to uint8 ``len(indices) x H x W x 3``.

    Raises:
        ValueError: ``blob`` is not such a buffer (a truncated or foreign file).
    """

    _TRAILER = 4 * 8

    def __init__(self, blob: np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 1 or blob.shape[0] < self._TRAILER:
            raise ValueError("not a JPEG frame buffer")
        n, h, w, magic = (int(v) for v in np.frombuffer(blob[-self._TRAILER:].tobytes(), dtype="<i8"))
        table = 8 * (n + 1)
        if magic != _JPEG_MAGIC or n < 0 or h < 1 or w < 1 or blob.shape[0] < self._TRAILER + table:
            raise ValueError("not a JPEG frame buffer")
        end = blob.shape[0] - self._TRAILER
        offsets = np.frombuffer(blob[end - table:end].tobytes(), dtype="<i8").astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != end - table or (n and np.any(np.diff(offsets) <= 0)):
            raise ValueError("JPEG frame buffer with inconsistent offsets")
        self.blob = blob
        self.offsets = offsets
        self.shape = (n, h, w, 3)

    @classmethod
    def encode(cls, frames: np.ndarray | torch.Tensor, quality: int = JPEG_QUALITY) -> "JpegFrames":
        """Encode uint8 RGB ``N x H x W x 3`` frames (or a ``T x 3 x H x W`` tensor) at ``quality``."""
        cv2 = _opencv()
        if isinstance(frames, torch.Tensor):
            frames = frames.permute(0, 2, 3, 1).numpy()  # no copy for a decoded clip (channels-last strides)
        n, h, w, _ = frames.shape
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
        if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
        streams = []
        for i in range(n):
            ok, stream = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(frames[i]), cv2.COLOR_RGB2BGR), params)
            if not ok:  # pragma: no cover - OpenCV fails only on empty images
                raise ValueError(f"OpenCV could not encode a {w}x{h} frame as JPEG")
            streams.append(stream.reshape(-1))
        offsets = np.zeros(n + 1, dtype="<i8")
        np.cumsum([len(b) for b in streams], out=offsets[1:])
        trailer = np.array([n, h, w, _JPEG_MAGIC], dtype="<i8")
        blob = np.concatenate([*streams, offsets.view(np.uint8), trailer.view(np.uint8)]) if n else \
            np.concatenate([offsets.view(np.uint8), trailer.view(np.uint8)])
        return cls(blob)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes stored (the whole buffer)."""
        return int(self.blob.nbytes)

    def stream(self, i: int) -> np.ndarray:
        """Frame ``i``'s JPEG bytes (a view of the buffer)."""
        return self.blob[self.offsets[i]:self.offsets[i + 1]]

    def clip(self, indices: list[int]) -> torch.Tensor:
        """Frames ``indices`` decoded, uint8 ``T x 3 x H x W`` with channels-last strides, as a raw entry's
        clip (each distinct frame decoded once)."""
        distinct = sorted(set(indices))
        if any(not 0 <= i < len(self) for i in distinct):
            raise IndexError(f"frame index out of range 0..{len(self) - 1}: {indices}")
        _, h, w, c = self.shape
        if not indices:
            return torch.empty((0, c, h, w), dtype=torch.uint8)
        cv2 = _opencv()
        rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB
        at = {}
        for i in distinct:
            img = cv2.imdecode(self.stream(i), cv2.IMREAD_COLOR if rgb is None else rgb)
            if img is None or img.shape != (h, w, c):
                raise ValueError(f"JPEG frame {i} of a cache entry does not decode to {w}x{h}")
            at[i] = img if rgb is not None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        # stacked by numpy into N x H x W x 3, the raw entries' layout (torch's copies of such
        # strided images were up to 100x slower on a busy machine)
        return torch.from_numpy(np.stack([at[i] for i in indices])).permute(0, 3, 1, 2)

    def __getitem__(self, indices) -> np.ndarray:
        """Frames ``indices`` (an int, a slice or a list) decoded, uint8 ``T x H x W x 3`` (``H x W x 3`` for an int)."""
        if isinstance(indices, (int, np.integer)):
            return self.clip([int(indices) % len(self)])[0].permute(1, 2, 0).numpy()
        if isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        return self.clip([int(i) for i in indices]).permute(0, 2, 3, 1).numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        frames = self[:]
        return frames if dtype is None else frames.astype(dtype)


class PicklesWithoutLock:
    """Pickles (for spawned workers) without its ``_lock``, which does not pickle; a new lock on unpickling."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class DecodedFrameCache(PicklesWithoutLock):
    """Whole-video uint8 frames, decoded once per (file content, decode settings).

    Args:
        mode: ``"memory"`` or ``"disk"``.
        cache_dir: folder for ``disk`` mode (created if missing); ignored for memory.
        short_side: working resolution (short side in pixels); ``None`` keeps the source size.
        cache_format: ``"raw"`` (uint8 arrays) or ``"jpeg"`` (:class:`JpegFrames`); see the module docstring.

    A subclass that stores something else per video (``N x H x W x C``
    uint8, one row per frame) overrides :meth:`_compute`, :meth:`settings`
    and ``entry_channels``; keys, storage and failure memory stay as here.
    Such a subclass stores raw arrays (the default ``cache_format``): JPEG is
    only for RGB frames.
    """

    #: Channels (last axis) of a stored entry; a disk entry with another count is rewritten.
    entry_channels = 3
    #: The phase (:mod:`vtransfer.utils.phase_times`) that computing an entry counts as.
    phase_name = "decode"
    #: Whether entries are filled part by part as clips need them (:meth:`prepare` readies them ahead).
    lazy = False

    def __init__(self, mode: str, cache_dir: Path | str | None = None, short_side: int | None = None,
                 cache_format: str = "raw"):
        if mode not in CACHE_MODES:
            raise ConfigError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        if cache_format not in STORAGE_FORMATS:
            raise ConfigError(f"a frame cache stores {' or '.join(STORAGE_FORMATS)} entries, got {cache_format!r}")
        if cache_format == "jpeg":
            _opencv()  # a missing codec fails here, before any video is decoded
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
        self.cache_format = cache_format
        self._memory: dict[str, np.ndarray | JpegFrames] = {}
        self._failed: dict[str, str] = {}
        self._digests: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (stat, content hash)
        # (hits, misses) per process slot (0 = main, 1 + worker id), in shared
        # memory so DataLoader workers' reads are counted without racing.
        self._counters = torch.zeros(_COUNTER_SLOTS, 2, dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()
        self.write_error: str | None = None

    # -- keys ------------------------------------------------------------------------
    def _decode_settings(self) -> str:
        return f"{_DECODE_VERSION}|short_side={self.short_side}"

    def settings(self) -> str:
        """The decode settings (and for jpeg, the JPEG settings) that are part of every key."""
        if self.cache_format == "jpeg":
            return f"{self._decode_settings()}|{_JPEG_VERSION}"
        return self._decode_settings()

    def key(self, path: str | Path) -> str:
        """Cache key of ``path``: SHA-256 of (content hash, :meth:`settings`).

        The content hash is recomputed whenever the file's size, mtime or
        inode change, so a rewritten file gets a new key. In disk mode the
        (stat, content hash) pairs are also kept under ``cache_dir/digests``
        so worker processes and later runs do not re-hash unchanged files.
        """
        return entry_key(self._content_digest(path), self.settings())

    def source_key(self, path: str | Path) -> str:
        """Key of ``path``'s exact decoded frames, whatever this cache's format: a raw entry's :meth:`key`.

        What a cache computed from the decoded frames (the flow cache) keys on.
        """
        return entry_key(self._content_digest(path), self._decode_settings())

    def _content_digest(self, path: str | Path) -> str:
        """SHA-256 of the file's bytes, remembered per (size, mtime, inode)."""
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
        return digest

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
        return self.cache_dir / (f"{key}.jpeg.npy" if self.cache_format == "jpeg" else f"{key}.npy")

    # -- reading ---------------------------------------------------------------------
    def get(self, path: str | Path) -> np.ndarray | JpegFrames:
        """All frames of ``path`` as uint8 ``N x H x W x 3`` (a read-only memmap in disk mode),
        or for jpeg the :class:`JpegFrames` (index it to decode frames).

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
            with phase(self.phase_name) as frames_done:
                decoded = self._compute(path)
                frames_done(self._units(decoded))
        except VideoDecodeError as e:
            self._failed[key] = e.reason
            raise
        if self.cache_format == "jpeg":
            decoded = JpegFrames.encode(decoded)
        if self.mode == "memory":
            with self._lock:
                self._memory[key] = decoded
            return decoded
        self._store(key, decoded)
        return decoded

    def _compute(self, path: str | Path) -> np.ndarray:
        """The entry for ``path`` on a miss: the whole video decoded, uint8 ``N x H x W x 3`` (stores nothing)."""
        return read_video(path, short_side=self.short_side).permute(0, 2, 3, 1).numpy()  # no copy

    def _units(self, entry) -> int:
        """Work units (frames) that computing ``entry`` counts in its phase."""
        return len(entry)

    def _load(self, key: str) -> np.ndarray | JpegFrames | None:
        """Memory-map a disk entry, or ``None`` if it is missing or unreadable."""
        entry = self._entry_path(key)
        try:
            frames = np.load(entry, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)  # a corrupt entry is rewritten
            return None
        if self.cache_format == "jpeg":
            try:
                return JpegFrames(frames)
            except ValueError:
                entry.unlink(missing_ok=True)
                return None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != self.entry_channels:
            entry.unlink(missing_ok=True)
            return None
        return frames

    def _store(self, key: str, frames: np.ndarray | JpegFrames) -> None:
        """Write an entry atomically: a private temporary file renamed into place.

        A failed write (disk full, read-only folder) is remembered in
        ``write_error`` and otherwise ignored: the frames are still served,
        only not cached.
        """
        entry = self._entry_path(key)
        tmp = entry.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, frames.blob if isinstance(frames, JpegFrames) else frames, allow_pickle=False)
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
        indices = clip_indices(start, num_frames, stride, frames.shape[0])
        if isinstance(frames, JpegFrames):
            return frames.clip(indices)
        return torch.from_numpy(np.ascontiguousarray(frames[indices])).permute(0, 3, 1, 2)

    def prepare(self, clips: list[tuple[Path, int]], num_frames: int, stride: int, threads: int | None = None) -> None:
        """Ready the clips ``(path, start)`` of ``num_frames`` frames ``stride`` apart before they are read.

        Nothing to do here (an entry is whole once stored); a cache that fills
        entries lazily (:class:`~vtransfer.data.flow_reader.FlowCache`) computes their parts now, on all cores.
        """

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
        with phase(self.phase_name):  # the threads' work, in wall time
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

        Memory mode counts this process's entries; disk mode counts the
        entry files of this cache's format in ``cache_dir``.
        """
        hits, misses = (int(v) for v in self._counters.sum(0).tolist())
        if self.mode == "memory":
            with self._lock:
                size = sum(a.nbytes for a in self._memory.values())
                entries = len(self._memory)
        else:
            assert self.cache_dir is not None
            jpeg = self.cache_format == "jpeg"
            files = [f for f in self.cache_dir.glob("*.npy") if f.is_file() and f.name.endswith(".jpeg.npy") == jpeg]
            size = sum(f.stat().st_size for f in files)
            entries = len(files)
        return {"hits": hits, "misses": misses, "bytes": size, "entries": entries}

    def hit_rate(self) -> float:
        """hits / (hits + misses), 0 before any read."""
        s = self.stats()
        total = s["hits"] + s["misses"]
        return s["hits"] / total if total else 0.0


def clip_indices(start: int, num_frames: int, stride: int, length: int) -> list[int]:
    """The frame indices of a clip: ``start, start + stride, ...``, past the end of a ``length``-frame video the last."""
    return [min(start + i * stride, length - 1) for i in range(num_frames)]


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
            clip = self._direct.read_clip(path, start, num_frames, stride, short_side)
            if self.cache.cache_format == "jpeg":  # the frames the cache would have served
                clip = JpegFrames.encode(clip).clip(list(range(clip.shape[0])))
            return clip
        return self.cache.read_clip(path, start, num_frames, stride)

    @property
    def prepares(self) -> bool:
        """Whether :meth:`prepare` does anything (the cache fills its entries lazily)."""
        return bool(getattr(self.cache, "lazy", False))

    def prepare(self, clips: list[tuple[Path, int]], num_frames: int, stride: int, threads: int | None = None) -> None:
        """Ready the clips ``(path, start)`` before they are read (:meth:`DecodedFrameCache.prepare`)."""
        if get_worker_info() is None:  # a worker's copy of a memory cache dies with it
            self.cache.prepare(clips, num_frames, stride, threads)

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
    cache_format: str | None = None,
) -> CachedReader | None:
    """The clip reader for ``--cache {auto,memory,disk,none}``; ``None`` means decode directly.

    The mode and the storage format (``cache_format``, ``--cache-format``;
    ``None``: the default, auto) are resolved by :func:`resolve_cache` from
    the stored size of ``records`` at ``preprocessing.resize_short`` and the
    available memory. Memory mode decodes ``records`` now, on all cores, so
    DataLoader workers inherit the frames; disk mode fills lazily (workers
    share the files).
    """
    short_side = preprocessing.resize_short
    mode, cache_dir, cache_format = resolve_cache(mode, cache_dir, records, short_side,
                                                  available_memory=available_memory, cache_format=cache_format)
    if mode == "none":
        return None
    cache = DecodedFrameCache(mode, cache_dir, short_side=short_side, cache_format=cache_format)
    if mode == "memory":
        cache.prefill([r.path for r in records], on_error=on_error, progress=progress, threads=os.cpu_count() or 1)
        memory_budget.current().held(cache.stats()["bytes"])  # on top of the training step's reserved memory
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
    cache_format: str = "raw",
) -> tuple[str, Path | None]:
    """``--cache`` as a concrete mode and folder: ``("memory", None)``, ``("disk", folder)`` or ``("none", None)``.

    ``auto`` picks with :func:`choose_cache_mode` (entries of ``channels``
    uint8 channels per pixel, stored in ``cache_format``); disk without a
    folder uses ``<temp>/vtransfer-frame-cache``. See :func:`resolve_cache`.

    Raises:
        ConfigError: ``mode`` is not auto, memory, disk or none.
    """
    mode, cache_dir, _ = resolve_cache(mode, cache_dir, records, short_side, available_memory=available_memory,
                                       channels=channels, cache_format=cache_format)
    return mode, cache_dir


def resolve_cache(
    mode: str,
    cache_dir: Path | str | None,
    records: list[VideoRecord],
    short_side: int | None,
    *,
    available_memory: int | None = None,
    channels: int = 3,
    cache_format: str | None = None,
    memory_fraction: float = 0.5,
) -> tuple[str, Path | None, str]:
    """``--cache`` and ``--cache-format`` as a concrete (mode, folder, format).

    The format ``auto`` (``None``: :data:`~vtransfer.run_config.DEFAULT_CACHE_FORMAT`)
    is ``raw`` (exact, nothing to decode) when the raw frames fit
    ``memory_fraction`` of the available memory, else ``jpeg`` (a tenth of
    the bytes or less at 256 px), whatever the mode; ``none`` keeps it
    unresolved (nothing is stored). The mode ``auto`` then picks with the
    chosen format's bytes (:func:`choose_cache_mode`). The videos are probed
    once for both.

    Raises:
        ConfigError: ``mode`` is not auto, memory, disk or none, or the format is not auto, raw or jpeg.
    """
    if mode not in ("auto", "none", *CACHE_MODES):
        raise ConfigError(f"--cache must be auto, memory, disk or none, got {mode!r}")
    cache_format = DEFAULT_CACHE_FORMAT if cache_format is None else cache_format
    if cache_format not in CACHE_FORMATS:
        raise ConfigError(f"--cache-format must be one of {', '.join(CACHE_FORMATS)}, got {cache_format!r}")
    if mode == "none":
        return mode, None, cache_format
    need = None
    if mode == "auto" or cache_format == "auto":
        memory = available_memory if available_memory is not None else memory_budget.current().room()  # --max-memory
        raw, jpeg = _stored_sizes(records, short_side, channels)
        if cache_format == "auto":
            cache_format = "raw" if raw <= memory_fraction * memory else "jpeg"
        need = jpeg if cache_format == "jpeg" else raw
        if mode == "auto":
            mode = _mode_for(need, memory, cache_dir, memory_fraction)
    if mode != "disk":
        return mode, None, cache_format
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "vtransfer-frame-cache"
    return mode, folder, cache_format


def available_memory_bytes() -> int:
    """Memory the OS says is available now (``MemAvailable``), or free physical memory as a fallback."""
    return memory_budget.available_memory()


def estimate_cache_bytes(records: Iterable[VideoRecord], short_side: int | None, channels: int = 3,
                         cache_format: str = "raw") -> int:
    """Stored size of all videos at ``short_side``, from header probes only.

    ``raw``: ``channels`` bytes a pixel (3: RGB). ``jpeg``: a generous
    estimate of the JPEG frames (:data:`JPEG_BYTES_PER_PIXEL`: the largest
    frames measured, plus a margin; about 1/9 of raw at 256 px, 1/4 at 72).
    Files that cannot be probed count as 0 (they will be skipped anyway).
    """
    raw, jpeg = _stored_sizes(records, short_side, channels)
    return jpeg if cache_format == "jpeg" else raw


def _stored_sizes(records: Iterable[VideoRecord], short_side: int | None, channels: int = 3) -> tuple[int, int]:
    """(raw bytes, JPEG estimate) of all videos at ``short_side`` (see :func:`estimate_cache_bytes`), one probe each."""
    raw = jpeg = 0
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
        per_pixel = min(3.0, JPEG_BYTES_PER_PIXEL * (256 / max(1, min(w, h))) ** 0.7)
        jpeg += info.num_frames * (JPEG_FRAME_OVERHEAD + math.ceil(per_pixel * w * h))
        raw += info.num_frames * channels * w * h
    return raw, jpeg


def choose_cache_mode(
    records: list[VideoRecord],
    short_side: int | None,
    available_memory: int,
    *,
    cache_dir: Path | str | None = None,
    memory_fraction: float = 0.5,
    channels: int = 3,
    cache_format: str = "raw",
) -> str:
    """``"memory"`` if the cached dataset fits ``memory_fraction`` of available memory,
    else ``"disk"`` if it fits (with 20% slack) on the disk holding ``cache_dir``
    (default: the temp folder), else ``"none"``. ``channels``: bytes per
    pixel of a raw entry (3 for RGB frames; a flow cache stores 2 or 3);
    ``cache_format`` ``"jpeg"`` counts the compressed size (:func:`estimate_cache_bytes`).
    """
    return _mode_for(estimate_cache_bytes(records, short_side, channels, cache_format), available_memory, cache_dir,
                     memory_fraction)


def _mode_for(need: int, available_memory: int, cache_dir: Path | str | None, memory_fraction: float) -> str:
    """:func:`choose_cache_mode` for a cache of ``need`` bytes."""
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
