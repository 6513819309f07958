"""Import state dicts of torchvision's video classifiers (``r3d_18`` ... ``swin3d_b``).

vtransfer's wrappers (:mod:`vtransfer.models.tv_video`) hold the torchvision
network itself as ``model.net``, so a torchvision state dict - a ``*.pth``
from ``download.pytorch.org``, or ``state_dict()`` of a network built by
``torchvision.models.video`` - loads into ``model.net`` with a checked
``load_state_dict`` (vtransfer's own names are the same under ``net.``).
:class:`TorchvisionVideoLayout` recognises which of the nine networks a file
holds by comparing every key and shape (the classifier's class count aside)
with the network torchvision builds, on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import get_model_builder

from vtransfer.utils.errors import WeightsError
from vtransfer.weights.keymatch import state_dict_problems
from vtransfer.weights.source import ForeignLayout

_COUNTER = "num_batches_tracked"  # BatchNorm counters: absent from files saved by old PyTorch, unused here


@lru_cache(maxsize=None)
def reference_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict torchvision's ``backbone`` builder makes (400 classes; no memory used)."""

    with torch.device("meta"):
        net = get_model_builder(backbone)(weights=None)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@dataclass(frozen=True)
class TorchvisionVideoLayout(ForeignLayout):
    """A torchvision video network's state-dict layout: the identifying keys, then every key and shape."""

    def matches(self, state_dict: dict[str, Any]) -> bool:
        """True if ``state_dict`` has exactly the keys and shapes of this network (any class count)."""
        if not super().matches(state_dict):
            return False
        want = {k: v for k, v in reference_shapes(self.backbone).items() if not k.endswith(_COUNTER)}
        have = {k: v for k, v in state_dict.items() if not k.endswith(_COUNTER)}
        if set(want) != set(have):
            return False
        head = (self.head_key or "").rpartition(".")[0] + "."
        for key, shape in want.items():
            got = tuple(getattr(have[key], "shape", ()))
            if got != shape and not (key.startswith(head) and got[1:] == shape[1:]):
                return False
        return True


def load_torchvision_video_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Load a torchvision state dict into ``model.net`` of a vtransfer torchvision-video backbone, exactly.

    Missing BatchNorm ``num_batches_tracked`` counters are filled with zeros.
    Any other difference (missing, unexpected or mis-shaped keys) is a
    :class:`WeightsError` naming them; ``model`` is then untouched.
    """
    net = model.net
    sd = dict(state_dict)
    target = net.state_dict()
    for key, value in target.items():
        if key.endswith(_COUNTER) and key not in sd:
            sd[key] = torch.zeros_like(value)
    problems = state_dict_problems(target, sd)
    if problems:
        name = getattr(model, "backbone_name", type(model).__name__)
        raise WeightsError(f"state dict does not match torchvision's {name} ({getattr(model, 'num_classes', '?')} classes, "
                           f"{len(target)} tensors): " + "; ".join(problems))
    net.load_state_dict(sd, strict=True)
