"""Frozen-prefix feature cache: run the frozen part of the model once per clip.

When every group below the policy's first trainable group is frozen and the
clips are deterministic (evaluation sampling, or ``K`` fixed augmented views
per training video), the prefix's output for each clip never changes. We
compute it once, keep it in memory, and train the remaining groups on it.
A store that does not fit the memory budget (``--max-memory``,
:mod:`vtransfer.utils.memory_budget`) is written to a memory-mapped file in
the run folder instead (:mod:`vtransfer.engine.spill`), deleted when the store
is dropped; its numbers are the same.
Within one process (``compare-policies``), stores are shared between runs
whose frozen prefix has the same weights and the same clips; a store for a
deeper prefix is derived from a shallower one by running only the groups in
between. A comparison lets its stores go when it ends, unless it runs inside
:func:`kept_between_comparisons` (the demo's second comparison trains the
RGB stream of a two-stream model on the first one's clips).

The epoch's clip order comes from :func:`vtransfer.engine.batches.epoch_indices`,
exactly as for live decoding, so a cached run trains the same model as an
uncached one on the same clips, up to float rounding (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from vtransfer.data.clips import make_clip_dataset
from vtransfer.engine.batches import LivePrefixSource, epoch_indices, make_loader, run_prefix
from vtransfer.engine.inference import ClipPredictions, batch_inputs
from vtransfer.engine.spill import RowBuffer, SpillFiles
from vtransfer.models.base import VideoBackbone
from vtransfer.policies.freezing import set_train_mode
from vtransfer.utils import distributed, memory_budget
from vtransfer.utils.phase_times import phase
from vtransfer.utils.runtime import autocast

# Model config keys that cannot change a frozen prefix's output.
_NOT_PREFIX_KEYS = frozenset({"dropout", "num_classes"})

# (prefix fingerprint, clip-set key) -> FeatureStore; lives for the process.
_STORES: dict[tuple[str, str], "FeatureStore"] = {}
# How many kept_between_comparisons() blocks are open.
_KEEPING = 0


@dataclass
class FeatureStore:
    """Prefix outputs for every item of a dataset, stacked in item order."""

    state: Any  # tensor N x ... or tuple of such tensors
    labels: torch.Tensor
    video: torch.Tensor
    errors: list
    stop: int  # groups 0..stop-1 were applied
    item_index: torch.Tensor | None = None  # dataset item index of each row (failed items are absent)
    spill: SpillFiles | None = None  # the memory-mapped files under ``state`` when it did not fit the budget

    def take(self, idx: torch.Tensor) -> Any:
        """The prefix outputs of items ``idx`` (a copy in memory, also when the store is in a file)."""
        if self.spill is not None:
            self.spill.touched(len(idx) * self.row_bytes())
        if isinstance(self.state, tuple):
            return tuple(s[idx] for s in self.state)
        return self.state[idx]

    def row_bytes(self) -> int:
        """Bytes of one row (all parts)."""
        parts = self.state if isinstance(self.state, tuple) else (self.state,)
        return sum(p[0].numel() * p.element_size() for p in parts if p.shape[0])

    def nbytes(self) -> int:
        """Memory the stored activations use (0 for a store in a memory-mapped file)."""
        if self.spill is not None:
            return 0
        parts = self.state if isinstance(self.state, tuple) else (self.state,)
        return sum(p.numel() * p.element_size() for p in parts)

    def release(self) -> None:
        """The end of an epoch or an evaluation: a spilled store's mapped pages go back to the kernel, and near the
        memory budget the heap's free pages too (:meth:`~vtransfer.utils.memory_budget.MemoryBudget.settle`)."""
        if self.spill is not None:
            self.spill.release()
        memory_budget.current().settle()

    def close(self) -> None:
        """Delete a spilled store's files (the store is being dropped)."""
        if self.spill is not None:
            self.spill.close()


def prefix_fingerprint(model: VideoBackbone, stop: int) -> str:
    """Hash of the parameters and buffers of groups ``0 .. stop-1`` plus the architecture.

    Dropout rates and the class count are left out: the frozen prefix runs in
    eval mode, and the classifier is never part of a prefix. So is a policy's
    structure when none of its added submodules hooks into those groups (an
    attentive probe reads the last map unpooled: the groups below it are the
    family's, and their store is shared with top-3's).
    """
    arch = model.describe()
    arch["config"] = {k: v for k, v in arch["config"].items() if k not in _NOT_PREFIX_KEYS}
    if "structure" in arch and not _edits_below(model, stop):
        del arch["structure"]  # a policy's surgery above the prefix (an attentive probe) leaves it the family's
    h = hashlib.sha1(repr(arch).encode())
    state = model.state_dict()
    for g in model.layer_groups()[:stop]:
        for name in list(g.params) + list(g.buffers):
            t = state[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    h.update(str(stop).encode())
    return h.hexdigest()


def _edits_below(model: VideoBackbone, stop: int) -> bool:
    """Whether a structured model's added submodules hook into any of groups ``0 .. stop-1``."""
    edits = getattr(model, "group_edits", None)
    if edits is None:
        return True  # a structure without recorded edits: assume it changes everything
    touched = {*edits.before, *edits.after, *edits.unpooled, *edits.owned}
    return any(index < stop for index in touched)


def clipset_key(dataset, extra: str = "") -> str:
    """Identity of a deterministic clip set: files, mode, views, seed, preprocessing."""
    parts = [
        getattr(dataset, "mode", "?"),
        str(getattr(dataset, "fixed_views", None)),
        str(getattr(dataset, "clips_per_video", None)),
        str(getattr(dataset, "seed", None)),
        repr(dataset.preprocessing.to_dict()),
        repr(getattr(dataset, "transform", None)),  # the augmentation (crop scale) makes different views
        *[str(r.path) for r in dataset.records],
        extra,
    ]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


@torch.no_grad()
def compute_store(model: VideoBackbone, dataset, stop: int, batch_size: int, workers: int, device: torch.device, precision: str) -> FeatureStore:
    """Run groups ``0 .. stop-1`` once over every item of ``dataset`` (model in its current mode).

    The rows go straight into a buffer of ``len(dataset)`` rows, in memory or,
    past the memory budget, in a memory-mapped file (:class:`~vtransfer.engine.spill.RowBuffer`).
    """
    loader = make_loader(dataset, batch_size, workers)
    rows: RowBuffer | None = None
    labels, videos, errors, keep = [], [], [], []
    with phase("prefix") as clips_done:  # the clips' reading included: the prefix waits for it
        for batch in loader:
            errors.extend(batch["errors"])
            if batch["clip"].shape[0] == 0:
                continue
            x = batch_inputs(batch, model.preprocessing, device)
            state = _detach_cpu(run_prefix(model, x, stop, device, precision))
            if rows is None:
                rows = RowBuffer(state, len(dataset))
            rows.append(state)
            labels.append(batch["label"])
            videos.append(batch["video"])
            keep.append(batch["video"] * max(1, getattr(dataset, "fixed_views", 1) or 1) + batch["view"])
            clips_done(x.shape[0])
    if rows is None:
        raise RuntimeError("no clip of the dataset could be decoded")
    state, spill = rows.finish()
    return FeatureStore(state, torch.cat(labels), torch.cat(videos), errors, stop, torch.cat(keep), spill)


def _detach_cpu(state: Any) -> Any:
    if isinstance(state, tuple):
        return tuple(_detach_cpu(s) for s in state)
    return state.detach().cpu()


def get_store(model: VideoBackbone, dataset, stop: int, batch_size: int, workers: int, device: torch.device, precision: str) -> FeatureStore:
    """A shared store for (prefix weights, clip set); derived from a shallower one when possible."""
    key_clips = clipset_key(dataset)
    fp = prefix_fingerprint(model, stop)
    if (fp, key_clips) in _STORES:
        return _STORES[(fp, key_clips)]
    # A shallower store with identical weights up to its depth: run only the missing groups.
    for k in range(stop - 1, 0, -1):
        base = _STORES.get((prefix_fingerprint(model, k), key_clips))
        if base is not None:
            store = _derive(model, base, stop, batch_size, device, precision)
            break
    else:
        store = compute_store(model, dataset, stop, batch_size, workers, device, precision)
    _STORES[(fp, key_clips)] = store
    return store


@torch.no_grad()
def _derive(model: VideoBackbone, base: FeatureStore, stop: int, batch_size: int, device: torch.device, precision: str) -> FeatureStore:
    n = base.labels.shape[0]
    rows: RowBuffer | None = None
    with phase("prefix") as clips_done:
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            s = _to_device(base.take(idx), device)
            with autocast(device, precision):
                out = _detach_cpu(_float(model.forward_groups(s, base.stop, stop)))
            if rows is None:
                rows = RowBuffer(out, n)
            rows.append(out)
            clips_done(len(idx))
    base.release()
    state, spill = rows.finish()  # type: ignore[union-attr]  # a store has at least one row
    return FeatureStore(state, base.labels, base.video, base.errors, stop, base.item_index, spill)


def _to_device(state: Any, device: torch.device) -> Any:
    if isinstance(state, tuple):
        return tuple(_to_device(s, device) for s in state)
    return state.to(device)


def _float(state: Any) -> Any:
    if isinstance(state, tuple):
        return tuple(_float(s) for s in state)
    return state.float()


def clear_stores() -> None:
    """Forget every shared store (tests, or to free memory); spilled stores' files are deleted."""
    for store in _STORES.values():
        store.close()
    _STORES.clear()


def store_keys() -> set[tuple[str, str]]:
    """The keys of the shared stores held now (to see which ones a run added)."""
    return set(_STORES)


def drop_stores(keys) -> int:
    """Forget the shared stores under ``keys`` (deleting spilled ones' files); return the bytes of memory let go."""
    freed = 0
    for key in keys:
        store = _STORES.pop(key, None)
        if store is not None:
            freed += store.nbytes()
            store.close()
    return freed


def comparisons_keep_stores() -> bool:
    """Whether a comparison ending now should leave its stores for a later one (:func:`kept_between_comparisons`)."""
    return _KEEPING > 0


@contextlib.contextmanager
def kept_between_comparisons() -> Iterator[None]:
    """Comparisons run inside this block leave their stores to the ones after them; all go when it ends."""
    global _KEEPING
    before = store_keys()
    _KEEPING += 1
    try:
        yield
    finally:
        _KEEPING -= 1
        if not _KEEPING:
            drop_stores(store_keys() - before)


def prune_stores(keys) -> int:
    """Of the shared stores under ``keys``, keep per clip set those a deeper prefix can still use; drop the rest.

    Kept: the deepest stores (reused as they are by the next policy at that
    depth) and the deepest one below them (the base a store at that depth
    but with other surgery, an attentive probe's unpooled map, is derived
    from: :func:`get_store`). Returns the bytes of memory let go.
    """
    by_clips: dict[str, list[tuple[int, tuple[str, str]]]] = {}
    for key in keys:
        store = _STORES.get(key)
        if store is not None:
            by_clips.setdefault(key[1], []).append((store.stop, key))
    drop = []
    for held in by_clips.values():
        deepest = max(stop for stop, _ in held)
        below = max((stop for stop, _ in held if stop < deepest), default=None)
        drop += [key for stop, key in held if stop not in (deepest, below)]
    return drop_stores(drop)


@torch.no_grad()
def cached_clip_probs(model: VideoBackbone, dataset, stop: int, batch_size: int, workers: int, device: torch.device, precision: str):
    """Clip probabilities with the frozen prefix read from a shared store (eval mode for the rest)."""

    was_training = model.training
    model.eval()
    store = get_store(model, dataset, stop, batch_size, workers, device, precision)
    n_groups = len(model.layer_groups())
    probs = []
    n = store.labels.shape[0]
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        with autocast(device, precision):
            logits = model.forward_groups(_to_device(store.take(idx), device), stop, n_groups)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    store.release()
    model.train(was_training)
    return ClipPredictions(torch.cat(probs).numpy(), store.video.numpy(), list(store.errors))


class CachedPrefixSource:
    """Training batches read from a :class:`FeatureStore` of fixed views."""

    def __init__(self, store: FeatureStore, labels: list[int], views: int, batch_size: int, seed: int, device: torch.device,
                 balance_sampler: bool = False, paths: list | None = None):
        self.store = store
        self.paths = paths or []
        self.reasons = {str(p): r for p, r in store.errors}
        self.labels = labels
        self.views = views
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.balance_sampler = balance_sampler
        # dataset item index -> row of the store (items that failed to decode are absent)
        self.row_of = {int(item): row for row, item in enumerate(store.item_index.tolist())}

    def _error(self, item: int) -> tuple[str, str]:
        """(path, reason) of a dataset item whose clip could not be decoded when the store was built."""
        video = item // max(1, self.views)
        path = str(self.paths[video]) if video < len(self.paths) else f"(video {video})"
        return path, self.reasons.get(path, "failed to decode")

    def num_batches(self) -> int:
        """Batches per epoch (one view per video)."""
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def batches(self, epoch: int) -> Iterator[tuple[Any, torch.Tensor, list]]:
        """Same clip order as live decoding; prefix outputs come from the store."""

        ctx = distributed.current()
        items = epoch_indices(self.labels, self.seed, epoch, self.views, self.balance_sampler)
        items = distributed.shard_global_batches(items, self.batch_size, ctx)
        local = distributed.local_batch_size(self.batch_size, ctx)
        for i in range(0, len(items), local):
            chunk = items[i : i + local]
            rows = [self.row_of[it] for it in chunk if it in self.row_of]
            errors = [self._error(it) for it in chunk if it not in self.row_of]
            idx = torch.tensor(rows, dtype=torch.long)
            if len(rows) == 0:
                yield None, torch.zeros(0, dtype=torch.long), errors
                continue
            yield _to_device(self.store.take(idx), self.device), self.store.labels[idx], errors
        self.store.release()


def resolve_views(cached_views: int | None, epochs: int, prefix_groups: int) -> int:
    """Fixed augmented views per video: ``None`` = auto (min(epochs, 5) when a frozen prefix exists), 0 = off."""
    if prefix_groups == 0:
        return 0
    if cached_views is None:
        return min(epochs, 5)
    return max(0, int(cached_views))


def build_prefix_source(*, model, plan, train_records, class_to_idx, labels, opts, config, device, reader, balance_sampler: bool):
    """Choose how training batches are produced: cached prefix features or live decoding.

    ``opts`` are the run's clip options, ``config`` its resolved training
    (:class:`vtransfer.run_config.ResolvedTraining`: epochs, seed, precision).
    """

    k = plan.first_trainable_group
    views = resolve_views(opts.cached_views, config.epochs, k)
    seed, precision = config.training.seed, config.training.precision
    train_ds = make_clip_dataset(train_records, class_to_idx, model.preprocessing, "train", opts, seed=seed,
                                 reader=reader, views=views or None)
    if views > 0:

        set_train_mode(model, True)  # frozen prefix modules are in eval mode
        store = get_store(model, train_ds, k, opts.batch_size, opts.workers, device, precision)
        return CachedPrefixSource(store, labels, views, opts.batch_size, seed, device, balance_sampler,
                                  paths=[r.path for r in train_records])
    return LivePrefixSource(train_ds, labels, model, k, opts.batch_size, opts.workers, device, precision,
                            seed=seed, balance_sampler=balance_sampler)
