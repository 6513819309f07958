"""The Python API: every command of the CLI is one function here.

::

    import vtransfer
    res = vtransfer.finetune("data/", backbone="vivit", preset="tiny", policy="temporal", out="runs/a")
    rep = vtransfer.evaluate("runs/a/model.safetensors", "data/", manifest="runs/a/split.csv")
    tab = vtransfer.compare_policies("data/", backbone="i3d", weights="pretrained.safetensors")

This module is the façade: it handles run folders, interrupts and argument
checking, and hands the work to :mod:`vtransfer.workflows.pipeline` (one fine-tuning
run), :mod:`vtransfer.workflows.compare` (several policies), :mod:`vtransfer.workflows.scoring`
(scoring) and :mod:`vtransfer.workflows.run_model` (the starting model). A run's options
are declared once, in :mod:`vtransfer.run_config`; :func:`finetune`'s keyword
arguments are generated from there.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from vtransfer.data.clips import adapt_preprocessing, make_clip_dataset, shared_reader
from vtransfer.data.decode import probe_video
from vtransfer.data.records import VideoRecord
from vtransfer.data.run_data import load_categories_for, open_dataset
from vtransfer.data.scan import load_dataset
from vtransfer.engine.batches import make_loader
from vtransfer.engine.inference import predict_clip_probs
from vtransfer.evaluation.calibration import scaled
from vtransfer.evaluation.metrics import aggregate_video_scores
from vtransfer.loading.backbone import check_weights_stream
from vtransfer.loading.backbone import load_backbone as _load
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.loading.sources import check_source_name, register_source
from vtransfer.models.registry import check_stream
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.reporting.report import write_eval_report
from vtransfer.run_config import DEFAULT_POLICY, ClipConfig, DataConfig, RunConfig, check_training, run_parameters
from vtransfer.utils import distributed
from vtransfer.utils.allocator import tune_malloc
from vtransfer.utils.errors import ConfigError, DatasetError, VideoDecodeError
from vtransfer.utils.interrupts import catch_sigint
from vtransfer.utils.runtime import configure_threads, resolve_device
from vtransfer.workflows import runs
from vtransfer.workflows.auto_policy import AUTO, choose_policy, describe, write_choice
from vtransfer.workflows.compare import CompareResult, comparison_setup, plan_comparison, shallow_prefixes_first
from vtransfer.workflows.compare import compare_policies as _compare
from vtransfer.workflows.explain import ExplainReport
from vtransfer.workflows.explain import explain as _explain
from vtransfer.workflows.pipeline import FinetuneResult
from vtransfer.workflows.run_model import build_run_model, geometry_overrides
from vtransfer.workflows.scoring import (
    EvalSelection,
    check_classes,
    evaluate_records,
    resolve_model_path,
    select_eval_records,
)
from vtransfer.workflows.shots import parse_shots
from vtransfer.workflows.two_stream import run_any

# The API gets what the CLI gets: large tensors reuse the process's freed memory instead of fresh, zero-filled
# mappings (half of a run's CPU time otherwise; VTRANSFER_MALLOC=default opts out). Once per process, never raises.
tune_malloc()

# The names the sections had before the typed configuration (kept for callers of the Python API).
DataOptions = DataConfig
ClipOptions = ClipConfig

__all__ = [
    "finetune", "evaluate", "predict", "load_backbone", "compare_policies", "pretrain", "RunConfig", "FinetuneResult",
    "CompareResult", "EvalSelection", "DEFAULT_POLICY", "DataOptions", "ClipOptions", "adapt_preprocessing",
    "make_clip_dataset", "shared_reader", "comparison_setup", "plan_comparison", "shallow_prefixes_first",
    "load_categories_for", "open_dataset", "evaluate_records", "resolve_model_path", "select_eval_records",
    "build_run_model", "geometry_overrides", "explain", "ExplainReport",
]


# -- finetune -------------------------------------------------------------------------
def finetune(
    data: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    reporter=None,
    stop_after_epochs: int | None = None,
    config: RunConfig | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune ``backbone`` on the videos in ``data`` under a freezing ``policy``.

    The run's options come as keywords (every field of
    :class:`~vtransfer.run_config.RunConfig`: ``backbone``, ``policy``,
    ``epochs``, ``lr``, ... with the defaults ``vtransfer finetune --help``
    shows) or as a whole ``config``, which keywords then override. Writes a
    run folder (``out``): ``config.json``, ``split.csv``, ``metrics.jsonl``,
    ``model.safetensors`` (best validation epoch) and a test-set report under
    ``report/``. ``resume=RUN_DIR`` continues a stopped run with the options it
    was started with (``data`` then comes from its ``config.json`` and may be
    omitted).
    """

    cfg = (config or RunConfig()).replace(**options) if options else (config or RunConfig())
    if data is not None:
        cfg = cfg.replace(data=data)
    check_training(cfg.training, cfg.clips)  # out-of-range options fail before a run folder exists
    check_stream(cfg.model.backbone, cfg.clips.stream)
    check_weights_stream(cfg.model.weights, cfg.clips.stream, cfg.model.flow_weights, cfg.clips.flow_channels)
    ctx = distributed.init_from_env(resolve_device(cfg.runtime.device))
    if resume is not None:
        run_dir = runs.prepare_run_dir(Path(resume), resume=True) if ctx.is_main else Path(resume)
        existed = True
        distributed.barrier()
        cfg = RunConfig.from_json(runs.read_json(run_dir / runs.CONFIG_FILE))
    else:
        if cfg.data.data is None:
            raise ConfigError("finetune: give the dataset folder (or resume=RUN_DIR to continue a stopped run)")
        run_dir = Path(cfg.out) if cfg.out else Path(distributed.broadcast_object(
            str(runs.default_run_dir(f"{cfg.model.backbone}-{cfg.policy.policy}"))))
        existed = run_dir.exists()
        if ctx.is_main:
            runs.prepare_run_dir(run_dir, overwrite=overwrite)
        distributed.barrier()
    cfg = cfg.replace(out=str(run_dir))
    with catch_sigint() as sigint:
        try:
            if cfg.policy.policy == AUTO and resume is None:
                cfg = _choose_policy(run_dir, cfg, reporter)
            cfg = cfg.with_policy_epochs()  # a run's config.json records the number
            return run_any(run_dir, cfg, resume is not None, reporter=reporter, stop_after=stop_after_epochs)
        except (KeyboardInterrupt, RuntimeError) as e:
            # Ctrl-C anywhere (cache filling, an epoch, the final test) leaves the saved epochs resumable.
            # Ctrl-C also reaches DataLoader workers; one that dies of it surfaces here as a RuntimeError.
            if isinstance(e, RuntimeError) and not sigint.received.is_set():
                _discard_if_failed_early(run_dir, resume, existed, ctx)
                raise
            done = len(runs.read_metrics(run_dir))
            raise runs.RunInterrupted(run_dir, done, int(cfg.with_policy_epochs().training.epochs)) from None
        except runs.RunInterrupted:
            raise  # stopped on purpose: the folder stays resumable
        except Exception:
            _discard_if_failed_early(run_dir, resume, existed, ctx)
            raise


def _choose_policy(run_dir: Path, cfg: RunConfig, reporter) -> RunConfig:
    """``--policy auto``: run the trials (:mod:`vtransfer.workflows.auto_policy`), say what won and why; the winner's configuration."""

    t0 = time.perf_counter()
    winner, trials, why = choose_policy(run_dir, cfg, reporter)
    write_choice(run_dir, winner, trials, why, time.perf_counter() - t0)
    if reporter is not None:
        for line in ["auto: tried", *describe(trials), f"auto: {why}; training {winner.label} in full"]:
            reporter.message(line)
    stream = {"stream": winner.stream, "fusion_weight": None, "fusion_rule": None} if winner.stream != cfg.clips.stream else {}
    return cfg.replace(policy=winner.policy, merge=cfg.policy.merge and winner.policy == "lora", **stream)


def _with_generated_signature(fn, exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None):
    """Give ``fn`` (whose run options arrive as ``**options``) a signature that lists every run option by name."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own}
    generated = [p for p in run_parameters(exclude=exclude, defaults=defaults) if p.name not in taken]
    fn.__signature__ = inspect.Signature([*own, *generated])
    return fn


_with_generated_signature(finetune, exclude=("data",))


def _discard_if_failed_early(run_dir: Path, resume, existed: bool, ctx) -> None:
    """A new run that failed before its first finished epoch leaves nothing in the way of its corrected rerun."""

    if resume is None and ctx.is_main:
        runs.discard_failed_run(run_dir, existed)


# -- evaluate -------------------------------------------------------------------------
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
    test_crops: int = 1,
    calibrated: bool = True,
):
    """Evaluate a saved model (a file or a run folder) on held-out videos, saying which.

    Which videos: see :func:`select_eval_records` (``split`` picks
    ``train``/``val``/``test`` or ``all``). ``on_selection(EvalSelection)`` is
    called before scoring (the CLI prints it). Writes ``report.json``,
    ``per_class.csv``, ``confusion.csv``, ``report.md``, plots and
    ``report.html`` into ``out`` when given, titled by run, policy and videos.
    ``test_crops`` spatial crops per clip (1 or 3); ``calibrated`` applies the
    temperature a ``--calibrate`` run stored in the model.
    Returns the :class:`~vtransfer.evaluation.metrics.EvalResult`.
    """

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
    check_classes(ckpt.classes, sorted({r.label for r in chosen.records}), model_path)
    cats = load_categories_for(Path(categories), ckpt.classes) if categories else None
    opts = ClipConfig(clips_per_video=clips_per_video, batch_size=batch_size, workers=workers)
    result, preds = evaluate_records(net, chosen.records, ckpt.classes, opts, dev, precision, cats, progress=progress,
                                     crops=test_crops, temperature=ckpt.temperature if calibrated else None)
    if out is not None:
        policy = (ckpt.training or {}).get("policy", {}).get("policy")
        run = model_path.parent.name if model_path.name == "model.safetensors" else model_path.stem
        write_eval_report(result, Path(out), title=f"{run}{' / ' + policy if policy else ''}: {chosen.description}",
                          extra={"model": str(model_path), "input": net.preprocessing.describe(), "data": str(data),
                                 "videos": chosen.description,
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
    test_crops: int = 1,
    calibrated: bool = True,
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each video, using the model's stored preprocessing and classes.

    ``test_crops`` spatial crops per clip (1 or 3); ``calibrated`` scales the
    clip scores by the temperature a ``--calibrate`` run stored in the model.
    A video that cannot be decoded gets ``{"path": ..., "error": reason}``.
    """

    dev = resolve_device(device)

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
        opts = ClipConfig(clips_per_video=clips_per_video, batch_size=batch_size, workers=0)
        ds = make_clip_dataset(good, {ckpt.classes[0]: 0}, net.preprocessing, "eval", opts, seed=0, crops=test_crops)
        preds = predict_clip_probs(net, make_loader(ds, batch_size, 0), dev, precision)
        if calibrated:

            preds = scaled(preds, ckpt.temperature)
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


# -- explain --------------------------------------------------------------------------
def explain(
    model: str | Path,
    videos: list[str | Path],
    *,
    out: str | Path = "explain",
    clips: int = 1,
    target: str | None = None,
    gif: bool = True,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    on_video=None,
) -> ExplainReport:
    """Where the model looks in each video, and when: Grad-CAM and per-frame occlusion, written to ``out``.

    Per video ``out/<name>.gif`` (the heat map over the clip's frames) and
    ``out/<name>.png`` (8 frames with the map over a bar of each frame's
    importance); ``out/explain.json`` has the predicted class, its score, the
    method, the temporal importance per frame and where the map's mass lies.
    ``clips`` clips are scored per video and the one that speaks most for the
    class is explained; ``target`` explains that class instead of the
    predicted one. A video that cannot be decoded is skipped with its reason.
    See :mod:`vtransfer.workflows.explain`.
    """

    dev = resolve_device(device)
    configure_threads(threads)
    return _explain(model, videos, out, clips=clips, target=target, gif=gif, device=dev, overwrite=overwrite,
                    on_video=on_video)


# -- load_backbone --------------------------------------------------------------------
def load_backbone(name: str, weights: str | Path | None = None, num_classes: int | None = None, preset: str | None = None, **overrides):
    """A backbone in eval mode, optionally with weights (source name or file) and a new head."""

    return _load(name, weights=weights, num_classes=num_classes, preset=preset, **overrides)


# -- compare-policies -----------------------------------------------------------------
def compare_policies(
    data: str | Path,
    *,
    policies: tuple[str, ...] | list[str] = FREEZING_POLICY_NAMES,
    seeds: tuple[int, ...] | list[int] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    reporter=None,
    on_policy=None,
    shots: str | list | None = None,
    **options: Any,
) -> CompareResult:
    """Run each policy on the same split with the same seeds and epoch budget; one table.

    ``options`` are :func:`finetune`'s run options (``seed=N`` means
    ``seeds=(N,)``); ``shots="1,2,5,all"`` adds a few-shot learning curve.
    See :func:`vtransfer.workflows.compare.compare_policies`.
    """

    return _compare(data, policies=policies, seeds=seeds, out=out, overwrite=overwrite, reporter=reporter,
                    on_policy=on_policy, shots=parse_shots(shots) if shots is not None else None, finetune=finetune,
                    **options)


_with_generated_signature(compare_policies, exclude=("data", "policy", "out", "pretrain_source"), defaults={"seed": None})


# -- pretrain -------------------------------------------------------------------------
def pretrain(
    source: str | Path,
    *,
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
    ``finetune_options`` are :func:`finetune`'s run options.
    """

    source = Path(source)
    backbone = finetune_options.setdefault("backbone", RunConfig().model.backbone)
    name = name or f"{backbone}:{source.name}"
    if register:  # a name that cannot be registered fails now, not after the training

        check_source_name(name)
    idx = load_dataset(source) if source.is_dir() else None
    info = {"name": name, "dataset": source.name, "path": str(source.resolve()),
            "classes": idx.classes if idx else [], "videos": len(idx.records) if idx else 0}
    res = finetune(source, policy=policy, pretrain_source=info, **finetune_options)
    if register and res.report:

        register_source(res.model_path, name)
    return res


_with_generated_signature(pretrain, exclude=("data", "policy", "train_groups", "pretrain_source"))
