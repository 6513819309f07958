"""Video embeddings for use outside vtransfer: one per video, optionally one per clip.

The embedding of a clip is the model's pre-classifier feature
(:meth:`~vtransfer.models.base.VideoBackbone.features`, the head group's
input) of the clip decoded and cropped exactly as evaluation does: uniformly
spread clips, centre crop, the model's own normalisation. A video's
embedding is the mean of its clips' embeddings. Each row comes with the
video's path, class and split, so the file can feed a linear probe, a
nearest-neighbour search or a plot without vtransfer.

Files, for ``out = F``:

* ``F.safetensors`` (or ``F.npz``): ``video_embeddings`` (N x D float32) and,
  with ``per_clip``, ``clip_embeddings`` (M x D), ``clip_video`` (M, the row of
  each clip's video) and ``clip_view`` (M, the clip's number within its video);
  the metadata (model, preprocessing, clips per video, skipped videos) is JSON
  under the safetensors header key ``vtransfer`` (the ``metadata`` string array
  of the ``.npz``);
* ``F.csv``: ``row,path,class,split,clips``, one line per row of ``video_embeddings``.

Videos that cannot be decoded are left out and listed, never a crash.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from vtransfer.data.check import printable
from vtransfer.data.clips import adapt_preprocessing, shared_reader
from vtransfer.data.dataset import ClipDataset
from vtransfer.data.records import SPLITS, DatasetIndex, VideoRecord
from vtransfer.data.run_data import open_dataset
from vtransfer.data.sniff import VIDEO_EXTENSIONS
from vtransfer.data.splits import read_manifest
from vtransfer.engine.batches import make_loader
from vtransfer.engine.inference import batch_inputs
from vtransfer.loading.backbone import load_backbone_with_info
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import backbone_names, is_backbone_name
from vtransfer.run_config import DataConfig
from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_text
from vtransfer.utils.errors import ConfigError, DatasetError
from vtransfer.utils.runtime import configure_threads, default_workers, resolve_device
from vtransfer.utils.version import package_version
from vtransfer.workflows import runs
from vtransfer.workflows.scoring import resolve_model_path

FORMATS = ("safetensors", "npz")
FORMAT_NAME = "vtransfer-features"
FORMAT_VERSION = 1
METADATA_KEY = "vtransfer"
INDEX_COLUMNS = ("row", "path", "class", "split", "clips")
SPLIT_CHOICES = ("all", *SPLITS)
CACHE_CHOICES = ("auto", "memory", "disk", "none")


@dataclass
class FeatureModel:
    """The model whose features are extracted, and what it is."""

    model: VideoBackbone
    description: str  # "runs/x/model.safetensors" or "effnet3d with effnet3d:imagenet"
    model_path: Path | None = None  # the checkpoint, when one was given
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class VideoSelection:
    """The videos to embed, where their split came from, and files the scan left out."""

    index: DatasetIndex
    records: list[VideoRecord]
    description: str  # "every split of runs/x/split.csv (12 videos)"
    warning: str | None = None


@dataclass
class Embeddings:
    """Embeddings of the videos that gave at least one clip.

    ``records[i]`` is the video of row ``i`` of ``video``; ``clips[i]`` the
    number of its clips averaged. ``clip``, ``clip_video`` and ``clip_view`` are
    ``None`` unless per-clip embeddings were asked for. ``failed`` lists the
    videos left out (no clip decoded), ``partial`` those where some clips failed.
    """

    video: torch.Tensor
    records: list[VideoRecord]
    clips: list[int]
    clip: torch.Tensor | None = None
    clip_video: torch.Tensor | None = None
    clip_view: torch.Tensor | None = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    partial: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ExtractResult:
    """What :func:`extract_features` wrote."""

    tensors_path: Path
    index_path: Path
    embeddings: Embeddings
    selection: VideoSelection
    model: FeatureModel
    skipped_files: list[dict[str, str]]  # files the dataset scan did not use (zero-byte, not a video, ...)


# -- options ----------------------------------------------------------------------------


def output_paths(out: str | Path, fmt: str) -> tuple[Path, Path]:
    """``(tensor file, index CSV)`` for ``--out F``: ``F.safetensors`` (or ``F.npz``) and ``F.csv``.

    ``F`` may already end in the format's suffix; another known suffix is an error.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in (".safetensors", ".npz", ".csv"):
        if suffix != f".{fmt}":
            raise ConfigError(f"--out {out}: ends in {out.suffix} but --format is {fmt}; give the name without a suffix")
        out = out.with_suffix("")
    return out.with_name(f"{out.name}.{fmt}"), out.with_name(f"{out.name}.csv")


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Raise unless every path is free (or ``overwrite``)."""
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise ConfigError(f"--out {path} already exists; pass --overwrite to replace it")


def check_options(split: str, clips_per_video: int, batch_size: int, cache: str) -> None:
    """Reject option values that cannot work, before anything is loaded or decoded."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r}: choose {', '.join(SPLIT_CHOICES)}")
    if clips_per_video < 1:
        raise ConfigError(f"--clips-per-video {clips_per_video}: must be at least 1")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    if cache not in CACHE_CHOICES:
        raise ConfigError(f"--cache {cache!r}: choose {', '.join(CACHE_CHOICES)}")


# -- the model --------------------------------------------------------------------------


def load_feature_model(
    model_or_backbone: str | Path,
    weights: str | None = None,
    preset: str | None = None,
    frames: int | None = None,
    stride: int | None = None,
    size: int | None = None,
) -> FeatureModel:
    """A vtransfer checkpoint or run folder, or a backbone name with ``weights``, in eval mode.

    ``frames``/``stride``/``size`` change the clips fed to it (as
    ``finetune`` does for a loaded model). A backbone name without weights
    is refused: random features describe nothing (``hf:REPO`` names bring
    their own weights and need none).
    """

    spec = str(model_or_backbone)
    path = Path(spec).expanduser()
    if path.exists():
        if weights is not None or preset is not None:
            raise ConfigError(f"{spec} is a vtransfer model: --weights and --preset apply to a backbone name only")

        model_path = resolve_model_path(path)
        model, ckpt = model_from_checkpoint(model_path)
        loaded = FeatureModel(model, str(model_path), model_path,
                              {"backbone": ckpt.backbone, "model": str(model_path), "classes": list(ckpt.classes)})
    elif is_backbone_name(spec):

        model, info = load_backbone_with_info(spec, weights=weights, preset=preset)
        if info["kind"] == "random":
            raise ConfigError(f"{spec}: give --weights (a source such as {spec}:..., a registered name or a file; "
                              "see `vtransfer weights list`); features of random weights describe nothing")
        described = f"{spec} with {weights}" if weights else spec
        loaded = FeatureModel(model, described, None,
                              {"backbone": spec, "weights": weights, "preset": preset, "source": info.get("source")})
    else:
        raise ConfigError(f"{spec}: no such model file or run folder, and not a backbone name "
                          f"({', '.join(backbone_names())}, or hf:REPO_OR_DIR)")
    loaded.model.preprocessing = adapt_preprocessing(loaded.model.preprocessing, frames, stride, size)
    loaded.model.eval()
    return loaded


@torch.inference_mode()
def embedding_size(model: VideoBackbone, device: torch.device) -> int:
    """``D`` of the model's ``B x D`` features, from one blank clip (so a clip shape it cannot take fails now)."""
    p = model.preprocessing
    blank = torch.zeros(1, p.channels, p.frames, *p.crop_size, device=device)
    try:
        out = model.features(blank)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a geometry the architecture cannot take: say which
        raise ConfigError(f"{model.backbone_name} cannot take clips of {p.frames} frames of "
                          f"{p.crop_size[0]}x{p.crop_size[1]} ({type(e).__name__}: {e}); change --frames/--size") from e
    if out.ndim != 2:
        raise ConfigError(f"{model.backbone_name}: features must be B x D, got shape {tuple(out.shape)}")
    return int(out.shape[1])


# -- which videos -----------------------------------------------------------------------


def select_videos(
    data: str | Path,
    *,
    model_path: Path | None = None,
    manifest: str | Path | None = None,
    split_files: str | Path | None = None,
    split_seed: int = 0,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    group_pattern: str | None = None,
    split: str = "all",
) -> VideoSelection:
    """The videos of ``data`` with their split, and which ``split`` of them to embed.

    The split comes from ``manifest`` when given, else from the ``split.csv``
    beside ``model_path`` (its run's split) when that lists this dataset,
    else from ``data`` itself: its train/val/test folders or the default
    stratified split (``split_files``, ``ratios``, ``split_seed``, ``group_pattern``).
    """

    data = Path(data)
    warning = None
    where = f"{data}"
    if manifest is None and model_path is not None and (model_path.parent / runs.SPLIT_FILE).is_file():
        run_split = model_path.parent / runs.SPLIT_FILE
        split_folders = data.is_dir() and any((data / s).is_dir() for s in SPLITS)
        same = data.is_dir() and read_manifest(run_split, check_files=False).root.resolve() == data.resolve()
        if same and not split_folders:
            manifest = run_split
        elif not split_folders:
            warning = f"{run_split} lists another dataset than {data}; splitting {data} with the default rules"
    if manifest is not None:
        where = f"{manifest}"
    index = open_dataset(DataConfig(data, Path(manifest) if manifest else None,
                                     Path(split_files) if split_files else None, split_seed, tuple(ratios), group_pattern))
    records = index.records if split == "all" else index.split(split)
    if not records:
        raise DatasetError(f"{data}: no videos in split {split!r}")
    what = "every split" if split == "all" else f"the {split} split"
    return VideoSelection(index, records, f"{what} of {where} ({len(records)} videos)", warning)


def unused_files(index: DatasetIndex) -> list[dict[str, str]]:
    """Files the scan did not use, except notes beside the class folders (README, categories.csv)."""

    return [{"path": printable(s.path), "reason": s.reason} for s in index.skipped
            if not (s.path.parent == index.root and s.path.suffix.lower() not in VIDEO_EXTENSIONS)]


# -- embedding --------------------------------------------------------------------------


@torch.inference_mode()
def compute_embeddings(
    model: VideoBackbone,
    records: list[VideoRecord],
    *,
    clips_per_video: int = 10,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    reader=None,
    workers: int = 0,
    per_clip: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Embeddings:
    """Features of ``clips_per_video`` evaluation clips of each video, and their mean per video.

    ``reader`` is where frames come from (a frame cache; default: decode each
    clip). ``progress(clips_done, clips_total)`` is called after each batch.
    """

    device = torch.device(device)
    model.eval()
    labels = {label: i for i, label in enumerate(dict.fromkeys(r.label for r in records))}
    dataset = ClipDataset(records, labels, model.preprocessing, mode="eval", clips_per_video=clips_per_video, reader=reader)
    loader = make_loader(dataset, batch_size, workers)
    video_of_path = {str(r.path): i for i, r in enumerate(records)}
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(records), dtype=torch.int64)
    reasons: dict[int, str] = {}
    failures = torch.zeros(len(records), dtype=torch.int64)
    clip_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    done, total = 0, len(dataset)
    for batch in loader:
        done += len(batch["video"]) + len(batch["errors"])
        for path, reason in batch["errors"]:
            v = video_of_path[path]
            reasons.setdefault(v, reason)
            failures[v] += 1
        if batch["clip"].shape[0]:
            feats = model.features(batch_inputs(batch, model.preprocessing, device)).float().cpu()
            if sums is None:
                sums = torch.zeros(len(records), feats.shape[1], dtype=torch.float64)
            sums.index_add_(0, batch["video"], feats.double())
            counts += torch.bincount(batch["video"], minlength=len(records))
            if per_clip:
                clip_parts.append((feats, batch["video"], batch["view"]))
        if progress is not None:
            progress(done, total)

    kept = torch.nonzero(counts > 0).flatten()
    row_of_video = torch.full((len(records),), -1, dtype=torch.int64)
    row_of_video[kept] = torch.arange(len(kept))
    dim = sums.shape[1] if sums is not None else 0
    video = (sums[kept] / counts[kept, None]).float() if sums is not None else torch.zeros(0, dim)
    out = Embeddings(video=video, records=[records[i] for i in kept.tolist()], clips=counts[kept].tolist())
    out.failed = [{"path": printable(records[v].path), "reason": reasons.get(v, "no clip decoded")}
                  for v in range(len(records)) if counts[v] == 0]
    out.partial = [{"path": printable(records[v].path), "reason": reasons[v], "clips_failed": int(failures[v])}
                   for v in range(len(records)) if counts[v] > 0 and failures[v] > 0]
    if per_clip:
        if clip_parts:
            feats, videos, views = (torch.cat(parts) for parts in zip(*clip_parts))
        else:
            feats, videos, views = torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        out.clip, out.clip_video, out.clip_view = feats, row_of_video[videos], views  # loader order: video by video
    return out


# -- files ------------------------------------------------------------------------------


def write_features(emb: Embeddings, tensors_path: Path, index_path: Path, metadata: dict[str, Any]) -> None:
    """Write the tensor file (format from its suffix) and the CSV index, each atomically."""

    tensors = {"video_embeddings": emb.video.contiguous()}
    if emb.clip is not None:
        tensors.update(clip_embeddings=emb.clip.contiguous(), clip_video=emb.clip_video.contiguous(),
                       clip_view=emb.clip_view.contiguous())
    meta = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata})
    if tensors_path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, metadata=np.array(meta), **{k: v.numpy() for k, v in tensors.items()})
        data = buffer.getvalue()
    else:

        data = save(tensors, metadata={METADATA_KEY: meta})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    for row, (record, clips) in enumerate(zip(emb.records, emb.clips)):
        writer.writerow([row, printable(os.path.abspath(record.path)), record.label, record.split or "", clips])
    atomic_write_bytes(tensors_path, data)
    atomic_write_text(index_path, text.getvalue())


@dataclass
class FeatureFile:
    """A features file read back: arrays, metadata, and the index rows (dicts of the CSV's columns)."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]
    rows: list[dict[str, str]]


def read_features(path: str | Path) -> FeatureFile:
    """Read ``F.safetensors`` or ``F.npz`` and the ``F.csv`` beside it (never unpickles)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        metadata = json.loads(str(arrays.pop("metadata")))
    else:

        with safe_open(str(path), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    with open(path.with_suffix(".csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return FeatureFile(arrays, metadata, rows)


# -- the command ------------------------------------------------------------------------


def extract_features(
    model_or_backbone: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    preset: str | None = None,
    frames: int | None = None,
    stride: int | None = None,
    size: int | None = None,
    per_clip: bool = False,
    fmt: str = "safetensors",
    split: str = "all",
    clips_per_video: int = 10,
    batch_size: int = 8,
    manifest: str | Path | None = None,
    split_files: str | Path | None = None,
    split_seed: int = 0,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    group_pattern: str | None = None,
    cache: str = "auto",
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    on_selection: Callable[[VideoSelection, FeatureModel], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Embed the videos of ``data`` with a model and write ``out.safetensors`` (or ``.npz``) and ``out.csv``.

    Options are checked, the model loaded and one blank clip run through it,
    and the dataset scanned and split, all before any video is decoded.
    ``on_selection(selection, model)`` is called then (the CLI prints it).
    Frames come from the decoded-frame cache (``cache``, as in ``finetune``).

    Raises:
        ConfigError: a bad option, an output that exists (without ``overwrite``).
        DatasetError: no videos, or none that decodes.
    """

    tensors_path, index_path = output_paths(out, fmt)
    refuse_existing([tensors_path, index_path], overwrite)
    check_options(split, clips_per_video, batch_size, cache)
    dev = resolve_device(device)
    configure_threads(threads)
    loaded = load_feature_model(model_or_backbone, weights, preset, frames, stride, size)
    loaded.model.to(dev)
    dim = embedding_size(loaded.model, dev)
    selection = select_videos(data, model_path=loaded.model_path, manifest=manifest, split_files=split_files,
                              split_seed=split_seed, ratios=ratios, group_pattern=group_pattern, split=split)
    if on_selection is not None:
        on_selection(selection, loaded)

    reader = shared_reader(cache, Path(cache_dir) if cache_dir else None, selection.records, loaded.model.preprocessing)
    emb = compute_embeddings(loaded.model, selection.records, clips_per_video=clips_per_video, batch_size=batch_size,
                             device=dev, reader=reader, workers=workers if workers is not None else default_workers(dev, reader),
                             per_clip=per_clip, progress=progress)
    if not emb.records:
        shown = "; ".join(f"{f['path']}: {f['reason']}" for f in emb.failed[:5])
        raise DatasetError(f"none of the {len(selection.records)} videos could be decoded ({shown})")
    skipped_files = unused_files(selection.index)
    write_features(emb, tensors_path, index_path, {
        "model": loaded.info, "embedding": "model.features: the classifier's input, mean over each video's clips",
        "embedding_size": dim, "preprocessing": loaded.model.preprocessing.to_dict(), "clips_per_video": clips_per_video,
        "per_clip": per_clip, "videos": selection.description, "dataset": str(Path(os.path.abspath(selection.index.root))),
        "failed_videos": emb.failed, "partly_decoded_videos": emb.partial, "skipped_files": skipped_files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "vtransfer_version": package_version(),
    })
    return ExtractResult(tensors_path, index_path, emb, selection, loaded, skipped_files)
