"""Run folders: creation rules, config and metrics files, resumable state.

A run folder holds everything one command produced::

    RUN/config.json        resolved options (what was asked + what was chosen)
    RUN/split.csv          the split manifest every later command can reuse
    RUN/metrics.jsonl      one JSON line per finished epoch
    RUN/model.safetensors  best checkpoint (vtransfer format)
    RUN/resume.pt          last finished epoch's full state (tensors only, loaded with weights_only)
    RUN/bad_videos.json    videos that failed to decode: path, reason, epoch (0: before training), count
    RUN/report/...         test-set report

All files are written atomically (temp file + rename), so a run killed at any
moment never leaves a half-written model or state file; at worst a hidden
``.NAME.XXXX.tmp`` file is left behind, which ``--resume`` removes.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_text
from vtransfer.utils.errors import ConfigError, VtransferError, WeightsError

RESUME_FILE = "resume.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
SPLIT_FILE = "split.csv"
BAD_VIDEOS_FILE = "bad_videos.json"
TIMES_FILE = "times.json"  # the run's wall time by phase (vtransfer.utils.phase_times)


class RunInterrupted(VtransferError):
    """Training was stopped by Ctrl-C; the run folder holds the last finished epoch and can be resumed.

    ``exit_code`` (130, the shell's code for SIGINT) is what the CLI exits with.
    """

    exit_code = 130

    def __init__(self, run_dir: Path, epochs_done: int, epochs: int, command: str = "finetune"):
        self.run_dir = Path(run_dir)
        self.epochs_done = epochs_done
        self.epochs = epochs
        how = (f"vtransfer finetune --resume {self.run_dir}" if command == "finetune"
               else f"the same vtransfer {command} command and --out {self.run_dir} "
                    "(finished runs are reused, the stopped one continues)")
        super().__init__(f"interrupted; resume with {how} ({epochs_done} of {epochs} epochs finished and saved)")


def prepare_run_dir(path: Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or reopen, with ``resume``) a run folder; refuse to clobber one without ``overwrite``.

    Resuming needs the run's ``config.json`` (``resume.pt`` is absent when the
    run stopped before its first epoch finished: it then starts from epoch 1)
    and removes temp files a killed run left behind.
    """
    path = Path(path)
    if resume:
        if not (path / CONFIG_FILE).exists():
            raise ConfigError(f"--resume {path}: no {CONFIG_FILE} there, nothing to resume")
        remove_stale_temp_files(path)
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {path} already exists and is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def discard_failed_run(run_dir: Path, existed: bool) -> bool:
    """After a run failed before finishing an epoch, remove what it wrote so the corrected command can run.

    A run with a finished epoch (``resume.pt``) is kept: it can be resumed.
    Otherwise the folder's contents go, and the folder itself too when this
    run created it (``existed`` False). Returns True when something was removed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or has_resume_state(run_dir):
        return False
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    for child in run_dir.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    return True


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the hidden ``.NAME.XXXX.tmp`` files an atomic write leaves when its process is killed.

    Only call this when no other process writes into ``run_dir``. Returns the files removed.
    """
    removed = []
    for tmp in Path(run_dir).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def has_resume_state(run_dir: Path) -> bool:
    """True when ``run_dir`` (or, for a two-stream run, one of its streams' folders) holds a finished epoch's state."""
    return any((Path(run_dir) / sub / RESUME_FILE).exists() for sub in ("", "rgb", "flow"))


def write_bad_videos(run_dir: Path, entries: list[dict]) -> None:
    """Rewrite ``bad_videos.json`` (atomic): one ``{path, reason, epoch, count}`` per video and epoch."""
    write_json(Path(run_dir) / BAD_VIDEOS_FILE, entries)


def read_bad_videos(run_dir: Path) -> list[dict]:
    """Entries of ``bad_videos.json`` (empty when the run met no bad video)."""
    path = Path(run_dir) / BAD_VIDEOS_FILE
    return read_json(path) if path.exists() else []


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or broken file is a ConfigError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` with one line per finished epoch (atomic)."""
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in history))


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-epoch records from ``metrics.jsonl`` (empty when absent)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_resume_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Save the resumable training state atomically (tensors and plain containers only)."""

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(run_dir) / RESUME_FILE, buf.getvalue())


def load_resume_state(run_dir: Path) -> dict[str, Any]:
    """Load ``resume.pt`` with ``weights_only=True``: never runs code from the file."""
    path = Path(run_dir) / RESUME_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found; nothing to resume") from e
    except Exception as e:  # noqa: BLE001 - anything unloadable is reported the same way
        raise WeightsError(f"{path}: cannot load resume state safely ({e})") from e


def default_run_dir(prefix: str) -> Path:
    """``runs/<prefix>-<time>``: a new run's folder when ``--out`` is not given (``hf:ORG/REPO`` names one folder, not a tree)."""

    prefix = re.sub(r"[^A-Za-z0-9_.+-]+", "_", prefix)
    return Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
