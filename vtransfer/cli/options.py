"""Option types shared by the commands, and the help layout every command uses.

The run options (``--backbone``, ``--frames``, ...) are declared once, in
:mod:`vtransfer.run_config`; the aliases here are generated from those
declarations for the commands that take a few of them by hand (``evaluate``,
``predict``, ``extract-features``, ``inspect``), while the training commands
take them all through :func:`vtransfer.cli.run_options.with_run_options`. Options that take
a list say what goes in it (``POLICY[,POLICY...]``); :class:`HelpCommand` and
:class:`HelpGroup` make ``--help`` name arguments as the docs do (``DATA``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from vtransfer.cli.run_options import run_option
from vtransfer.run_config import PANEL_OUTPUT as _O
from vtransfer.run_config import parse_pair, parse_ratios, split_list  # noqa: F401 - the commands use O.split_list etc.

Data = Annotated[Path, typer.Argument(help="Dataset folder (DATA/<class>/<video> or DATA/{train,val,test}/<class>/<video>) or a split manifest CSV.")]
Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe with option values (command-line options win).", rich_help_panel=_O)]

# Run options: declared once in vtransfer.run_config, turned into Typer options here (see vtransfer.cli.run_options).
Backbone = run_option("backbone")
Preset = run_option("preset")
TrainGroups = run_option("train_groups")
BatchSize = run_option("batch_size")
Precision = run_option("precision")
Frames = run_option("frames")
Stride = run_option("stride")
Size = run_option("size")
ClipsPerVideo = run_option("clips_per_video")
Categories = run_option("categories")
Manifest = run_option("manifest")
SplitFiles = run_option("split_files")
SplitSeed = run_option("split_seed")
Ratios = run_option("ratios")
GroupPattern = run_option("group_pattern")
Device = run_option("device")
Workers = run_option("workers")
Threads = run_option("threads")
Cache = run_option("cache")
CacheDir = run_option("cache_dir")
TestCrops = run_option("test_crops")
LoraRank = run_option("lora_rank")
LoraTargets = run_option("lora_targets")
AdapterRatio = run_option("adapter_ratio")
ProbeDim = run_option("probe_dim")
Calibrated = Annotated[bool, typer.Option("--calibrated/--uncalibrated", help="Scale clip scores by the temperature a --calibrate run stored in the model (if any); --uncalibrated uses the raw softmax scores.", rich_help_panel=_O)]

Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<backbone>-<policy>-<time>).", rich_help_panel=_O)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty run folder.", rich_help_panel=_O)]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.", rich_help_panel=_O)]


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
