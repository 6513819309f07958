"""Each part of a vtransfer run alone: the rate it reaches in isolation on this machine.

A run's throughput can be no better than its slowest part's own rate. This
script measures each part on its own, in a process set up as a run's: malloc
keeping large blocks (:func:`vtransfer.utils.allocator.tune_malloc`) and the
tool's threads (:func:`vtransfer.utils.runtime.configure_threads`, which also
flushes denormal floats):

* **decoding**: PyAV decoding every frame of a sample of the dataset's videos
  to RGB arrays, one video per thread on every core, in frames per second;
* per policy, the network in its two parts, on random clips at the model's
  input size and the tool's batch size (the rates do not depend on the pixels):
  * **prefix**: a forward pass of the frozen groups (those before the
    policy's first trainable group), timed group by group, in clips per
    second; a prefix that starts from another policy's stored outputs runs
    only the groups between;
  * **training**: one training step (forward, backward, optimiser step) of
    the trainable groups on the prefix's outputs, in clips per second; for a
    policy that trains more than the head, also with gradient checkpointing
    (each group's forward again in the backward pass), the step a run takes
    when the plain one would not fit its memory budget.

``bench_scale.py --curve`` runs it once, before the runs it times, and states
each run's throughput as a fraction of its slowest part's rate (issue 23).

    python benchmarks/bench_parts.py DATA                     # effnet3d from ImageNet; the curve's policies and all
    python benchmarks/bench_parts.py DATA --policies top-3 --json parts.json
    python benchmarks/bench_parts.py --quick                  # a tiny model on a generated dataset: seconds

The load average is printed with the numbers; run it alone.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from _common import base_parser, cpu_count, load_line, make_demo, median_time, rss_line

from vtransfer.engine.trainer import TrainablePart
from vtransfer.models.registry import preferred_memory_format
from vtransfer.policies.freezing import apply_policy, plan_policy, set_train_mode
from vtransfer.utils.allocator import tune_malloc
from vtransfer.utils.runtime import configure_threads
from vtransfer.workflows.run_model import build_run_model

POLICIES = "top-layer,top-3,attentive-probe,all"
BATCH = 8
SAMPLE_VIDEOS = 8


def sample_videos(data: Path, count: int) -> list[Path]:
    """``count`` videos spread evenly over the dataset's sorted video files."""
    from vtransfer.data.sniff import VIDEO_EXTENSIONS

    videos = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise SystemExit(f"{data}: no video files found")
    step = max(1, len(videos) // count)
    return videos[::step][:count]


def decode_all_frames(path: Path) -> int:
    """Decode every frame of ``path`` to an RGB array with PyAV; the number of frames."""
    frames = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            frames += 1
    return frames


def decode_rate(videos: list[Path], threads: int) -> dict:
    """PyAV alone: frames per second decoding ``videos``, one per thread on ``threads`` threads (after a warm-up)."""
    decode_all_frames(videos[0])  # the file in the page cache, the codec's first use paid
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        frames = sum(pool.map(decode_all_frames, videos))
    seconds = time.perf_counter() - started
    return {"frames": frames, "seconds": round(seconds, 3), "threads": threads, "frames_per_s": frames / seconds}


def group_seconds(model, x: torch.Tensor, stop: int, repeat: int) -> list[float]:
    """Seconds per clip of each of the groups ``0 .. stop - 1`` on the batch ``x``: the median of ``repeat`` passes."""
    per_group = []
    state = x
    with torch.no_grad():
        for g in range(stop):
            state_in = state
            seconds = median_time(lambda: model.run_group(g, state_in), warmup=1, repeat=repeat)
            state = model.run_group(g, state_in)
            per_group.append(seconds / x.shape[0])
    return per_group


def training_rate(model, plan, x: torch.Tensor, num_classes: int, repeat: int, checkpointed: bool = False) -> float:
    """Clips per second of one training step of the policy's trainable groups on the prefix's outputs of ``x``
    (as a run's step: :class:`~vtransfer.engine.trainer.TrainablePart`, checkpointed or not)."""
    stop = plan.first_trainable_group
    part = TrainablePart(model, stop, grad_checkpointing=checkpointed)
    with torch.no_grad():
        state = model.forward_groups(x, 0, stop)
    labels = torch.arange(x.shape[0]) % num_classes
    set_train_mode(model, True, plan.policy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(part(state), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return x.shape[0] / median_time(step, warmup=1, repeat=repeat)


def network_rates(options: dict, policies: list[str], num_classes: int, batch: int, repeat: int) -> dict:
    """Per policy: its first trainable group, its prefix's seconds per clip by group, its training step's rate."""
    base, _ = build_run_model({**options, "policy": "all"}, num_classes)
    pre = base.preprocessing
    x = torch.randn(batch, pre.channels, pre.frames, *pre.crop_size)
    out = {"input": [pre.channels, pre.frames, *pre.crop_size], "batch_size": batch, "policies": {}}
    for policy in policies:
        model, plan = plan_policy(copy.deepcopy(base), policy)
        apply_policy(model, plan)
        model.to(memory_format=preferred_memory_format(options["backbone"], "fp32", torch.device("cpu")))  # as a run does
        set_train_mode(model, False, policy)
        stop = plan.first_trainable_group
        seconds = group_seconds(model, x, stop, repeat)
        out["policies"][policy] = {
            "first_trainable_group": stop,
            "groups": model.group_names(),
            "prefix_s_per_clip": seconds,
            "prefix_clips_per_s": (1.0 / sum(seconds)) if seconds else None,
            "train_clips_per_s": training_rate(model, plan, x, num_classes, repeat),
            # only where checkpointing changes anything: more than the head is trained
            "train_clips_per_s_checkpointed": (training_rate(model, plan, x, num_classes, repeat, checkpointed=True)
                                               if stop < len(model.layer_groups()) - 1 else None),
        }
    return out


def measure_parts(data: Path, options: dict, policies: list[str], num_classes: int, threads: int | None,
                  videos: int = SAMPLE_VIDEOS, batch: int = BATCH, repeat: int = 3) -> dict:
    """Every part's isolated rate: PyAV decoding of ``videos`` of ``data``, then the network per policy.

    The process is set up as a run's: malloc keeps large blocks (without it, the kernel's zeroing of fresh pages
    halves the network's rates) and the tool's threads and denormal flushing.
    """
    tune_malloc()
    used = configure_threads(threads)
    parts = {"load_before": load_line(), "threads": used, "model": options,
             "decode": decode_rate(sample_videos(data, videos), threads or cpu_count())}
    parts.update(network_rates(options, policies, num_classes, batch, repeat))
    parts["load_after"] = load_line()
    return parts


def print_parts(parts: dict) -> None:
    """The isolated rates as a table."""
    d = parts["decode"]
    print(f"decoding (PyAV, every frame to RGB, {d['threads']} threads): {d['frames']} frames in {d['seconds']:.2f} s "
          f"= {d['frames_per_s']:.0f} frames/s ({d['frames_per_s'] / d['threads']:.0f} per thread)")
    c, t, h, w = parts["input"]
    print(f"network, batch {parts['batch_size']} of {c}x{t}x{h}x{w}, {parts['threads']} torch threads:")
    print(f"  {'policy':<18} {'first trainable':<22} {'prefix clips/s':>15} {'training clips/s':>17} "
          f"{'checkpointed':>13}")
    for policy, p in parts["policies"].items():
        prefix = f"{p['prefix_clips_per_s']:.1f}" if p["prefix_clips_per_s"] else "-"
        first = f"{p['first_trainable_group']} ({p['groups'][p['first_trainable_group']]})"
        checkpointed = p.get("train_clips_per_s_checkpointed")
        print(f"  {policy:<18} {first:<22} {prefix:>15} {p['train_clips_per_s']:17.1f} "
              f"{f'{checkpointed:.1f}' if checkpointed else '-':>13}")


def main() -> None:
    """Measure and print the parts' rates (and write them as JSON with ``--json``)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=None, help="dataset folder DATA/<class>/<video>")
    parser.add_argument("--backbone", default="effnet3d")
    parser.add_argument("--weights", default=None, help="default: effnet3d:imagenet for effnet3d (none with --quick)")
    parser.add_argument("--preset", default=None, help="default: the backbone's (tiny with --quick)")
    parser.add_argument("--policies", default=POLICIES, help=f"comma-separated (default {POLICIES})")
    parser.add_argument("--classes", type=int, default=None, help="classifier outputs (default: DATA's class folders)")
    parser.add_argument("--videos", type=int, default=SAMPLE_VIDEOS, help="videos decoded (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="clips per batch (default %(default)s, the tool's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_parts_") as tmp:
        data = args.data
        if args.quick or data is None:
            if not args.quick:
                parser.error("DATA is required (or --quick)")
            data = Path(tmp) / "data"
            make_demo(data, ["--set", "target", "-n", "2", "--frames", "16", "--size", "48"])
        if not data.is_dir():
            parser.error(f"dataset folder {data} does not exist")
        classes = args.classes or sum(1 for p in data.iterdir() if p.is_dir())
        options = {"backbone": args.backbone, "preset": args.preset or ("tiny" if args.quick else None),
                   "weights": args.weights or ("effnet3d:imagenet" if args.backbone == "effnet3d" and not args.quick
                                               else None)}
        print(f"load before: {load_line()}")
        parts = measure_parts(data, options, [p for p in args.policies.split(",") if p], classes, args.threads,
                              videos=args.videos, batch=args.batch_size, repeat=1 if args.quick else 3)
    print_parts(parts)
    print(f"load after: {parts['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(parts, indent=1))
    print(rss_line())


if __name__ == "__main__":
    main()
