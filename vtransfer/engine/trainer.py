"""The fine-tuning loop: optimiser, schedule, early stopping, resume.

One readable loop. The frozen prefix of the model (every group below the
policy's first trainable group) runs without autograd; only the rest builds a
graph. The prefix's output comes from a :class:`PrefixSource`: computed on
the fly from decoded clips, or read from a feature cache
(:mod:`vtransfer.engine.feature_cache`), which gives the same numbers for the same
clips.

Bad input never stops an epoch half-way: clips that fail to decode are
counted, recorded per video (``bad_videos``, written to the run folder by the
caller's ``on_bad_videos``) and announced by the reporter; only when more than
``max_bad_fraction`` of an epoch's clips fail does the run stop, with a
message naming the files. Videos that cannot be read at all are removed before
training by :func:`vtransfer.data.screening.screen_dataset`, under the same limit.

The trainer runs a :class:`vtransfer.run_config.ResolvedTraining`: the run's
training options with the backbone family's defaults filled in
(:func:`vtransfer.run_config.resolve_training`). Optional training features,
all off by default: gradient accumulation (``micro_batch``: the batch of one optimiser step is
still ``batch_size``), an EMA of the weights (:mod:`vtransfer.engine.ema`), mixup and
cutmix on clips (:mod:`vtransfer.engine.mixing`), layer-wise learning-rate decay
(:mod:`vtransfer.engine.lr_decay`) and gradient checkpointing
(:mod:`vtransfer.engine.grad_checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from vtransfer.data.screening import describe_bad_videos, summarize_decode_errors
from vtransfer.engine.ema import WeightEma
from vtransfer.engine.grad_checkpoint import forward_groups_checkpointed
from vtransfer.engine.lr_decay import scales_by_param
from vtransfer.engine.mixing import check_mixing_applies, mix_batch, mixing_rng
from vtransfer.evaluation.arrays import NonFiniteScores
from vtransfer.models.base import VideoBackbone
from vtransfer.policies.freezing import PolicyPlan, set_train_mode
from vtransfer.policies.peft import structure_params
from vtransfer.run_config import ResolvedTraining
from vtransfer.utils.distributed import all_reduce_sums, gather_objects, wrap_trainable
from vtransfer.utils.errors import ConfigError, VtransferError
from vtransfer.utils.runtime import autocast

#: An epoch whose mean training loss exceeds this many times the first epoch's stops the run as diverged.
DIVERGENCE_FACTOR = 10.0


class TrainingDiverged(VtransferError):
    """The training loss became non-finite or grew far beyond its first epoch's value."""


@dataclass
class EpochRecord:
    """One finished epoch, as written to ``metrics.jsonl``."""

    epoch: int
    train_loss: float
    train_acc: float
    val_video_acc: float
    val_clip_acc: float
    lr: float
    time_s: float
    bad_clips: int = 0
    raw_val_video_acc: float | None = None  # with EMA on: the raw (not averaged) weights' validation video accuracy

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)


class PrefixSource(Protocol):
    """Yields training batches as (state after the frozen prefix, labels)."""

    def batches(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor, list]]:
        """(prefix output, integer labels, decode errors) for every batch of ``epoch``."""
        ...

    def num_batches(self) -> int:
        """Batches per epoch."""
        ...


class Reporter(Protocol):
    """Receives progress (the CLI shows Rich bars; the API default prints nothing)."""

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Epoch ``epoch`` of ``epochs`` begins; it has ``batches`` batches."""

    def batch_end(self, loss: float, acc: float) -> None:
        """A training batch finished with this mean loss and accuracy."""

    def epoch_end(self, record: EpochRecord, improved: bool) -> None:
        """An epoch finished (``improved``: its validation accuracy is the best so far)."""

    def message(self, text: str) -> None:
        """One line for the user (warnings, early stop)."""


class QuietReporter:
    """A reporter that reports nothing."""

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Ignore."""

    def batch_end(self, loss: float, acc: float) -> None:
        """Ignore."""

    def epoch_end(self, record: EpochRecord, improved: bool) -> None:
        """Ignore."""

    def message(self, text: str) -> None:
        """Ignore."""


def build_optimizer(params: list[nn.Parameter], config: ResolvedTraining, fused: bool | None = None,
                    head: list[nn.Parameter] | None = None,
                    lr_scales: Mapping[int, float] | None = None) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters (no decay on biases and norms).

    ``head`` (a subset of ``params``: the new classifier) gets the learning
    rate ``config.lr * config.head_lr_scale``. ``lr_scales`` (``id(param) ->
    factor``, e.g. :func:`vtransfer.engine.lr_decay.scales_by_param`; missing = 1)
    multiplies that further, one parameter group per distinct factor, in the
    order the factors first appear in ``params``. ``fused`` (default: whenever
    every parameter is on the CPU or a CUDA GPU) uses PyTorch's single-kernel
    update: the same arithmetic as the default per-tensor-list update up to
    float rounding, about 3x faster on the CPU for a model of many small tensors.
    """
    head_ids = {id(p) for p in head or []}
    scale = config.head_lr_scale or 1.0
    layer = {id(p): float((lr_scales or {}).get(id(p), 1.0)) for p in params}
    factors = list(dict.fromkeys(layer.values()))
    groups = []
    for in_head, lr in ((False, config.lr), (True, config.lr * scale)):
        for factor in factors:
            mine = [p for p in params if (id(p) in head_ids) == in_head and layer[id(p)] == factor]
            groups.append({"params": [p for p in mine if p.ndim > 1], "weight_decay": config.weight_decay,
                           "lr": lr * factor})
            groups.append({"params": [p for p in mine if p.ndim <= 1], "weight_decay": 0.0, "lr": lr * factor})
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kind = {"fused": True} if fused else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=False, **kind)
    return torch.optim.AdamW(groups, lr=config.lr, **kind)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay towards 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 over present classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    present = counts > 0
    w = w / w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class FitState:
    """Everything needed to continue a run after its last finished epoch."""

    epoch: int = 0  # epochs finished
    best_score: float = -1.0
    best_clip: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    bad_videos: list[dict] = field(default_factory=list)  # {path, reason, epoch, count} of failed clips
    clips_trained: int = 0  # training clips of the epochs run in this process (a rate's units; not resumed)


class TrainablePart(nn.Module):
    """Groups ``start ..`` of a backbone as one module: what the training step runs.

    Wrapping this (rather than the whole backbone) in DistributedDataParallel
    keeps the frozen prefix out of DDP and lets the step start from cached
    prefix activations. With ``grad_checkpointing`` each group but the head
    recomputes its activations in the backward pass
    (:func:`vtransfer.engine.grad_checkpoint.forward_groups_checkpointed`).
    """

    def __init__(self, model: VideoBackbone, start: int, grad_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.start = start
        self.stop = len(model.layer_groups())
        self.grad_checkpointing = grad_checkpointing

    def forward(self, state: Any) -> torch.Tensor:
        """Logits from the state after the frozen prefix."""
        if self.grad_checkpointing:
            return forward_groups_checkpointed(self.model, state, self.start, self.stop)
        return self.model.forward_groups(state, self.start, self.stop)


def micro_batches(batch: int, micro_batch: int | None) -> list[slice]:
    """Row ranges of the passes one step of ``batch`` rows takes: ``ceil(batch / micro_batch)`` slices."""
    size = batch if micro_batch is None else max(1, micro_batch)
    return [slice(i, min(batch, i + size)) for i in range(0, max(batch, 1), max(size, 1))]


def take_rows(state: Any, rows: slice) -> Any:
    """Rows ``rows`` of a prefix state (a tensor or a tuple of tensors, batch first)."""
    if isinstance(state, tuple):
        return tuple(take_rows(s, rows) for s in state)
    return state[rows]


class Trainer:
    """Fine-tunes the trainable part of ``model`` as ``plan`` says.

    Under ``torchrun`` each process trains on its slice of every global batch
    (the source does the slicing), DistributedDataParallel averages the
    gradients, and epoch metrics are summed over processes.

    ``validate(model) -> (video_acc, clip_acc)`` scores the current model;
    ``save_best(model, record)`` is called whenever validation improves;
    ``save_state(state_dict)`` after every epoch (for ``--resume``);
    ``on_bad_videos(entries)`` with every bad-video entry so far whenever an
    epoch met clips that failed to decode (also just before the run stops for
    too many of them). A Ctrl-C abandons the epoch in progress: what was saved
    after the last finished epoch is the state to resume from.
    """

    def __init__(
        self,
        model: VideoBackbone,
        plan: PolicyPlan,
        config: ResolvedTraining,
        device: torch.device,
        source: PrefixSource,
        validate: Callable[[VideoBackbone], tuple[float, float]],
        save_best: Callable[[VideoBackbone, EpochRecord], None],
        save_state: Callable[[dict], None],
        reporter: Reporter | None = None,
        loss_weights: torch.Tensor | None = None,
        train_size: int = 0,
        on_bad_videos: Callable[[list[dict]], None] | None = None,
    ):
        self.model = model
        self.plan = plan
        self.config = config  # the resolved values (optimiser, lr, epochs, ...)
        self.options = options = config.training  # the training options as given (mixup, seed, precision, ...)
        self.device = device
        self.source = source
        self.validate = validate
        self.save_best = save_best
        self.save_state = save_state
        self.reporter = reporter or QuietReporter()
        self.train_size = train_size
        self.on_bad_videos = on_bad_videos
        self.num_groups = len(model.layer_groups())
        check_mixing_applies(options.mixup, options.cutmix, plan.first_trainable_group, plan.policy)
        self.mixing = options.mixup > 0 or options.cutmix > 0
        self._mix_rng = mixing_rng(options.seed, 0)  # replaced at the start of every epoch
        part = TrainablePart(model, plan.first_trainable_group, grad_checkpointing=options.grad_checkpointing)
        self.step_module = wrap_trainable(part, device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: the policy left every parameter frozen")
        named = dict(model.named_parameters())
        # A new classifier on pretrained layers learns faster than they may move; from scratch nothing is ahead.
        # Modules a policy adds to the head group (the attentive probe's attention) are not the classifier:
        # at the classifier's rate (10x on effnet3d) a 6 M-parameter probe's loss ran to 40-80 on real_actions.
        added = set(structure_params(model, plan.policy)) if getattr(plan, "structure", None) else set()
        head = [] if plan.reinit else [named[n] for n in model.layer_groups()[-1].params
                                       if named[n].requires_grad and n not in added]
        scales = scales_by_param(model, options.layer_decay) if options.layer_decay is not None else None
        self.optimizer = build_optimizer(params, config, head=head, lr_scales=scales)
        self.ema = WeightEma(model, options.ema_decay) if options.ema_decay is not None else None
        steps_per_epoch = max(1, source.num_batches())
        total = steps_per_epoch * config.epochs
        warmup = int(round(options.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total, min(warmup, total - 1)))
        weight = loss_weights.to(device) if loss_weights is not None else None
        self.loss_weights = weight
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
        # micro-batches: summed losses over the whole batch's denominator give exactly the batch's mean loss
        self.criterion_sum = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing, reduction="sum")
        self.state = FitState()

    # -- resume --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Resumable state: model, optimiser, schedule, progress, RNG."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch,
            "best_score": self.state.best_score,
            "best_clip": self.state.best_clip,
            "best_epoch": self.state.best_epoch,
            "history": self.state.history,
            "stopped_early": self.state.stopped_early,
            "bad_videos": self.state.bad_videos,
            "rng": torch.get_rng_state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = FitState(
            epoch=int(state["epoch"]),
            best_score=float(state["best_score"]),
            best_clip=float(state.get("best_clip", -1.0)),
            best_epoch=int(state["best_epoch"]),
            history=list(state["history"]),
            stopped_early=bool(state.get("stopped_early", False)),
            bad_videos=list(state.get("bad_videos", [])),
        )
        torch.set_rng_state(state["rng"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # a run saved without EMA: the shadow starts from the resumed weights
                self.ema = WeightEma(self.model, self.options.ema_decay)
        if self.state.bad_videos and self.on_bad_videos is not None:
            self.on_bad_videos(list(self.state.bad_videos))  # the run folder's list survives a resume

    # -- the loop ------------------------------------------------------------------
    def train_step(self, prefix_out: Any, labels: torch.Tensor) -> tuple[float, int]:
        """One optimisation step on a batch; returns (the batch's mean loss, number correct).

        With ``micro_batch`` the batch runs forward and backward in
        slices of that many rows; each slice's loss is its summed loss over the
        whole batch's denominator (the row count, or the sum of the class
        weights of the labels), so the accumulated gradient is the whole
        batch's, uneven last slice included. The optimiser and the schedule
        step once. With mixup/cutmix the batch is mixed first (whole batch,
        then sliced); "correct" then counts the larger of each row's two labels.
        """
        targets: torch.Tensor = labels
        if self.mixing:
            mixed = mix_batch(prefix_out, labels, self.model.num_classes, mixup=self.options.mixup,
                              cutmix=self.options.cutmix, rng=self._mix_rng)
            prefix_out, targets = mixed.clips, mixed.targets
        chunks = micro_batches(labels.shape[0], self.options.micro_batch)
        self.optimizer.zero_grad(set_to_none=True)
        if len(chunks) == 1:
            with autocast(self.device, self.options.precision):
                logits = self.step_module(prefix_out)
                loss = self.criterion(logits.float(), targets)
            loss.backward()
            total, correct = loss.detach(), self._correct(logits, targets)
        else:
            denominator = self._loss_denominator(targets)
            total, correct = torch.zeros((), device=self.device), 0
            for k, rows in enumerate(chunks):
                last = k == len(chunks) - 1
                no_sync = getattr(self.step_module, "no_sync", None)  # DDP: all-reduce only the last slice
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    with autocast(self.device, self.options.precision):
                        logits = self.step_module(take_rows(prefix_out, rows))
                        loss = self.criterion_sum(logits.float(), targets[rows]) / denominator
                    loss.backward()
                total = total + loss.detach()
                correct += self._correct(logits, targets[rows])
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(total), correct

    @staticmethod
    def _correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
        """Rows whose top logit is the label (soft targets: the label of largest weight)."""
        truth = targets.argmax(1) if targets.ndim == 2 else targets
        return int((logits.detach().argmax(1) == truth).sum())

    def _loss_denominator(self, targets: torch.Tensor) -> torch.Tensor | float:
        """What ``CrossEntropyLoss(reduction="mean")`` divides the summed loss by for this whole batch."""
        if targets.ndim == 1 and self.loss_weights is not None:
            return self.loss_weights[targets].sum()
        return float(targets.shape[0])

    def _validate(self, epoch: int) -> tuple[float, float]:
        """(video, clip) validation accuracy of the weights the model holds now; non-finite scores mean divergence."""
        try:
            return self.validate(self.model)
        except NonFiniteScores:
            raise self._diverged(epoch, float("nan")) from None

    def _eval_weights(self):
        """Context in which the model holds the weights to validate and save: the EMA's when on."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def fit(self, stop_after: int | None = None) -> FitState:
        """Train until ``config.epochs``, early stopping, or ``stop_after`` epochs this call.

        Any exception (Ctrl-C included) leaves ``self.state`` at the last
        finished epoch and closes the reporter's live display.
        """
        try:
            return self._fit(stop_after)
        finally:
            close = getattr(self.reporter, "close", None)
            if close is not None:
                close()

    def _record_bad_clips(self, epoch: int, errors: list[tuple[str, str]]) -> list[dict]:
        """Add this epoch's failed clips to ``bad_videos``, hand them to ``on_bad_videos`` and warn."""
        entries = summarize_decode_errors(errors, epoch)
        self.state.bad_videos.extend(entries)
        if self.on_bad_videos is not None:
            self.on_bad_videos(list(self.state.bad_videos))
        self.reporter.message(
            f"warning: epoch {epoch}: {len(errors)} clip(s) of {len(entries)} video(s) failed to decode "
            f"and were skipped: {describe_bad_videos(entries)}"
        )
        return entries

    def _diverged(self, epoch: int, loss: float, first: float | None = None) -> "TrainingDiverged":
        """The error that stops a run whose loss blew up, naming the learning rate to lower."""
        lr = self.config.lr
        seen = "weights or outputs became NaN or infinite" if not math.isfinite(loss) else (
            f"train loss {loss:.4g}" + (f", {loss / first:.0f}x the first epoch's {first:.4g}" if first else ""))
        return TrainingDiverged(
            f"training diverged in epoch {epoch} ({seen}) at --lr {lr:g} ({self.config.optimizer}); "
            f"stopped rather than report a broken model. Try a lower learning rate, e.g. --lr {lr / 10:g}"
        )

    def _reported_lr(self) -> float:
        """The lr of the epoch's record: the first parameter group's; with layer decay, ``lr`` x the schedule."""
        if self.options.layer_decay is None:
            return self.optimizer.param_groups[0]["lr"]
        return self.config.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def _fit(self, stop_after: int | None) -> FitState:
        cfg, options = self.config, self.options
        done_this_call = 0
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            if stop_after is not None and done_this_call >= stop_after:
                break
            epoch = self.state.epoch + 1
            t0 = time.perf_counter()
            self._mix_rng = mixing_rng(options.seed, epoch)
            set_train_mode(self.model, True, self.plan.policy)
            self.reporter.epoch_start(epoch, cfg.epochs, self.source.num_batches())
            loss_sum, correct, seen, bad = 0.0, 0, 0, 0
            epoch_errors: list[tuple[str, str]] = []
            for prefix_out, labels, errors in self.source.batches(epoch):
                bad += len(errors)
                epoch_errors.extend(errors)
                n = labels.shape[0]
                if n == 0:
                    continue
                labels = labels.to(self.device)
                loss, c = self.train_step(prefix_out, labels)
                if not math.isfinite(loss):
                    raise self._diverged(epoch, loss)
                loss_sum += loss * n
                correct += c
                seen += n
                self.reporter.batch_end(loss, c / n)
            loss_sum, correct, seen, bad = all_reduce_sums([loss_sum, correct, seen, bad])
            correct, seen, bad = int(correct), int(seen), int(bad)
            self.state.clips_trained += seen
            epoch_errors = [e for errs in gather_objects(epoch_errors) for e in errs]
            attempted = seen + bad
            entries = self._record_bad_clips(epoch, epoch_errors) if epoch_errors else []
            if attempted and bad / attempted > options.max_bad_fraction:
                raise VtransferError(
                    f"epoch {epoch}: {bad} of {attempted} training clips failed to decode "
                    f"(more than --max-bad-fraction {options.max_bad_fraction:g}): {describe_bad_videos(entries)}; "
                    "stopped rather than train on what is left. The list is in bad_videos.json in the run "
                    "folder; repair those files and --resume the run, or start a new run without them"
                )
            if seen == 0:
                raise VtransferError(f"epoch {epoch}: no training clip could be decoded")
            epoch_loss = loss_sum / seen
            first = self.state.history[0]["train_loss"] if self.state.history else epoch_loss
            finite_weights = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                                 if t.is_floating_point())  # parameters and BatchNorm statistics
            if not finite_weights or not math.isfinite(epoch_loss) or epoch_loss > DIVERGENCE_FACTOR * first:
                raise self._diverged(epoch, epoch_loss if finite_weights else float("nan"), first)
            # with EMA on, the raw weights' accuracy is logged beside the average's, so a user sees what EMA changes
            raw_video = self._validate(epoch)[0] if self.ema is not None else None
            with self._eval_weights():  # with EMA on, the shadow weights are validated and saved
                val_video, val_clip = self._validate(epoch)
                record = EpochRecord(
                    epoch=epoch,
                    train_loss=loss_sum / seen,
                    train_acc=correct / seen,
                    val_video_acc=val_video,
                    val_clip_acc=val_clip,
                    lr=self._reported_lr(),
                    time_s=time.perf_counter() - t0,
                    bad_clips=bad,
                    raw_val_video_acc=raw_video,
                )
                # Ties go to the later, better-trained epoch, then to the better clip accuracy: on a validation
                # split of a few videos the video accuracy alone jumps in steps of 1/N and an early lucky epoch
                # would otherwise win (measured on real_actions' 9 validation videos).
                improved = (val_video, val_clip) >= (self.state.best_score, self.state.best_clip)
                if improved:
                    self.state.best_score = val_video
                    self.state.best_clip = val_clip
                    self.state.best_epoch = epoch
                    self.save_best(self.model, record)
            self.state.epoch = epoch
            self.state.history.append(record.to_dict())
            if options.patience > 0 and epoch - self.state.best_epoch >= options.patience:
                self.state.stopped_early = True
                self.reporter.message(f"early stop: no val improvement for {options.patience} epochs")
            self.save_state(self.state_dict())
            self.reporter.epoch_end(record, improved)
            done_this_call += 1
        return self.state


def checkpoint_path(run_dir: Path) -> Path:
    """Where the best model of a run lives."""
    return Path(run_dir) / "model.safetensors"
