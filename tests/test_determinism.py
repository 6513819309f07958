"""Determinism (issue 7): ``--deterministic`` CPU runs are bit-reproducible, and a run can be replayed.

Two CLI runs of the same command (separate processes, two DataLoader worker
processes each, clips decoded in the workers) must write the same
``metrics.jsonl`` (wall times aside) and bit-identical model tensors. The run
folder records what a replay needs: the options and seeds in ``config.json``
and the split in ``split.csv``; replaying from those gives the same model.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vtransfer.api as api
from vtransfer.workflows import runs
from vtransfer.data.splits import read_manifest

COMMAND = ["--backbone", "slowfusion", "--preset", "tiny", "--size", "48", "--policy", "all", "--epochs", "2",
           "--batch-size", "8", "--clips-per-video", "2", "--val-clips", "1", "--workers", "2", "--cache", "none",
           "--patience", "0", "--device", "cpu", "--threads", "1", "--seed", "7", "--split-seed", "3",
           "--deterministic"]


def strip_time(history: list[dict]) -> list[dict]:
    """Per-epoch records without the wall time."""
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, demo_dataset):
    """The same finetune command run twice, as two processes started together."""
    tmp = tmp_path_factory.mktemp("det")
    data = demo_dataset  # conftest's shared dataset: target set, 4 videos per class, 16 frames at 48x48, seed 3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = []
    for name in ("a", "b"):
        args = [sys.executable, "-m", "vtransfer", "finetune", str(data), "--out", str(tmp / name), *COMMAND]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.err", "w"), env=env))
    for name, proc in zip("ab", procs):
        assert proc.wait(timeout=300) == 0, (tmp / f"{name}.err").read_text()[-2000:]
    return data, tmp / "a", tmp / "b"


def assert_same_model(a: Path, b: Path) -> None:
    """Bit-identical tensors (the file's metadata holds a creation time, so bytes may differ there)."""
    ta, tb = load_file(a / runs.MODEL_FILE), load_file(b / runs.MODEL_FILE)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, different


def test_deterministic_cli_runs_are_bit_identical(two_runs):
    _, a, b = two_runs
    ma, mb = runs.read_metrics(a), runs.read_metrics(b)
    assert [h["epoch"] for h in ma] == [1, 2]
    assert strip_time(ma) == strip_time(mb)
    assert_same_model(a, b)
    ra, rb = (json.loads((r / "report" / "report.json").read_text()) for r in (a, b))
    assert ra["predictions"] == rb["predictions"] and ra["confusion"] == rb["confusion"]
    assert (a / runs.SPLIT_FILE).read_bytes() == (b / runs.SPLIT_FILE).read_bytes()


def test_run_folder_records_what_a_replay_needs(two_runs):
    data, a, _ = two_runs
    options = json.loads((a / runs.CONFIG_FILE).read_text())["options"]
    assert (options["seed"], options["split_seed"], options["deterministic"]) == (7, 3, True)
    assert options["data"] == str(data) and options["workers"] == 2
    split = read_manifest(a / runs.SPLIT_FILE)
    assert len(split.records) == 24 and {r.split for r in split.records} == {"train", "val", "test"}


def test_replay_from_config_and_split_gives_the_same_model(two_runs, tmp_path):
    data, a, _ = two_runs
    options = json.loads((a / runs.CONFIG_FILE).read_text())["options"]
    accepted = inspect.signature(api.finetune).parameters
    replay = {k: v for k, v in options.items() if k in accepted and k not in ("data", "out", "manifest")}
    replay["ratios"] = tuple(replay["ratios"])
    # the split comes from the manifest: a different split seed must not matter any more
    replay["split_seed"] = 99
    res = api.finetune(data, manifest=a / runs.SPLIT_FILE, out=tmp_path / "replay", **replay)
    assert strip_time(res.history) == strip_time(runs.read_metrics(a))
    assert_same_model(a, res.run_dir)
    assert [(str(r.path), r.split) for r in read_manifest(res.run_dir / runs.SPLIT_FILE).records] == \
        [(str(r.path), r.split) for r in read_manifest(a / runs.SPLIT_FILE).records]
