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
