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
    audit: bool = typer.Option(False, "--audit", rich_help_panel="Split audit", help="Also audit the split: near-duplicate videos across splits, probably mislabelled training videos (with --backbone), person or session ids in file names without --group-pattern. Warnings only; nothing is changed."),
    backbone: Optional[str] = typer.Option(None, "--backbone", rich_help_panel="Split audit", help="Backbone (or a run folder / model file) whose features the label audit probes; without it the label audit is skipped."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", rich_help_panel="Split audit", help="Weights of --backbone: a source such as effnet3d:imagenet, a registered name or a file."),
    preset: Optional[str] = typer.Option(None, "--preset", rich_help_panel="Split audit", help="Preset of --backbone (e.g. lite0-112: four times cheaper)."),
    dup_threshold: float = typer.Option(25.0, "--dup-threshold", rich_help_panel="Split audit", help="Largest fingerprint difference (grey levels, 0-255; similarity 1 - difference/255) listed as a near-duplicate."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel="Split audit", help="Folder to write audit.json into."),
) -> None:
    """Probe every video once: counts per class and split, duration/fps/size ranges, unreadable and too-short files.

    With --audit, also look for near-duplicates across splits, probable label errors and
    unused group ids in file names. Exit code 1 only when no usable video remains.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtransfer.data.check import check_dataset, drop_unreadable, printable
    from vtransfer.data.scan import load_dataset
    from vtransfer.utils.errors import ConfigError

    model = None  # 25.0 below is vtransfer.evaluation.audit.DUPLICATE_THRESHOLD (not imported at start-up)
    try:
        if not audit:
            given = [name for name, value in (("--backbone", backbone), ("--weights", weights), ("--preset", preset),
                                              ("--out", out)) if value is not None]
            if dup_threshold != 25.0:
                given.append("--dup-threshold")
            if given:
                raise ConfigError(f"{', '.join(given)}: only with --audit")
        else:
            from vtransfer.workflows.audit import check_audit_options, load_audit_model

            check_audit_options(dup_threshold, out=out)
            model = load_audit_model(backbone, weights, preset)
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
    audit_report = None
    if audit and report.ok:
        audit_report = _run_audit(drop_unreadable(index, report), model, dup_threshold, group_pattern, out,
                                  err_console if as_json else console)

    if as_json:
        summary = report.to_dict()
        if audit:
            summary["audit"] = audit_report.to_dict() if audit_report is not None else None
        typer.echo(json.dumps(summary, indent=2))
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
        if audit_report is not None:
            _print_audit(audit_report, report.root, out)
    if not report.ok:
        raise typer.Exit(1)


def _run_audit(index, model, threshold: float, group_pattern: Optional[str], out: Optional[Path], screen):
    """The split audit of ``index`` behind a progress bar (``vtransfer.workflows.audit.audit_dataset``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vtransfer.workflows.audit import audit_dataset

    try:
        with Progress(
            TextColumn("auditing: {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=screen, transient=True,
        ) as bar:
            task = bar.add_task("audit", total=len(index.records), stage="fingerprints")
            return audit_dataset(
                index, model=model, threshold=threshold, group_pattern=group_pattern, out=out,
                progress=lambda stage, done, total: bar.update(task, completed=done, total=total, stage=stage),
            )
    except VtransferError as e:
        raise _fail(e) from None


def _print_audit(audit, root: Path, out: Optional[Path]) -> None:
    """The audit's findings as tables and warnings (each names its files)."""
    from vtransfer.data.check import printable
    from vtransfer.evaluation.audit import THRESHOLD_TEXT

    console.print(
        f"[bold]split audit[/] ({audit.seconds:.1f} s): near-duplicates across splits are pairs whose difference "
        f"({escape(THRESHOLD_TEXT)}) is at most {audit.duplicate_threshold:g} (similarity >= "
        f"{1 - audit.duplicate_threshold / 255:.3f}); {audit.pairs_compared} pairs compared",
        highlight=False,
    )
    if audit.duplicates:
        table = Table(title=f"near-duplicates across splits: {len(audit.duplicates)}", title_justify="left")
        for column in ("video", "split", "video", "split"):
            table.add_column(column, overflow="fold")
        table.add_column("similarity", justify="right")
        table.add_column("how", overflow="fold")
        for d in audit.duplicates[:_MAX_ROWS]:
            m = d.match
            how = ("mirrored, " if m.flipped else "") + f"overlap {m.overlap:.0%}"
            table.add_row(escape(_shown(d.a, root)), d.a_split, escape(_shown(d.b, root)), d.b_split,
                          f"{m.similarity:.3f}", how)
        if len(audit.duplicates) > _MAX_ROWS:
            table.add_row(f"... and {len(audit.duplicates) - _MAX_ROWS} more (see --json)", "", "", "", "", "")
        console.print(table)
    else:
        console.print("no near-duplicate pair across splits", highlight=False)
    console.print(f"label audit: {escape(audit.label_audit)}", highlight=False)
    if audit.label_suspects:
        table = Table(title=f"probably mislabelled training videos: {len(audit.label_suspects)} "
                            f"of {audit.label_audited} (least likely first)", title_justify="left")
        for column in ("video", "labelled", "p", "looks like", "p"):
            table.add_column(column, overflow="fold")
        for s in audit.label_suspects[:_MAX_ROWS]:
            table.add_row(escape(_shown(s.path, root)), escape(printable(s.given)), f"{s.p_given:.2f}",
                          escape(printable(s.suggested)), f"{s.p_suggested:.2f}")
        console.print(table)
    g = audit.group_suggestion
    if g is not None:
        console.print(
            f"[yellow]warning:[/] file names carry a person or session id ({g.groups} values in {g.videos} of "
            f"{audit.videos} names, e.g. {escape(', '.join(g.examples[:2]))}) and no --group-pattern was given: "
            f"clips of one person can sit in several splits; try [bold]--group-pattern '{escape(g.pattern)}'[/]",
            highlight=False,
        )
    if audit.skipped:
        console.print(_problems_table(f"not audited: {len(audit.skipped)}",
                                      [(_shown(p, root), reason) for p, reason in audit.skipped]))
    for note in audit.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    if out is not None:
        console.print(f"[green]wrote {escape(printable(out / 'audit.json'))}[/]", highlight=False)


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
