"""Rows of a feature store, in memory or in a memory-mapped file when the memory budget says so (issue 23).

:class:`RowBuffer` preallocates ``capacity`` rows shaped like a first batch
(one tensor, or a tuple of them) and is filled batch by batch, so a store
never holds its rows twice (a list of batches plus their concatenation).
Before allocating it asks :func:`vtransfer.utils.memory_budget.current`
whether the rows fit; if not, each part lives in a file under the budget's
spill folder (the run folder or ``--cache-dir``), mapped into memory. The
file's space is claimed up front (``posix_fallocate``), so a full disk fails
at once with :class:`~vtransfer.utils.memory_budget.SpillError` naming the
folder and the bytes needed, before anything is written. Files are deleted
when the store is dropped (:meth:`SpillFiles.close`, or when it is garbage
collected, or at exit); a store never outlives its process, so an
interrupted spill leaves nothing a later run would read, and the files of a
process that was killed (named by its process id) are deleted by the next
spill into the same folder.

The mapped pages a store has written or read are file pages the kernel can
drop at any time, but they count in the process's resident set until it
does; :meth:`SpillFiles.read` hands them back (``MADV_DONTNEED``) every
:data:`RELEASE_EVERY` bytes, so the resident set stays flat.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtransfer.utils import memory_budget
from vtransfer.utils.memory_budget import SpillError, format_bytes

#: Bytes of mapped pages read or written between two hand-backs to the kernel.
RELEASE_EVERY = 64 * 2**20
#: Free disk space a spill leaves beside its files.
DISK_SLACK = 256 * 2**20


def _parts(state: Any) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _unlink(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass
    for folder in {os.path.dirname(p) for p in paths}:
        try:
            os.rmdir(folder)  # only when empty
        except OSError:
            pass


def remove_stale(folder: Path) -> list[Path]:
    """Delete the feature-store files in ``folder`` whose process is gone (killed before it could delete them)."""
    removed = []
    for path in folder.glob("feature-store-*-*.bin"):
        try:
            pid = int(path.name.split("-")[2])
            os.kill(pid, 0)
            continue  # still running (or another user's): not ours to delete
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError, OSError):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


class SpillFiles:
    """The files under a spilled store's rows: where they are, their mappings, and their deletion."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.maps: list[mmap.mmap] = []
        self.nbytes = 0
        self._touched = 0
        self._finalizer = weakref.finalize(self, _unlink, self.paths)

    def create(self, folder: Path, nbytes: int) -> torch.Tensor:
        """A new file of ``nbytes`` under ``folder`` (its space claimed now), mapped: a uint8 tensor over it."""
        fd, name = tempfile.mkstemp(prefix=f"feature-store-{os.getpid()}-", suffix=".bin", dir=folder)
        self.paths.append(name)
        try:
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))
            except AttributeError:  # pragma: no cover - no posix_fallocate (macOS): sparse file
                os.ftruncate(fd, max(1, nbytes))
            mapped = mmap.mmap(fd, max(1, nbytes))
        except OSError as e:
            self.close()
            raise SpillError(f"cannot write a feature store of {format_bytes(nbytes)} to {folder}: "
                             f"{e.strerror or e}; free that much space there, give another folder with --cache-dir, "
                             f"or raise --max-memory") from None
        finally:
            os.close(fd)
        self.maps.append(mapped)
        self.nbytes += nbytes
        return torch.from_numpy(np.frombuffer(mapped, dtype=np.uint8, count=nbytes))

    def touched(self, nbytes: int) -> None:
        """``nbytes`` of mapped pages were read or written; hand them back to the kernel every :data:`RELEASE_EVERY`."""
        self._touched += nbytes
        if self._touched >= RELEASE_EVERY:
            self.release()

    def release(self) -> None:
        """Drop the mapped pages from the resident set (they stay in the file and the page cache)."""
        self._touched = 0
        for m in self.maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # pragma: no cover - no madvise, or a closed mapping
                pass

    def close(self) -> None:
        """Delete the files now (mappings still held stay valid until they are let go)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether the files are deleted."""
        return not self._finalizer.alive


class RowBuffer:
    """``capacity`` rows shaped like ``template``'s, filled in order with :meth:`append`.

    In memory when the budget has room for them, else in memory-mapped files
    (``what`` names them in the message saying so).
    """

    def __init__(self, template: Any, capacity: int, what: str = "frozen-layer features"):
        parts = _parts(template)
        self.is_tuple = isinstance(template, tuple)
        self.capacity = capacity
        self.row_bytes = [p[0].numel() * p.element_size() for p in parts]
        need = capacity * sum(self.row_bytes)
        budget = memory_budget.current()
        self.spill: SpillFiles | None = None
        if budget.fits(need):
            self.rows = [torch.empty((capacity, *p.shape[1:]), dtype=p.dtype) for p in parts]
            budget.reserve(need)  # its pages are taken as it fills: the next holder must not count on them
        else:
            folder = budget.spill_folder()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale(folder)
                free = shutil.disk_usage(folder).free
            except OSError as e:
                raise SpillError(f"cannot write a feature store of {format_bytes(need)} to {folder}: "
                                 f"{e.strerror or e}") from None
            if need + DISK_SLACK > free:
                raise SpillError(
                    f"{what}: {format_bytes(need)} do not fit the memory budget ({format_bytes(max(0, budget.remaining()))} "
                    f"left of {budget.describe()}), and {folder} has only {format_bytes(free)} free; free "
                    f"{format_bytes(need + DISK_SLACK - free)} there, give another folder with --cache-dir, or raise "
                    f"--max-memory")
            self.spill = SpillFiles()
            self.rows = []
            for p, row in zip(parts, self.row_bytes):
                raw = self.spill.create(folder, capacity * row)
                self.rows.append(raw.view(p.dtype).view(capacity, *p.shape[1:]) if row else
                                 torch.empty((capacity, *p.shape[1:]), dtype=p.dtype))
            budget.say(f"{what}: {format_bytes(need)} written to {folder} (memory-mapped) to stay within the memory "
                       f"budget, {budget.describe()}")
        self.count = 0

    @property
    def nbytes(self) -> int:
        """Bytes of all ``capacity`` rows."""
        return self.capacity * sum(self.row_bytes)

    def append(self, state: Any) -> None:
        """Copy a batch's rows (a tensor, or a tuple like the template) after the rows already filled."""
        parts = _parts(state)
        n = parts[0].shape[0]
        if self.count + n > self.capacity:
            raise ValueError(f"more rows than the {self.capacity} the store was made for")
        for rows, p in zip(self.rows, parts):
            rows[self.count:self.count + n].copy_(p)
        self.count += n
        if self.spill is not None:
            self.spill.touched(n * sum(self.row_bytes))

    def finish(self) -> tuple[Any, SpillFiles | None]:
        """The filled rows (views, no copy) as one tensor or a tuple, and the files under them (None in memory)."""
        if self.spill is not None:
            self.spill.release()
        memory_budget.current().settle()
        out = tuple(r[:self.count] for r in self.rows)
        return (out if self.is_tuple else out[0]), self.spill
