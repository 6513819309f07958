"""2D -> 3D weight inflation (Carreira & Zisserman 2017, section 2.4).

An ImageNet 2D filter of size ``h x w`` becomes a 3D filter of size
``t x h x w`` by repeating it ``t`` times along time and dividing by ``t``.
On a "boring" video (one image repeated) the 3D conv then computes, at
every time step whose window stays inside the clip, exactly what the 2D
conv computes on that image - the boring-video fixed point. BatchNorm
parameters and statistics carry over unchanged (their input is unchanged).

:func:`inflate_googlenet_into_i3d` fills an :class:`~vtransfer.models.i3d.I3D`
from torchvision's GoogLeNet (Inception-v1 with BatchNorm, eps 1e-3). That
network is the TF-slim Inception-v1, the same one I3D inflates: its "5x5"
branch is really 3x3, which matches I3D's ``b2b`` 3x3x3. torchvision's
ImageNet GoogLeNet weights expect inputs scaled to [-1, 1] (its
``transform_input`` converts ImageNet-normalised input to that range), which
is I3D's input range, so inflated weights need no change of preprocessing.

Padding differs between the two networks: torchvision pads symmetrically
(and its stride-2 max pools use ``ceil_mode`` without padding), I3D uses TF
"SAME". For stride-1 odd kernels they coincide; for the stride-2 stem they
coincide on some input sizes only (odd sizes for the 7x7 stride-2 conv, even
sizes for the 3x3 stride-2 pools). Activations therefore match the 2D
network exactly when the spatial sizes are chosen that way (e.g. 55x55 at
the input), and match up to a one-pixel shift of the sampling grid
otherwise - which does not matter for initialising a network to fine-tune.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vtransfer.utils.errors import WeightsError
from vtransfer.weights.keymatch import key_problems

#: torchvision GoogLeNet BasicConv2d prefixes of the stem -> I3D Unit3D prefixes.
STEM_MAP = {"conv1": "Conv3d_1a_7x7", "conv2": "Conv3d_2b_1x1", "conv3": "Conv3d_2c_3x3"}
#: torchvision GoogLeNet inception blocks -> I3D Inception blocks.
BLOCK_MAP = {
    "inception3a": "Mixed_3b",
    "inception3b": "Mixed_3c",
    "inception4a": "Mixed_4b",
    "inception4b": "Mixed_4c",
    "inception4c": "Mixed_4d",
    "inception4d": "Mixed_4e",
    "inception4e": "Mixed_4f",
    "inception5a": "Mixed_5b",
    "inception5b": "Mixed_5c",
}
#: torchvision Inception branches -> I3D branch units.
BRANCH_MAP = {
    "branch1": "b0",
    "branch2.0": "b1a",
    "branch2.1": "b1b",
    "branch3.0": "b2a",
    "branch3.1": "b2b",
    "branch4.1": "b3b",
}
#: GoogLeNet entries with no I3D counterpart: the ImageNet classifier and auxiliary heads.
DROPPED_PREFIXES = ("fc.", "aux1.", "aux2.")
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def inflate_conv2d_weight(w2d: torch.Tensor, time_extent: int) -> torch.Tensor:
    """``out x in x h x w`` -> ``out x in x time_extent x h x w``: repeat over time, divide by ``time_extent``."""
    if w2d.dim() != 4:
        raise WeightsError(f"inflate: expected a 4-D conv weight, got shape {tuple(w2d.shape)}")
    if time_extent < 1:
        raise WeightsError(f"inflate: time extent must be >= 1, got {time_extent}")
    return w2d.unsqueeze(2).repeat(1, 1, time_extent, 1, 1) / time_extent


def cross_modality_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB first-layer weight (``out x 3 x ...``) for an input of ``channels`` channels (optical flow).

    The cross-modality initialisation of the two-stream papers (Wang et al.'s TSN, and the flow I3D
    started from ImageNet): average the filters over the colour channels, then replicate that average
    once per input channel. An RGB weight asked for 3 channels comes back unchanged.
    """
    if weight.dim() < 3 or weight.shape[1] != 3:
        raise WeightsError(f"cross-modality init needs an RGB conv weight (out x 3 x ...), got shape {tuple(weight.shape)}")
    if channels < 1:
        raise WeightsError(f"cross-modality init: channels must be >= 1, got {channels}")
    if channels == 3:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, channels, *([1] * (weight.dim() - 2))).contiguous()


def googlenet_unit_map() -> dict[str, str]:
    """Every torchvision GoogLeNet BasicConv2d prefix -> the I3D Unit3D prefix it inflates into."""
    units = dict(STEM_MAP)
    for block2d, block3d in BLOCK_MAP.items():
        for branch2d, branch3d in BRANCH_MAP.items():
            units[f"{block2d}.{branch2d}"] = f"{block3d}.{branch3d}"
    return units


def inflate_googlenet_into_i3d(googlenet_state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Load an inflated torchvision GoogLeNet state dict into ``model`` (an I3D).

    Every conv is inflated to the temporal extent of the I3D conv it maps to
    (7 for ``Conv3d_1a_7x7``, 3 for ``Conv3d_2c_3x3`` and the ``b1b``/``b2b``
    branches, 1 elsewhere); BatchNorms are copied. ``fc``/``aux*`` are
    dropped and ``model.logits`` keeps its fresh initialisation. Missing or
    unexpected GoogLeNet keys and shape mismatches (e.g. a width != 1 model)
    raise :class:`WeightsError` naming them; ``model`` is untouched then.
    """
    src = dict(googlenet_state_dict)
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for p2, p3 in googlenet_unit_map().items():
        key2, key3 = f"{p2}.conv.weight", f"{p3}.conv3d.weight"
        if key3 not in target:
            missing.append(f"{key3} (model)")
            continue
        if key2 not in src:
            missing.append(key2)
        else:
            used.add(key2)
            w2, w3 = src[key2], target[key3]
            if w2.dim() == 4 and w2.shape[1] == 3 and w3.shape[1] != 3:
                w2 = cross_modality_weight(w2, w3.shape[1])  # a flow I3D from the RGB GoogLeNet
            if w2.dim() != 4 or tuple(w2.shape) != tuple(w3.shape[:2]) + tuple(w3.shape[3:]):
                mismatched.append(f"{key2} {tuple(w2.shape)} -> {key3} {tuple(w3.shape)}")
            else:
                new[key3] = inflate_conv2d_weight(w2, w3.shape[2])
        for entry in _BN_ENTRIES:
            k2, k3 = f"{p2}.bn.{entry}", f"{p3}.bn.{entry}"
            if k2 not in src:
                if entry != "num_batches_tracked":
                    missing.append(k2)
                continue
            used.add(k2)
            if tuple(src[k2].shape) != tuple(target[k3].shape):
                mismatched.append(f"{k2} {tuple(src[k2].shape)} -> {k3} {tuple(target[k3].shape)}")
            else:
                new[k3] = src[k2]
    unexpected = [k for k in src if k not in used and not k.startswith(DROPPED_PREFIXES)]
    load_converted(model, new, missing, unexpected, mismatched, "GoogLeNet state dict cannot be inflated into this I3D")


def load_converted(model: nn.Module, converted: Mapping[str, torch.Tensor], missing: list[str], unexpected: list[str],
                   mismatched: list[str], failure: str) -> None:
    """Load ``converted`` tensors over ``model``'s own, or raise :class:`WeightsError` naming the mismatches.

    ``model`` is left untouched when anything is missing, unexpected or mis-shaped.
    """
    problems = key_problems(missing, unexpected, mismatched)
    if problems:
        raise WeightsError(f"{failure}: " + "; ".join(problems))
    merged = dict(model.state_dict())
    merged.update(converted)
    model.load_state_dict(merged, strict=True)


