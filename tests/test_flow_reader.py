"""Tests for vtransfer.data.flow_reader: flow clips from a whole-video flow cache, a direct reader, the flip.

The videos are a static smooth texture with a brighter textured square that
moves right by 2 px a frame, written losslessly with PyAV (64 x 64 px, a few
frames), so the flow inside the square is known. DIS-fast with one OpenCV
thread is deterministic, so the cached and direct readers agree exactly on
the same frames; the tests allow one quantisation step.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as tF

from videos import write_frames
from vtransfer.data import flow_reader as fr
from vtransfer.data import frame_cache as fc
from vtransfer.data.dataset import ClipDataset, collate_clips
from vtransfer.data.decode import read_video
from vtransfer.data.flow import FlowSettings, compute_flow, dequantise, flip_flow_x
from vtransfer.data.flow_reader import (
    TOO_SHORT,
    DirectFlowReader,
    FlowCache,
    FlowReader,
    flow_pair,
    make_flow_reader,
)
from vtransfer.data.frame_cache import DecodedFrameCache
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.records import VideoRecord
from vtransfer.utils.errors import ConfigError, VideoDecodeError

SIZE, SQUARE, SPEED, FRAMES = 64, 24, 2, 8
X0, Y0 = 8, 20  # the square's top-left corner in frame 0; it is at x = X0 + SPEED * t in frame t
BOUND = 8.0
SETTINGS = FlowSettings("dis-fast", bound=BOUND, channels=2)
MARGIN = 4


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random texture in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = torch.from_numpy(rng.random((1, 1, h // 4 + 2, w // 4 + 2)))
    fine = tF.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (fine - fine.min()) / (fine.max() - fine.min())


def moving_square_video(path: Path, frames: int = FRAMES, seed: int = 0) -> Path:
    """A lossless grey video of a textured square moving right by :data:`SPEED` px a frame."""
    rng = np.random.default_rng(seed)
    background = _texture(rng, SIZE, SIZE) * 0.5
    square = _texture(rng, SQUARE, SQUARE) * 0.5 + 0.5
    frames_rgb = []
    for t in range(frames):
        img = background.copy()
        x = X0 + SPEED * t
        img[Y0 : Y0 + SQUARE, x : x + SQUARE] = square
        frames_rgb.append(np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=-1))
    write_frames(path, np.stack(frames_rgb))
    return path


@pytest.fixture(autouse=True)
def _one_opencv_thread():
    cv2 = pytest.importorskip("cv2")
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    yield
    cv2.setNumThreads(before)


@pytest.fixture
def video(tmp_path) -> Path:
    return moving_square_video(tmp_path / "square.mp4")


def _median_x_inside(flow: torch.Tensor, frame: int) -> float:
    """Median x flow in px over the square as it stands in ``frame`` (minus a margin), from uint8 ``C x H x W``."""
    px = dequantise(flow, BOUND, unit="px")
    x = X0 + SPEED * frame
    return float(px[0, Y0 + MARGIN : Y0 + SQUARE - MARGIN, x + MARGIN : x + SQUARE - MARGIN].median())


# -- pairing -------------------------------------------------------------------------------


def test_flow_pair_rule():
    assert [flow_pair(i, 4) for i in range(4)] == [(0, 1), (1, 2), (2, 3), (2, 3)]
    assert [flow_pair(i, 6, 2) for i in range(6)] == [(0, 2), (1, 3), (2, 4), (3, 5), (2, 4), (3, 5)]
    assert [flow_pair(i, 3, 4) for i in range(3)] == [(0, 2)] * 3  # shorter than the span: the whole video
    for bad in [(0, 1, 1), (3, 3, 1), (0, 3, 0)]:
        with pytest.raises(ValueError):
            flow_pair(*bad)


# -- the cache and its reader -------------------------------------------------------------------


def test_flow_clip_at_the_clip_positions_shows_the_motion(video):
    cache = FlowCache("memory", settings=SETTINGS)
    reader = FlowReader(cache)
    assert reader.num_frames(video) == FRAMES
    whole = cache.get(video)
    assert whole.shape == (FRAMES, SIZE, SIZE, 2) and whole.dtype == np.uint8  # stored N x H x W x C
    frames = read_video(video)
    reference = compute_flow(frames, SETTINGS)  # the FRAMES - 1 consecutive pairs
    assert np.array_equal(whole[:-1], reference.transpose(0, 2, 3, 1))
    assert np.array_equal(whole[-1], whole[-2])  # the last frame gets the motion into it

    clip = reader.read_clip(video, 1, 3, 2, None)
    assert clip.shape == (3, 2, SIZE, SIZE) and clip.dtype == torch.uint8
    assert torch.equal(clip, torch.from_numpy(compute_flow(frames, SETTINGS, indices=[1, 3, 5])))
    for k, frame in enumerate([1, 3, 5]):
        assert abs(_median_x_inside(clip[k], frame) - SPEED) < 0.3, (frame, _median_x_inside(clip[k], frame))
        assert abs(float(dequantise(clip[k], BOUND, unit="px")[1].median())) < 0.1  # no vertical motion

    tail = reader.read_clip(video, 5, 4, 2, None)  # positions 5, 7, 7, 7: past the end repeats the last
    assert torch.equal(tail[0], clip[2])
    for k in (1, 2, 3):
        assert torch.equal(tail[k], torch.from_numpy(whole[7]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="short side"):
        reader.read_clip(video, 0, 2, 1, 32)


def test_memory_and_disk_agree_and_disk_entries_are_reused(video, tmp_path, monkeypatch):
    computed: list[str] = []
    real = FlowCache._compute
    monkeypatch.setattr(FlowCache, "_compute", lambda self, p: computed.append(str(p)) or real(self, p))
    decoded: list[str] = []
    real_decode = DecodedFrameCache._compute
    monkeypatch.setattr(DecodedFrameCache, "_compute", lambda self, p: decoded.append(str(p)) or real_decode(self, p))

    memory = FlowCache("memory", short_side=48, settings=SETTINGS).get(video)
    first = FlowCache("disk", tmp_path / "flow", short_side=48, settings=SETTINGS)
    stored = np.array(first.get(video))
    assert np.array_equal(memory, stored)
    assert len(list((tmp_path / "flow").glob("*.npy"))) == 1 and not list((tmp_path / "flow").glob(".*"))
    assert len(computed) == 2 and len(decoded) == 2

    second = FlowCache("disk", tmp_path / "flow", short_side=48, settings=SETTINGS)
    again = second.get(video)
    assert isinstance(again, np.memmap) and np.array_equal(again, stored)
    assert len(computed) == 2 and len(decoded) == 2  # neither flow nor decoding again
    assert second.stats()["hits"] == 1 and second.stats()["misses"] == 0
    reader = pickle.loads(pickle.dumps(FlowReader(second)))  # as a spawned DataLoader worker gets it
    assert torch.equal(reader.read_clip(video, 2, 3, 1, 48), torch.from_numpy(stored[2:5]).permute(0, 3, 1, 2))
    assert len(computed) == 2


def test_shared_frame_cache_keeps_the_frames(video, tmp_path):
    frames = DecodedFrameCache("disk", tmp_path / "c", short_side=32)
    flow = FlowCache("disk", tmp_path / "c" / "flow", settings=SETTINGS, frames=frames)
    assert flow.short_side == 32
    assert flow.get(video).shape == (FRAMES, 32, 32, 2)
    assert frames.contains(video) and frames.stats()["entries"] == 1  # the RGB stream can reuse them
    assert flow.stats()["entries"] == 1
    assert np.array_equal(flow.get(video), FlowCache("memory", short_side=32, settings=SETTINGS).get(video))
    with pytest.raises(ValueError, match="short side"):
        FlowCache("memory", short_side=48, settings=SETTINGS, frames=frames)


def test_flow_settings_stride_and_resolution_are_in_the_key(video):
    def key(settings=SETTINGS, stride=1, short_side=32):
        return FlowCache("memory", short_side=short_side, settings=settings, stride=stride).key(video)

    base = key()
    assert key() == base
    assert base != DecodedFrameCache("memory", short_side=32).key(video)
    others = [
        FlowSettings("dis-medium", BOUND, 2),
        FlowSettings("dis-fast", 10.0, 2),
        FlowSettings("dis-fast", BOUND, 3),
        FlowSettings("dis-fast", BOUND, 2, "next-sampled"),
    ]
    assert len({base, *(key(s) for s in others)}) == 1 + len(others)
    assert key(short_side=48) != base
    assert key(stride=2) == base  # next-frame flow does not depend on the clip stride
    sampled = FlowSettings("dis-fast", BOUND, 2, "next-sampled")
    assert key(sampled, stride=2) != key(sampled, stride=3)


def test_next_sampled_flow_spans_the_stride(video):
    settings = FlowSettings("dis-fast", BOUND, 2, "next-sampled")
    cache = FlowCache("memory", settings=settings, stride=2)
    whole = cache.get(video)
    frames = read_video(video)
    pairs = [flow_pair(i, FRAMES, 2) for i in range(FRAMES)]
    assert pairs[-1] == (5, 7)
    assert np.array_equal(whole, compute_flow(frames, settings, pairs=pairs).transpose(0, 2, 3, 1))
    reader = FlowReader(cache)
    clip = reader.read_clip(video, 0, 3, 2, None)
    assert torch.equal(clip, torch.from_numpy(compute_flow(frames, settings, indices=[0, 2, 4, 6]))[:3])
    assert abs(_median_x_inside(clip[1], 2) - 2 * SPEED) < 0.5
    with pytest.raises(ValueError, match="stride"):
        reader.read_clip(video, 0, 3, 1, None)


def test_direct_reader_matches_the_cache(video):
    for settings, stride in [(SETTINGS, 2), (FlowSettings("dis-fast", BOUND, 3, "next-sampled"), 2)]:
        cached = FlowReader(FlowCache("memory", short_side=48, settings=settings, stride=stride))
        direct = DirectFlowReader(settings)
        assert direct.num_frames(video) == cached.num_frames(video) == FRAMES
        for start, n in [(0, 4), (3, 2), (5, 3)]:
            a = cached.read_clip(video, start, n, stride, 48).to(torch.int16)
            b = direct.read_clip(video, start, n, stride, 48).to(torch.int16)
            assert a.shape == b.shape == (n, settings.channels, 48, 48)
            assert (a - b).abs().max() <= 1, (settings, start)


def test_memory_workers_compute_unfilled_clips_directly(video, monkeypatch):
    reader = FlowReader(FlowCache("memory", settings=SETTINGS))
    monkeypatch.setattr(fc, "get_worker_info", lambda: object())  # as if in a DataLoader worker
    clip = reader.read_clip(video, 0, 2, 1, None)
    assert reader.cache.stats()["entries"] == 0  # nothing cached in the worker's copy
    monkeypatch.undo()
    assert torch.equal(clip, reader.read_clip(video, 0, 2, 1, None))


# -- videos without flow -----------------------------------------------------------------------


def test_one_frame_video_is_skipped_with_its_reason(video, tmp_path, monkeypatch):
    still = moving_square_video(tmp_path / "still.mp4", frames=1)
    cache = FlowCache("memory", settings=SETTINGS)
    for _ in range(2):
        with pytest.raises(VideoDecodeError) as e:
            cache.get(still)
        assert e.value.reason == TOO_SHORT and e.value.path == still
    monkeypatch.setattr(FlowCache, "_compute", lambda self, p: pytest.fail("a failure was computed again"))
    errors = []
    cache.prefill([still], on_error=lambda p, r: errors.append((p, r)))
    assert errors == [(still, TOO_SHORT)]
    monkeypatch.undo()
    with pytest.raises(VideoDecodeError, match="fewer than 2 frames"):
        DirectFlowReader(SETTINGS).read_clip(still, 0, 2, 1, None)

    records = [VideoRecord(video, "a"), VideoRecord(still, "a")]
    pre = Preprocessing(frames=3, stride=2, crop_size=(32, 32), resize_short=48)
    reader = FlowReader(FlowCache("memory", short_side=48, settings=SETTINGS))
    for mode in ("train", "eval"):
        dataset = ClipDataset(records, {"a": 0}, pre, mode=mode, clips_per_video=1, reader=reader)
        batch = collate_clips([dataset[i] for i in range(len(dataset))])
        assert batch["clip"].shape == (1, 3, 2, 32, 32) and batch["clip"].dtype == torch.uint8
        assert batch["errors"] == [(str(still), TOO_SHORT)]


def test_lazy_flow_computes_only_the_clips_fields_and_equals_the_whole_video_flow(tmp_path):
    """Beside the RGB stream's raw frames in memory, a flow entry computes a field where a clip first reads it."""
    video = moving_square_video(tmp_path / "long.mp4", frames=16)  # the square stays inside
    records = [VideoRecord(video, "a")]
    frames = DecodedFrameCache("memory", short_side=48)
    for settings, stride in [(SETTINGS, 3), (FlowSettings("dis-fast", BOUND, 3, "next-sampled"), 3)]:
        whole = FlowCache("memory", short_side=48, settings=settings, stride=stride).get(video)  # every field
        lazy = FlowCache("memory", settings=settings, stride=stride, frames=frames)
        assert lazy.lazy and not FlowCache("memory", short_side=48, settings=settings).lazy
        entry = lazy.get(video)
        assert isinstance(entry, fr.LazyFlow) and entry.shape == whole.shape and lazy.fields_computed == 0
        reader = FlowReader(lazy)
        clip = reader.read_clip(video, 2, 3, stride, 48)  # frames 2, 5, 8
        assert torch.equal(clip, torch.from_numpy(whole[[2, 5, 8]]).permute(0, 3, 1, 2))
        assert np.flatnonzero(entry.done).tolist() == [2, 5, 8] and lazy.fields_computed == 3
        assert lazy.stats()["bytes"] == 3 * whole[0].nbytes

        pre = Preprocessing(frames=4, stride=stride, crop_size=(32, 32), resize_short=48)
        dataset = ClipDataset(records, {"a": 0}, pre, mode="eval", clips_per_video=2, reader=reader)
        plans = [dataset.clip_plan(i)[1] for i in range(len(dataset))]
        wanted = {min(s + j * stride, 15) for s in plans for j in range(4)} | {2, 5, 8}
        dataset.prepare(range(len(dataset)), threads=2)  # as make_loader does
        assert set(np.flatnonzero(entry.done).tolist()) == wanted and lazy.fields_computed == len(wanted) < 16
        before = lazy.fields_computed
        batch = collate_clips([dataset[i] for i in range(len(dataset))])
        assert lazy.fields_computed == before  # everything read was ready
        for i, start in enumerate(plans):
            expected = torch.from_numpy(whole[[min(start + j * stride, 15) for j in range(4)]]).permute(0, 3, 1, 2)
            assert torch.equal(batch["clip"][i], dataset.transform(expected, None))
        assert np.array_equal(np.asarray(entry), whole) and entry.done.all()  # the rest on demand
        assert pickle.loads(pickle.dumps(entry)).done.all()  # as a spawned worker gets it


def test_lazy_flow_skips_a_one_frame_video(tmp_path):
    still = moving_square_video(tmp_path / "still.mp4", frames=1)
    cache = FlowCache("memory", settings=SETTINGS, frames=DecodedFrameCache("memory", short_side=48))
    errors = []
    cache.prefill([still], on_error=lambda p, r: errors.append((p, r)))
    assert errors == [(still, TOO_SHORT)]
    cache.prepare([(still, 0)], 2, 1)  # left for the clip's reading to report
    with pytest.raises(VideoDecodeError, match="fewer than 2 frames"):
        FlowReader(cache).read_clip(still, 0, 2, 1, 48)


# -- make_flow_reader ------------------------------------------------------------------------------


def test_make_flow_reader_modes(tmp_path):
    paths = [moving_square_video(tmp_path / f"{i}.mp4", frames=4 + i, seed=i) for i in range(2)]
    paths.append(moving_square_video(tmp_path / "still.mp4", frames=1))
    records = [VideoRecord(p, "a") for p in paths]
    pre = Preprocessing(frames=2, stride=2, crop_size=(16, 16), resize_short=24)

    assert isinstance(make_flow_reader("none", None, records, pre, SETTINGS), DirectFlowReader)
    done, frames, errors = [], [], []
    memory = make_flow_reader(
        "memory", None, records, pre, SETTINGS,
        on_error=lambda p, r: errors.append((p, r)), progress=done.append,
        frame_progress=lambda p, d, t: frames.append((p, d, t)), threads=1,
    )
    assert isinstance(memory, FlowReader) and memory.cache.mode == "memory"
    assert memory.cache.stats()["entries"] == 2 and done == paths and errors == [(paths[2], TOO_SHORT)]
    assert [f for f in frames if f[0] == paths[0]] == [(paths[0], d, 3) for d in (1, 2, 3)]  # 4 frames: 3 pairs
    assert len(frames) == 3 + 4 and memory.cache.frame_progress is None
    assert memory.cache.span == 1 and memory.cache.short_side == 24

    disk = make_flow_reader("disk", tmp_path / "c", records, pre, SETTINGS, stride=3)
    assert disk.cache.mode == "disk" and disk.cache.cache_dir == tmp_path / "c" / "flow"
    assert disk.cache.stats()["entries"] == 0  # filled lazily
    assert torch.equal(disk.read_clip(paths[1], 0, 2, 2, 24), memory.read_clip(paths[1], 0, 2, 2, 24))
    assert make_flow_reader("auto", tmp_path / "c", records, pre, SETTINGS, available_memory=10**12).cache.mode == "memory"
    assert make_flow_reader("auto", tmp_path / "c", records, pre, SETTINGS, available_memory=1000).cache.mode == "disk"
    with pytest.raises(ConfigError):
        make_flow_reader("ram", None, records, pre, SETTINGS)
    if getattr(pre, "flow", None) is None:  # no flow settings anywhere
        with pytest.raises(ConfigError, match="flow settings"):
            make_flow_reader("none", None, records, pre)


def test_flow_cache_size_estimate_counts_its_channels(tmp_path):
    records = [VideoRecord(moving_square_video(tmp_path / "v.mp4", frames=4), "a")]
    assert fc.estimate_cache_bytes(records, 32, channels=2) == 4 * 2 * 32 * 32
    assert fc.estimate_cache_bytes(records, 32) == 4 * 3 * 32 * 32


def test_missing_opencv_is_a_config_error(monkeypatch):
    monkeypatch.setattr(fr, "import_cv2", lambda contrib=False: (_ for _ in ()).throw(ConfigError("install opencv")))
    with pytest.raises(ConfigError, match="opencv"):
        FlowCache("memory", settings=SETTINGS)
    with pytest.raises(ConfigError, match="opencv"):
        DirectFlowReader(SETTINGS)


# -- flip ----------------------------------------------------------------------------------------


def test_flip_flow_x_negates_x_only():
    clip = torch.tensor([1, 2, 100, 128, 129, 254, 255, 0], dtype=torch.uint8).view(1, 1, 8).expand(2, 3, 4, 8).clone()
    clip[:, 1] = 77
    clip[:, 2] = 200
    flipped = flip_flow_x(clip)
    assert flipped[0, 0, 0].tolist() == [255, 254, 156, 128, 127, 2, 1, 255]  # 256 - q, clamped to 1..255
    assert torch.equal(flipped[:, 1:], clip[:, 1:])  # y and magnitude unchanged
    assert torch.equal(clip[0, 0, 0], torch.tensor([1, 2, 100, 128, 129, 254, 255, 0], dtype=torch.uint8))  # not in place
    valid = clip.clone()
    valid[..., 0, :, -1] = 128
    assert torch.equal(flip_flow_x(flip_flow_x(valid)), valid)
    x = dequantise(clip[:, :2, :, :7].contiguous(), BOUND)[:, 0]
    assert torch.allclose(dequantise(flipped[:, :2, :, :7].contiguous(), BOUND)[:, 0], -x)
    with pytest.raises(ValueError):
        flip_flow_x(clip.float())


def test_flipped_video_flow_equals_flipped_flow(video):
    cache = FlowCache("memory", settings=SETTINGS)
    flow = FlowReader(cache).read_clip(video, 2, 1, 1, None)[0]
    frames = read_video(video)
    mirrored = compute_flow(frames.flip(-1), SETTINGS, indices=[2])[0]
    expected = flip_flow_x(flow.flip(-1))
    inside = (slice(None), slice(Y0 + MARGIN, Y0 + SQUARE - MARGIN))
    left = SIZE - (X0 + SPEED * 2) - SQUARE  # the square's left edge in the mirrored frame 2
    cols = slice(left + MARGIN, left + SQUARE - MARGIN)
    a = dequantise(mirrored, BOUND, unit="px")[inside][..., cols].median(dim=-1).values.median(dim=-1).values
    b = dequantise(expected, BOUND, unit="px")[inside][..., cols].median(dim=-1).values.median(dim=-1).values
    assert torch.allclose(a, b, atol=0.3) and abs(float(b[0]) + SPEED) < 0.3
