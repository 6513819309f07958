"""torchvision's S3D (Xie et al. 2018, "Rethinking Spatiotemporal Feature Learning"): separable I3D.

The Inception-v1 layout of I3D with every 3D conv (but the 1x1x1 ones) made *separable*: a 1xkxk
spatial conv, BatchNorm, ReLU, then a kx1x1 temporal conv, BatchNorm, ReLU. torchvision's
``S3D.features`` runs::

    0 sep-conv 7 /2 -> 1 max pool 1x3x3 /2 -> 2 conv 1x1x1 -> 3 sep-conv 3 -> 4 max pool 1x3x3 /2
    -> 5 Mixed_3b -> 6 Mixed_3c -> 7 max pool 3x3x3 /2 -> 8..12 Mixed_4b..4f -> 13 max pool 2x2x2 /2
    -> 14 Mixed_5b -> 15 Mixed_5c

then a 2x7x7 average pool (stride 1), dropout, a 1x1x1 conv classifier, and the mean over what is
left of time and space. Layer groups use I3D's names (:mod:`vtransfer.models.i3d`):
``Conv3d_1a_7x7``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3``, ``Mixed_3b`` ... ``Mixed_5c``, ``head``;
max pools ride at the end of the group before them, as in I3D. Temporal parameters: each
separable conv's kx1x1 half and its BatchNorm.

The head takes the ``B x 1024`` embedding: ``Mixed_5c`` ends with the average pool and the mean,
and ``head`` applies the 1x1x1 conv to that mean. A 1x1x1 conv is linear, so this is torchvision's
conv-then-mean up to float rounding; in training, dropout is drawn once per clip rather than per
pooled position.

Geometry from ``S3D_Weights.KINETICS400_V1``: the ``kinetics`` preset is the evaluation clip of 128
frames 2 apart at 224x224 from a 256 short side; the network needs at least 14 frames of 224x224
(``meta["min_temporal_size"]``, ``meta["min_size"]``; the fixed 2x7x7 pool), which is also ``tiny``.
Training defaults: SGD with momentum, as torchvision's reference video recipe.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import video

from vtransfer.models.base import State
from vtransfer.models.tv_video import (
    TorchvisionVideoBackbone,
    kinetics_preset,
    kinetics_weight_sources,
    min_input,
    small_preset,
    torchvision_layout,
)

#: Layer group -> indices into ``S3D.features`` it runs.
GROUP_FEATURES: list[tuple[str, list[int]]] = [
    ("Conv3d_1a_7x7", [0, 1]),
    ("Conv3d_2b_1x1", [2]),
    ("Conv3d_2c_3x3", [3, 4]),
    ("Mixed_3b", [5]),
    ("Mixed_3c", [6, 7]),
    ("Mixed_4b", [8]),
    ("Mixed_4c", [9]),
    ("Mixed_4d", [10]),
    ("Mixed_4e", [11]),
    ("Mixed_4f", [12, 13]),
    ("Mixed_5b", [14]),
    ("Mixed_5c", [15]),
]


class TorchvisionS3D(TorchvisionVideoBackbone):
    """``torchvision.models.video.s3d`` with I3D-named layer groups (see the module docstring)."""

    backbone_name = "s3d"
    tv_builder = video.s3d
    tv_weights = video.S3D_Weights
    classifier = "net.classifier.1"
    group_dropouts = {"head": ["net.classifier.0"]}

    def group_modules(self) -> list[tuple[str, list[str]]]:
        """``Conv3d_1a_7x7`` ... ``Mixed_5c`` over ``features.i``, then ``head``."""
        return [(name, [f"net.features.{i}" for i in idx]) for name, idx in GROUP_FEATURES] + [("head", ["net.classifier"])]

    def run_group(self, index: int, state: State) -> State:
        """``net.features`` in slices, the pooled mean after ``Mixed_5c``, then dropout and the 1x1x1 conv."""
        assert isinstance(state, torch.Tensor)
        if index == 0:
            self.check_input(state)
        if index < len(GROUP_FEATURES):
            for i in GROUP_FEATURES[index][1]:
                state = self.net.features[i](state)
            if index == len(GROUP_FEATURES) - 1:
                state = self.net.avgpool(state).mean(dim=(2, 3, 4))
            return state
        return self.net.classifier(state[:, :, None, None, None]).flatten(1)

    def new_classifier(self, num_classes: int) -> nn.Module:
        """A 1x1x1 ``Conv3d(1024, num_classes)`` with PyTorch's default initialisation (as torchvision's S3D)."""
        return nn.Conv3d(self.net.classifier[1].in_channels, num_classes, kernel_size=1, stride=1, bias=True)


MODEL_CLASS = TorchvisionS3D
_WEIGHTS = video.S3D_Weights.KINETICS400_V1
_MIN_FRAMES, _MIN_SIDE = min_input(_WEIGHTS)

#: ``kinetics``: torchvision's evaluation geometry; ``tiny``: the smallest clip S3D accepts (for tests).
PRESETS = {"kinetics": kinetics_preset(_WEIGHTS), "tiny": small_preset(_WEIGHTS, frames=_MIN_FRAMES, size=_MIN_SIDE)}
DEFAULT_PRESET = "kinetics"
#: SGD with momentum, as torchvision's reference video recipe.
TRAINING_DEFAULTS = {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 1e-4}
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}
WEIGHT_SOURCES = kinetics_weight_sources("s3d", video.S3D_Weights, "kinetics")
FOREIGN_LAYOUTS = [torchvision_layout("s3d", "classifier.1.weight", ("features.0.1.0.weight", "classifier.1.weight"))]
