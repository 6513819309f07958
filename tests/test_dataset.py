"""Tests for ClipDataset, collate_clips and the clip transforms."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vtransfer.data.dataset import ClipDataset, collate_clips
from vtransfer.data.decode import read_clip
from vtransfer.data.records import VideoRecord
from vtransfer.data.sampling import uniform_clip_starts
from vtransfer.data.transforms import eval_clip_transform, normalize_clips, train_clip_transform
from vtransfer.utils.errors import ConfigError
from vtransfer.models.base import Preprocessing

PRE = Preprocessing(frames=4, stride=2, crop_size=(24, 24), resize_short=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
CLASSES = {"a": 0, "b": 1}


def write_video(path: Path, num_frames: int, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A small H.264 file with textured frames that differ from frame to frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(num_frames):
            img = np.roll(base, 2 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[VideoRecord]:
    root = tmp_path_factory.mktemp("clips")
    specs = [("a", 40, 64, 48), ("a", 9, 48, 64), ("b", 60, 80, 48), ("b", 1, 64, 48)]
    return [
        VideoRecord(write_video(root / f"{label}{i}.mp4", n, w, h, seed=i), label, "train")
        for i, (label, n, w, h) in enumerate(specs)
    ]


@pytest.fixture()
def bad_record(tmp_path) -> VideoRecord:
    path = tmp_path / "broken.mp4"
    path.write_text("not a video")
    return VideoRecord(path, "b", "train")


def clips_of(ds: ClipDataset) -> list[torch.Tensor]:
    return [ds[i]["clip"] for i in range(len(ds))]


def test_train_items_shape_and_fields(records):
    ds = ClipDataset(records, CLASSES, PRE, mode="train", seed=3)
    assert len(ds) == 4
    for i in range(len(ds)):
        item = ds[i]
        assert item["clip"].shape == (4, 3, 24, 24) and item["clip"].dtype == torch.uint8
        assert item["label"] == CLASSES[records[i].label] and item["video"] == i and item["view"] == 0


def test_train_is_deterministic_per_seed_and_epoch(records):
    a = ClipDataset(records, CLASSES, PRE, mode="train", seed=7)
    b = ClipDataset(records, CLASSES, PRE, mode="train", seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for x, y in zip(clips_of(a), clips_of(b)):
        assert torch.equal(x, y)
    epoch2 = clips_of(a)
    a.set_epoch(3)
    epoch3 = clips_of(a)
    assert any(not torch.equal(x, y) for x, y in zip(epoch2, epoch3))
    other_seed = ClipDataset(records, CLASSES, PRE, mode="train", seed=8)
    other_seed.set_epoch(2)
    assert any(not torch.equal(x, y) for x, y in zip(epoch2, clips_of(other_seed)))


def test_loader_workers_give_the_same_batches(records):
    ds = ClipDataset(records, CLASSES, PRE, mode="train", seed=1)
    ds.set_epoch(4)

    def batches(workers: int, persistent: bool = False):
        loader = DataLoader(
            ds, batch_size=2, num_workers=workers, collate_fn=collate_clips, persistent_workers=persistent
        )
        return torch.cat([b["clip"] for b in loader])

    reference = batches(0)
    assert torch.equal(reference, batches(2))
    # persistent workers still see set_epoch (the epoch lives in shared memory)
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_clips, persistent_workers=True)
    ds.set_epoch(4)
    first = next(iter(loader))["clip"]
    ds.set_epoch(5)
    second = next(iter(loader))["clip"]
    assert torch.equal(first, reference)
    assert not torch.equal(first, second)


def test_fixed_views_never_change_across_epochs(records):
    ds = ClipDataset(records, CLASSES, PRE, mode="train", fixed_views=3, seed=2)
    assert len(ds) == 12
    assert [ds.locate(i) for i in (0, 1, 2, 3)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    ds.set_epoch(0)
    before = clips_of(ds)
    ds.set_epoch(9)
    after = clips_of(ds)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert not torch.equal(before[0], before[1])  # views of one video differ
    assert [ds[i]["view"] for i in range(3)] == [0, 1, 2]


def test_eval_clips_are_uniform_centre_crops(records):
    ds = ClipDataset(records, CLASSES, PRE, mode="eval", clips_per_video=3)
    assert len(ds) == 12
    for index in range(len(ds)):
        video, view = ds.locate(index)
        path = records[video].path
        start = uniform_clip_starts(ds.num_frames(video), 4, 2, 3)[view]
        full = read_clip(path, start, 4, 2, short_side=32)
        h, w = full.shape[-2:]
        top, left = int(round((h - 24) / 2)), int(round((w - 24) / 2))  # torchvision's centre rule
        expected = full[..., top : top + 24, left : left + 24]
        item = ds[index]
        assert item["view"] == view and item["video"] == video
        assert torch.equal(item["clip"], expected)


def test_bad_video_gives_error_item_and_collate_drops_it(records, bad_record):
    ds = ClipDataset([records[0], bad_record, records[2]], CLASSES, PRE, mode="eval", clips_per_video=2)
    bad = ds[2]
    assert set(bad) == {"error", "path", "video"}
    assert bad["path"] == str(bad_record.path) and bad["video"] == 1 and "unreadable" in bad["error"]
    batch = collate_clips([ds[i] for i in range(len(ds))])
    assert batch["clip"].shape == (4, 4, 3, 24, 24)
    assert batch["video"].tolist() == [0, 0, 2, 2] and batch["view"].tolist() == [0, 1, 0, 1]
    assert batch["label"].tolist() == [0, 0, 1, 1]
    assert batch["errors"] == [(str(bad_record.path), bad["error"])] * 2
    empty = collate_clips([ds[2], ds[3]])
    assert empty["clip"].shape[0] == 0 and empty["label"].shape == (0,) and len(empty["errors"]) == 2
    # through a DataLoader with workers: the epoch completes
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_clips)
    seen = [(len(b["clip"]), len(b["errors"])) for b in loader]
    assert sum(s for s, _ in seen) == 4 and sum(e for _, e in seen) == 2


def test_probe_results_are_cached(records):
    calls = []

    class CountingReader:
        def num_frames(self, path):
            calls.append(path)
            return 20

        def read_clip(self, path, start, num_frames, stride, short_side):
            return torch.zeros(num_frames, 3, short_side, short_side, dtype=torch.uint8)

    ds = ClipDataset(records[:2], CLASSES, PRE, mode="eval", clips_per_video=5, reader=CountingReader())
    for i in range(len(ds)):
        ds[i]
    assert sorted(calls) == sorted(r.path for r in records[:2])
    # set_epoch probes every video up front (so forked workers inherit the lengths)
    calls.clear()
    train = ClipDataset(records, CLASSES, PRE, mode="train", reader=CountingReader())
    train.set_epoch(0)
    assert sorted(calls) == sorted(r.path for r in records)
    for i in range(len(train)):
        train[i]
    train.set_epoch(1)
    assert len(calls) == len(records)


def test_config_errors(records):
    with pytest.raises(ConfigError):
        ClipDataset(records, CLASSES, PRE, mode="test")
    with pytest.raises(ConfigError):
        ClipDataset(records, CLASSES, PRE, mode="eval", fixed_views=2)
    with pytest.raises(ConfigError, match="'c'"):
        ClipDataset([VideoRecord(Path("x.mp4"), "c")], CLASSES, PRE)


# -- transforms ------------------------------------------------------------------------


def test_train_transform_same_crop_for_all_frames_and_generator_determinism():
    clip = torch.arange(5 * 3 * 40 * 50, dtype=torch.int64).remainder(251).to(torch.uint8).view(5, 3, 40, 50)
    clip[1:] = clip[0]  # identical frames stay identical after a shared crop
    t = train_clip_transform((16, 16))
    out1 = t(clip, torch.Generator().manual_seed(3))
    out2 = t(clip, torch.Generator().manual_seed(3))
    assert out1.shape == (5, 3, 16, 16) and out1.dtype == torch.uint8 and type(out1) is torch.Tensor
    assert torch.equal(out1, out2)
    assert all(torch.equal(out1[0], f) for f in out1)
    outs = [t(clip, torch.Generator().manual_seed(s)) for s in range(8)]
    assert len({o.sum().item() for o in outs}) > 1


def test_train_transform_flip_and_box_bounds():
    t = train_clip_transform((8, 8), scale=(1.0, 1.0))
    t.ratio = (1.0, 1.0)
    clip = torch.arange(8, dtype=torch.uint8).repeat(1, 3, 8, 1)  # 1 x 3 x 8 x 8, columns 0..7
    flips = set()
    for s in range(10):
        out = t(clip, torch.Generator().manual_seed(s))
        assert torch.equal(out, clip) or torch.equal(out, clip.flip(-1))
        flips.add(torch.equal(out, clip))
    assert flips == {True, False}
    g = torch.Generator().manual_seed(0)
    t2 = train_clip_transform((8, 8))
    for _ in range(50):
        top, left, h, w = t2.crop_box(30, 70, g)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 70


def test_eval_transform_centre_crop_and_small_inputs():
    clip = torch.randint(0, 255, (2, 3, 10, 14), dtype=torch.uint8)
    out = eval_clip_transform((6, 8))(clip)
    assert torch.equal(out, clip[..., 2:8, 3:11])
    small = eval_clip_transform((16, 16))(clip)
    assert small.shape == (2, 3, 16, 16)


def test_normalize_clips_matches_reference():
    clips = torch.randint(0, 256, (2, 4, 3, 5, 6), dtype=torch.uint8)
    out = normalize_clips(clips, PRE)
    assert out.shape == (2, 3, 4, 5, 6) and out.dtype == torch.float32 and out.is_contiguous()
    mean = torch.tensor(PRE.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(PRE.std).view(1, 3, 1, 1, 1)
    reference = (clips.permute(0, 2, 1, 3, 4).float() / 255 - mean) / std
    torch.testing.assert_close(out, reference)
    i3d = PRE.replace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    full = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1, 1, 1).expand(1, 2, 3, 1, 1)
    ranged = normalize_clips(full, i3d)
    torch.testing.assert_close(ranged[:, :, 0], torch.full_like(ranged[:, :, 0], -1.0))
    torch.testing.assert_close(ranged[:, :, 1], torch.full_like(ranged[:, :, 1], 1.0))
    assert normalize_clips(clips, PRE, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        normalize_clips(clips[0], PRE)
