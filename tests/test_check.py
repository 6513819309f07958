"""``check``: bad files are reported by path with their reason, the rest of the dataset stays usable."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vtransfer.data.check import check_dataset, drop_unreadable, printable
from vtransfer.data.records import VideoInfo
from vtransfer.data.scan import load_dataset
from vtransfer.utils.errors import DatasetError, VideoDecodeError

av = pytest.importorskip("av")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_video(path: Path | bytes, frames: int = 20, size: int = 32, fps: int = 10, faststart: bool = False) -> None:
    """A real, tiny H.264 MP4: a bright bar moving over a brightening background."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(os.fsdecode(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), (i * 5) % 200, np.uint8)
            image[:, (i * 2) % size] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def messy_dataset(tmp_path) -> Path:
    """Two classes of three good clips, plus a zero-byte file, two truncated videos and a text file named .mp4."""
    data = tmp_path / "data"
    for cls in ("left", "right"):
        for i in range(3):
            write_video(data / cls / f"{cls} {i}.mp4")
    (data / "left" / "empty.mp4").write_bytes(b"")
    write_video(data / "left" / "cut_tail_index.mp4")  # index ('moov') at the end: cutting loses it
    truncate(data / "left" / "cut_tail_index.mp4")
    write_video(data / "right" / "cut_mid_stream.mp4", frames=60, faststart=True)  # header intact, frames gone
    truncate(data / "right" / "cut_mid_stream.mp4")
    (data / "right" / "notes.mp4").write_text("this is a text file, not a video\n")
    return data


def test_check_reports_bad_files_by_path_and_keeps_the_rest(messy_dataset):
    index = load_dataset(messy_dataset, split_seed=0)
    report = check_dataset(index, frames=8, stride=1, workers=2)
    skipped = {s.path: s.reason for s in report.skipped}
    assert skipped == {
        messy_dataset / "left" / "empty.mp4": "zero-byte file",
        messy_dataset / "right" / "notes.mp4": "not a video (text file)",
    }
    unreadable = {u.path: u.reason for u in report.unreadable}
    assert set(unreadable) == {
        messy_dataset / "left" / "cut_tail_index.mp4",
        messy_dataset / "right" / "cut_mid_stream.mp4",
    }
    assert all(reason for reason in unreadable.values())
    assert report.total == 8 and report.usable == 6 and report.ok
    assert sum(sum(v.values()) for v in report.counts.values()) == 6
    assert report.ranges["width"] == (32.0, 32.0) and report.ranges["fps"] == (10.0, 10.0)
    assert report.ranges["num_frames"] == (20.0, 20.0)
    assert report.too_short == []
    assert report.codecs == {"h264": 6}

    usable = drop_unreadable(index, report)
    assert len(usable.records) == 6
    assert {s.path for s in usable.skipped} >= set(unreadable)

    payload = json.loads(json.dumps(report.to_dict()))
    assert {u["path"] for u in payload["unreadable"]} == {str(p) for p in unreadable}
    assert {s["path"] for s in payload["skipped"]} == {str(p) for p in skipped}


def test_check_flags_videos_shorter_than_a_clip(messy_dataset):
    index = load_dataset(messy_dataset)
    report = check_dataset(index, frames=8, stride=3, workers=1)  # needs (8-1)*3+1 = 22 frames
    assert report.frames_needed == 22
    assert len(report.too_short) == 6 and all(s.num_frames == 20 for s in report.too_short)
    assert report.usable == 6  # short videos are still usable (frames repeat)


def test_check_survives_any_probe_failure_and_reports_progress(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(5):
            (data / cls).mkdir(parents=True, exist_ok=True)
            (data / cls / f"{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 32)
    threads = set()

    def fake_probe(record):
        threads.add(threading.get_ident())
        time.sleep(0.02)  # long enough that the pool hands work to several threads
        name = record.path.name
        if name == "1.mp4":
            raise VideoDecodeError(record.path, "no video stream")
        if name == "2.mp4" and record.label == "b":
            raise RuntimeError("decoder exploded")
        frames = 4 if name == "3.mp4" else 50
        return VideoInfo(record.path, frames, 25.0, frames / 25.0, 64 + int(name[0]), 48, "fake")

    monkeypatch.setattr("vtransfer.data.check._probe_one", fake_probe)
    index = load_dataset(data)
    seen = []
    report = check_dataset(index, frames=16, workers=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 10) for i in range(1, 11)]
    reasons = {(u.label, u.path.name): u.reason for u in report.unreadable}
    assert reasons == {("a", "1.mp4"): "no video stream", ("b", "1.mp4"): "no video stream",
                       ("b", "2.mp4"): "RuntimeError: decoder exploded"}
    assert report.usable == 7
    assert {(s.label, s.path.name) for s in report.too_short} == {("a", "3.mp4"), ("b", "3.mp4")}
    assert report.ranges["width"] == (64.0, 68.0)
    assert report.ranges["duration"] == (0.16, 2.0)
    assert len(threads) > 1


def test_check_on_kth_fragments():
    kth = SHARED / "kth_fragments"
    if not kth.is_dir():
        pytest.skip("../shared/data is not present")
    index = load_dataset(kth)
    report = check_dataset(index, frames=16, workers=2)
    assert report.classes == ["boxing", "handclapping", "jogging"]
    assert report.usable == report.total == 6 and not report.unreadable and not report.skipped
    assert report.codecs == {"h264": 3, "mpeg4": 3}
    assert report.ranges["fps"] == (25.0, 25.0)
    assert report.ranges["width"] == (160.0, 160.0) and report.ranges["height"] == (120.0, 120.0)
    lo, hi = report.ranges["duration"]
    assert 12.5 <= lo <= hi <= 22.5
    assert report.seconds < 30


def test_odd_file_names_are_checked(tmp_path):
    data = os.fsencode(tmp_path / "data")
    for cls in (b"class one", b"caf\xe9"):
        for i in range(3):
            write_video(os.path.join(data, cls, b"clip \xff %d.mp4" % i), frames=6, size=16)
    index = load_dataset(Path(os.fsdecode(data)))
    report = check_dataset(index, frames=4)
    assert report.usable == 6, report.unreadable
    text = json.dumps(report.to_dict(), ensure_ascii=False)
    text.encode("utf-8")  # printable: no lone surrogates left
    assert "caf\\xe9" in json.loads(text)["classes"]
    assert printable(index.records[0].path).endswith("/caf\\xe9/clip \\xff 0.mp4")


def test_audio_only_and_image_files_with_video_extensions(tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(2):
            write_video(data / cls / f"{i}.mp4", frames=4, size=16)
    with av.open(str(data / "a" / "sound.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = np.zeros((1, 1024), np.float32)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (data / "b" / "photo.mov").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 100)
    report = check_dataset(load_dataset(data), frames=4)
    assert [(u.path.name, u.reason) for u in report.unreadable] == [("sound.mp4", "no video stream")]
    assert [(s.path.name, s.reason) for s in report.skipped] == [("photo.mov", "not a video (JPEG image)")]
    assert report.usable == 4


def test_a_file_that_is_not_a_manifest_is_refused(tmp_path):
    write_video(tmp_path / "v.mp4", frames=2, size=16)
    with pytest.raises(DatasetError, match="give a dataset folder or a manifest .csv"):
        load_dataset(tmp_path / "v.mp4")


def cli():
    import vtransfer.cli
    from typer.testing import CliRunner

    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    return CliRunner(), app


def test_cli_check_table_json_and_exit_codes(messy_dataset, tmp_path):
    runner, app = cli()
    result = runner.invoke(app, ["check", str(messy_dataset), "--frames", "8", "--workers", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "6 of 8 videos usable" in flat
    for name in ("left/empty.mp4", "right/notes.mp4", "left/cut_tail_index.mp4", "right/cut_mid_stream.mp4"):
        assert name in flat

    result = runner.invoke(app, ["check", str(messy_dataset), "--json", "--frames", "8"])
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["usable"] == 6 and payload["total"] == 8
    assert sorted(Path(u["path"]).name for u in payload["unreadable"]) == ["cut_mid_stream.mp4", "cut_tail_index.mp4"]

    # Nothing usable: every file looks like an MP4 but none decodes -> exit code 1.
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x13\x37" * 100)
    result = runner.invoke(app, ["check", str(broken), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["usable"] == 0

    # A dataset error (single class) is a one-line error with exit code 2.
    single = tmp_path / "single"
    write_video(single / "only" / "v.mp4", frames=4, size=16)
    result = runner.invoke(app, ["check", str(single)])
    assert result.exit_code == 2 and "single class" in result.output


def test_check_warns_about_classes_missing_from_a_split_and_a_pattern_that_matches_nothing(tmp_path):
    for cls, n in (("many", 8), ("few", 2)):
        for i in range(n):
            write_video(tmp_path / "d" / cls / f"clip{i}.mp4", frames=6, size=16)
    runner, app = cli()
    result = runner.invoke(app, ["check", str(tmp_path / "d"), "--json", "--group-pattern", r"(person\d+)", "--frames", "2"])
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert any("without a usable val video" in w and "few" in w for w in warnings), warnings
    assert any("--group-pattern '(person\\\\d+)' matches no file name" in w for w in warnings), warnings
