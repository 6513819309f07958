"""`vtransfer extract-features`: per-clip embeddings are ``model.features`` of the clips, a video's is their mean.

The reference clips are decoded here directly (no frame cache) with the
evaluation dataset and run through ``model.features`` one at a time.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.data.dataset import ClipDataset
from vtransfer.data.records import VideoRecord
from vtransfer.data.scan import load_dataset
from vtransfer.data.splits import write_manifest
from vtransfer.data.transforms import normalize_clips
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows.extract import extract_features, read_features
from vtransfer.models.registry import build_backbone
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.weights.checkpoint import save_checkpoint

vtransfer.cli._register_commands()
RUNNER = CliRunner()
CLASSES = ["move_up", "ring", "striped"]
SWAP = {"train": "train", "val": "test", "test": "val"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, demo_datasets):
    """DATA (3 classes x 3 videos) and a run folder whose split.csv is not the default split (val and test swapped)."""
    root = tmp_path_factory.mktemp("features")
    shutil.copytree(demo_datasets("DATA", class_set="target", classes=CLASSES, videos_per_class=3, frames=12, size=32,
                                  seed=3), root / "DATA")
    torch.manual_seed(0)
    model = build_backbone("slowfusion", "tiny", num_classes=3, input_size=32)
    (root / "run").mkdir()
    save_checkpoint(root / "run" / "model.safetensors", model, classes=CLASSES)
    index = load_dataset(root / "DATA")
    index.records = [VideoRecord(r.path, r.label, SWAP[r.split]) for r in index.records]
    write_manifest(root / "run" / "split.csv", index)
    return root


@pytest.fixture(scope="module")
def extracted(ws):
    return extract_features(ws / "run", ws / "DATA", ws / "out" / "feats", per_clip=True, clips_per_video=2,
                            cache="memory", device="cpu", threads=2)


def _csv_split(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f)}


def test_clip_embeddings_are_model_features_and_video_embeddings_their_mean(ws, extracted):
    got = read_features(ws / "out" / "feats.safetensors")
    assert extracted.tensors_path == ws / "out" / "feats.safetensors" and extracted.index_path == ws / "out" / "feats.csv"
    model, _ = model_from_checkpoint(ws / "run" / "model.safetensors")
    records = [VideoRecord(Path(r["path"]), r["class"]) for r in got.rows]
    reference = ClipDataset(records, {c: i for i, c in enumerate(CLASSES)}, model.preprocessing, mode="eval",
                            clips_per_video=2)  # decodes each clip itself: no frame cache
    with torch.no_grad():
        want = torch.cat([model.features(normalize_clips(reference[i]["clip"][None], model.preprocessing))
                          for i in range(len(reference))])
    clips, video_of, view = (torch.from_numpy(got.arrays[k]) for k in ("clip_embeddings", "clip_video", "clip_view"))
    videos = torch.from_numpy(got.arrays["video_embeddings"])
    assert videos.shape == (9, 64) and clips.shape == (18, 64) == want.shape
    assert video_of.tolist() == [v for v in range(9) for _ in range(2)] and view.tolist() == [0, 1] * 9
    assert (clips - want).abs().max() <= 1e-5
    means = torch.stack([clips[video_of == v].mean(0) for v in range(9)])
    assert (videos - means).abs().max() <= 1e-6
    assert [r["clips"] for r in got.rows] == ["2"] * 9 and got.metadata["embedding_size"] == 64


def test_index_has_each_videos_class_and_the_runs_split(ws, extracted):
    rows = read_features(ws / "out" / "feats.safetensors").rows
    assert [r["row"] for r in rows] == [str(i) for i in range(9)]
    assert all(Path(r["path"]).parent.name == r["class"] for r in rows)
    assert _csv_split(ws / "out" / "feats.csv") == _csv_split(ws / "run" / "split.csv")  # both list absolute paths here
    default = {str(r.path): r.split for r in load_dataset(ws / "DATA").records}
    assert {p: SWAP[s] for p, s in default.items()} == _csv_split(ws / "out" / "feats.csv")
    assert "split.csv" in extracted.selection.description


def test_backbone_name_with_weights_gets_the_default_split_and_the_same_embeddings(ws, extracted, tmp_path):
    res = extract_features("slowfusion", ws / "DATA", tmp_path / "f.npz", weights=str(ws / "run" / "model.safetensors"),
                           fmt="npz", clips_per_video=2, cache="none", device="cpu", threads=2)
    got = read_features(res.tensors_path)
    assert res.tensors_path == tmp_path / "f.npz" and "clip_embeddings" not in got.arrays
    assert _csv_split(tmp_path / "f.csv") == {str(r.path): r.split for r in load_dataset(ws / "DATA").records}
    first = read_features(ws / "out" / "feats.safetensors")
    assert [r["path"] for r in got.rows] == [r["path"] for r in first.rows]
    assert abs(got.arrays["video_embeddings"] - first.arrays["video_embeddings"]).max() <= 1e-6


def test_bad_options_fail_before_any_video_is_decoded(ws, tmp_path, no_decoding):
    run, data, out = ws / "run", ws / "DATA", tmp_path / "f"
    cases = [
        (dict(model_or_backbone=run, fmt="parquet"), "--format 'parquet'"),
        (dict(model_or_backbone=run, out=tmp_path / "f.npz"), "ends in .npz but --format is safetensors"),
        (dict(model_or_backbone=run, split="dev"), "--split 'dev'"),
        (dict(model_or_backbone=run, clips_per_video=0), "--clips-per-video 0"),
        (dict(model_or_backbone=run, weights="effnet3d:imagenet"), "--weights and --preset apply to a backbone name"),
        (dict(model_or_backbone="slowfusion"), "give --weights"),
        (dict(model_or_backbone="no-such-thing"), "not a backbone name"),
        (dict(model_or_backbone=run, size=8), "expects clips of 10 frames at 32x32, got 10 frames at 8x8"),  # the model says
    ]
    for kwargs, message in cases:
        kwargs = {"data": data, "out": out, "device": "cpu", **kwargs}
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            extract_features(**kwargs)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_overwrite(ws, tmp_path):
    argv = ["extract-features", str(ws / "run"), str(ws / "DATA"), "--out", str(tmp_path / "f"), "--clips-per-video", "1",
            "--device", "cpu", "--cache", "memory"]
    assert RUNNER.invoke(app, argv).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert sorted(stamps) == ["f.csv", "f.safetensors"]
    again = RUNNER.invoke(app, [*argv[:-4], "--clips-per-video", "2"])
    assert isinstance(again.exception, ConfigError) and "already exists; pass --overwrite" in str(again.exception)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    assert RUNNER.invoke(app, [*argv[:-4], "--clips-per-video", "2", "--overwrite"]).exit_code == 0
    assert {r["clips"] for r in read_features(tmp_path / "f.safetensors").rows} == {"2"}


def test_a_corrupt_video_is_reported_and_left_out(ws, tmp_path):
    data = tmp_path / "DATA"
    shutil.copytree(ws / "DATA", data)
    whole = (data / "ring" / "ring_000.mp4").read_bytes()
    (data / "ring" / "broken.mp4").write_bytes(whole[: len(whole) // 3])  # cut short: its index is lost
    (data / "ring" / "empty.mp4").write_bytes(b"")
    result = RUNNER.invoke(app, ["extract-features", "slowfusion", str(data), "--weights", str(ws / "run" / "model.safetensors"),
                                 "--out", str(tmp_path / "f"), "--clips-per-video", "1", "--device", "cpu", "--cache", "memory"])
    assert result.exit_code == 0, result.output
    said = "".join(result.output.split())  # Rich wraps long paths anywhere
    assert f"warning:skipped{data / 'ring' / 'broken.mp4'}:unreadablecontainer" in said
    assert "1file(s)inthedatasetfolder" in said
    got = read_features(tmp_path / "f.safetensors")
    assert len(got.rows) == 9 and got.arrays["video_embeddings"].shape == (9, 64)
    assert not any("broken" in r["path"] for r in got.rows)
    assert [f["path"] for f in got.metadata["failed_videos"]] == [str(data / "ring" / "broken.mp4")]
    assert got.metadata["skipped_files"] == [{"path": str(data / "ring" / "empty.mp4"), "reason": "zero-byte file"}]
