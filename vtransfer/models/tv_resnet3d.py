"""torchvision's 18-layer video ResNets: R3D, MC3 and R(2+1)D (Tran et al. 2018, "A Closer Look at
Spatiotemporal Convolutions for Action Recognition").

All three are ``stem -> layer1..layer4 (2 BasicBlocks each) -> global average pool -> fc``; they
differ in their convolutions:

* ``r3d_18``: every conv 3x3x3 (the stem 3x7x7);
* ``mc3_18`` (mixed convolutions): 3D in the stem and ``layer1``, 2D (1x3x3) in ``layer2``-``layer4``;
* ``r2plus1d_18``: every 3D conv factorised into a 1xkxk spatial conv, BatchNorm, ReLU and a kx1x1
  temporal conv (the stem 1x7x7 then 3x1x1).

Layer groups: ``stem``, ``layer1`` ... ``layer4`` (global pooling rides at the end of ``layer4``),
``head`` (``fc``). Temporal parameters: convs with temporal extent > 1 and the BatchNorm after
each, so ``temporal`` trains nearly all of R3D, the stem and ``layer1`` of MC3, and only R(2+1)D's
temporal convs (about a quarter of its weights). The 1x1x1 downsampling shortcuts are spatial (R3D's and
R(2+1)D's stride 2 in time there subsample, they do not mix).

Names, presets and weights come from torchvision (see :mod:`vtransfer.models.tv_video`): the
``kinetics`` preset is 16 frames 2 apart at 112x112 from a 128 short side, normalised with the
Kinetics mean and std of ``R3D_18_Weights.KINETICS400_V1.transforms()``; ``tiny`` is 4 frames of
32x32 for tests. Training defaults: SGD with momentum 0.9, lr 0.01, weight decay 1e-4, as
torchvision's reference video-classification recipe.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import video

from vtransfer.models.base import State
from vtransfer.models.registry import BackboneEntry
from vtransfer.models.tv_video import (
    TorchvisionVideoBackbone,
    kinetics_preset,
    kinetics_weight_sources,
    small_preset,
    torchvision_layout,
)

LAYERS = ("layer1", "layer2", "layer3", "layer4")


class TorchvisionResNet3D(TorchvisionVideoBackbone):
    """Base of the three video ResNets; the subclasses name the torchvision builder."""

    classifier = "net.fc"

    def group_modules(self) -> list[tuple[str, list[str]]]:
        """``stem``, ``layer1``..``layer4``, ``head``."""
        return [("stem", ["net.stem"]), *((name, [f"net.{name}"]) for name in LAYERS), ("head", ["net.fc"])]

    def run_group(self, index: int, state: State) -> State:
        """As ``VideoResNet.forward``: stem, the four layers (then pool and flatten), fc."""
        assert isinstance(state, torch.Tensor)
        name = self.group_modules()[index][0]
        if name == "stem":
            self.check_input(state)
            return self.net.stem(state)
        if name in LAYERS:
            state = getattr(self.net, name)(state)
            return self.net.avgpool(state).flatten(1) if name == "layer4" else state
        return self.net.fc(state)

    def new_classifier(self, num_classes: int) -> nn.Module:
        """``Linear(512, num_classes)`` with torchvision's N(0, 0.01) weights and zero bias."""
        fc = nn.Linear(self.net.fc.in_features, num_classes)
        nn.init.normal_(fc.weight, 0, 0.01)
        nn.init.zeros_(fc.bias)
        return fc


class R3D18(TorchvisionResNet3D):
    """``torchvision.models.video.r3d_18``: 3x3x3 convs throughout."""

    backbone_name = "r3d_18"
    tv_builder = video.r3d_18
    tv_weights = video.R3D_18_Weights


class MC318(TorchvisionResNet3D):
    """``torchvision.models.video.mc3_18``: 3D convs in the stem and layer1, 2D above."""

    backbone_name = "mc3_18"
    tv_builder = video.mc3_18
    tv_weights = video.MC3_18_Weights


class R2Plus1D18(TorchvisionResNet3D):
    """``torchvision.models.video.r2plus1d_18``: spatial 1xkxk then temporal kx1x1 convs."""

    backbone_name = "r2plus1d_18"
    tv_builder = video.r2plus1d_18
    tv_weights = video.R2Plus1D_18_Weights


#: SGD with momentum (0.9 in vtransfer's trainer), as torchvision's reference video recipe trains these.
TRAINING_DEFAULTS = {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 1e-4}
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}


def _entry(cls: type[TorchvisionResNet3D]) -> BackboneEntry:
    weights = cls.tv_weights.KINETICS400_V1
    return BackboneEntry(
        MODEL_CLASS=cls,
        PRESETS={"kinetics": kinetics_preset(weights), "tiny": small_preset(weights, frames=4, size=32)},
        DEFAULT_PRESET="kinetics",
        TRAINING_DEFAULTS=TRAINING_DEFAULTS,
        GEOMETRY_KEYS=GEOMETRY_KEYS,
    )


MODELS = (R3D18, MC318, R2Plus1D18)
#: The registry's per-name constants (see :mod:`vtransfer.models.registry`).
BACKBONES = {cls.backbone_name: _entry(cls) for cls in MODELS}
WEIGHT_SOURCES = [s for cls in MODELS for s in kinetics_weight_sources(cls.backbone_name, cls.tv_weights, "kinetics")]
FOREIGN_LAYOUTS = [torchvision_layout(cls.backbone_name, "fc.weight", ("stem.0.weight", "layer4.1.conv2.1.weight", "fc.weight"))
                   for cls in MODELS]
