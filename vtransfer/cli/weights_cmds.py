"""``vtransfer weights list|add|fetch``: the weight sources and the local cache.

Thin skins over :mod:`vtransfer.loading.sources` and :mod:`vtransfer.weights.hub`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from vtransfer.cli.app import app, console
from vtransfer.cli.options import HelpCommand, HelpGroup

weights_app = typer.Typer(
    help="Weight sources: list them, register your own files, download built-in ones.",
    no_args_is_help=True,
    cls=HelpGroup,
)
app.add_typer(weights_app, name="weights")


@weights_app.command("list", cls=HelpCommand)
def list_command(
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Only sources for this backbone."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List built-in and registered weight sources and whether each file is present locally."""
    from vtransfer.loading.sources import list_sources
    from vtransfer.weights.hub import weights_dir

    rows = list_sources(backbone)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Weight sources (cache: {weights_dir()})", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("backbone")
    table.add_column("pretrained on")
    table.add_column("local")
    table.add_column("file", overflow="fold")
    unavailable = []
    for r in rows:
        if not r["available"]:
            state, detail = "[red]none public[/]", "-"
            unavailable.append(r["name"])
        elif r["present"]:
            state, detail = "[green]present[/]", r["path"]
        elif r["kind"] == "registered":
            state, detail = "[red]missing[/]", r["path"]
        else:
            state, detail = "[dim]downloads on first use[/]", r["path"]
        table.add_row(escape(r["name"]), r["backbone"] or "?", escape(r["dataset"] or "-"), state, escape(detail or ""))
    console.print(table)
    if unavailable:
        console.print(
            f"{', '.join(unavailable)}: no public weights exist. Make them with `vtransfer pretrain DATA --backbone ...` "
            "and pass the checkpoint with --weights FILE, or register it: `vtransfer weights add FILE --name NAME`.",
            style="dim",
        )


@weights_app.command("add", cls=HelpCommand)
def add_command(
    file: Path = typer.Argument(..., help="A vtransfer checkpoint (.safetensors) or a state dict in a recognised layout."),
    name: str = typer.Option(..., "--name", "-n", help="Name to use with --weights (e.g. slowfusion:my-sports1m)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored entry as JSON."),
) -> None:
    """Register a local weights file under a name, after validating it (its sha256 is recorded and checked on use)."""
    from vtransfer.loading.sources import register_source, sources_file

    entry = register_source(file, name)
    if as_json:
        typer.echo(json.dumps({"name": name, **entry}, indent=2))
        return
    classes = entry.get("num_classes")
    console.print(
        f"registered [bold]{escape(name)}[/]: {entry['backbone']} ({entry['format']} file"
        + (f", {classes} classes" if classes else "")
        + (f", pretrained on {escape(str(entry['pretrained_on']))}" if entry.get("pretrained_on") else "")
        + f") -> {escape(entry['path'])}"
    )
    console.print(f"use it with --weights {escape(name)}; registry: {sources_file()}", style="dim")


@weights_app.command("fetch", cls=HelpCommand)
def fetch_command(
    name: str = typer.Argument(..., help="Built-in source name, e.g. i3d:kinetics400."),
) -> None:
    """Download a built-in source into the cache now (and check its sha256)."""
    from vtransfer.loading.sources import BUILTIN_SOURCES
    from vtransfer.utils.errors import WeightsError

    source = BUILTIN_SOURCES.get(name)
    if source is None:
        raise WeightsError(f"no built-in weight source {name!r}; choose one of: {', '.join(BUILTIN_SOURCES)}")
    path = source.fetch()
    console.print(f"{escape(name)}: {path}")
