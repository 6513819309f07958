"""``vtransfer check`` and ``vtransfer split``: look at a dataset, fix its split.

Thin skins over :mod:`vtransfer.data.scan`, :mod:`vtransfer.data.splits` and
:mod:`vtransfer.data.check`; all logic lives there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from vtransfer.cli.app import app, console, err_console
from vtransfer.cli.options import HelpCommand
from vtransfer.run_config import parse_ratios
from vtransfer.utils.errors import VtransferError

_SPLITS = ("train", "val", "test")
_MAX_ROWS = 50  # problem rows shown on screen (all of them are in --json)


def _fail(error: VtransferError) -> typer.Exit:
    """Print a user error in one red line and return the exit to raise (code 2, as the main entry point does)."""
    from vtransfer.data.check import printable

    err_console.print(f"[bold red]error:[/] {escape(printable(str(error)))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _counts_table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    """Class x split table with totals."""
    from vtransfer.data.check import printable

    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for split in _SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right", style="bold")
    totals = {s: 0 for s in _SPLITS}
    for name in sorted(counts):
        row = counts[name]
        for s in _SPLITS:
            totals[s] += row.get(s, 0)
        table.add_row(escape(printable(name)), *(str(row.get(s, 0)) for s in _SPLITS), str(sum(row.values())))
    table.add_row("[bold]all[/]", *(f"[bold]{totals[s]}[/]" for s in _SPLITS), str(sum(totals.values())))
    return table


def _problems_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """Two-column path/reason table, cut to the first rows."""
    table = Table(title=title, title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for path, reason in rows[:_MAX_ROWS]:
        table.add_row(escape(path), escape(reason))
    if len(rows) > _MAX_ROWS:
        table.add_row(f"... and {len(rows) - _MAX_ROWS} more (see --json)", "")
    return table


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root when it lies inside it (shorter tables), printable."""
    import os

    from vtransfer.data.check import printable

    rel = os.path.relpath(path, root)
    return printable(path if rel.startswith(os.pardir) else rel)


@app.command("check", cls=HelpCommand)
def check_command(
    data: Path = typer.Argument(..., help="Dataset folder (DATA/<class>/<video> or DATA/{train,val,test}/<class>/<video>) or a manifest .csv."),
    frames: int = typer.Option(16, "--frames", min=1, help="Frames per clip; videos shorter than one clip are flagged."),
    stride: int = typer.Option(1, "--stride", min=1, help="Frame stride within a clip."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the stratified split (when DATA has no split folders)."),
    ratios: str = typer.Option("0.7,0.15,0.15", "--ratios", help="train,val,test shares of the stratified split: fractions (0.7,0.15,0.15) or percentages (70,15,15)."),
    group_pattern: Optional[str] = typer.Option(None, "--group-pattern", help="Regex whose first capture group names a group kept in one split, e.g. 'person(\\d+)' or '_g(\\d+)_'."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Use the split saved in this manifest .csv (from 'vtransfer split')."),
    split_files: Optional[Path] = typer.Option(None, "--split-files", help="UCF-101 style trainlistNN.txt/testlistNN.txt (a folder or one of the files)."),
    workers: int = typer.Option(4, "--workers", min=1, help="Threads probing videos in parallel."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
) -> None:
    """Probe every video once: counts per class and split, duration/fps/size ranges, unreadable and too-short files.

    Exit code 1 only when no usable video remains.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtransfer.data.check import check_dataset, printable
    from vtransfer.data.scan import load_dataset

    try:
        index = load_dataset(
            data, manifest=manifest, split_files=split_files, ratios=parse_ratios(ratios),
            split_seed=split_seed, group_pattern=group_pattern,
        )
        screen = err_console if as_json else console
        with Progress(
            TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=screen, transient=True,
        ) as bar:
            task = bar.add_task("check", total=len(index.records))
            report = check_dataset(
                index, frames=frames, stride=stride, workers=workers,
                progress=lambda done, total: bar.update(task, completed=done),
            )
    except VtransferError as e:
        raise _fail(e) from None
    if group_pattern and not any(r.group for r in index.records):
        report.warnings.append(f"--group-pattern {group_pattern!r} matches no file name: every video is its own group")

    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(_counts_table(f"{escape(printable(report.root))}: usable videos per class and split", report.counts))
        r = report.ranges
        if r:
            console.print(
                f"duration {r['duration'][0]:.2f}-{r['duration'][1]:.2f} s, "
                f"fps {r['fps'][0]:.3g}-{r['fps'][1]:.3g}, "
                f"size {int(r['width'][0])}-{int(r['width'][1])} x {int(r['height'][0])}-{int(r['height'][1])}, "
                f"codecs {', '.join(f'{k} ({v})' for k, v in sorted(report.codecs.items()))}",
                highlight=False,
            )
        if report.unreadable:
            console.print(_problems_table(
                f"unreadable: {len(report.unreadable)} (not used)",
                [(_shown(u.path, report.root), u.reason) for u in report.unreadable],
            ))
        if report.too_short:
            console.print(_problems_table(
                f"shorter than one clip ({report.frames_needed} frames): {len(report.too_short)} (used, frames repeat)",
                [(_shown(s.path, report.root), f"{s.num_frames} frames") for s in report.too_short],
            ))
        if report.skipped:
            console.print(_problems_table(
                f"skipped by the scanner: {len(report.skipped)}",
                [(_shown(s.path, report.root), s.reason) for s in report.skipped],
            ))
        for warning in report.warnings:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        style = "green" if report.ok else "bold red"
        console.print(
            f"[{style}]{report.usable} of {report.total} videos usable[/] "
            f"({len(report.classes)} classes, checked in {report.seconds:.1f} s)",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@app.command("split", cls=HelpCommand)
def split_command(
    data: Path = typer.Argument(..., help="Dataset folder: DATA/<class>/<video> (or with train/val/test folders)."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest .csv to write (path,class,split,group)."),
    ratios: str = typer.Option("0.7,0.15,0.15", "--ratios", help="train,val,test shares of the stratified split: fractions (0.7,0.15,0.15) or percentages (70,15,15)."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the stratified split."),
    group_pattern: Optional[str] = typer.Option(None, "--group-pattern", help="Regex whose first capture group names a group kept in one split, e.g. 'person(\\d+)' or '_g(\\d+)_'."),
    split_files: Optional[Path] = typer.Option(None, "--split-files", help="UCF-101 style trainlistNN.txt/testlistNN.txt (a folder or one of the files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-class split counts as JSON."),
) -> None:
    """Split DATA into train/val/test and save the split as a manifest that later commands reuse (--manifest)."""
    from vtransfer.data.check import printable
    from vtransfer.data.scan import load_dataset
    from vtransfer.data.splits import write_manifest
    from vtransfer.utils.errors import ConfigError

    try:
        if out.exists() and not overwrite:
            raise ConfigError(f"--out {out} already exists; pass --overwrite to replace it")
        index = load_dataset(
            data, split_files=split_files, ratios=parse_ratios(ratios), split_seed=split_seed, group_pattern=group_pattern,
        )
        write_manifest(out, index)
    except VtransferError as e:
        raise _fail(e) from None
    counts = index.counts()
    if as_json:
        typer.echo(json.dumps({
            "manifest": printable(out), "counts": {printable(c): v for c, v in counts.items()},
            "videos": len(index.records),
            "skipped": [{"path": printable(s.path), "reason": s.reason} for s in index.skipped],
        }, indent=2))
        return
    console.print(_counts_table(f"split of {escape(printable(index.root))}", counts))
    if index.skipped:
        console.print(f"{len(index.skipped)} file(s) skipped (see 'vtransfer check')", highlight=False)
    console.print(f"[green]wrote {escape(printable(out))}[/] ({len(index.records)} videos)", highlight=False)
