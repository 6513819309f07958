"""Frame-cache formats: bytes per video and time per clip, raw uint8 RGB against JPEG frames.

The decoded-frame cache (``vtransfer/data/frame_cache.py``) keeps every frame
of every video at the working resolution. This script measures, on real
videos, what each ``--cache-format`` costs, for two clip settings: the
``effnet3d`` defaults (8 frames, stride 4, 224 crop from a 256 short side)
and the demo's (8 frames, stride 2, 64 crop from a 73 short side).

1. **Size and error** (every video, one at a time): raw bytes and JPEG bytes
   per video, their ratio (all videos together, and the worst video), the
   mean absolute error of the JPEG frames against the raw ones (grey levels,
   0-255), the largest frame's bytes per pixel (what ``--cache auto``'s
   estimate must cover), and the fill cost: decoding a video and encoding
   its frames, per video.
2. **Codecs per clip** (a few videos): one clip's frames from each JPEG
   decoder on the same JPEG bytes (OpenCV ``imdecode`` as the cache does it,
   torchvision's ``decode_jpeg`` - deprecated since torchvision 0.29 - and
   PIL; all three libjpeg-turbo), against slicing raw frames, alone and
   followed by the training crop (random resized crop + flip), interleaved.
3. **Cached epoch** (a few videos): a top-layer-like pass through
   ``ClipDataset`` in train mode with 5 fixed views per video (the cached
   views a frozen prefix is computed on), batches of 8 in the main process
   (``--workers`` 0, as for a memory cache), from a raw and from a jpeg
   memory cache, interleaved: the loader alone, and with the frozen
   network's forward pass (effnet3d, random weights) as top-layer runs it.

The process is set up as the command sets itself up (OpenMP and malloc,
``vtransfer.cli.prepare_process``) with torch using every core. Prints the
tables, the ratios jpeg/raw, the load average at the start and end, and peak
RSS. Run from the repository root::

    python benchmarks/bench_frame_cache.py ../shared/data/real_actions ../shared/data/yoga_poses
    python benchmarks/bench_frame_cache.py --quick      # seconds: two small synthetic videos
"""

from __future__ import annotations

import io
import random
import sys
import tempfile
import time
from pathlib import Path

try:
    import vtransfer  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import base_parser, load_line, rss_line, setup_threads, time_interleaved

from vtransfer.cli import prepare_process

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"}
VIEWS = 5  # fixed views per video, as --cached-views' default min(epochs, 5)


def videos_in(folder: Path, limit: int | None) -> list[Path]:
    """Video files under ``folder``, sorted; ``limit`` spreads the pick over the whole list (all classes)."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if limit is not None and len(found) > limit:
        step = len(found) / limit
        found = [found[int(i * step)] for i in range(limit)]
    return found


def synthetic_videos(out: Path, count: int = 2, frames: int = 24) -> list[Path]:
    """Small H.264 videos (320x240): a smooth gradient, moving discs and mild noise (JPEG's usual case)."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    paths = []
    for v in range(count):
        path = out / f"synthetic_{v}.mp4"
        with av.open(str(path), "w") as f:
            stream = f.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "18"}
            for i in range(frames):
                img = np.stack([xx * 0.6 + 40 * v, yy * 0.8, 255 - xx * 0.5], axis=-1)
                for k in range(3):
                    cy, cx = 60 + 50 * k, (40 + 9 * i * (k + 1) + 30 * v) % 320
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 400] = (200, 60 * k, 90)
                img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    f.mux(packet)
            for packet in stream.encode():
                f.mux(packet)
        paths.append(path)
    return paths


def settings() -> dict[str, tuple[str, object]]:
    """The two clip settings, (effnet3d preset, Preprocessing): effnet3d's defaults and the demo's."""
    from vtransfer.data.clips import adapt_preprocessing
    from vtransfer.demo import DEMO_SETTINGS
    from vtransfer.models.registry import build_backbone

    s = DEMO_SETTINGS
    demo = build_backbone(s["backbone"], s["preset"], num_classes=2).preprocessing
    return {"effnet3d": ("lite0", build_backbone("effnet3d", "lite0", num_classes=2).preprocessing),
            "demo": (s["preset"], adapt_preprocessing(demo, s["frames"], s["stride"], s["size"]))}


# -- 1. size and error -----------------------------------------------------------------


def size_table(paths: list[Path], pre) -> dict[str, float]:
    """Raw and JPEG bytes, error and fill time over ``paths`` at ``pre.resize_short`` (one video in memory at a time)."""
    import numpy as np
    import torch

    from vtransfer.data.decode import read_video
    from vtransfer.data.frame_cache import JpegFrames, estimate_cache_bytes
    from vtransfer.data.records import VideoRecord

    raw = jpeg = err_sum = pixels = 0
    worst_ratio, max_bpp, min_frame = float("inf"), 0.0, float("inf")
    decode_s = encode_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        frames = read_video(path, short_side=pre.resize_short)  # T x 3 x H x W
        t1 = time.perf_counter()
        entry = JpegFrames.encode(frames)
        t2 = time.perf_counter()
        decode_s, encode_s = decode_s + t1 - t0, encode_s + t2 - t1
        n, _, h, w = frames.shape
        back = entry.clip(list(range(n)))
        err_sum += float((back.to(torch.int16) - frames.to(torch.int16)).abs().sum())
        pixels += frames.numel()
        raw += frames.numel()
        jpeg += entry.nbytes
        worst_ratio = min(worst_ratio, frames.numel() / entry.nbytes)
        sizes = np.diff(entry.offsets)
        max_bpp = max(max_bpp, float(sizes.max()) / (h * w))
        min_frame = min(min_frame, float(sizes.min()))
    estimate = estimate_cache_bytes([VideoRecord(p, "x") for p in paths], pre.resize_short, cache_format="jpeg")
    n = len(paths)
    return {"videos": n, "raw_mb": raw / n / 1e6, "jpeg_mb": jpeg / n / 1e6, "ratio": raw / jpeg, "worst": worst_ratio,
            "mae": err_sum / pixels, "max_bpp": max_bpp, "min_frame": min_frame, "estimate": estimate / jpeg,
            "decode_s": decode_s / n, "encode_s": encode_s / n}


# -- 2. codecs per clip ----------------------------------------------------------------


def codec_table(paths: list[Path], pre, repeat: int) -> dict[str, float]:
    """Milliseconds per clip for each way of getting a clip's frames, alone and with the training crop."""
    import warnings

    import numpy as np
    import torch
    from PIL import Image

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec (TorchCodec replaces it)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    from vtransfer.data.decode import read_video
    from vtransfer.data.frame_cache import JpegFrames
    from vtransfer.data.transforms import train_clip_transform

    videos = []
    for p in paths:
        frames = read_video(p, short_side=pre.resize_short).permute(0, 2, 3, 1).numpy()  # N x H x W x 3
        entry = JpegFrames.encode(frames)
        videos.append((frames, entry, [bytes(entry.stream(i)) for i in range(len(entry))]))
    rng = random.Random(0)
    plans = []
    for _ in range(16):
        v = rng.randrange(len(videos))
        n = len(videos[v][1])
        start = rng.randrange(max(1, n - (pre.frames - 1) * pre.stride))
        plans.append((v, [min(start + i * pre.stride, n - 1) for i in range(pre.frames)]))
    crop = train_clip_transform(pre.crop_size)
    generator = torch.Generator().manual_seed(0)

    def raw(v, idx):
        return torch.from_numpy(np.ascontiguousarray(videos[v][0][idx])).permute(0, 3, 1, 2)

    def cache(v, idx):  # what the jpeg cache does: OpenCV imdecode of the clip's distinct frames, numpy-stacked
        return videos[v][1].clip(idx)

    def torchvision(v, idx):  # decode_jpeg on a list, numpy-stacked as the cache stacks
        decoded = decode_jpeg([torch.from_numpy(videos[v][1].stream(i)) for i in idx], mode=ImageReadMode.RGB)
        return torch.from_numpy(np.stack([d.permute(1, 2, 0).numpy() for d in decoded])).permute(0, 3, 1, 2)

    def pil(v, idx):
        out = [np.asarray(Image.open(io.BytesIO(videos[v][2][i])).convert("RGB")) for i in idx]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    readers = {"raw slice": raw, "jpeg opencv (the cache)": cache, "jpeg torchvision": torchvision, "jpeg PIL": pil}

    def run(fn, with_crop):
        def go():
            for v, idx in plans:
                clip = fn(v, idx)
                if with_crop:
                    crop(clip, generator)
        return go

    fns = {}
    for name, fn in readers.items():
        fns[(name, False)] = run(fn, False)
        fns[(name, True)] = run(fn, True)
    times = time_interleaved(fns, warmup=1, repeat=repeat)
    return {k: v / len(plans) * 1e3 for k, v in times.items()}


# -- 3. cached epoch -------------------------------------------------------------------


def epoch_table(paths: list[Path], pre, preset: str, repeat: int, model: bool, threads: int) -> dict[str, float]:
    """Seconds per top-layer-like epoch from a raw and a jpeg memory cache: the loader alone, and with the forward pass."""
    import torch
    from torch.utils.data import DataLoader

    from vtransfer.data.dataset import ClipDataset, collate_clips
    from vtransfer.data.frame_cache import CachedReader, DecodedFrameCache
    from vtransfer.data.records import VideoRecord
    from vtransfer.data.transforms import normalize_clips
    from vtransfer.models.registry import build_backbone

    records = [VideoRecord(p, "a") for p in paths]
    readers, fill = {}, {}
    for fmt in ("raw", "jpeg"):
        cache = DecodedFrameCache("memory", short_side=pre.resize_short, cache_format=fmt)
        t0 = time.perf_counter()
        cache.prefill([r.path for r in records], threads=threads)
        fill[fmt] = time.perf_counter() - t0
        readers[fmt] = CachedReader(cache)
    net = None
    if model:
        net = build_backbone("effnet3d", preset, num_classes=2, crop_size=list(pre.crop_size),
                             resize_short=pre.resize_short, frames=pre.frames, frame_stride=pre.stride).eval()

    def epoch(fmt, forward):
        ds = ClipDataset(records, {"a": 0}, pre, mode="train", fixed_views=VIEWS, reader=readers[fmt])

        def go():
            for batch in DataLoader(ds, batch_size=8, num_workers=0, collate_fn=collate_clips):
                if forward:
                    with torch.no_grad():
                        net(normalize_clips(batch["clip"], pre).contiguous(memory_format=torch.channels_last_3d))
        return go

    fns = {(fmt, False): epoch(fmt, False) for fmt in readers}
    times = time_interleaved(fns, warmup=1, repeat=repeat)
    if net is not None:
        fns = {(fmt, True): epoch(fmt, True) for fmt in readers}
        times.update(time_interleaved(fns, warmup=0, repeat=max(1, (repeat + 1) // 2)))
    clips = len(paths) * VIEWS
    out = {f"{fmt} fill s": fill[fmt] for fmt in fill}
    out.update({f"{fmt} {'+forward' if fwd else 'loader'}": t for (fmt, fwd), t in times.items()})
    out["clips"] = clips
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="folders of videos (default: synthetic videos)")
    parser.add_argument("--videos", type=int, default=None, help="videos per folder for the size table (default: all)")
    parser.add_argument("--clip-videos", type=int, default=4, help="videos per folder for the per-clip codec table")
    parser.add_argument("--epoch-videos", type=int, default=8, help="videos per folder for the epoch table")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--no-model", action="store_true", help="skip the epoch with the forward pass")
    args = parser.parse_args()
    prepare_process()  # as the command sets itself up before torch loads: OpenMP's waiting threads sleep, malloc kept
    threads = setup_threads(args.threads)
    print(f"bench_frame_cache: {load_line()}, torch threads {threads}")
    tmp = tempfile.TemporaryDirectory()
    if args.quick or not args.folders:
        datasets = {"synthetic": synthetic_videos(Path(tmp.name))}
        args.repeat = 1 if args.quick else args.repeat
    else:
        datasets = {f.name: videos_in(f, args.videos) for f in args.folders}
    model = not args.no_model and not args.quick
    for name, (preset, pre) in settings().items():
        print(f"\n== {name} settings: {pre.frames} frames, stride {pre.stride}, {pre.crop_size[0]} crop, "
              f"short side {pre.resize_short} ==")
        print(f"{'dataset':<14}{'videos':>7}{'raw MB/video':>14}{'jpeg MB/video':>15}{'raw/jpeg':>10}{'worst':>8}"
              f"{'MAE':>7}{'max B/px':>10}{'min frame B':>13}{'estimate/jpeg':>15}{'decode s/video':>16}{'encode s/video':>16}")
        for ds, paths in datasets.items():
            r = size_table(paths, pre)
            print(f"{ds:<14}{r['videos']:>7}{r['raw_mb']:>14.2f}{r['jpeg_mb']:>15.3f}{r['ratio']:>10.1f}{r['worst']:>8.1f}"
                  f"{r['mae']:>7.2f}{r['max_bpp']:>10.3f}{r['min_frame']:>13.0f}{r['estimate']:>15.2f}"
                  f"{r['decode_s']:>16.3f}{r['encode_s']:>16.3f}")
        for ds, paths in datasets.items():
            t = codec_table(paths[: args.clip_videos] if args.quick else videos_sample(paths, args.clip_videos), pre,
                            args.repeat)
            print(f"\n{ds}: ms per clip ({pre.frames} frames)      read   read+crop   read+crop vs raw")
            base = t[("raw slice", True)]
            for reader in dict.fromkeys(k[0] for k in t):
                print(f"  {reader:<34}{t[(reader, False)]:>7.2f}{t[(reader, True)]:>12.2f}"
                      f"{t[(reader, True)] / base:>17.2f}x")
        for ds, paths in datasets.items():
            e = epoch_table(videos_sample(paths, args.epoch_videos), pre, preset, args.repeat, model, threads)
            print(f"\n{ds}: top-layer-like epoch (effnet3d {preset}), {e['clips']} clips ({VIEWS} views x videos), batch 8, main process")
            print(f"  fill (prefill, {threads} threads): raw {e['raw fill s']:.2f} s, jpeg {e['jpeg fill s']:.2f} s")
            print(f"  loader only:  raw {e['raw loader']:.2f} s, jpeg {e['jpeg loader']:.2f} s, "
                  f"ratio jpeg/raw: {e['jpeg loader'] / e['raw loader']:.2f}")
            if "raw +forward" in e:
                print(f"  + forward:    raw {e['raw +forward']:.2f} s, jpeg {e['jpeg +forward']:.2f} s, "
                      f"ratio jpeg/raw: {e['jpeg +forward'] / e['raw +forward']:.2f}")
    tmp.cleanup()
    print(f"\nend: {load_line()}")
    print(rss_line())


def videos_sample(paths: list[Path], count: int) -> list[Path]:
    """``count`` of ``paths`` spread over the list (all classes)."""
    if len(paths) <= count:
        return paths
    step = len(paths) / count
    return [paths[int(i * step)] for i in range(count)]


if __name__ == "__main__":
    main()
