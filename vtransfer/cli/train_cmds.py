"""Commands of the main flow: finetune, pretrain, compare-policies, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vtransfer.cli import options as O
from vtransfer.cli.app import app, console, require_data
from vtransfer.cli.run_options import run_values, with_run_options
from vtransfer.policies.names import FREEZING_POLICY_NAMES


def _with_recipe(ctx: typer.Context, command: str, params: dict[str, Any]) -> dict[str, Any]:
    """Apply ``--recipe`` values to options not given on the command line."""
    recipe = params.get("recipe")
    if recipe is None:
        return params
    from vtransfer.recipes import merge_with_cli, recipe_values

    command_keys = {p.name for p in ctx.command.params}
    values = recipe_values(recipe, command, command_keys, _all_recipe_keys(ctx))
    for k, v in list(values.items()):
        if isinstance(v, list):
            values[k] = ",".join(str(x) for x in v)
    return merge_with_cli(ctx, params, values)


def _all_recipe_keys(ctx: typer.Context) -> set[str]:

    root = ctx.find_root().command
    names: set[str] = set()
    for name in ("pretrain", "finetune", "compare-policies", "demo"):
        cmd = getattr(root, "commands", {}).get(name)
        if cmd is not None:
            names |= {p.name for p in cmd.params}
    names.discard("recipe")
    return names


def _print_result_summary(res) -> None:
    console.print(f"[bold]run folder:[/] {res.run_dir}")
    console.print(f"trainable parameters: {res.trainable_params:,} of {res.total_params:,}; "
                  f"train time {res.train_time_s:.1f}s; best val video acc {res.best_val_video_acc:.3f}")
    if res.streams and res.test is not None:
        each = ", ".join(f"{name} {part.test.video_hit1:.1%}" for name, part in res.streams.items())
        console.print(f"two-stream test video accuracy: {each}; fused {res.test.video_hit1:.1%} "
                      f"(flow weight {res.fusion_weight:.1f})")


@app.command(rich_help_panel="Train and evaluate", cls=O.HelpCommand)
@with_run_options()
def finetune(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(
        help="Dataset folder (DATA/<class>/<video> or DATA/{train,val,test}/<class>/<video>) or a split manifest CSV; "
             "not needed with --resume.", show_default=False)] = None,
    out: O.Out = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue a stopped run in this folder with its saved options.")] = None,
    overwrite: O.Overwrite = False,
    recipe: O.Recipe = None,
    **run: Any,
) -> None:
    """Fine-tune a backbone on DATA under a freezing policy; saves the model, metrics and a test report."""
    require_data(data)
    import vtransfer.api as api
    from vtransfer.reporting.progress import RichReporter

    p = _with_recipe(ctx, "finetune", dict(data=data, out=out, resume=resume, overwrite=overwrite, recipe=recipe, **run))
    reporter = RichReporter(console)
    if p["resume"] is not None:
        res = api.finetune(p["data"], resume=p["resume"], reporter=reporter)
    elif p["data"] is None:
        raise typer.BadParameter("give the dataset folder DATA (or --resume RUN to continue a stopped run)",
                                 param_hint="DATA")
    else:
        res = api.finetune(p["data"], out=p["out"], overwrite=p["overwrite"], reporter=reporter, **run_values(p))
    _show_finetune(res)


def _show_finetune(res) -> None:
    from vtransfer.reporting.report import render_eval_table
    from vtransfer.utils import distributed

    if not distributed.current().is_main:
        return
    if res.test is not None:
        render_eval_table(res.test, console, title=f"test split — {res.plan.get('policy')}")
    _print_result_summary(res)


@app.command(rich_help_panel="Train and evaluate", cls=O.HelpCommand)
@with_run_options(exclude=("policy", "train_groups"), defaults={"epochs": 20})
def pretrain(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Source dataset folder (e.g. your Sports-1M, UCF-101 or Kinetics copy).")],
    name: Annotated[Optional[str], typer.Option("--name", help="Name to register the weights under (default: <backbone>:<folder name>).")] = None,
    out: O.Out = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the result as a named weight source.")] = True,
    overwrite: O.Overwrite = False,
    recipe: O.Recipe = None,
    **run: Any,
) -> None:
    """Train a backbone on a source dataset and save it as a weight source for later fine-tuning."""
    require_data(data)
    import vtransfer.api as api
    from vtransfer.reporting.progress import RichReporter

    p = _with_recipe(ctx, "pretrain", dict(data=data, name=name, out=out, register=register, overwrite=overwrite,
                                           recipe=recipe, **run))
    values = run_values(p)
    policy = "all" if values["weights"] else "scratch"
    res = api.pretrain(p["data"], name=p["name"], register=p["register"], policy=policy, out=p["out"],
                       overwrite=p["overwrite"], reporter=RichReporter(console), **values)
    _show_finetune(res)
    console.print(f"use it with: vtransfer finetune DATA --backbone {values['backbone']} --weights {res.model_path}")


@app.command("compare-policies", rich_help_panel="Train and evaluate", cls=O.HelpCommand)
@with_run_options(exclude=("policy", "train_groups"), defaults={"seed": None})
def compare_policies(
    ctx: typer.Context,
    data: O.Data,
    policies: Annotated[str, typer.Option("--policies", metavar="POLICY[,POLICY...]", help="Comma-separated policies to compare.")] = ",".join(FREEZING_POLICY_NAMES),
    seeds: Annotated[Optional[str], typer.Option("--seeds", metavar="SEED[,SEED...]", help="Comma-separated seeds; each policy runs once per seed, the table shows mean ± std (default 0; --seed N is the same as --seeds N).", show_default=False)] = None,
    shots: Annotated[Optional[str], typer.Option("--shots", metavar="K[,K...]", help="Also draw a learning curve: every policy again with K labelled training videos per class (e.g. 1,2,5,10,all; 'all' is the table itself), on the same validation and test videos; written as shots.png/csv/json and shown in compare.html.", show_default=False)] = None,
    out: O.Out = None,
    overwrite: O.Overwrite = False,
    json_out: O.Json = False,
    recipe: O.Recipe = None,
    **run: Any,
) -> None:
    """Run several freezing policies on the same split and seeds; print one table in the papers' form."""
    require_data(data)
    import vtransfer.api as api
    from vtransfer.reporting.policy_report import render_policy_table
    from vtransfer.reporting.progress import RichReporter

    p = _with_recipe(ctx, "compare-policies", dict(data=data, policies=policies, seeds=seeds, shots=shots, out=out,
                                                   overwrite=overwrite, json_out=json_out, recipe=recipe, **run))
    values = run_values(p)
    seeds_list = [int(s) for s in O.split_list(p["seeds"])] if p["seeds"] is not None else None
    reporter = None if p["json_out"] else RichReporter(console)

    def on_policy(policy: str, seed: int) -> None:
        if reporter is not None:
            reporter.label = f"[{policy} s{seed}] "
            console.rule(f"{policy} (seed {seed})")

    if values.get("seed") is None:
        values.pop("seed", None)
    res = api.compare_policies(p["data"], policies=O.split_list(p["policies"]), seeds=seeds_list, out=p["out"],
                               overwrite=p["overwrite"], reporter=reporter, on_policy=on_policy, shots=p["shots"], **values)
    if p["json_out"]:
        console.print_json(json.dumps({"out": str(res.out_dir), "rows": [r.to_dict() for r in res.rows], "skipped": res.skipped}))
        return
    render_policy_table(res.rows, console, title=f"{values['backbone']}: policies on {Path(p['data']).name}")
    for key, value in res.setup.items():
        style = "bold red" if key == "architecture mismatch" else "bold"
        console.print(f"[{style}]{key}:[/] {value}", highlight=False)
    if res.curve:
        from vtransfer.reporting.tables import rich_table
        from vtransfer.workflows.shots import curve_table

        console.print(rich_table(curve_table(res.curve)))
    for policy, why in res.skipped.items():
        console.print(f"[yellow]skipped {policy}:[/] {why}")
    console.print(f"[bold]results:[/] {res.out_dir}")
    if not res.rows:
        console.print("[bold red]error:[/] every policy was skipped (reasons above); nothing was compared")
        raise typer.Exit(2)


@app.command(rich_help_panel="Train and evaluate", cls=O.HelpCommand)
def evaluate(
    model: Annotated[Path, typer.Argument(help="A vtransfer model file (model.safetensors) or a finished run folder.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder or split manifest CSV (with a run's model, its split.csv picks the test videos).")],
    manifest: O.Manifest = None,
    split: Annotated[str, typer.Option("--split", help="Which split to evaluate: test, val, train or all (a folder without splits is evaluated whole).")] = "test",
    clips_per_video: O.ClipsPerVideo = 10,
    categories: O.Categories = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json, per_class.csv, confusion.csv, report.md, plots and report.html.")] = None,
    batch_size: O.BatchSize = 8,
    workers: O.Workers = None,
    precision: O.Precision = "fp32",
    device: O.Device = "auto",
    threads: O.Threads = None,
    test_crops: O.TestCrops = 1,
    calibrated: O.Calibrated = True,
    overwrite: O.Overwrite = False,
    json_out: O.Json = False,
) -> None:
    """Clip/video hit@1 and hit@k (k = 5, or the number of classes), mean class, per-class and per-category accuracy of a saved model."""
    from rich.markup import escape

    import vtransfer.api as api
    from vtransfer.reporting.report import render_eval_table
    from vtransfer.utils.errors import ConfigError

    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty; pass --overwrite or choose another --out")
    chosen = []

    def announce(selection) -> None:
        chosen.append(selection)
        if not json_out:
            console.print(f"evaluating {escape(selection.description)}", highlight=False)
            if selection.warning:
                console.print(f"warning: {escape(selection.warning)}", style="yellow", highlight=False)

    result = api.evaluate(model, data, manifest=manifest, split=split, clips_per_video=clips_per_video, categories=categories,
                          out=out, batch_size=batch_size, workers=workers, precision=precision, device=device, threads=threads,
                          on_selection=announce, test_crops=test_crops, calibrated=calibrated)
    if json_out:
        console.print_json(json.dumps({**result.to_dict(), "videos": chosen[0].description if chosen else None}))
        return
    render_eval_table(result, console, title=f"{model.name}: {chosen[0].description}" if chosen else model.name)
    if out is not None:
        console.print(f"[bold]report:[/] {out}")


@app.command(rich_help_panel="Train and evaluate", cls=O.HelpCommand)
def predict(
    model: Annotated[Path, typer.Argument(help="A vtransfer model file (model.safetensors).")],
    videos: Annotated[list[Path], typer.Argument(metavar="VIDEO...", help="Video files to classify.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Labels to show per video.")] = 5,
    clips_per_video: O.ClipsPerVideo = 10,
    batch_size: O.BatchSize = 8,
    precision: O.Precision = "fp32",
    device: O.Device = "auto",
    test_crops: O.TestCrops = 1,
    calibrated: O.Calibrated = True,
    json_out: O.Json = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV rows path,rank,label,prob.")] = False,
) -> None:
    """Labels with probabilities for new videos, using the model's stored preprocessing and classes."""
    from rich.table import Table

    import vtransfer.api as api

    rows = api.predict(model, videos, top_k=top_k, clips_per_video=clips_per_video, batch_size=batch_size,
                       device=device, precision=precision, test_crops=test_crops, calibrated=calibrated)
    if json_out:
        console.print_json(json.dumps(rows))
        return
    if csv_out:
        print("path,rank,label,prob")
        for r in rows:
            if "error" in r:
                print(f"{r['path']},,ERROR: {r['error']},")
            for i, t in enumerate(r.get("top", []), 1):
                print(f"{r['path']},{i},{t['label']},{t['prob']:.6f}")
        return
    table = Table(title=f"predictions of {model.name}")
    table.add_column("video")
    table.add_column("rank", justify="right")
    table.add_column("label")
    table.add_column("prob", justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["path"], "", f"[red]cannot decode: {r['error']}[/]", "")
        for i, t in enumerate(r.get("top", []), 1):
            table.add_row(r["path"] if i == 1 else "", str(i), t["label"], f"{t['prob']:.3f}")
    console.print(table)
