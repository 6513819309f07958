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
