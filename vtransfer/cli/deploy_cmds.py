"""``vtransfer extract-features`` and ``vtransfer export``: a trained model's features and graph, for use elsewhere.

Thin skins over :func:`vtransfer.workflows.extract.extract_features` and
:func:`vtransfer.workflows.export.export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from vtransfer.cli import options as O
from vtransfer.cli.app import app, console

_PANEL = "Use a model elsewhere"


@app.command("extract-features", rich_help_panel=_PANEL, cls=O.HelpCommand)
def extract_features_command(
    model: Annotated[str, typer.Argument(
        metavar="MODEL_OR_BACKBONE", show_default=False,
        help="A vtransfer model file or run folder (its split.csv gives the splits), or a backbone name with --weights "
             "(e.g. effnet3d --weights effnet3d:imagenet).")],
    data: O.Data,
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False,
                                      help="Output name F: writes F.safetensors (or F.npz) and the index F.csv (row,path,class,split,clips).")],
    per_clip: Annotated[bool, typer.Option("--per-clip", help="Also save every clip's embedding (clip_embeddings, with clip_video and clip_view).")] = False,
    fmt: Annotated[str, typer.Option("--format", metavar="safetensors|npz", help="File format of the embeddings.")] = "safetensors",
    split: Annotated[str, typer.Option("--split", help="Which videos: all, train, val or test.")] = "all",
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", rich_help_panel="Model",
                                                   help="With a backbone name: its weights (a source name, a registered name or a file).")] = None,
    preset: O.Preset = None,
    frames: O.Frames = None,
    stride: O.Stride = None,
    size: O.Size = None,
    clips_per_video: Annotated[int, typer.Option("--clips-per-video", rich_help_panel="Data",
                                                 help="Clips spread uniformly over each video; a video's embedding is their mean.")] = 10,
    manifest: O.Manifest = None,
    split_files: O.SplitFiles = None,
    split_seed: O.SplitSeed = 0,
    ratios: O.Ratios = "0.7,0.15,0.15",
    group_pattern: O.GroupPattern = None,
    batch_size: O.BatchSize = 8,
    device: O.Device = "auto",
    workers: O.Workers = None,
    threads: O.Threads = None,
    cache: O.Cache = "auto",
    cache_dir: O.CacheDir = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    json_out: O.Json = False,
) -> None:
    """One embedding per video (the mean over its clips of the classifier's input), with its path, class and split."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vtransfer.workflows.extract import extract_features

    bar = None if json_out else Progress(TextColumn("embedding clips"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                                         disable=not console.is_terminal)
    task = None

    def announce(selection, loaded) -> None:
        if json_out:
            return
        console.print(f"embedding {escape(selection.description)} with {escape(loaded.description)}", highlight=False)
        if selection.warning:
            console.print(f"warning: {escape(selection.warning)}", style="yellow", highlight=False)

    def advance(done: int, total: int) -> None:
        nonlocal task
        if bar is None:
            return
        if task is None:
            bar.start()
            task = bar.add_task("embed", total=total)
        bar.update(task, completed=done)

    try:
        res = extract_features(model, data, out, weights=weights, preset=preset, frames=frames, stride=stride, size=size,
                               per_clip=per_clip, fmt=fmt, split=split, clips_per_video=clips_per_video,
                               batch_size=batch_size, manifest=manifest, split_files=split_files, split_seed=split_seed,
                               ratios=O.parse_ratios(ratios), group_pattern=group_pattern, cache=cache,
                               cache_dir=cache_dir, workers=workers, device=device, threads=threads,
                               overwrite=overwrite, on_selection=announce, progress=advance)
    finally:
        if bar is not None:
            bar.stop()
    emb = res.embeddings
    if json_out:
        console.print_json(json.dumps({
            "tensors": str(res.tensors_path), "index": str(res.index_path), "videos": len(emb.records),
            "embedding_size": int(emb.video.shape[1]), "clips": int(sum(emb.clips)),
            "failed_videos": emb.failed, "partly_decoded_videos": emb.partial, "skipped_files": res.skipped_files,
        }))
        return
    for f in emb.failed:
        console.print(f"warning: skipped {escape(f['path'])}: {escape(f['reason'])}", style="yellow", highlight=False)
    for f in emb.partial:
        console.print(f"warning: {escape(f['path'])}: {f['clips_failed']} clip(s) not decoded ({escape(f['reason'])}); "
                      "its embedding averages the others", style="yellow", highlight=False)
    if res.skipped_files:
        console.print(f"{len(res.skipped_files)} file(s) in the dataset folder are not videos vtransfer can use "
                      "(listed in the metadata; see `vtransfer check`)", highlight=False)
    splits = {s: sum(r.split == s for r in emb.records) for s in ("train", "val", "test")}
    shape = f"{emb.video.shape[0]} x {emb.video.shape[1]}"
    clips = f", clip_embeddings {emb.clip.shape[0]} x {emb.clip.shape[1]}" if emb.clip is not None else ""
    console.print(f"[bold]wrote[/] {escape(str(res.tensors_path))} (video_embeddings {shape}{clips}) and "
                  f"{escape(str(res.index_path))}; " + ", ".join(f"{n} {s}" for s, n in splits.items() if n), highlight=False)


@app.command("export", rich_help_panel=_PANEL, cls=O.HelpCommand)
def export_command(
    model: Annotated[Path, typer.Argument(help="A vtransfer model file (model.safetensors) or a finished run folder.",
                                          show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False,
                                      help="The exported file (model.onnx); the preprocessing goes beside it (model.onnx.preprocessing.json).")],
    fmt: Annotated[str, typer.Option("--format", metavar="onnx|torchscript",
                                     help="onnx (checked with onnxruntime) or torchscript (torch.jit.trace, loads with torch.jit.load).")] = "onnx",
    check_video: Annotated[Optional[Path], typer.Option(
        "--check-video", help="Video to check the export on (default: the first video of the model's dataset, if it is here).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    json_out: O.Json = False,
) -> None:
    """Save the model as ONNX or TorchScript (eval mode, dynamic batch), checked against PyTorch on a real clip."""
    from vtransfer.workflows.export import export

    res = export(model, fmt, out, check_video=check_video, overwrite=overwrite)
    if json_out:
        console.print_json(json.dumps({"path": str(res.path), "preprocessing": str(res.preprocessing_path), "format": res.fmt,
                                       "max_abs_logit_diff": res.max_abs_diff, "checked_on": res.check.source,
                                       "warning": res.check.warning}))
        return
    if res.check.warning:
        console.print(f"warning: {escape(res.check.warning)}", style="yellow", highlight=False)
    console.print(f"[bold]wrote[/] {escape(str(res.path))} ({res.fmt}, input {escape('B x C x T x H x W')}, dynamic batch) and "
                  f"{escape(str(res.preprocessing_path))}", highlight=False)
    console.print(f"checked on 3 clips of {escape(res.check.source)} (the clip, mirrored, reversed in time): "
                  f"max |Δlogit| {res.max_abs_diff:.2e} (limit {res.tolerance:.0e})", highlight=False)
