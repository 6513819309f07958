"""``vtransfer demo``: the embedded end-to-end example."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from vtransfer.cli.app import app, console
from vtransfer.cli.options import HelpCommand


@app.command(rich_help_panel="Get started", cls=HelpCommand)
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's data, models and reports (re-running reuses it).")] = Path("demo-run"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again from nothing.")] = False,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe whose \\[demo] table overrides the demo's settings (see recipes/demo.toml).")] = None,
) -> None:
    """Make demo videos and compare every policy on them, from the ImageNet weights installed with vtransfer; no downloads."""
    from vtransfer.demo import run_demo
    from vtransfer.recipes import demo_settings
    from vtransfer.reporting.policy_report import render_policy_table
    from vtransfer.reporting.progress import RichReporter

    t0 = time.perf_counter()
    reporter = RichReporter(console)
    settings = demo_settings(recipe) if recipe else None
    def on_policy(policy: str, seed: int) -> None:
        reporter.label = f"[{policy}] "
        console.rule(f"policy {policy}")

    res = run_demo(out, overwrite=overwrite, settings=settings, reporter=reporter, on_step=lambda text: console.rule(text),
                   on_policy=on_policy)
    render_policy_table(res.policies.rows, console, title="demo: ImageNet-pretrained effnet3d on new video classes")
    for policy, why in res.policies.skipped.items():
        console.print(f"[yellow]skipped {policy}:[/] {why}")
    if res.streams is not None:
        render_policy_table(res.streams.rows, console,
                            title="demo: RGB frames, optical flow, and both fused (two-stream)")
    console.print(f"[bold]everything is in[/] {out}  ({time.perf_counter() - t0:.0f}s)")
