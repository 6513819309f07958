"""Bad input as a matrix (issue 7): every case is built for real and its outcome asserted.

Two kinds of outcome are acceptable, and each case says which it gets:

* **error** - the run refuses to start with a typed error whose message names
  the file or folder and what is wrong with it;
* **skip** / **used** - the file is left out (reported by ``check``, in the
  training log through the reporter, in ``bad_videos.json`` or the report's
  ``skipped_files``), or it is decoded and used; every other video is used.

The skip/used cases share one messy dataset (one ``check``, one fine-tuning
run); the error cases each build a tiny dataset. ``OUTCOMES`` collects the
observed outcome of every case and is printed at the end (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import videos

av = pytest.importorskip("av")

import vtransfer.api as api  # noqa: E402
from vtransfer.workflows import runs  # noqa: E402
from vtransfer.data.check import check_dataset, printable  # noqa: E402
from vtransfer.data.scan import load_dataset  # noqa: E402
from vtransfer.data.splits import read_manifest  # noqa: E402
from vtransfer.utils.errors import DatasetError, VtransferError  # noqa: E402

FAST = dict(backbone="slowfusion", preset="tiny", size=48, policy="all", epochs=2, batch_size=8, clips_per_video=2,
            val_clips=1, workers=0, patience=0, device="cpu", threads=1)
CLIP_FRAMES = 10  # the tiny slow-fusion clip

OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def print_outcomes():
    """Print ``case -> observed outcome`` once the module has run (shown with ``pytest -s``)."""
    yield
    print("\n\nbad input: case -> observed outcome")
    for case, outcome in OUTCOMES.items():
        print(f"  {case:34s} {outcome}")


# -- building the files ------------------------------------------------------------------
def write_video(path: Path | bytes, frames: int, width: int = 48, height: int = 48, *, pts: list[int] | None = None,
                time_base: Fraction | None = None, pix_fmt: str = "yuv420p", options: dict | None = None) -> None:
    """A small lossy H.264 video at 12 fps (see tests/videos.py)."""
    videos.write_video(path, frames, width, height, fps=12, pix_fmt=pix_fmt, pts=pts, time_base=time_base,
                       lossless=False, container_options=options)


def write_audio_only(path: Path) -> None:
    """An MP4 (``isom`` brand, so it looks like a video) holding only an AAC track."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        for _ in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    """A valid grey PNG image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    raw = b"".join(b"\x00" + bytes([128] * width) for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


_IDENTITY = b"".join(v.to_bytes(4, "big", signed=True) for v in (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000))
_ROTATE_90 = b"".join(v.to_bytes(4, "big", signed=True) for v in (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))


def add_rotation(path: Path) -> None:
    """Set the track's display matrix (``tkhd``) to a 90 degree rotation, as phones do.

    This FFmpeg build's mov muxer ignores the old ``rotate`` metadata tag and
    PyAV cannot attach display-matrix side data to an output stream, so the
    matrix is written into the ``tkhd`` box directly (version 0 box: the
    matrix starts 40 bytes after the box type).
    """
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd") + 4 + 40
    assert data[at - 40] == 0 and bytes(data[at:at + 36]) == _IDENTITY, "unexpected tkhd layout"
    data[at:at + 36] = _ROTATE_90
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file after ``keep`` of its bytes (a copy interrupted mid-stream)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- the shared messy dataset: skip/used cases ---------------------------------------------
# case -> (relative path as bytes, expected outcome kind, expected reason fragment)
SKIP_OR_USE = {
    "zero-byte file": (b"move_down/zero.mp4", "skip:scan", "zero-byte file"),
    "truncated, index lost": (b"move_down/cut_tail.mp4", "skip:check", "unreadable container"),
    "truncated mid-stream": (b"move_down/cut_mid.mp4", "skip:check", "truncated"),
    "text file as .mp4": (b"move_down/notes.mp4", "skip:scan", "not a video (text file)"),
    "PNG image as .mp4": (b"ring/picture.mp4", "skip:scan", "not a video (PNG image)"),
    "audio-only .mp4": (b"ring/sound.mp4", "skip:check", "no video stream"),
    "symlink loop": (b"ring/loop", "skip:scan", "symlink loop"),
    "1-frame video": (b"ring/one_frame.mp4", "used", None),
    "shorter than the clip (5 < 10)": (b"cross/five_frames.mp4", "used", None),
    "1920x1080 resolution": (b"cross/full_hd.mp4", "used", None),
    "variable frame rate": (b"cross/vfr.mp4", "used", None),
    "grayscale (gray pix_fmt)": (b"bounce/gray.mp4", "used", None),
    "rotation metadata (90 deg)": (b"bounce/rotated.mp4", "used", None),
    "non-UTF-8 file name": (b"bounce/caf\xe9 \xff.mp4", "used", None),
    "spaces in file name": (b"move_up/my clip 01.mp4", "used", None),
}


def build_case(root: bytes, case: str) -> None:
    """Write the file of one SKIP_OR_USE case under ``root`` (bytes paths: names need not be UTF-8)."""
    rel = SKIP_OR_USE[case][0]
    path = os.path.join(root, rel)
    p = Path(os.fsdecode(path))
    if case == "zero-byte file":
        p.write_bytes(b"")
    elif case == "truncated, index lost":
        write_video(p, 24)  # 'moov' index at the end: cutting the file loses it
        truncate(p)
    elif case == "truncated mid-stream":
        write_video(p, 60, options={"movflags": "+faststart"})  # header intact, frames gone
        truncate(p)
    elif case == "text file as .mp4":
        p.write_text("these are my notes, not a video\n")
    elif case == "PNG image as .mp4":
        p.write_bytes(png_bytes())
    elif case == "audio-only .mp4":
        write_audio_only(p)
    elif case == "symlink loop":
        os.symlink(".", p)  # ring/loop -> ring
    elif case == "1-frame video":
        write_video(p, 1)
    elif case == "shorter than the clip (5 < 10)":
        write_video(p, 5)
    elif case == "1920x1080 resolution":
        write_video(p, 3, 1920, 1080)
    elif case == "variable frame rate":
        pts = [0, 40, 60, 150, 170, 300, 310, 320, 450, 600, 640, 700, 900, 950, 1000, 1200]
        write_video(p, len(pts), pts=pts, time_base=Fraction(1, 1000))
    elif case == "grayscale (gray pix_fmt)":
        write_video(p, 16, pix_fmt="gray")
    elif case == "rotation metadata (90 deg)":
        write_video(p, 16, 64, 48)
        add_rotation(p)
    else:  # odd names: ordinary videos
        write_video(path, 16)


@pytest.fixture(scope="module")
def messy(tmp_path_factory, demo_dataset):
    """The messy dataset, its ``check`` report and one fine-tuning run with the log it printed."""
    root = tmp_path_factory.mktemp("messy") / "data"
    shutil.copytree(demo_dataset, root)  # six demo classes of tiny valid videos (every case must leave them usable)
    good = sorted(root.glob("*/*.mp4"))
    for case in SKIP_OR_USE:
        build_case(os.fsencode(root), case)
    report = check_dataset(load_dataset(root), frames=CLIP_FRAMES, workers=2)
    log = LogReporter()
    res = api.finetune(root, out=tmp_path_factory.mktemp("runs") / "run", cache="memory", reporter=log, **FAST)
    return {"root": root, "good": good, "check": report, "run": res, "log": log}


class LogReporter:
    """A reporter that keeps every line, as the CLI's training log would show them."""

    def __init__(self, on_epoch_end=None):
        self.lines: list[str] = []
        self.on_epoch_end = on_epoch_end

    def epoch_start(self, epoch, epochs, batches):  # noqa: D102 - reporter protocol
        pass

    def batch_end(self, loss, acc):  # noqa: D102
        pass

    def epoch_end(self, record, improved):  # noqa: D102
        self.lines.append(f"epoch {record.epoch} bad clips {record.bad_clips}")
        if self.on_epoch_end is not None:
            self.on_epoch_end(record.epoch)

    def message(self, text):  # noqa: D102
        self.lines.append(text)

    def text(self) -> str:
        """Everything reported, one line each."""
        return "\n".join(self.lines)


def _abs(root: Path, rel: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(root), rel)))


@pytest.mark.parametrize("case", list(SKIP_OR_USE))
def test_skip_or_use_matrix(messy, case):
    rel, kind, reason = SKIP_OR_USE[case]
    path = _abs(messy["root"], rel)
    shown = printable(path)
    check, res, log = messy["check"], messy["run"], messy["log"].text()
    report = json.loads((res.run_dir / "report" / "report.json").read_text())
    manifest = {str(r.path) for r in read_manifest(res.run_dir / runs.SPLIT_FILE).records}
    bad_videos = runs.read_bad_videos(res.run_dir)
    if kind == "skip:scan":
        # never taken as a video: listed by check, the training log and the report
        why = [s.reason for s in check.skipped if s.path == path]
        assert len(why) == 1 and reason in why[0]
        assert str(path) not in manifest
        assert f"{shown[len(str(messy['root'])) + 1:]} ({why[0]})" in log  # named in the training log
        assert {"path": shown, "reason": why[0]} in report["extra"]["skipped_files"]
        OUTCOMES[case] = f"skipped at scan: {reason!r} (check.skipped, warning line, report skipped_files)"
    elif kind == "skip:check":
        # looks like a video, does not decode: check says unreadable, the run leaves it out of every split
        why = next(u.reason for u in check.unreadable if u.path == path)
        assert reason in why
        assert str(path) in manifest  # the split is kept as scanned, so a replay gets the same split
        entry = next(e for e in bad_videos if e["path"] == shown)
        assert entry == {"path": shown, "reason": why, "epoch": 0, "count": 1}
        assert entry in report["extra"]["bad_videos"]
        assert f"{shown[len(str(messy['root'])) + 1:]} ({why})" in log
        OUTCOMES[case] = f"check: unreadable {why!r}; finetune leaves it out (bad_videos.json epoch 0, warning, report)"
    else:
        # usable: check takes it, it stays in the split, nothing reports it as bad, and it decodes to a full clip
        assert path in check.infos, [u for u in check.unreadable if u.path == path]
        info = check.infos[path]
        assert str(path) in manifest
        assert all(e["path"] != shown for e in bad_videos)
        # (the split audit may name it as a near-duplicate of the video it was made from: that is not "bad")
        not_audit = "\n".join(line for line in log.splitlines() if not line.startswith("audit:"))
        assert shown[len(str(messy['root'])) + 1:] not in not_audit
        from vtransfer.data.dataset import ClipDataset
        from vtransfer.models.registry import build_backbone

        pre = build_backbone("slowfusion", "tiny", num_classes=2, input_size=48, resize_short=56).preprocessing
        ds = ClipDataset([r for r in read_manifest(res.run_dir / runs.SPLIT_FILE).records if r.path == path],
                         {p.name: i for i, p in enumerate(sorted(messy["root"].iterdir())) if p.is_dir()},
                         pre, mode="eval", clips_per_video=1)
        item = ds[0]
        assert "clip" in item, item
        assert tuple(item["clip"].shape) == (CLIP_FRAMES, 3, 48, 48)
        short = any(s.path == path for s in check.too_short)
        note = f" (listed by check as too short: {info.num_frames} < {CLIP_FRAMES} frames; last frame repeats)" if short else ""
        OUTCOMES[case] = f"used: {info.width}x{info.height}, {info.num_frames} frames, {info.codec}{note}"
    # whatever the case, every good video was used
    assert len(messy["good"]) == 24 and all(str(p) in manifest for p in messy["good"])
    assert not any(e["path"] == str(p) for p in messy["good"] for e in bad_videos)


def test_rotation_is_stored_but_frames_are_decoded_as_coded(messy):
    """The display matrix is in the file (FFmpeg reads it) but vtransfer does not rotate frames."""
    path = _abs(messy["root"], SKIP_OR_USE["rotation metadata (90 deg)"][0])
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        assert abs(frame.rotation) == 90
    info = messy["check"].infos[path]
    assert (info.width, info.height) == (64, 48)  # coded size, not the displayed 48x64
    OUTCOMES["rotation metadata (90 deg)"] += "; display matrix ignored: frames decoded as coded (not rotated)"


def test_messy_run_uses_every_other_video(messy):
    res, check = messy["run"], messy["check"]
    counts = json.loads((res.run_dir / "config.json").read_text())["resolved"]["split_sizes"]
    unreadable = {printable(u.path) for u in check.unreadable}
    assert {e["path"] for e in runs.read_bad_videos(res.run_dir)} == unreadable
    # split.csv keeps every scanned video (a replay gets the same split); the run used the usable ones
    scanned = load_dataset(messy["root"])
    assert len(read_manifest(res.run_dir / runs.SPLIT_FILE).records) == len(scanned.records) == check.total == 35
    assert sum(counts.values()) == check.usable == 32
    assert res.test.num_videos == counts["test"]
    assert [h["bad_clips"] for h in res.history] == [0, 0]  # nothing unreadable reached training


# -- error cases: the run refuses to start, naming what is wrong ---------------------------
def _two_classes(root: Path, n: int = 3) -> Path:
    for cls in ("ants", "bees"):
        for i in range(n):
            write_video(root / cls / f"{cls}_{i}.mp4", 6, 16, 16)
    return root


def _case_empty_class(root: Path) -> dict:
    _two_classes(root)
    (root / "wasps").mkdir()
    return {}


def _case_test_only_class(root: Path) -> dict:
    for split in ("train", "test"):
        for cls in ("ants", "bees"):
            for i in range(2):
                write_video(root / split / cls / f"{cls}_{i}.mp4", 6, 16, 16)
    write_video(root / "test" / "wasps" / "wasps_0.mp4", 6, 16, 16)
    return {}


def _case_single_class(root: Path) -> dict:
    for i in range(3):
        write_video(root / "ants" / f"ants_{i}.mp4", 6, 16, 16)
    return {}


def _case_unknown_categories(root: Path) -> dict:
    _two_classes(root)
    cats = root.parent / "categories.csv"
    cats.write_text("class,category\nants,insects\nBees,insects\nspiders,arachnids\n")
    return {"categories": cats}


ERROR_CASES = {
    "empty class folder": (_case_empty_class, DatasetError, r"class folder .*wasps contains no video files"),
    "class in test, absent in train": (_case_test_only_class, DatasetError, r"class\(es\) wasps appear in test but have no training video"),
    "single-class dataset": (_case_single_class, DatasetError, r"has a single class \(ants\)"),
    "categories name unknown classes": (_case_unknown_categories, DatasetError,
                                        r"categories file .*categories.csv names 2 class\(es\) that are not in the dataset: "
                                        r"Bees \(did you mean bees\?\), spiders"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_matrix(tmp_path, case):
    build, error, pattern = ERROR_CASES[case]
    root = tmp_path / "data"
    root.mkdir()
    kwargs = build(root)
    with pytest.raises(error, match=pattern) as info:
        api.finetune(root, out=tmp_path / "run", **kwargs, **FAST)
    assert not (tmp_path / "run" / runs.MODEL_FILE).exists()
    if "categories" not in kwargs:  # the same error from check's entry point (load_dataset)
        with pytest.raises(error, match=pattern):
            load_dataset(root)
    OUTCOMES[case] = f"error {type(info.value).__name__}: {info.value}".replace(str(tmp_path), "TMP")


# -- videos that break after check -----------------------------------------------------------
@pytest.fixture(scope="module")
def clean(demo_dataset):
    """A clean dataset that each test below copies before breaking it (conftest's shared one: never write into it)."""
    return demo_dataset


def _train_videos(run_dir: Path) -> list[Path]:
    return [r.path for r in read_manifest(run_dir / runs.SPLIT_FILE, check_files=False).records if r.split == "train"]


def test_video_corrupted_between_check_and_training_is_left_out(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    assert check_dataset(load_dataset(root), frames=CLIP_FRAMES).usable == 24
    victim = sorted(root.glob("ring/*.mp4"))[0]
    victim.write_bytes(victim.read_bytes()[:600])  # corrupted after check, before the run
    log = LogReporter()
    res = api.finetune(root, out=tmp_path / "run", cache="memory", reporter=log, **FAST)
    entries = runs.read_bad_videos(res.run_dir)
    assert [(e["path"], e["epoch"], e["count"]) for e in entries] == [(str(victim), 0, 1)]
    assert f"left out of every split: ring/{victim.name} ({entries[0]['reason']})" in log.text()
    report = json.loads((res.run_dir / "report" / "report.json").read_text())
    assert report["extra"]["bad_videos"] == entries
    assert [h["bad_clips"] for h in res.history] == [0, 0]
    OUTCOMES["unreadable after check, before run"] = f"skipped before training: {entries[0]['reason']!r} (bad_videos.json epoch 0, warning, report)"


def test_video_broken_during_training_is_counted_and_reported(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    run_dir = tmp_path / "run"
    victims: list[Path] = []

    def break_two(epoch: int) -> None:
        if epoch == 1:
            victims.extend(_train_videos(run_dir)[:2])
            victims[0].write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x13\x37" * 200)  # corrupted in place
            victims[1].unlink()  # deleted

    log = LogReporter(on_epoch_end=break_two)
    res = api.finetune(root, out=run_dir, cache="none", max_bad_fraction=0.5, reporter=log, **{**FAST, "epochs": 3})
    assert [h["bad_clips"] for h in res.history] == [0, 2, 2]  # counted in metrics.jsonl, epoch by epoch
    assert [h["bad_clips"] for h in runs.read_metrics(run_dir)] == [0, 2, 2]
    entries = runs.read_bad_videos(run_dir)
    assert sorted((e["path"], e["epoch"], e["count"]) for e in entries) == sorted(
        (str(v), epoch, 1) for v in victims for epoch in (2, 3))
    reasons = {e["path"]: e["reason"] for e in entries}
    assert reasons[str(victims[1])] == "file not found"
    assert "unreadable" in reasons[str(victims[0])] or "no video stream" in reasons[str(victims[0])]
    warnings = [line for line in log.lines if line.startswith("warning: epoch")]
    assert len(warnings) == 2 and all(str(victims[0]) in w and "2 clip(s)" in w for w in warnings)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["extra"]["bad_videos"] == entries
    train_size = len(_train_videos(run_dir))
    OUTCOMES["unreadable during training"] = (
        f"epochs 2-3 skip 2 of {train_size} clips ({reasons[str(victims[0])]!r}, 'file not found'); counted in "
        "metrics.jsonl bad_clips, bad_videos.json (epoch, count), warning line, report; run finishes")


def test_too_many_bad_clips_stop_the_run_with_a_clear_message(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    run_dir = tmp_path / "run"

    def break_half(epoch: int) -> None:
        if epoch == 1:
            train = _train_videos(run_dir)
            for v in train[: len(train) // 2]:
                v.write_bytes(b"garbage" * 100)

    with pytest.raises(VtransferError) as info:
        api.finetune(root, out=run_dir, cache="none", max_bad_fraction=0.2, reporter=LogReporter(break_half),
                     **{**FAST, "epochs": 3})
    message = str(info.value)
    train = _train_videos(run_dir)
    half = len(train) // 2
    assert f"epoch 2: {half} of {len(train)} training clips failed to decode (more than --max-bad-fraction 0.2)" in message
    assert str(sorted(train[:half])[0]) in message and "bad_videos.json" in message
    assert len(runs.read_bad_videos(run_dir)) == half
    assert [h["epoch"] for h in runs.read_metrics(run_dir)] == [1]  # the last finished epoch is kept for --resume
    assert runs.load_resume_state(run_dir)["epoch"] == 1
    assert not (run_dir / "report").exists()
    # as the message says: repair the files and resume; the run finishes from its last finished epoch
    for v in train[:half]:
        shutil.copyfile(clean / v.relative_to(root), v)
    resumed = api.finetune(root, resume=run_dir)
    assert [(h["epoch"], h["bad_clips"]) for h in resumed.history] == [(1, 0), (2, 0), (3, 0)]
    OUTCOMES["too many unreadable (> --max-bad-fraction)"] = (
        "run stops: " + message.split(": /", 1)[0] + ": <files> ...; resume.pt keeps epoch 1; repaired + --resume finishes")


def test_too_many_unreadable_before_training_stop_the_run(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    for v in sorted(root.glob("*/*.mp4"))[::2]:
        truncate(v, 0.3)
    with pytest.raises(DatasetError) as info:
        api.finetune(root, out=tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()  # it failed before an epoch: nothing left in the way of the rerun
    from vtransfer.data.scan import load_dataset

    train = [r.path for r in load_dataset(root).records if r.split == "train"]  # the split the run made
    broken = [v for v in train if v in sorted(root.glob("*/*.mp4"))[::2]]
    assert f"{len(broken)} of {len(train)} training videos in {root} cannot be decoded (more than --max-bad-fraction 0.2)" in str(info.value)
    assert "vtransfer check" in str(info.value)
    assert not (tmp_path / "run" / runs.RESUME_FILE).exists()
    OUTCOMES["many unreadable before training"] = "error DatasetError: " + str(info.value).split(": ", 1)[0].replace(str(tmp_path), "TMP")
