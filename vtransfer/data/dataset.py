"""A map-style dataset of clips: which clip of which video, decoded and cropped.

Three sampling modes:

* ``train`` - one random clip per video per epoch (random start, random
  resized crop, flip). The randomness of item ``i`` in epoch ``e`` comes from
  a generator seeded by ``(seed, e, i)``, so a run is reproducible whatever
  the number of DataLoader workers and whichever worker serves the item.
* ``train`` with ``fixed_views=K`` - ``K`` augmented views per video chosen
  once (seeded by ``(seed, video, view)``, independent of the epoch): the
  deterministic input that lets a frozen prefix's features be cached.
* ``eval`` - ``clips_per_video`` clips spread uniformly over each video,
  centre-cropped; with ``crops=3`` each clip gives three spatial views (both
  ends and the centre of the frame's long side,
  :mod:`vtransfer.data.spatial_crops`): ``clips_per_video x crops`` views.

A video that fails to decode yields an error item (never an exception), and
:func:`collate_clips` moves it to the batch's ``errors`` list.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vtransfer.data.decode import ClipReader
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.records import VideoRecord
from vtransfer.data.sampling import random_clip_start, uniform_clip_starts
from vtransfer.data.spatial_crops import SpatialCropsTransform, validate_test_crops
from vtransfer.data.transforms import DEFAULT_CROP_SCALE, eval_clip_transform, train_clip_transform
from vtransfer.data.two_stream_reader import direct_reader
from vtransfer.utils.errors import ConfigError, VideoDecodeError

MODES = ("train", "eval")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and platforms)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class ClipDataset(Dataset):
    """Clips of ``records`` as uint8 ``T x C x H x W`` tensors at the backbone's crop size.

    Args:
        records: the videos (one split).
        class_to_idx: class name -> label index.
        preprocessing: the backbone's frames, stride, resize_short and crop_size.
        mode: ``"train"`` or ``"eval"`` (see the module docstring).
        clips_per_video: eval clips per video (Karpathy averaged 20; default 10).
        fixed_views: train mode only: ``K`` fixed augmented views per video.
        seed: base seed of all randomness.
        reader: where frames come from (default: decode each clip with PyAV).
        crop_scale: train mode: range of the crop's share of the frame area (random resized crop).
        crops: eval mode only: spatial crops per clip, 1 (centre) or 3 (``--test-crops``).

    Items are ``dict(clip, label, video, view)``, or ``dict(error, path,
    video)`` for a video that cannot be decoded. Clips have channels-last
    strides (see :mod:`vtransfer.data.decode`). ``video`` is the index into
    ``records``; ``view`` is the view number within the video (0 in plain
    train mode; in eval mode ``clip * crops + crop``).
    """

    def __init__(
        self,
        records: list[VideoRecord],
        class_to_idx: dict[str, int],
        preprocessing: Preprocessing,
        mode: str = "train",
        clips_per_video: int = 10,
        fixed_views: int | None = None,
        seed: int = 0,
        reader: ClipReader | None = None,
        crop_scale: tuple[float, float] | None = None,
        crops: int = 1,
    ):
        if mode not in MODES:
            raise ConfigError(f"dataset mode must be one of {MODES}, got {mode!r}")
        if clips_per_video < 1:
            raise ConfigError(f"clips per video must be >= 1, got {clips_per_video}")
        if fixed_views is not None and fixed_views < 1:
            raise ConfigError(f"--cached-views must be >= 1, got {fixed_views}")
        if fixed_views is not None and mode != "train":
            raise ConfigError("fixed_views applies to train mode only (eval clips are already deterministic)")
        validate_test_crops(crops)
        if crops != 1 and mode != "eval":
            raise ConfigError("--test-crops applies to evaluation only (training takes one random crop per clip)")
        unknown = sorted({r.label for r in records} - set(class_to_idx))
        if unknown:
            raise ConfigError(f"records have classes missing from class_to_idx: {unknown}")
        self.records = list(records)
        self.class_to_idx = dict(class_to_idx)
        self.preprocessing = preprocessing
        self.mode = mode
        self.clips_per_video = clips_per_video
        self.fixed_views = fixed_views
        self.crops = crops
        self.seed = seed
        if reader is None:  # decode every clip from its file: frames, or the flow at the clip's frames
            reader = direct_reader(preprocessing)
        self.reader: ClipReader = reader
        if mode == "train":
            self.transform = train_clip_transform(preprocessing.crop_size, tuple(crop_scale or DEFAULT_CROP_SCALE),
                                                  flow_from=preprocessing.flow_from)
        elif crops == 1:
            self.transform = eval_clip_transform(preprocessing.crop_size)
        else:
            self.transform = SpatialCropsTransform(preprocessing.crop_size, crops)
        # Shared memory, so set_epoch in the main process reaches persistent workers too.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._num_frames: dict[Path, int] = {}
        self._probed = False

    # -- indexing -------------------------------------------------------------------
    @property
    def views_per_video(self) -> int:
        """Items per video: 1 (train), ``fixed_views`` or ``clips_per_video x crops`` (eval)."""
        if self.mode == "eval":
            return self.clips_per_video * self.crops
        return self.fixed_views or 1

    def __len__(self) -> int:
        return len(self.records) * self.views_per_video

    def locate(self, index: int) -> tuple[int, int]:
        """Item index -> (video index, view index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        return divmod(index, self.views_per_video)

    @property
    def epoch(self) -> int:
        """The epoch whose random clips ``train`` mode serves."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for train-mode randomness (call before iterating the loader).

        The first call also runs :meth:`probe_all`, so DataLoader workers
        forked afterwards inherit every video's length instead of re-probing
        it in every worker of every epoch.
        """
        if not self._probed:
            self.probe_all()
        self._epoch.fill_(int(epoch))

    def probe_all(self, threads: int | None = None) -> None:
        """Look up every video's frame count now, in this process, with a few threads.

        Videos that fail are skipped here; their items report the error later.
        """
        todo = list(dict.fromkeys(r.path for r in self.records if r.path not in self._num_frames))

        def one(path: Path) -> tuple[Path, int | None]:
            try:
                return path, self.reader.num_frames(path)
            except Exception:  # noqa: BLE001 - reported by __getitem__
                return path, None

        workers = max(1, min(threads or os.cpu_count() or 1, len(todo)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for path, n in pool.map(one, todo):
                if n is not None:
                    self._num_frames[path] = n
        self._probed = True

    def views(self) -> dict[str, int]:
        """Eval views per video as ``{"clips": N, "crops": M}`` (train mode: ``{"clips": 1, "crops": 1}``)."""
        if self.mode != "eval":
            return {"clips": 1, "crops": 1}
        return {"clips": self.clips_per_video, "crops": self.crops}

    def labels(self) -> list[int]:
        """Label index of every video, in record order."""
        return [self.class_to_idx[r.label] for r in self.records]

    def num_frames(self, video: int) -> int:
        """Frame count of video ``video`` from the reader (cached per path)."""
        path = self.records[video].path
        if path not in self._num_frames:
            self._num_frames[path] = self.reader.num_frames(path)
        return self._num_frames[path]

    def clip_plan(self, index: int) -> tuple[int, int, torch.Generator | None]:
        """(video, start frame, generator for the spatial transform) of item ``index``.

        Decodes nothing but may probe the video for its length.
        """
        video, view = self.locate(index)
        p = self.preprocessing
        n = self.num_frames(video)
        if self.mode == "eval":
            return video, uniform_clip_starts(n, p.frames, p.stride, self.clips_per_video)[view // self.crops], None
        if self.fixed_views is not None:
            generator = torch.Generator().manual_seed(derive_seed("view", self.seed, video, view))
        else:
            generator = torch.Generator().manual_seed(derive_seed("epoch", self.seed, self.epoch, video))
        return video, random_clip_start(n, p.frames, p.stride, generator), generator

    def prepare(self, indices: Iterable[int], threads: int | None = None) -> None:
        """Tell the reader which clips items ``indices`` will read, so that it can ready them at once
        (a lazy flow cache computes their fields on ``threads`` threads); a reader that needs nothing ignores it."""
        if not getattr(self.reader, "prepares", False):
            return
        clips = []
        for index in indices:
            try:
                video, start, _ = self.clip_plan(index)
            except Exception:  # noqa: BLE001 - the item reports it when read
                continue
            clips.append((self.records[video].path, start))
        self.reader.prepare(clips, self.preprocessing.frames, self.preprocessing.stride, threads)

    # -- items ----------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        video, view = self.locate(index)
        record = self.records[video]
        p = self.preprocessing
        try:
            _, start, generator = self.clip_plan(index)
            clip = self.reader.read_clip(record.path, start, p.frames, p.stride, p.resize_short)
        except VideoDecodeError as e:
            return {"error": e.reason, "path": str(record.path), "video": video}
        except Exception as e:  # noqa: BLE001 - a bad file must never stop an epoch
            return {"error": f"{type(e).__name__}: {e}", "path": str(record.path), "video": video}
        if self.crops > 1:
            clip = self.transform(clip, view % self.crops)
        else:
            clip = self.transform(clip, generator)
        return {"clip": clip, "label": self.class_to_idx[record.label], "video": video, "view": view}


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good items into a batch; failed ones go to ``errors`` as ``(path, reason)``.

    Returns ``dict(clip=uint8 B x T x C x H x W, label, video, view (LongTensor B),
    errors=[(path, reason), ...])``. A batch where every item failed has
    ``clip`` of shape ``0 x 0 x 3 x 0 x 0``; skip it with ``if not len(batch["clip"])``.
    """
    good = [it for it in items if "clip" in it]
    errors = [(it["path"], it["error"]) for it in items if "clip" not in it]
    if good:
        clip = torch.stack([it["clip"] for it in good])
    else:
        clip = torch.empty((0, 0, 3, 0, 0), dtype=torch.uint8)
    return {
        "clip": clip,
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "video": torch.tensor([it["video"] for it in good], dtype=torch.long),
        "view": torch.tensor([it["view"] for it in good], dtype=torch.long),
        "errors": errors,
    }
