"""`vtransfer export`: ONNX and TorchScript files that give PyTorch's logits, with the preprocessing beside them.

The references run here: onnxruntime on the written .onnx file and
``torch.jit.load`` on the written .pt file, each compared with the PyTorch
model's logits on clips decoded from real videos (not the clips the tool
checked itself).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.data.scan import load_dataset
from vtransfer.data.splits import read_manifest, write_manifest
from vtransfer.data.transforms import normalize_clips
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows.export import (ExportError, decode_check_clip, export, export_model, find_check_clips,
                              read_preprocessing_json)
from vtransfer.models.registry import build_backbone
from vtransfer.models.slowfusion import SlowFusion
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.weights.checkpoint import save_checkpoint

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
vtransfer.cli._register_commands()
RUNNER = CliRunner()
CLASSES = ["move_up", "ring", "striped"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_datasets):
    """A run folder: a tiny slow fusion (with dropout, so eval mode matters) and the split of its 6-video dataset."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(demo_datasets("DATA", class_set="target", classes=CLASSES, videos_per_class=2, frames=12, size=32,
                                  seed=3), root / "DATA")
    torch.manual_seed(0)
    model = build_backbone("slowfusion", "tiny", num_classes=3, input_size=32, dropout=0.5)
    (root / "run").mkdir()
    save_checkpoint(root / "run" / "model.safetensors", model, classes=CLASSES,
                    training={"dataset": str(root / "DATA")})
    write_manifest(root / "run" / "split.csv", load_dataset(root / "DATA"))
    return root / "run"


def _real_clips(run) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model, and a batch of 4 clips from two videos of its dataset (not the tool's check clip)."""
    model, _ = model_from_checkpoint(run / "model.safetensors")
    videos = [r.path for r in read_manifest(run / "split.csv").records][-2:]
    clips = [decode_check_clip(v, model.preprocessing) for v in videos]
    return model, normalize_clips(torch.stack([*clips, clips[0].flip(1), clips[1].flip(1)]), model.preprocessing)


def test_onnx_export_gives_pytorchs_logits_at_any_batch_size(run, tmp_path):
    res = export(run, "onnx", tmp_path / "model.onnx")
    assert res.path == tmp_path / "model.onnx" and res.path.is_file() and res.max_abs_diff <= 1e-4
    assert res.check.source == str(read_manifest(run / "split.csv").records[0].path) and res.check.warning is None
    model, x = _real_clips(run)
    session = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["clip"] and session.get_inputs()[0].shape[0] == "batch"
    with torch.no_grad():
        want = model(x).numpy()
    for batch in (x[:1], x):
        got = session.run(None, {"clip": batch.numpy()})[0]
        assert got.shape == (len(batch), 3)
        assert abs(got - want[: len(batch)]).max() <= 1e-4


def test_torchscript_export_gives_pytorchs_logits_in_eval_mode(run, tmp_path):
    res = export(run, "torchscript", tmp_path / "model")
    assert res.path == tmp_path / "model.pt" and res.max_abs_diff <= 1e-4
    loaded = torch.jit.load(str(res.path))
    assert not loaded.training  # traced in eval mode: dropout off
    model, x = _real_clips(run)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-4
        assert torch.equal(loaded(x[:1]), loaded(x[:1]))


def test_preprocessing_json_round_trips(run, tmp_path):
    res = export(run, "torchscript", tmp_path / "model.pt")
    assert res.preprocessing_path == tmp_path / "model.pt.preprocessing.json"
    model, ckpt = model_from_checkpoint(run / "model.safetensors")
    pre, classes, doc = read_preprocessing_json(res.preprocessing_path)
    assert pre == model.preprocessing and classes == ckpt.classes == CLASSES
    assert doc["input_layout"] == "B x C x T x H x W" and doc["model_file"] == "model.pt"
    assert (doc["frames"], doc["stride"], doc["crop"], doc["resize_short"]) == (10, 1, [32, 32], 38)
    assert doc["check"]["max_abs_logit_diff"] == res.max_abs_diff


def test_a_failed_check_leaves_nothing_and_keeps_the_old_file(run, tmp_path):
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to .* nothing was written"):
        export(run, "onnx", tmp_path / "model.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model.onnx").write_bytes(b"old")
    with pytest.raises(ExportError):
        export(run, "onnx", tmp_path / "model.onnx", overwrite=True, tolerance=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == b"old"


class _CumMaxFusion(SlowFusion):
    """Slow fusion with a running maximum over the embedding before its head: aten::cummax has no ONNX form."""

    def run_group(self, index, state):
        if index == len(self.layer_groups()) - 1:
            state = torch.cummax(state, dim=1).values
        return super().run_group(index, state)


def test_an_operator_onnx_cannot_express_is_named_and_torchscript_is_offered(run, tmp_path):
    base, ckpt = model_from_checkpoint(run / "model.safetensors")
    model = _CumMaxFusion(**base.config)
    model.load_state_dict(base.state_dict())
    model.preprocessing = base.preprocessing
    check = find_check_clips(model.preprocessing, run.parent / "DATA" / "ring" / "ring_000.mp4")
    with pytest.raises(ExportError, match=r"cannot express the operator aten::cummax .*--format torchscript"):
        export_model(model, CLASSES, "onnx", tmp_path / "model.onnx", check)
    assert list(tmp_path.iterdir()) == []
    res = export_model(model, CLASSES, "torchscript", tmp_path / "model.pt", check)  # the suggestion works
    assert res.max_abs_diff <= 1e-4


def test_without_its_dataset_the_check_is_synthetic_and_says_so(run, tmp_path):
    alone = tmp_path / "alone.safetensors"
    model, _ = model_from_checkpoint(run / "model.safetensors")
    save_checkpoint(alone, model, classes=CLASSES, training={"dataset": str(tmp_path / "gone")})
    res = export(alone, "torchscript", tmp_path / "alone.pt")
    assert res.check.source == "synthetic" and "--check-video" in res.check.warning and res.max_abs_diff <= 1e-4


def test_cli_checks_options_first_and_never_overwrites(run, tmp_path):
    video = run.parent / "DATA" / "striped" / "striped_001.mp4"
    out = tmp_path / "m.onnx"
    argv = ["export", str(run), "--format", "onnx", "--out", str(out), "--check-video", str(video)]
    first = RUNNER.invoke(app, argv)
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())
    assert f"checked on 3 clips of {video}" in said and "max |Δlogit|" in said
    stamp = out.stat().st_mtime_ns
    again = RUNNER.invoke(app, argv)
    assert isinstance(again.exception, ConfigError) and "already exists; pass --overwrite" in str(again.exception)
    assert out.stat().st_mtime_ns == stamp
    assert RUNNER.invoke(app, [*argv, "--overwrite"]).exit_code == 0 and out.stat().st_mtime_ns != stamp
    summary = json.loads(RUNNER.invoke(app, [*argv, "--overwrite", "--json"]).stdout)
    assert summary["checked_on"] == str(video) and summary["max_abs_logit_diff"] <= 1e-4
    for bad, message in ((["--format", "tflite"], "--format 'tflite'"), (["--check-video", str(tmp_path / "no.mp4")], "no such file")):
        result = RUNNER.invoke(app, [*argv[:2], "--out", str(tmp_path / "other.onnx"), *bad])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception)
    notes = tmp_path / "notes.mp4"
    shutil.copy(run / "split.csv", notes)
    result = RUNNER.invoke(app, [*argv[:2], "--out", str(tmp_path / "other.onnx"), "--check-video", str(notes)])
    assert isinstance(result.exception, ConfigError) and str(notes) in str(result.exception)
    assert not (tmp_path / "other.onnx").exists()
