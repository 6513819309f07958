"""Export a vtransfer model for deployment (ONNX or TorchScript), checked against PyTorch on a real clip.

The exported graph takes what the model's ``forward`` takes: a float clip
``B x C x T x H x W`` (RGB, normalised as the model's
:class:`~vtransfer.models.base.Preprocessing` says), with a dynamic batch
axis, and returns ``B x classes`` logits. The model is exported in eval mode
(dropout off, BatchNorm with its running statistics).

Before the file is put in place it is run (onnxruntime, or ``torch.jit.load``)
on a batch of three clips: one clip decoded from a real video exactly as
evaluation decodes it, the same clip mirrored and reversed in time. The batch
size differs from the one the graph was traced with, so the dynamic batch
axis is checked too. If any logit differs from PyTorch's by more than
:data:`TOLERANCE`, nothing is written.

Beside the model, ``F.preprocessing.json`` says how to build the input:
frames and stride, short-side resize, centre crop, mean and std, layout and
class names (:func:`read_preprocessing_json` reads it back).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from vtransfer.data.dataset import ClipDataset
from vtransfer.data.records import VideoRecord
from vtransfer.data.scan import scan_dataset
from vtransfer.data.splits import read_manifest
from vtransfer.data.transforms import normalize_clips
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.base import Preprocessing, VideoBackbone
from vtransfer.utils.atomic import atomic_write_json
from vtransfer.utils.errors import ConfigError, DatasetError, VideoDecodeError, VtransferError
from vtransfer.workflows import runs
from vtransfer.workflows.scoring import resolve_model_path

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4
ONNX_OPSET = 17  # ai.onnx 17 (LayerNormalization): onnxruntime >= 1.12, TensorRT 8.6 and most runtimes
INPUT_NAME = "clip"
OUTPUT_NAME = "logits"
LAYOUT = "B x C x T x H x W"
_DATASET_VIDEOS_TRIED = 3


class ExportError(VtransferError):
    """The exporter failed, or the exported model does not give PyTorch's logits."""

    exit_code = 1


@dataclass
class CheckClips:
    """The normalised clips an export is checked on and where they came from."""

    clips: torch.Tensor  # B x C x T x H x W, float32
    source: str  # the video file, or "synthetic"
    warning: str | None = None


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely the exported model matches PyTorch."""

    path: Path
    preprocessing_path: Path
    fmt: str
    max_abs_diff: float
    tolerance: float
    check: CheckClips


# -- options ----------------------------------------------------------------------------


def output_paths(out: str | Path, fmt: str) -> tuple[Path, Path]:
    """``(model file, preprocessing JSON)`` for ``--out``: ``model.onnx`` -> ``model.onnx.preprocessing.json``.

    A name without a suffix gets the format's (``.onnx``, ``.pt``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    path = Path(out)
    if not path.suffix:
        path = path.with_name(path.name + SUFFIXES[fmt])
    return path, path.with_name(f"{path.name}.preprocessing.json")


def _refuse_existing(paths: tuple[Path, ...], overwrite: bool) -> None:
    if not overwrite:
        for path in paths:
            if path.exists():
                raise ConfigError(f"--out {path} already exists; pass --overwrite to replace it")


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError('--format onnx needs onnxruntime to check the export: pip install "vtransfer[export]"') from e


# -- the clips an export is checked on --------------------------------------------------


def decode_check_clip(video: str | Path, preprocessing: Preprocessing) -> torch.Tensor:
    """One uint8 clip ``T x C x H x W`` of ``video``, cut and cropped as evaluation does (its middle clip)."""

    dataset = ClipDataset([VideoRecord(Path(video), "video")], {"video": 0}, preprocessing, mode="eval", clips_per_video=1)
    item = dataset[0]
    if "error" in item:
        raise VideoDecodeError(video, item["error"])
    return item["clip"]


def clip_batch(clip: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The normalised check batch of one uint8 clip: the clip, mirrored, and reversed in time."""

    return normalize_clips(torch.stack([clip, clip.flip(-1), clip.flip(0)]), preprocessing)


def dataset_videos(model_path: Path, training: dict[str, Any] | None, source: dict[str, Any] | None) -> list[Path]:
    """Videos of the dataset a checkpoint was trained on that exist here, in their listed order.

    From the run's ``split.csv`` beside the model, else the dataset folder
    the checkpoint names (as given when it was trained, so relative to where
    that ran).
    """

    found: list[Path] = []
    split = model_path.parent / runs.SPLIT_FILE
    if split.is_file():
        with contextlib.suppress(DatasetError):
            found += [r.path for r in read_manifest(split, check_files=False).records]
    folders = [(training or {}).get("dataset"), ((source or {}).get("finetuned_on") or {}).get("dataset")]
    for folder in dict.fromkeys(f for f in folders if f):
        if not found and Path(folder).is_dir():
            with contextlib.suppress(DatasetError):
                found += [r.path for r in scan_dataset(Path(folder)).records]
    return [p for p in dict.fromkeys(found) if p.is_file()]


def find_check_clips(
    preprocessing: Preprocessing,
    check_video: str | Path | None = None,
    candidates: list[Path] | None = None,
    seed: int = 0,
) -> CheckClips:
    """The check batch: from ``check_video``, else the first of ``candidates`` that decodes, else synthetic.

    A ``check_video`` that cannot be decoded is an error; a synthetic batch
    (uniform random pixels) comes with a warning.
    """
    if check_video is not None:
        try:
            clip = decode_check_clip(check_video, preprocessing)
        except VideoDecodeError as e:
            raise ConfigError(f"--check-video {check_video}: {e.reason}") from None
        return CheckClips(clip_batch(clip, preprocessing), str(check_video))
    for video in (candidates or [])[:_DATASET_VIDEOS_TRIED]:
        with contextlib.suppress(VideoDecodeError):
            return CheckClips(clip_batch(decode_check_clip(video, preprocessing), preprocessing), str(video))
    generator = torch.Generator().manual_seed(seed)
    p = preprocessing
    clip = torch.randint(0, 256, (p.frames, p.channels, *p.crop_size), generator=generator, dtype=torch.uint8)
    why = "none of its first videos decodes" if candidates else "its training videos are not reachable here"
    return CheckClips(clip_batch(clip, preprocessing), "synthetic",
                      f"checked on a synthetic clip of random pixels ({why}); pass --check-video FILE to check on a real one")


# -- exporting --------------------------------------------------------------------------


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence what the exporters print that the numeric check makes moot.

    Tracer warnings (a Python ``bool`` of a tensor, ...) and the exporters'
    deprecation notices are hidden: the exported file is checked against
    PyTorch afterwards. torch's legacy ONNX exporter also switches its C++
    log on by mistake (it tests the function ``_jit_is_onnx_log_enabled``
    rather than calling it) and then prints the whole graph to stdout when an
    operator is unsupported; our error names the operator instead.
    """
    native_log = getattr(torch._C, "_jit_onnx_log", None)
    log_was_on = torch._C._jit_is_onnx_log_enabled() if hasattr(torch._C, "_jit_is_onnx_log_enabled") else None
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")  # constant-folding notes
        if native_log is not None:
            torch._C._jit_onnx_log = lambda *args: None
        try:
            yield
        finally:
            if native_log is not None:
                torch._C._jit_onnx_log = native_log
            if log_was_on is not None:
                torch._C._jit_set_onnx_log_enabled(log_was_on)


def unsupported_operator(error: BaseException) -> str | None:
    """The operator an ONNX exporter error says it cannot export (``aten::cummax``), else ``None``."""
    text = str(error)
    for pattern in (r"operator '([^']+)' to ONNX opset version \d+ is not supported",  # no symbolic at all
                    r"Unsupported: ONNX export of operator ([^,]+),"):  # a symbolic that refuses these arguments
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return None


def export_onnx(model: VideoBackbone, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` to ``path`` as ONNX (opset :data:`ONNX_OPSET`, dynamic batch axis).

    Uses torch's TorchScript-based exporter, which needs no package beyond
    torch and has the same arguments in every torch release vtransfer
    supports. An operator ONNX cannot express raises :class:`ExportError`
    naming it.
    """
    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False  # the torch.export-based exporter needs the onnxscript package
    try:
        with _exporter_quiet(), torch.no_grad():
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=ONNX_OPSET, do_constant_folding=True, **options)
    except Exception as e:  # noqa: BLE001 - whatever the exporter raises, the user gets one clear line
        op = unsupported_operator(e)
        name = model.backbone_name or type(model).__name__
        if op is not None:
            raise ExportError(f"ONNX (opset {ONNX_OPSET}) cannot express the operator {op} that {name} uses; "
                              "export it with --format torchscript instead") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"ONNX export of {name} failed ({type(e).__name__}: {first}); "
                          "try --format torchscript") from e


def export_torchscript(model: VideoBackbone, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` to ``path`` as TorchScript, traced on ``example`` (``torch.jit.load`` reads it, also from C++)."""
    try:
        with _exporter_quiet(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:  # noqa: BLE001 - one clear line
        name = model.backbone_name or type(model).__name__
        raise ExportError(f"TorchScript export of {name} failed ({type(e).__name__}: {str(e).strip()[:300]})") from e


@torch.no_grad()
def run_exported(fmt: str, path: Path, clips: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file at ``path`` on ``clips``, computed by onnxruntime or ``torch.jit.load``."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: clips.numpy()})
        return torch.from_numpy(logits)
    with _exporter_quiet():  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")
    return module(clips)


# -- the preprocessing file -------------------------------------------------------------


def preprocessing_document(model: VideoBackbone, classes: list[str], fmt: str, model_file: Path,
                           max_abs_diff: float, check_source: str) -> dict[str, Any]:
    """What a deployer needs to build the input and read the output of the exported model."""
    p = model.preprocessing
    return {
        "format": "vtransfer-export",
        "format_version": 1,
        "model_file": model_file.name,
        "model_format": fmt,
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
        "backbone": model.backbone_name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": LAYOUT,
        "input_dtype": "float32",
        "output": f"B x {len(classes)} logits, in the order of classes",
        "frames": p.frames,
        "stride": p.stride,
        "resize_short": p.resize_short,
        "crop": list(p.crop_size),
        "mean": list(p.mean),
        "std": list(p.std),
        "recipe": (f"take {p.frames} frames {p.stride} apart; resize each so its short side is {p.resize_short} px "
                   f"(bilinear, antialiased); centre-crop {p.crop_size[0]}x{p.crop_size[1]} (height x width); RGB "
                   "values / 255, then (x - mean) / std per channel; stack as "
                   f"{LAYOUT}. vtransfer averages the softmax of several such clips spread over a video."),
        "classes": list(classes),
        "check": {"max_abs_logit_diff": max_abs_diff, "tolerance": TOLERANCE, "clip_from": check_source},
    }


def read_preprocessing_json(path: str | Path) -> tuple[Preprocessing, list[str], dict[str, Any]]:
    """``(Preprocessing, classes, document)`` from an export's ``.preprocessing.json``."""

    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    pre = Preprocessing.from_dict({"frames": doc["frames"], "stride": doc["stride"], "crop_size": doc["crop"],
                                   "resize_short": doc["resize_short"], "mean": doc["mean"], "std": doc["std"]})
    return pre, list(doc["classes"]), doc


# -- the command ------------------------------------------------------------------------


def export_model(
    model: VideoBackbone,
    classes: list[str],
    fmt: str,
    out: str | Path,
    check: CheckClips,
    *,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export ``model`` (moved to the CPU, eval mode) to ``out`` and check it on ``check``; see the module docstring.

    Raises:
        ConfigError: a bad format, or the output exists without ``overwrite``.
        ExportError: the exporter failed or the logits differ by more than ``tolerance`` (nothing is written).
    """

    path, json_path = output_paths(out, fmt)
    _refuse_existing((path, json_path), overwrite)
    if fmt == "onnx":
        _require_onnxruntime()
    model = model.cpu().eval()
    with torch.no_grad():
        expected = model(check.clips).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = check.clips[:2]  # traced at batch 2, checked at batch 3: the batch axis must be dynamic
        (export_onnx if fmt == "onnx" else export_torchscript)(model, example, tmp)
        got = run_exported(fmt, tmp, check.clips).float()
        if got.shape != expected.shape:
            raise ExportError(f"the exported model gives logits of shape {tuple(got.shape)} for a batch of "
                              f"{len(check.clips)} clips; PyTorch gives {tuple(expected.shape)}")
        diff = float((got - expected).abs().max())
        if not diff <= tolerance:  # also NaN
            raise ExportError(f"the exported model's logits differ from PyTorch's by up to {diff:.3g} on "
                              f"{check.source} (limit {tolerance:g}); nothing was written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(json_path, preprocessing_document(model, classes, fmt, path, diff, check.source))
    return ExportResult(path, json_path, fmt, diff, tolerance, check)


def export(
    model: str | Path,
    fmt: str,
    out: str | Path,
    *,
    check_video: str | Path | None = None,
    overwrite: bool = False,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export a vtransfer checkpoint (or run folder) to ONNX or TorchScript, checked on a real clip.

    The check clip comes from ``check_video``, else from the first video of the
    checkpoint's dataset that is reachable (its run's ``split.csv``, or the
    dataset folder it names), else it is synthetic (with a warning in
    ``result.check.warning``). Options and the output paths are checked
    before the model is loaded.
    """

    path, json_path = output_paths(out, fmt)
    _refuse_existing((path, json_path), overwrite)
    if check_video is not None and not Path(check_video).is_file():
        raise ConfigError(f"--check-video {check_video}: no such file")
    if fmt == "onnx":
        _require_onnxruntime()
    model_path = resolve_model_path(model)
    net, ckpt = model_from_checkpoint(model_path)
    candidates = None if check_video is not None else dataset_videos(model_path, ckpt.training, ckpt.source)
    check = find_check_clips(net.preprocessing, check_video, candidates)
    return export_model(net, list(ckpt.classes), fmt, out, check, overwrite=overwrite, tolerance=tolerance)
