"""``--max-memory``: one budget for the memory a run holds, asked by every large holder (issue 23).

The budget is a ceiling on this process's resident memory that the OS cannot
drop by itself: its anonymous and shared-memory pages (``RssAnon`` +
``RssShmem`` of ``/proc/self/status``; file pages it has mapped, such as a
memory-mapped feature store or frame cache, are page cache the kernel
reclaims, and are left out). ``--max-memory`` gives it as a size (``12G``,
``800M``, ``1.5G``; binary units) or as a fraction of the memory this process
could have when the budget was first set (``0.8`` or ``80%``: what it held plus
``MemAvailable``). The default is :data:`DEFAULT_FRACTION` of that.

The holders ask :func:`current` before they grow:

* the frame cache (``--cache auto``) stays in memory only when the decoded
  frames fit half of the budget's remaining room
  (:func:`vtransfer.data.frame_cache.resolve_cache_mode`);
* a frozen-prefix feature store that would not fit is written to a
  memory-mapped file instead (:mod:`vtransfer.engine.feature_cache`);
* before training, one step of a policy that backpropagates through the
  network is measured, and a micro-batch or gradient checkpointing is chosen
  when a whole batch would not fit; a run that cannot fit stops there with
  :class:`MemoryBudgetError` (:mod:`vtransfer.engine.step_memory`).

A run sets the budget with :func:`configure` when it starts (the training
pipeline does); anything that asks before that gets the default. DataLoader
worker processes are not counted: each is its own process, and forked ones
share the main process's pages. This module imports only the standard library.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import resource
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vtransfer.utils.errors import ConfigError, VtransferError

#: The default budget: this share of the memory the process could have when the budget was first set.
DEFAULT_FRACTION = 0.8
#: Past this share of the budget, the end of a phase gives the heap's free pages back (:meth:`MemoryBudget.settle`).
SETTLE_SHARE = 0.8
#: The smallest size ``--max-memory`` takes: less than PyTorch itself needs to load.
MIN_BYTES = 256 * 2**20
_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|[kmgt]?(?:i?b)?)\s*$", re.IGNORECASE)
_EXAMPLES = "a size like 12G or 800M, or a fraction of the available memory like 0.8 or 80%"


class MemoryBudgetError(ConfigError):
    """A run needs more memory than ``--max-memory`` leaves it (raised before training starts)."""


class SpillError(VtransferError):
    """A feature store could not be written to disk (the disk is full, or the folder is not writable)."""


def parse_max_memory(value: Any, option: str = "--max-memory") -> int | float | None:
    """``--max-memory`` as bytes (``int``) or a fraction of the available memory (``float`` in (0, 1]).

    ``None`` (the default budget) stays ``None``. Sizes take binary units, with
    or without ``B``/``iB`` (``12G`` = ``12GB`` = ``12GiB`` = 12 x 2^30 bytes); a
    bare number is a fraction, ``80%`` a percentage. Data-free: a run checks it
    before any video is read.

    Raises:
        ConfigError: naming ``option`` and the value, with examples of what it takes.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{option} {value!r}: expected {_EXAMPLES}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{option} {value!r}: expected {_EXAMPLES}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{option} {value!r}: must be more than 0 ({_EXAMPLES})")
    if unit == "%":
        if number > 100:
            raise ConfigError(f"{option} {value!r}: a percentage of the available memory is at most 100%")
        return number / 100
    if unit == "":
        if number > 1:
            raise ConfigError(f"{option} {value!r}: a bare number is a fraction of the available memory, at most 1; "
                              f"give a unit for a size, e.g. {option} {number:g}G")
        return number
    scale = _UNITS[unit[0]] if unit[0] in "kmgt" else 1
    size = int(number * scale)
    if size < MIN_BYTES:
        raise ConfigError(f"{option} {value!r} is {format_bytes(size)}: less than PyTorch itself takes; "
                          f"give at least {format_bytes(MIN_BYTES)}")
    return size


def check_max_memory(value: Any) -> Any:
    """``value`` unchanged once :func:`parse_max_memory` accepts it (the run option's ``parse``: text stays text)."""
    parse_max_memory(value)
    return value.strip() if isinstance(value, str) else value


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``800 MiB``, ``12 KiB``: binary units, three significant digits at most."""
    n = float(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if abs(v) < 100 else f"{v:.0f} {unit}"
    return f"{n:.0f} B"


def option_text(n: int) -> str:
    """A size as ``--max-memory`` takes it, rounded up: ``3.2G``, ``900M``."""
    if n >= 2**30:
        return f"{math.ceil(n / 2**30 * 10) / 10:g}G"
    return f"{max(math.ceil(n / 2**20), MIN_BYTES // 2**20)}M"


# -- what the process holds ---------------------------------------------------------------


def _status_kib(*names: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def process_memory() -> int:
    """Bytes of this process's memory the OS cannot drop by itself: anonymous plus shared-memory pages.

    Linux: ``RssAnon + RssShmem``; elsewhere the resident set, or the peak resident set.
    """
    kib = _status_kib("RssAnon", "RssShmem", "VmRSS")
    if "RssAnon" in kib:
        return (kib["RssAnon"] + kib.get("RssShmem", 0)) * 1024
    if "VmRSS" in kib:
        return kib["VmRSS"] * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory() -> int:
    """Memory the OS says is available now (``MemAvailable`` of ``/proc/meminfo``), or free physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def total_memory() -> int:
    """Physical memory of the machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where there is no such call.

    The tuned allocator (:mod:`vtransfer.utils.allocator`) keeps freed memory
    for the next batch, so the resident set overstates what is in use; the
    budget's decisions call this first, a few times a run.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True


def resident() -> int | None:
    """This process's resident set now (``/proc/self/statm``), or None where there is no such file."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class PeakSampler:
    """The highest resident set seen while a ``with`` block runs: sampled by a thread every ``interval`` seconds.

    Torch releases the GIL while it computes, so the thread samples during
    the work; the resident set at the end counts too (the tuned allocator
    keeps what a step freed, so it is close to the peak). The process's own
    peak counter is left alone (resetting it would hide earlier peaks from
    ``getrusage`` and ``/usr/bin/time``). ``grown`` is the peak less the
    resident set at the start; -1 where the resident set cannot be read.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start: int | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident()
            if now is not None and now > self.peak:
                self.peak = now

    def __enter__(self) -> "PeakSampler":
        self.start = resident()
        if self.start is not None:
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, name="vtransfer-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = resident()
        if now is not None:
            self.peak = max(self.peak, now)

    @property
    def grown(self) -> int:
        """Bytes the resident set rose by at its highest (-1: unknown)."""
        return self.peak - self.start if self.start is not None else -1


# -- the budget ------------------------------------------------------------------------------


@dataclass
class MemoryBudget:
    """A ceiling of ``limit`` bytes on :func:`process_memory`, with room set aside for what is coming.

    ``described`` says where the figure came from (for messages); ``spill_dir``
    is where feature stores that do not fit are written; ``message`` shows one
    line to the person running it (the run's reporter). :meth:`reserve` sets
    room aside (the training step's measured activations, a feature store about
    to be filled): it counts as used until the process has actually grown by
    that much; :meth:`held` adds what a holder took after it.
    """

    limit: int
    described: str = ""
    spill_dir: Path | None = None
    message: Callable[[str], None] | None = None
    floor: int = field(default=0)  # the process will hold at least this much (what was reserved)

    def used(self) -> int:
        """What the process holds now (:func:`process_memory`)."""
        return process_memory()

    def remaining(self) -> int:
        """Bytes the process may still grow by: the limit less what it holds or has reserved (negative when over)."""
        return self.limit - max(self.used(), self.floor)

    def room(self) -> int:
        """:meth:`remaining` after the heap's free pages are given back (what a holder about to grow may take)."""
        release_free_heap()
        return self.remaining()

    def fits(self, nbytes: int) -> bool:
        """Whether the process may take ``nbytes`` more; the heap's free pages are given back first if it is close."""
        if nbytes <= self.remaining():
            return True
        release_free_heap()
        return nbytes <= self.remaining()

    def settle(self) -> None:
        """A phase ended (a store built, an epoch read): give the heap's free pages back if the process is near the limit.

        The tuned allocator keeps freed activations for the next batch; past
        :data:`SETTLE_SHARE` of the budget they are given back instead.
        """
        if self.used() > SETTLE_SHARE * self.limit:
            release_free_heap()

    def reserve(self, nbytes: int) -> None:
        """Set ``nbytes`` aside, on top of what the process holds now (or has reserved already)."""
        self.floor = max(self.floor, self.used()) + max(0, int(nbytes))

    def held(self, nbytes: int) -> None:
        """The process took ``nbytes`` for good (a frame cache filled): room set aside before stays set aside.

        Without it a holder that grows after :meth:`reserve` would be counted inside the reservation, and the
        next one would see room that the reserved step still needs.
        """
        if self.floor:
            self.floor += max(0, int(nbytes))

    def say(self, text: str) -> None:
        """One line for the person running it (nothing without a reporter)."""
        if self.message is not None:
            self.message(text)

    def spill_folder(self) -> Path:
        """Where feature stores past the budget go: ``SPILL_DIR/spill`` (default: under the temp folder)."""
        base = self.spill_dir if self.spill_dir is not None else Path(tempfile.gettempdir()) / "vtransfer"
        return Path(base) / "spill"

    def describe(self) -> str:
        """``4.0 GiB (--max-memory 4G)``."""
        return f"{format_bytes(self.limit)} ({self.described})" if self.described else format_bytes(self.limit)


_current: MemoryBudget | None = None
_basis: tuple[int, int] | None = None  # (what the process held, MemAvailable) when a budget was first set


def memory_basis() -> tuple[int, int]:
    """(bytes the process held, bytes available) when first asked in this process: what fractions are of."""
    global _basis
    if _basis is None:
        _basis = (process_memory(), available_memory())
    return _basis


def resolve_limit(max_memory: Any) -> tuple[int, str]:
    """The budget in bytes for ``--max-memory`` (``None``: the default fraction), and how it was arrived at."""
    value = parse_max_memory(max_memory)
    if isinstance(value, int):
        limit, described = value, f"--max-memory {str(max_memory).strip()}"
    else:
        fraction = DEFAULT_FRACTION if value is None else value
        held, available = memory_basis()
        limit = int(fraction * (held + available))
        what = f"{fraction:.0%} of the {format_bytes(held + available)} this process could use at start"
        described = f"--max-memory {str(max_memory).strip()}: {what}" if value is not None else f"default: {what}"
    total = total_memory()
    if total and limit > total:
        described += f"; capped at the machine's {format_bytes(total)}"
        limit = total
    return limit, described


def configure(max_memory: Any = None, *, spill_dir: Path | str | None = None,
              message: Callable[[str], None] | None = None) -> MemoryBudget:
    """Set this process's budget from ``--max-memory`` (a run calls it when it starts) and return it.

    Raises:
        ConfigError: ``max_memory`` is not a size or fraction (see :func:`parse_max_memory`).
    """
    global _current
    limit, described = resolve_limit(max_memory)
    _current = MemoryBudget(limit, described, Path(spill_dir) if spill_dir is not None else None, message)
    return _current


def current() -> MemoryBudget:
    """The budget set by the running run (:func:`configure`), or the default one."""
    global _current
    if _current is None:
        limit, described = resolve_limit(None)
        _current = MemoryBudget(limit, described)
    return _current


def set_current(budget: MemoryBudget | None) -> MemoryBudget | None:
    """Put ``budget`` in place (``None``: the default on next use); return the one it replaces (tests)."""
    global _current
    previous, _current = _current, budget
    return previous
