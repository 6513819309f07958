"""Does a model see motion? The "arrow of time" task, built from any folder of real videos.

Every video of DATA (``DATA/<class>/<video>``) is written twice at the working
resolution: as it plays (class ``forward``) and reversed in time (class
``backward``). Appearance is identical by construction, so a model that sees
no motion scores exactly chance (50%). Both copies of a video share a group,
so the split never puts a video's forward copy in training and its backward
copy in the test. The script then runs ``vtransfer compare-policies`` once
per ``--streams`` entry (``rgb``, ``flow``, or ``two-stream``, the default,
which trains both and gives all three rows) on that dataset and prints each
stream's test video accuracy per policy, with the flow extraction rate.

Periodic actions (clapping, waving) look much the same reversed, so the
ceiling on such a dataset is below 100% for any model. The copies are written
losslessly, and the two non-deep baselines of
:mod:`vtransfer.evaluation.motion_baseline` are printed as a check: frame
differences and the mean frame are the same in both directions, so that
baseline must sit near 50%; the flow-orientation histogram sees direction.
It is printed twice: summed over the whole video (``flowhist+LR``), and one
clip at a time with the run's frames, stride and test clips, its clips'
probabilities averaged per video (``flowhist/clip+LR``), which is what a
network that sees one clip at a time could get from which way things move.
On real_actions (periodic) the second is 83.3% where the first is 100%; on
yoga_poses (people moving into and out of poses) 92.9% and 85.7%.

Usage::

    python benchmarks/bench_motion.py ../shared/data/real_actions --policies top-layer,top-3 --seeds 0
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import av
import numpy as np
from _common import base_parser, load_line, rss_line, setup_threads

from vtransfer import api
from vtransfer.data.decode import read_video
from vtransfer.data.scan import load_dataset, scan_dataset
from vtransfer.evaluation.motion_baseline import (
    fit_and_score,
    fit_and_score_clips,
    flow_histogram_clip_features,
    flow_histogram_features,
    motion_features,
)

ARROW_CLASSES = ("forward", "backward")


def write_video(frames: np.ndarray, path: Path, fps: int = 25) -> None:
    """Write uint8 ``T x H x W x 3`` frames as a lossless H.264 MP4 (even sizes).

    Lossless, because a lossy encoder codes what appears and disappears differently in each direction of
    play: its artifacts alone gave a frame-difference baseline 16 of 18 videos right on real_actions.
    """
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast"}
        for frame in frames[:, :h, :w]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_arrow_of_time(data: Path, out: Path, short_side: int, max_videos: int | None) -> int:
    """Write ``out/{forward,backward}/vNNNN_<name>.mp4`` for every video of ``data``; return the video count."""
    records = scan_dataset(data).records
    if max_videos:
        records = records[:max_videos]
    for cls in ARROW_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(records):
        frames = read_video(record.path, short_side=short_side).permute(0, 2, 3, 1).numpy()
        name = f"v{i:04d}_{record.path.stem}.mp4"
        write_video(frames, out / "forward" / name)
        write_video(frames[::-1], out / "backward" / name)
    return len(records)


def run_clip_settings(compare_dir: Path) -> tuple[int, int, int]:
    """``(frames, stride, test clips per video)`` of the first run under ``compare_dir`` (a stream's ``config.json``).

    A two-stream run's own ``config.json`` holds the options only; its streams' (``rgb/``, ``flow/``) hold both.
    """
    for path in sorted(compare_dir.rglob("config.json")):
        config = json.loads(path.read_text())
        pre = config.get("resolved", {}).get("preprocessing")
        if pre:
            return int(pre["frames"]), int(pre["stride"]), int(config["options"]["clips_per_video"])
    raise FileNotFoundError(f"no run under {compare_dir} records its clip settings (config.json)")


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder DATA/<class>/<video> of real videos")
    parser.add_argument("--streams", default="two-stream",
                        help="streams to compare (comma-separated: rgb, flow, two-stream; two-stream gives all three)")
    parser.add_argument("--policies", default="top-layer,top-3", help="policies to run on each stream")
    parser.add_argument("--seeds", default="0", help="seeds (comma-separated)")
    parser.add_argument("--backbone", default="effnet3d")
    parser.add_argument("--weights", default="effnet3d:imagenet")
    parser.add_argument("--short-side", type=int, default=128, help="working resolution of the written copies")
    parser.add_argument("--size", type=int, default=112, help="crop size the model sees")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--flow-method", default=None, help="--flow-method for the flow stream")
    parser.add_argument("--flow-bound", type=float, default=None,
                        help="--flow-bound in px (default: the tool's, 20 px scaled from 256 px to the working resolution)")
    parser.add_argument("--flow-channels", type=int, default=None,
                        help="--flow-channels for the flow stream: 2 (x, y) or 3 (x, y, magnitude; default: the tool's)")
    parser.add_argument("--max-videos", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder for the dataset and runs (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_videos, args.epochs, args.size, args.short_side = args.max_videos or 8, 2, 64, 64
    setup_threads(args.threads)
    print(load_line())
    work = args.work or Path(tempfile.mkdtemp(prefix="vtransfer-arrow-"))
    dataset = work / "arrow_of_time"
    if not (dataset / "forward").is_dir():
        start = time.perf_counter()
        n = build_arrow_of_time(args.data, dataset, args.short_side, args.max_videos)
        print(f"arrow of time from {args.data}: {n} videos x {len(ARROW_CLASSES)} directions "
              f"({time.perf_counter() - start:.0f} s to write)")
    results: dict[str, dict[str, float | None]] = {}
    flow_options = {k: v for k, v in (("flow_bound", args.flow_bound), ("flow_method", args.flow_method),
                                      ("flow_channels", args.flow_channels)) if v is not None}
    for stream in args.streams.split(","):
        extra = flow_options if stream != "rgb" else {}
        start = time.perf_counter()
        res = api.compare_policies(
            dataset, backbone=args.backbone, weights=args.weights, policies=args.policies.split(","),
            seeds=[int(s) for s in args.seeds.split(",")], out=work / f"compare-{stream}", overwrite=True,
            group_pattern=r"^(v\d+)_", size=args.size, epochs=args.epochs, stream=stream, **extra)
        for row in res.rows:  # a two-stream comparison has a row per stream and the fused one
            results.setdefault(row.stream or stream, {})[row.policy] = row.test_video_hit1
        print(f"{stream}: {time.perf_counter() - start:.0f} s")
    index = load_dataset(dataset, manifest=work / f"compare-{args.streams.split(',')[0]}" / "split.csv")
    train = [(r.path, r.label) for r in index.records if r.split in ("train", "val")]
    test = [(r.path, r.label) for r in index.split("test")]
    baselines = {name: fit_and_score(train, test, features=f).accuracy
                 for name, f in (("motion+LR", motion_features), ("flowhist+LR", flow_histogram_features))}
    frames, stride, clips = run_clip_settings(work / f"compare-{args.streams.split(',')[0]}")
    per_clip = partial(flow_histogram_clip_features, frames=frames, stride=stride, clips=clips)
    baselines[f"flowhist/clip+LR ({frames} frames {stride} apart, {clips} clips a video)"] = \
        fit_and_score_clips(train, test, features=per_clip).accuracy
    policies = args.policies.split(",")
    print(f"\ntest video accuracy on the arrow of time (chance 50%), {args.backbone} from {args.weights}:")
    print(f"{'stream':<12}" + "".join(f"{p:>12}" for p in policies))
    for stream, row in results.items():
        print(f"{stream:<12}" + "".join(f"{'-' if row.get(p) is None else f'{100 * row[p]:.1f}%':>12}" for p in policies))
    for name, accuracy in baselines.items():
        print(f"{name:<12} {100 * accuracy:.1f}% (baseline on the same split)")
    print("flowhist+LR sums the flow over the whole video; flowhist/clip+LR sees one clip at a time, as the networks do,"
          " and averages its clips' probabilities per video: where it falls short of flowhist+LR, the direction is in"
          " the whole video rather than in a clip (periodic actions)")
    print(rss_line())
    if args.work is None and not os.environ.get("VTRANSFER_KEEP_BENCH"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
