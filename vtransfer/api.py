"""The Python API: every command of the CLI is one function here.

::

    import vtransfer
    res = vtransfer.finetune("data/", backbone="vivit", preset="tiny", policy="temporal", out="runs/a")
    rep = vtransfer.evaluate("runs/a/model.safetensors", "data/", manifest="runs/a/split.csv")
    tab = vtransfer.compare_policies("data/", backbone="i3d", weights="pretrained.safetensors")
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vtransfer.errors import ConfigError, DatasetError
from vtransfer.models.base import Preprocessing, VideoBackbone

DEFAULT_POLICY = "top-3"


@dataclass
class DataOptions:
    """Where the videos are and how they are split."""

    data: Path
    manifest: Path | None = None
    split_files: Path | None = None
    split_seed: int = 0
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    group_pattern: str | None = None
    categories: Path | None = None


@dataclass
class ClipOptions:
    """How clips are cut and fed (``None`` = the backbone's declared preprocessing)."""

    frames: int | None = None
    stride: int | None = None
    size: int | None = None
    clips_per_video: int = 10
    val_clips: int = 3
    batch_size: int = 8
    workers: int | None = None
    cache: str = "auto"
    cache_dir: Path | None = None
    cached_views: int | None = None  # None: auto (see feature_cache.resolve_views); 0: off
    crop_scale: tuple[float, float] | None = None  # training crop's share of the frame area (None: default)


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced."""

    run_dir: Path
    model_path: Path
    report: dict[str, Any]
    history: list[dict]
    trainable_params: int
    total_params: int
    train_time_s: float
    best_val_video_acc: float
    plan: dict[str, Any] = field(default_factory=dict)
    test: Any = None  # vtransfer.metrics.EvalResult of the test split (None for an interrupted run)


# -- shared steps ---------------------------------------------------------------------
def open_dataset(opts: DataOptions):
    """Scan (or read) the dataset and give every video a split."""
    from vtransfer.data.scan import load_dataset

    return load_dataset(
        Path(opts.data),
        manifest=Path(opts.manifest) if opts.manifest else None,
        split_files=Path(opts.split_files) if opts.split_files else None,
        ratios=tuple(opts.ratios),
        split_seed=opts.split_seed,
        group_pattern=opts.group_pattern,
    )


def load_categories_for(path: Path | None, classes: list[str]) -> dict[str, str] | None:
    """Class -> category mapping from a categories file (``None`` when no file is given)."""
    if path is None:
        return None
    from vtransfer.data.categories import load_categories

    return load_categories(Path(path), classes)


def adapt_preprocessing(base: Preprocessing, frames: int | None, stride: int | None, size: int | None) -> Preprocessing:
    """The backbone's preprocessing with user overrides; the resize keeps the crop/short-side ratio."""
    resize_short = None
    if size is not None:
        ratio = base.resize_short / max(base.crop_size)
        resize_short = max(size, int(round(size * ratio)))
    return base.replace(frames=frames, stride=stride, crop_size=(size, size) if size else None, resize_short=resize_short)


def geometry_overrides(backbone: str, preset: str | None, frames: int | None, stride: int | None, size: int | None) -> dict[str, Any]:
    """Constructor overrides so a freshly built backbone takes ``frames``/``stride``/``size`` clips.

    The short-side resize keeps the preset's crop-to-resize ratio (the backbone's own rule when the preset does not say).
    """
    from vtransfer.models.registry import geometry_keys, resolve_config

    keys = geometry_keys(backbone)
    wanted = {"frames": frames, "stride": stride, "size": size}
    out = {keys[k]: v for k, v in wanted.items() if v is not None and k in keys}
    if size is not None and "size" in keys:
        cfg = resolve_config(backbone, preset)
        base = cfg.get(keys["size"])
        base = max(base) if isinstance(base, (list, tuple)) else base
        if cfg.get("resize_short") and base:  # else the constructor derives it from the size
            out["resize_short"] = max(size, int(round(size * cfg["resize_short"] / base)))
    return out


def make_clip_dataset(records, class_to_idx, preprocessing, mode, opts: ClipOptions, seed: int, clips: int | None = None, reader=None, views: int | None = None):
    """A :class:`~vtransfer.data.dataset.ClipDataset` for ``mode`` (train or eval)."""
    from vtransfer.data.dataset import ClipDataset

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
    )


def evaluate_records(
    model: VideoBackbone,
    records,
    classes: list[str],
    opts: ClipOptions,
    device: torch.device,
    precision: str = "fp32",
    categories: dict[str, str] | None = None,
    clips: int | None = None,
    reader=None,
    progress=None,
    prefix_stop: int = 0,
    shard: bool = False,
):
    """Video- and clip-level metrics of ``model`` on ``records`` (N uniform clips per video).

    With ``prefix_stop > 0`` the (frozen) groups below it are computed once per
    clip and shared (:mod:`vtransfer.feature_cache`); evaluation clips are
    deterministic, so this changes nothing but the time taken. With ``shard``
    each process of a distributed job scores every N-th video and all of them
    get the gathered result.
    """
    from vtransfer.batches import make_loader
    from vtransfer.feature_cache import cached_clip_probs
    from vtransfer.inference import predict_clip_probs
    from vtransfer.metrics import classification_report
    from vtransfer.runtime import default_workers

    from vtransfer import distributed

    class_to_idx = {c: i for i, c in enumerate(classes)}
    ctx = distributed.current() if shard else distributed.DistContext()
    mine = list(range(ctx.rank, len(records), ctx.world))
    ds = make_clip_dataset([records[i] for i in mine], class_to_idx, model.preprocessing, "eval", opts, seed=0, clips=clips, reader=reader)
    workers = opts.workers if opts.workers is not None else default_workers(device, reader)
    if prefix_stop > 0:
        preds = cached_clip_probs(model, ds, prefix_stop, opts.batch_size, workers, device, precision)
    else:
        preds = predict_clip_probs(model, make_loader(ds, opts.batch_size, workers), device, precision, on_batch=progress)
    if ctx.enabled:
        preds = _gather_predictions(preds, mine)
    video_labels = [class_to_idx[r.label] for r in records]
    names = [_video_name(r.path) for r in records]
    result = classification_report(preds.probs, preds.video, video_labels, classes, categories, video_names=names)
    return result, preds


def _video_name(path: Path) -> str:
    """A video's path relative to the folder holding its class folders (``class/video.mp4``), else as given."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else str(path)


# In-memory frame caches of this process, shared by the runs of compare-policies (and the demo).
_READERS: dict[tuple, Any] = {}


def shared_reader(cache: str, cache_dir: Path, records, preprocessing: Preprocessing):
    """The decoded-frame reader for ``--cache``; an in-memory one is reused by later runs on the same videos.

    Memory caches are keyed by the decode settings and each file's path, size and
    modification time, so a changed file is decoded again.
    """
    from vtransfer.data.frame_cache import make_reader
    from vtransfer.hashing import file_stamp

    key = (preprocessing.resize_short, tuple(sorted((str(r.path), *file_stamp(r.path)) for r in records)))
    if cache in ("auto", "memory") and key in _READERS:
        return _READERS[key]
    reader = make_reader(cache, cache_dir, records, preprocessing)
    cached = getattr(reader, "cache", None)
    if cached is not None and cached.mode == "memory":
        _READERS.clear()  # keep one dataset's frames at a time
        _READERS[key] = reader
    return reader


def _gather_predictions(preds, mine: list[int]):
    """Join every process's clip predictions, mapping local video numbers back to the full list."""
    import numpy as np

    from vtransfer import distributed
    from vtransfer.inference import ClipPredictions

    parts = distributed.gather_objects((preds.probs, np.asarray(mine)[preds.video] if len(mine) else preds.video, preds.errors))
    return ClipPredictions(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                           [e for p in parts for e in p[2]])


def _default_run_dir(prefix: str) -> Path:
    import re

    prefix = re.sub(r"[^A-Za-z0-9_.+-]+", "_", prefix)  # hf:ORG/REPO names one folder, not a tree
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_classes(model_classes: list[str], data_classes: list[str], model_path: Path) -> None:
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise DatasetError(f"classes {unknown} are not among the classes of {model_path} ({len(model_classes)} classes)")


# -- finetune -------------------------------------------------------------------------
def finetune(
    data: str | Path | None = None,
    *,
    backbone: str = "i3d",
    preset: str | None = None,
    weights: str | None = None,
    policy: str = DEFAULT_POLICY,
    train_groups: list[str] | None = None,
    epochs: int | None = None,
    batch_size: int = 8,
    lr: float | None = None,
    optimizer: str = "auto",
    weight_decay: float | None = None,
    head_lr_scale: float | None = None,
    warmup_epochs: float = 1.0,
    patience: int = 5,
    dropout: float | None = None,
    frames: int | None = None,
    stride: int | None = None,
    size: int | None = None,
    clips_per_video: int = 10,
    val_clips: int = 3,
    precision: str = "fp32",
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    categories: str | Path | None = None,
    balance: str = "none",
    manifest: str | Path | None = None,
    split_files: str | Path | None = None,
    split_seed: int = 0,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    group_pattern: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    cache: str = "auto",
    cache_dir: str | Path | None = None,
    cached_views: int | None = None,
    crop_scale: tuple[float, float] | None = None,
    tensorboard: bool = False,
    max_bad_fraction: float = 0.2,
    deterministic: bool = False,
    overwrite: bool = False,
    resume: str | Path | None = None,
    reporter=None,
    stop_after_epochs: int | None = None,
    pretrain_source: dict | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the videos in ``data`` under a freezing ``policy``.

    Writes a run folder (``out``): ``config.json``, ``split.csv``,
    ``metrics.jsonl``, ``model.safetensors`` (best validation epoch) and a
    test-set report under ``report/``. ``resume=RUN_DIR`` continues a stopped
    run with the options it was started with (``data`` then comes from its
    ``config.json`` and may be omitted). See ``vtransfer finetune --help``
    for every option.
    """
    options = {k: v for k, v in locals().items() if k not in ("reporter", "stop_after_epochs", "resume", "overwrite")}
    from vtransfer import distributed, runs
    from vtransfer.runtime import resolve_device

    ctx = distributed.init_from_env(resolve_device(device))
    if resume is not None:
        run_dir = runs.prepare_run_dir(Path(resume), resume=True) if ctx.is_main else Path(resume)
        existed = True
        distributed.barrier()
        options = runs.read_json(run_dir / runs.CONFIG_FILE)["options"]
    else:
        if data is None:
            raise ConfigError("finetune: give the dataset folder (or resume=RUN_DIR to continue a stopped run)")
        run_dir = Path(out) if out else Path(distributed.broadcast_object(str(_default_run_dir(f"{backbone}-{policy}"))))
        existed = run_dir.exists()
        if ctx.is_main:
            runs.prepare_run_dir(run_dir, overwrite=overwrite)
        distributed.barrier()
    options.update(reporter=reporter, stop_after_epochs=stop_after_epochs, out=str(run_dir))
    options = _with_policy_epochs(options)  # a run's config.json records the number
    with _sigint_watch() as interrupted:
        try:
            return _finetune_run(run_dir, options, resume=resume is not None)
        except (KeyboardInterrupt, RuntimeError) as e:
            # Ctrl-C anywhere (cache filling, an epoch, the final test) leaves the saved epochs resumable.
            # Ctrl-C also reaches DataLoader workers; one that dies of it surfaces here as a RuntimeError.
            if isinstance(e, RuntimeError) and not interrupted.is_set():
                _discard_if_failed_early(run_dir, resume, existed, ctx)
                raise
            done = len(runs.read_metrics(run_dir))
            raise runs.RunInterrupted(run_dir, done, int(options["epochs"])) from None
        except runs.RunInterrupted:
            raise  # stopped on purpose: the folder stays resumable
        except Exception:
            _discard_if_failed_early(run_dir, resume, existed, ctx)
            raise


def _with_policy_epochs(options: dict) -> dict:
    """``options`` with ``epochs`` filled from the policy's default when it is ``None``."""
    if options.get("epochs") is not None:
        return options
    from vtransfer.policies import default_epochs

    return {**options, "epochs": default_epochs(str(options["policy"]))}


def _discard_if_failed_early(run_dir: Path, resume, existed: bool, ctx) -> None:
    """A new run that failed before its first finished epoch leaves nothing in the way of its corrected rerun."""
    from vtransfer import runs

    if resume is None and ctx.is_main:
        runs.discard_failed_run(run_dir, existed)


def build_run_model(o: dict, num_classes: int) -> tuple[VideoBackbone, dict]:
    """The model a run with options ``o`` starts from, and where its weights came from.

    ``scratch`` gets random weights with the preset's (or the geometry
    options') architecture; other policies load ``o["weights"]``, whose own
    architecture wins for a checkpoint file. The preprocessing follows the
    ``frames``/``stride``/``size`` options.
    """
    from vtransfer.loading import load_backbone_with_info

    arch_overrides = {}
    if o.get("dropout") is not None:
        arch_overrides["dropout"] = o["dropout"]
    weights = o.get("weights")
    if weights is None:
        arch_overrides.update(geometry_overrides(o["backbone"], o.get("preset"), o.get("frames"), o.get("stride"), o.get("size")))
    # a checkpoint carries its own architecture: the preset only applies to fresh or built-in-source models
    preset = o.get("preset") if weights is None or not Path(str(weights)).exists() else None
    model, info = load_backbone_with_info(o["backbone"], weights=weights, num_classes=num_classes, preset=preset, **arch_overrides)
    if o["policy"] == "scratch" and (weights is not None or info["kind"] != "random"):  # hf:REPO brings weights
        model, info = _random_twin(model, info)
    model.preprocessing = adapt_preprocessing(model.preprocessing, o.get("frames"), o.get("stride"), o.get("size"))
    return model, info


def _random_twin(model: VideoBackbone, info: dict) -> tuple[VideoBackbone, dict]:
    """A randomly initialised model of exactly ``model``'s architecture and preprocessing (the scratch baseline).

    ``scratch`` beside pretrained policies must train the same network, so a
    comparison never sets a checkpoint's small preset against a full-size one.
    """
    from vtransfer.models.registry import build_from_config

    twin = build_from_config(model.backbone_name, dict(model.config))
    twin.preprocessing = model.preprocessing
    twin.eval()
    random_info = {**info, "kind": "random", "source": None, "path": None, "pretrained_on": None,
                   "pretrained_classes": None, "classes": None, "architecture_from": info.get("weights")}
    return twin, random_info


@contextlib.contextmanager
def _sigint_watch():
    """Yield an event set when SIGINT arrives (which still raises KeyboardInterrupt as usual)."""
    import signal
    import threading

    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _jsonable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if k in ("reporter", "stop_after_epochs"):
            continue
        out[k] = str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v)
    return out


def _finetune_run(run_dir: Path, o: dict, resume: bool) -> FinetuneResult:
    from vtransfer import distributed, runs
    from vtransfer.data.splits import write_manifest
    from vtransfer.feature_cache import build_prefix_source
    from vtransfer.policies import apply_policy, resolve_policy
    from vtransfer.report import write_eval_report
    from vtransfer.runtime import configure_threads, default_workers, preferred_memory_format, resolve_device, seed_everything
    from vtransfer.train import Trainer, TrainConfig, class_weights
    from vtransfer.weights.checkpoint import save_checkpoint

    ctx = distributed.current()
    main = ctx.is_main  # only rank 0 writes files and reports
    reporter = o.get("reporter") if main else None
    if main and o.get("tensorboard"):
        from vtransfer.progress import TensorBoardReporter
        from vtransfer.train import QuietReporter

        reporter = TensorBoardReporter(reporter or QuietReporter(), run_dir / "tensorboard")
    device = resolve_device(o["device"])
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    threads = configure_threads(o.get("threads"))
    seed_everything(int(o["seed"]), bool(o["deterministic"]))

    dopts = DataOptions(
        data=Path(o["data"]),
        manifest=(run_dir / runs.SPLIT_FILE) if resume else (Path(o["manifest"]) if o["manifest"] else None),
        split_files=Path(o["split_files"]) if o["split_files"] else None,
        split_seed=int(o["split_seed"]),
        ratios=tuple(o["ratios"]),
        group_pattern=o["group_pattern"],
        categories=Path(o["categories"]) if o["categories"] else None,
    )
    index = open_dataset(dopts)
    classes = index.classes
    categories = load_categories_for(dopts.categories, classes)
    train_records, val_records, test_records = index.split("train"), index.split("val"), index.split("test")
    if not train_records:
        raise DatasetError(f"{dopts.data}: the train split is empty")
    if not resume and main:
        write_manifest(run_dir / runs.SPLIT_FILE, index)
    # -- bad input (issue 7): skipped files and undecodable videos are reported, never trained on --
    from vtransfer.train import screen_dataset

    _stage(reporter, f"screening {len(index.records)} videos")
    index, skipped_files, unreadable = screen_dataset(index, float(o["max_bad_fraction"]), threads, reporter)
    train_records, val_records, test_records = index.split("train"), index.split("val"), index.split("test")
    if unreadable and main:
        runs.write_bad_videos(run_dir, unreadable)
    # -- end bad input --

    policy = o["policy"]
    _stage(reporter, f"loading {o['backbone']}" + (f" with {o['weights']}" if o.get("weights") else ""))
    model, info = build_run_model(o, len(classes))
    model.to(device, memory_format=preferred_memory_format(o["backbone"], o["precision"], device))
    plan = resolve_policy(model, policy, o.get("train_groups"))
    apply_policy(model, plan)

    config = TrainConfig(
        epochs=int(o["epochs"]),
        batch_size=int(o["batch_size"]),
        lr=o["lr"],
        optimizer=o["optimizer"],
        weight_decay=o["weight_decay"],
        warmup_epochs=float(o["warmup_epochs"]),
        patience=int(o["patience"]),
        precision=o["precision"],
        seed=int(o["seed"]),
        balance=o["balance"],
        max_bad_fraction=float(o["max_bad_fraction"]),
        head_lr_scale=o.get("head_lr_scale"),
    ).resolved(o["backbone"])
    copts = ClipOptions(
        frames=o["frames"], stride=o["stride"], size=o["size"],
        clips_per_video=int(o["clips_per_video"]), val_clips=int(o["val_clips"]),
        batch_size=int(o["batch_size"]), workers=o["workers"], cache=o["cache"],
        cache_dir=Path(o["cache_dir"]) if o["cache_dir"] else None, cached_views=o["cached_views"],
        crop_scale=tuple(o["crop_scale"]) if o.get("crop_scale") else None,
    )
    reader = shared_reader(copts.cache, copts.cache_dir or (run_dir / "frame_cache"), index.records, model.preprocessing)
    workers = copts.workers if copts.workers is not None else default_workers(device, reader)
    copts.workers = workers

    total_params = sum(p.numel() for p in model.parameters())
    trainable_params = plan.trainable_count(model)
    if not resume and main:
        runs.write_json(run_dir / runs.CONFIG_FILE, {
            "options": _jsonable(o),
            "resolved": {
                "train": asdict(config), "device": str(device), "threads": threads, "workers": workers,
                "preprocessing": model.preprocessing.to_dict(), "classes": classes,
                "policy": plan.to_dict(), "trainable_params": trainable_params, "total_params": total_params,
                "weights": info, "architecture": dict(model.config),
                "split_sizes": {s: len(index.split(s)) for s in ("train", "val", "test")},
                "processes": ctx.world,
            },
        })

    class_to_idx = index.class_to_idx
    train_labels = [class_to_idx[r.label] for r in train_records]
    _stage(reporter, "decoding clips" + (" and caching the frozen layers' outputs" if plan.first_trainable_group else ""))
    source = build_prefix_source(
        model=model, plan=plan, train_records=train_records, class_to_idx=class_to_idx, labels=train_labels,
        opts=copts, config=config, device=device, reader=reader, balance_sampler=(config.balance == "sampler"),
    )
    val_eval_records = val_records or train_records

    def validate(m: VideoBackbone) -> tuple[float, float]:
        res, _ = evaluate_records(m, val_eval_records, classes, copts, device, config.precision, clips=copts.val_clips,
                                  reader=reader, prefix_stop=plan.first_trainable_group, shard=True)
        return res.video_hit1, res.clip_hit1

    provenance = _provenance(o, info, index)

    def save_best(m: VideoBackbone, record) -> None:
        if not main:
            return
        save_checkpoint(run_dir / runs.MODEL_FILE, m, classes=classes, source=provenance,
                        training={"policy": plan.to_dict(), "best_epoch": record.epoch, "val_video_acc": record.val_video_acc,
                                  "epochs": config.epochs, "dataset": str(dopts.data), "trainable_params": trainable_params})

    trainer = Trainer(
        model, plan, config, device, source, validate, save_best,
        save_state=lambda st: main and (runs.save_resume_state(run_dir, st), runs.write_metrics(run_dir, st["history"])),
        reporter=reporter,
        loss_weights=class_weights(train_labels, len(classes)) if config.balance == "weights" else None,
        train_size=len(train_records),
        on_bad_videos=lambda entries: main and runs.write_bad_videos(run_dir, unreadable + entries),  # issue 7
    )
    if resume and runs.has_resume_state(run_dir):  # issue 7: no resume.pt = stopped before epoch 1 finished
        trainer.load_state_dict(runs.load_resume_state(run_dir))
    try:  # issue 7: Ctrl-C keeps the last finished epoch and says how to resume
        state = trainer.fit(stop_after=o.get("stop_after_epochs"))
    except KeyboardInterrupt:
        raise runs.RunInterrupted(run_dir, trainer.state.epoch, config.epochs) from None
    train_time = sum(h["time_s"] for h in state.history)
    distributed.barrier()
    if state.epoch < config.epochs and not state.stopped_early or not main:
        # stopped on purpose (stop_after_epochs): resumable, no report yet; other ranks leave the test to rank 0
        return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, {}, state.history, trainable_params, total_params,
                              train_time, state.best_score, plan.to_dict())

    from vtransfer.weights.checkpoint import model_from_checkpoint

    best, _ = model_from_checkpoint(run_dir / runs.MODEL_FILE)
    best.to(device, memory_format=preferred_memory_format(o["backbone"], o["precision"], device))
    test_set = test_records or val_records
    apply_policy(best, plan)
    result, preds = evaluate_records(best, test_set, classes, copts, device, config.precision, categories, reader=reader,
                                     prefix_stop=plan.first_trainable_group)
    report = result.to_dict()
    if result.collapse_warning() and reporter is not None:
        reporter.message(f"warning: test split: {result.collapse_warning()}")
    extra = {"run": str(run_dir), "backbone": o["backbone"], "policy": plan.policy, "trainable_params": trainable_params,
             "total_params": total_params, "train_time_s": train_time, "best_epoch": state.best_epoch,
             "decode_errors": sorted({f"{p}: {r}" for p, r in preds.errors}),
             "bad_videos": unreadable + state.bad_videos, "skipped_files": skipped_files}  # issue 7
    write_eval_report(result, run_dir / "report", title=f"{o['backbone']} / {plan.policy} — test split",
                      extra=extra, history=state.history)
    return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, report, state.history, trainable_params, total_params,
                          train_time, state.best_score, plan.to_dict(), test=result)


def _stage(reporter, text: str) -> None:
    """Say what the run is doing before its first progress bar (reporters without a status line ignore it)."""
    stage = getattr(reporter, "stage", None)
    if stage is not None:
        stage(text)


def _provenance(o: dict, info: dict, index) -> dict:
    """What the saved model was trained from: its pretraining source and the fine-tuning data."""
    return {
        "pretrained": info,
        "finetuned_on": {"dataset": str(o["data"]), "classes": index.classes, "videos": len(index.records)},
        **({"pretrain_source": o["pretrain_source"]} if o.get("pretrain_source") else {}),
    }


# -- evaluate -------------------------------------------------------------------------
def resolve_model_path(model: str | Path) -> Path:
    """A model file, or a run folder holding ``model.safetensors``."""
    from vtransfer import runs

    path = Path(model)
    if path.is_dir():
        if not (path / runs.MODEL_FILE).is_file():
            raise ConfigError(f"{path} is a folder without {runs.MODEL_FILE}; give a model file or a finished run folder")
        return path / runs.MODEL_FILE
    return path


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
    from vtransfer import runs
    from vtransfer.data.scan import load_dataset, scan_dataset

    has_split_folders = data.is_dir() and any((data / s).is_dir() for s in ("train", "val", "test"))
    run_split = model_path.parent / runs.SPLIT_FILE
    if manifest is None and not has_split_folders and data.is_dir() and run_split.is_file():
        from vtransfer.data.splits import read_manifest

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


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    manifest: str | Path | None = None,
    split: str = "test",
    clips_per_video: int = 10,
    categories: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    precision: str = "fp32",
    device: str = "auto",
    threads: int | None = None,
    progress=None,
    on_selection=None,
):
    """Evaluate a saved model (a file or a run folder) on held-out videos, saying which.

    Which videos: see :func:`select_eval_records` (``split`` picks
    ``train``/``val``/``test`` or ``all``). ``on_selection(EvalSelection)`` is
    called before scoring (the CLI prints it). Writes ``report.json``,
    ``per_class.csv``, ``confusion.csv``, ``report.md``, plots and
    ``report.html`` into ``out`` when given, titled by run, policy and videos.
    Returns the :class:`~vtransfer.metrics.EvalResult`.
    """
    from vtransfer.report import write_eval_report
    from vtransfer.runtime import configure_threads, resolve_device
    from vtransfer.weights.checkpoint import model_from_checkpoint

    if split not in ("train", "val", "test", "all"):
        raise ConfigError(f"--split {split!r}: choose train, val, test or all")
    model_path = resolve_model_path(model)
    dev = resolve_device(device)
    configure_threads(threads)
    net, ckpt = model_from_checkpoint(model_path)
    net.to(dev)
    data = Path(data)
    chosen = select_eval_records(model_path, data, Path(manifest) if manifest else None, split)
    if not chosen.records:
        raise DatasetError(f"{data}: no videos in split {split!r}")
    if on_selection is not None:
        on_selection(chosen)
    _check_classes(ckpt.classes, sorted({r.label for r in chosen.records}), model_path)
    cats = load_categories_for(Path(categories), ckpt.classes) if categories else None
    opts = ClipOptions(clips_per_video=clips_per_video, batch_size=batch_size, workers=workers)
    result, preds = evaluate_records(net, chosen.records, ckpt.classes, opts, dev, precision, cats, progress=progress)
    if out is not None:
        policy = (ckpt.training or {}).get("policy", {}).get("policy")
        run = model_path.parent.name if model_path.name == "model.safetensors" else model_path.stem
        write_eval_report(result, Path(out), title=f"{run}{' / ' + policy if policy else ''}: {chosen.description}",
                          extra={"model": str(model_path), "data": str(data), "videos": chosen.description,
                                 **({"warning": chosen.warning} if chosen.warning else {}),
                                 "decode_errors": sorted({f'{p}: {r}' for p, r in preds.errors})})
    return result


# -- predict --------------------------------------------------------------------------
def predict(
    model: str | Path,
    videos: list[str | Path],
    *,
    top_k: int = 5,
    clips_per_video: int = 10,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each video, using the model's stored preprocessing and classes.

    A video that cannot be decoded gets ``{"path": ..., "error": reason}``.
    """
    from vtransfer.data.records import VideoRecord
    from vtransfer.errors import VideoDecodeError
    from vtransfer.data.decode import probe_video
    from vtransfer.metrics import aggregate_video_scores
    from vtransfer.batches import make_loader
    from vtransfer.inference import predict_clip_probs
    from vtransfer.runtime import resolve_device

    dev = resolve_device(device)
    from vtransfer.weights.checkpoint import model_from_checkpoint

    net, ckpt = model_from_checkpoint(Path(model))
    net.to(dev)
    out: list[dict[str, Any]] = []
    good: list[VideoRecord] = []
    for v in videos:
        try:
            probe_video(Path(v))
            good.append(VideoRecord(path=Path(v), label=ckpt.classes[0]))
        except VideoDecodeError as e:
            out.append({"path": str(v), "error": e.reason})
    if good:
        opts = ClipOptions(clips_per_video=clips_per_video, batch_size=batch_size, workers=0)
        ds = make_clip_dataset(good, {ckpt.classes[0]: 0}, net.preprocessing, "eval", opts, seed=0)
        preds = predict_clip_probs(net, make_loader(ds, batch_size, 0), dev, precision)
        scores = aggregate_video_scores(preds.probs, preds.video, len(good))
        failed = {p for p, _ in preds.errors}
        for i, rec in enumerate(good):
            if str(rec.path) in failed and not (preds.video == i).any():
                out.append({"path": str(rec.path), "error": "no clip could be decoded"})
                continue
            order = scores[i].argsort()[::-1][: max(1, top_k)]
            out.append({"path": str(rec.path), "top": [{"label": ckpt.classes[j], "prob": float(scores[i][j])} for j in order]})
    order_map = {str(v): i for i, v in enumerate(videos)}
    return sorted(out, key=lambda d: order_map.get(d["path"], 0))


# -- load_backbone --------------------------------------------------------------------
def load_backbone(name: str, weights: str | Path | None = None, num_classes: int | None = None, preset: str | None = None, **overrides):
    """A backbone in eval mode, optionally with weights (source name or file) and a new head."""
    from vtransfer.loading import load_backbone as _load

    return _load(name, weights=weights, num_classes=num_classes, preset=preset, **overrides)


# -- compare-policies -----------------------------------------------------------------
@dataclass
class CompareResult:
    """What :func:`compare_policies` produced: one row per policy (mean ± std over seeds)."""

    out_dir: Path
    rows: list[Any]
    skipped: dict[str, str]
    runs: dict[str, list[Path]]
    setup: dict[str, str] = field(default_factory=dict)  # backbone, architecture, input, parameters (see comparison_setup)


def compare_policies(
    data: str | Path,
    *,
    backbone: str = "i3d",
    policies: tuple[str, ...] | list[str] = ("scratch", "top-layer", "top-3", "temporal", "all"),
    seeds: tuple[int, ...] | list[int] = (0,),
    out: str | Path | None = None,
    overwrite: bool = False,
    categories: str | Path | None = None,
    manifest: str | Path | None = None,
    split_files: str | Path | None = None,
    split_seed: int = 0,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    group_pattern: str | None = None,
    reporter=None,
    on_policy=None,
    **finetune_options: Any,
) -> CompareResult:
    """Run each policy on the same split with the same seeds and epoch budget; one table.

    Every run lives in ``OUT/<policy>`` (``OUT/<policy>/seed-N`` for several
    seeds); the table is written as ``compare.json``/``.csv``/``.md``/``.html``
    plus a per-category bar chart. A policy that does not apply to the backbone
    (``temporal`` without temporal layers) is skipped and reported. Re-running
    with the same options reuses finished runs.
    """
    from vtransfer import runs
    from vtransfer.data.splits import write_manifest
    from vtransfer.report import PolicyRow, aggregate_seed_rows, write_policy_table
    from vtransfer.train import TrainingDiverged

    order, skipped = plan_comparison(list(policies), dict(backbone=backbone, **finetune_options))  # fail before work
    out_dir = Path(out) if out else _default_run_dir(f"compare-{backbone}")
    reuse = out_dir.exists() and (out_dir / runs.SPLIT_FILE).exists() and not overwrite
    if not reuse:
        out_dir = runs.prepare_run_dir(out_dir, overwrite=overwrite)
        index = open_dataset(DataOptions(Path(data), Path(manifest) if manifest else None,
                                         Path(split_files) if split_files else None, split_seed, tuple(ratios), group_pattern))
        write_manifest(out_dir / runs.SPLIT_FILE, index)
    split_manifest = out_dir / runs.SPLIT_FILE

    rows, run_dirs = [], {}
    for policy in order:
        per_seed = []
        for seed in seeds:
            sub = out_dir / policy if len(seeds) == 1 else out_dir / policy / f"seed-{seed}"
            if on_policy:
                on_policy(policy, seed)
            try:
                res = _finished_or_run(sub, reporter, dict(
                    data=data, backbone=backbone, policy=policy, seed=seed, categories=categories,
                    manifest=split_manifest, **finetune_options))
            except runs.RunInterrupted as e:
                raise runs.RunInterrupted(out_dir, e.epochs_done, e.epochs, command="compare-policies") from None
            except (ConfigError, TrainingDiverged) as e:
                skipped[policy] = str(e)
                break
            run_dirs.setdefault(policy, []).append(sub)
            per_seed.append(PolicyRow.from_eval(
                policy, seed, trainable_params=res.trainable_params, total_params=res.total_params,
                train_time_s=res.train_time_s, val_video_acc=res.best_val_video_acc, test=res.test, run_dir=sub))
        if per_seed and policy not in skipped:
            rows.append(aggregate_seed_rows(per_seed))
    rows.sort(key=lambda r: list(policies).index(r.policy))  # the table keeps the order asked for
    setup = comparison_setup(run_dirs)
    if rows:
        write_policy_table(rows, out_dir, extra=setup)
    runs.write_json(out_dir / "skipped.json", skipped)
    return CompareResult(out_dir, rows, skipped, run_dirs, setup)


def _short(value: Any) -> str:
    """A config value for one line of a table (nested settings are counted, not spelled out)."""
    if isinstance(value, dict):
        return f"<{len(value)} settings>"
    return str(value)


def comparison_setup(run_dirs: dict[str, list[Path]]) -> dict[str, str]:
    """What every row of a comparison trained: backbone, architecture, input geometry, parameters, weights.

    Read back from each run's ``config.json``. Rows must share one
    architecture and geometry; if any differs (runs reused from an older
    comparison), an ``"architecture mismatch"`` entry names the rows.
    """
    from vtransfer import runs

    seen: dict[str, list[str]] = {}
    setup: dict[str, str] = {}
    weights = set()
    epochs: dict[str, list[str]] = {}
    for policy, dirs in run_dirs.items():
        for d in dirs:
            try:
                resolved = runs.read_json(d / runs.CONFIG_FILE)["resolved"]
            except (OSError, KeyError, ValueError):
                continue
            arch = resolved.get("architecture")
            pre = resolved.get("preprocessing", {})
            crop = pre.get("crop_size") or ["?", "?"]
            described = {
                "backbone": str(resolved.get("weights", {}).get("backbone", "?")),
                "architecture": ", ".join(f"{k}={_short(v)}" for k, v in sorted((arch or {}).items())
                                          if k not in ("num_classes", "dropout")) or "(not recorded)",
                "input": f"{pre.get('frames')} frames, stride {pre.get('stride')}, {crop[0]}x{crop[1]} crop of a "
                         f"{pre.get('resize_short')} px short side",
                "parameters": f"{int(resolved.get('total_params', 0)):,}",
            }
            key = repr(sorted(described.items()))
            epochs.setdefault(str(resolved.get("train", {}).get("epochs", "?")), []).append(policy)
            seen.setdefault(key, []).append(f"{policy}" if len(dirs) == 1 else f"{policy}/{d.name}")
            setup = setup or described
            if policy != "scratch":
                weights.add(str(resolved.get("weights", {}).get("weights")))
    if weights:
        setup["pretrained weights"] = ", ".join(sorted(weights))
    if epochs:
        setup["epochs"] = "; ".join(f"{n} ({', '.join(dict.fromkeys(ps))})" for n, ps in epochs.items()) if len(epochs) > 1 else next(iter(epochs))
    if len(seen) > 1:
        setup["architecture mismatch"] = "; ".join(", ".join(rows) for rows in seen.values())
    return setup


def plan_comparison(policies: list[str], options: dict) -> tuple[list[str], dict[str, str]]:
    """Check a comparison before any data is decoded; return the order to run it in and the skipped policies.

    Unknown policy names, weights that do not fit the backbone, a preset a
    checkpoint contradicts: all raise here, naming the valid choices, instead
    of after minutes of training. A policy that does not apply to this model
    (``temporal`` without temporal layers) is returned in ``skipped`` with the
    reason. The rest are ordered by :func:`shallow_prefixes_first`.
    """
    from vtransfer.policies import POLICY_NAMES, resolve_policy

    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ConfigError(f"--policies: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(POLICY_NAMES)}")
    if not policies:
        raise ConfigError(f"--policies: give at least one of {', '.join(POLICY_NAMES)}")
    model, _ = build_run_model({**options, "policy": "top-layer"}, num_classes=2)
    depth, skipped = {}, {}
    for p in policies:
        try:
            depth[p] = resolve_policy(model, p, options.get("train_groups")).first_trainable_group
        except ConfigError as e:
            skipped[p] = str(e)
    runnable = [p for p in policies if p in depth]
    return shallow_prefixes_first(runnable, depth), skipped


def shallow_prefixes_first(policies: list[str], depth: dict[str, int]) -> list[str]:
    """The order to run ``policies`` in so that shared feature caches are reused, not recomputed.

    ``depth`` is each policy's first trainable group. A frozen-prefix feature
    store can be extended to a deeper prefix by running only the groups in
    between, never cut back to a shallower one, so the policies with a frozen
    prefix run shallowest first (``top-3`` before ``top-layer``), each taking
    the place of one of them in the list; policies without a frozen prefix
    keep their places.
    """
    cached = iter(sorted((p for p in policies if depth[p] > 0), key=lambda p: depth[p]))
    return [next(cached) if depth[p] > 0 else p for p in policies]


def _finished_or_run(run_dir: Path, reporter, options: dict) -> FinetuneResult:
    """Reuse a finished run with identical options, else (re)run it."""
    from vtransfer import runs

    options = _with_policy_epochs(options)  # compare as finetune will record it
    report_file = run_dir / "report" / "report.json"
    same_options = False
    if (run_dir / runs.CONFIG_FILE).exists():
        saved = runs.read_json(run_dir / runs.CONFIG_FILE)
        wanted = _jsonable({**saved["options"], **options, "out": str(run_dir)})
        same_options = _jsonable(saved["options"]) == wanted
    if same_options and not report_file.exists():
        return finetune(resume=run_dir, reporter=reporter)  # a sub-run that was stopped: continue it
    if same_options:
        from vtransfer.metrics import EvalResult

        report = runs.read_json(report_file)
        history = runs.read_metrics(run_dir)
        res = saved["resolved"]
        return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, report, history, res["trainable_params"],
                              res["total_params"], sum(h["time_s"] for h in history),
                              max((h["val_video_acc"] for h in history), default=0.0), res["policy"],
                              test=EvalResult.from_dict(report))
    return finetune(reporter=reporter, out=run_dir, overwrite=True, **options)


# -- pretrain -------------------------------------------------------------------------
def pretrain(
    source: str | Path,
    *,
    backbone: str = "i3d",
    name: str | None = None,
    register: bool = True,
    policy: str = "scratch",
    **finetune_options: Any,
) -> FinetuneResult:
    """Train a backbone on a source dataset and save it as a weight source.

    The checkpoint records the source dataset's name, classes and size, so a
    later ``finetune --weights RUN/model.safetensors`` names what it was
    pretrained on. With ``register`` the file is also registered under
    ``name`` (default ``<backbone>:<dataset folder name>``) for ``vtransfer weights list``.
    """
    from vtransfer.data.scan import load_dataset

    source = Path(source)
    name = name or f"{backbone}:{source.name}"
    if register:  # a name that cannot be registered fails now, not after the training
        from vtransfer.weights.sources import check_source_name

        check_source_name(name)
    idx = load_dataset(source) if source.is_dir() else None
    info = {"name": name, "dataset": source.name, "path": str(source.resolve()),
            "classes": idx.classes if idx else [], "videos": len(idx.records) if idx else 0}
    res = finetune(source, backbone=backbone, policy=policy, pretrain_source=info, **finetune_options)
    if register and res.report:
        from vtransfer.weights.sources import register_source

        register_source(res.model_path, name)
    return res
