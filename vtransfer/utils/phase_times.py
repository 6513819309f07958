"""Where a run's wall time goes: named phases (decoding, optical flow, the frozen prefix, training, ...).

A run opens a :func:`recording`; the code that does each kind of work wraps
it in :func:`phase`. Phases are timed *exclusively*: when a phase opens
inside another (a video decoded while the frozen prefix is being computed),
its seconds count for it alone, not for both. So the phases of a recording
never add up to more than its wall time, and the rest is "other".

Only the thread that opened the recording is timed: work that a phase hands
to a thread pool or to DataLoader worker processes counts, in wall time, for
the phase that waits for it. Recordings nest (a two-stream run records the
runs of its two streams): a phase counts in every open recording.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

#: The phases the tool times, in the order a run meets them, with the words a summary uses.
PHASE_NAMES: dict[str, str] = {
    "setup": "setup",
    "screening": "screening",
    "audit": "audit",
    "decode": "decoding",
    "flow": "optical flow",
    "prefix": "frozen prefix",
    "training": "training",
    "scoring": "scoring",
    "report videos": "report videos",
}


@dataclass
class PhaseTimes:
    """Exclusive wall seconds and work units (e.g. clips) per phase, since the recording opened."""

    seconds: dict[str, float] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    thread: int = field(default_factory=threading.get_ident)
    _open: list[list] = field(default_factory=list)  # [name, time its current stretch began]

    def enter(self, name: str, now: float) -> None:
        """Open ``name``: the phase it interrupts stops counting until ``name`` closes."""
        if self._open:
            self._charge(self._open[-1], now)
        self._open.append([name, now])

    def leave(self, units: int, now: float) -> None:
        """Close the innermost phase (adding ``units`` of work to it); the phase it interrupted counts again."""
        entry = self._open.pop()
        self._charge(entry, now)
        self.units[entry[0]] = self.units.get(entry[0], 0) + units
        if self._open:
            self._open[-1][1] = now

    def _charge(self, entry: list, now: float) -> None:
        self.seconds[entry[0]] = self.seconds.get(entry[0], 0.0) + now - entry[1]
        entry[1] = now

    def wall(self) -> float:
        """Seconds since the recording opened."""
        return time.perf_counter() - self.started

    def to_dict(self) -> dict:
        """JSON form: the wall seconds, each phase's seconds (and units where counted), and the rest as ``other``."""
        wall = self.wall()
        phases = {name: round(s, 3) for name, s in sorted(self.seconds.items(), key=lambda kv: _order(kv[0]))}
        out = {"wall_s": round(wall, 3), "phases_s": phases, "other_s": round(max(0.0, wall - sum(phases.values())), 3)}
        if any(self.units.values()):
            out["units"] = {name: n for name, n in self.units.items() if n}
        return out

    def summary(self) -> str:
        """One line: ``time 62.1 s: decoding 3.0 s (5%), optical flow 9.0 s (15%; 1,170 fields, 130/s), ...,
        other 1.2 s (2%)``: each phase's share of the wall time, and its units and rate where it counts them."""
        d = self.to_dict()
        wall = d["wall_s"] or 1e-9
        units = d.get("units", {})

        def part(name: str, s: float) -> str:
            n = units.get(name)
            rate = f"; {n:,} {PHASE_UNITS[name]}, {_rate(n / s)}/s" if n and s and name in PHASE_UNITS else ""
            return f"{PHASE_NAMES.get(name, name)} {s:.1f} s ({s / wall:.0%}{rate})"

        parts = [part(n, s) for n, s in d["phases_s"].items() if s >= 0.05]
        parts.append(f"other {d['other_s']:.1f} s ({d['other_s'] / wall:.0%})")
        return f"time {d['wall_s']:.1f} s: " + ", ".join(parts)


#: What the units of a phase are, where a phase counts them.
PHASE_UNITS: dict[str, str] = {"decode": "frames", "flow": "fields", "prefix": "clips", "training": "clips trained"}


def _rate(per_second: float) -> str:
    """A rate with two significant digits below 10 (1.3/s), whole numbers above (126/s)."""
    return f"{per_second:.0f}" if per_second >= 10 else f"{per_second:.2g}"


def _order(name: str) -> int:
    names = list(PHASE_NAMES)
    return names.index(name) if name in names else len(names)


_recordings: list[PhaseTimes] = []
_lock = threading.Lock()


@contextmanager
def recording() -> Iterator[PhaseTimes]:
    """Record the phases of the code inside, on this thread; yields the :class:`PhaseTimes` being filled."""
    times = PhaseTimes()
    with _lock:
        _recordings.append(times)
    try:
        yield times
    finally:
        with _lock:
            _recordings.remove(times)


@contextmanager
def phase(name: str) -> Iterator[Callable[[int], None]]:
    """Time the code inside as phase ``name`` in every open recording of this thread.

    Yields a function that adds units of work (clips, frames) to the phase: ``with phase("prefix") as done: ...;
    done(len(batch))``.
    """
    me = threading.get_ident()
    with _lock:
        mine = [r for r in _recordings if r.thread == me]
    units = [0]

    def done(n: int) -> None:
        units[0] += int(n)

    now = time.perf_counter()
    for r in mine:
        r.enter(name, now)
    try:
        yield done
    finally:
        now = time.perf_counter()
        for r in mine:
            r.leave(units[0], now)
