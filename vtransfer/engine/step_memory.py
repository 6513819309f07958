"""Does one training step fit the memory budget? Measured, then a micro-batch or gradient checkpointing if not (issue 23).

Before training, :func:`fit_step_to_memory` measures the network's forward
pass without autograd (:func:`measure_forward`: what feature stores,
validation and the test split run on ``--batch-size`` clips at a time), and,
for a policy that backpropagates through layers of the network (anything
but a head on cached features), one training step: :func:`measure_step` runs forward and backward on random clips of
1 and 2 rows through the trainable part, exactly as the trainer will, and
reads how far the resident set rose at its peak (glibc's free pages given
back first, then sampled by a thread while the step runs; where it cannot be
read, the bytes autograd saved for the backward pass, which are also a floor
under the measurement). Two sizes give a fixed part (the
gradients) and a part per clip (the activations); the optimiser's state and
an EMA copy of the weights are added from the parameter sizes. Under the
tuned allocator (:mod:`vtransfer.utils.allocator`: every block from the heap)
the real steps of a whole batch rise further than the two small ones
extrapolate to, because the blocks they free do not all fit the next step's
tensors; :data:`HEAP_FRAGMENTATION` scales both measurements for that. The model's
weights, buffers (BatchNorm statistics), gradients, modes and the random
number generator are put back as they were, so the run trains exactly as
without the measurement.

When ``--batch-size`` clips (``--micro-batch`` when set) would not fit the
room the budget has left (:mod:`vtransfer.utils.memory_budget`), it picks,
and says so: for a network whose BatchNorm statistics train, gradient
checkpointing first (the same numbers, about 1.3-1.7x the step time; micro-
batches would change the batch statistics), then checkpointing with the
largest micro-batch that fits; for any other network the largest micro-batch
that fits (the same gradients up to float rounding), then checkpointing with
one. If even one clip with checkpointing does not fit (or the forward pass
of a batch does not), the run stops with
:class:`~vtransfer.utils.memory_budget.MemoryBudgetError`, naming the memory
it needs and options that would fit. The larger need is then reserved, so the
feature stores built after it leave room for it. GPU runs are not checked:
their activations live in the GPU's memory, not the budget's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vtransfer.engine.batches import run_prefix
from vtransfer.engine.trainer import TrainablePart
from vtransfer.models.base import VideoBackbone
from vtransfer.policies.freezing import PolicyPlan, set_train_mode
from vtransfer.run_config import ResolvedTraining
from vtransfer.utils import distributed, memory_budget
from vtransfer.utils.allocator import MallocTuning, malloc_tuning
from vtransfer.utils.memory_budget import MemoryBudgetError, format_bytes, option_text
from vtransfer.utils.runtime import autocast

#: Clips of the two measured steps.
MEASURED_CLIPS = (1, 2)
#: How much further a whole batch's steps rise under the tuned allocator than the steps of 1 and 2 clips
#: extrapolate to. Measured (effnet3d from ImageNet, ``all``, 224 px, batch 8, four AdamW steps after the
#: measurement, on 2 cores): 1.02-1.35x over seven runs with and without gradient checkpointing (the resident
#: set at the peak; it varies with the heap's history); under glibc's defaults 0.70-0.93x (two runs). The
#: largest, and a margin.
HEAP_FRAGMENTATION = 1.4


@dataclass(frozen=True)
class StepMemory:
    """What one training step takes above what the process holds: ``fixed + per_clip x clips`` bytes."""

    fixed: int
    per_clip: int
    checkpointing: bool
    how: str = "measured"  # "peak resident set" or "bytes saved for backward" (or "given" in tests)

    def need(self, clips: int) -> int:
        """Bytes of a step of ``clips`` rows."""
        return self.fixed + self.per_clip * clips

    def most_clips(self, room: int) -> int:
        """The most rows a step may take within ``room`` bytes (0: not even one)."""
        if self.per_clip <= 0:
            return 1 << 30 if self.fixed <= room else 0
        return max(0, (room - self.fixed) // self.per_clip)


@dataclass(frozen=True)
class StepChoice:
    """How the training step runs: ``micro_batch`` rows per pass (None: the whole batch), checkpointing or not."""

    micro_batch: int | None
    grad_checkpointing: bool
    need: int  # bytes of the step as chosen
    memory: StepMemory


def _state_bytes(state: Any) -> int:
    parts = state if isinstance(state, tuple) else (state,)
    return sum(p.numel() * p.element_size() for p in parts)


def heap_margin(tuning: MallocTuning | None = None) -> float:
    """:data:`HEAP_FRAGMENTATION` when the allocator serves every block from the heap (``tuning``, by default
    this process's :func:`~vtransfer.utils.allocator.malloc_tuning`), else 1."""
    tuning = tuning if tuning is not None else malloc_tuning()
    return HEAP_FRAGMENTATION if tuning is not None and tuning.applied.get("M_MMAP_MAX") == 0 else 1.0


def with_heap_margin(mem: StepMemory, margin: float) -> StepMemory:
    """``mem`` with both parts scaled by ``margin`` (and its ``how`` saying so); ``mem`` itself when it is 1."""
    if margin == 1.0:
        return mem
    return StepMemory(int(mem.fixed * margin), int(mem.per_clip * margin), mem.checkpointing,
                      f"{mem.how}, x{margin:g} for the heap's fragmentation")


def _release_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def measure_step(model: VideoBackbone, plan: PolicyPlan, device: torch.device, precision: str,
                 checkpointing: bool, clips: tuple[int, int] = MEASURED_CLIPS) -> StepMemory:
    """Forward and backward on random clips of ``clips`` rows; the step's fixed and per-clip bytes.

    Runs the trainable part (groups ``plan.first_trainable_group ..``) as the
    trainer does (train mode, ``precision``'s autocast, ``checkpointing``) on
    the frozen prefix's output of random input of the model's clip shape;
    everything it changes is put back. The prefix output itself (the batch
    the trainer holds during the step) is counted per clip.
    """
    start = plan.first_trainable_group
    part = TrainablePart(model, start, grad_checkpointing=checkpointing)
    pre = model.preprocessing
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    totals: list[tuple[int, int]] = []  # (resident growth or -1, bytes saved for backward), per size
    _release_grads(model)
    set_train_mode(model, True, plan.policy)
    try:
        for n in clips:
            x = torch.randn((n, pre.channels, pre.frames, *pre.crop_size), generator=generator).to(device)
            state = run_prefix(model, x, start, device, precision)
            del x
            held = _state_bytes(state)
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                try:
                    storage = t.untyped_storage()
                    saved[storage.data_ptr()] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # pragma: no cover - tensors without storage
                    pass
                return t

            memory_budget.release_free_heap()
            with memory_budget.PeakSampler() as rss:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    with autocast(device, precision):
                        logits = part(state)
                        loss = logits.float().logsumexp(1).sum()
                loss.backward()
            del logits, loss, state
            _release_grads(model)
            totals.append((rss.grown + held if rss.grown >= 0 else -1, sum(saved.values()) + held))
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, training in modes.items():
            m.train(training)
        torch.set_rng_state(rng)
        _release_grads(model)
    (r1, s1), (r2, s2) = totals
    use_rss = r1 >= 0 and r2 >= 0
    fixed, per_clip = _two_sizes((r1, r2) if use_rss else (s1, s2), clips)
    per_clip = max(per_clip, -(-s2 // clips[1]))  # what autograd keeps is a floor under any measurement
    measured = StepMemory(fixed, per_clip, checkpointing, "peak resident set" if use_rss else "bytes saved for backward")
    return with_heap_margin(measured, heap_margin())


def _two_sizes(grown: tuple[int, int], clips: tuple[int, int]) -> tuple[int, int]:
    """(fixed, per clip) bytes from the growth measured at two sizes; all of it per clip when the two disagree."""
    (a, b), (n1, n2) = grown, clips
    per_clip = (b - a) // max(1, n2 - n1)
    fixed = a - per_clip * n1
    if per_clip <= 0 or fixed < 0:  # noise: all of it per clip
        per_clip, fixed = -(-b // n2), 0
    return int(fixed), int(per_clip)


def measure_forward(model: VideoBackbone, device: torch.device, precision: str,
                    clips: tuple[int, int] = MEASURED_CLIPS) -> StepMemory:
    """The whole network's forward pass without autograd on random clips (eval mode): its transient bytes.

    Frozen-prefix feature stores, validation and the test split run this
    pass on ``--batch-size`` clips at a time; its activations come and go,
    but the process must have room for them.
    """
    pre = model.preprocessing
    modes = {m: m.training for m in model.modules()}
    generator = torch.Generator().manual_seed(0)
    grown = []
    model.eval()
    try:
        for n in clips:
            x = torch.randn((n, pre.channels, pre.frames, *pre.crop_size), generator=generator).to(device)
            memory_budget.release_free_heap()
            with memory_budget.PeakSampler() as rss, torch.no_grad(), autocast(device, precision):
                out = model.forward_groups(x, 0, len(model.layer_groups()))
            grown.append(rss.grown + _state_bytes(x) if rss.grown >= 0 else -1)
            del x, out
    finally:
        for m, training in modes.items():
            m.train(training)
    if min(grown) < 0:
        return StepMemory(0, 0, False, "not measured (no resident set to read)")
    fixed, per_clip = _two_sizes((grown[0], grown[1]), clips)
    return with_heap_margin(StepMemory(fixed, per_clip, False, "peak resident set"), heap_margin())


def persistent_bytes(model: nn.Module, config: ResolvedTraining) -> int:
    """Memory the training adds for good at its first step: the optimiser's state, and the EMA's copy of the weights."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = trainable * (2 if config.optimizer == "adamw" else 1)  # AdamW: two moments; SGD: momentum
    if config.training.ema_decay is not None:
        state += sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())
    return state


def trains_batch_norm(model: nn.Module, plan: PolicyPlan) -> bool:
    """Whether a training step updates BatchNorm statistics (then micro-batches would change the numbers)."""
    modes = {m: m.training for m in model.modules()}
    set_train_mode(model, True, plan.policy)
    found = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    for m, training in modes.items():
        m.train(training)
    return found


def choose_step(clips: int, micro_batch: int | None, checkpointing: bool, room: int,
                measure: Callable[[bool], StepMemory], prefer_checkpointing: bool
                ) -> tuple[StepChoice | None, dict[bool, StepMemory]]:
    """The step's set-up within ``room`` bytes (``None`` when nothing fits), and the measurements made.

    ``clips`` is the batch of one optimiser step in this process, ``micro_batch``
    and ``checkpointing`` what the user asked for (kept when they fit; asked-for
    checkpointing is never turned off). ``measure(checkpointing)`` gives a
    :class:`StepMemory`; the measurements come back by ``checkpointing``.
    """
    rows = min(micro_batch or clips, clips)
    measured = {checkpointing: measure(checkpointing)}
    asked = measured[checkpointing]
    if asked.need(rows) <= room:
        return StepChoice(micro_batch, checkpointing, asked.need(rows), asked), measured
    order = [True] if checkpointing else ([True, False] if prefer_checkpointing else [False, True])
    for ckpt in order:
        if ckpt not in measured:
            measured[ckpt] = measure(ckpt)
        mem = measured[ckpt]
        n = min(rows, mem.most_clips(room))
        if n >= 1:
            return StepChoice(n if n < clips else None, ckpt, mem.need(n), mem), measured
    return None, measured


def _size_hint(model: VideoBackbone, mem: StepMemory, room: int) -> str:
    """``, --size 112`` when a smaller crop would fit (activations shrink with its area), else ``""``."""
    size = model.preprocessing.crop_size[0]
    if mem.per_clip <= 0 or room <= mem.fixed:
        return ""
    smaller = int(size * ((room - mem.fixed) / mem.per_clip) ** 0.5) // 16 * 16
    return f", --size {smaller} or smaller (activations shrink with the crop's area)" if 32 <= smaller < size else ""


def fit_step_to_memory(model: VideoBackbone, plan: PolicyPlan, config: ResolvedTraining, device: torch.device,
                       message: Callable[[str], None] | None = None, *,
                       measure: Callable[[bool], StepMemory] | None = None,
                       forward: Callable[[], StepMemory] | None = None,
                       budget: memory_budget.MemoryBudget | None = None) -> ResolvedTraining:
    """``config`` with ``micro_batch`` / ``grad_checkpointing`` changed when one step would not fit the budget.

    The forward pass without autograd (:func:`measure_forward`: stores,
    validation, test) is measured for every policy, the training step
    (:func:`measure_step`) for those that backpropagate through more than the
    head; the larger need is set aside in the budget, so the feature stores
    built afterwards leave room for it. Nothing is measured on a GPU.
    ``measure`` and ``forward`` replace the measurements (tests); ``budget``
    the process's budget.

    Raises:
        MemoryBudgetError: the forward pass of ``--batch-size`` clips, or a
            training step of even one clip with gradient checkpointing, does not fit.
    """
    groups = model.layer_groups()
    if device.type != "cpu":
        return config
    budget = budget if budget is not None else memory_budget.current()
    t = config.training
    clips = distributed.local_batch_size(config.batch_size, distributed.current())
    keep = persistent_bytes(model, config)
    room = budget.room() - keep
    passes = (forward or (lambda: measure_forward(model, device, t.precision)))()
    passes_need = passes.need(config.batch_size)
    if passes_need > room:
        held = budget.limit - budget.remaining()
        fewer = min(config.batch_size - 1, passes.most_clips(room))
        raise MemoryBudgetError(
            f"the forward pass of --batch-size {config.batch_size} clips (feature stores, validation, test) needs "
            f"about {format_bytes(passes_need)} ({format_bytes(passes.per_clip)} a clip, {passes.how}), but the memory "
            f"budget, {budget.describe()}, has {format_bytes(max(0, room + keep))} left: the process holds "
            f"{format_bytes(held)} already. Options that would fit: --max-memory "
            f"{option_text(held + passes_need + keep)} or more"
            + (f", --batch-size {fewer}" if fewer >= 1 else "") + f"{_size_hint(model, passes, room)}"
            ". Stopped before training.")
    if plan.first_trainable_group >= len(groups) - 1:  # the head alone trains: its step is small
        budget.reserve(passes_need + keep)
        return config
    if measure is None:
        def measure(ckpt: bool) -> StepMemory:
            return measure_step(model, plan, device, t.precision, ckpt)
    choice, measured = choose_step(clips, t.micro_batch, t.grad_checkpointing, room, measure,
                                   trains_batch_norm(model, plan))
    rows = min(t.micro_batch or clips, clips)
    if choice is None:
        smallest = measured[True]
        need = smallest.need(1) + keep
        held = budget.limit - budget.remaining()
        raise MemoryBudgetError(
            f"--policy {plan.policy} needs about {format_bytes(need)} for one training step even with --micro-batch 1 "
            f"and gradient checkpointing ({format_bytes(smallest.per_clip)} a clip, {format_bytes(smallest.fixed)} "
            f"more for the step and {format_bytes(keep)} of optimiser state; {smallest.how}), but the memory budget, "
            f"{budget.describe()}, has {format_bytes(max(0, room + keep))} left: the process holds "
            f"{format_bytes(held)} already (the model, and the frame cache and feature stores when they are in "
            f"memory). Options that would fit: --max-memory {option_text(held + need)} or more"
            f"{_size_hint(model, smallest, room)}, --cache none, or a policy that trains fewer layers "
            f"(top-3, top-layer). Stopped before training.")
    budget.reserve(max(choice.need, passes_need) + keep)
    if (choice.micro_batch, choice.grad_checkpointing) == (t.micro_batch, t.grad_checkpointing):
        return config
    asked = measured[t.grad_checkpointing]
    how = []
    if choice.micro_batch is not None and choice.micro_batch != t.micro_batch:
        how.append(f"--micro-batch {choice.micro_batch}")
    if choice.grad_checkpointing and not t.grad_checkpointing:
        how.append("gradient checkpointing (--grad-checkpointing)")
    if message is not None:
        message(f"memory: one training step of {rows} clips needs about {format_bytes(asked.need(rows) + keep)} "
                f"({format_bytes(asked.per_clip)} a clip, {asked.how}), more than the {format_bytes(max(0, room + keep))} "
                f"left of the memory budget, {budget.describe()}; training with {' and '.join(how)} instead: about "
                f"{format_bytes(choice.need + keep)}, still {config.batch_size} clips per optimiser step")
    return dataclasses.replace(config, training=dataclasses.replace(t, micro_batch=choice.micro_batch,
                                                                    grad_checkpointing=choice.grad_checkpointing))
