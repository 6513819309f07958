"""The Typer application object and the shared Rich console.

Command modules (``vtransfer/cli/*_cmds.py``) register their commands on
:data:`app`. They import only typer/rich at module level; heavy imports
(torch, av) happen inside the command functions so ``--help`` is instant.
"""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="vtransfer",
    help="Transfer learning for video classification: pretrained backbones, freezing policies, per-category reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"vtransfer {version('vtransfer')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            typer.echo("vtransfer (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", help="Print the version and exit.", callback=_print_version,
                                      is_eager=True),
) -> None:
    """Transfer learning for video classification: pretrained backbones, freezing policies, per-category reports."""
