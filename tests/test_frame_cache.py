"""Tests for the decoded-frame cache (memory and disk) and its reader."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vtransfer.data import frame_cache as fc
from vtransfer.data.dataset import ClipDataset, collate_clips
from vtransfer.data.decode import DirectReader, read_clip, read_video
from vtransfer.data.frame_cache import CachedReader, DecodedFrameCache, choose_cache_mode, estimate_cache_bytes
from vtransfer.data.records import VideoRecord
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.models.base import Preprocessing

from videos import write_frames


def write_video(path: Path, num_frames: int, seed: int = 0, width: int = 64, height: int = 48) -> Path:
    """A small H.264 file whose frames depend on ``seed``."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=0), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture()
def video(tmp_path) -> Path:
    return write_video(tmp_path / "v.mp4", 30)


def test_memory_cache_hits_and_matches_direct_decode(video):
    cache = DecodedFrameCache("memory", short_side=32)
    frames = cache.get(video)
    assert cache.stats() == {"hits": 0, "misses": 1, "bytes": frames.nbytes, "entries": 1}
    assert frames.shape == (30, 32, 43, 3) and frames.dtype == np.uint8  # stored N x H x W x 3
    assert torch.equal(torch.from_numpy(frames).permute(0, 3, 1, 2), read_video(video, short_side=32))
    assert cache.get(video) is frames
    assert cache.stats()["hits"] == 1
    reader = CachedReader(cache)
    assert reader.num_frames(video) == 30
    for start, n, stride in [(0, 4, 1), (11, 5, 3), (27, 6, 2)]:
        assert torch.equal(reader.read_clip(video, start, n, stride, 32), read_clip(video, start, n, stride, 32))
    assert cache.hit_rate() > 0.8


def test_changed_file_is_a_miss(video):
    cache = DecodedFrameCache("memory", short_side=32)
    old = cache.get(video).copy()
    write_video(video, 30, seed=1)  # same name and size class, different content
    new = cache.get(video)
    assert cache.stats()["misses"] == 2
    assert not np.array_equal(old, new)
    assert np.array_equal(new, read_video(video, short_side=32).permute(0, 2, 3, 1).numpy())


def test_settings_are_part_of_the_key(video, tmp_path):
    a = DecodedFrameCache("disk", tmp_path / "c", short_side=32)
    b = DecodedFrameCache("disk", tmp_path / "c", short_side=24)
    assert a.key(video) != b.key(video)
    assert b.get(video).shape[1:3] == (24, 32)
    assert a.get(video).shape[1:3] == (32, 43)
    assert a.stats()["entries"] == 2


def test_disk_cache_survives_a_new_cache_object(video, tmp_path):
    cache_dir = tmp_path / "cache"
    first = DecodedFrameCache("disk", cache_dir, short_side=32)
    frames = np.array(first.get(video))
    entries = list(cache_dir.glob("*.npy"))
    assert len(entries) == 1 and not list(cache_dir.glob(".*"))  # no temporary files left
    second = DecodedFrameCache("disk", cache_dir, short_side=32)
    again = second.get(video)
    assert isinstance(again, np.memmap)
    assert np.array_equal(again, frames)
    assert second.stats() == {"hits": 1, "misses": 0, "bytes": entries[0].stat().st_size, "entries": 1}


def test_corrupt_disk_entry_is_rewritten(video, tmp_path):
    cache = DecodedFrameCache("disk", tmp_path / "cache", short_side=32)
    good = np.array(cache.get(video))
    entry = next((tmp_path / "cache").glob("*.npy"))
    entry.write_bytes(b"garbage")
    fresh = DecodedFrameCache("disk", tmp_path / "cache", short_side=32)
    assert np.array_equal(fresh.get(video), good)
    assert fresh.stats()["misses"] == 1


def test_undecodable_file_raises_and_is_remembered(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("text")
    cache = DecodedFrameCache("memory", short_side=32)
    for _ in range(2):
        with pytest.raises(VideoDecodeError, match="bad.mp4"):
            cache.get(bad)
    errors = []
    cache.prefill([bad], on_error=lambda p, r: errors.append((p, r)))
    assert errors and errors[0][0] == bad


def test_cached_reader_rejects_other_resolution(video):
    reader = CachedReader(DecodedFrameCache("memory", short_side=32))
    with pytest.raises(ValueError, match="short side"):
        reader.read_clip(video, 0, 2, 1, 40)


def test_bad_mode_and_missing_dir():
    with pytest.raises(ConfigError):
        DecodedFrameCache("ssd", short_side=32)
    with pytest.raises(ConfigError):
        DecodedFrameCache("disk", None, short_side=32)


def test_dataset_with_disk_cache_across_workers(tmp_path):
    paths = [write_video(tmp_path / f"{i}.mp4", 20 + 5 * i, seed=i) for i in range(3)]
    records = [VideoRecord(p, "a" if i < 2 else "b") for i, p in enumerate(paths)]
    pre = Preprocessing(frames=4, stride=2, crop_size=(24, 24), resize_short=32)
    cache = DecodedFrameCache("disk", tmp_path / "cache", short_side=32)
    cached = ClipDataset(records, {"a": 0, "b": 1}, pre, mode="eval", clips_per_video=2, reader=CachedReader(cache))
    direct = ClipDataset(records, {"a": 0, "b": 1}, pre, mode="eval", clips_per_video=2, reader=DirectReader())
    loader = DataLoader(cached, batch_size=3, num_workers=2, collate_fn=collate_clips)
    first = torch.cat([b["clip"] for b in loader])
    second = torch.cat([b["clip"] for b in loader])
    reference = torch.cat([b["clip"] for b in DataLoader(direct, batch_size=3, collate_fn=collate_clips)])
    assert torch.equal(first, reference) and torch.equal(second, reference)
    stats = cache.stats()  # counted in the workers, visible here
    assert stats["entries"] == 3
    # every read_clip (2 epochs x 6 items) plus each worker's first num_frames per video
    assert stats["hits"] + stats["misses"] >= 2 * len(cached) + 3
    assert 3 <= stats["misses"] <= 6  # each video decoded once (twice at most: two workers racing)


def test_memory_prefill_before_workers(tmp_path):
    paths = [write_video(tmp_path / f"{i}.mp4", 12, seed=i) for i in range(2)]
    cache = DecodedFrameCache("memory", short_side=24)
    cache.prefill(paths)
    assert cache.stats()["misses"] == 2
    records = [VideoRecord(p, "a") for p in paths]
    pre = Preprocessing(frames=2, stride=1, crop_size=(16, 16), resize_short=24)
    ds = ClipDataset(records, {"a": 0}, pre, mode="train", reader=CachedReader(cache))
    for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_clips):
        assert batch["clip"].shape == (2, 2, 3, 16, 16)
    assert cache.stats()["misses"] == 2  # workers only hit the inherited arrays


def test_choose_cache_mode(tmp_path, monkeypatch):
    paths = [write_video(tmp_path / f"{i}.mp4", 10, seed=i) for i in range(2)]
    records = [VideoRecord(p, "a") for p in paths]
    need = estimate_cache_bytes(records, 32)
    assert need == 2 * 10 * 3 * 32 * 43
    assert choose_cache_mode(records, 32, available_memory=10 * need) == "memory"
    assert choose_cache_mode(records, 32, available_memory=need, cache_dir=tmp_path) == "disk"

    class Usage:
        free = need // 2

    monkeypatch.setattr(fc.shutil, "disk_usage", lambda p: Usage)
    assert choose_cache_mode(records, 32, available_memory=need, cache_dir=tmp_path / "new" / "dir") == "none"
    assert fc.available_memory_bytes() > 0
    assert os.path.exists(paths[0])


def test_disk_digests_spare_rehashing(video, tmp_path, monkeypatch):
    first = DecodedFrameCache("disk", tmp_path / "cache", short_side=32)
    key = first.key(video)
    monkeypatch.setattr(fc, "file_sha256", lambda p: pytest.fail("unchanged file was hashed again"))
    assert DecodedFrameCache("disk", tmp_path / "cache", short_side=32).key(video) == key
    monkeypatch.undo()
    write_video(video, 31, seed=5)  # changed stat -> hashed again, new key
    assert DecodedFrameCache("disk", tmp_path / "cache", short_side=32).key(video) != key


def test_make_reader_modes(tmp_path):
    paths = [write_video(tmp_path / f"{i}.mp4", 10, seed=i) for i in range(2)]
    records = [VideoRecord(p, "a") for p in paths]
    pre = Preprocessing(frames=2, stride=1, crop_size=(16, 16), resize_short=24)
    assert fc.make_reader("none", None, records, pre) is None
    memory = fc.make_reader("memory", None, records, pre)
    assert memory.cache.mode == "memory" and memory.cache.stats()["entries"] == 2  # prefilled
    disk = fc.make_reader("disk", tmp_path / "c", records, pre)
    assert disk.cache.mode == "disk" and disk.cache.stats()["entries"] == 0  # filled lazily
    assert fc.make_reader("auto", tmp_path / "c", records, pre, available_memory=10**12).cache.mode == "memory"
    assert fc.make_reader("auto", tmp_path / "c", records, pre, available_memory=1000).cache.mode == "disk"
    with pytest.raises(ConfigError):
        fc.make_reader("ram", None, records, pre)


def test_memory_cache_workers_read_unfilled_videos_directly(tmp_path):
    filled, other = write_video(tmp_path / "f.mp4", 12, seed=1), write_video(tmp_path / "o.mp4", 12, seed=2)
    cache = DecodedFrameCache("memory", short_side=24)
    cache.prefill([filled])
    pre = Preprocessing(frames=3, stride=2, crop_size=(16, 16), resize_short=24)
    records = [VideoRecord(filled, "a"), VideoRecord(other, "a")]
    ds = ClipDataset(records, {"a": 0}, pre, mode="eval", clips_per_video=2, reader=CachedReader(cache))
    direct = ClipDataset(records, {"a": 0}, pre, mode="eval", clips_per_video=2)
    got = torch.cat([b["clip"] for b in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_clips)])
    want = torch.cat([b["clip"] for b in DataLoader(direct, batch_size=2, collate_fn=collate_clips)])
    assert torch.equal(got, want)
    assert cache.stats()["misses"] == 1 and not cache.contains(other)  # workers did not decode whole videos


@pytest.mark.slow
def test_bench_decode_quick_runs_and_prints_ratios(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--rounds", "1", "--chunk", "8", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio loader/whole-decode:" in out.stdout and "ratio cached/whole-decode:" in out.stdout
    assert "peak RSS" in out.stdout
    import json

    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(results) == {"whole-decode", "loader", "cached"}
    assert all(r["clips"] >= 8 and r["clips_per_s"] > 0 for r in results.values())


# -- the compact (jpeg) format ----------------------------------------------------------------

#: A JPEG cache's frames against the exact ones on the smooth synthetic clip below at 256 px: mean absolute
#: error in grey levels (measured 1.1; real videos at 256 px measured 0.9-1.3, benchmarks/bench_frame_cache.py).
JPEG_MAE = 1.6
REAL_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "yoga_poses"


def write_realistic_video(path: Path, num_frames: int = 12, width: int = 320, height: int = 240) -> Path:
    """A video JPEG meets in practice: a smooth gradient, moving discs and mild sensor noise (H.264, CRF 18)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(num_frames):
        img = np.stack([xx * 0.6, yy * 0.8, 255 - xx * 0.5], axis=-1)
        for k in range(3):
            img[(yy - 60 - 50 * k) ** 2 + (xx - (40 + 9 * i * (k + 1)) % width) ** 2 < 400] = (200, 60 * k, 90)
        frames.append(np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8))
    return write_frames(path, np.stack(frames), crf=18)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    return write_realistic_video(tmp_path_factory.mktemp("jpeg") / "real.mp4")


def test_jpeg_cache_round_trip_is_close_small_and_the_same_from_memory_and_disk(realistic, tmp_path):
    exact = read_video(realistic, short_side=256)  # T x 3 x H x W
    memory = DecodedFrameCache("memory", short_side=256, cache_format="jpeg")
    entry = memory.get(realistic)
    assert isinstance(entry, fc.JpegFrames) and entry.shape == (12, 256, 341, 3)
    assert memory.stats()["bytes"] == entry.nbytes <= exact.numel() / 8  # at most 1/8 of raw (measured 1/25)
    frames = torch.from_numpy(np.asarray(entry)).permute(0, 3, 1, 2)
    assert (frames.float() - exact.float()).abs().mean() <= JPEG_MAE
    clip = CachedReader(memory).read_clip(realistic, 5, 4, 3, 256)  # frames 5, 8, 11, 11 (past the end repeats)
    assert clip.shape == (4, 3, 256, 341) and clip.stride() == read_clip(realistic, 5, 4, 3, 256).stride()  # channels-last
    assert torch.equal(clip, frames[[5, 8, 11, 11]])
    assert memory.get(realistic) is entry and memory.stats()["hits"] == 2  # read_clip's and this

    first = DecodedFrameCache("disk", tmp_path / "c", short_side=256, cache_format="jpeg")
    assert torch.equal(first.read_clip(realistic, 5, 4, 3), clip)  # a miss serves the JPEG round trip too
    (file,) = (tmp_path / "c").glob("*.npy")
    assert file.name == f"{first.key(realistic)}.jpeg.npy" and not list((tmp_path / "c").glob(".*"))
    second = DecodedFrameCache("disk", tmp_path / "c", short_side=256, cache_format="jpeg")
    assert torch.equal(second.read_clip(realistic, 5, 4, 3), clip)
    assert second.stats() == {"hits": 1, "misses": 0, "bytes": file.stat().st_size, "entries": 1}


@pytest.mark.skipif(not REAL_VIDEO.is_dir(), reason="needs the shared real videos (../shared/data/yoga_poses)")
def test_jpeg_cache_is_an_eighth_of_raw_on_a_real_video():
    video = sorted(REAL_VIDEO.rglob("*.mp4"))[0]  # 854x480 phone video, about 10 s
    exact = read_video(video, short_side=256)
    entry = fc.JpegFrames.encode(exact)
    assert entry.nbytes <= exact.numel() / 8  # measured 1/15
    assert (torch.from_numpy(np.asarray(entry)).permute(0, 3, 1, 2).float() - exact.float()).abs().mean() <= JPEG_MAE


def test_raw_and_jpeg_entries_never_collide_and_old_raw_entries_stay_valid(video, tmp_path):
    from vtransfer.utils.hashing import file_sha256

    raw = DecodedFrameCache("disk", tmp_path / "c", short_side=32)
    jpeg = DecodedFrameCache("disk", tmp_path / "c", short_side=32, cache_format="jpeg")
    # the raw key is the one raw entries always had: content hash + decode settings, no format
    old_key = fc.entry_key(file_sha256(video), f"{fc._DECODE_VERSION}|short_side=32")
    assert raw.key(video) == raw.source_key(video) == jpeg.source_key(video) == old_key
    assert jpeg.key(video) != old_key
    frames = read_video(video, short_side=32).permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "c" / f"{old_key}.npy", frames)  # an entry written before the jpeg format existed
    assert np.array_equal(raw.get(video), frames) and raw.stats()["misses"] == 0
    assert isinstance(jpeg.get(video), fc.JpegFrames) and jpeg.stats()["misses"] == 1
    assert raw.stats()["entries"] == 1 and jpeg.stats()["entries"] == 1  # each counts its own format
    assert isinstance(DecodedFrameCache("disk", tmp_path / "c", short_side=32).get(video), np.memmap)  # raw untouched


def test_corrupt_or_foreign_jpeg_entry_is_rewritten(video, tmp_path):
    cache = DecodedFrameCache("disk", tmp_path / "c", short_side=32, cache_format="jpeg")
    good = np.asarray(cache.get(video))
    entry = next((tmp_path / "c").glob("*.jpeg.npy"))
    for bad in (np.zeros(100, np.uint8), np.zeros((2, 3, 4, 3), np.uint8)):  # truncated; a raw array under the name
        np.save(entry, bad)
        fresh = DecodedFrameCache("disk", tmp_path / "c", short_side=32, cache_format="jpeg")
        assert np.array_equal(np.asarray(fresh.get(video)), good) and fresh.stats()["misses"] == 1


def test_jpeg_memory_cache_in_a_worker_serves_unfilled_videos_as_jpeg(video, monkeypatch):
    filled = DecodedFrameCache("memory", short_side=32, cache_format="jpeg")
    want = CachedReader(filled).read_clip(video, 3, 5, 2, 32)
    monkeypatch.setattr(fc, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    empty = DecodedFrameCache("memory", short_side=32, cache_format="jpeg")
    got = CachedReader(empty).read_clip(video, 3, 5, 2, 32)
    assert torch.equal(got, want) and not empty.contains(video)  # decoded just the clip, same frames as the cache's


def test_auto_counts_jpeg_bytes(realistic, tmp_path):
    records = [VideoRecord(realistic, "a")]
    raw_need = estimate_cache_bytes(records, 256)
    jpeg_need = estimate_cache_bytes(records, 256, cache_format="jpeg")
    assert raw_need == 12 * 3 * 256 * 341
    actual = fc.JpegFrames.encode(read_video(realistic, short_side=256)).nbytes
    assert actual <= jpeg_need <= raw_need / 8  # generous, yet within the target
    memory = 3 * jpeg_need  # raw would need 1.5x-3x this: only jpeg fits half of it
    assert fc.resolve_cache_mode("auto", tmp_path, records, 256, available_memory=memory) == ("disk", tmp_path)
    assert fc.resolve_cache_mode("auto", tmp_path, records, 256, available_memory=memory,
                                 cache_format="jpeg") == ("memory", None)
    pre = Preprocessing(frames=2, stride=1, crop_size=(224, 224), resize_short=256)
    # the default format, auto: raw where the raw frames fit half the memory, else jpeg (here: in memory)
    reader = fc.make_reader("auto", tmp_path, records, pre, available_memory=memory)
    assert reader.cache.mode == "memory" and reader.cache.cache_format == "jpeg"
    assert fc.resolve_cache("memory", None, records, 256, available_memory=memory) == ("memory", None, "jpeg")
    assert fc.resolve_cache("auto", None, records, 256, available_memory=2 * raw_need) == ("memory", None, "raw")
    assert fc.make_reader("auto", tmp_path, records, pre, available_memory=memory, cache_format="raw").cache.mode == "disk"
    with pytest.raises(ConfigError, match="--cache-format"):
        fc.make_reader("none", None, records, pre, cache_format="png")
    with pytest.raises(ConfigError, match="raw or jpeg"):
        DecodedFrameCache("memory", short_side=256, cache_format="auto")  # a cache stores one concrete format


def test_flow_cache_stays_raw_and_is_computed_from_exact_frames(video, tmp_path):
    from vtransfer.data.flow_reader import FlowCache

    raw_frames = DecodedFrameCache("memory", short_side=32)
    jpeg_frames = DecodedFrameCache("memory", short_side=32, cache_format="jpeg")
    from_raw = FlowCache("disk", tmp_path / "flow", frames=raw_frames)
    from_jpeg = FlowCache("memory", frames=jpeg_frames)
    assert from_raw.cache_format == from_jpeg.cache_format == "raw" and from_raw.key(video) == from_jpeg.key(video)
    a, b = from_raw.get(video), from_jpeg.get(video)
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == (30, 32, 43, 2)
    assert np.array_equal(a, b)  # the same flow whatever format the frame cache keeps
    assert list((tmp_path / "flow").glob("*.npy")) == [tmp_path / "flow" / f"{from_raw.key(video)}.npy"]


def test_cache_format_is_refused_when_the_options_are_read(tmp_path, no_decoding):
    from typer.testing import CliRunner

    import vtransfer.cli
    from vtransfer.api import finetune
    from vtransfer.cli.app import app
    from vtransfer.run_config import RunConfig

    assert RunConfig.from_options(cache_format="JPEG").clips.cache_format == "jpeg"
    assert RunConfig().clips.cache_format == "auto"
    with pytest.raises(ConfigError, match="--cache-format must be one of auto, raw, jpeg, got 'png'"):
        RunConfig.from_options(cache_format="png")
    (tmp_path / "data" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--cache-format"):
        finetune(tmp_path / "data", out=tmp_path / "run", cache_format="png")
    vtransfer.cli._register_commands()
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      "--cache-format", "png"], env={"COLUMNS": "200"})
    assert isinstance(result.exception, ConfigError), result.output  # the command prints it as one line, exit 2
    assert "--cache-format must be one of auto, raw, jpeg" in str(result.exception)
    assert not (tmp_path / "run").exists()
