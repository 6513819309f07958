"""Clips per second: vtransfer's loader vs decoding whole videos with PyAV and picking frames.

Three ways to feed 16-frame 112x112 training clips (stride 2, short side
128, random crop + flip) from the same files, each through a DataLoader with
the same number of workers and batch size, each in its own process so its
peak memory is its own:

* ``whole-decode`` - the tutorial way: open the file with PyAV, convert every
  frame to RGB at full size, pick the clip's frames, resize, crop.
* ``loader``       - ``ClipDataset`` with direct decoding: seek to the keyframe
  before the clip, decode only up to its last frame, convert just those
  frames, resized in the same swscale call.
* ``cached``       - ``ClipDataset`` on the decoded-frame cache (memory mode):
  every video decoded once up front (prefill time printed separately), then
  clips are sliced from uint8 arrays.

Prints clips/s for each, the ratios against whole-decode, and peak RSS.
Absolute numbers on a shared machine are noise; the ratios, measured side by
side in one run, are the result.

    python benchmarks/bench_decode.py --quick          # ~20 s, small synthetic data
    python benchmarks/bench_decode.py                  # synthetic H.264, 320x240
    python benchmarks/bench_decode.py --data DEMO_DIR  # any folder of videos (e.g. make-demo output)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"}
METHODS = ("whole-decode", "loader", "cached")


# -- data ------------------------------------------------------------------------------


def write_synthetic_videos(out: Path, videos: int, frames: int, width: int, height: int, fps: int, gop: int) -> list[Path]:
    """Real H.264 .mp4 files of moving shapes over a noisy textured background (PyAV, libx264)."""
    import av
    import numpy as np

    paths = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for v in range(videos):
        rng = np.random.default_rng(v)
        background = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 200).astype(np.float32)
        background = np.kron(background, np.ones((8, 8, 1), np.float32))[:height, :width]
        colour = rng.random(3) * 255
        cx, cy, vx, vy = rng.random() * width, rng.random() * height, rng.normal() * 3, rng.normal() * 3
        radius = min(width, height) * (0.1 + 0.1 * rng.random())
        path = out / f"class{v % 2}" / f"video{v:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "x264-params": f"keyint={gop}"}
            for i in range(frames):
                img = background + rng.normal(0, 6, background.shape).astype(np.float32)
                mask = ((xx - (cx + vx * i) % width) ** 2 + (yy - (cy + vy * i) % height) ** 2) < radius**2
                img[mask] = colour
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def find_videos(root: Path) -> list[Path]:
    """Video files under ``root`` (by extension; hidden files skipped), sorted."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


# -- one measurement (runs in a child process) ----------------------------------------------


class WholeDecodeDataset:
    """The baseline: decode the whole file to full-size RGB, pick frames, resize, crop."""

    def __init__(self, paths, preprocessing, seed=0):
        from vtransfer.data.transforms import train_clip_transform

        self.paths = paths
        self.pre = preprocessing
        self.seed = seed
        self.epoch = 0
        self.transform = train_clip_transform(preprocessing.crop_size)

    def __len__(self):
        return len(self.paths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        import av
        import numpy as np
        import torch
        from torchvision.transforms.v2 import functional as F

        from vtransfer.data.sampling import random_clip_start

        with av.open(str(self.paths[index])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        p = self.pre
        start = random_clip_start(len(frames), p.frames, p.stride, g)
        picked = [frames[min(start + k * p.stride, len(frames) - 1)] for k in range(p.frames)]
        clip = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2)
        h, w = clip.shape[-2:]
        size = [p.resize_short, round(w * p.resize_short / h)] if h <= w else [round(h * p.resize_short / w), p.resize_short]
        clip = F.resize(clip, size, antialias=True)
        return {"clip": self.transform(clip, g), "label": 0, "video": index, "view": 0}


def measure(spec: dict) -> dict:
    """Run one method and return clips/s, timings and peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from vtransfer.data.dataset import ClipDataset, collate_clips
    from vtransfer.data.frame_cache import make_reader
    from vtransfer.data.records import VideoRecord
    from vtransfer.models.base import Preprocessing

    torch.set_num_threads(1)
    pre = Preprocessing(frames=spec["frames"], stride=spec["stride"], crop_size=(spec["size"], spec["size"]),
                        resize_short=spec["short_side"])
    paths = [Path(p) for p in spec["paths"]]
    records = [VideoRecord(p, "x") for p in paths]
    prefill_s = 0.0
    if spec["method"] == "whole-decode":
        dataset = WholeDecodeDataset(paths, pre)
    else:
        reader = None
        if spec["method"] == "cached":
            t = time.perf_counter()
            reader = make_reader("memory", None, records, pre)
            prefill_s = time.perf_counter() - t
        dataset = ClipDataset(records, {"x": 0}, pre, mode="train", reader=reader)
    loader = DataLoader(dataset, batch_size=spec["batch"], shuffle=False, num_workers=spec["workers"],
                        collate_fn=collate_clips, persistent_workers=spec["workers"] > 0)
    clips, errors, epoch, started = 0, 0, 0, None
    while clips < spec["min_clips"]:
        dataset.set_epoch(epoch)
        for batch in loader:
            if started is None:  # the first batch pays for worker start-up: not timed
                started = time.perf_counter()
                continue
            clips += batch["clip"].shape[0]
            errors += len(batch["errors"])
            assert batch["clip"].shape[1:] == (pre.frames, 3, spec["size"], spec["size"]), batch["clip"].shape
        epoch += 1
    elapsed = time.perf_counter() - started
    del loader  # joins persistent workers, so their peak RSS is counted below
    kib = 1024 if sys.platform != "darwin" else 1
    return {
        "method": spec["method"],
        "clips": clips,
        "seconds": elapsed,
        "clips_per_s": clips / elapsed,
        "prefill_s": prefill_s,
        "errors": errors,
        "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20,
        "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20,
    }


def run_child(spec: dict) -> dict:
    """Measure ``spec`` in a fresh Python process (clean peak-RSS accounting)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, __file__, "--_measure", f.name], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{spec['method']} run failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic data and few clips (for the test suite)")
    parser.add_argument("--data", type=Path, help="a folder of videos to use instead of synthetic ones")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every method (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--frames", type=int, default=16, help="clip length T (default 16)")
    parser.add_argument("--stride", type=int, default=2, help="frame stride (default 2)")
    parser.add_argument("--size", type=int, default=112, help="crop size (default 112)")
    parser.add_argument("--short-side", type=int, default=128, help="resize short side (default 128)")
    parser.add_argument("--min-clips", type=int, help="clips timed per method (default 48 quick, 320 full)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        print(json.dumps(measure(json.loads(Path(args._measure).read_text()))))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        if args.data:
            paths = find_videos(args.data)
            if not paths:
                parser.error(f"--data {args.data}: no video files found")
            described = f"{len(paths)} videos from {args.data}"
        else:
            videos, frames, w, h = (6, 64, 160, 120) if args.quick else (16, 128, 320, 240)
            gop = 25
            t = time.perf_counter()
            paths = write_synthetic_videos(Path(tmp), videos, frames, w, h, fps=25, gop=gop)
            described = (f"{videos} synthetic H.264 videos, {w}x{h}, {frames} frames, 25 fps, keyframe every {gop} "
                         f"(written in {time.perf_counter() - t:.1f} s)")
        from vtransfer.data.decode import probe_video

        infos = [probe_video(p) for p in paths]
        total_frames = sum(i.num_frames for i in infos)
        min_clips = args.min_clips or (48 if args.quick else 320)
        print(f"data: {described}; {total_frames} frames in all")
        print(f"clip {args.frames}x{args.size}x{args.size}, stride {args.stride}, short side {args.short_side}, "
              f"batch {args.batch}, workers {args.workers}, {min_clips}+ clips timed per method, cpus {os.cpu_count()}")
        results = {}
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if method not in METHODS:
                parser.error(f"--methods: unknown method {method!r}")
            spec = {"method": method, "paths": [str(p) for p in paths], "frames": args.frames, "stride": args.stride,
                    "size": args.size, "short_side": args.short_side, "batch": args.batch, "workers": args.workers,
                    "min_clips": min_clips}
            r = run_child(spec)
            results[method] = r
            extra = f", prefill {r['prefill_s']:.2f} s" if method == "cached" else ""
            print(f"{method:>13}: {r['clips_per_s']:8.1f} clips/s ({r['clips']} clips in {r['seconds']:.2f} s{extra}); "
                  f"peak RSS main {r['peak_rss_main_mib']:.0f} MiB, worker {r['peak_rss_worker_mib']:.0f} MiB")
        base = results.get("whole-decode")
        if base:
            if "loader" in results:
                print(f"ratio loader/whole-decode: {results['loader']['clips_per_s'] / base['clips_per_s']:.1f}x")
            if "cached" in results:
                print(f"ratio cached/whole-decode: {results['cached']['clips_per_s'] / base['clips_per_s']:.1f}x")
        if args.json:
            args.json.write_text(json.dumps({"data": described, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
