"""Where a trained model looks in a video, and when: Grad-CAM GIFs, frame strips with a temporal bar, explain.json.

For each video, ``clips`` clips spread uniformly over it are read with the
model's own preprocessing (frames, stride, resize, centre crop), as
``predict`` reads them. With one clip (the default) that clip is explained;
with several, every clip is scored, the video's class is the mean of their
probabilities (as ``predict`` has it), and the clip that gives the explained
class the highest probability is explained. Its Grad-CAM and temporal
importance come from :mod:`vtransfer.engine.explain`; the pictures from
:mod:`vtransfer.reporting.explain_figures`.

:func:`explain_videos` works on a loaded model and a list of videos, and is
what a report calls; :func:`explain` loads a model file or run folder and
writes ``explain.json`` beside the pictures.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtransfer.data.clips import make_clip_dataset
from vtransfer.data.decode import probe_video
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.records import VideoRecord
from vtransfer.data.transforms import normalize_clips
from vtransfer.engine.explain import (
    OCCLUDER,
    ClipExplanation,
    explain_clip,
    mass_summary,
)
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.base import VideoBackbone
from vtransfer.reporting.explain_figures import (
    frame_ms,
    heat_overlay,
    write_gif,
    write_strip,
)
from vtransfer.run_config import ClipConfig
from vtransfer.utils.atomic import atomic_write_json
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.workflows.scoring import resolve_model_path

EXPLAIN_FILE = "explain.json"
#: What the temporal bar shows, in the words the pictures and explain.json use.
BAR_MEANING = ("Bar: how much the class's score (its logit) drops when that frame is replaced by the clip's "
               "mean frame; red = the frame supports the class")


@dataclass
class ExplainResult:
    """One video's explanation (or why there is none: ``error``).

    ``png`` is the strip of frames with the map and the temporal bar (the report's thumbnail), ``gif`` the
    animated heat map; both ``None`` when the video was skipped.
    """

    path: Path
    label: str | None = None
    error: str | None = None
    predicted: str | None = None
    score: float | None = None
    target: str | None = None
    target_prob: float | None = None
    method: str | None = None
    note: str | None = None
    clip: dict[str, Any] = field(default_factory=dict)
    clips: list[dict[str, Any]] = field(default_factory=list)
    temporal: dict[str, Any] = field(default_factory=dict)
    spatial: list[dict[str, Any]] = field(default_factory=list)
    gif: Path | None = None
    png: Path | None = None
    seconds: float | None = None

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready; picture paths relative to ``relative_to`` when given (a moved folder keeps its links)."""

        def where(p: Path | None) -> str | None:
            if p is None:
                return None
            return str(p.relative_to(relative_to)) if relative_to is not None and p.is_relative_to(relative_to) else str(p)

        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(path=str(self.path), gif=where(self.gif), png=where(self.png))
        if self.error is not None:
            return {k: d[k] for k in ("path", "label", "error")}
        del d["error"]
        return d


@dataclass
class ExplainReport:
    """What :func:`explain` wrote: the results (skipped videos too) and the JSON file."""

    results: list[ExplainResult]
    json_path: Path
    model_path: Path

    @property
    def skipped(self) -> list[ExplainResult]:
        """Videos that could not be explained, each with its ``error``."""
        return [r for r in self.results if r.error is not None]


def _record(video: VideoRecord | str | Path) -> tuple[Path, str | None]:
    if isinstance(video, VideoRecord):
        return Path(video.path), video.label
    return Path(video), None


def _unique_name(path: Path, taken: set[str]) -> str:
    """A file-name stem for ``path``'s pictures: its stem, else with its folder, else numbered."""
    clean = lambda s: re.sub(r"[^\w.-]+", "_", s).strip("._") or "video"
    candidates = [clean(path.stem), clean(f"{path.parent.name}_{path.stem}")]
    candidates += [f"{candidates[-1]}-{i}" for i in range(2, 10_000)]
    name = next(c for c in candidates if c not in taken)
    taken.add(name)
    return name


def _rgb_preprocessing(pre: Preprocessing) -> Preprocessing:
    """The RGB frames at a flow model's frame positions (for drawing; the normalisation is not used)."""
    return dataclasses.replace(pre, stream="rgb", flow=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _read_clips(path: Path, pre: Preprocessing, clips: int, label: str) -> tuple[list[int], torch.Tensor, list[int], str | None]:
    """The video's readable clips: (clip numbers, uint8 ``N x T x C x H x W``, start frames, first error)."""
    ds = make_clip_dataset([VideoRecord(path=path, label=label)], {label: 0}, pre, "eval",
                           ClipConfig(clips_per_video=clips), seed=0)
    kept, tensors, starts, error = [], [], [], None
    for i in range(clips):
        item = ds[i]
        if "clip" not in item:
            error = error or item["error"]
            continue
        kept.append(i)
        tensors.append(item["clip"])
        starts.append(int(ds.clip_plan(i)[1]))
    return kept, (torch.stack(tensors) if tensors else torch.empty(0)), starts, error


def _drawing_frames(path: Path, pre: Preprocessing, clips: int, clip_index: int, uint8: torch.Tensor, label: str) -> np.ndarray:
    """uint8 ``T x H x W x 3`` RGB frames of the explained clip (a flow model's are read again as RGB)."""
    if pre.stream == "flow":
        ds = make_clip_dataset([VideoRecord(path=path, label=label)], {label: 0}, _rgb_preprocessing(pre), "eval",
                               ClipConfig(clips_per_video=clips), seed=0)
        item = ds[clip_index]
        if "clip" not in item:
            raise VideoDecodeError(path, f"its RGB frames could not be read for drawing: {item['error']}")
        uint8 = item["clip"]
    return uint8[:, :3].permute(0, 2, 3, 1).contiguous().numpy()


def _row_label(stream: str | None) -> str:
    return {"rgb": "RGB stream", "flow": "flow stream"}.get(stream or "", "Grad-CAM")


@torch.no_grad()
def _clip_probs(model: VideoBackbone, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([torch.softmax(model(x[i:i + batch_size]).float(), dim=1) for i in range(0, len(x), batch_size)])


def explain_videos(
    model: VideoBackbone,
    records: Sequence[VideoRecord | str | Path],
    out_dir: str | Path,
    *,
    classes: Sequence[str],
    clips: int = 1,
    target: str | None = None,
    use_labels: bool = False,
    gif: bool = True,
    batch_size: int = 8,
    on_video: Callable[[ExplainResult], None] | None = None,
) -> list[ExplainResult]:
    """Explain each video: write ``<name>.png`` (strip of frames, map, temporal bar) and ``<name>.gif`` into ``out_dir``.

    Args:
        model: a loaded model (eval mode is set here); its inputs go to its parameters' device.
        records: :class:`VideoRecord` (their ``label`` is kept in the result) or video paths.
        out_dir: folder of the pictures (created).
        classes: the model's class names, in output order.
        clips: clips per video to score (the best one for the class is explained); 1 explains the middle clip.
        target: explain this class instead of the predicted one.
        use_labels: explain each record's own label (a report's misclassified videos: why not the truth).
        gif: also write the animated GIF.
        on_video: called with each result as it is done.

    Returns:
        One :class:`ExplainResult` per video, in order; a video that cannot be read has ``error`` and no pictures.
    """
    if clips < 1:
        raise ConfigError(f"clips per video must be >= 1, got {clips}")
    classes = list(classes)
    if len(classes) != model.num_classes:
        raise ConfigError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    fixed = None
    if target is not None:
        if target not in classes:
            raise ConfigError(f"class {target!r} is not one of the model's classes: {', '.join(classes)}")
        fixed = classes.index(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = next(model.parameters()).device
    pre = model.preprocessing
    taken: set[str] = set()
    results = []
    for video in records:
        path, label = _record(video)
        started = time.perf_counter()
        try:
            result = _explain_one(model, path, label, out_dir, classes, pre, clips, device, batch_size, gif, taken,
                                  fixed if not use_labels else (classes.index(label) if label in classes else None))
        except VideoDecodeError as e:
            result = ExplainResult(path=path, label=label, error=e.reason)
        result.seconds = round(time.perf_counter() - started, 3)
        results.append(result)
        if on_video is not None:
            on_video(result)
    return results


def _explain_one(model, path, label, out_dir, classes, pre, clips, device, batch_size, gif, taken, fixed) -> ExplainResult:
    info = probe_video(path)
    kept, uint8, starts, error = _read_clips(path, pre, clips, classes[0])
    if not kept:
        return ExplainResult(path=path, label=label, error=error or "no clip could be decoded")
    x = normalize_clips(uint8, pre).to(device)
    if len(kept) > 1:
        probs = _clip_probs(model, x, batch_size).cpu()
        video_probs = probs.mean(dim=0)
        explained = fixed if fixed is not None else int(video_probs.argmax())
        best = int(probs[:, explained].argmax())
        expl: ClipExplanation = explain_clip(model, x[best:best + 1], explained, batch_size)
    else:
        best = 0
        expl = explain_clip(model, x, fixed, batch_size)
        probs = torch.from_numpy(expl.probs)[None]
        video_probs = probs[0]
    predicted = int(video_probs.argmax())
    frames = _drawing_frames(path, pre, clips, kept[best], uint8[best], classes[0])
    numbers = [starts[best] + k * pre.stride for k in range(frames.shape[0])]
    name = _unique_name(path, taken)
    what = classes[expl.target]
    map_words = ", ".join(f"{m.method} at {m.layer} ({'x'.join(map(str, m.grid))})"
                          + (f" [{m.stream}]" if m.stream else "") for m in expl.maps) or "no spatial map"
    title = (f"{path.name}: {what} p={expl.prob:.2f} on this clip"
             + (f" (predicted {classes[predicted]})" if predicted != expl.target else "") + f"; {map_words}")
    note = " ".join(s for s in (expl.note + "." if expl.note else None, BAR_MEANING + ".") if s)
    rows = [(_row_label(m.stream), m.cam) for m in expl.maps] or [("frames", None)]
    png = write_strip(out_dir / f"{name}.png", frames, rows, expl.importance, title=title, note=note,
                      frame_numbers=numbers)
    gif_path = None
    if gif:
        panels = [heat_overlay(frames, m.cam) for m in expl.maps] or [frames]
        gif_path = write_gif(out_dir / f"{name}.gif", panels, frame_ms(pre.stride, info.fps))
    return ExplainResult(
        path=path, label=label, predicted=classes[predicted], score=round(float(video_probs[predicted]), 6),
        target=what, target_prob=round(expl.prob, 6), method=expl.method, note=expl.note,
        clip={"index": kept[best], "start_frame": starts[best], "frames": numbers, "logit": round(expl.logit, 6)},
        clips=[{"index": i, "start_frame": s, "prob": round(float(probs[j, expl.target]), 6)}
               for j, (i, s) in enumerate(zip(kept, starts))],
        temporal={"occluder": OCCLUDER, "score": "logit", "frames": numbers,
                  "importance": [round(float(v), 6) for v in expl.importance],
                  "occluded_logit": [round(float(v), 6) for v in expl.occluded_logit],
                  "occluded_prob": [round(float(v), 6) for v in expl.occluded_prob],
                  "peak_frame": numbers[int(np.argmax(expl.importance))]},
        spatial=[{"stream": m.stream, "method": m.method, "layer": m.layer, "grid": list(m.grid),
                  **mass_summary(m.cam)} for m in expl.maps],
        gif=gif_path, png=png)


def explain(
    model: str | Path,
    videos: Sequence[str | Path],
    out: str | Path,
    *,
    clips: int = 1,
    target: str | None = None,
    gif: bool = True,
    device: torch.device | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    on_video: Callable[[ExplainResult], None] | None = None,
) -> ExplainReport:
    """Load ``model`` (a model file or a run folder), explain ``videos`` into ``out``, write ``out/explain.json``.

    Raises:
        ConfigError: ``out`` holds files and ``overwrite`` is not set; ``target`` is not a class of the model.
        WeightsError: the file is not a vtransfer model, or its backbone is not one this vtransfer has.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {out} is not empty; pass --overwrite or choose another --out")
    model_path = resolve_model_path(model)
    net, ckpt = model_from_checkpoint(model_path)
    if device is not None:
        net.to(device)
    results = explain_videos(net, videos, out, classes=ckpt.classes, clips=clips, target=target, gif=gif,
                             batch_size=batch_size, on_video=on_video)
    json_path = atomic_write_json(out / EXPLAIN_FILE, {
        "model": str(model_path),
        "backbone": ckpt.backbone,
        "classes": list(ckpt.classes),
        "input": net.preprocessing.describe(),
        "clips_per_video": clips,
        "temporal_importance": BAR_MEANING,
        "videos": [r.to_dict(relative_to=out) for r in results if r.error is None],
        "skipped": [r.to_dict() for r in results if r.error is not None],
    })
    return ExplainReport(results=results, json_path=json_path, model_path=model_path)
