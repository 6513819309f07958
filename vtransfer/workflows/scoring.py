"""Scoring a model on videos: which videos an evaluation takes, and their clip- and video-level metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vtransfer.data.clips import make_clip_dataset
from vtransfer.data.scan import load_dataset, scan_dataset
from vtransfer.data.splits import read_manifest
from vtransfer.engine.batches import make_loader
from vtransfer.engine.feature_cache import cached_clip_probs
from vtransfer.engine.inference import ClipPredictions, predict_clip_probs
from vtransfer.evaluation.metrics import classification_report
from vtransfer.models.base import VideoBackbone
from vtransfer.run_config import ClipConfig
from vtransfer.utils import distributed
from vtransfer.utils.errors import ConfigError, DatasetError
from vtransfer.utils.runtime import default_workers
from vtransfer.workflows import runs


def evaluate_records(
    model: VideoBackbone,
    records,
    classes: list[str],
    opts: ClipConfig,
    device: torch.device,
    precision: str = "fp32",
    categories: dict[str, str] | None = None,
    clips: int | None = None,
    reader=None,
    progress=None,
    prefix_stop: int = 0,
    shard: bool = False,
    crops: int = 1,
    temperature: float | None = None,
):
    """Video- and clip-level metrics of ``model`` on ``records`` (N uniform clips per video, ``crops`` crops each).

    With ``prefix_stop > 0`` the (frozen) groups below it are computed once per
    clip and shared (:mod:`vtransfer.engine.feature_cache`); evaluation clips are
    deterministic, so this changes nothing but the time taken. With ``shard``
    each process of a distributed job scores every N-th video and all of them
    get the gathered result. ``temperature`` scales the clip scores before
    they are averaged per video (a calibrated model's, see :mod:`vtransfer.evaluation.calibration`).
    """

    class_to_idx = {c: i for i, c in enumerate(classes)}
    ctx = distributed.current() if shard else distributed.DistContext()
    mine = list(range(ctx.rank, len(records), ctx.world))
    ds = make_clip_dataset([records[i] for i in mine], class_to_idx, model.preprocessing, "eval", opts, seed=0, clips=clips,
                           reader=reader, crops=crops)
    workers = opts.workers if opts.workers is not None else default_workers(device, reader)
    if prefix_stop > 0:
        preds = cached_clip_probs(model, ds, prefix_stop, opts.batch_size, workers, device, precision)
    else:
        preds = predict_clip_probs(model, make_loader(ds, opts.batch_size, workers), device, precision, on_batch=progress)
    if ctx.enabled:
        preds = _gather_predictions(preds, mine)
    video_labels = [class_to_idx[r.label] for r in records]
    names = [video_name(r.path) for r in records]
    result = classification_report(preds.probs, preds.video, video_labels, classes, categories, video_names=names,
                                   views=ds.views(), temperature=temperature)
    return result, preds


def video_name(path: Path) -> str:
    """A video's path relative to the folder holding its class folders (``class/video.mp4``), else as given."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else str(path)


def _gather_predictions(preds, mine: list[int]):
    """Join every process's clip predictions, mapping local video numbers back to the full list."""

    parts = distributed.gather_objects((preds.probs, np.asarray(mine)[preds.video] if len(mine) else preds.video, preds.errors))
    return ClipPredictions(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                           [e for p in parts for e in p[2]])


def resolve_model_path(model: str | Path) -> Path:
    """A model file, or a run folder holding ``model.safetensors``."""

    path = Path(model)
    if path.is_dir():
        if not (path / runs.MODEL_FILE).is_file():
            raise ConfigError(f"{path} is a folder without {runs.MODEL_FILE}; give a model file or a finished run folder")
        return path / runs.MODEL_FILE
    return path


def check_classes(model_classes: list[str], data_classes: list[str], model_path: Path) -> None:
    """Raise :class:`DatasetError` when the data has classes the model does not know."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise DatasetError(f"classes {unknown} are not among the classes of {model_path} ({len(model_classes)} classes)")


@dataclass
class EvalSelection:
    """Which videos an evaluation scored, and the words that say so."""

    records: list
    description: str  # "test split of runs/x/split.csv (9 videos)"
    warning: str | None = None


def select_eval_records(model_path: Path, data: Path, manifest: Path | None, split: str) -> EvalSelection:
    """The videos ``evaluate`` scores: ``manifest``'s split, else the model's run's ``split.csv``, else the folder.

    A folder with ``train/val/test`` subfolders gives its ``split``. A plain
    class folder next to a model whose run saved its split uses that split's
    ``split`` (so ``evaluate RUN DATA`` scores the run's own test videos);
    with no split anywhere every video is scored and the result says that it
    may include videos the model trained on.
    """

    has_split_folders = data.is_dir() and any((data / s).is_dir() for s in ("train", "val", "test"))
    run_split = model_path.parent / runs.SPLIT_FILE
    if manifest is None and not has_split_folders and data.is_dir() and run_split.is_file():

        if read_manifest(run_split, check_files=False).root.resolve() == data.resolve():  # the run's own dataset
            manifest = run_split
    if manifest is None and not has_split_folders and data.is_dir():
        index = scan_dataset(data)
        return EvalSelection(index.records, f"all {len(index.records)} videos of {data}, including any the model trained on",
                             warning=(f"no split given and no {runs.SPLIT_FILE} beside {model_path.name}: scoring every "
                                      f"video in {data}, training videos included; pass --manifest RUN/{runs.SPLIT_FILE} "
                                      "for a held-out score"))
    index = load_dataset(data, manifest=Path(manifest) if manifest else None)
    records = index.records if split == "all" else index.split(split)
    where = f"{manifest}" if manifest else f"{data}/{split}"
    what = "every split" if split == "all" else f"{split} split"
    return EvalSelection(records, f"{what} of {where} ({len(records)} videos)")
