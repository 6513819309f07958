"""``--stream two-stream``: an RGB and a flow network trained under one policy, fused late, saved as one model.

The run folder holds the two one-stream runs and what joins them::

    RUN/split.csv            the split both streams train and test on
    RUN/config.json          the options as given (``--stream two-stream``)
    RUN/rgb/, RUN/flow/      each a complete one-stream run (config, metrics, model, resume state)
    RUN/fusion.json          the flow weight, and the validation accuracy of every weight tried
    RUN/model.safetensors    both streams and the weight, one model (:mod:`vtransfer.models.two_stream`)
    RUN/report/              the fused model on the test split, with each stream's accuracy beside it

Each stream trains exactly as ``--stream rgb`` or ``--stream flow`` would
(its frozen-prefix feature cache included); ``--resume RUN`` resumes
whichever stream stopped. Each stream's probabilities are first
calibrated on the validation split (a temperature each, unless the stream
was trained with ``--calibrate`` and has its own), so that a stream sure of
what it cannot see does not outvote the other. The weight is fixed by
``--fusion-weight`` or chosen on the validation split
(:mod:`vtransfer.evaluation.fusion`); the test split is scored once, by both
streams, and fused with that weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vtransfer.data.clips import shared_reader
from vtransfer.data.flow_settings import DEFAULT_FUSION_RULE
from vtransfer.data.run_data import load_categories_for, open_dataset
from vtransfer.data.splits import read_manifest, write_manifest
from vtransfer.engine.inference import ClipPredictions
from vtransfer.evaluation.calibration import calibrate_on_validation, scaled
from vtransfer.evaluation.fusion import FusionChoice, choose_fusion_weight, fuse_probabilities, paired_clips
from vtransfer.evaluation.metrics import EvalResult, classification_report
from vtransfer.loading.backbone import stream_weights
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.registry import preferred_memory_format
from vtransfer.models.two_stream import STREAM_NAMES, TwoStreamBackbone
from vtransfer.reporting.report import write_eval_report
from vtransfer.run_config import RunConfig, check_training
from vtransfer.utils.errors import DatasetError
from vtransfer.utils.phase_times import PhaseTimes, phase, recording
from vtransfer.utils.runtime import resolve_device
from vtransfer.weights.checkpoint import save_checkpoint
from vtransfer.workflows import runs
from vtransfer.workflows.pipeline import FinetuneResult, record_times, run_finetune
from vtransfer.workflows.report_videos import GALLERY_NOTE, gallery_or_warning
from vtransfer.workflows.scoring import evaluate_records, video_name

FUSION_FILE = "fusion.json"


@dataclass
class StreamScores:
    """One stream's best model and its clip predictions on the validation and test videos."""

    name: str
    result: FinetuneResult
    val: ClipPredictions
    test: ClipPredictions
    test_result: EvalResult
    temperature: float | None


def stream_config(cfg: RunConfig, run_dir: Path, stream: str) -> RunConfig:
    """The one-stream run ``stream`` of two-stream run ``cfg``: its weights, the shared split, its own folder."""
    rgb_weights, flow_weights = stream_weights(cfg.model.weights, cfg.model.flow_weights)
    return cfg.replace(stream=stream, fusion_weight=None, fusion_rule=None, flow_weights=None,
                       weights=rgb_weights if stream == "rgb" else flow_weights,
                       manifest=str(run_dir / runs.SPLIT_FILE), split_files=None, out=str(run_dir / stream))


def run_any(run_dir: Path, cfg: RunConfig, resume: bool, reporter=None, stop_after: int | None = None,
            test: bool = True) -> FinetuneResult:
    """:func:`run_two_stream` for ``--stream two-stream``, else :func:`~vtransfer.workflows.pipeline.run_finetune`."""
    if cfg.clips.stream == "two-stream":
        return run_two_stream(run_dir, cfg, resume, reporter, stop_after, test)
    return run_finetune(run_dir, cfg, resume, reporter=reporter, stop_after=stop_after, test=test)


def run_two_stream(run_dir: Path, cfg: RunConfig, resume: bool, reporter=None, stop_after: int | None = None,
                   test: bool = True) -> FinetuneResult:
    """Train the RGB then the flow stream (each resumable), choose the fusion weight, save one model, test it.

    ``stop_after`` stops each stream after that many epochs (resumable);
    ``test=False`` returns after the weight is chosen, with the fused
    validation accuracy as ``best_val_video_acc`` (a ``--policy auto`` trial).
    """
    check_training(cfg.training, cfg.clips)
    _say = reporter.message if reporter is not None else (lambda text: None)
    with recording() as times:  # both streams' phases, and the fusion's
        if not resume:
            index = open_dataset(cfg.data)
            if not index.split("train"):
                raise DatasetError(f"{cfg.data.data}: the train split is empty")
            write_manifest(run_dir / runs.SPLIT_FILE, index)
            runs.write_json(run_dir / runs.CONFIG_FILE,
                            {"options": cfg.to_json(), "resolved": {"streams": list(STREAM_NAMES)}})
        results = {}
        for name in STREAM_NAMES:
            sub_cfg = stream_config(cfg, run_dir, name)
            sub = Path(sub_cfg.out)
            sub_resume = resume and (sub / runs.CONFIG_FILE).is_file()
            if not sub_resume:
                runs.prepare_run_dir(sub, overwrite=True)
            _say(f"two-stream: the {name} stream ({sub})")
            results[name] = run_finetune(sub, sub_cfg, sub_resume, reporter=reporter, stop_after=stop_after, test=False)
            if not results[name].finished:
                return _unfinished(run_dir, results)
        return _fuse(run_dir, cfg, results, reporter, test, times)


def _unfinished(run_dir: Path, results: dict[str, FinetuneResult]) -> FinetuneResult:
    """A stream stopped on purpose: the run is resumable and has no fused model or report yet."""
    history = [h for r in results.values() for h in r.history]
    return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, {}, history,
                          sum(r.trainable_params for r in results.values()), sum(r.total_params for r in results.values()),
                          sum(h["time_s"] for h in history), 0.0, next(iter(results.values())).plan, finished=False)


def _fuse(run_dir: Path, cfg: RunConfig, results: dict[str, FinetuneResult], reporter, test: bool,
          times: PhaseTimes) -> FinetuneResult:
    """Score both streams' best models on validation and test; choose the weight; save the fused model and report."""
    index = read_manifest(run_dir / runs.SPLIT_FILE)
    val, test_records = index.split("val") or index.split("train"), index.split("test") or index.split("val")
    classes = index.classes
    device = resolve_device(cfg.runtime.device)
    if reporter is not None and hasattr(reporter, "stage"):
        reporter.stage("two-stream: scoring both streams to choose the fusion weight")
    scores, nets = {}, {}
    with phase("scoring"):
        for name in STREAM_NAMES:
            scores[name], nets[name] = _score_stream(name, results[name], cfg, run_dir, val,
                                                     test_records if test else [], classes, device)
    rgb_val, flow_val = scores["rgb"].val, scores["flow"].val
    rows_r, rows_f = paired_clips(rgb_val.video, flow_val.video)
    labels = [index.class_to_idx[r.label] for r in val]
    rule = cfg.clips.fusion_rule or DEFAULT_FUSION_RULE
    if cfg.clips.fusion_weight is not None:
        choice = FusionChoice(float(cfg.clips.fusion_weight), {}, chosen_on="--fusion-weight", rule=rule)
    else:
        choice = _choose(rgb_val, flow_val, rows_r, rows_f, labels, rule)
    fused_val = _fused_accuracy(rgb_val, flow_val, rows_r, rows_f, labels, choice.weight, rule)
    runs.write_json(run_dir / FUSION_FILE, {**choice.to_dict(), "fused_val_video_acc": fused_val,
                                             "streams_val_video_acc": {n: results[n].best_val_video_acc for n in STREAM_NAMES}})
    if reporter is not None:
        tried = ", ".join(f"{w:.1f}: {a:.0%}" for w, a in choice.accuracies.items())
        reporter.message(f"two-stream: flow weight {choice.weight:.1f}, {rule} of the probabilities ({choice.chosen_on}"
                         + (f"; validation accuracy by weight {tried}" if tried else "") + ")")
    model = TwoStreamBackbone(nets["rgb"], nets["flow"], choice.weight,
                              temperatures=(scores["rgb"].temperature, scores["flow"].temperature), fusion_rule=rule)
    _save(run_dir, model, classes, results, choice, fused_val)
    rgb_res = results["rgb"]
    combined = replace(rgb_res, run_dir=run_dir, model_path=run_dir / runs.MODEL_FILE,
                       history=[h for n in STREAM_NAMES for h in results[n].history],
                       trainable_params=sum(results[n].trainable_params for n in STREAM_NAMES),
                       total_params=sum(results[n].total_params for n in STREAM_NAMES),
                       train_time_s=sum(results[n].train_time_s for n in STREAM_NAMES), best_val_video_acc=fused_val,
                       streams=results, fusion_weight=choice.weight)
    if not test:
        return combined
    fused = _fused_test(scores, test_records, classes, cfg, choice.weight, rule)
    streams = {n: replace(results[n], report=scores[n].test_result.to_dict(), test=scores[n].test_result)
               for n in STREAM_NAMES}
    with phase("report videos"):
        gallery = _draw_videos(model.to(device), fused, test_records, classes, run_dir, cfg, reporter)
    _write_reports(run_dir, cfg, model, fused, streams, choice, gallery, times, reporter)
    return replace(combined, report=fused.to_dict(), test=fused, streams=streams, fusion_weight=choice.weight)


def _score_stream(name: str, result: FinetuneResult, cfg: RunConfig, run_dir: Path, val, test_records, classes, device):
    """One stream's best model and its clip predictions on ``val`` and ``test_records`` (frozen prefix computed once)."""
    sub = run_dir / name
    net, ckpt = model_from_checkpoint(sub / runs.MODEL_FILE)
    precision = cfg.training.precision
    net.to(device, memory_format=preferred_memory_format(cfg.model.backbone, precision, device))
    clips = cfg.clips
    cache_dir = Path(clips.cache_dir) if clips.cache_dir else sub / "frame_cache"
    reader = shared_reader(clips.cache, cache_dir, [*val, *test_records], net.preprocessing, cache_format=clips.cache_format)
    prefix = int((result.plan or {}).get("first_trainable_group") or 0)
    categories = load_categories_for(cfg.data.categories, classes)
    _, val_preds = evaluate_records(net, val, classes, clips, device, precision, clips=clips.val_clips, reader=reader,
                                    prefix_stop=prefix)
    test_result, test_preds = (None, ClipPredictions(np.zeros((0, len(classes)), np.float32), np.zeros(0, np.int64)))
    if test_records:
        test_result, test_preds = evaluate_records(net, test_records, classes, clips, device, precision, categories,
                                                   reader=reader, prefix_stop=prefix, crops=clips.test_crops,
                                                   temperature=ckpt.temperature)
    net.cpu()
    t = ckpt.temperature if ckpt.temperature is not None else _fusion_temperature(val_preds, val, classes)
    # fused as the saved model fuses: each stream's probabilities at its temperature
    return StreamScores(name, result, scaled(val_preds, t), scaled(test_preds, t), test_result, t), net


def _fusion_temperature(val_preds: ClipPredictions, val, classes) -> float | None:
    """The temperature that calibrates a stream on the validation videos (``None`` without usable predictions).

    Averaging probabilities trusts each stream as far as it is sure; a stream
    trained to certainty on its training clips is sure even where it cannot
    see (RGB on classes that differ only by motion), and would outvote the
    stream that can. Calibrated, its wrong answers carry the weight they earned.
    """
    class_to_idx = {c: i for i, c in enumerate(classes)}
    try:
        fit = calibrate_on_validation(val_preds, [class_to_idx[r.label] for r in val])
    except ValueError:
        return None
    return fit.temperature  # at an end of the searched range too: a bounded softening beats none


def _choose(rgb: ClipPredictions, flow: ClipPredictions, rows_r, rows_f, labels, rule: str) -> FusionChoice:
    """The validation-chosen weight over the videos both streams scored, fusing by ``rule``."""
    if not len(rows_r):
        raise DatasetError("two-stream: no validation video was scored by both streams; cannot choose a fusion weight")
    video, kept_labels = _renumbered(rgb.video[rows_r], labels)
    return choose_fusion_weight(_probs(rgb, rows_r), _probs(flow, rows_f), video, kept_labels, rule=rule)


def _probs(preds: ClipPredictions, rows) -> np.ndarray:
    """The clip probabilities of ``rows`` (each stream's temperature already applied)."""
    return preds.probs[rows]


def _renumbered(video: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """Video indices renumbered 0..k-1 over the videos present, and those videos' labels."""
    present, video = np.unique(video, return_inverse=True)
    return video, np.asarray(labels)[present]


def _fused_accuracy(rgb: ClipPredictions, flow: ClipPredictions, rows_r, rows_f, labels, weight: float,
                    rule: str) -> float:
    """Fused video accuracy at ``weight`` (by ``rule``) over the videos both streams scored."""
    if not len(rows_r):
        return 0.0
    video, kept = _renumbered(rgb.video[rows_r], labels)
    return choose_fusion_weight(_probs(rgb, rows_r), _probs(flow, rows_f), video, kept, grid=(weight,),
                                rule=rule).accuracies[weight]


def fuse_predictions(rgb: ClipPredictions, flow: ClipPredictions, weight: float, rule: str = "mean") -> ClipPredictions:
    """The fused clip predictions of the videos both streams scored; the others keep their errors, or say why."""
    rows_r, rows_f = paired_clips(rgb.video, flow.video)
    probs = fuse_probabilities(rgb.probs[rows_r], flow.probs[rows_f], weight, rule).astype(np.float32)
    return ClipPredictions(probs, rgb.video[rows_r], list(dict.fromkeys([*rgb.errors, *flow.errors])))


def _fused_test(scores: dict[str, StreamScores], records, classes, cfg: RunConfig, weight: float,
                rule: str) -> EvalResult:
    """The fused model's test result, from the two streams' clip predictions (what the saved model computes)."""
    fused = fuse_predictions(scores["rgb"].test, scores["flow"].test, weight, rule)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    return classification_report(
        fused.probs, fused.video, [class_to_idx[r.label] for r in records], classes,
        load_categories_for(cfg.data.categories, classes), video_names=[video_name(r.path) for r in records],
        views={"clips": cfg.clips.clips_per_video, "crops": cfg.clips.test_crops})


def _save(run_dir: Path, model: TwoStreamBackbone, classes, results, choice: FusionChoice, fused_val: float) -> None:
    """``RUN/model.safetensors``: both streams and the weight, with each stream's training summary."""
    summaries = {}
    for name in STREAM_NAMES:
        meta = runs.read_json(run_dir / name / runs.CONFIG_FILE)["resolved"]
        summaries[name] = {"policy": results[name].plan, "val_video_acc": results[name].best_val_video_acc,
                           "weights": meta.get("weights", {}), "run": name}
    save_checkpoint(run_dir / runs.MODEL_FILE, model, classes=classes,
                    source={"streams": {n: s["weights"] for n, s in summaries.items()}},
                    training={"policy": results["rgb"].plan, "fusion": choice.to_dict(), "val_video_acc": fused_val,
                              "streams": summaries})


def _draw_videos(model: TwoStreamBackbone, fused: EvalResult, records, classes, run_dir: Path, cfg: RunConfig,
                 reporter) -> list:
    """The fused report's gallery: the test videos drawn with each stream's map (see :mod:`.report_videos`)."""
    warn = reporter.message if reporter is not None else (lambda text: None)
    return gallery_or_warning(model, fused, records, classes, run_dir / "report", cfg.runtime.report_videos, warn)


def _write_reports(run_dir: Path, cfg: RunConfig, model: TwoStreamBackbone, fused: EvalResult,
                   streams: dict[str, FinetuneResult], choice: FusionChoice, gallery: list, times: PhaseTimes,
                   reporter) -> None:
    """The fused test report in ``RUN/report`` (with where the time went); each stream's in ``RUN/<stream>/report``."""
    policy = cfg.policy.policy
    for name, result in streams.items():
        write_eval_report(result.test, run_dir / name / "report",
                          title=f"{cfg.model.backbone} / {policy} / {name} stream — test split",
                          extra={"run": str(run_dir / name), "input": model.stream(name).preprocessing.describe(),
                                 "policy": policy, "trainable_params": result.trainable_params,
                                 "total_params": result.total_params, "train_time_s": result.train_time_s},
                          history=result.history)
    by_stream = ", ".join(f"{n} {streams[n].test.video_hit1:.1%}" for n in STREAM_NAMES)
    write_eval_report(fused, run_dir / "report",
                      title=f"{cfg.model.backbone} / {policy} / two-stream — test split",
                      extra={"run": str(run_dir), "backbone": cfg.model.backbone, "input": model.preprocessing.describe(),
                             "policy": policy, "streams": f"{by_stream}; fused {fused.video_hit1:.1%}",
                             "fusion": f"{choice.rule} of the probabilities, flow weight {choice.weight:.1f} "
                                       f"(chosen on {choice.chosen_on})",
                             "time": record_times(run_dir, times, getattr(reporter, "message", None)),
                             "decode_errors": []}, gallery=gallery, gallery_note=GALLERY_NOTE)
