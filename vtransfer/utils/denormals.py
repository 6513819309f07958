"""Flush denormal floats to zero on every thread torch computes on (issue 23).

A float32 below about 1.2e-38 is *denormal*, and x86 CPUs handle it in
microcode, tens of times slower than a normal number. Training makes them:
an attentive probe whose attention sharpens multiplies gradients by
probabilities near zero. On 391 videos, attentive-probe's epochs went from
9 s to 50 s as it trained; a profile put 63% of the time in MKL's sgemm
kernel, and the threads' MXCSR registers had the denormal flag set. With
denormals flushed (FTZ) and read as zero (DAZ), that matrix product takes
7 ms instead of 1,250 ms; the results differ only below 1.2e-38.

The flags are per thread. ``torch.set_flush_denormal`` sets them on the
calling thread only, and torch's OpenMP threads (GNU OpenMP, which also runs
MKL's threads) neither inherit them nor get them from that call, so
:func:`flush_denormals` also runs ``torch.set_flush_denormal`` inside one
OpenMP parallel region (``GOMP_parallel`` through ``ctypes``) on every thread
of the pool that later regions reuse: the pool of torch's own copy of the
library (scikit-learn's wheel loads a second copy, with threads of its own;
a region started there left torch's threads as they were, and attentive-probe
still slowed). The pool is per calling thread and per
thread count: call it from the thread that trains, after
``torch.set_num_threads`` (:func:`~vtransfer.utils.runtime.configure_threads`
does both). Where the OpenMP library is not GNU's (Intel's copies the primary
thread's flags to its workers by itself) or the CPU has no such flags, it
does what it can and says what.

``VTRANSFER_DENORMALS=keep`` leaves the flags alone.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

import torch

#: The environment variable that opts out: ``VTRANSFER_DENORMALS=keep``.
ENV_VAR = "VTRANSFER_DENORMALS"
KEEP_VALUES = ("keep", "off", "0", "no", "false")

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _torch_gomp() -> ctypes.CDLL | None:
    """The GNU OpenMP library torch computes with, or None (not GNU's, or no ``/proc``).

    Other packages load their own copies (scikit-learn's wheel brings one): a
    region started in one of those would run on its own threads, not torch's.
    So the copy in torch's folder is taken, or else the only one loaded.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libgomp" in line})
    except OSError:
        return None
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    own = [p for p in paths if os.path.realpath(p).startswith(torch_dir)]
    chosen = own or (paths if len(paths) == 1 else [])
    for path in chosen:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        except OSError:
            continue
        if hasattr(lib, "GOMP_parallel"):
            return lib
    return None


def set_denormal_flush(on: bool) -> tuple[int, str]:
    """Flush denormals to zero (``on``) or not, on this thread and each thread of torch's OpenMP pool.

    Returns ``(threads set, how)``; ``threads set`` is 0 where the CPU has no such flags.
    """
    if not torch.set_flush_denormal(on):
        return 0, "this CPU has no flush-to-zero flags (not x86 with SSE3)"
    threads = torch.get_num_threads()
    gomp = _torch_gomp()
    if gomp is None or threads < 2:
        how = ("this thread" if threads < 2 else
               "this thread (torch's OpenMP library was not found as GNU's; Intel's copies the flags itself)")
        return 1, how
    done: list[bool] = []

    def each(_data) -> None:
        done.append(bool(torch.set_flush_denormal(on)))

    callback = _CALLBACK(each)
    gomp.GOMP_parallel.argtypes = (_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    gomp.GOMP_parallel.restype = None
    gomp.GOMP_parallel(callback, None, threads, 0)
    return sum(done), f"this thread and torch's OpenMP threads ({threads} in all)"


def flush_denormals(environ: Mapping[str, str] | None = None) -> str:
    """Flush denormals to zero on every computing thread unless ``VTRANSFER_DENORMALS=keep``; says what it did."""
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR, "").strip().lower() in KEEP_VALUES:
        return f"denormal floats kept ({ENV_VAR}={env[ENV_VAR]})"
    count, how = set_denormal_flush(True)
    return f"denormal floats flushed to zero on {how}" if count else f"denormal floats kept: {how}"
