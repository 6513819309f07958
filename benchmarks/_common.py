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
  judge how busy the machine was.

Scripts import it as ``from _common import ...`` (Python puts the script's
own folder first on ``sys.path``), so ``benchmarks/`` needs no package.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Callable

RSS_LABEL = "peak memory (RSS)"


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
