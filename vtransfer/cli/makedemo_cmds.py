"""``vtransfer make-demo``: write the synthetic demo dataset (thin skin over :mod:`vtransfer.data.demo`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vtransfer.cli.app import app, console, err_console
from vtransfer.cli.options import HelpCommand
from vtransfer.utils.errors import VtransferError
from vtransfer.utils.runtime import cpu_count


def _parse_size(text: str) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"96x64"`` (WIDTHxHEIGHT, as ffmpeg writes it) -> (64, 96) as (height, width)."""
    from vtransfer.utils.errors import ConfigError

    parts = text.lower().replace(" ", "").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected N or WIDTHxHEIGHT, e.g. 64 or 96x64") from None
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    if len(numbers) == 2:
        return numbers[1], numbers[0]
    raise ConfigError(f"--size {text!r}: expected N or WIDTHxHEIGHT, e.g. 64 or 96x64")


def _catalogue_table(names: list[str], counts: dict[str, int] | None = None) -> Table:
    """One row per class: name, category, (videos,) description."""
    from vtransfer.data.demo import CATALOGUE, CLASS_SETS

    table = Table(title_justify="left")
    table.add_column("class")
    table.add_column("category")
    if counts is not None:
        table.add_column("videos", justify="right")
    table.add_column("sets")
    table.add_column("what it shows", overflow="fold")
    for name in names:
        spec = CATALOGUE[name]
        sets = ", ".join(s for s in ("source", "target") if name in CLASS_SETS[s]) or "all only"
        row = [name, spec.category] + ([str(counts.get(name, 0))] if counts is not None else []) + [sets, spec.description]
        table.add_row(*(escape(c) for c in row))
    return table


@app.command("make-demo", rich_help_panel="Get started", cls=HelpCommand)
def make_demo_command(
    out: Annotated[Optional[Path], typer.Argument(help="Output folder (must be empty or absent; see --overwrite).", show_default=False)] = None,
    class_set: Annotated[str, typer.Option("--set", help="Class set: all (every class), source or target (disjoint sets for a transfer experiment).")] = "all",
    classes: Annotated[Optional[str], typer.Option("--classes", metavar="CLASS[,CLASS...]", help="Comma-separated subset of the set's classes (see --list-classes).")] = None,
    videos_per_class: Annotated[int, typer.Option("--videos-per-class", "-n", help="Videos written per class.")] = 12,
    frames: Annotated[int, typer.Option("--frames", help="Frames per video.")] = 24,
    size: Annotated[str, typer.Option("--size", metavar="N|WIDTHxHEIGHT", help="Frame size: N for NxN, or WIDTHxHEIGHT (even numbers, at least 16).")] = "64",
    fps: Annotated[int, typer.Option("--fps", help="Frame rate written into the files.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same videos.")] = 0,
    clutter: Annotated[float, typer.Option("--clutter", help="Background clutter, distractors, camera jitter and noise: 0 none, 1 default, up to 4.")] = 1.0,
    codec: Annotated[str, typer.Option("--codec", help="PyAV video encoder (files are .mp4).")] = "libx264",
    keyframe_interval: Annotated[Optional[int], typer.Option("--keyframe-interval", help="Most frames between keyframes (default: one per second, --fps). Longer intervals make seeking into a clip cost more decoding, as in most real datasets (x264's default is 250).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Videos written at once (default: one per CPU core). The files do not depend on it.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it holds an earlier make-demo dataset.")] = False,
    list_classes: Annotated[bool, typer.Option("--list-classes", help="Show every class, its category and sets, then exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no table, no progress bar).")] = False,
) -> None:
    """Write a synthetic video dataset (H.264 .mp4) whose classes differ by appearance or only by motion.

    Also writes OUT/categories.csv (class,category) and OUT/README.txt.
    """
    from vtransfer.data.demo import CATALOGUE, make_demo, resolve_classes

    try:
        if list_classes:
            names = resolve_classes(class_set, classes.split(",") if classes else None)
            if as_json:
                console.print_json(json.dumps({n: CATALOGUE[n].category for n in names}))
            else:
                console.print(_catalogue_table(names))
            return
        if out is None:
            err_console.print("[bold red]error:[/] missing OUT folder (try `vtransfer make-demo demo-data`)", highlight=False)
            raise typer.Exit(2)
        kwargs = dict(class_set=class_set, classes=classes.split(",") if classes else None,
                      videos_per_class=videos_per_class, frames=frames, size=_parse_size(size), fps=fps, seed=seed,
                      codec=codec, overwrite=overwrite, clutter=clutter, keyframe_interval=keyframe_interval,
                      workers=cpu_count() if workers is None else workers)
        if as_json:
            summary = make_demo(out, **kwargs)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("writing videos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as bar:
                task = bar.add_task("videos", total=None)
                summary = make_demo(out, **kwargs, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except VtransferError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

    if as_json:
        console.print_json(json.dumps(summary.to_dict()))
        return
    table = _catalogue_table(summary.classes, summary.counts)
    table.title = f"make-demo: {escape(str(summary.root))}"
    console.print(table)
    n = len(summary.files)
    console.print(
        f"{n} videos, {len(summary.classes)} classes, {summary.frames} frames of {summary.width}x{summary.height} "
        f"at {summary.fps} fps, seed {summary.seed}: {summary.total_bytes / 1e6:.1f} MB in {summary.seconds:.1f}s "
        f"({n / max(summary.seconds, 1e-9):.2g} videos/s)"
    )
    console.print(f"categories: {escape(str(summary.root / 'categories.csv'))}")
