"""Option types shared by the training commands, and the help layout every command uses.

Each alias carries its flag name, default-free help and panel, so every
command that trains spells the same option the same way. Options that take
a list say what goes in it (``POLICY[,POLICY...]``); :class:`HelpCommand` and
:class:`HelpGroup` make ``--help`` name arguments as the docs do (``DATA``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

_D = "Data"
_M = "Model"
_T = "Training"
_S = "Speed and resources"
_O = "Output"

Data = Annotated[Path, typer.Argument(help="Dataset folder (DATA/<class>/<video> or DATA/{train,val,test}/<class>/<video>) or a split manifest CSV.")]
Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe with option values (command-line options win).", rich_help_panel=_O)]

Backbone = Annotated[str, typer.Option("--backbone", "-b", help="Backbone: slowfusion, i3d, vivit or effnet3d (see `vtransfer backbones`), or hf:REPO_OR_DIR for a Hugging Face video classifier (VideoMAE, TimeSformer, ViViT, V-JEPA 2; a hub repo or a save_pretrained folder; needs pip install \"vtransfer[hf]\"), which brings its own weights (its classifier is replaced when your class count differs); --weights then only takes a vtransfer checkpoint of the same hf: model.", rich_help_panel=_M)]
Preset = Annotated[Optional[str], typer.Option("--preset", help="Architecture preset (see `vtransfer backbones`); default: the backbone's default.", rich_help_panel=_M)]
Weights = Annotated[Optional[str], typer.Option("--weights", "-w", help="Pretrained weights: a source name (i3d:kinetics400, ...), a registered name, or a file. Default: random init.", rich_help_panel=_M)]
Policy = Annotated[str, typer.Option("--policy", "-p", help="Freezing policy: scratch, top-layer, top-3, temporal, all.", rich_help_panel=_M)]
TrainGroups = Annotated[Optional[str], typer.Option("--train", metavar="GROUP[,GROUP...]", help="Custom set of layer groups to train, comma-separated names or globs (e.g. 'spatial*,temporal*'); overrides --policy. The new classifier always trains.", rich_help_panel=_M)]
Dropout = Annotated[Optional[float], typer.Option("--dropout", help="Dropout rate of the backbone's classifier-side dropout (default: the preset's).", rich_help_panel=_M)]

Epochs = Annotated[Optional[int], typer.Option("--epochs", "-e", help="Maximum number of epochs (default: 30 for top-layer, whose epochs on cached features cost almost nothing; 10 for the other policies).", rich_help_panel=_T)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Clips per batch.", rich_help_panel=_T)]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the backbone's; `vtransfer backbones` lists them).", rich_help_panel=_T)]
Optimizer = Annotated[str, typer.Option("--optimizer", help="auto (the backbone's: SGD+momentum for slowfusion and i3d, AdamW for vivit and effnet3d), sgd or adamw.", rich_help_panel=_T)]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay (default: the backbone's; 5e-4 with SGD, 0.05 with AdamW).", rich_help_panel=_T)]
HeadLrScale = Annotated[Optional[float], typer.Option("--head-lr-scale", help="Learning rate of the new classifier over pretrained layers, as a multiple of --lr (default: the backbone's; 10 for effnet3d, 1 for the others; scratch always uses 1).", rich_help_panel=_T)]
Warmup = Annotated[float, typer.Option("--warmup-epochs", help="Linear LR warm-up length in epochs, then cosine decay.", rich_help_panel=_T)]
Patience = Annotated[int, typer.Option("--patience", help="Stop after this many epochs without a better validation video accuracy (0: never).", rich_help_panel=_T)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for initialisation, sampling and augmentation.", rich_help_panel=_T)]
Balance = Annotated[str, typer.Option("--balance", help="Class imbalance handling: none, weights (inverse-frequency loss weights) or sampler (class-balanced sampling).", rich_help_panel=_T)]
Precision = Annotated[str, typer.Option("--precision", help="fp32 or bf16 (autocast; faster matmuls on recent CPUs and GPUs).", rich_help_panel=_S)]

Frames = Annotated[Optional[int], typer.Option("--frames", help="Frames per clip (default: the backbone's).", rich_help_panel=_D)]
Stride = Annotated[Optional[int], typer.Option("--stride", help="Take every N-th frame (default: the backbone's).", rich_help_panel=_D)]
Size = Annotated[Optional[int], typer.Option("--size", help="Square crop size in pixels (default: the backbone's).", rich_help_panel=_D)]
ClipsPerVideo = Annotated[int, typer.Option("--clips-per-video", help="Clips spread uniformly over each video at test time; predictions are averaged per video (Karpathy used 20).", rich_help_panel=_D)]
ValClips = Annotated[int, typer.Option("--val-clips", help="Clips per video for the per-epoch validation.", rich_help_panel=_D)]
Categories = Annotated[Optional[Path], typer.Option("--categories", help="CSV class,category for per-category accuracy.", rich_help_panel=_D)]
Manifest = Annotated[Optional[Path], typer.Option("--manifest", help="Reuse the split in this manifest CSV (path,class,split,group).", rich_help_panel=_D)]
SplitFiles = Annotated[Optional[Path], typer.Option("--split-files", help="UCF-101-style trainlist/testlist file or folder.", rich_help_panel=_D)]
SplitSeed = Annotated[int, typer.Option("--split-seed", help="Seed of the stratified train/val/test split.", rich_help_panel=_D)]
Ratios = Annotated[str, typer.Option("--ratios", metavar="TRAIN,VAL,TEST", help="train,val,test fractions of the automatic split.", rich_help_panel=_D)]
GroupPattern = Annotated[Optional[str], typer.Option("--group-pattern", help="Regex whose capture keeps related clips in one split (UCF-101: '_(g\\d+)_', KTH: '(person\\d+)').", rich_help_panel=_D)]

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_S)]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes (default: picked per run for the device and the frame cache; often 0, decoding in the main process, when the frames are already decoded in memory).", rich_help_panel=_S)]
Threads = Annotated[Optional[int], typer.Option("--threads", help="torch intra-op threads (default: picked for this machine from the CPUs this process may use).", rich_help_panel=_S)]
Cache = Annotated[str, typer.Option("--cache", help="Decoded-frame cache: auto (by dataset size vs free memory), memory, disk or none.", rich_help_panel=_S)]
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help="Folder of the disk frame cache (default: inside the run folder).", rich_help_panel=_S)]
CachedViews = Annotated[Optional[int], typer.Option("--cached-views", help="Fixed augmented views per training video whose frozen-prefix features are computed once (default: auto = min(epochs, 5) when a frozen prefix exists; 0 = off).", rich_help_panel=_S)]
CropScale = Annotated[Optional[str], typer.Option("--crop-scale", metavar="MIN,MAX", help="Training crop's share of the frame area as MIN,MAX (random resized crop; default 0.35,1.0). The papers cropped without zoom: about 0.7,0.8.", rich_help_panel=_D)]
TensorBoard = Annotated[bool, typer.Option("--tensorboard", help="Also log each epoch to RUN/tensorboard (needs the tensorboard package).", rich_help_panel=_O)]
MaxBad = Annotated[float, typer.Option("--max-bad-fraction", help="Stop the run when more than this fraction of an epoch's clips fail to decode.", rich_help_panel=_T)]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels (bit-reproducible CPU runs).", rich_help_panel=_T)]

Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<backbone>-<policy>-<time>).", rich_help_panel=_O)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty run folder.", rich_help_panel=_O)]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.", rich_help_panel=_O)]


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> (0.7, 0.15, 0.15); must be three non-negative numbers summing to 1."""
    from vtransfer.errors import ConfigError

    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError as e:
        raise ConfigError(f"--ratios {text!r}: expected three numbers like 0.7,0.15,0.15") from e
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ConfigError(f"--ratios {text!r}: expected three non-negative fractions summing to 1")
    return parts  # type: ignore[return-value]


def parse_pair(text: str | list | None, option: str) -> tuple[float, float] | None:
    """``"0.5,1.0"`` (or a two-number list from a recipe) -> (0.5, 1.0); ``None`` stays ``None``."""
    from vtransfer.errors import ConfigError

    if text is None:
        return None
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        lo, hi = (float(x) for x in items)
    except ValueError as e:
        raise ConfigError(f"{option} {text!r}: expected two numbers like 0.5,1.0") from e
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{option} {text!r}: expected 0 < MIN <= MAX <= 1")
    return lo, hi


def split_list(text: str | list | None) -> list[str] | None:
    """Comma-separated text (or a list from a recipe) -> list of stripped names."""
    if text is None:
        return None
    items = text if isinstance(text, list) else str(text).split(",")
    return [str(t).strip() for t in items if str(t).strip()]


# --------------------------------------------------------------------------- help layout
#
# Typer labels every parameter with its Python type: ``<bool>`` beside a flag,
# ``<list[Path]>`` beside a list, and a lowercase ``{data}`` for an argument in
# the usage line. The classes below keep Typer's layout and print what the
# README prints instead: DATA, VIDEO..., flags without a type.


class _Argument(TyperArgument):
    """A positional argument whose type column shows the element type of a list (``<path>``)."""

    def display_type_rich(self, ctx: Any) -> str | None:  # noqa: D102 - typer's hook
        label = super().display_type_rich(ctx)
        element = re.fullmatch(r"<list\[(\w+)\]>", label or "")
        return f"<{element.group(1).lower()}>" if element else label


def _tidy(param: Any) -> None:
    """Name an argument in capitals (its own metavar, else its name) and drop the type label of a flag."""
    if isinstance(param, TyperArgument):
        param.__class__ = _Argument  # same object, one display method changed
        if param.metavar is None:
            param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
    elif isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
        param.metavar = ""


class _TidyHelp:
    """What :class:`HelpCommand` and :class:`HelpGroup` share: tidy parameters, a ``--help`` without a type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        for param in self.params:  # type: ignore[attr-defined]
            _tidy(param)

    def get_help_option(self, ctx: Any) -> Any:  # noqa: D102 - click's hook
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _tidy(option)
        return option


class HelpCommand(_TidyHelp, TyperCommand):
    """A command whose ``--help`` names its arguments as the docs do: ``Usage: vtransfer predict [OPTIONS] MODEL VIDEO...``.

    Give it to every command: ``@app.command(cls=HelpCommand)``.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS]``, then each argument as ``DATA`` (required) or ``[DATA]`` (optional)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class HelpGroup(_TidyHelp, TyperGroup):
    """A command group (``vtransfer weights``) with the same ``--help`` layout as :class:`HelpCommand`:
    ``typer.Typer(cls=HelpGroup)``."""
