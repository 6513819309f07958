"""How vtransfer's cost scales: the malloc tuning (default), and the cost curve over dataset sizes (``--curve``).

**The malloc tuning** (the default mode): does it take the kernel's share of
CPU time out? One run with glibc's defaults, one tuned.

glibc maps every allocation above 32 MiB fresh and unmaps it on free, so each
batch's activations (about 100 MB at 224 px) cost the kernel a zero-fill of
every page: about half of a run's CPU time was system time (issue 23).
:mod:`vtransfer.utils.allocator` sets ``mallopt`` so that large blocks reuse
the heap's freed memory. This script runs one fixed ``vtransfer
compare-policies`` command twice, each in a fresh process started as a user
starts it (``python -m vtransfer``, from the repository root): first with
``VTRANSFER_MALLOC=default`` (glibc's defaults), then with the tool's
tuning. For each run it prints wall, user and system seconds, the system
share of CPU time, minor page faults and peak RSS (``os.wait4`` of the
child: its own figures and its DataLoader workers'), the load average before
and after, and then the ratios tuned/default, the targets, and whether the
two runs' results are identical: the test accuracies (the script exits 1
when they differ), every test video's scores, the training curves and the
trained weights.

    python benchmarks/bench_scale.py                                  # ../shared/data/real_actions, ~6 min on 2 cores
    python benchmarks/bench_scale.py DATA --policies top-layer,top-3,attentive-probe --seeds 0
    python benchmarks/bench_scale.py --finetune all --epochs 2        # backpropagation through the whole network
    python benchmarks/bench_scale.py --tuned-env MALLOC_TOP_PAD_=1073741824   # measure other settings
    python benchmarks/bench_scale.py --quick                          # a tiny generated dataset: a minute

The default workload is ``compare-policies DATA --backbone effnet3d --weights
effnet3d:imagenet --policies top-layer,top-3 --seeds 0`` (outputs in a
temporary folder). ``--repeat N`` alternates the two variants N times so that
load changes hit both alike. Absolute times on a shared machine are noise;
the load average is printed with them.

**The cost curve** (``--curve``): does a run's cost grow linearly with the
number of videos, and would UCF-101 fit this machine? For each dataset size
it writes a synthetic UCF-101-like dataset with ``vtransfer make-demo`` (the
``all`` set, 23 classes, ``-n round(N/23)``, 320x240, 125 frames at 25 fps:
5 s a video; not timed), or takes the folders given with ``--data`` (each one
size: the videos found there). Then, each in a fresh process from the
repository root, it runs the default workload

    compare-policies DATA --backbone effnet3d --weights effnet3d:imagenet
        --policies top-layer,top-3,attentive-probe --seeds 0 --max-memory 8G --out OUT

and one epoch of the ``all`` policy (the same with ``--policies all --epochs
1``). ``--cache`` stays the tool's default unless given. Per size and run,
and their sum, it prints wall seconds, seconds per video, peak RSS
(``ru_maxrss`` from ``os.wait4``), the peak of the memory the budget counts
(``RssAnon + RssShmem``, sampled every 0.2 s), the peak disk taken (the fall
in free space of the work folder's file system, sampled likewise), the system
share of CPU time and the load average before -> after; then the slopes
between successive sizes (extra seconds and MiB per extra video); the three
targets with PASS/FAIL (peak RSS grows at most 1.5x from the smallest to the
largest size; seconds per video within 20% across sizes, max/min <= 1.2;
the largest size's peak anonymous memory within the budget; every policy's
throughput at least 70% of its slowest part's rate alone); and a linear
extrapolation to UCF-101 (13,320 clips of 7.2 s mean) of the time (per-video
slope scaled by the video length), memory and disk, against this machine's
MemTotal and the work folder's free disk.
Between the table and the slopes it prints where each policy's run spent its
wall time, by phase (decoding, optical flow, frozen prefix, training,
scoring, report videos; each run's ``times.json``), with the clips per second
its frozen-prefix phase reached; then each policy's run **against the limit**.
Before the timed runs, ``bench_parts.py`` measures each part alone on the
smallest dataset (PyAV decoding in frames per second on every core; per
policy, its frozen prefix's forward pass and its training step in clips per
second). Per run and part it prints the rate the run reached in that part, the
rate alone, and the seconds the run's work in that part would take alone
(decoding: every frame of the dataset; prefix: the clips it ran, from the
groups another policy's stored outputs leave off at; training: the clips
trained). The slowest part is the one whose work takes longest alone, and the
run's throughput as a fraction of that part's rate is those seconds over the
run's wall time (target: at least 70% for every policy at the largest size).

    python benchmarks/bench_scale.py --curve --work ../bench-scale   # 92, 391, 1610 videos (100, 400, 1600 asked); datasets kept and reused
    python benchmarks/bench_scale.py --curve --videos 100,400 --budget 6G
    python benchmarks/bench_scale.py --curve --data ucf101-100 --data ucf101-400   # your folders, one size each
    python benchmarks/bench_scale.py --curve --quick                  # sizes 12, 24 of tiny videos, effnet3d tiny: a few minutes

``--work DIR`` keeps the datasets and run folders there and reuses a dataset
made earlier with the same settings (default: a temporary folder). With
``--quick`` the datasets are make-demo's target set (6 classes) with 16
frames of 48x48, the model effnet3d's tiny preset without pretrained weights
and ``--clips-per-video 2``, and both runs take one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, base_parser, load_line, make_demo, rss_line, run_child

from vtransfer.utils import allocator

DEFAULT_DATA = REPO.parent / "shared" / "data" / "real_actions"
TARGET_SYS_SHARE = 0.10
TARGET_RSS_RATIO = 1.3
VARIANTS = ("default", "tuned")

CURVE_SIZES = "100,400,1600"
CURVE_QUICK_SIZES = "12,24"
CURVE_POLICIES = "top-layer,top-3,attentive-probe"
CURVE_BUDGET = "8G"
CURVE_DEMO = ["--set", "all", "--size", "320x240", "--fps", "25", "--frames", "125"]
CURVE_QUICK_DEMO = ["--set", "target", "--frames", "16", "--size", "48"]
TARGET_RSS_GROWTH = 1.5
TARGET_TIME_SPREAD = 1.2
UCF101_CLIPS = 13_320
UCF101_SECONDS = 7.2
SUM = "sum"
LIMIT_PARTS = ("decode", "prefix", "training")
TARGET_OF_SLOWEST = 0.70


# -- the malloc tuning (the default mode) ---------------------------------------------------------------------------


def _env_items(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` items of ``--tuned-env`` as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--tuned-env wants NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def results(out: Path) -> dict[str, dict]:
    """Per test report under run folder ``out`` (one per policy): its accuracies, every test video's scores and
    the training curve (epoch times left out)."""
    found = {}
    for path in sorted(out.rglob("report.json")):
        report = json.loads(path.read_text())
        found[str(path.parent.parent.relative_to(out))] = {
            "summary": report["summary"],
            "scores": [(p.get("name"), p.get("top")) for p in report.get("predictions", [])],
            "history": [{k: v for k, v in h.items() if k != "time_s"} for h in report.get("history", [])],
        }
    return found


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same names and bit-identical tensors."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def weights_equal(a: Path, b: Path) -> str:
    """Whether every policy's ``model.safetensors`` under run folders ``a`` and ``b`` holds bit-identical tensors."""
    names = sorted(p.relative_to(a) for p in a.rglob("model.safetensors"))
    if not names:
        return "n/a (no model files)"
    same = [n for n in names if (b / n).is_file() and _same_tensors(a / n, b / n)]
    return f"{'yes' if len(same) == len(names) else 'NO'}: {len(same)} of {len(names)} models' tensors bit-identical"


def _row(name: str, r: dict) -> str:
    """One line of the malloc table."""
    cpu = r["user"] + r["sys"]
    share = r["sys"] / cpu if cpu else 0.0
    return (f"{name:<8} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:8.1f} {100 * share:8.1f}% "
            f"{r['faults'] / 1e6:9.2f}M {r['rss_mib']:10.0f}   {r['load']}")


def _median(runs: list[dict], key: str) -> float:
    """The median of ``key`` over ``runs``."""
    return statistics.median(r[key] for r in runs)


def make_quick_data(root: Path) -> Path:
    """A tiny make-demo dataset (the target set, 4 videos a class at 112x112), written by the CLI."""
    data = root / "demo"
    make_demo(data, ["--set", "target", "-n", "4", "--frames", "20", "--size", "112"])
    return data


def malloc_benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Run the workload with glibc's malloc defaults and tuned; print the table, the ratios and the accuracy check.

    Returns whether every run gave the same test accuracies.
    """
    base_env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
    envs = {"default": {**base_env, allocator.ENV_VAR: "default"}, "tuned": {**base_env, **_env_items(args.tuned_env)}}
    wanted, why = allocator.decide(envs["tuned"])
    tuned_settings = " ".join(f"{k}={v}" for k, v in allocator.MALLOC_SETTINGS.items())
    print(f"tuned run: {tuned_settings if wanted else why}"
          f"{'; extra env ' + ' '.join(args.tuned_env) if args.tuned_env else ''}"
          f"; glibc: {allocator.glibc_version() or 'no (the tuning does nothing here)'}")

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp_name:
        tmp = Path(tmp_name)
        if args.finetune:
            command, options = "finetune", ["--policy", args.finetune, "--seed", args.seeds.split(",")[0]]
        else:
            command, options = "compare-policies", ["--policies", args.policies or "top-layer,top-3",
                                                    "--seeds", args.seeds]
        options += ["--backbone", args.backbone]
        if args.quick:
            t0 = time.perf_counter()
            data = make_quick_data(tmp)
            print(f"demo data made in {time.perf_counter() - t0:.1f}s (not timed below)")
            options += ["--preset", args.preset or "tiny", "--epochs", str(args.epochs or 1), "--clips-per-video", "1",
                        "--val-clips", "1"]
            if args.weights:
                options += ["--weights", args.weights]
        else:
            data = (args.data or DEFAULT_DATA).resolve()
            if not data.exists():
                parser.error(f"dataset folder {data} does not exist (give one, or --quick)")
            weights = args.weights or ("effnet3d:imagenet" if args.backbone == "effnet3d" else None)
            options += ["--weights", weights] if weights else []
            options += ["--preset", args.preset] if args.preset else []
            options += ["--epochs", str(args.epochs)] if args.epochs else []
        if args.threads:
            options += ["--threads", str(args.threads)]
        print(f"workload: python -m vtransfer {command} {data} {' '.join(options)} --out TMP/<run>")

        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        print(f"\n{'run':<8} {'wall s':>8} {'user s':>8} {'sys s':>8} {'sys/CPU':>9} {'minflt':>10} {'peak MiB':>10}   "
              f"load before -> after")
        for i in range(max(1, args.repeat)):
            for variant in VARIANTS:
                out = tmp / f"{variant}-{i}"
                argv = [sys.executable, "-m", "vtransfer", command, str(data), *options, "--out", str(out)]
                r = run_child(argv, tmp / f"{variant}-{i}.log", env=envs[variant])
                r["out"] = out
                runs[variant].append(r)
                print(_row(variant, r), flush=True)

        off, on = runs["default"], runs["tuned"]
        ratio = {k: _median(on, k) / _median(off, k) if _median(off, k) else float("nan")
                 for k in ("wall", "user", "sys", "faults", "rss_mib")}
        cpu_ratio = (_median(on, "user") + _median(on, "sys")) / (_median(off, "user") + _median(off, "sys"))
        print(f"\ntuned/default (medians): wall {ratio['wall']:.2f}x, user {ratio['user']:.2f}x, "
              f"system {ratio['sys']:.3f}x, CPU {cpu_ratio:.2f}x, minor faults {ratio['faults']:.3f}x, "
              f"peak RSS {ratio['rss_mib']:.2f}x")

        share = _median(on, "sys") / (_median(on, "user") + _median(on, "sys"))
        found = [results(r["out"]) for r in off + on]
        acc = [{k: v["summary"] for k, v in f.items()} for f in found]
        same = bool(acc[0]) and all(a == acc[0] for a in acc)
        same_scores = all(f == found[0] for f in found)
        print(f"targets: tuned system share {100 * share:.1f}% of CPU (<= {100 * TARGET_SYS_SHARE:.0f}%: "
              f"{'met' if share <= TARGET_SYS_SHARE else 'NOT met'}); peak RSS {ratio['rss_mib']:.2f}x "
              f"(<= {TARGET_RSS_RATIO}x: {'met' if ratio['rss_mib'] <= TARGET_RSS_RATIO else 'NOT met'}); "
              f"same accuracies: {'yes' if same else 'NO'}")
        print(f"same test scores of every video and training curves: {'yes' if same_scores else 'NO'}; "
              f"same trained weights (first runs): {weights_equal(off[0]['out'], on[0]['out'])}")
        for policy, values in acc[0].items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, (int, float)))
            print(f"  {policy}: {shown}")
        if not same:
            for variant, a in zip(["default"] * len(off) + ["tuned"] * len(on), acc):
                print(f"  {variant}: {a}")
    return same


# -- the cost curve (--curve) ---------------------------------------------------------------------------------------


@dataclass
class Point:
    """One size of the cost curve: its dataset folder, video count, mean video length and each run's figures."""

    data: Path
    videos: int
    seconds: float
    data_bytes: int
    frames: int = 0
    runs: dict[str, dict] = field(default_factory=dict)

    def total(self) -> dict:
        """The runs together: times summed, memory and disk the largest peak, load from the first to the last."""
        runs = list(self.runs.values())
        return {"wall": sum(r["wall"] for r in runs), "user": sum(r["user"] for r in runs),
                "sys": sum(r["sys"] for r in runs), "rss_mib": max(r["rss_mib"] for r in runs),
                "anon_mib": max(r["anon_mib"] for r in runs), "disk_mib": max(r["disk_mib"] for r in runs),
                "load": f"{runs[0]['load'].split(' -> ')[0]} -> {runs[-1]['load'].split(' -> ')[1]}"}

    def figures(self) -> dict[str, dict]:
        """Each run's figures and, last, their :meth:`total` under ``sum``."""
        return {**self.runs, SUM: self.total()}


def meminfo_mib(key: str) -> float:
    """A line of ``/proc/meminfo`` (``MemTotal``, ``MemAvailable``) in MiB; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def budget_mib(text: str) -> float:
    """``--max-memory`` as the tool reads it, in MiB (a fraction of the memory available now, as a run takes it)."""
    from vtransfer.utils.memory_budget import parse_max_memory

    value = parse_max_memory(text)
    return value * meminfo_mib("MemAvailable") if isinstance(value, float) else value / 2**20


def list_videos(data: Path) -> list[Path]:
    """The video files under ``data`` (by extension, as the tool recognises them), sorted."""
    from vtransfer.data.sniff import VIDEO_EXTENSIONS

    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def describe(data: Path) -> Point:
    """A :class:`Point` for dataset folder ``data``: its videos, their mean length (headers only) and bytes."""
    from vtransfer.data.decode import probe_video

    videos = list_videos(data)
    if not videos:
        raise SystemExit(f"{data}: no video files found")
    infos = [probe_video(v) for v in videos]
    return Point(data=data, videos=len(videos), seconds=statistics.fmean(i.duration for i in infos),
                 data_bytes=sum(v.stat().st_size for v in videos), frames=sum(i.num_frames for i in infos))


def demo_options(size: int, quick: bool) -> list[str]:
    """make-demo options for about ``size`` videos: ``-n`` is ``size`` over the class count of the set, rounded."""
    from vtransfer.data.demo import resolve_classes

    options = CURVE_QUICK_DEMO if quick else CURVE_DEMO
    classes = len(resolve_classes(options[options.index("--set") + 1]))
    return [*options, "-n", str(max(1, round(size / classes)))]


def curve_dataset(root: Path, size: int, quick: bool) -> Path:
    """The make-demo dataset of about ``size`` videos under ``root``, written unless made there with these options.

    ``root/<name>.json`` records the options of a finished dataset; a folder without it (an interrupted earlier
    attempt) is written again with ``--overwrite``, which make-demo only accepts on its own folders.
    """
    data = root / f"{'quick' if quick else 'ucf-like'}-{size}"
    marker = root / f"{data.name}.json"
    options = demo_options(size, quick)
    if marker.is_file() and json.loads(marker.read_text()).get("options") == options and data.is_dir():
        print(f"{data}: reused (made earlier with make-demo {' '.join(options)})")
        return data
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    make_demo(data, [*options, "--overwrite"] if data.exists() else options)
    marker.write_text(json.dumps({"options": options}))
    print(f"{data}: made in {time.perf_counter() - t0:.1f}s with make-demo {' '.join(options)} (not timed below)",
          flush=True)
    return data


def curve_points(args: argparse.Namespace, root: Path, parser: argparse.ArgumentParser) -> list[Point]:
    """The datasets of the curve, smallest first: the ``--data`` folders, or make-demo datasets of ``--videos``."""
    folders = args.curve_data or ([args.data] if args.data else [])
    if folders and args.videos:
        parser.error("--videos makes datasets; with --data the sizes are the folders' own")
    if not folders:
        try:
            sizes = [int(v) for v in (args.videos or (CURVE_QUICK_SIZES if args.quick else CURVE_SIZES)).split(",")]
        except ValueError:
            parser.error(f"--videos {args.videos!r}: expected sizes like 100,400,1600")
        folders = [curve_dataset(root, n, args.quick) for n in sorted(set(sizes))]
    for folder in folders:
        if not folder.is_dir():
            parser.error(f"dataset folder {folder} does not exist")
    points = sorted((describe(folder.resolve()) for folder in folders), key=lambda p: p.videos)
    counts = [p.videos for p in points]
    if len(set(counts)) < len(counts):
        parser.error(f"the datasets hold {', '.join(map(str, counts))} videos: each size must differ")
    return points


def curve_model(args: argparse.Namespace) -> list[str]:
    """The model options of both runs: effnet3d from ImageNet by default; ``--quick``: its tiny preset, no weights."""
    options = ["--backbone", args.backbone]
    weights = args.weights or ("effnet3d:imagenet" if args.backbone == "effnet3d" and not args.quick else None)
    options += ["--weights", weights] if weights else []
    preset = args.preset or ("tiny" if args.quick else None)
    options += ["--preset", preset] if preset else []
    return options + (["--clips-per-video", "2"] if args.quick else [])


def curve_runs(args: argparse.Namespace, budget: str) -> dict[str, list[str]]:
    """Each run's ``compare-policies`` options after DATA, up to ``--out``: the comparison, then one epoch of all."""
    model = curve_model(args)
    epochs = ["--epochs", "1"] if args.quick else (["--epochs", str(args.epochs)] if args.epochs else [])
    tail = ["--seeds", args.seeds, "--max-memory", budget]
    tail += ["--cache", args.cache] if args.cache else []
    tail += ["--threads", str(args.threads)] if args.threads else []
    return {"compare": [*model, "--policies", args.policies or CURVE_POLICIES, *epochs, *tail],
            "all-1ep": [*model, "--policies", "all", "--epochs", "1", *tail]}


def measure(point: Point, runs: dict[str, list[str]], root: Path) -> None:
    """Run each of ``runs`` on ``point``'s dataset in a fresh process; print a table row per run and their sum."""
    for name, options in runs.items():
        out = root / "runs" / f"{point.videos}-{name}"
        if out.exists():
            shutil.rmtree(out)  # this script's own run folder from an earlier invocation
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "vtransfer", "compare-policies", str(point.data), *options, "--out", str(out)]
        point.runs[name] = run_child(argv, out.parent / f"{out.name}.log", disk=root)
        print(curve_row(point.videos, name, point.runs[name]), flush=True)
    print(curve_row(point.videos, SUM, point.total()), flush=True)


CURVE_HEADER = (f"{'videos':>6} {'run':<8} {'wall s':>8} {'s/video':>8} {'RSS MiB':>8} {'anon MiB':>9} "
                f"{'disk MiB':>9} {'sys/CPU':>8}   load before -> after")


def curve_row(videos: int, name: str, r: dict) -> str:
    """One line of the curve's table."""
    cpu = r["user"] + r["sys"]
    share = r["sys"] / cpu if cpu else 0.0
    return (f"{videos:>6} {name:<8} {r['wall']:8.1f} {r['wall'] / videos:8.3f} {r['rss_mib']:8.0f} "
            f"{r['anon_mib']:9.0f} {r['disk_mib']:9.0f} {100 * share:7.1f}%   {r['load']}")


def slope(a: Point, b: Point, name: str, key: str) -> float:
    """Extra ``key`` (seconds, MiB) per extra video of run ``name`` from size ``a`` to size ``b``."""
    return (b.figures()[name][key] - a.figures()[name][key]) / (b.videos - a.videos)


def print_slopes(points: list[Point]) -> None:
    """The slopes between successive sizes, per run and for the sum."""
    print(f"\nslopes between successive sizes (extra per extra video):\n"
          f"{'videos':>13} {'run':<8} {'s/video':>8} {'RSS MiB':>8} {'anon MiB':>9} {'disk MiB':>9}")
    for a, b in zip(points, points[1:]):
        for i, name in enumerate(b.figures()):
            sizes = f"{a.videos} -> {b.videos}" if i == 0 else ""
            print(f"{sizes:>13} {name:<8} {slope(a, b, name, 'wall'):8.3f} {slope(a, b, name, 'rss_mib'):8.2f} "
                  f"{slope(a, b, name, 'anon_mib'):9.2f} {slope(a, b, name, 'disk_mib'):9.2f}")


def verdict(ok: bool) -> str:
    """``PASS`` or ``FAIL``."""
    return "PASS" if ok else "FAIL"


def print_targets(points: list[Point], budget: str, budget_in_mib: float, fractions: list[float]) -> None:
    """The targets with the measured values: RSS growth, time per video across sizes, the budget, and each policy's
    throughput against its slowest part's rate at the largest size (``fractions``)."""
    first, last = points[0].total(), points[-1].total()
    growth = last["rss_mib"] / first["rss_mib"]
    per_video = [p.total()["wall"] / p.videos for p in points]
    spread = max(per_video) / min(per_video)
    print(f"\ntargets (the sum of the runs; memory: the larger run's peak):\n"
          f"  peak RSS from {points[0].videos} to {points[-1].videos} videos: {first['rss_mib']:.0f} -> "
          f"{last['rss_mib']:.0f} MiB = {growth:.2f}x (<= {TARGET_RSS_GROWTH}x): {verdict(growth <= TARGET_RSS_GROWTH)}\n"
          f"  seconds per video across sizes: {', '.join(f'{s:.3f}' for s in per_video)}; max/min {spread:.3f} "
          f"(<= {TARGET_TIME_SPREAD}): {verdict(spread <= TARGET_TIME_SPREAD)}\n"
          f"  largest size ({points[-1].videos} videos) within the budget: peak anon {last['anon_mib']:.0f} MiB of "
          f"{budget_in_mib:.0f} MiB (--max-memory {budget}): {verdict(last['anon_mib'] <= budget_in_mib)}")
    if fractions:
        print(f"  throughput against the slowest part's rate alone at {points[-1].videos} videos, every policy: "
              f"{', '.join(f'{f:.0%}' for f in fractions)} (>= {TARGET_OF_SLOWEST:.0%}): "
              f"{verdict(min(fractions) >= TARGET_OF_SLOWEST)}")


def duration(seconds: float) -> str:
    """``12.3 h`` from an hour up, else ``4.5 min``."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def print_extrapolation(points: list[Point], budget: str, budget_in_mib: float, root: Path, quick: bool) -> None:
    """UCF-101's time, memory and disk extrapolated linearly from the two largest sizes, against this machine."""
    a, b = points[-2], points[-1]
    big = b.total()
    rate = {key: max(0.0, slope(a, b, SUM, key)) for key in ("wall", "rss_mib", "anon_mib", "disk_mib")}
    fixed = big["wall"] - rate["wall"] * b.videos
    stretch = UCF101_SECONDS / b.seconds
    seconds = fixed + rate["wall"] * stretch * UCF101_CLIPS
    more = UCF101_CLIPS - b.videos
    rss, anon, run_disk = (big[key] + rate[key] * more for key in ("rss_mib", "anon_mib", "disk_mib"))
    data_disk = b.data_bytes / (b.videos * b.seconds) * UCF101_SECONDS * UCF101_CLIPS / 2**20
    total_mib, free_mib = meminfo_mib("MemTotal"), shutil.disk_usage(root).free / 2**20
    print(f"\nextrapolation to UCF-101 ({UCF101_CLIPS:,} clips of {UCF101_SECONDS} s mean): LINEAR EXTRAPOLATIONS "
          f"along the line through\nthe two largest sizes ({a.videos} and {b.videos} videos), not measurements; "
          f"a negative slope (noise) counts as 0.")
    if quick:
        print("(--quick: sizes this small measure mostly fixed costs and noise; the numbers only show the arithmetic)")
    print(f"  time:   {fixed:.1f} s fixed + {rate['wall']:.3f} s per extra video of {b.seconds:.2f} s mean\n"
          f"          x {stretch:.2f} for UCF-101's {UCF101_SECONDS} s (assumes a video's cost grows in proportion to "
          f"its length:\n          decoding does, the clips sampled per video do not, so likely an overestimate) = "
          f"{rate['wall'] * stretch:.3f} s per video\n"
          f"          -> {duration(seconds)} for {UCF101_CLIPS:,} clips at this machine's load")
    print(f"  memory: per video, not scaled by length: peak RSS {rss / 1024:.1f} GiB, peak anon {anon / 1024:.1f} GiB\n"
          f"          this machine's MemTotal {total_mib / 1024:.1f} GiB: RSS "
          f"{'fits' if rss <= total_mib else 'does NOT fit'}\n"
          f"          anon {'within' if anon <= budget_in_mib else 'above'} --max-memory {budget} "
          f"({budget_in_mib / 1024:.1f} GiB)"
          + ("" if anon <= budget_in_mib else ": the budget would have to act (feature stores to memory-mapped "
             "files),\n          which a straight line does not model"))
    print(f"  disk:   the runs' peak {run_disk / 1024:.1f} GiB + a dataset like this one at {UCF101_SECONDS} s a video "
          f"{data_disk / 1024:.1f} GiB = {(run_disk + data_disk) / 1024:.1f} GiB\n"
          f"          free in {root}: {free_mib / 1024:.1f} GiB: "
          f"{'fits' if run_disk + data_disk <= free_mib else 'does NOT fit'}")


BREAKDOWN = ("decode", "flow", "prefix", "training", "scoring", "report videos")


def run_times(out: Path) -> dict[str, dict]:
    """Each policy's ``times.json`` (:mod:`vtransfer.utils.phase_times`) under comparison folder ``out``, by policy."""
    return {str(t.parent.relative_to(out)): json.loads(t.read_text()) for t in sorted(out.rglob("times.json"))}


def print_breakdown(points: list[Point], root: Path, runs: dict[str, list[str]]) -> None:
    """Per size and policy: the share of wall time in each phase of the run (its ``times.json``) and the clips per
    second its frozen-prefix phase reached."""
    print("\nwhere the time went (each run's times.json; shares of its wall time; 'prefix' includes reading the "
          "clips it waits for and the scoring's frozen layers; a policy's prefix is as deep as its frozen layers, "
          "and top-layer's starts from top-3's stored outputs):")
    print(f"{'videos':>6} {'policy':<26} {'wall s':>7} " + " ".join(f"{n[:8]:>8}" for n in BREAKDOWN)
          + f" {'other':>6} {'prefix clips/s':>15}")
    for point in points:
        for name in runs:
            for policy, t in run_times(root / "runs" / f"{point.videos}-{name}").items():
                wall, phases = t["wall_s"] or 1e-9, t["phases_s"]
                clips, seconds = t.get("units", {}).get("prefix", 0), phases.get("prefix", 0.0)
                speed = f"{clips / seconds:.1f}" if clips and seconds else "-"
                print(f"{point.videos:>6} {policy[:26]:<26} {wall:7.1f} "
                      + " ".join(f"{phases.get(n, 0.0) / wall:8.0%}" for n in BREAKDOWN)
                      + f" {t['other_s'] / wall:6.0%} {speed:>15}")


def measure_parts(args: argparse.Namespace, data: Path, root: Path) -> dict:
    """``bench_parts.py`` on ``data`` in a fresh process (before the timed runs): each part's rate alone."""
    out = root / "parts.json"
    policies = ",".join(dict.fromkeys([*(args.policies or CURVE_POLICIES).split(","), "all"]))
    argv = [sys.executable, str(Path(__file__).with_name("bench_parts.py")), str(data), "--backbone", args.backbone,
            "--policies", policies, "--json", str(out)]
    argv += ["--weights", args.weights] if args.weights else []
    argv += ["--preset", args.preset] if args.preset else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--quick"] if args.quick else []
    print(f"\neach part alone (python benchmarks/bench_parts.py {' '.join(argv[2:])}):", flush=True)
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_parts.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    print("  " + done.stdout.rstrip().replace("\n", "\n  "), flush=True)
    return json.loads(out.read_text())


def ideal_seconds(point: Point, times: dict, policy: dict, start: int, parts: dict,
                  checkpointed: bool = False) -> dict[str, tuple[float, float, float]]:
    """Per part of one policy's run: (seconds that part would take alone for the work the run gave it, the rate
    the run reached in that part, the rate alone). Decoding counts every frame of the dataset (the frame cache
    decodes whole videos); the prefix, the groups from ``start`` (a store another policy left) to the first
    trainable one; training, the clips trained, at the checkpointed step's rate when the run chose gradient
    checkpointing to fit its memory budget (its ``config.json``)."""
    phases, units = times["phases_s"], times.get("units", {})
    alone = parts["policies"].get(policy["policy"])
    out = {}
    if phases.get("decode", 0.0) >= 0.5 and point.frames:
        rate = parts["decode"]["frames_per_s"]
        out["decode"] = (point.frames / rate, point.frames / phases["decode"], rate)
    if alone and units.get("prefix") and phases.get("prefix"):
        per_clip = sum(alone["prefix_s_per_clip"][start:policy["first_trainable_group"]])
        if per_clip > 0:
            out["prefix"] = (units["prefix"] * per_clip, units["prefix"] / phases["prefix"], 1.0 / per_clip)
    if alone and units.get("training") and phases.get("training"):
        rate = (alone.get("train_clips_per_s_checkpointed") if checkpointed else None) or alone["train_clips_per_s"]
        out["training"] = (units["training"] / rate, units["training"] / phases["training"], rate)
    return out


def print_against_limit(points: list[Point], root: Path, runs: dict[str, list[str]], parts: dict) -> list[float]:
    """Each policy's run against its parts' rates alone: the end-to-end throughput as a fraction of the slowest
    part's own rate (that part's ideal time over the run's wall time). Returns the largest size's fractions."""
    print("\nagainst the limit: per part, the rate the run reached in it / the rate alone (bench_parts.py above) "
          "and the seconds the run's work in that part takes alone. The slowest part is the one whose work takes "
          "longest alone; the run's throughput as a fraction of that part's rate = those seconds / the run's wall. "
          "'parts' is all the measured parts in sequence / wall (scoring, report videos and setup are not parts).")
    print(f"{'videos':>6} {'policy':<18} {'wall s':>7} " + " ".join(f"{n:>26}" for n in LIMIT_PARTS)
          + f" {'slowest':>9} {'of rate':>8} {'parts':>6}")
    largest = []
    for point in points:
        for name in runs:
            folder = root / "runs" / f"{point.videos}-{name}"
            resolved = {p: json.loads((folder / p / "config.json").read_text())["resolved"] for p in run_times(folder)}
            plans = {p: r["policy"] for p, r in resolved.items()}
            for policy, t in run_times(folder).items():
                stop = plans[policy]["first_trainable_group"]
                start = max((q["first_trainable_group"] for q in plans.values()
                             if q["first_trainable_group"] < stop), default=0)
                checkpointed = bool(resolved[policy]["train"].get("grad_checkpointing"))
                ideal = ideal_seconds(point, t, plans[policy], start, parts, checkpointed)
                wall = t["wall_s"] or 1e-9
                cells = [f"{ideal[n][1]:.1f}/{ideal[n][2]:.1f}/s {ideal[n][0]:6.1f}s" if n in ideal else "-"
                         for n in LIMIT_PARTS]
                slowest = max(ideal, key=lambda n: ideal[n][0], default=None)
                share = ideal[slowest][0] / wall if slowest else float("nan")
                in_sequence = sum(v[0] for v in ideal.values()) / wall
                print(f"{point.videos:>6} {policy[:18]:<18} {wall:7.1f} " + " ".join(f"{c:>26}" for c in cells)
                      + f" {slowest or '-':>9} {share:8.0%} {in_sequence:6.0%}")
                if point is points[-1] and slowest:
                    largest.append(share)
    return largest


def cost_curve(args: argparse.Namespace, parser: argparse.ArgumentParser, budget_in_mib: float) -> None:
    """Make or take each dataset, measure each part alone, run the comparison and one epoch of all on each size;
    print the table, the parts against their limits, the slopes, targets and the extrapolation to UCF-101
    (``budget_in_mib``: the runs' ``--max-memory`` in MiB)."""
    budget = args.budget or CURVE_BUDGET
    with tempfile.TemporaryDirectory(prefix="bench_scale_curve_") as tmp_name:
        root = (args.work or Path(tmp_name)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        print(f"work folder: {root}{'' if args.work else ' (temporary)'}")
        points = curve_points(args, root, parser)
        runs = curve_runs(args, budget)
        parts = measure_parts(args, points[0].data, root)
        print("\nworkload, each in a fresh process:")
        for name, options in runs.items():
            print(f"  {name}: python -m vtransfer compare-policies DATA {' '.join(options)} --out OUT")
        print("datasets: " + "; ".join(f"{p.data.name}: {p.videos} videos of {p.seconds:.2f} s mean" for p in points))
        print(f"\n{CURVE_HEADER}")
        for point in points:
            measure(point, runs, root)
        print_breakdown(points, root, runs)
        fractions = print_against_limit(points, root, runs, parts)
        if len(points) < 2:
            print("\none size only: the slopes, the growth targets and the extrapolation need two "
                  "(more --videos, or --data twice)")
            return
        print_slopes(points)
        print_targets(points, budget, budget_in_mib, fractions)
        print_extrapolation(points, budget, budget_in_mib, root, args.quick)


# -- the command line -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of both modes (the curve's only with ``--curve``, the malloc benchmark's only without)."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=None,
                        help=f"dataset folder DATA/<class>/<video> (default: {DEFAULT_DATA}; ignored with --quick; "
                             "with --curve the same as --data)")
    parser.add_argument("--backbone", default="effnet3d")
    parser.add_argument("--weights", default=None, help="default: effnet3d:imagenet for effnet3d (none with --quick)")
    parser.add_argument("--preset", default=None, help="default: the backbone's (tiny with --quick)")
    parser.add_argument("--policies", default=None,
                        help=f"default: top-layer,top-3 (with --curve: {CURVE_POLICIES}, the first run's)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--finetune", metavar="POLICY", default=None,
                        help="run `vtransfer finetune --policy POLICY --seed <first seed>` instead of compare-policies "
                             "(e.g. all: backpropagation through the whole network)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the tool's own default (1 with --quick)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating (default 1)")
    parser.add_argument("--tuned-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the tuned run only (repeatable); glibc's own MALLOC_*_ variables "
                             "here take precedence over the tool's settings, to measure others")
    curve = parser.add_argument_group("cost curve", "the cost of a run against the number of videos")
    curve.add_argument("--curve", action="store_true", help="measure the cost curve instead of the malloc tuning")
    curve.add_argument("--videos", default=None,
                       help=f"dataset sizes to make, comma-separated (default {CURVE_SIZES}; --quick {CURVE_QUICK_SIZES})")
    curve.add_argument("--data", dest="curve_data", metavar="DIR", type=Path, action="append", default=[],
                       help="take this dataset folder as one size instead of making datasets (repeatable)")
    curve.add_argument("--work", metavar="DIR", type=Path, default=None,
                       help="keep datasets and run folders here and reuse datasets made earlier (default: temporary)")
    curve.add_argument("--budget", default=None, help=f"--max-memory of every run (default {CURVE_BUDGET})")
    curve.add_argument("--cache", default=None, help="--cache of every run (default: the tool's own)")
    return parser


def check_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float:
    """Refuse options of the other mode, so that none is silently ignored; with ``--curve``, check ``--budget``.

    Returns the curve's budget in MiB (0 without ``--curve``).
    """
    from vtransfer.utils.errors import ConfigError

    if args.curve:
        given = [o for o, on in (("--finetune", args.finetune), ("--tuned-env", args.tuned_env),
                                 ("--repeat", args.repeat != 1)) if on]
        if given:
            parser.error(f"{', '.join(given)}: options of the malloc benchmark, not of --curve")
        try:
            return budget_mib(args.budget or CURVE_BUDGET)
        except ConfigError as e:
            parser.error(str(e))
    else:
        given = [o for o, on in (("--videos", args.videos), ("--data", args.curve_data), ("--work", args.work),
                                 ("--budget", args.budget), ("--cache", args.cache)) if on]
        if given:
            parser.error(f"{', '.join(given)}: options of --curve")
    return 0.0


def main() -> None:
    """Run the malloc benchmark, or with ``--curve`` the cost curve; exit 1 when the malloc runs' accuracies differ."""
    parser = build_parser()
    args = parser.parse_args()
    budget_in_mib = check_mode(args, parser)
    print(load_line())
    same = True
    if args.curve:
        cost_curve(args, parser, budget_in_mib)
    else:
        same = malloc_benchmark(args, parser)
    print(rss_line(include_children=True))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
