"""Multi-process training on PyTorch's own engine (torch.distributed + DistributedDataParallel).

``torchrun --nproc_per_node N -m vtransfer finetune ...`` starts N processes
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`init_from_env` joins
them into one process group (gloo on CPU, NCCL on GPU). Each global batch of
clips is cut into equal per-rank slices (:func:`shard_global_batches`), so N
processes with per-rank batch ``B/N`` see exactly the clips one process sees
with batch ``B``; DDP averages the gradients; metrics are reduced across
ranks; only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vtransfer.utils.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(shutdown)
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def shutdown() -> None:
    """Destroy the process group while Python is still fully alive (no-op when there is none).

    Left to interpreter teardown, gloo's worker threads can still hold
    tensors and abort the process with "terminate called without an active
    exception" (SIGABRT), which made a finished rank fail the whole job.
    :func:`init_from_env` registers this to run at exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistContext:
    """The context of an already initialised job (single process otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def local_batch_size(global_batch: int, ctx: DistContext) -> int:
    """Per-process batch; the global batch must split evenly so results match one process."""
    if global_batch % ctx.world:
        raise ConfigError(f"--batch-size {global_batch} must be divisible by the number of processes ({ctx.world})")
    return global_batch // ctx.world


def shard_global_batches(indices: list[int], global_batch: int, ctx: DistContext) -> list[int]:
    """This rank's slice of every global batch of ``indices``, in order.

    Global batch ``k`` is ``indices[k*B:(k+1)*B]``; rank ``r`` takes its
    ``r``-th contiguous part. A short last batch is split as evenly as possible.
    """
    if not ctx.enabled:
        return list(indices)
    out: list[int] = []
    for start in range(0, len(indices), global_batch):
        chunk = indices[start : start + global_batch]
        per = -(-len(chunk) // ctx.world)
        out.extend(chunk[ctx.rank * per : (ctx.rank + 1) * per])
    return out


def all_reduce_sums(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (identity for one process)."""
    ctx = current()
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    ctx = current()
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if current().enabled:
        dist.barrier()


def wrap_trainable(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap the trainable part in DistributedDataParallel when running distributed."""
    if not current().enabled:
        return module

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
