"""Training batches: which clips each epoch sees, and the frozen prefix run on them.

The order of clips in an epoch depends only on ``(seed, epoch)`` (and the
class balance option), never on worker count or on whether features are
cached, so a cached run and a live run see exactly the same clips.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vtransfer.data.dataset import collate_clips
from vtransfer.engine.inference import batch_inputs
from vtransfer.models.base import VideoBackbone
from vtransfer.utils import distributed
from vtransfer.utils.interrupts import catch_sigint, ignore_sigint
from vtransfer.utils.runtime import autocast

_EPOCH_SEED_STRIDE = 1_000_003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)


def epoch_indices(
    labels: list[int],
    seed: int,
    epoch: int,
    views: int = 1,
    balance_sampler: bool = False,
) -> list[int]:
    """Dataset indices for one training epoch.

    One clip per video: a shuffled permutation of the videos, or with
    ``balance_sampler`` a class-balanced draw with replacement of the same
    size. With ``views > 1`` (fixed augmented views) each video contributes
    one of its ``views`` views, chosen at random, at index ``video * views + view``.
    """
    g = epoch_generator(seed, epoch)
    n = len(labels)
    if balance_sampler:
        counts = torch.bincount(torch.tensor(labels))
        weights = 1.0 / counts[torch.tensor(labels)].double()
        videos = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    else:
        videos = torch.randperm(n, generator=g).tolist()
    if views <= 1:
        return videos
    chosen = torch.randint(0, views, (n,), generator=g).tolist()
    return [v * views + chosen[i] for i, v in enumerate(videos)]


class ClipLoader(DataLoader):
    """A DataLoader whose worker processes never die of Ctrl-C.

    A terminal sends SIGINT to the whole process group. Workers ignore it; the
    main process acts on it only between batches (see ``vtransfer.utils.interrupts.catch_sigint``),
    then shuts the workers down and stops cleanly.
    """

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        try:
            # workers forked inside this block inherit the recording handler, then ignore SIGINT for good
            with catch_sigint(hold=True):
                iterator = super().__iter__()
        except KeyboardInterrupt:
            iterator = None  # shuts the workers down before the interrupt goes on
            raise
        return _InterruptibleBetweenBatches(iterator)


class _InterruptibleBetweenBatches:
    """Wraps a multi-process DataLoader iterator so that Ctrl-C lands between batches.

    Receiving a batch from a worker is a socket handshake that passes file
    descriptors (torch's shared-memory tensors). A KeyboardInterrupt raised in
    the middle of it leaves the worker's resource-sharer thread with a broken
    connection, which it reports with a traceback on the user's terminal.
    """

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._iterator)

    def __next__(self):
        with catch_sigint(hold=True):
            return next(self._iterator)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    indices: list[int] | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``indices`` (default: all, in order) with vtransfer's collate.

    The dataset's reader is first told which clips will be read (:meth:`ClipDataset.prepare`).

    The explicit generator keeps worker seeding from drawing on torch's global
    RNG, so dropout masks do not depend on how batches were produced.
    """
    order = indices if indices is not None else list(range(len(dataset)))
    if hasattr(dataset, "prepare"):
        dataset.prepare(order)  # before workers fork: what the reader readies, they inherit
    return ClipLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        collate_fn=collate_clips,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_sigint if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )


def run_prefix(model: VideoBackbone, x: torch.Tensor, stop: int, device: torch.device, precision: str) -> Any:
    """Frozen groups ``0 .. stop-1`` without autograd (identity when ``stop == 0``)."""
    if stop == 0:
        return x
    with torch.no_grad(), autocast(device, precision):
        out = model.forward_groups(x, 0, stop)
    return _to_float(out)


def _to_float(state: Any) -> Any:
    if isinstance(state, tuple):
        return tuple(_to_float(s) for s in state)
    return state.float() if state.is_floating_point() else state


class LivePrefixSource:
    """Decodes clips every epoch and runs the frozen prefix on them."""

    def __init__(
        self,
        dataset: Dataset,
        labels: list[int],
        model: VideoBackbone,
        prefix_groups: int,
        batch_size: int,
        workers: int,
        device: torch.device,
        precision: str = "fp32",
        seed: int = 0,
        views: int = 1,
        balance_sampler: bool = False,
    ):
        self.dataset = dataset
        self.labels = labels
        self.model = model
        self.prefix_groups = prefix_groups
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.precision = precision
        self.seed = seed
        self.views = views
        self.balance_sampler = balance_sampler

    def num_batches(self) -> int:
        """Batches per epoch (one clip per video)."""
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor, list]]:
        """Decode, normalise and run the prefix for every batch of ``epoch`` (this process's slice of it)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        ctx = distributed.current()
        idx = epoch_indices(self.labels, self.seed, epoch, self.views, self.balance_sampler)
        idx = distributed.shard_global_batches(idx, self.batch_size, ctx)
        local = distributed.local_batch_size(self.batch_size, ctx)
        loader = make_loader(self.dataset, local, self.workers, idx, seed=self.seed * 7919 + epoch)
        for batch in loader:
            if batch["clip"].shape[0] == 0:
                yield None, batch["label"], batch["errors"]
                continue
            x = batch_inputs(batch, self.model.preprocessing, self.device)
            yield run_prefix(self.model, x, self.prefix_groups, self.device, self.precision), batch["label"], batch["errors"]
