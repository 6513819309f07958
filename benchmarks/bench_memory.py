"""Memory stays bounded with the disk frame cache: RSS per epoch during a real finetune run.

Decoded frames go to memory-mapped files under the run folder; the page cache
holds what fits and the process does not grow with the dataset. The script
prints the decoded dataset size on disk, the main process's RSS after every
epoch, the peak RSS of the DataLoader workers, and the growth from the first
epoch to the last (target: about zero, whatever the dataset size).

    python benchmarks/bench_memory.py            # 120 videos of 150 frames at 120x160, 4 epochs
    python benchmarks/bench_memory.py --quick    # seconds, for the test suite

With ``--grad-checkpointing`` it measures something else: the peak memory of
one training step (forward + backward, every group trainable) of ViViT and
I3D, with and without gradient checkpointing (:mod:`vtransfer.engine.grad_checkpoint`).
Each variant runs in a fresh process; the figure is the rise of the peak RSS
(``VmHWM``, reset just before the step) over the RSS before it, or
``torch.cuda.max_memory_allocated`` with ``--device cuda``.

    python benchmarks/bench_memory.py --grad-checkpointing            # batch 8 at the tiny presets' sizes
    python benchmarks/bench_memory.py --grad-checkpointing --quick    # batch 4, smaller clips
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import base_parser, load_line, median_time, rss_line, setup_threads

from vtransfer.engine.trainer import EpochRecord


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


# backbone -> (frames, size) of the step measured: (full run, --quick)
STEP_GEOMETRY = {"vivit": ((16, 128), (8, 96)), "i3d": ((16, 112), (16, 56))}
# Large blocks come from mmap and go back to the OS when freed, so the RSS rise of a step is what it allocates
# (glibc's default threshold grows with freed blocks and would keep a first step's memory for the second).
STEP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; ``False`` where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step(backbone: str, checkpointing: bool, batch: int, frames: int, size: int, device: str) -> dict:
    """Peak memory (MiB) of one forward + backward of ``backbone`` tiny, in this process, and its median time (s).

    A first, unmeasured step pays the one-time costs (lazy imports of the checkpoint machinery, kernel setup).
    """
    import torch

    from vtransfer.models.registry import build_backbone
    from vtransfer.policies.freezing import apply_policy, resolve_policy
    from vtransfer.engine.trainer import TrainablePart

    torch.manual_seed(0)
    model = build_backbone(backbone, "tiny", num_classes=10, frames=frames,
                           **({"image_size": [size, size]} if backbone == "vivit" else {"crop_size": size}))
    model.to(device).train()
    apply_policy(model, resolve_policy(model, "all"))
    part = TrainablePart(model, 0, grad_checkpointing=checkpointing)
    x = torch.randn(batch, 3, frames, size, size, device=device)
    labels = torch.arange(batch, device=device) % 10
    dev = torch.device(device)

    def step() -> None:
        torch.nn.functional.cross_entropy(part(x), labels).backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training

    step()
    return {"peak_mib": step_peak_rise_mib(step, dev), "time_s": median_time(step, warmup=0, repeat=3)}


def step_peak_rise_mib(step, dev) -> float:
    """How far peak memory rises during one more call of the (warmed-up) ``step``, in MiB.

    CUDA: ``max_memory_allocated`` over what is allocated before; CPU: peak RSS
    (VmHWM, reset first where the kernel allows) over the RSS before.
    """
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = current_rss_mib()
        if not _reset_peak_rss():
            base = _peak_rss_mib()  # the rise over the process's earlier peak: a lower bound
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20 - base
    return _peak_rss_mib() - base


def grad_checkpointing_table(quick: bool, threads: int, device: str, backbones: list[str]) -> None:
    """Print the step's peak memory and time with and without checkpointing, each variant in a fresh process."""
    batch = 4 if quick else 8
    print(f"one training step (forward + backward, policy all), batch {batch}, device {device}; "
          f"memory = peak {'allocated' if device.startswith('cuda') else 'RSS'} rise during the step")
    print(f"{'backbone':<10}{'clip':>14}{'plain MiB':>11}{'checkpointed MiB':>18}{'ratio':>7}{'time ratio':>12}")
    for backbone in backbones:
        frames, size = STEP_GEOMETRY[backbone][1 if quick else 0]
        runs = {}
        for variant in ("plain", "checkpointed"):
            cmd = [sys.executable, __file__, "--_step", backbone, variant, str(batch), str(frames), str(size),
                   "--threads", str(threads), "--device", device]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **STEP_ENV})
            if done.returncode != 0:
                raise SystemExit(f"{backbone} {variant} step failed:\n{done.stderr[-2000:]}")
            runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        plain, ckpt = runs["plain"], runs["checkpointed"]
        print(f"{backbone:<10}{f'{frames}x{size}x{size}':>14}{plain['peak_mib']:>11.1f}{ckpt['peak_mib']:>18.1f}"
              f"{ckpt['peak_mib'] / max(plain['peak_mib'], 1e-9):>7.2f}{ckpt['time_s'] / plain['time_s']:>11.2f}x",
              flush=True)


def main() -> None:
    """Make a dataset, train with --cache disk, print RSS per epoch and its growth (or the checkpointing table)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--videos-per-class", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="instead: peak memory of one training step with and without gradient checkpointing")
    parser.add_argument("--backbones", default="vivit,i3d", help="with --grad-checkpointing: backbones to measure")
    parser.add_argument("--device", default="cpu", help="with --grad-checkpointing: cpu or cuda")
    parser.add_argument("--_step", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    if args._step:
        backbone, variant, batch, frames, size = args._step
        print(json.dumps(measure_step(backbone, variant == "checkpointed", int(batch), int(frames), int(size),
                                      args.device)))
        return
    if args.grad_checkpointing:
        print(load_line())
        grad_checkpointing_table(args.quick, threads, args.device, args.backbones.split(","))
        print(rss_line())
        return
    from vtransfer import api
    from vtransfer.data.demo import make_demo

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
