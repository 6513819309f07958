"""The CLI starts without torch, sets OpenMP defaults for a shared machine, and is never silent (issue 12)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys

import pytest
from rich.console import Console

from vtransfer.utils import runtime
from vtransfer.reporting.progress import PREPARING, RichReporter, status_line
from vtransfer.engine.trainer import EpochRecord

HEAVY = ("torch", "torchvision", "av", "sklearn", "matplotlib")
EPOCH_LINE = re.compile(r"^epoch (\d+)/2 train loss \d+\.\d{4} val acc [01]\.\d{3} time \d+\.\d+s( \*best)?$")


def test_importing_the_cli_with_every_command_loads_no_heavy_library():
    code = ("import json, sys, vtransfer.cli; vtransfer.cli._register_commands(); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_thread_environment_fills_only_what_the_user_left_unset():
    env = {"OMP_NUM_THREADS": "3"}
    assert runtime.apply_thread_environment(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runtime.apply_thread_environment(mine) == {}
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_the_cli_sets_the_wait_policy_before_torch_loads(user_value):
    """``prepare_process`` (what ``main`` does first) runs before torch: the OpenMP runtime sees the value."""
    code = ("from vtransfer.cli import prepare_process; prepare_process(); import os, torch; "
            "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads() >= 1)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [user_value or "PASSIVE", "True"]


def test_thread_settings_report_what_torch_uses():
    import torch

    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1
        s = runtime.thread_settings()
        assert s["intra_op_threads"] == 1 and s["cpus"] == runtime.cpu_count()
        assert runtime.configure_threads(None) == runtime.cpu_count() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_require_data_fails_with_the_scanners_message_and_accepts_files_and_folders(tmp_path):
    from vtransfer.cli.app import require_data
    from vtransfer.utils.errors import DatasetError

    with pytest.raises(DatasetError, match=f"^dataset folder {tmp_path}/missing does not exist$"):
        require_data(tmp_path / "missing")
    (tmp_path / "split.csv").write_text("path,class,split,group\n")
    for ok in (None, tmp_path, tmp_path / "split.csv"):
        require_data(ok)


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, train_loss=1.23456, train_acc=0.5, val_video_acc=0.25, val_clip_acc=0.2, lr=1e-3,
                       time_s=2.04)


def test_outside_a_terminal_each_epoch_is_one_plain_line_and_stages_are_lines():
    out = io.StringIO()
    console = Console(file=out, width=40)  # narrower than the line: it must still not wrap
    reporter = RichReporter(console, label="[top-3 s0] ")
    reporter.stage("checking 12 videos")
    reporter.stage("checking 12 videos")  # the same stage twice is printed once
    reporter.epoch_start(1, 2, batches=3)
    reporter.batch_end(1.0, 0.5)
    reporter.epoch_end(_record(1), improved=True)
    reporter.close()
    assert out.getvalue().splitlines() == [
        "[top-3 s0] checking 12 videos",
        "[top-3 s0] epoch 1/2 train loss 1.2346 val acc 0.250 time 2.0s *best",
    ]


def test_with_ema_the_epoch_line_shows_the_raw_weights_accuracy_beside_the_averaged_ones():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, width=40))
    reporter.epoch_start(1, 2, batches=3)
    reporter.epoch_end(dataclasses.replace(_record(1), raw_val_video_acc=0.5), improved=False)
    assert out.getvalue().splitlines() == ["epoch 1/2 train loss 1.2346 val acc 0.250 (raw 0.500) time 2.0s"]


def test_in_a_terminal_the_status_spinner_gives_way_to_the_first_bar():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    reporter = RichReporter(console)
    reporter.label = "[all s0] "  # compare-policies labels each run: its preparation shows
    line = status_line(console)
    assert line.active and line.text == f"[all s0] {PREPARING}"
    reporter.stage("decoding 12 videos")
    assert line.active and line.text == "[all s0] decoding 12 videos"
    reporter.epoch_start(1, 2, batches=1)
    assert not line.active
    reporter.epoch_end(_record(1), improved=False)
    reporter.close()
    text = out.getvalue()
    assert "[all s0] decoding 12 videos" in text and "epoch   1  loss 1.2346" in text
    assert text.endswith("\x1b[?25h") or "\x1b[?25h" in text.rsplit("\x1b[?25l", 1)[1]  # the cursor is shown again


def test_a_labelled_run_outside_a_terminal_prints_no_status():
    out = io.StringIO()
    reporter = RichReporter(Console(file=out))
    reporter.label = "[all s0] "
    assert out.getvalue() == "" and not status_line(reporter.console).active


@pytest.fixture(scope="module")
def tiny_data(demo_datasets):
    return demo_datasets("data", class_set="target", classes=["ring", "move_up"], videos_per_class=4, frames=12, size=32,
                         seed=2)


def test_finetune_with_captured_output_prints_one_line_per_epoch(tiny_data, tmp_path):
    from typer.testing import CliRunner

    import vtransfer.cli
    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    args = ["finetune", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "2", "--backbone", "slowfusion",
            "--preset", "tiny", "--size", "32", "--policy", "all", "--clips-per-video", "1",
            "--val-clips", "1", "--workers", "0", "--cache", "memory", "--threads", "1", "--device", "cpu",
            "--patience", "0", "--ratios", "0.5,0.25,0.25"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    epochs = [m.group(1) for m in map(EPOCH_LINE.match, result.output.splitlines()) if m]
    assert epochs == ["1", "2"], result.output
    assert "starting" not in result.output  # the terminal-only spinner never reaches a captured log


@pytest.mark.parametrize("command", ["finetune", "pretrain", "compare-policies"])
def test_a_mistyped_dataset_path_fails_before_torch_is_imported(command, tmp_path):
    """The error comes from the path check, with torch never loaded: a second, not the ten torch takes."""
    missing = tmp_path / "no-such-data"
    code = (
        "import sys\n"
        "from vtransfer.cli import main\n"
        f"sys.argv = ['vtransfer', {command!r}, {str(missing)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "exit 2 False", out.stdout + out.stderr
    err = " ".join(out.stderr.split())
    assert str(missing) in out.stderr.replace("\n", "")
    assert "does not exist" in err
