"""Tests for vtransfer.data.decode and vtransfer.data.sampling on real encoded files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from videos import write_video
import torch

from vtransfer.data.decode import DirectReader, probe_video, read_clip, read_video, verify_readable
from vtransfer.data.sampling import clip_span, random_clip_start, uniform_clip_starts
from vtransfer.utils.errors import VideoDecodeError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KTH = SHARED_DATA / "kth_fragments"


def kth_files() -> list[Path]:
    """The KTH fragments (AVI and MP4), or a skip when ../shared/data is absent."""
    files = sorted(p for p in KTH.glob("*/*") if p.suffix in (".avi", ".mp4")) if KTH.is_dir() else []
    if not files:
        pytest.skip(f"shared test data not found at {KTH}")
    return files


def level_index(frame: torch.Tensor) -> int:
    """Recover ``i`` from a decoded :func:`frame_image` (bottom rows are flat grey)."""
    return int(round(frame[:, -4:, :].float().mean().item() / 8))


# -- the real KTH files -------------------------------------------------------------------


def test_kth_probe_and_whole_decode():
    for path in kth_files():
        info = probe_video(path)
        assert (info.width, info.height, round(info.fps)) == (160, 120, 25), path
        assert 300 < info.num_frames < 600 and info.frames_exact
        assert abs(info.duration - info.num_frames / 25) < 0.1
        video = read_video(path, short_side=64)
        assert video.dtype == torch.uint8
        assert video.shape == (info.num_frames, 3, 64, 85), path  # 160x120 -> 85x64
        verify_readable(path, info)


def test_kth_read_clip_equals_whole_video_frames():
    for path in kth_files():
        video = read_video(path, short_side=48)
        n = video.shape[0]
        for start, length, stride in [(0, 8, 1), (101, 6, 3), (n // 2, 4, 5), (n - 3, 6, 2)]:
            clip = read_clip(path, start, length, stride, short_side=48)
            expected = [min(start + k * stride, n - 1) for k in range(length)]
            assert clip.shape == (length, 3, 48, 64)
            assert torch.equal(clip, video[expected]), (path.name, start, stride)


def test_kth_native_size_and_reader_protocol():
    path = kth_files()[0]
    reader = DirectReader()
    clip = reader.read_clip(path, 10, 5, 2, None)
    assert clip.shape == (5, 3, 120, 160) and clip.dtype == torch.uint8
    assert reader.num_frames(path) == probe_video(path).num_frames


# -- synthetic files: formats, VFR, sizes -----------------------------------------------------


def test_clip_frames_are_the_requested_indices(tmp_path):
    path = write_video(tmp_path / "idx.mp4", 30)
    clip = read_clip(path, 7, 5, stride=3)
    assert [level_index(f) for f in clip] == [7, 10, 13, 16, 19]
    # documented layout: T x 3 x H x W shape over interleaved (channels-last) RGB bytes
    assert clip.shape == (5, 3, 48, 64) and clip.permute(0, 2, 3, 1).is_contiguous()


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied_and_the_short_side_is_the_upright_one(tmp_path, rotation):
    stored = write_video(tmp_path / "stored.mp4", 12, width=64, height=48)
    tagged = write_video(tmp_path / f"tagged{rotation}.mp4", 12, width=64, height=48, rotation=rotation)
    turns = (rotation // 90) % 4
    for short_side in (None, 24):
        upright = read_video(tagged, short_side=short_side)
        plain = read_video(stored, short_side=short_side)
        expected = torch.rot90(plain, turns, dims=(2, 3))  # counter-clockwise, as ffplay shows it
        assert upright.shape == expected.shape
        assert torch.equal(upright, expected)
        assert torch.equal(read_clip(tagged, 5, 3, stride=2, short_side=short_side), upright[5:10:2])
    # frame 0 is black with a white bar down the stored picture's left column, top quarter
    first = read_video(tagged)[0].float().mean(0)
    assert first.shape == ((64, 48) if rotation % 180 else (48, 64))
    bar = {90: first[-1, :12], -90: first[0, -12:], 180: first[-12:, -1]}[rotation]
    assert bar.min() > 200 and first[first.shape[0] // 2, first.shape[1] // 2] < 30


def test_quarter_turns_round_to_the_nearest_multiple_of_90():
    from vtransfer.data.decode import quarter_turns

    assert [quarter_turns(r) for r in (0, 90, -90, 180, -180, 270, 89.6, -0.4, float("nan"))] == [0, 1, 3, 2, 2, 3, 1, 0, 0]


def test_past_the_end_repeats_last_frame(tmp_path):
    path = write_video(tmp_path / "short.mp4", 6)
    clip = read_clip(path, 2, 8, stride=1)
    assert [level_index(f) for f in clip] == [2, 3, 4, 5, 5, 5, 5, 5]
    beyond = read_clip(path, 40, 3)  # start past the end: the last frame, repeated
    assert [level_index(f) for f in beyond] == [5, 5, 5]


def test_one_frame_video(tmp_path):
    path = write_video(tmp_path / "one.mp4", 1)
    assert probe_video(path).num_frames == 1
    clip = read_clip(path, 0, 4, stride=2, short_side=24)
    assert clip.shape == (4, 3, 24, 32)
    assert all(torch.equal(clip[0], c) for c in clip)


def test_variable_frame_rate_follows_presentation_time(tmp_path):
    # Frame durations alternate 40 ms and 120 ms: frames sit at 0, 40, 160, 200, 320, ...
    n = 20
    pts = [0]
    for i in range(n - 1):
        pts.append(pts[-1] + (40 if i % 2 == 0 else 120))
    path = write_video(tmp_path / "vfr.mp4", n, pts=pts, time_base=Fraction(1, 1000))
    info = probe_video(path)
    video = read_video(path)
    # Reference: grid index g shows the last frame whose time <= (g + 0.5) / fps.
    times = np.array(pts) / 1000.0
    expected = [int(np.searchsorted(times, (g + 0.5) / info.fps, side="right")) - 1 for g in range(video.shape[0])]
    assert [level_index(f) for f in video] == expected
    assert abs(video.shape[0] - n) <= 1  # average rate ~= frames / duration
    clip = read_clip(path, 5, 6, stride=2)
    idx = [min(5 + 2 * k, video.shape[0] - 1) for k in range(6)]
    assert torch.equal(clip, video[idx])


def test_containers_without_frame_count(tmp_path):
    mkv = write_video(tmp_path / "mjpeg.mkv", 30, codec="mjpeg", pix_fmt="yuvj420p")
    webm = write_video(tmp_path / "vp9.webm", 12, codec="libvpx-vp9")
    for path, n in [(mkv, 30), (webm, 12)]:
        info = probe_video(path)
        assert not info.frames_exact and info.num_frames == n, path
        video = read_video(path, short_side=32)
        assert video.shape == (n, 3, 32, 43)
        assert torch.equal(read_clip(path, 4, 3, 2, short_side=32), video[[4, 6, 8]])


def test_grayscale_source_becomes_rgb(tmp_path):
    path = write_video(tmp_path / "gray.mkv", 8, codec="ffv1", pix_fmt="gray")
    clip = read_clip(path, 3, 2)
    assert clip.shape == (2, 3, 48, 64)
    assert torch.equal(clip[:, 0], clip[:, 1]) and torch.equal(clip[:, 1], clip[:, 2])
    assert [level_index(f) for f in clip] == [3, 4]


def test_odd_sizes_and_yuv444(tmp_path):
    path = write_video(tmp_path / "odd.mp4", 6, width=97, height=63, pix_fmt="yuv444p")
    assert read_clip(path, 0, 2).shape == (2, 3, 63, 97)
    assert read_clip(path, 0, 2, short_side=32).shape == (2, 3, 32, 49)
    portrait = write_video(tmp_path / "portrait.mp4", 4, width=48, height=80)
    assert read_clip(portrait, 0, 1, short_side=33).shape == (1, 3, 55, 33)


def test_mpeg4_avi_seek_matches_sequential(tmp_path):
    path = write_video(tmp_path / "m.avi", 60, codec="mpeg4")
    video = read_video(path)
    assert torch.equal(read_clip(path, 37, 4, 4), video[[37, 41, 45, 49]])


# -- bad files ---------------------------------------------------------------------------


def assert_decode_error(fn, path: Path, *args) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as info:
        fn(path, *args)
    assert str(path) in str(info.value) and info.value.path == path
    return info.value


def test_bad_files_raise_decode_error_naming_the_file(tmp_path):
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 40)
    missing = tmp_path / "missing.mp4"
    assert "zero-byte" in assert_decode_error(probe_video, zero).reason
    assert "unreadable container" in assert_decode_error(probe_video, text).reason
    assert "not found" in assert_decode_error(probe_video, missing).reason
    for fn, args in [(read_clip, (0, 4)), (read_video, ()), (verify_readable, ())]:
        for bad in (zero, text, missing):
            assert_decode_error(fn, bad, *args)


def test_truncated_files(tmp_path):
    # moov atom at the end (PyAV's default): a truncated file has no index at all.
    whole = write_video(tmp_path / "whole.mp4", 50, lossless=False)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_decode_error(probe_video, cut)
    assert_decode_error(read_clip, cut, 0, 2)
    # moov at the start: the header survives, the frames stop early.
    fast = write_video(tmp_path / "fast.mp4", 100, lossless=False, container_options={"movflags": "faststart"})
    verify_readable(fast)
    cut_fast = tmp_path / "cut_fast.mp4"
    cut_fast.write_bytes(fast.read_bytes()[: fast.stat().st_size // 2])
    assert probe_video(cut_fast).num_frames == 100  # the header still promises everything
    assert_decode_error(verify_readable, cut_fast)


def test_truncated_kth_avi(tmp_path):
    source = kth_files()[3]
    assert source.suffix == ".avi"
    cut = tmp_path / "cut.avi"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    err = assert_decode_error(verify_readable, cut)
    assert "truncated" in err.reason


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert assert_decode_error(probe_video, path).reason == "no video stream"


# -- sampling ----------------------------------------------------------------------------


def test_random_clip_start_ranges():
    g = torch.Generator().manual_seed(0)
    starts = [random_clip_start(100, 8, 2, g) for _ in range(300)]
    span = clip_span(8, 2)
    assert span == 15 and min(starts) == 0 and max(starts) == 100 - span
    assert random_clip_start(10, 8, 2, g) == 0  # shorter than the span
    assert random_clip_start(1, 8, 1, g) == 0  # one frame
    a = torch.Generator().manual_seed(5)
    b = torch.Generator().manual_seed(5)
    assert [random_clip_start(500, 4, 1, a) for _ in range(5)] == [random_clip_start(500, 4, 1, b) for _ in range(5)]


def test_uniform_clip_starts():
    assert uniform_clip_starts(100, 10, 1, 4) == [0, 30, 60, 90]
    assert uniform_clip_starts(100, 10, 1, 1) == [45]
    assert uniform_clip_starts(12, 8, 2, 3) == [0, 0, 0]  # short video
    assert uniform_clip_starts(1, 16, 1, 10) == [0] * 10  # one frame
    starts = uniform_clip_starts(1000, 16, 2, 20)
    assert len(starts) == 20 and starts == sorted(starts) and starts[-1] == 1000 - 31


def test_sampled_clips_have_requested_shape_for_long_short_and_one_frame(tmp_path):
    g = torch.Generator().manual_seed(1)
    for n in (60, 5, 1):
        path = write_video(tmp_path / f"v{n}.mp4", n)
        frames = probe_video(path).num_frames
        assert frames == n
        for start in [random_clip_start(frames, 8, 2, g), *uniform_clip_starts(frames, 8, 2, 3)]:
            clip = read_clip(path, start, 8, 2, short_side=32)
            assert clip.shape == (8, 3, 32, 43) and clip.dtype == torch.uint8
