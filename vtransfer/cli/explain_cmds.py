"""``vtransfer explain``: where a trained model looks in a video, and when.

A thin skin over :func:`vtransfer.api.explain` (the work is in
:mod:`vtransfer.workflows.explain`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vtransfer.cli import options as O
from vtransfer.cli.app import app, console


@app.command("explain", rich_help_panel="Train and evaluate", cls=O.HelpCommand)
def explain_command(
    model: Annotated[Path, typer.Argument(help="A vtransfer model file (model.safetensors) or a finished run folder.",
                                          show_default=False)],
    videos: Annotated[list[Path], typer.Argument(metavar="VIDEO...", help="Videos to explain.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the GIFs, the PNG strips and explain.json.")]
        = Path("explain"),
    clips: Annotated[int, typer.Option("--clips", min=1, help="Clips scored per video; the one that gives the class "
                                                               "the highest probability is explained (1: the middle one).")] = 1,
    target: Annotated[str | None, typer.Option("--class", metavar="CLASS",
                                                  help="Explain this class instead of the predicted one.")] = None,
    gif: Annotated[bool, typer.Option("--gif/--no-gif", help="Also write the animated heat map of each video.")] = True,
    device: O.Device = "auto",
    threads: O.Threads = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that already holds files.")] = False,
    json_out: O.Json = False,
) -> None:
    """Where the model looks (Grad-CAM over the clip) and when (each frame occluded in turn), per video."""
    import vtransfer.api as api  # noqa: PLR0402 - "from vtransfer import" reaches the package root

    def done(result) -> None:
        if json_out:
            return
        if result.error is not None:
            console.print(f"warning: skipped {escape(str(result.path))}: {escape(result.error)}", style="yellow",
                          highlight=False)
            return
        where = ", ".join(f"{m['layer']} {'x'.join(map(str, m['grid']))}" for m in result.spatial) or "no map"
        console.print(f"{escape(str(result.path))}: [bold]{escape(result.target)}[/] p={result.target_prob:.2f} "
                      f"({escape(result.method)}, {escape(where)}; frame {result.temporal['peak_frame']} matters most) "
                      f"-> {escape(result.png.name)}", highlight=False)
        if result.note:
            console.print(f"  {escape(result.note)}", style="dim", highlight=False)

    report = api.explain(model, videos, out=out, clips=clips, target=target, gif=gif, device=device, threads=threads,
                         overwrite=overwrite, on_video=done)
    if json_out:
        console.print_json(json.dumps(json.loads(report.json_path.read_text())))
        return
    explained = len(report.results) - len(report.skipped)
    console.print(f"[bold]wrote[/] {escape(str(report.json_path))} ({explained} explained"
                  + (f", {len(report.skipped)} skipped" if report.skipped else "") + ")", highlight=False)
