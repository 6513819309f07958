"""Where and how computation runs: device, threads, precision, seeding.

Small helpers shared by training, evaluation and prediction so that every
command makes the same choices for the same options. Importing this module
does not import torch (the CLI reads :data:`THREAD_ENVIRONMENT` before torch
is loaded); the functions that need torch import it when called.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import TYPE_CHECKING, MutableMapping

from vtransfer.utils.errors import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16")

# OpenMP settings for a machine shared with other jobs (issue 12). PyTorch's CPU
# kernels run on GNU libgomp (bundled as torch/lib/libgomp.so.1; Intel's
# KMP_BLOCKTIME does not apply). By default a libgomp thread that reaches a
# barrier first spins up to 300,000 times before sleeping, so every one of the
# thousands of small parallel regions per step burns CPU time that other
# processes, and our own descheduled thread, needed. PASSIVE makes waiting
# threads sleep at once. libgomp reads these when torch loads it, so they only
# take effect if set before ``import torch``; the CLI sets each one the user has
# not set (see :func:`apply_thread_environment`). Measured by
# benchmarks/bench_contention.py.
THREAD_ENVIRONMENT: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_thread_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the :data:`THREAD_ENVIRONMENT` variables missing from ``environ`` (default ``os.environ``).

    Returns the variables it set (a user's own values are left alone). Has an
    effect only when called before torch is imported in this process.
    """
    env = os.environ if environ is None else environ
    added = {k: v for k, v in THREAD_ENVIRONMENT.items() if k not in env}
    env.update(added)
    return added


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else must exist."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (``bf16`` on CPU or GPU; ``fp32`` is a no-op)."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_count() -> int:
    """CPUs this process may use (respects affinity masks and cgroups' sched affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: every available CPU) and return the number.

    Denormal floats are then flushed to zero on those threads (:mod:`vtransfer.utils.denormals`).
    Also on a busy machine: with waiting threads that sleep (:data:`THREAD_ENVIRONMENT`)
    two threads beside two busy processes on two cores finished training steps
    faster than one thread did (benchmarks/README.md, bench_contention.py).
    """
    import torch

    from vtransfer.utils.denormals import flush_denormals

    global _denormals
    n = max(1, threads or cpu_count())
    torch.set_num_threads(n)
    _denormals = flush_denormals()  # on the pool of this thread count (vtransfer.utils.denormals)
    return n


_denormals: str | None = None  # what configure_threads did about denormal floats


def thread_settings() -> dict[str, object]:
    """What governs CPU parallelism in this process now: torch's thread counts and the OpenMP variables."""
    import torch

    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"cpus": cpu_count(), "intra_op_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "denormals": _denormals, **env}


def default_workers(device: torch.device, reader=None, whole_network: bool = False) -> int:
    """DataLoader workers: none when frames come from an in-memory cache (cropping is cheap and
    workers would only compete with the model for the cores) - on a GPU only for raw frames, as
    JPEG frames still cost a decode per frame (about 0.5 ms at 256 px) that the GPU would wait
    for; otherwise decoding overlaps compute, and more workers than cores only thrash.

    On CPU, a run that trains the whole network (``whole_network``: no frozen prefix) from a frame
    cache on disk gets none either: reading a batch is a few percent of its step, and workers
    forked from the large training process cost more in the kernel than they save (one epoch of
    ``all`` on 92 videos, 224 px: 208 s and 14.6% system time with 2 workers, 189 s and 5.5% with none).
    """
    cache = getattr(reader, "cache", None)
    if cache is not None and getattr(cache, "mode", None) == "memory":
        if device.type == "cpu" or getattr(cache, "cache_format", "raw") == "raw":
            return 0
    if cache is not None and whole_network and device.type == "cpu":
        return 0
    return min(2, cpu_count()) if device.type == "cpu" else min(8, cpu_count())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
