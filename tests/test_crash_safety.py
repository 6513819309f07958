"""Crash safety (issue 7): a run killed at any moment can be resumed and never leaves a half-written model.

The CLI runs as a real subprocess (``python -m vtransfer finetune``) that is
killed with SIGKILL, or interrupted with SIGINT (Ctrl-C), after its first
epoch has finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vtransfer.api as api
from vtransfer.workflows import runs
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.checkpoints import load_checkpoint

TINY = dict(backbone="slowfusion", preset="tiny", size=48, policy="all", batch_size=8, clips_per_video=2, val_clips=1,
            workers=0, patience=0, device="cpu", cache="memory", threads=1)
# What a run folder may hold; anything else (a temp file above all) would confuse a reader.
RUN_FILES = {runs.CONFIG_FILE, runs.SPLIT_FILE, runs.METRICS_FILE, runs.MODEL_FILE, runs.RESUME_FILE,
             runs.BAD_VIDEOS_FILE, runs.TIMES_FILE, "report", "audit.json"}


@pytest.fixture(scope="module")
def demo(demo_dataset):
    """Six classes, four tiny videos each (conftest's shared dataset: read only)."""
    return demo_dataset


def cli_args(data: Path, out: Path, epochs: int, **overrides) -> list[str]:
    """``python -m vtransfer finetune`` with the TINY options (and ``overrides``)."""
    args = [sys.executable, "-m", "vtransfer", "finetune", str(data), "--out", str(out), "--epochs", str(epochs)]
    for key, value in {**TINY, **overrides}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def start(args: list[str], logs: Path) -> subprocess.Popen:
    """Start the CLI in its own process group, stdout/stderr going to files (a full pipe must never block it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=open(logs / "stdout.txt", "w"), stderr=open(logs / "stderr.txt", "w"), env=env,
                            start_new_session=True)


def wait_for_epochs(proc: subprocess.Popen, run: Path, epochs: int, logs: Path, timeout: float = 240.0) -> None:
    """Poll ``metrics.jsonl`` until ``epochs`` epochs have finished (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(runs.read_metrics(run)) >= epochs:
            return
        if proc.poll() is not None:
            pytest.fail(f"finetune exited early ({proc.returncode}): {(logs / 'stderr.txt').read_text()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("finetune did not finish an epoch in time")


def assert_consistent(run: Path) -> int:
    """The run folder after a crash: no stray files, a complete model, a loadable resume state. Returns its epoch."""
    names = {p.name for p in run.iterdir()}
    assert names - RUN_FILES <= {n for n in names if n.startswith(".") and n.endswith(".tmp")}, names
    model = load_checkpoint(run / runs.MODEL_FILE)  # complete: every tensor present with its shape
    assert model.classes == sorted(model.classes) and len(model.classes) == 6
    state = runs.load_resume_state(run)
    done = len(runs.read_metrics(run))
    # metrics.jsonl is written right after resume.pt; a kill between the two leaves it one epoch behind
    assert state["epoch"] in (done, done + 1)
    return int(state["epoch"])


def strip_time(history: list[dict]) -> list[dict]:
    """Per-epoch records without the wall time (the only thing allowed to differ)."""
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def test_sigkill_mid_run_then_resume_finishes_all_epochs(demo, tmp_path):
    run = tmp_path / "run"
    proc = start(cli_args(demo, run, epochs=6), tmp_path)
    wait_for_epochs(proc, run, 1, tmp_path)
    time.sleep(0.15)  # somewhere inside epoch 2 (an epoch takes ~0.3-1 s here)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    done = assert_consistent(run)
    assert 1 <= done < 6
    (run / f".{runs.MODEL_FILE}.k1ll3d.tmp").write_bytes(b"half a model")  # what a kill inside a write leaves

    resumed = api.finetune(demo, resume=run)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h["epoch"] for h in runs.read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert {p.name for p in run.iterdir()} == RUN_FILES - {runs.BAD_VIDEOS_FILE}  # temp files removed
    assert (run / "report" / "report.json").exists() and resumed.test.num_videos == 6
    # the killed-and-resumed run trained exactly what an uninterrupted run trains
    full = api.finetune(demo, out=tmp_path / "full", epochs=6, **TINY)
    assert strip_time(resumed.history) == strip_time(full.history)
    a, b = load_checkpoint(run / runs.MODEL_FILE), load_checkpoint(tmp_path / "full" / runs.MODEL_FILE)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in b.state_dict)


def test_ctrl_c_stops_cleanly_with_exit_130_and_a_resume_hint(demo, tmp_path):
    run = tmp_path / "run"
    proc = start(cli_args(demo, run, epochs=40, workers=2, cache="none"), tmp_path)  # decoding in worker processes
    wait_for_epochs(proc, run, 1, tmp_path)
    time.sleep(0.15)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the main process and its workers
    code = proc.wait(timeout=60)
    stderr = " ".join((tmp_path / "stderr.txt").read_text().split())
    assert f"interrupted; resume with vtransfer finetune --resume {run}" in stderr, stderr
    assert "Traceback" not in stderr
    assert code == 130
    done = assert_consistent(run)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert done == len(runs.read_metrics(run)) < 40  # nothing half-way: resume.pt is the last finished epoch


def test_interrupt_before_the_first_epoch_finishes_is_resumable(demo, tmp_path):
    class CtrlCAtFirstBatch:
        """Raises KeyboardInterrupt in the middle of epoch 1 (as Ctrl-C would)."""

        def epoch_start(self, epoch, epochs, batches):  # noqa: D102
            pass

        def batch_end(self, loss, acc):  # noqa: D102
            raise KeyboardInterrupt

        def epoch_end(self, record, improved):  # noqa: D102
            pass

        def message(self, text):  # noqa: D102
            pass

    run = tmp_path / "run"
    with pytest.raises(runs.RunInterrupted) as info:
        api.finetune(demo, out=run, epochs=2, reporter=CtrlCAtFirstBatch(), **TINY)
    assert str(info.value).startswith(f"interrupted; resume with vtransfer finetune --resume {run} (0 of 2 epochs")
    assert info.value.exit_code == 130
    assert not (run / runs.RESUME_FILE).exists() and not (run / runs.MODEL_FILE).exists()
    resumed = api.finetune(demo, resume=run)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def cli():
    import vtransfer.cli
    from typer.testing import CliRunner

    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    return CliRunner(), app


def test_cli_never_overwrites_a_run_folder_without_overwrite(demo, tmp_path):
    runner, app = cli()
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("my notes")
    args = [a for a in cli_args(demo, run, epochs=1)[3:]]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output
    assert f"run folder {run} already exists and is not empty; pass --overwrite" in str(result.exception)
    assert [p.name for p in run.iterdir()] == ["notes.txt"] and (run / "notes.txt").read_text() == "my notes"

    result = runner.invoke(app, ["finetune", str(demo), "--resume", str(tmp_path / "nothing")])
    assert isinstance(result.exception, ConfigError) and "nothing to resume" in str(result.exception)

    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (run / "notes.txt").exists() and json.loads((run / runs.CONFIG_FILE).read_text())["options"]["epochs"] == 1


def test_the_resume_hint_runs_exactly_as_printed(demo, tmp_path):
    """`vtransfer finetune --resume RUN`, copied from the interruption message, finishes the run (no DATA needed)."""
    run = tmp_path / "run"
    with pytest.raises(runs.RunInterrupted) as info:
        api.finetune(demo, out=run, epochs=2, stop_after_epochs=None, reporter=_InterruptAfterFirstEpoch(), **TINY)
    hint = str(info.value).split("resume with ", 1)[1].split(" (", 1)[0]
    assert hint == f"vtransfer finetune --resume {run}"
    runner, app = cli()
    result = runner.invoke(app, hint.split()[1:])
    assert result.exit_code == 0, result.output
    assert [h["epoch"] for h in runs.read_metrics(run)] == [1, 2]
    assert (run / "report" / "report.json").exists()

    missing = runner.invoke(app, ["finetune"])
    assert missing.exit_code == 2 and "DATA" in missing.output


class _InterruptAfterFirstEpoch:
    """Raises KeyboardInterrupt in the first batch of epoch 2 (as Ctrl-C would)."""

    def epoch_start(self, epoch, epochs, batches):  # noqa: D102
        self.epoch = epoch

    def batch_end(self, loss, acc):  # noqa: D102
        if self.epoch == 2:
            raise KeyboardInterrupt

    def epoch_end(self, record, improved):  # noqa: D102
        pass

    def message(self, text):  # noqa: D102
        pass


def test_a_run_that_fails_before_its_first_epoch_leaves_nothing_in_the_way(demo, tmp_path, home):
    """Offline weights, a bad policy: the same command, corrected, runs without --overwrite."""
    run = tmp_path / "run"
    with pytest.raises(WeightsError):
        api.finetune(demo, out=run, epochs=1, **{**TINY, "backbone": "i3d", "weights": "i3d:imagenet"})
    assert not run.exists()
    with pytest.raises(ConfigError, match="unknown policy"):
        api.finetune(demo, out=run, epochs=1, **{**TINY, "policy": "top3"})
    assert not run.exists()
    res = api.finetune(demo, out=run, epochs=1, **TINY)
    assert res.report and (run / "model.safetensors").exists()

    mine = tmp_path / "mine"
    mine.mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(ConfigError):
        api.finetune(demo, out=mine, epochs=1, **{**TINY, "policy": "top3"})
    assert mine.is_dir() and not any(mine.iterdir())


def test_a_diverging_run_stops_naming_the_learning_rate(demo, tmp_path):
    from vtransfer.engine.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"diverged in epoch \d.*--lr 1e\+06 \(sgd\).*--lr 100000"):
        api.finetune(demo, out=tmp_path / "run", epochs=3, lr=1e6, optimizer="sgd", **TINY)
    assert not (tmp_path / "run").exists()  # it failed before a finished epoch: nothing left behind
