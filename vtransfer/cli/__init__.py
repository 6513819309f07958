"""Command-line entry point: ``vtransfer`` and ``python -m vtransfer``.

Importing this package loads typer and rich only: every command imports
torch, av and the rest inside its own function, so ``vtransfer --help`` and
a mistyped command answer at once.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from vtransfer.cli.app import app, err_console
from vtransfer.utils.errors import VtransferError


def _register_commands() -> None:
    """Import every ``vtransfer/cli/*_cmds.py`` module so its commands register on the app."""
    package_dir = Path(__file__).parent
    for module in sorted(pkgutil.iter_modules([str(package_dir)]), key=lambda m: m.name):
        if module.name.endswith("_cmds"):
            importlib.import_module(f"vtransfer.cli.{module.name}")


def prepare_process() -> None:
    """What the command does before anything imports torch: the OpenMP defaults of a shared machine, and malloc.

    Sets each variable of :data:`vtransfer.utils.runtime.THREAD_ENVIRONMENT` that the
    user has not set (libgomp reads them once, when torch loads it), and keeps large
    tensors' memory in the process (:func:`vtransfer.utils.allocator.tune_malloc`;
    ``VTRANSFER_MALLOC=default`` opts out).
    """
    from vtransfer.utils.allocator import tune_malloc
    from vtransfer.utils.runtime import apply_thread_environment

    apply_thread_environment()
    tune_malloc()


def main() -> None:
    """Run the CLI; user errors print one red line (no traceback) and exit with code 2 (130 when interrupted)."""
    prepare_process()
    _register_commands()
    try:
        app()
    except VtransferError as e:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
