"""``vtransfer backbones`` and ``vtransfer inspect``: what exists and what each policy trains.

Thin skins over :func:`vtransfer.loading.backbone.backbone_summary` and
:func:`vtransfer.loading.backbone.inspect_backbone`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vtransfer.cli import options as O
from vtransfer.cli.app import app, console
from vtransfer.cli.options import HelpCommand


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 100_000 else f"{n:,}"


def _source_cell(src: dict[str, Any]) -> str:
    """One source with its local state: ✓ present, · downloadable, ✗ no public file / file gone."""
    if not src["available"] or (src["kind"] == "registered" and not src["present"]):
        mark = "[red]✗[/]"
    elif src["present"]:
        mark = "[green]✓[/]"
    else:
        mark = "[dim]·[/]"
    return f"{mark} {escape(src['name'])}"


@app.command("backbones", cls=HelpCommand)
def backbones_command(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List the backbones: presets, parameters, input, and weight sources (and whether each is present locally)."""
    from vtransfer.loading.backbone import backbone_summary
    from vtransfer.models.registry import backbone_names

    rows = [backbone_summary(name) for name in backbone_names()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Backbones", title_justify="left")
    table.add_column("backbone", style="bold")
    table.add_column("presets")
    table.add_column("params", justify="right")
    table.add_column("input T×H×W")
    table.add_column("optimiser, lr")
    table.add_column("weight sources", no_wrap=True)
    for r in rows:
        presets = ", ".join(f"[bold]{p}[/]" if p == r["default_preset"] else p for p in r["presets"])
        inp = r["input"]
        size = "×".join(str(s) for s in inp["size"])
        input_cell = f"{inp['frames']}×{size}" + (f" (stride {inp['stride']})" if inp["stride"] != 1 else "")
        sources = "\n".join(_source_cell(s) for s in r["sources"]) or "-"
        training = r["training"]
        table.add_row(r["name"], presets, _millions(r["params"]), input_cell, f"{training['optimizer']} {training['lr']:g}", sources)
    console.print(table)
    for r in rows:
        if r["description"]:
            console.print(f"[bold]{r['name']}[/]: {r['description']}", highlight=False)
    console.print(
        "Default preset in bold; params of the default preset with its own head. Sources: ✓ present locally, "
        "· downloads on first use, ✗ no public weights (make them with `vtransfer pretrain`, or pass --weights FILE). "
        "`vtransfer inspect --backbone NAME` shows the layer groups; `vtransfer weights list` the files.",
        style="dim",
    )


@app.command("inspect", cls=HelpCommand)
def inspect_command(
    backbone: O.Backbone,
    preset: O.Preset = None,
    policy: Annotated[Optional[str], typer.Option("--policy", "-p", help="Show what this freezing policy trains (default: only the layer groups).")] = None,
    train: O.TrainGroups = None,
    lora_rank: O.LoraRank = 8,
    lora_targets: O.LoraTargets = None,
    adapter_ratio: O.AdapterRatio = 0.5,
    probe_dim: O.ProbeDim = None,
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1, help="Classifier size to count (default: the preset's)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Show a backbone's layer groups (tags, parameter counts, temporal parameters) and what a policy would train."""
    from vtransfer.loading.backbone import inspect_backbone
    from vtransfer.policies.peft import PolicyOptions
    from vtransfer.run_config import PolicyConfig

    groups = O.split_list(train)
    options = PolicyOptions.from_config(PolicyConfig(lora_rank=lora_rank, lora_targets=O.split_list(lora_targets),
                                                     adapter_ratio=adapter_ratio, probe_dim=probe_dim))
    info = inspect_backbone(backbone, preset, policy, groups, num_classes, policy_options=options)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    plan = info["policy"]
    title = f"{info['backbone']} ({info['preset']}, {info['num_classes']} classes)"
    if plan:
        title += f" — policy {plan['policy']}"
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("group")
    table.add_column("tag")
    table.add_column("params", justify="right")
    table.add_column("temporal params", justify="right")
    if plan:
        table.add_column("trains", justify="right")
    tag_style = {"spatial": "cyan", "temporal": "magenta", "head": "yellow"}
    for g in info["groups"]:
        cells = [
            str(g["index"]),
            escape(g["name"]),
            f"[{tag_style[g['tag']]}]{g['tag']}[/]",
            f"{g['params']:,}",
            f"{g['temporal_params']:,}" if g["temporal_params"] else "-",
        ]
        if plan:
            trains = {"all": "[green]all[/]", "part": f"[green]{g['trainable_params']:,}[/]", "none": "[dim]frozen[/]"}
            cells.append(trains[g["trains"]])
        table.add_row(*cells)
    console.print(table)
    console.print(f"total parameters: {info['total_params']:,} (temporal: {info['temporal_params']:,})")
    if plan:
        first = plan["first_trainable_group"]
        prefix = (
            f"; groups #0-#{first - 1} are frozen (run without gradients)" if first > 0 else "; no frozen prefix"
        )
        console.print(
            f"policy {plan['policy']}: trains {plan['trainable_params']:,} of {plan['total_params']:,} "
            f"parameters ({100 * plan['fraction']:.2f}%)" + prefix + ("; starts from random weights" if plan["reinit"] else "")
        )
