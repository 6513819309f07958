"""Exponential moving average (EMA) of a model's trainable weights.

After every optimiser step each shadow tensor becomes
``d * shadow + (1 - d) * current``, with ``d = decay``, or with ``warmup``
(the default, as TensorFlow's ``ExponentialMovingAverage(num_updates=...)``)
``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (from 0): early
on the shadow follows the weights closely instead of staying near the
initial ones, which matters for short fine-tuning runs (a run of 100 steps
with ``decay = 0.999`` would otherwise keep 90% of the initial weights). The shadow covers the trainable
parameters and the buffers of every layer group that trains (BatchNorm
statistics, averaged the same way; integer buffers such as
``num_batches_tracked`` are copied). Frozen weights never change, so they
need no shadow. With EMA on, validation and the saved best model use the
shadow weights (:meth:`WeightEma.applied`); the resume state holds both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from vtransfer.models.base import VideoBackbone
from vtransfer.run_config import check_ema_decay


def shadowed_names(model: VideoBackbone) -> list[str]:
    """Names (as in ``model.state_dict()``) the EMA follows: trainable parameters, buffers of training groups."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, _ in model.named_parameters() if n in trainable]
    for group in model.layer_groups():
        if trainable.intersection(group.params):
            names += list(group.buffers)
    return names


class WeightEma:
    """Shadow copies of ``model``'s trainable weights, updated by :meth:`update`.

    The shadow starts equal to the model's current weights.
    """

    def __init__(self, model: VideoBackbone, decay: float, warmup: bool = True):
        check_ema_decay(decay)
        self.decay = float(decay)
        self.warmup = warmup
        self.names = shadowed_names(model)
        tensors = self._tensors(model)
        self.shadow: dict[str, torch.Tensor] = {n: t.detach().clone() for n, t in tensors.items()}
        self.updates = 0

    def _tensors(self, model: VideoBackbone) -> dict[str, torch.Tensor]:
        """The model's live tensors for :attr:`names` (parameters and buffers, not copies)."""
        live = dict(model.named_parameters())
        live.update(dict(model.named_buffers()))
        return {n: live[n] for n in self.names}

    def current_decay(self) -> float:
        """The ``d`` of the next update: ``decay``, or ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: VideoBackbone) -> None:
        """``shadow = d * shadow + (1 - d) * current`` for every followed tensor (``d``: :meth:`current_decay`)."""
        d = self.current_decay()
        for name, current in self._tensors(model).items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.mul_(d).add_(current.detach().to(shadow.dtype), alpha=1.0 - d)
            else:
                shadow.copy_(current)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: VideoBackbone) -> Iterator[VideoBackbone]:
        """Within the block ``model`` holds the shadow weights; its own come back afterwards (also on errors)."""
        tensors = self._tensors(model)
        with torch.no_grad():
            saved = {n: t.detach().clone() for n, t in tensors.items()}
            for n, t in tensors.items():
                t.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in tensors.items():
                    t.copy_(saved[n])

    def state_dict(self) -> dict[str, Any]:
        """The shadow (on the CPU), decay and update count, for the resume state."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (the followed names must match)."""
        missing = sorted(set(self.names) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in self.shadow.items():
                t.copy_(state["shadow"][n])
        self.updates = int(state.get("updates", 0))
