"""Where a run's time goes: exclusive phase times, nesting, threads, and the times a run writes."""

import json
import threading
import time

import pytest

from vtransfer import api
from vtransfer.utils.phase_times import phase, recording


def test_a_nested_phase_counts_only_for_itself_and_the_rest_is_other():
    with recording() as times:
        with phase("prefix") as done:
            time.sleep(0.05)
            with phase("decode"):
                time.sleep(0.10)
            time.sleep(0.05)
            done(8)
        time.sleep(0.05)
    d = times.to_dict()
    assert d["phases_s"]["decode"] == pytest.approx(0.10, abs=0.03)
    assert d["phases_s"]["prefix"] == pytest.approx(0.10, abs=0.03)  # not 0.20: the decoding inside is not its own
    assert d["other_s"] == pytest.approx(0.05, abs=0.03)
    assert sum(d["phases_s"].values()) + d["other_s"] == pytest.approx(d["wall_s"], abs=1e-3)
    assert d["units"] == {"prefix": 8}
    assert list(d["phases_s"]) == ["decode", "prefix"]  # in the order a run meets them
    line = times.summary()
    assert line.startswith("time 0.") and "decoding 0.1 s (" in line and "frozen prefix 0.1 s (" in line and "other" in line
    assert "; 8 clips, " in line and "/s)" in line  # the prefix's units and rate


def test_phases_outside_a_recording_or_on_other_threads_are_not_counted():
    with phase("decode"):  # no recording open: nothing happens
        pass
    with recording() as times:
        worker = threading.Thread(target=lambda: phase("flow").__enter__())
        worker.start()
        worker.join()
        with recording() as inner:  # recordings nest: a phase counts in both
            with phase("training"):
                time.sleep(0.02)
    assert "flow" not in times.seconds
    assert times.seconds["training"] == pytest.approx(inner.seconds["training"])


@pytest.mark.slow
def test_a_run_says_where_its_time_went(demo_dataset, tmp_path):
    res = api.finetune(demo_dataset, backbone="effnet3d", preset="tiny", frames=4, stride=2, size=48, epochs=1,
                       clips_per_video=2, val_clips=1, policy="top-layer", report_videos=0, out=tmp_path / "run")
    times = json.loads((tmp_path / "run" / "times.json").read_text())
    phases = times["phases_s"]
    assert {"setup", "screening", "decode", "prefix", "training", "scoring"} <= set(phases)
    assert sum(phases.values()) <= times["wall_s"] + 1e-6 and all(s >= 0 for s in phases.values())
    assert times["units"]["prefix"] > 0  # clips through the frozen prefix
    # each training video gives one clip an epoch here (2 cached views, one drawn per epoch)
    train = sum(1 for line in (tmp_path / "run" / "split.csv").read_text().splitlines() if ",train," in line)
    assert times["units"]["training"] == train
    report = json.loads((res.run_dir / "report" / "report.json").read_text())
    assert report["extra"]["time"].startswith("time ") and "frozen prefix" in report["extra"]["time"]
