"""Does vtransfer degrade fairly on a busy CPU? The demo's comparison alone, then beside busy processes.

Makes the demo's target dataset once (``vtransfer/data/demo.py`` with
``DEMO_SETTINGS``), then times only the compare step (``compare-policies``
with the demo's settings, after its imports) twice, each in a fresh process
that prepares its environment exactly as the ``vtransfer`` command does (so
OpenMP variables set before ``import torch`` count): first alone, then beside ``--busy``
processes (default 2) that spin in pure Python, started and killed by this
script. It prints both wall times, their ratio, the fair-share ratio
(cores + busy) / cores, the load average before and after each run and the
thread settings each run had in effect.

    python benchmarks/bench_contention.py                       # the whole demo comparison: minutes
    python benchmarks/bench_contention.py --epochs 2 --policies top-3,all
    python benchmarks/bench_contention.py --raw-env             # without the CLI's OpenMP defaults
    python benchmarks/bench_contention.py --env GOMP_SPINCOUNT=10000 --threads 2
    python benchmarks/bench_contention.py --quick               # seconds, for the test suite

Absolute times on a shared machine are noise; the ratio of the two runs is
what this script is for, and it still depends on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import base_parser, cpu_count, rss_line

RESULT_TAG = "RESULT "
# Imported before the clock starts, so that the timed compare step is the work itself: these imports take
# seconds, single-threaded, whatever the thread settings (the startup cost is measured on its own).
WARM_IMPORTS = ("vtransfer.api", "vtransfer.engine.feature_cache", "vtransfer.engine.trainer", "vtransfer.reporting.report",
                "vtransfer.reporting.policy_report", "vtransfer.reporting.plots", "sklearn.metrics", "torchvision")
TARGET_SLOWDOWN = 3.5
SPIN = "while True:\n    pass\n"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_data(root: Path, quick: bool) -> dict:
    """Write the demo's target dataset under ``root``; return the ``api.compare_policies`` arguments to run on it."""
    from vtransfer.data.demo import make_demo
    from vtransfer.demo import DEMO_SETTINGS

    s = dict(DEMO_SETTINGS)
    if quick:
        s.update(target_videos_per_class=3, demo_frames=12, demo_size=32, frames=4, size=32, epochs=1,
                 clips_per_video=1, val_clips=1, policies=["top-layer"], target_ratios=[0.34, 0.33, 0.33])
    target = root / "target"
    make_demo(target, class_set="target", videos_per_class=s["target_videos_per_class"], frames=s["demo_frames"],
              size=s["demo_size"], clutter=s["clutter"], seed=s["seed"] + 1, overwrite=True)
    return dict(data=str(target), categories=str(target / "categories.csv"), backbone=s["backbone"],
                   preset=s["preset"], weights=s["weights"], policies=s["policies"], seeds=[s["seed"]],
                   epochs=s["epochs"], ratios=s["target_ratios"], frames=s["frames"], stride=s["stride"], size=s["size"],
                   batch_size=s["batch_size"], clips_per_video=s["clips_per_video"], val_clips=s["val_clips"], patience=0)


def child(spec: dict) -> None:
    """Run one compare step as the CLI would and print its wall time and thread settings as JSON."""
    if not spec.pop("raw_env"):
        from vtransfer.cli import prepare_process

        prepare_process()
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from vtransfer import api
    from vtransfer.utils.runtime import thread_settings

    t0 = time.perf_counter()
    api.compare_policies(**spec)
    wall = time.perf_counter() - t0
    print(RESULT_TAG + json.dumps({"wall_s": wall, **thread_settings()}), flush=True)


def timed_run(spec: dict, env: dict[str, str]) -> dict:
    """Run :func:`child` in a fresh process; return its result with the load average before and after."""
    before = _load()
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    after = _load()
    if r.returncode != 0:
        raise SystemExit(f"compare step failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith(RESULT_TAG))
    return {**json.loads(line[len(RESULT_TAG):]), "load_before": before, "load_after": after}


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one CPU busy in a pure-Python loop."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    """Kill and reap the busy processes."""
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _settings(r: dict) -> str:
    keys = ("intra_op_threads", "interop_threads", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    return ", ".join(f"{k}={r.get(k)}" for k in keys)


def main() -> None:
    """Time the compare step alone and beside busy processes; print the ratio against the fair share."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per policy (default: the demo's)")
    parser.add_argument("--policies", default=None, help="comma-separated policies (default: the demo's five)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the demo's seed)")
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the second run (default 2)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment variable for both runs (repeatable)")
    parser.add_argument("--raw-env", action="store_true",
                        help="do not apply the CLI's OpenMP defaults (vtransfer.utils.runtime.THREAD_ENVIRONMENT)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one timed run
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    env = dict(os.environ)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    cores = cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec = make_data(Path(tmp) / "data", args.quick)
        print(f"demo data made in {time.perf_counter() - t0:.1f}s (not timed below)")
        if args.epochs:
            spec["epochs"] = args.epochs
        if args.policies:
            spec["policies"] = [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.seeds:
            spec["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.threads:
            spec["threads"] = args.threads
        spec["raw_env"] = args.raw_env
        print(f"compare step: {spec['backbone']} {spec['preset']}, policies {','.join(spec['policies'])}, "
              f"{spec['epochs']} epoch(s), seeds {spec['seeds']}; {cores} CPUs; extra env {args.env or 'none'}"
              f"{'; raw environment' if args.raw_env else ''}")
        alone = timed_run({**spec, "out": str(Path(tmp) / "alone")}, env)
        print(f"alone:             {alone['wall_s']:7.1f}s  load {alone['load_before']} -> {alone['load_after']}")
        print(f"  settings: {_settings(alone)}")
        busy = start_busy(args.busy)
        try:
            time.sleep(0.5)  # let the busy processes get going
            loaded = timed_run({**spec, "out": str(Path(tmp) / "loaded")}, env)
        finally:
            stop_busy(busy)
        print(f"beside {args.busy} busy:     {loaded['wall_s']:7.1f}s  load {loaded['load_before']} -> {loaded['load_after']}")
        print(f"  settings: {_settings(loaded)}")
    fair = (cores + args.busy) / cores
    ratio = loaded["wall_s"] / alone["wall_s"]
    print(f"slowdown loaded/alone: {ratio:.2f}x  (fair share (cores+{args.busy})/cores = {fair:.2f}x; "
          f"target <= {TARGET_SLOWDOWN}x)")
    print(rss_line(include_children=True))


if __name__ == "__main__":
    main()
