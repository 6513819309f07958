"""One fine-tuning run, step by step: open data, screen, build model, plan policy, fit, test (evaluate the best epoch), report.

:func:`run_finetune` is the whole run; each step is a function of the
:class:`Run` (the configuration, the run folder, the device) and of what the
steps before it produced, so each fits on a screen and can be read alone.
Only rank 0 of a distributed job writes files and reports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vtransfer.data.clips import shared_reader
from vtransfer.data.run_data import load_categories_for, open_dataset
from vtransfer.data.screening import screen_dataset
from vtransfer.data.splits import write_manifest
from vtransfer.engine.feature_cache import build_prefix_source
from vtransfer.engine.mixing import check_mixing_applies
from vtransfer.engine.step_memory import fit_step_to_memory
from vtransfer.engine.trainer import QuietReporter, Trainer, class_weights
from vtransfer.evaluation.calibration import calibrate_on_validation
from vtransfer.loading.checkpoints import merge_lora_checkpoint, model_from_checkpoint
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import preferred_memory_format, training_defaults
from vtransfer.policies.freezing import apply_policy
from vtransfer.policies.freezing import plan_policy as plan_for_policy
from vtransfer.policies.peft import PolicyOptions
from vtransfer.reporting.progress import TensorBoardReporter
from vtransfer.reporting.report import write_eval_report
from vtransfer.run_config import ClipConfig, ResolvedTraining, RunConfig, check_training, resolve_training
from vtransfer.utils import distributed, memory_budget
from vtransfer.utils.errors import DatasetError
from vtransfer.utils.phase_times import PhaseTimes, phase, recording
from vtransfer.utils.runtime import (
    configure_threads,
    cpu_count,
    default_workers,
    resolve_device,
    seed_everything,
)
from vtransfer.weights.checkpoint import save_checkpoint, set_checkpoint_temperature
from vtransfer.workflows import runs
from vtransfer.workflows.audit import audit_dataset
from vtransfer.workflows.report_videos import GALLERY_NOTE, gallery_or_warning
from vtransfer.workflows.run_model import build_run_model
from vtransfer.workflows.scoring import evaluate_records


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    run_dir: Path
    model_path: Path
    report: dict[str, Any]
    history: list[dict]
    trainable_params: int
    total_params: int
    train_time_s: float
    best_val_video_acc: float
    plan: dict[str, Any] = field(default_factory=dict)
    test: Any = None  # vtransfer.evaluation.metrics.EvalResult of the test split (None for an interrupted run)
    finished: bool = True  # False: stopped on purpose before its last epoch (resumable)
    streams: dict[str, "FinetuneResult"] | None = None  # two-stream: each stream's own run, with its test result
    fusion_weight: float | None = None  # two-stream: the flow stream's share of the fused probabilities


@dataclass
class Run:
    """What every step of a run shares."""

    run_dir: Path
    cfg: RunConfig
    resume: bool
    device: torch.device
    threads: int
    reporter: Any
    main: bool  # rank 0: the process that writes files and reports
    world: int

    def stage(self, text: str) -> None:
        """Say what the run is doing before its first progress bar (reporters without a status line ignore it)."""
        stage = getattr(self.reporter, "stage", None)
        if stage is not None:
            stage(text)

    def message(self, text: str) -> None:
        """One line for the person running it (nothing without a reporter: the Python API's default)."""
        if self.reporter is not None:
            self.reporter.message(text)


@dataclass
class RunData:
    """The run's videos after screening, by split, with what was left out."""

    index: Any
    classes: list[str]
    categories: dict[str, str] | None
    skipped_files: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)

    @property
    def train(self) -> list:
        """The training split's records."""
        return self.index.split("train")

    @property
    def val(self) -> list:
        """The validation split's records."""
        return self.index.split("val")

    @property
    def test(self) -> list:
        """The test split's records."""
        return self.index.split("test")


@dataclass
class Training:
    """The resolved training set-up: optimiser settings, clip options, frame reader and batch source."""

    config: ResolvedTraining  # the training options with the backbone family's defaults filled in
    clips: ClipConfig
    reader: Any
    source: Any = None


def start_run(run_dir: Path, cfg: RunConfig, resume: bool, reporter=None) -> Run:
    """Pick the device and threads, seed everything, and add the TensorBoard log when asked for."""
    ctx = distributed.current()
    reporter = reporter if ctx.is_main else None
    if ctx.is_main and cfg.runtime.tensorboard:
        reporter = TensorBoardReporter(reporter or QuietReporter(), run_dir / "tensorboard")
    device = resolve_device(cfg.runtime.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    threads = configure_threads(cfg.runtime.threads)
    seed_everything(int(cfg.training.seed), bool(cfg.training.deterministic))
    return Run(run_dir, cfg, resume, device, threads, reporter, ctx.is_main, ctx.world)


def open_data(run: Run) -> RunData:
    """Scan the dataset and split it (a resumed run reads back its own ``split.csv``); write the split."""
    d = run.cfg.data
    dopts = d if not run.resume else type(d)(**{**asdict(d), "manifest": run.run_dir / runs.SPLIT_FILE})
    index = open_dataset(dopts)
    if not index.split("train"):
        raise DatasetError(f"{d.data}: the train split is empty")
    if not run.resume and run.main:
        write_manifest(run.run_dir / runs.SPLIT_FILE, index)
    return RunData(index, index.classes, load_categories_for(d.categories, index.classes))


def screen(run: Run, data: RunData) -> RunData:
    """Leave out files that are not videos and videos that cannot be decoded, and say so (never trained on)."""
    run.stage(f"screening {len(data.index.records)} videos")
    index, skipped_files, unreadable = screen_dataset(data.index, float(run.cfg.training.max_bad_fraction), run.threads,
                                                      run.reporter)
    if unreadable and run.main:
        runs.write_bad_videos(run.run_dir, unreadable)
    return RunData(index, data.classes, data.categories, skipped_files, unreadable)


def audit_split(run: Run, data: RunData) -> None:
    """``--audit``: warn about near-duplicates across the splits and a missing group pattern; ``RUN/audit.json``."""
    if not run.cfg.data.audit or run.resume or not run.main:
        return
    run.stage(f"auditing the split of {len(data.index.records)} videos")
    report = audit_dataset(data.index, group_pattern=run.cfg.data.group_pattern, out=run.run_dir, workers=run.threads)
    for line in report.warnings():
        run.message(f"audit: {line}")


def build_model(run: Run, data: RunData) -> tuple[VideoBackbone, dict]:
    """The starting model (on the CPU until its policy is planned) and its weights' provenance."""
    m = run.cfg.model
    run.stage(f"loading {m.backbone}" + (f" with {m.weights}" if m.weights else ""))
    return build_run_model(run.cfg, len(data.classes))


def plan_policy(run: Run, model: VideoBackbone):
    """Add what the policy needs (LoRA, adapters, a probe), freeze what it does not train, move to the device.

    Returns the model (a parameter-efficient policy changes its class) and the plan.
    """
    p, t = run.cfg.policy, run.cfg.training
    model, policy_plan = plan_for_policy(model, p.policy, PolicyOptions.from_config(p), p.train_groups)
    check_mixing_applies(t.mixup, t.cutmix, policy_plan.first_trainable_group, policy_plan.policy)
    apply_policy(model, policy_plan)
    model.to(run.device, memory_format=preferred_memory_format(run.cfg.model.backbone, t.precision, run.device))
    return model, policy_plan


def prepare_training(run: Run, data: RunData, model: VideoBackbone, plan, info: dict) -> Training:
    """Resolve the optimiser settings and the frame reader, write ``config.json``, and build the batch source."""
    c = run.cfg.clips
    config = resolve_training(run.cfg, training_defaults(run.cfg.model.backbone))
    memory_budget.configure(c.max_memory, spill_dir=c.cache_dir or run.run_dir, message=run.message)  # --max-memory
    # the training step must fit and frames in memory are only faster, so the step's memory is set aside first
    # and the frame cache takes what is left (on disk, or as JPEG, when that is too little)
    config = fit_step_to_memory(model, plan, config, run.device, run.message)  # a micro-batch when a step would not fit
    flow = model.preprocessing.flow
    if flow is not None:
        run.stage(f"computing optical flow ({flow.method}, {flow.pairing}, {flow.channels} channels)")
    per_video, start = [], time.perf_counter()  # flow fields computed, one entry a video
    reader = shared_reader(c.cache, Path(c.cache_dir) if c.cache_dir else run.run_dir / "frame_cache", data.index.records,
                           model.preprocessing, flow_frames=per_video.append, cache_format=c.cache_format)
    if per_video:
        fields, seconds = sum(per_video), time.perf_counter() - start
        run.message(f"optical flow: {fields:,} fields in {seconds:.1f} s ({fields / seconds:.0f} per second"
                    f" on {cpu_count()} cores)")
    elif getattr(getattr(reader, "cache", None), "lazy", False):
        run.message("optical flow: each field computed where a clip first needs it, not at every frame"
                    " (the time summary at the end counts them)")
    elif flow is not None and getattr(getattr(reader, "cache", None), "mode", None) == "memory":
        run.message("optical flow: the fields an earlier run of this process computed (nothing to compute)")
    clips = replace(c, cache_dir=Path(c.cache_dir) if c.cache_dir else None,
                    workers=c.workers if c.workers is not None
                    else default_workers(run.device, reader, whole_network=plan.first_trainable_group == 0))
    if not run.resume and run.main:
        _write_config(run, data, model, plan, info, config, clips)
    run.stage("decoding clips" + (" and caching the frozen layers' outputs" if plan.first_trainable_group else ""))
    labels = [data.index.class_to_idx[r.label] for r in data.train]
    source = build_prefix_source(
        model=model, plan=plan, train_records=data.train, class_to_idx=data.index.class_to_idx, labels=labels,
        opts=clips, config=config, device=run.device, reader=reader, balance_sampler=(config.training.balance == "sampler"),
    )
    return Training(config, clips, reader, source)


def _write_config(run: Run, data: RunData, model: VideoBackbone, plan, info: dict, config: ResolvedTraining,
                  clips: ClipConfig) -> None:
    """``config.json``: the options as given (``options``) and everything they resolved to (``resolved``)."""
    runs.write_json(run.run_dir / runs.CONFIG_FILE, {
        "options": run.cfg.to_json(),
        "resolved": {
            "train": config.to_dict(), "device": str(run.device), "threads": run.threads, "workers": clips.workers,
            "preprocessing": model.preprocessing.to_dict(), "classes": data.classes,
            "policy": plan.to_dict(), "trainable_params": plan.trainable_count(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "weights": info, "architecture": dict(model.config),
            "split_sizes": {s: len(data.index.split(s)) for s in ("train", "val", "test")},
            "processes": run.world,
        },
    })


def fit(run: Run, data: RunData, model: VideoBackbone, plan, info: dict, training: Training, stop_after: int | None):
    """Train, validating each epoch and saving the best one; returns the trainer's final state."""
    config, clips = training.config, training.clips
    val_records = data.val or data.train
    labels = [data.index.class_to_idx[r.label] for r in data.train]

    def validate(m: VideoBackbone) -> tuple[float, float]:
        res, _ = evaluate_records(m, val_records, data.classes, clips, run.device, config.training.precision,
                                  clips=clips.val_clips,
                                  reader=training.reader, prefix_stop=plan.first_trainable_group, shard=True)
        return res.video_hit1, res.clip_hit1

    provenance = _provenance(run.cfg, info, data.index)
    trainable = plan.trainable_count(model)

    def save_best(m: VideoBackbone, record) -> None:
        if run.main:
            save_checkpoint(run.run_dir / runs.MODEL_FILE, m, classes=data.classes, source=provenance,
                            training={"policy": plan.to_dict(), "best_epoch": record.epoch,
                                      "val_video_acc": record.val_video_acc, "epochs": config.epochs,
                                      "dataset": str(run.cfg.data.data), "trainable_params": trainable})

    trainer = Trainer(
        model, plan, config, run.device, training.source, validate, save_best,
        save_state=lambda st: run.main and (runs.save_resume_state(run.run_dir, st), runs.write_metrics(run.run_dir, st["history"])),
        reporter=run.reporter,
        loss_weights=class_weights(labels, len(data.classes)) if config.training.balance == "weights" else None,
        train_size=len(data.train),
        on_bad_videos=lambda entries: run.main and runs.write_bad_videos(run.run_dir, data.unreadable + entries),
    )
    if run.resume and runs.has_resume_state(run.run_dir):  # no resume.pt: stopped before epoch 1 finished
        trainer.load_state_dict(runs.load_resume_state(run.run_dir))
    try:  # Ctrl-C keeps the last finished epoch and says how to resume
        state = trainer.fit(stop_after=stop_after)
    except KeyboardInterrupt:
        raise runs.RunInterrupted(run.run_dir, trainer.state.epoch, config.epochs) from None
    finished = state.epoch >= config.epochs or state.stopped_early
    if run.cfg.policy.merge and finished and run.main:
        merge_lora_checkpoint(run.run_dir / runs.MODEL_FILE)  # the saved model then loads without peft
        run.stage("merged the LoRA updates into the saved weights")
    return state


def _provenance(cfg: RunConfig, info: dict, index) -> dict:
    """What the saved model was trained from: its pretraining source and the fine-tuning data."""
    return {
        "pretrained": info,
        "finetuned_on": {"dataset": str(cfg.data.data), "classes": index.classes, "videos": len(index.records)},
        **({"pretrain_source": cfg.pretrain_source} if cfg.pretrain_source else {}),
    }


def evaluate_best(run: Run, data: RunData, plan, training: Training):
    """The best epoch's model on the test split (the validation split when there is no test split).

    With ``--calibrate`` a temperature is fitted on the validation split's clip
    scores first, stored in the checkpoint, and applied to the test scores.
    """
    best, _ = model_from_checkpoint(run.run_dir / runs.MODEL_FILE)
    precision = training.config.training.precision
    best.to(run.device, memory_format=preferred_memory_format(run.cfg.model.backbone, precision, run.device))
    apply_policy(best, plan)
    temperature = calibrate(run, data, plan, training, best) if run.cfg.training.calibrate else None
    result, preds = evaluate_records(best, data.test or data.val, data.classes, training.clips, run.device, precision,
                                     data.categories, reader=training.reader, prefix_stop=plan.first_trainable_group,
                                     crops=training.clips.test_crops, temperature=temperature)
    if result.collapse_warning():
        run.message(f"warning: test split: {result.collapse_warning()}")
    return result, preds


def calibrate(run: Run, data: RunData, plan, training: Training, best: VideoBackbone) -> float | None:
    """Fit a temperature on the validation clips and store it in the checkpoint; ``None`` when it cannot be pinned down."""
    if not data.val:
        run.message("calibration skipped: there is no validation split to fit it on")
        return None
    _, val_preds = evaluate_records(best, data.val, data.classes, training.clips, run.device,
                                    training.config.training.precision,
                                    clips=training.clips.val_clips, reader=training.reader,
                                    prefix_stop=plan.first_trainable_group)
    fit = calibrate_on_validation(val_preds, [data.index.class_to_idx[r.label] for r in data.val])
    run.message(f"calibration: {fit.describe()}" + ("; not applied" if fit.at_bound else ""))
    if fit.at_bound:
        return None
    if run.main:
        set_checkpoint_temperature(run.run_dir / runs.MODEL_FILE, fit.temperature)
    return fit.temperature


def draw_videos(run: Run, data: RunData, result) -> list:
    """The report's gallery: up to ``--report-videos`` test videos drawn with where the best model looked."""
    limit = run.cfg.runtime.report_videos
    if not limit or not run.main:
        return []
    run.stage(f"drawing up to {limit} test videos for the report")
    best, _ = model_from_checkpoint(run.run_dir / runs.MODEL_FILE)
    best.to(run.device)
    return gallery_or_warning(best, result, data.test or data.val, data.classes, run.run_dir / "report", limit, run.message)


def write_report(run: Run, data: RunData, model: VideoBackbone, plan, state, result, preds,
                 gallery: list | None = None, times: PhaseTimes | None = None) -> FinetuneResult:
    """The test report under ``RUN/report`` and the run's result; with ``times``, where the run's time went
    (``RUN/times.json``, the report's "time" line and the log)."""
    trainable, total = plan.trainable_count(model), sum(p.numel() for p in model.parameters())
    train_time = sum(h["time_s"] for h in state.history)
    backbone = run.cfg.model.backbone
    extra = {"run": str(run.run_dir), "backbone": backbone, "input": model.preprocessing.describe(),
             "policy": plan.policy, "trainable_params": trainable,
             "total_params": total, "train_time_s": train_time, "best_epoch": state.best_epoch,
             "decode_errors": sorted({f"{p}: {r}" for p, r in preds.errors}),
             "bad_videos": data.unreadable + state.bad_videos, "skipped_files": data.skipped_files}
    if times is not None:
        extra["time"] = record_times(run.run_dir, times, run.message)
    write_eval_report(result, run.run_dir / "report", title=f"{backbone} / {plan.policy} — test split",
                      extra=extra, history=state.history, gallery=gallery, gallery_note=GALLERY_NOTE)
    return FinetuneResult(run.run_dir, run.run_dir / runs.MODEL_FILE, result.to_dict(), state.history, trainable, total,
                          train_time, state.best_score, plan.to_dict(), test=result)


def record_times(run_dir: Path, times: PhaseTimes, message=None) -> str:
    """Write ``RUN/times.json`` (the run's wall time by phase, up to its report; a resumed run's counts from its
    resumption), say it, and return the one-line summary."""
    runs.write_json(run_dir / runs.TIMES_FILE, times.to_dict())
    line = times.summary()
    if message is not None:
        message(line)
    return line


def run_finetune(run_dir: Path, cfg: RunConfig, resume: bool, reporter=None, stop_after: int | None = None,
                 test: bool = True) -> FinetuneResult:
    """The whole run: every step above, in order.

    A run stopped on purpose (``stop_after``) returns without a report, and so
    does one with ``test=False`` (a ``--policy auto`` trial, chosen on the
    validation split alone: the test videos stay unseen until the winner's run).
    """
    with recording() as times:
        with phase("setup"):
            check_training(cfg.training, cfg.clips)  # before any file is read
            run = start_run(run_dir, cfg, resume, reporter)
            data = open_data(run)
            model, info = build_model(run, data)
            model, plan = plan_policy(run, model)  # the policy's options too are checked before the first video is decoded
        with phase("screening"):
            data = screen(run, data)
        with phase("audit"):
            audit_split(run, data)
        with phase("setup"):  # decoding, flow and the frozen prefix inside count as themselves
            training = prepare_training(run, data, model, plan, info)
        with phase("training") as clips_trained:
            state = fit(run, data, model, plan, info, training, stop_after)
            clips_trained(state.clips_trained)
        distributed.barrier()
        epochs = training.config.epochs
        if state.epoch < epochs and not state.stopped_early or not run.main or not test:
            # stopped on purpose (stop_after_epochs): resumable, no report yet; other ranks leave the test to rank 0
            return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, {}, state.history, plan.trainable_count(model),
                                  sum(p.numel() for p in model.parameters()), sum(h["time_s"] for h in state.history),
                                  state.best_score, plan.to_dict(), finished=state.epoch >= epochs or state.stopped_early)
        with phase("scoring"):
            result, preds = evaluate_best(run, data, plan, training)
        with phase("report videos"):
            gallery = draw_videos(run, data, result)
        return write_report(run, data, model, plan, state, result, preds, gallery, times)
