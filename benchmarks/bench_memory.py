"""Memory stays bounded with the disk frame cache: RSS per epoch during a real finetune run.

Decoded frames go to memory-mapped files under the run folder; the page cache
holds what fits and the process does not grow with the dataset. The script
prints the decoded dataset size on disk, the main process's RSS after every
epoch, the peak RSS of the DataLoader workers, and the growth from the first
epoch to the last (target: about zero, whatever the dataset size).

    python benchmarks/bench_memory.py            # 120 videos of 150 frames at 120x160, 4 epochs
    python benchmarks/bench_memory.py --quick    # seconds, for the test suite
"""

from __future__ import annotations

import resource
import tempfile
from pathlib import Path

from _common import base_parser, load_line, rss_line, setup_threads

from vtransfer import api
from vtransfer.data.demo import make_demo
from vtransfer.train import EpochRecord


def current_rss_mib() -> float:
    """Resident memory of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssRecorder:
    """A training reporter that records RSS after every epoch."""

    def __init__(self) -> None:
        self.rss: list[float] = []

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Nothing to do."""

    def batch_end(self, loss: float, acc: float) -> None:
        """Nothing to do."""

    def epoch_end(self, record: EpochRecord, improved: bool) -> None:
        """Record RSS and print one line."""
        self.rss.append(current_rss_mib())
        print(f"epoch {record.epoch}: {record.time_s:.1f}s, main-process RSS {self.rss[-1]:.0f} MiB", flush=True)

    def message(self, text: str) -> None:
        """Pass notes through."""
        print(text)


def main() -> None:
    """Make a dataset, train with --cache disk, print RSS per epoch and its growth."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--videos-per-class", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    print(load_line())
    vpc = args.videos_per_class or (3 if args.quick else 20)
    frames, size = (32, (60, 80)) if args.quick else (150, (120, 160))
    epochs = args.epochs or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_demo(tmp / "data", class_set="target", videos_per_class=vpc, frames=frames, size=size, seed=0)
        src_bytes = sum(f.stat().st_size for f in (tmp / "data").rglob("*.mp4"))
        rec = RssRecorder()
        api.finetune(tmp / "data", backbone="i3d", preset="tiny", policy="all", epochs=epochs, frames=16, size=56,
                     batch_size=8, clips_per_video=2, val_clips=1, patience=0, cache="disk",
                     cache_dir=tmp / "cache", workers=2, threads=threads, out=tmp / "run", reporter=rec)
        cache_bytes = sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file())
        print(f"videos: {vpc * 6} x {frames} frames at {size[0]}x{size[1]}; H.264 {src_bytes / 2**20:.1f} MiB, "
              f"decoded disk cache {cache_bytes / 2**20:.1f} MiB")
        # epoch 1 allocates gradients, optimiser state and allocator pools once; growth is measured after it
        first = 1 if len(rec.rss) > 2 else 0
        growth = rec.rss[-1] - rec.rss[first]
        print(f"main-process RSS growth from epoch {first + 1} to epoch {len(rec.rss)}: {growth:+.1f} MiB "
              f"({growth / max(1e-9, cache_bytes / 2**20) * 100:+.2f}% of the decoded cache)")
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS of any DataLoader worker: {children:.0f} MiB")
    print(rss_line())


if __name__ == "__main__":
    main()
