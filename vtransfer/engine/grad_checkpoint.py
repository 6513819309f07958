"""Gradient checkpointing over layer groups: recompute activations in the backward pass.

Each layer group of the trainable part (a ViViT transformer block, an I3D
Inception block, a CNN stage; see :mod:`vtransfer.models.base`) runs under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant): only its input is
kept for the backward pass, and its forward runs again there. Peak memory
falls from "every activation of every group" to "every group's input plus
one group's activations"; a training step costs about one more forward pass.
Gradients are the same: the recomputation replays the RNG state (dropout
masks) and autocast state of the first run.

Generic over the layer-group contract, applied from outside the model
(``model.run_group``). The head is not checkpointed (its activations are
tiny). BatchNorm in training mode would update its running statistics a
second time during the recomputation; :func:`_keep_buffers` puts the group's
buffers back as they were, so the statistics advance once per step as without
checkpointing.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from vtransfer.models.base import LayerGroup, State, VideoBackbone


@contextlib.contextmanager
def _keep_buffers(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Restore ``buffers`` to their values at entry when the block ends."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _contexts(buffers: list[torch.Tensor]):
    """``context_fn`` for checkpoint: nothing around the first forward, buffers kept around the recomputation."""
    return contextlib.nullcontext(), _keep_buffers(buffers)


def group_buffers(model: VideoBackbone, group: LayerGroup) -> list[torch.Tensor]:
    """The buffers ``group`` may change: those it lists, and those of the modules owning its parameters."""
    named = dict(model.named_buffers())
    names = [n for n in group.buffers if n in named]
    for param in group.params:
        owner = param.rpartition(".")[0]
        if owner:
            module = model.get_submodule(owner)
            names += [f"{owner}.{n}" for n, _ in module.named_buffers(recurse=False)]
    return [named[n] for n in dict.fromkeys(names)]


def forward_groups_checkpointed(model: VideoBackbone, state: State, start: int, stop: int) -> State:
    """``model.forward_groups(state, start, stop)``, each non-head group checkpointed while autograd records.

    Without autograd (``torch.no_grad``, inference) it is the plain forward pass.
    """
    groups = model.layer_groups()
    for i in range(start, stop):
        if not torch.is_grad_enabled() or groups[i].tag == "head":
            state = model.run_group(i, state)
            continue
        buffers = group_buffers(model, groups[i])
        state = checkpoint(model.run_group, i, state, use_reentrant=False, context_fn=partial(_contexts, buffers))
    return state
