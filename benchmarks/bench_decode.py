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

Every worker decodes with one thread (PyAV's default would add slice and
swscale threads, which on a busy shared machine only take CPU from other
tenants and make wall-clock ratios depend on their load; single-threaded it
is also the cheaper baseline). The methods run interleaved in rounds (A B C
A B C ...) so load changes hit all alike.

Prints clips/s for each, the worker CPU time per clip, the ratios against
whole-decode, and peak RSS. Absolute numbers on a shared machine are noise;
the ratios, measured side by side in one run, are the result.

    python benchmarks/bench_decode.py --quick          # ~20 s, small synthetic data
    python benchmarks/bench_decode.py                  # synthetic H.264, 320x240
    python benchmarks/bench_decode.py --data DEMO_DIR  # any folder of videos (e.g. make-demo output)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

try:
    import vtransfer  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one thread per worker, like the loader (see module doc)
            frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(stream)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        p = self.pre
        start = random_clip_start(len(frames), p.frames, p.stride, g)
        picked = [frames[min(start + k * p.stride, len(frames) - 1)] for k in range(p.frames)]
        clip = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2)
        h, w = clip.shape[-2:]
        size = [p.resize_short, round(w * p.resize_short / h)] if h <= w else [round(h * p.resize_short / w), p.resize_short]
        clip = F.resize(clip, size, antialias=True)
        return {"clip": self.transform(clip, g), "label": 0, "video": index, "view": 0}


class CpuTimed:
    """Wraps a dataset; each item carries the CPU seconds its worker spent making it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index):
        started = time.process_time()
        item = self.dataset[index]
        item["cpu_s"] = time.process_time() - started
        return item


def collate_timed(items):
    """collate_clips plus the summed worker CPU seconds of the batch."""
    from vtransfer.data.dataset import collate_clips

    batch = collate_clips(items)
    batch["cpu_s"] = sum(it["cpu_s"] for it in items)
    return batch


class MethodRunner:
    """One method's dataset, fed through a fresh DataLoader for each timed chunk."""

    def __init__(self, spec: dict):
        import torch

        from vtransfer.data.dataset import ClipDataset
        from vtransfer.data.frame_cache import make_reader
        from vtransfer.data.records import VideoRecord
        from vtransfer.models.base import Preprocessing

        torch.set_num_threads(1)
        self.spec = spec
        self.pre = Preprocessing(frames=spec["frames"], stride=spec["stride"], crop_size=(spec["size"], spec["size"]),
                                 resize_short=spec["short_side"])
        paths = [Path(p) for p in spec["paths"]]
        records = [VideoRecord(p, "x") for p in paths]
        self.prefill_s = 0.0
        self.probe_s = 0.0
        self.cache_bytes = 0
        if spec["method"] == "whole-decode":
            self.dataset = WholeDecodeDataset(paths, self.pre)
        else:
            reader = None
            if spec["method"] == "cached":
                t = time.perf_counter()
                reader = make_reader("memory", None, records, self.pre, cache_format="raw")  # bench_frame_cache: jpeg
                self.prefill_s = time.perf_counter() - t
                self.cache_bytes = reader.cache.stats()["bytes"]
            self.dataset = ClipDataset(records, {"x": 0}, self.pre, mode="train", reader=reader)
            t = time.perf_counter()
            self.dataset.probe_all()  # what the first set_epoch does: lengths known before workers fork
            self.probe_s = time.perf_counter() - t
        self.dataset = CpuTimed(self.dataset)
        self.chunk = 0

    def run(self, clips: int) -> tuple[int, float, float]:
        """Deliver about ``clips`` clips; return (clips timed, seconds, worker CPU seconds).

        Worker start-up and the first batch are not timed; nothing runs in
        the background between chunks, so interleaved methods do not steal
        each other's CPU.
        """
        from torch.utils.data import DataLoader

        batch = self.spec["batch"]
        n = len(self.dataset)
        order = [(self.chunk * clips + i) % n for i in range(clips + batch)]
        self.dataset.set_epoch(self.chunk)
        self.chunk += 1
        loader = DataLoader(self.dataset, batch_size=batch, sampler=order, num_workers=self.spec["workers"],
                            collate_fn=collate_timed)
        timed, cpu, started = 0, 0.0, None
        for b in loader:
            assert not b["errors"], b["errors"]
            assert b["clip"].shape[1:] == (self.pre.frames, 3, self.spec["size"], self.spec["size"])
            if started is None:
                started = time.perf_counter()
                continue
            timed += b["clip"].shape[0]
            cpu += b["cpu_s"]
        return timed, time.perf_counter() - started, cpu


def _child(spec: dict, conn) -> None:
    """Serve ("run", clips) requests for one method until ("stop",), then report peak RSS."""
    try:
        runner = MethodRunner(spec)
        conn.send(("ready", {"prefill_s": runner.prefill_s, "probe_s": runner.probe_s, "cache_bytes": runner.cache_bytes}))
        while True:
            command, arg = conn.recv()
            if command == "stop":
                break
            conn.send(("ok", runner.run(arg)))
        kib = 1024 if sys.platform != "darwin" else 1
        conn.send(("ok", {
            "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20,
            "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20,
        }))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Child:
    """A method running in its own process (its own peak RSS); forked on Linux, so torch is not re-imported."""

    def __init__(self, spec: dict):
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        self.method = spec["method"]
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(spec, child_conn))
        self.proc.start()
        child_conn.close()
        self.info = self._recv()

    def _recv(self):
        try:
            status, payload = self.conn.recv()
        except EOFError:
            status, payload = "error", f"process exited with code {self.proc.exitcode}"
        if status == "error":
            raise RuntimeError(f"{self.method} run failed: {payload}")
        return payload

    def run(self, clips: int) -> tuple[int, float, float]:
        self.conn.send(("run", clips))
        return self._recv()

    def stop(self) -> dict:
        self.conn.send(("stop", None))
        rss = self._recv()
        self.proc.join()
        return rss


def measure_all(methods: list[str], base_spec: dict, rounds: int, chunk: int) -> dict[str, dict]:
    """Time ``methods`` in interleaved rounds (A B C A B C ...), so load changes hit all alike."""
    children = {}
    try:
        for m in methods:
            children[m] = Child({**base_spec, "method": m})
        totals = {m: [0, 0.0, 0.0] for m in methods}
        for _ in range(rounds):
            for m in methods:
                for i, v in enumerate(children[m].run(chunk)):
                    totals[m][i] += v
        results = {}
        for m in methods:
            clips, seconds, cpu = totals[m]
            results[m] = {"method": m, "clips": clips, "seconds": seconds, "clips_per_s": clips / seconds,
                          "worker_cpu_ms_per_clip": 1000 * cpu / clips, **children[m].info, **children[m].stop()}
        return results
    finally:
        for child in children.values():
            if child.proc.is_alive():
                child.proc.kill()
                child.proc.join()


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic data and few clips (for the test suite)")
    parser.add_argument("--data", type=Path, help="a folder of videos to use instead of synthetic ones")
    parser.add_argument("--video-frames", type=int, default=175,
                        help="frames per synthetic video (default 175 = 7 s at 25 fps, UCF-101's mean length)")
    parser.add_argument("--gop", type=int, default=25, help="keyframe interval of the synthetic videos (default 25 = 1 s)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every method (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--frames", type=int, default=16, help="clip length T (default 16)")
    parser.add_argument("--stride", type=int, default=2, help="frame stride (default 2)")
    parser.add_argument("--size", type=int, default=112, help="crop size (default 112)")
    parser.add_argument("--short-side", type=int, default=128, help="resize short side (default 128)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per method (default 2 quick, 4 full)")
    parser.add_argument("--chunk", type=int, help="clips per method per round (default 24 quick, 80 full)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        if args.data:
            paths = find_videos(args.data)
            if not paths:
                parser.error(f"--data {args.data}: no video files found")
            described = f"{len(paths)} videos from {args.data}"
        else:
            videos, frames, w, h = (6, 64, 160, 120) if args.quick else (16, args.video_frames, 320, 240)
            gop = args.gop
            t = time.perf_counter()
            paths = write_synthetic_videos(Path(tmp), videos, frames, w, h, fps=25, gop=gop)
            described = (f"{videos} synthetic H.264 videos, {w}x{h}, {frames} frames, 25 fps, keyframe every {gop} "
                         f"(written in {time.perf_counter() - t:.1f} s)")
        # Imported here, before the children fork, so they do not pay for it again.
        import vtransfer.data.dataset  # noqa: F401
        import vtransfer.data.frame_cache  # noqa: F401
        from vtransfer.data.decode import probe_video

        infos = [probe_video(p) for p in paths]
        total_frames = sum(i.num_frames for i in infos)
        rounds = args.rounds or (2 if args.quick else 4)
        chunk = args.chunk or (24 if args.quick else 80)
        print(f"data: {described}; {total_frames} frames in all")
        print(f"clip {args.frames}x{args.size}x{args.size}, stride {args.stride}, short side {args.short_side}, "
              f"batch {args.batch}, workers {args.workers}, cpus {os.cpu_count()}; methods interleaved: "
              f"{rounds} rounds of {chunk} clips each")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {METHODS}")
        spec = {"paths": [str(p) for p in paths], "frames": args.frames, "stride": args.stride, "size": args.size,
                "short_side": args.short_side, "batch": args.batch, "workers": args.workers}
        results = measure_all(methods, spec, rounds, chunk)
        for method, r in results.items():
            extra = f", length probe {r['probe_s']:.2f} s" if method == "loader" else ""
            if method == "cached":
                extra = f", prefill {r['prefill_s']:.2f} s for {r['cache_bytes'] / 2**20:.0f} MiB"
            print(f"{method:>13}: {r['clips_per_s']:8.1f} clips/s ({r['clips']} clips in {r['seconds']:.2f} s{extra}); "
                  f"worker CPU {r['worker_cpu_ms_per_clip']:.1f} ms/clip; "
                  f"peak RSS main {r['peak_rss_main_mib']:.0f} MiB, worker {r['peak_rss_worker_mib']:.0f} MiB")
        base = results.get("whole-decode")
        if base:
            for m in ("loader", "cached"):
                if m in results:
                    r = results[m]
                    print(f"ratio {m}/whole-decode: {r['clips_per_s'] / base['clips_per_s']:.1f}x "
                          f"(worker CPU per clip: {base['worker_cpu_ms_per_clip'] / r['worker_cpu_ms_per_clip']:.1f}x less)")
        if args.json:
            args.json.write_text(json.dumps({"data": described, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
