"""What a command shows while it works: a status line while it prepares, then a bar per epoch.

In a terminal, :class:`StatusLine` shows a transient spinner with what the
command is doing until the first progress bar replaces it, and
:class:`RichReporter` draws a bar per epoch with loss, accuracy and ETA, then
one summary line per epoch. When stdout is not a terminal (a log file, a
pipe, a CI job) there are no bars or spinners: one plain line per epoch and
per stage instead, so a log is never silent for a whole run.

This module imports rich only, so the CLI can use it before torch is loaded.
"""

from __future__ import annotations

import atexit
import weakref
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vtransfer.utils.errors import ConfigError

if TYPE_CHECKING:
    from rich.status import Status

    from vtransfer.engine.trainer import EpochRecord

PREPARING = "preparing: reading and checking the videos, decoding frames, caching features"


class StatusLine:
    """The one status line of a console: what a command is doing before its first progress bar.

    In a terminal it is a transient spinner (erased when cleared, so tables
    and ``--json`` output stay clean); elsewhere :meth:`show` prints the text
    as a plain line, once per distinct text, unless ``terminal_only``.
    """

    def __init__(self, console: Console):
        # A weak reference: the registry below maps consoles to their lines without keeping them alive.
        self._console = weakref.ref(console)
        self._status: Status | None = None
        self.text: str | None = None  # what is shown now (outside a terminal: the last line printed)

    @property
    def console(self) -> Console:
        """The console this line belongs to."""
        console = self._console()
        assert console is not None, "the console of a status line was garbage-collected"
        return console

    @property
    def active(self) -> bool:
        """Whether a spinner is on screen."""
        return self._status is not None

    def show(self, text: str, terminal_only: bool = False) -> None:
        """Show ``text`` (plain text, never read as markup) as the current status."""
        if not self.console.is_terminal:
            if not terminal_only and text != self.text:
                self.console.print(escape(text), highlight=False, soft_wrap=True)
                self.text = text
            return
        if self._status is None:
            self._status = self.console.status(escape(text))
            self._status.start()
            atexit.register(self.clear)  # a spinner left running would hide the cursor after exit
        else:
            self._status.update(escape(text))
        self.text = text

    def clear(self) -> None:
        """Erase the spinner (before a progress bar starts, when the command ends or fails)."""
        if self._status is not None:
            self._status.stop()
            self._status = None
            atexit.unregister(self.clear)
        self.text = None


_STATUS_LINES: weakref.WeakKeyDictionary[Console, StatusLine] = weakref.WeakKeyDictionary()


def status_line(console: Console) -> StatusLine:
    """The :class:`StatusLine` of ``console`` (one per console, shared by the CLI and its reporters)."""
    line = _STATUS_LINES.get(console)
    if line is None:
        line = _STATUS_LINES[console] = StatusLine(console)
    return line


class RichReporter:
    """Implements :class:`vtransfer.engine.trainer.Reporter` with Rich progress bars (plain lines outside a terminal).

    Setting :attr:`label` (``compare-policies`` does so before each run) shows
    that the labelled run is being prepared, until its first epoch starts.
    """

    def __init__(self, console: Console | None = None, label: str = ""):
        self.console = console or Console()
        self._label = label
        self._progress: Progress | None = None
        self._task = None
        self._loss = 0.0
        self._acc = 0.0
        self._n = 0
        self._epochs = 0

    @property
    def plain(self) -> bool:
        """True when stdout is not a terminal: no bars, one plain line per epoch."""
        return not self.console.is_terminal

    @property
    def label(self) -> str:
        """Prefix of every line (``[top-3 s0] ``), empty by default."""
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = value
        status_line(self.console).show(f"{value}{PREPARING}", terminal_only=True)

    def stage(self, text: str) -> None:
        """Say what the run is doing before its first epoch (scanning, screening, decoding, caching features)."""
        status_line(self.console).show(f"{self._label}{text}")

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Open a progress bar for this epoch (in a terminal)."""
        status_line(self.console).clear()
        self._loss, self._acc, self._n = 0.0, 0.0, 0
        self._epochs = epochs
        if self.plain:
            return
        self._progress = Progress(
            TextColumn(f"{escape(self._label)}epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.2f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=batches, loss=0.0, acc=0.0)

    def batch_end(self, loss: float, acc: float) -> None:
        """Advance the bar with running means of loss and accuracy."""
        self._n += 1
        self._loss += (loss - self._loss) / self._n
        self._acc += (acc - self._acc) / self._n
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=self._loss, acc=self._acc)

    def epoch_end(self, record: EpochRecord, improved: bool) -> None:
        """Close the bar and print the one-line epoch summary (a shorter plain line outside a terminal)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        raw = f" (raw {record.raw_val_video_acc:.3f})" if record.raw_val_video_acc is not None else ""
        if self.plain:
            best = " *best" if improved else ""
            bad = f" {record.bad_clips} bad clips" if record.bad_clips else ""
            self.console.print(
                escape(f"{self._label}epoch {record.epoch}/{self._epochs or record.epoch} "
                       f"train loss {record.train_loss:.4f} val acc {record.val_video_acc:.3f}{raw} "
                       f"time {record.time_s:.1f}s{bad}{best}"),
                highlight=False, soft_wrap=True,
            )
            return
        star = " [green]*best[/]" if improved else ""
        bad = f" [yellow]{record.bad_clips} bad clips[/]" if record.bad_clips else ""
        self.console.print(
            f"{escape(self._label)}epoch {record.epoch:3d}  loss {record.train_loss:.4f}  train acc {record.train_acc:.3f}  "
            f"val video acc {record.val_video_acc:.3f}{raw}  clip acc {record.val_clip_acc:.3f}  "
            f"lr {record.lr:.2e}  {record.time_s:.1f}s{bad}{star}",
            highlight=False,
        )

    def message(self, text: str) -> None:
        """Print a note; one starting with ``warning:`` is shown in yellow (file names are never read as markup)."""
        style = "yellow" if text.startswith("warning") else None
        self.console.print(escape(f"{self._label}{text}"), style=style, highlight=False, soft_wrap=self.plain)

    def close(self) -> None:
        """Stop a live progress bar and the status line (after an error or Ctrl-C mid-epoch), so the terminal is left clean."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        status_line(self.console).clear()


class TensorBoardReporter:
    """Forwards to another reporter and logs each epoch's numbers to TensorBoard (``--tensorboard``).

    Needs the ``tensorboard`` package (``pip install tensorboard``); without it
    the constructor raises a :class:`~vtransfer.utils.errors.ConfigError` saying so.
    """

    def __init__(self, inner, log_dir) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        self.inner = inner
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Forward."""
        self.inner.epoch_start(epoch, epochs, batches)

    def batch_end(self, loss: float, acc: float) -> None:
        """Forward."""
        self.inner.batch_end(loss, acc)

    def epoch_end(self, record: EpochRecord, improved: bool) -> None:
        """Log loss, accuracies, learning rate and epoch time, then forward."""
        for key in ("train_loss", "train_acc", "val_video_acc", "val_clip_acc", "lr", "time_s", "raw_val_video_acc"):
            if getattr(record, key) is not None:
                self.writer.add_scalar(key, getattr(record, key), record.epoch)
        self.writer.flush()
        self.inner.epoch_end(record, improved)

    def message(self, text: str) -> None:
        """Forward."""
        self.inner.message(text)

    def stage(self, text: str) -> None:
        """Forward (to an inner reporter that shows stages)."""
        stage = getattr(self.inner, "stage", None)
        if stage is not None:
            stage(text)

    def close(self) -> None:
        """Flush the event file and close the inner reporter's display."""
        self.writer.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
