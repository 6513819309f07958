"""compare-policies --shots: parsing, the per-seed draw of training videos, and a curve on real encoded videos."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import vtransfer.api as api
import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.data.splits import read_manifest
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows.shots import parse_shots, subsample_train

vtransfer.cli._register_commands()

FAST = dict(backbone="slowfusion", preset="tiny", size=48, epochs=2, batch_size=8, clips_per_video=2, val_clips=1,
            workers=0, patience=0, device="cpu", cache="memory")


@pytest.fixture(scope="module")
def target(demo_datasets):
    return demo_datasets("target", class_set="target", videos_per_class=6, frames=16, size=48, seed=1)


def test_parse_shots_sorts_and_rejects_what_is_not_a_count():
    assert parse_shots("10,1,all,2,2") == [1, 2, 10, None]
    assert parse_shots(["all"]) == [None]
    for bad in ("0", "1,two", "-3", ""):
        with pytest.raises(ConfigError, match="--shots"):
            parse_shots(bad)


def test_subsample_keeps_val_and_test_and_draws_per_seed(target):
    from vtransfer.data.scan import load_dataset

    index = load_dataset(target, ratios=(0.5, 0.25, 0.25))
    a, b, a_again = subsample_train(index, 2, 0), subsample_train(index, 2, 1), subsample_train(index, 2, 0)
    for sub in (a, b):
        assert sub.split("val") == index.split("val") and sub.split("test") == index.split("test")
        counts = {c: sum(r.label == c for r in sub.split("train")) for c in index.classes}
        assert set(counts.values()) == {2}
    assert a.split("train") == a_again.split("train")
    assert a.split("train") != b.split("train")  # each seed its own draw
    capped = subsample_train(index, 99, 0)
    assert capped.split("train") == index.split("train")


def test_videos_a_draw_leaves_out_are_counted_in_one_line_not_warned_about_one_by_one(target, tmp_path):
    from vtransfer.data.scan import load_dataset
    from vtransfer.data.splits import write_manifest
    from vtransfer.data.screening import screen_dataset

    index = load_dataset(target, ratios=(0.5, 0.25, 0.25))
    write_manifest(tmp_path / "split-seed-0.csv", subsample_train(index, 1, 0))
    drawn = load_dataset(target, manifest=tmp_path / "split-seed-0.csv")
    undrawn = len(index.split("train")) - len(index.classes)
    messages = []

    class Recorder:
        def message(self, text):
            messages.append(text)

    kept, skipped, unreadable = screen_dataset(drawn, 0.2, workers=1, reporter=Recorder())
    assert len(kept.split("train")) == len(index.classes) and unreadable == []
    left_out = [s for s in skipped if s["reason"] == "not listed in manifest split-seed-0.csv"]
    assert len(left_out) == undrawn  # still listed in the run's report, with the reason
    assert messages == [f"{undrawn} video(s) in {target} are not used: not listed in manifest split-seed-0.csv"]


def test_curve_shares_the_test_set_and_is_written(target, tmp_path):
    res = api.compare_policies(target, policies=["top-layer", "all"], seeds=[0, 1], shots="1,all",
                               out=tmp_path / "cmp", **FAST)
    out = tmp_path / "cmp"
    assert set(res.curve) == {"top-layer", "all"}
    for policy, points in res.curve.items():
        assert [p.shots for p in points] == [1, None]
        one, full = points
        assert len(one.accuracy) == 2 and one.train_videos == 6 and full.train_videos > one.train_videos
        row = next(r for r in res.rows if r.policy == policy)
        assert full.mean == pytest.approx(row.test_video_hit1)  # "all" is the table's own number
    base_test = {str(r.path) for r in read_manifest(out / "split.csv").split("test")}
    for seed in (0, 1):
        drawn = read_manifest(out / "shots-1" / f"split-seed-{seed}.csv")
        assert {str(r.path) for r in drawn.split("test")} == base_test
        run_split = read_manifest(out / "shots-1" / "top-layer" / f"seed-{seed}" / "split.csv")
        assert len(run_split.split("train")) == 6
    doc = json.loads((out / "shots.json").read_text())
    assert doc["chance"] == pytest.approx(1 / 6) and [p["shots"] for p in doc["curve"]["all"]] == ["1", "all"]
    assert (out / "shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shots.png" in (out / "compare.md").read_text()
    assert (out / "compare.html").read_text().count("data:image/png") == 2


def test_bad_shots_fail_before_any_video_is_read(tmp_path, no_decoding):
    missing_videos = tmp_path / "data"
    (missing_videos / "a").mkdir(parents=True)
    (missing_videos / "a" / "x.mp4").write_bytes(b"not a video")
    result = CliRunner().invoke(app, ["compare-policies", str(missing_videos), "--shots", "1,none",
                                      "--backbone", "slowfusion", "--preset", "tiny", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "--shots" in str(result.exception) + result.output and not (tmp_path / "o").exists()
