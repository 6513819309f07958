"""``check --audit``: near-duplicates across splits, probable label errors, group ids in names, bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vtransfer.data.records import VideoRecord
from vtransfer.data.splits import group_of
from vtransfer.evaluation.audit import (
    DUPLICATE_THRESHOLD,
    compare,
    fingerprint,
    label_issues,
    out_of_fold_probabilities,
    suggest_group_pattern,
)
from vtransfer.utils.errors import ConfigError, VideoDecodeError
from vtransfer.workflows.audit import AUDIT_FILE, audit_dataset, fingerprint_video

from videos import write_frames

av = pytest.importorskip("av")


def scene(seed: int, frames: int = 30, width: int = 64, height: int = 48) -> np.ndarray:
    """``T x H x W x 3`` uint8: a smooth random background of its own and a bright square on its own path."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 220, size=(6, 8, 3))
    background = np.kron(coarse, np.ones((height // 6 + 1, width // 8 + 1, 1)))[:height, :width]
    x0, y0 = rng.integers(4, width - 16), rng.integers(4, height - 16)
    dx, dy = rng.choice([-1, 1]) * rng.integers(1, 3), rng.choice([-1, 1]) * rng.integers(0, 2)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        image = background.copy()
        x = int(np.clip(x0 + dx * t, 0, width - 10))
        y = int(np.clip(y0 + dy * t, 0, height - 10))
        image[y:y + 10, x:x + 10] = 255
        out[t] = image
    return out


def write(path: Path, frames: np.ndarray, crf: int = 18) -> Path:
    """Lossy H.264 at ``crf``."""
    return write_frames(path, frames, fps=12, crf=crf)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> Path:
    """``DATA/{train,val,test}/<class>/``: 8 scenes, plus a mirrored copy and a trimmed copy of two training videos
    re-encoded into test and val, plus a file that is not a video."""
    root = tmp_path_factory.mktemp("audit") / "data"
    layout = {"train": [0, 1, 2, 3], "val": [4, 5], "test": [6, 7]}
    for split, seeds in layout.items():
        for seed in seeds:
            write(root / split / ("a" if seed % 2 else "b") / f"scene{seed}.mp4", scene(seed))
    write(root / "test" / "b" / "mirrored_copy.mp4", scene(0)[:, :, ::-1], crf=30)
    write(root / "val" / "a" / "trimmed_copy.mp4", scene(1)[4:-2], crf=30)
    (root / "val" / "b" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x13\x37" * 100)
    return root


def test_a_mirrored_and_a_trimmed_copy_in_other_splits_are_found_and_unrelated_videos_are_not(leaky):
    from vtransfer.data.scan import load_dataset

    report = audit_dataset(load_dataset(leaky))
    pairs = {frozenset((d.a.name, d.b.name)): d for d in report.duplicates}
    assert set(pairs) == {frozenset(("scene0.mp4", "mirrored_copy.mp4")), frozenset(("scene1.mp4", "trimmed_copy.mp4"))}
    mirrored = pairs[frozenset(("scene0.mp4", "mirrored_copy.mp4"))]
    assert mirrored.match.flipped and mirrored.match.difference <= DUPLICATE_THRESHOLD
    assert {mirrored.a_split, mirrored.b_split} == {"train", "test"}
    trimmed = pairs[frozenset(("scene1.mp4", "trimmed_copy.mp4"))]
    assert not trimmed.match.flipped and trimmed.match.overlap == pytest.approx(1.0)
    # the undecodable file is skipped with its reason; the rest is audited
    assert [(p.name, bool(reason)) for p, reason in report.skipped] == [("broken.mp4", True)]
    assert any("broken.mp4" in w for w in report.warnings())
    assert report.label_audit.startswith("skipped: give --backbone")


def test_the_same_split_is_decoded_once_per_process_and_again_when_a_file_changes(tmp_path, monkeypatch):
    """compare-policies audits one split per policy and stream: the second audit reuses the first's decoding."""
    import shutil

    from vtransfer.data.scan import load_dataset
    from vtransfer.workflows import audit as audit_workflow

    data = tmp_path / "data"
    for split, seed in (("train", 0), ("train", 1), ("test", 2), ("test", 3)):
        write(data / split / "ab"[seed % 2] / f"scene{seed}.mp4", scene(seed, frames=12))
    decoded = []
    real = audit_workflow.fingerprint_video
    monkeypatch.setattr(audit_workflow, "fingerprint_video", lambda p: decoded.append(Path(p).name) or real(p))
    first = audit_dataset(load_dataset(data), out=tmp_path / "run1")
    second = audit_dataset(load_dataset(data), out=tmp_path / "run2")
    assert len(decoded) == 4 and (tmp_path / "run2" / AUDIT_FILE).read_text() == (tmp_path / "run1" / AUDIT_FILE).read_text()
    assert second.to_dict() == first.to_dict()
    shutil.copy(data / "train" / "a" / "scene0.mp4", data / "test" / "a" / "scene2.mp4")  # a leak appears
    third = audit_dataset(load_dataset(data))
    assert len(decoded) == 8 and len(third.duplicates) == 1 and not first.duplicates


def test_compare_is_mirror_and_trim_invariant_and_separates_scenes():
    a = fingerprint(scene(0), 12.0)
    assert compare(a, fingerprint(scene(0)[:, :, ::-1], 12.0)).difference < 1.0
    trimmed = compare(a, fingerprint(scene(0)[5:25], 12.0))
    assert trimmed.difference < 1.0 and trimmed.offset_seconds == pytest.approx(-5 / 12)
    assert compare(a, fingerprint(scene(3), 12.0)).difference > 3 * DUPLICATE_THRESHOLD
    # a copy at another frame rate (every second frame) still lines up
    assert compare(a, fingerprint(scene(0)[::2], 6.0)).difference < 1.0


def test_an_undecodable_file_is_skipped_with_its_reason(tmp_path):
    good = [write(tmp_path / f"v{i}.mp4", scene(i)) for i in range(2)]
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    records = {"train": [VideoRecord(good[0], "x"), VideoRecord(bad, "x")], "test": [VideoRecord(good[1], "y")]}
    report = audit_dataset(records)
    assert report.videos == 3 and report.splits == {"train": 2, "val": 0, "test": 1}
    assert [p for p, _ in report.skipped] == [bad] and report.skipped[0][1]
    assert report.duplicates == [] and report.pairs_compared == 1
    with pytest.raises(VideoDecodeError):
        fingerprint_video(bad)


def test_a_planted_label_swap_on_separable_features_is_flagged():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), 12)
    features = centres[labels] + rng.normal(size=(36, 16))
    noisy = labels.copy()
    noisy[5] = 2  # a class-0 video labelled 2
    probs = out_of_fold_probabilities(features, noisy, 3)
    assert probs.shape == (36, 3) and np.allclose(probs.sum(1), 1.0)
    issues = label_issues(noisy, probs)
    assert issues and issues[0] == 5
    assert len(issues) <= 3
    with pytest.raises(ConfigError, match="at least 2 training videos"):
        out_of_fold_probabilities(features[:13], np.r_[np.zeros(12, int), 1], 2)


@pytest.mark.parametrize(("names", "pattern", "group"), [
    (["s01_a.mp4", "s02_b.mp4", "s01_c.mp4", "s03_d.mp4"], r"^(s\d+)_", "s01"),
    (["boxing_person01_d1.avi", "boxing_person02_d2.avi", "waving_person01_d1.avi"], r"(?<![A-Za-z0-9])(person\d+)(?![0-9])", "person01"),
    (["P2-take1.mp4", "P2-take2.mp4", "P10-take1.mp4"], r"^(P\d+)\-", "P2"),
])
def test_group_ids_in_file_names_get_a_pattern_that_works_as_group_pattern(names, pattern, group):
    suggestion = suggest_group_pattern(names)
    assert suggestion is not None and suggestion.pattern == pattern
    assert group_of(names[0], re.compile(suggestion.pattern)) == group
    assert suggestion.groups == len({group_of(n, re.compile(pattern)) for n in names})


@pytest.mark.parametrize("names", [
    ["gabor_boxing_d1.avi", "gabor_boxing_d2.avi", "gabor_waving_d1.avi"],  # no person word
    ["s01_a.mp4", "s02_b.mp4", "s03_c.mp4"],  # every id once: nothing to keep together
    ["clip_s01.mp4", "clip_s01b.mp4", "other.mp4", "more.mp4", "x.mp4"],  # too few names carry one
])
def test_no_group_suggestion_without_repeated_ids(names):
    assert suggest_group_pattern(names) is None


def test_cli_audit_writes_audit_json_and_suggests_a_group_pattern(tmp_path, leaky):
    import shutil

    from typer.testing import CliRunner

    import vtransfer.cli
    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    data = tmp_path / "data"
    shutil.copytree(leaky, data)
    for video in list(data.rglob("scene*.mp4")):  # two sessions: s01 (scenes 0-3), s02 (4-7)
        video.rename(video.with_name(f"s0{1 + int(video.stem[-1]) // 4}_{video.name}"))
    runner = CliRunner()
    result = runner.invoke(app, ["check", str(data), "--audit", "--out", str(tmp_path / "audit")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "near-duplicates across splits: 2" in flat and "mirrored" in flat
    assert "--group-pattern '^(s\\d+)_'" in flat
    assert "not audited: 1" not in flat  # check already reported broken.mp4 as unreadable and left it out
    saved = json.loads((tmp_path / "audit" / AUDIT_FILE).read_text())
    assert len(saved["duplicates"]["pairs"]) == 2 and saved["duplicates"]["threshold_difference"] == DUPLICATE_THRESHOLD
    assert saved["groups"]["suggestion"]["pattern"] == r"^(s\d+)_"

    result = runner.invoke(app, ["check", str(data), "--audit", "--json", "--group-pattern", r"^(s\d+)_"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["usable"] == 10 and payload["audit"]["groups"]["suggestion"] is None


def test_audit_options_are_refused_before_any_video_is_read(leaky, no_decoding, home):
    from typer.testing import CliRunner

    import vtransfer.cli
    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    import typer

    check = typer.main.get_command(app).commands["check"]
    assert next(p for p in check.params if p.name == "dup_threshold").default == DUPLICATE_THRESHOLD
    runner = CliRunner()
    for argv, message in (
        (["--backbone", "effnet3d"], "only with --audit"),
        (["--audit", "--backbone", "effnet3d"], "give --weights"),
        (["--audit", "--weights", "effnet3d:imagenet"], "need --backbone"),
        (["--audit", "--dup-threshold", "0"], "--dup-threshold 0"),
        (["--audit", "--backbone", "no-such-net", "--weights", "x"], "not a backbone name"),
    ):
        result = runner.invoke(app, ["check", str(leaky), *argv], env={"COLUMNS": "200"})
        assert result.exit_code == 2, (argv, result.output)
        assert message in " ".join(result.output.split()), (argv, result.output)
