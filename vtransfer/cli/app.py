"""The Typer application object and the shared Rich console.

Command modules (``vtransfer/cli/*_cmds.py``) register their commands on
:data:`app`. They import only typer/rich at module level; heavy imports
(torch, av) happen inside the command functions so ``--help`` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from vtransfer.cli.options import HelpGroup
from vtransfer.utils.version import package_version

app = typer.Typer(
    name="vtransfer",
    help="Transfer learning for video classification: pretrained backbones, freezing policies, per-category reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=HelpGroup,  # flags show no "<bool>"
)

console = Console()
err_console = Console(stderr=True)

# Commands that load torch and read videos for seconds to minutes before their first progress bar.
PREPARING_COMMANDS = frozenset({"finetune", "pretrain", "compare-policies", "evaluate", "predict", "explain", "demo"})


def require_data(data: Path | None) -> None:
    """Fail at once, before torch is imported, when the dataset path does not exist (the scanner's own message).

    A training command calls it first thing, so a mistyped path costs a second, not the ten it takes to load torch.
    """
    from vtransfer.utils.errors import DatasetError

    if data is not None and not Path(data).exists():
        raise DatasetError(f"dataset folder {os.path.abspath(data)} does not exist")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"vtransfer {package_version()}")
        raise typer.Exit()


def _show_starting(ctx: typer.Context) -> None:
    """In a terminal, a spinner from the start of a preparing command until its first bar (erased when it ends)."""
    command = ctx.invoked_subcommand
    if command not in PREPARING_COMMANDS or any(a in ctx.help_option_names for a in sys.argv[1:]):
        return
    from vtransfer.reporting.progress import status_line

    line = status_line(console)
    line.show(f"{command}: starting (loading PyTorch), then reading and checking the videos", terminal_only=True)
    ctx.call_on_close(line.clear)


@app.callback()
def _root(
    ctx: typer.Context,
    show_version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version,
                                      is_eager=True),
) -> None:
    """Transfer learning for video classification: pretrained backbones, freezing policies, per-category reports."""
    _show_starting(ctx)
