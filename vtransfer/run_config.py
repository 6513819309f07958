"""The typed configuration of one training run, declared once.

A run's options fall into six sections, one dataclass each:
:class:`DataConfig` (where the videos are and how they are split),
:class:`ClipConfig` (how clips are cut and fed), :class:`ModelConfig`
(backbone, preset, weights), :class:`PolicyConfig` (what trains),
:class:`TrainingConfig` (the optimisation) and :class:`RuntimeConfig`
(device, threads, logging). :class:`RunConfig` holds them.

Each field is declared here with its type, default, ``--help`` text and help
panel (:func:`option`), and nowhere else: the Python API's keyword arguments
(:func:`run_parameters`) and the CLI options of ``finetune``, ``pretrain`` and
``compare-policies`` (``vtransfer.cli.run_options``) are generated from these
declarations, so the commands cannot drift apart and one name means one thing
everywhere. Field names are unique across sections, which is what lets a run's
``config.json`` store them as one flat ``options`` table (:meth:`RunConfig.to_json`;
files written before the sections existed read back the same way).

This module imports neither torch nor typer: ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from vtransfer.data.flow_settings import (
    DEFAULT_FLOW, DEFAULT_FUSION_RULE, FLOW_BOUND_AT, FLOW_METHODS, FLOW_STREAMS, FUSION_RULES, STREAMS, FlowSettings,
)
from vtransfer.policies.names import default_epochs
from vtransfer.utils.errors import ConfigError
from vtransfer.utils.jsonable import to_jsonable
from vtransfer.utils.memory_budget import check_max_memory

DEFAULT_POLICY = "top-3"

# Help panels of ``--help``.
PANEL_DATA = "Data"
PANEL_MODEL = "Model"
PANEL_TRAINING = "Training"
PANEL_SPEED = "Speed and resources"
PANEL_OUTPUT = "Output"


#: How far the shares' sum may stray from 1 (fractions) or 100 (percentages), relative to it.
RATIOS_TOLERANCE = 1e-3


def parse_ratios(text: Any, option: str = "--ratios") -> tuple[float, float, float]:
    """The train,val,test shares of ``--ratios`` as fractions: the one parser of every command and the API.

    ``text`` is ``"0.7,0.15,0.15"`` (fractions summing to 1) or ``"70,15,15"``
    (percentages summing to 100), either within :data:`RATIOS_TOLERANCE`;
    commas, spaces, ``/`` or ``:`` separate the numbers. A list or tuple (a
    recipe's, the API's) follows the same rule. Fractions come back as given,
    percentages divided by 100; the split scales them to sum to exactly 1.

    Raises:
        ConfigError: naming ``option`` and the value: not three numbers, a
            negative share, a zero train share, or a sum that is neither 1 nor 100.
    """
    if isinstance(text, (list, tuple)):
        items, shown = list(text), ",".join(str(x) for x in text)
    else:
        shown = str(text)
        items = [p for p in re.split(r"[,\s/:]+", shown.strip()) if p]
    try:
        parts = [float(x) for x in items]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 3 or not all(math.isfinite(p) for p in parts):
        raise ConfigError(f"{option} {shown!r}: expected three numbers train,val,test like 0.7,0.15,0.15 or 70,15,15")
    if any(p < 0 for p in parts) or parts[0] <= 0:
        raise ConfigError(f"{option} {shown!r}: the shares must be non-negative, with a positive train share")
    total = sum(parts)
    for scale in (1.0, 100.0):
        if abs(total - scale) <= RATIOS_TOLERANCE * scale:
            return tuple(p / scale for p in parts)  # type: ignore[return-value]  # x / 1.0 is x exactly
    raise ConfigError(f"{option} {shown!r}: the shares sum to {total:g}; give fractions summing to 1 "
                      "(0.7,0.15,0.15) or percentages summing to 100 (70,15,15)")


def parse_pair(text: Any, option: str = "--crop-scale") -> tuple[float, float] | None:
    """``"0.5,1.0"`` (or a two-number list from a recipe) -> (0.5, 1.0); ``None`` stays ``None``."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        lo, hi = (float(x) for x in items)
    except ValueError as e:
        raise ConfigError(f"{option} {text!r}: expected two numbers like 0.5,1.0") from e
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{option} {text!r}: expected 0 < MIN <= MAX <= 1")
    return lo, hi


#: Storage formats of the decoded-frame cache (``--cache-format``); the frame cache
#: (:mod:`vtransfer.data.frame_cache`) implements them and resolves auto.
CACHE_FORMATS = ("auto", "raw", "jpeg")
DEFAULT_CACHE_FORMAT = "auto"


def parse_cache_format(text: Any) -> str:
    """``--cache-format`` checked against :data:`CACHE_FORMATS` (when the options are read, before any video)."""
    value = str(text).strip().lower()
    if value not in CACHE_FORMATS:
        raise ConfigError(f"--cache-format must be one of {', '.join(CACHE_FORMATS)}, got {text!r}")
    return value


def split_list(text: Any) -> list[str] | None:
    """Comma-separated text (or a list from a recipe) -> list of stripped names; ``None`` stays ``None``."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return [str(t).strip() for t in items if str(t).strip()]


def option(default: Any, help: str, panel: str, *, flags: tuple[str, ...] = (), metavar: str | None = None,
           cli_name: str | None = None, cli_type: Any = None, parse: Callable[[Any], Any] | None = None,
           cli_default: Any = None, on_cli: bool = True) -> Any:
    """A configuration field with everything its CLI option needs.

    ``flags`` are extra short flags (``-b``); ``cli_name`` a parameter name
    that differs from the field's (``--train`` sets ``train_groups``);
    ``cli_type`` the type the command line parses when it is not the field's
    (``--ratios`` is text, the field a tuple) with ``parse`` turning the text
    into the field's value, and ``cli_default`` the default as the command
    line spells it. ``on_cli=False`` keeps a field off the generated options
    (the dataset is each command's positional argument).
    """
    meta = {"help": help, "panel": panel, "flags": flags, "metavar": metavar, "cli_name": cli_name,
            "cli_type": cli_type, "parse": parse, "cli_default": cli_default, "on_cli": on_cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Where the videos are and how they are split."""

    data: Optional[Path] = option(None, "Dataset folder or split manifest CSV.", PANEL_DATA, on_cli=False)
    manifest: Optional[Path] = option(None, "Reuse the split in this manifest CSV (path,class,split,group).", PANEL_DATA)
    split_files: Optional[Path] = option(None, "UCF-101-style trainlist/testlist file or folder.", PANEL_DATA)
    split_seed: int = option(0, "Seed of the stratified train/val/test split.", PANEL_DATA)
    ratios: tuple[float, float, float] = option(
        (0.7, 0.15, 0.15),
        "train,val,test shares of the automatic split: fractions (0.7,0.15,0.15) or percentages (70,15,15).",
        PANEL_DATA, metavar="TRAIN,VAL,TEST",
        cli_type=str, parse=parse_ratios, cli_default="0.7,0.15,0.15")
    group_pattern: Optional[str] = option(
        None, "Regex whose capture keeps related clips in one split (UCF-101: '_(g\\d+)_', KTH: '(person\\d+)').", PANEL_DATA)
    categories: Optional[Path] = option(None, "CSV class,category for per-category accuracy.", PANEL_DATA)
    audit: bool = option(
        True, "Before training, audit the split: near-duplicate videos on both sides of it (re-encoded, mirrored or "
              "trimmed copies) and file names that carry a person or session id without --group-pattern. Warnings "
              "only, also in RUN/audit.json; the check command's --audit with a --backbone also looks for "
              "mislabelled videos.", PANEL_DATA)


@dataclass
class ClipConfig:
    """How clips are cut and fed (``None`` = the backbone's declared preprocessing)."""

    frames: Optional[int] = option(None, "Frames per clip (default: the backbone's).", PANEL_DATA)
    stride: Optional[int] = option(None, "Take every N-th frame (default: the backbone's).", PANEL_DATA)
    size: Optional[int] = option(None, "Square crop size in pixels (default: the backbone's).", PANEL_DATA)
    clips_per_video: int = option(
        10, "Clips spread uniformly over each video at test time; predictions are averaged per video (Karpathy used 20).",
        PANEL_DATA)
    val_clips: int = option(3, "Clips per video for the per-epoch validation.", PANEL_DATA)
    batch_size: int = option(8, "Clips per batch.", PANEL_TRAINING)
    cache: str = option("auto", "Decoded-frame cache: auto (by dataset size vs free memory), memory, disk or none.", PANEL_SPEED)
    cache_dir: Optional[Path] = option(None, "Folder of the disk frame cache (default: inside the run folder).", PANEL_SPEED)
    max_memory: Optional[str] = option(
        None, "Memory budget of the run: a size (12G, 800M) or a fraction of the memory available at start (0.8, "
              "80%). The frame cache, the frozen layers' feature stores (written to memory-mapped files in the "
              "run folder or --cache-dir past it) and the training batch (a micro-batch or gradient checkpointing "
              "is picked when a measured step would not fit) stay within it; a run that cannot fit stops before "
              "training. Default: 80% of the available memory.", PANEL_SPEED, metavar="SIZE",
        parse=check_max_memory)
    cache_format: str = option(
        DEFAULT_CACHE_FORMAT, "How the frame cache stores frames: raw (uint8 RGB: exact, nothing to decode), jpeg "
                              "(quality 90; measured 1/13 to 1/17 of raw on real videos at 256 px, 1/6 to 1/10 at "
                              "72 px, mean error 1.2-1.4 grey levels at 256 px; each clip read decodes its frames, "
                              "about 0.7 ms a frame at 256 px), or auto: raw when the raw frames fit in half the "
                              "available memory, else jpeg.", PANEL_SPEED, parse=parse_cache_format)
    cached_views: Optional[int] = option(
        None, "Fixed augmented views per training video whose frozen-prefix features are computed once "
              "(default: auto = min(epochs, 5) when a frozen prefix exists; 0 = off).", PANEL_SPEED)
    test_crops: int = option(
        1, "Spatial crops per test clip: 1 = centre, 3 = both ends and the centre of the long side (the I3D/SlowFast "
           "protocol); reports say views = N clips x M crops. Validation always takes the centre crop.", PANEL_DATA)
    crop_scale: Optional[tuple[float, float]] = option(
        None, "Training crop's share of the frame area as MIN,MAX (random resized crop; default 0.35,1.0). "
              "The papers cropped without zoom: about 0.7,0.8.", PANEL_DATA, metavar="MIN,MAX",
        cli_type=Optional[str], parse=parse_pair)
    workers: Optional[int] = option(
        None, "DataLoader worker processes (default: picked per run for the device and the frame cache; often 0, "
              "decoding in the main process, when the frames are already decoded in memory, and on CPU when the "
              "whole network trains from a frame cache).", PANEL_SPEED)
    stream: str = option(
        "rgb", "What the network sees: rgb frames; flow: dense optical flow at the same frame positions (the "
               "flow stream of two-stream networks; its first layer starts from the RGB weights averaged over colour); "
               "or two-stream: an RGB and a flow network trained under the same policy, their class probabilities "
               "fused with --fusion-weight (both saved in one model file).",
        PANEL_DATA)
    fusion_weight: Optional[float] = option(
        None, "--stream two-stream: the flow stream's share W of the fused probabilities, (1-W) x RGB + W x flow, "
              "in [0, 1] (0.5 is the papers' plain average). Default: chosen on the validation split from "
              "0, 0.1, ..., 1.", PANEL_DATA)
    fusion_rule: Optional[str] = option(
        None, "--stream two-stream: how the streams' probabilities are fused with --fusion-weight W: mean, "
              "(1-W) x RGB + W x flow (the papers' average); or geometric, RGB^(1-W) x flow^W renormalised (a weighted "
              f"average of log-probabilities: a stream unsure among some classes leaves the choice among them to the "
              f"other). Default: {DEFAULT_FUSION_RULE}.", PANEL_DATA)
    flow_method: str = option(
        DEFAULT_FLOW.method, f"Optical-flow method for --stream flow: {', '.join(FLOW_METHODS)}.", PANEL_DATA)
    flow_bound: Optional[float] = option(
        None, f"Flow is clipped to +-N pixels of the working resolution and stored as uint8 (default: "
              f"{DEFAULT_FLOW.bound:g} px at a {FLOW_BOUND_AT} px short side, as in the I3D paper, scaled with the "
              f"working resolution).", PANEL_DATA)
    flow_channels: Optional[int] = option(
        None, f"Flow channels: 2 (x, y) or 3 (x, y, magnitude). Default: the flow weights' own count (a flow network "
              f"such as i3d:kinetics400-flow: 2), else {DEFAULT_FLOW.channels}. Started from RGB weights, a 3-channel "
              f"flow network keeps the RGB filters as they are and sees x, y and the magnitude apart; a 2-channel one "
              f"has the same first-layer filter (the colour average) on x and y, so with frozen layers it sees x + y, "
              f"whose sign a reversed motion flips (top-layer on the demo's motion classes: 93% with 3, 84% with 2).",
        PANEL_DATA)
    flow_pairing: str = option(
        DEFAULT_FLOW.pairing, "Flow of each sampled frame to the next video frame (next-frame), or to the next "
                              "sampled frame (next-sampled: the motion over --stride frames).", PANEL_DATA)

    def flow_settings(self, short_side: int | None = None, weights_channels: int | None = None) -> FlowSettings | None:
        """The flow a ``--stream flow`` or ``two-stream`` run computes at working resolution ``short_side`` (``None`` for RGB).

        An unset ``--flow-bound`` is the default bound scaled to ``short_side`` (unscaled when it is not known
        yet, for checking); unset ``--flow-channels`` are ``weights_channels`` (what the flow network's weights
        take, when they fix it), else the default's. Raises :class:`ConfigError` on a bad value.
        """
        if self.stream not in STREAMS:
            raise ConfigError(f"--stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        if self.fusion_rule is not None:
            if self.fusion_rule not in FUSION_RULES:
                raise ConfigError(f"--fusion-rule must be one of {', '.join(FUSION_RULES)}; got {self.fusion_rule!r}")
            if self.stream != "two-stream":
                raise ConfigError(f"--fusion-rule fuses the streams of --stream two-stream; this run is --stream {self.stream}")
        if self.fusion_weight is not None:
            if self.stream != "two-stream":
                raise ConfigError(f"--fusion-weight weighs the streams of --stream two-stream; this run is --stream {self.stream}")
            if not (isinstance(self.fusion_weight, (int, float)) and 0.0 <= self.fusion_weight <= 1.0):
                raise ConfigError(f"--fusion-weight is the flow stream's share, in [0, 1]; got {self.fusion_weight!r}")
        if self.stream not in FLOW_STREAMS:
            return None
        bound = self.flow_bound
        if bound is None:
            bound = round(DEFAULT_FLOW.bound * (short_side or FLOW_BOUND_AT) / FLOW_BOUND_AT, 2)
        channels = self.flow_channels if self.flow_channels is not None else weights_channels or DEFAULT_FLOW.channels
        return FlowSettings(self.flow_method, bound, channels, self.flow_pairing)


@dataclass
class ModelConfig:
    """Which network, with which weights."""

    backbone: str = option(
        "i3d", "Backbone name (`vtransfer backbones` lists every family with its presets, input, parameters and "
               "weight sources), or hf:REPO_OR_DIR for a Hugging Face video classifier (VideoMAE, TimeSformer, ViViT, "
               "V-JEPA 2; a hub repo or a save_pretrained folder; needs pip install \"vtransfer\\[hf]\"), which brings its "
               "own weights (its classifier is replaced when your class count differs); --weights then only takes a "
               "vtransfer checkpoint of the same hf: model.",
        PANEL_MODEL, flags=("-b",))
    preset: Optional[str] = option(
        None, "Architecture preset (see `vtransfer backbones`); default: the backbone's default.", PANEL_MODEL)
    weights: Optional[str] = option(
        None, "Pretrained weights: a source name (i3d:kinetics400, ...), a registered name, or a file. "
              "Default: random init.", PANEL_MODEL, flags=("-w",))
    dropout: Optional[float] = option(
        None, "Dropout rate of the backbone's classifier-side dropout (default: the preset's).", PANEL_MODEL)
    flow_weights: Optional[str] = option(
        None, "--stream two-stream: the flow network's pretrained weights (default: --weights when they can start a "
              "flow network, as ImageNet weights can by averaging over colour; else the source's flow twin, e.g. "
              "i3d:kinetics400-flow for i3d:kinetics400).", PANEL_MODEL)


@dataclass
class PolicyConfig:
    """What trains."""

    policy: str = option(
        DEFAULT_POLICY, "Policy: the papers' freezing policies scratch, top-layer, top-3, temporal, all; the "
                        "parameter-efficient bitfit (biases and norms), lora, adapter (ST-Adapter), attentive-probe "
                        "(cross-attention pooling on frozen features); or auto (cached-feature policies in "
                        "full, then the --auto-trials cheapest others for --auto-epochs epochs each; the best on the "
                        "validation split is trained in full; RUN/auto.json says what was tried and why it won).",
        PANEL_MODEL, flags=("-p",))
    train_groups: Optional[list[str]] = option(
        None, "Custom set of layer groups to train, comma-separated names or globs (e.g. 'spatial*,temporal*'); "
              "overrides --policy. The new classifier always trains.", PANEL_MODEL, metavar="GROUP[,GROUP...]",
        cli_name="train", cli_type=Optional[str], parse=split_list)
    lora_rank: int = option(8, "Rank r of each LoRA update (--policy lora).", PANEL_MODEL)
    lora_alpha: float = option(16.0, "LoRA scale: the update is multiplied by alpha / rank.", PANEL_MODEL)
    lora_targets: Optional[list[str]] = option(
        None, "Comma-separated layer names or globs LoRA adapts (default: vivit's qkv,proj,fc1,fc2 of every block; "
              "CNNs: every ungrouped conv).", PANEL_MODEL, metavar="LAYER[,LAYER...]", cli_type=Optional[str],
        parse=split_list)
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch's input.", PANEL_MODEL)
    merge: bool = option(False, "Fold the LoRA updates into the weights when training ends, so the saved model "
                                "loads without peft (--policy lora).", PANEL_MODEL)
    adapter_ratio: float = option(
        0.5, "ST-Adapter bottleneck width as a fraction of the channels where it sits (0.5: the paper's 384 of "
             "ViT-B's 768; --policy adapter).", PANEL_MODEL)
    probe_heads: int = option(8, "Attention heads of the attentive probe (--policy attentive-probe).", PANEL_MODEL)
    probe_dim: Optional[int] = option(
        None, "Attention width of the attentive probe (default: the feature width); lower it to shrink the probe.",
        PANEL_MODEL)
    auto_trials: int = option(3, "--policy auto: how many policies besides the cached-feature ones get a short trial.",
                              PANEL_MODEL)
    auto_epochs: int = option(3, "--policy auto: epochs of each short trial.", PANEL_MODEL)


@dataclass
class TrainingConfig:
    """The optimisation (``None`` = the backbone family's default, see ``vtransfer backbones``)."""

    epochs: Optional[int] = option(
        None, "Maximum number of epochs (default: 30 for top-layer and attentive-probe, whose epochs on cached "
              "features cost almost nothing; 10 for the other policies).", PANEL_TRAINING, flags=("-e",))
    lr: Optional[float] = option(None, "Peak learning rate (default: the backbone's; `vtransfer backbones` lists them).",
                                 PANEL_TRAINING)
    optimizer: str = option(
        "auto", "auto (the backbone family's, as `vtransfer backbones` lists: SGD+momentum for the CNNs trained that way, "
                "AdamW for transformers and EfficientNets), sgd or adamw.",
        PANEL_TRAINING)
    weight_decay: Optional[float] = option(
        None, "Weight decay (default: the backbone's; 5e-4 with SGD, 0.05 with AdamW).", PANEL_TRAINING)
    head_lr_scale: Optional[float] = option(
        None, "Learning rate of the new classifier over pretrained layers, as a multiple of --lr (default: the "
              "backbone family's, see `vtransfer backbones`; scratch always uses 1).", PANEL_TRAINING)
    warmup_epochs: float = option(1.0, "Linear LR warm-up length in epochs, then cosine decay.", PANEL_TRAINING)
    patience: int = option(5, "Stop after this many epochs without a better validation video accuracy (0: never).",
                           PANEL_TRAINING)
    precision: str = option("fp32", "fp32 or bf16 (autocast; faster matmuls on recent CPUs and GPUs).", PANEL_SPEED)
    seed: int = option(0, "Random seed for initialisation, sampling and augmentation.", PANEL_TRAINING)
    balance: str = option(
        "none", "Class imbalance handling: none, weights (inverse-frequency loss weights) or sampler "
                "(class-balanced sampling).", PANEL_TRAINING)
    max_bad_fraction: float = option(
        0.2, "Stop the run when more than this fraction of an epoch's clips fail to decode.", PANEL_TRAINING)
    deterministic: bool = option(False, "Deterministic kernels (bit-reproducible CPU runs).", PANEL_TRAINING)
    micro_batch: Optional[int] = option(
        None, "Clips per forward/backward pass; gradients are summed over ceil(--batch-size / N) passes before one "
              "optimiser step, so --batch-size stays the effective batch and the lr schedule is unchanged.", PANEL_SPEED)
    ema_decay: Optional[float] = option(
        None, "Validate and save an exponential moving average of the weights with this decay in [0, 1), e.g. 0.999 "
              "(warms up over the first steps); each epoch's line and the report show the raw weights' validation "
              "accuracy beside it.", PANEL_TRAINING)
    mixup: float = option(0.0, "Mixup of whole clips with Beta(A, A), e.g. 0.8 (0: off); needs a policy that trains "
                               "from the input (all, scratch).", PANEL_TRAINING)
    cutmix: float = option(0.0, "Video cutmix (one box in every frame) with Beta(A, A), e.g. 1.0 (0: off); with "
                                "--mixup, one of the two per batch; needs a policy that trains from the input.",
                           PANEL_TRAINING)
    layer_decay: Optional[float] = option(
        None, "Layer-wise lr decay: layer group i trains at lr * D^(groups - 1 - i), the head at the full lr "
              "(e.g. 0.75 for transformers).", PANEL_TRAINING)
    grad_checkpointing: bool = option(
        False, "Recompute each trainable layer group's activations in the backward pass: less memory, about "
               "1.3-1.7x the step time.", PANEL_SPEED)
    calibrate: bool = option(
        False, "Fit a temperature on the validation split's clip scores after training, store it in "
               "model.safetensors, and use it for the test report, evaluate and predict.", PANEL_TRAINING)


#: ``--optimizer`` choices ("auto": the backbone family's).
OPTIMIZERS = ("auto", "sgd", "adamw")
#: ``--balance`` choices.
BALANCE_MODES = ("none", "weights", "sampler")


def check_ema_decay(decay: float | None) -> None:
    """Raise :class:`ConfigError` unless ``decay`` is ``None`` (off) or in ``[0, 1)``."""
    if decay is not None and not 0.0 <= decay < 1.0:
        raise ConfigError(f"--ema-decay must be in [0, 1) (e.g. 0.999; leave it unset for no EMA), got {decay!r}")


def check_mixing(mixup: float, cutmix: float) -> None:
    """Raise :class:`ConfigError` unless both mixup/cutmix alphas are finite and >= 0 (0 = off)."""
    for name, alpha in (("--mixup", mixup), ("--cutmix", cutmix)):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"{name} is the Beta(alpha, alpha) parameter: a number >= 0 (0 = off, e.g. 0.8), "
                              f"got {alpha!r}")


def check_layer_decay(decay: float | None) -> None:
    """Raise :class:`ConfigError` unless ``decay`` is ``None`` (off) or in ``(0, 1]``."""
    if decay is not None and not (math.isfinite(decay) and 0.0 < decay <= 1.0):
        raise ConfigError(f"--layer-decay must be in (0, 1] (e.g. 0.75; 1 = every layer at the same lr), got {decay!r}")


def check_training(training: TrainingConfig, clips: ClipConfig) -> None:
    """Raise :class:`ConfigError` naming the first optimisation option out of range.

    Checks the choices (``--optimizer``, ``--balance``), ``--epochs`` and
    ``--batch-size`` at least 1 (an unset ``--epochs`` takes its policy's
    default later), ``--micro-batch``, ``--ema-decay``, ``--mixup``/``--cutmix``,
    ``--layer-decay`` and ``--head-lr-scale`` > 0, and ``--max-memory`` (a size or
    a fraction; :func:`vtransfer.utils.memory_budget.parse_max_memory`). Cheap and data-free: runs
    before any video is read (:func:`vtransfer.api.finetune`,
    :func:`vtransfer.workflows.pipeline.run_finetune`, ``compare-policies``'
    planning) and again when :func:`resolve_training` builds the trainer's view.
    """
    t = training
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.balance not in BALANCE_MODES:
        raise ConfigError(f"--balance must be one of {BALANCE_MODES}, got {t.balance!r}")
    if t.epochs is not None and t.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    if clips.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if t.micro_batch is not None and t.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be at least 1 (or unset: the whole --batch-size at once), "
                          f"got {t.micro_batch}")
    check_ema_decay(t.ema_decay)
    check_mixing(t.mixup, t.cutmix)
    check_layer_decay(t.layer_decay)
    if t.head_lr_scale is not None and t.head_lr_scale <= 0:
        raise ConfigError(f"--head-lr-scale must be > 0, got {t.head_lr_scale:g}")
    clips.flow_settings()  # --stream and the --flow-* options
    check_max_memory(clips.max_memory)


@dataclass(frozen=True)
class ResolvedTraining:
    """The optimisation a trainer runs: the training options with every backbone-dependent default filled in.

    Built by :func:`resolve_training`. ``training`` holds the options as given
    (``epochs`` filled from the policy when unset); the other fields are what
    they resolved to: the optimiser, learning rate, weight decay and head
    learning-rate scale of the backbone family (its ``TRAINING_DEFAULTS``)
    where the user gave none, and the batch size of one optimiser step.
    """

    training: TrainingConfig
    batch_size: int
    optimizer: str  # "sgd" or "adamw", never "auto"
    lr: float
    weight_decay: float
    head_lr_scale: float  # the new classifier's lr / lr
    momentum: float = 0.9  # SGD's momentum (not a run option)
    label_smoothing: float = 0.0  # of the cross-entropy (not a run option)

    @property
    def epochs(self) -> int:
        """The number of epochs to train (filled from the policy when ``--epochs`` was not given)."""
        return int(self.training.epochs)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Every setting the trainer uses, flat (a run's ``config.json`` ``resolved.train`` table)."""
        t = self.training
        return {
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
            "weight_decay": self.weight_decay, "momentum": self.momentum, "warmup_epochs": t.warmup_epochs,
            "patience": t.patience, "precision": t.precision, "seed": t.seed, "balance": t.balance,
            "max_bad_fraction": t.max_bad_fraction, "label_smoothing": self.label_smoothing,
            "head_lr_scale": self.head_lr_scale, "micro_batch": t.micro_batch, "ema_decay": t.ema_decay,
            "mixup": t.mixup, "cutmix": t.cutmix, "layer_decay": t.layer_decay,
            "grad_checkpointing": t.grad_checkpointing,
        }


def resolve_training(cfg: "RunConfig", family: dict[str, Any]) -> ResolvedTraining:
    """The trainer's view of ``cfg``: :func:`check_training`, then the backbone family's defaults filled in.

    ``family`` is the backbone family's ``TRAINING_DEFAULTS``
    (:func:`vtransfer.models.registry.training_defaults`; ``vtransfer
    backbones`` lists them: SGD+momentum for Karpathy's and I3D's CNNs, AdamW
    for ViViT and effnet3d). It gives the optimiser for ``auto``, and the lr
    and weight decay when unset; those are for the family's own optimiser, so
    another optimiser gets 3e-4 / 0.05 (AdamW) or 1e-2 / 5e-4 (SGD). An unset
    ``--epochs`` takes the policy's default (:meth:`RunConfig.with_policy_epochs`).
    """
    cfg = cfg.with_policy_epochs()
    t, clips = cfg.training, cfg.clips
    check_training(t, clips)
    opt = family["optimizer"] if t.optimizer == "auto" else t.optimizer
    same = opt == family["optimizer"]  # the family's lr/decay are for its own optimiser
    lr = t.lr if t.lr is not None else (family["lr"] if same else (3e-4 if opt == "adamw" else 1e-2))
    wd = t.weight_decay if t.weight_decay is not None else (
        family["weight_decay"] if same else (0.05 if opt == "adamw" else 5e-4))
    head = t.head_lr_scale if t.head_lr_scale is not None else float(family.get("head_lr_scale", 1.0))
    if head <= 0:
        raise ConfigError(f"--head-lr-scale must be > 0, got {head:g}")
    given = dataclasses.replace(t, epochs=int(t.epochs), warmup_epochs=float(t.warmup_epochs),  # type: ignore[arg-type]
                                patience=int(t.patience), seed=int(t.seed), max_bad_fraction=float(t.max_bad_fraction))
    return ResolvedTraining(training=given, batch_size=int(clips.batch_size), optimizer=opt, lr=lr, weight_decay=wd,
                            head_lr_scale=head)


@dataclass
class RuntimeConfig:
    """Where and how the run executes, and what it logs besides its run folder."""

    threads: Optional[int] = option(
        None, "torch intra-op threads (default: picked for this machine from the CPUs this process may use).", PANEL_SPEED)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", PANEL_SPEED)
    tensorboard: bool = option(False, "Also log each epoch to RUN/tensorboard (needs the tensorboard package).",
                               PANEL_OUTPUT)
    report_videos: int = option(
        8, "Test videos the report draws as frame strips with where the model looked (Grad-CAM) and which frames "
            "mattered (as the explain command draws them): the misclassified ones, most confident first, then one "
            "correct video per class and the least confident correct ones, up to this many (0: none).", PANEL_OUTPUT)

    def __post_init__(self) -> None:
        if isinstance(self.report_videos, bool) or not isinstance(self.report_videos, int) or self.report_videos < 0:
            raise ConfigError(f"--report-videos must be a whole number >= 0, got {self.report_videos!r}")


SECTIONS: dict[str, type] = {  # in the order --help shows them
    "model": ModelConfig, "policy": PolicyConfig, "training": TrainingConfig, "data": DataConfig,
    "clips": ClipConfig, "runtime": RuntimeConfig,
}
#: Options of a run that belong to no section: where it is written and what it was pretrained from.
RUN_KEYS = ("out", "pretrain_source")


def _fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every option name -> (its section, its field)."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in out:  # pragma: no cover - a declaration error caught by the tests
                raise AssertionError(f"option {f.name!r} is declared in two sections")
            out[f.name] = (section, f)
    return out


FIELDS = _fields()
OPTION_NAMES = tuple(FIELDS)


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(SECTIONS[section], globalns=globals())[name]


@dataclass
class RunConfig:
    """Every option of one run, by section; see the module docstring."""

    data: DataConfig = field(default_factory=DataConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    out: Optional[Path] = None
    pretrain_source: Optional[dict] = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, *, strict: bool = True, **more: Any) -> "RunConfig":
        """A configuration from flat option values (API keywords, a ``config.json`` ``options`` table).

        Missing options take their defaults. An unknown name raises
        :class:`TypeError` naming the valid ones when ``strict``, and is
        ignored otherwise (old ``config.json`` files may hold retired keys).
        """
        values = {**(options or {}), **more}
        unknown = [k for k in values if k not in FIELDS and k not in RUN_KEYS]
        if unknown and strict:
            raise TypeError(f"unknown run option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(OPTION_NAMES)}")
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in values.items():
            if key in FIELDS:
                section, _ = FIELDS[key]
                parts[section][key] = _normalised(key, value)
        return cls(**{s: SECTIONS[s](**kw) for s, kw in parts.items()},
                   out=values.get("out"), pretrain_source=values.get("pretrain_source"))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RunConfig":
        """Read back :meth:`to_json` (or a whole ``config.json``: its ``options`` table), old files included."""
        options = doc.get("options", doc) if isinstance(doc.get("options"), dict) else doc
        return cls.from_options(options, strict=False)

    def options(self) -> dict[str, Any]:
        """Every option as one flat ``name -> value`` dict (the API's keywords)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        out.update(out=self.out, pretrain_source=self.pretrain_source)
        return out

    def to_json(self) -> dict[str, Any]:
        """The flat options as JSON types (paths as text, tuples as lists): a ``config.json``'s ``options`` table."""
        return to_jsonable(self.options())

    def replace(self, **options: Any) -> "RunConfig":
        """A copy with some flat options changed (unknown names raise :class:`TypeError`)."""
        return RunConfig.from_options({**self.options(), **options})

    def with_policy_epochs(self) -> "RunConfig":
        """This configuration with ``epochs`` filled from the policy's default when it is ``None``."""
        if self.training.epochs is not None:
            return self
        return self.replace(epochs=default_epochs(self.policy.policy))


def _normalised(key: str, value: Any) -> Any:
    """A value as the field holds it: JSON lists back to tuples for tuple fields, text parsed for parsed fields."""
    if value is None:
        return None
    meta = FIELDS[key][1].metadata
    if meta.get("parse") is not None and isinstance(value, str):
        return meta["parse"](value)
    if key in ("ratios", "crop_scale"):
        return tuple(value)
    if key in ("train_groups", "lora_targets"):
        return list(value)
    return value


def run_parameters(exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """Keyword-only :class:`inspect.Parameter` objects for every run option (the API's signature), in section order.

    ``exclude`` leaves some out; ``defaults`` changes some defaults (``pretrain`` trains 20 epochs).
    """
    defaults = defaults or {}
    params = []
    for name, (section, f) in FIELDS.items():
        if name in exclude:
            continue
        default = defaults.get(name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=_field_type(section, name)))
    for name, annotation in (("out", Optional[Path]), ("pretrain_source", Optional[dict])):
        if name not in exclude:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return params


def option_help(name: str) -> str:
    """The ``--help`` text of run option ``name``."""
    return FIELDS[name][1].metadata["help"]
