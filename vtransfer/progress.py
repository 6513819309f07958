"""Rich progress for training: a bar per epoch with loss, accuracy and ETA, one summary line per epoch."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vtransfer.train import EpochRecord


class RichReporter:
    """Implements :class:`vtransfer.train.Reporter` with Rich progress bars."""

    def __init__(self, console: Console | None = None, label: str = ""):
        self.console = console or Console()
        self.label = label
        self._progress: Progress | None = None
        self._task = None
        self._loss = 0.0
        self._acc = 0.0
        self._n = 0

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Open a progress bar for this epoch."""
        self._loss, self._acc, self._n = 0.0, 0.0, 0
        self._progress = Progress(
            TextColumn(f"{escape(self.label)}epoch {epoch}/{epochs}"),
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
        """Close the bar and print the one-line epoch summary."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        star = " [green]*best[/]" if improved else ""
        bad = f" [yellow]{record.bad_clips} bad clips[/]" if record.bad_clips else ""
        self.console.print(
            f"{escape(self.label)}epoch {record.epoch:3d}  loss {record.train_loss:.4f}  train acc {record.train_acc:.3f}  "
            f"val video acc {record.val_video_acc:.3f}  clip acc {record.val_clip_acc:.3f}  "
            f"lr {record.lr:.2e}  {record.time_s:.1f}s{bad}{star}",
            highlight=False,
        )

    def message(self, text: str) -> None:
        """Print a note; one starting with ``warning:`` is shown in yellow (file names are never read as markup)."""
        style = "yellow" if text.startswith("warning") else None
        self.console.print(escape(f"{self.label}{text}"), style=style, highlight=False)

    def close(self) -> None:
        """Stop a live progress bar (after an error or Ctrl-C mid-epoch), so the terminal is left clean."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TensorBoardReporter:
    """Forwards to another reporter and logs each epoch's numbers to TensorBoard (``--tensorboard``).

    Needs the ``tensorboard`` package (``pip install tensorboard``); without it
    the constructor raises a :class:`~vtransfer.errors.ConfigError` saying so.
    """

    def __init__(self, inner, log_dir) -> None:
        from vtransfer.errors import ConfigError

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
        for key in ("train_loss", "train_acc", "val_video_acc", "val_clip_acc", "lr", "time_s"):
            self.writer.add_scalar(key, getattr(record, key), record.epoch)
        self.writer.flush()
        self.inner.epoch_end(record, improved)

    def message(self, text: str) -> None:
        """Forward."""
        self.inner.message(text)

    def close(self) -> None:
        """Flush the event file and close the inner reporter's display."""
        self.writer.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
