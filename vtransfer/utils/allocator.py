"""Keep the memory of large tensors in the process: glibc malloc settings applied at run time (issue 23).

glibc's malloc serves every request above its mmap threshold (at most 32 MiB, the
ceiling of its dynamic threshold) with a fresh ``mmap`` and gives it back with
``munmap`` on free. A batch of 8 clips at 224 px makes activations of about
100 MB, so every forward and backward pass mapped fresh pages, the kernel
zero-filled each one on first touch, and about half of a run's CPU time was
system time. :func:`tune_malloc` calls ``mallopt`` so that large blocks come
from the heap instead (``M_MMAP_MAX=0``) and freed memory stays there for
the next batch (``M_TRIM_THRESHOLD``, ``M_TOP_PAD``); :data:`MALLOC_SETTINGS`
holds the values, chosen with ``benchmarks/bench_scale.py``.

``mallopt`` works at any time, but only allocations made after it follow the
new settings; forked DataLoader workers inherit them. The CLI applies it
before anything else runs, the Python API when :mod:`vtransfer.api` is first
imported. ``VTRANSFER_MALLOC=default`` leaves malloc as it is. Anywhere but
glibc (macOS, musl, Windows) it does nothing and says why; it never raises.
Importing this module imports nothing but the standard library (``ctypes``: a few milliseconds).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The environment variable that opts out: ``VTRANSFER_MALLOC=default`` (or ``off``) keeps glibc's own settings.
ENV_VAR = "VTRANSFER_MALLOC"
OPT_OUT_VALUES = ("default", "off", "0", "no", "none", "false")
TUNED_VALUES = ("", "tuned", "on", "1", "yes", "true")

#: ``mallopt`` parameter numbers, from glibc's <malloc.h>.
MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3, "M_MMAP_MAX": -4, "M_ARENA_MAX": -8}

_MiB = 1024 * 1024
#: What :func:`tune_malloc` sets, in this order. No block is mapped on its own (glibc refuses an mmap threshold above
#: 32 MiB, below a batch's activations, so the count of mappings is set to zero instead); the heap is given back to
#: the system only when more than ``M_TRIM_THRESHOLD`` bytes are free at its top, keeping ``M_TOP_PAD`` bytes.
#: Measured with benchmarks/bench_scale.py on compare-policies (effnet3d, top-layer,top-3, real_actions): system
#: time was 51% of CPU time with glibc's defaults; mmap off alone 39%; with a trim threshold of 256 MiB 25%, 1 GiB
#: 12%, 2 GiB 4-5% (4 GiB or never: no better; a 2-epoch ``all`` fine-tune: 8.8%); the top pad (64 MiB or 1 GiB)
#: made no difference. 2 GiB is also the most ``mallopt`` takes (its value is a C int). Peak RSS rose 1.2x.
#: See README.md, "Speed on the machine you have".
MALLOC_SETTINGS: dict[str, int] = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 64 * _MiB}

#: glibc's own ways to set the same things; when the user set any of them, their choice is left alone.
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                         "MALLOC_ARENA_MAX")


@dataclass(frozen=True)
class MallocTuning:
    """What :func:`tune_malloc` did: the ``mallopt`` settings it applied (empty when none) and why."""

    applied: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    libc: str = ""

    @property
    def active(self) -> bool:
        return bool(self.applied)

    def describe(self) -> str:
        """One line for a run log: ``malloc: M_MMAP_MAX=0 ... (glibc 2.36; ...)``, or ``malloc: unchanged (why)``."""
        if self.applied:
            settings = " ".join(f"{k}={v}" for k, v in self.applied.items())
            return f"malloc: {settings} ({self.libc}; {ENV_VAR}=default to keep glibc's defaults)"
        return f"malloc: unchanged ({self.reason})"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form for a run's configuration."""
        return {"applied": dict(self.applied), "reason": self.reason, "libc": self.libc}


_done: MallocTuning | None = None


def glibc_version() -> str | None:
    """``glibc 2.36`` when this process runs on GNU libc, else None (musl, macOS, Windows)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return version if version and version.startswith("glibc") else None


def _mallopt():
    """glibc's ``mallopt`` as a ctypes function ``(int, int) -> int``."""
    libc = ctypes.CDLL(None)
    fn = libc.mallopt
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def decide(env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether :func:`tune_malloc` applies its settings under the environment ``env``, and if not, why."""
    value = env.get(ENV_VAR, "").strip().lower()
    if value in OPT_OUT_VALUES:
        return False, f"{ENV_VAR}={env.get(ENV_VAR)}: glibc's defaults kept"
    if value not in TUNED_VALUES:
        return False, f"{ENV_VAR}={env.get(ENV_VAR)!r} is not one of 'tuned', 'default': glibc's defaults kept"
    user = [k for k in USER_MALLOC_VARIABLES if k in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return False, f"{', '.join(user)} set by the user: left to glibc"
    return True, ""


def tune_malloc(environ: Mapping[str, str] | None = None, *, force: bool = False) -> MallocTuning:
    """Apply :data:`MALLOC_SETTINGS` through ``mallopt`` once per process; return what was done.

    Honours ``VTRANSFER_MALLOC=default`` and any glibc malloc variable the user set. Later
    calls return the first call's result (``force`` applies again, for tests). Never raises.
    """
    global _done
    if _done is not None and not force:
        return _done
    try:
        _done = _tune(os.environ if environ is None else environ)
    except Exception as e:  # noqa: BLE001 - a malloc setting must never stop a run
        _done = MallocTuning(reason=f"not applied: {type(e).__name__}: {e}")
    return _done


def _tune(env: Mapping[str, str]) -> MallocTuning:
    wanted, reason = decide(env)
    if not wanted:
        return MallocTuning(reason=reason)
    libc = glibc_version()
    if libc is None:
        return MallocTuning(reason="not glibc (musl, macOS or Windows): its allocator is left as it is")
    mallopt = _mallopt()
    applied, failed = {}, []
    for name, value in MALLOC_SETTINGS.items():
        if mallopt(MALLOPT_PARAMS[name], value) == 1:
            applied[name] = value
        else:
            failed.append(name)
    reason = f"mallopt refused {', '.join(failed)}" if failed else "applied"
    return MallocTuning(applied=applied, reason=reason, libc=libc)


def malloc_tuning() -> MallocTuning | None:
    """What :func:`tune_malloc` did in this process, or None when it has not run."""
    return _done
