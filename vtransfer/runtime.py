"""Where and how computation runs: device, threads, precision, seeding.

Small helpers shared by training, evaluation and prediction so that every
command makes the same choices for the same options.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from vtransfer.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else must exist."""
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
    """Set torch's intra-op threads (default: every available CPU) and return the number."""
    n = threads or cpu_count()
    torch.set_num_threads(max(1, n))
    return n


def default_workers(device: torch.device, reader=None) -> int:
    """DataLoader workers: none when frames come from an in-memory cache (cropping is cheap and
    workers would only compete with the model for the cores); otherwise decoding overlaps compute,
    and more workers than cores only thrash."""
    cache = getattr(reader, "cache", None)
    if cache is not None and getattr(cache, "mode", None) == "memory":
        return 0
    return min(2, cpu_count()) if device.type == "cpu" else min(8, cpu_count())


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True


def preferred_memory_format(backbone: str, precision: str, device: torch.device) -> torch.memory_format:
    """The memory format backbone family ``backbone`` declares for ``device`` and ``precision``.

    Each family measures its own choice (``benchmarks/bench_step.py``); see
    ``preferred_memory_format`` in its module (contiguous when it declares none).
    """
    from vtransfer.models.registry import memory_format

    return memory_format(backbone, device, precision)
