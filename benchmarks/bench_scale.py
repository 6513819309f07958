"""Does the malloc tuning take the kernel's share of CPU time out? One run with glibc's defaults, one tuned.

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
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import base_parser, load_line, rss_line

from vtransfer.utils import allocator

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real_actions"
TARGET_SYS_SHARE = 0.10
TARGET_RSS_RATIO = 1.3
VARIANTS = ("default", "tuned")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _env_items(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--tuned-env wants NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def run_child(argv: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``argv`` from the repository root; return its stdout, rusage figures and the load before and after."""
    before = _load()
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                                 text=True) as proc:
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n"
                         f"{log.read_text()[-3000:]}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults": usage.ru_minflt,
            "rss_mib": usage.ru_maxrss / 1024, "stdout": stdout, "load": f"{before} -> {_load()}"}


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
    cpu = r["user"] + r["sys"]
    share = r["sys"] / cpu if cpu else 0.0
    return (f"{name:<8} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:8.1f} {100 * share:8.1f}% "
            f"{r['faults'] / 1e6:9.2f}M {r['rss_mib']:10.0f}   {r['load']}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def make_quick_data(root: Path) -> Path:
    """A tiny make-demo dataset (the target set, 4 videos a class at 112x112), written by the CLI."""
    data = root / "demo"
    argv = [sys.executable, "-m", "vtransfer", "make-demo", str(data), "--set", "target", "-n", "4", "--frames", "20",
            "--size", "112", "--seed", "1", "--json"]
    run_child(argv, dict(os.environ), root / "make-demo.log")
    return data


def main() -> None:
    """Run the workload with glibc's malloc defaults and tuned; print the table, the ratios and the accuracy check."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=None,
                        help=f"dataset folder DATA/<class>/<video> (default: {DEFAULT_DATA}; ignored with --quick)")
    parser.add_argument("--backbone", default="effnet3d")
    parser.add_argument("--weights", default=None, help="default: effnet3d:imagenet for effnet3d (none with --quick)")
    parser.add_argument("--preset", default=None, help="default: the backbone's (tiny with --quick)")
    parser.add_argument("--policies", default="top-layer,top-3")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--finetune", metavar="POLICY", default=None,
                        help="run `vtransfer finetune --policy POLICY --seed <first seed>` instead of compare-policies "
                             "(e.g. all: backpropagation through the whole network)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the tool's own default (1 with --quick)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating (default 1)")
    parser.add_argument("--tuned-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the tuned run only (repeatable); glibc's own MALLOC_*_ variables "
                             "here take precedence over the tool's settings, to measure others")
    args = parser.parse_args()
    print(load_line())

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
            command, options = "compare-policies", ["--policies", args.policies, "--seeds", args.seeds]
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
                r = run_child(argv, envs[variant], tmp / f"{variant}-{i}.log")
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
    print(rss_line(include_children=True))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
