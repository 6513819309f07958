"""Small helpers shared by the benchmark scripts in ``benchmarks/``.

Every script prints *ratios measured side by side in one run*: absolute
times on a shared machine are noise, but two variants timed alternately
under the same load compare fairly. The helpers here are:

* :func:`base_parser` - an ``argparse`` parser with ``--quick`` and ``--threads``;
* :func:`setup_threads` - apply ``--threads`` (default: every CPU we may use);
* :func:`median_time` / :func:`time_interleaved` - warm-up, then the median
  of N timed calls (interleaved across variants, so load changes hit all
  variants alike), by wall clock or by this process's CPU time;
* :func:`peak_rss_mib` / :func:`rss_line` - peak resident memory of the run
  (``resource.getrusage``), printed as the last line of every script;
* :func:`load_line` - the load average when the run started, so a reader can
  judge how busy the machine was;
* :func:`run_child` - run a command (``python -m vtransfer ...``) in a fresh
  process from the repository root, as a user starts it: its wall and CPU
  seconds and peak RSS (``os.wait4``), the peak of the memory a budget counts
  (:func:`anon_kib`, sampled), optionally the peak disk it took, and the load
  average before and after (:func:`load_now`);
* :func:`make_demo` - write a synthetic dataset with ``vtransfer make-demo``.

Scripts import it as ``from _common import ...`` (Python puts the script's
own folder first on ``sys.path``), so ``benchmarks/`` needs no package.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

RSS_LABEL = "peak memory (RSS)"
REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares: ``--quick`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repeats: seconds, for the test suite"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: every CPU this process may use)"
    )
    return parser


def cpu_count() -> int:
    """CPUs this process may use (respects the affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def setup_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None``: every available CPU) and return it."""
    import torch

    n = max(1, threads or cpu_count())
    torch.set_num_threads(n)
    return n


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of every thread of this process: time spent descheduled by
    # other users' jobs does not count. Only meaningful for work done in this
    # process (not DataLoader workers); with several threads it also counts
    # OpenMP threads spinning while they wait.
    "cpu": time.process_time,
}


def median_time(fn: Callable[[], object], warmup: int = 1, repeat: int = 5, clock: str = "wall") -> float:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then the median of ``repeat`` timed ones."""
    return time_interleaved({"fn": fn}, warmup, repeat, clock)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int = 1, repeat: int = 5, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each variant, timing them round-robin.

    Each round calls every variant once, so a burst of load from other users
    slows all variants alike and their ratio stays meaningful. ``clock`` is
    ``wall`` (elapsed time) or ``cpu`` (this process's CPU time, see :data:`CLOCKS`).
    """
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            t0 = now()
            fn()
            samples[name].append(now() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_rss_mib(include_children: bool = False) -> float:
    """Peak resident set size of this process in MiB (plus waited-for children's peak if asked).

    ``ru_maxrss`` is in KiB on Linux and bytes on macOS. The children's figure
    is the largest single child's peak, not a sum.
    """
    scale = 1.0 / (1024 * 1024) if sys.platform == "darwin" else 1.0 / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    if include_children:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale)
    return peak


def rss_line(include_children: bool = False) -> str:
    """The closing line every benchmark prints: ``peak memory (RSS): 123.4 MiB``."""
    return f"{RSS_LABEL}: {peak_rss_mib(include_children):.1f} MiB"


def load_line() -> str:
    """``load average: 1.23 0.98 0.75 (2 CPUs)`` from ``/proc/loadavg`` (``n/a`` where absent)."""
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "n/a"
    return f"load average: {load} ({cpu_count()} CPUs)"


def load_now() -> str:
    """The 1-, 5- and 15-minute load averages now, as ``1.23 0.98 0.75``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def anon_kib(pid: int) -> int:
    """What a memory budget counts of process ``pid``, in KiB: ``RssAnon + RssShmem`` of ``/proc/PID/status``.

    File pages (memory-mapped feature stores, the page cache) are left out: the kernel can drop them. 0 when the
    process is gone or the file is unreadable (not Linux).
    """
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


def _free_bytes(path: Path) -> int:
    """Free bytes of the file system holding ``path`` (0 where it cannot be read)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def run_child(argv: list[str], log: Path, env: dict[str, str] | None = None, disk: Path | None = None) -> dict:
    """Run ``argv`` from the repository root (stderr to ``log``) and measure it; exit with its output if it fails.

    Returns its stdout and: ``wall``, ``user`` and ``sys`` seconds, minor page ``faults`` and ``rss_mib`` (from
    ``os.wait4``: the child's own figures and its waited-for children's, e.g. DataLoader workers), ``anon_mib``
    (the peak of :func:`anon_kib` of the child, sampled every 0.2 s), ``disk_mib`` (with ``disk``: the most the
    free space of the file system holding ``disk`` fell below its value at the start, sampled likewise; other
    writers to that file system count too) and ``load`` (the load average before -> after). ``env`` defaults to
    this process's environment.
    """
    before = load_now()
    free0 = _free_bytes(disk) if disk is not None else 0
    peak = {"anon": 0, "disk": 0}
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                                 text=True) as proc:
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak["anon"] = max(peak["anon"], anon_kib(proc.pid))
                if disk is not None:
                    peak["disk"] = max(peak["disk"], free0 - _free_bytes(disk))
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n"
                         f"{log.read_text()[-3000:]}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults": usage.ru_minflt,
            "rss_mib": usage.ru_maxrss / 1024, "anon_mib": peak["anon"] / 1024, "disk_mib": peak["disk"] / 2**20,
            "stdout": stdout, "load": f"{before} -> {load_now()}"}


def make_demo(out: Path, options: list[str], seed: int = 1) -> None:
    """Write a synthetic dataset to ``out``: ``python -m vtransfer make-demo OUT OPTIONS --seed SEED --json``.

    Exits with the command's output if it fails.
    """
    argv = [sys.executable, "-m", "vtransfer", "make-demo", str(out), *options, "--seed", str(seed), "--json"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-3000:]}")
