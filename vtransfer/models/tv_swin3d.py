"""torchvision's Video Swin Transformers: Swin3D-T, -S and -B (Liu et al. 2022, "Video Swin Transformer").

``patch_embed`` (a 2x4x4 conv, stride 2x4x4, then LayerNorm) makes space-time tokens; four stages of
Swin blocks attend within 8x7x7 windows (shifted every other block; a window shrinks to the input
where the input is smaller), with patch merging (2x2 in space) between stages; the final LayerNorm
is averaged over all tokens and a linear layer classifies. Depths (2, 2, 6, 2) for T and
(2, 2, 18, 2) for S and B; widths 96 (T, S) and 128 (B).

Layer groups: ``stem`` (patch embedding), ``stage1.0`` ... ``stage4.1``, one per Swin block (the
last block of a stage ends with the patch merging after it; the very last with the final norm and
the average pool), ``head`` (the linear classifier). ``--train 'stage4.*'`` picks a stage.
**No temporal parameters**: window attention, its relative-position bias over (time, height,
width) offsets and the patch embedding all mix space and time jointly, so the ``temporal`` policy
is refused with a message naming the policies that apply.

Any clip size works (torchvision pads to the patch and window sizes): the ``kinetics`` preset is
torchvision's evaluation clip (32 frames 2 apart, 224x224 from a 256 short side, from
``Swin3D_*_Weights.KINETICS400_V1``), ``tiny`` 4 frames of 32x32 for tests. ``swin3d_b`` has two
weight sources: ``swin3d_b:kinetics400`` (ImageNet-1k then Kinetics-400) and
``swin3d_b:kinetics400-in22k`` (ImageNet-22k then Kinetics-400). Training defaults: AdamW with the
classifier at 10x the backbone's rate (the Video Swin recipe trains its backbone at 0.1x).
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

NO_TEMPORAL_REASON = (
    "its window attention, with one relative-position bias over time, height and width offsets, and its "
    "patch embedding all mix space and time jointly"
)


class TorchvisionSwin3D(TorchvisionVideoBackbone):
    """Base of the three Swin3D sizes (see the module docstring); subclasses name the builder."""

    classifier = "net.head"
    no_temporal_reason = NO_TEMPORAL_REASON
    group_dropouts = {"stem": ["net.pos_drop"]}

    def _blocks(self) -> list[tuple[str, int, int]]:
        """``(group name, stage index in features, block index)`` for every Swin block, in order."""
        out = []
        for stage in range(0, len(self.net.features), 2):  # stages at even indices, patch merging between
            for j in range(len(self.net.features[stage])):
                out.append((f"stage{stage // 2 + 1}.{j}", stage, j))
        return out

    def group_modules(self) -> list[tuple[str, list[str]]]:
        """``stem``, ``stage<s>.<j>`` (with the following patch merging, or the final norm), ``head``."""
        features = self.net.features
        groups = [("stem", ["net.patch_embed"])]
        for name, stage, j in self._blocks():
            modules = [f"net.features.{stage}.{j}"]
            if j == len(features[stage]) - 1:
                modules.append(f"net.features.{stage + 1}" if stage + 1 < len(features) else "net.norm")
            groups.append((name, modules))
        groups.append(("head", ["net.head"]))
        return groups

    def run_group(self, index: int, state: State) -> State:
        """As ``SwinTransformer3d.forward``: embed, one block (and merge) per group, norm and pool, head."""
        assert isinstance(state, torch.Tensor)
        net, blocks = self.net, self._blocks()
        if index == 0:
            self.check_input(state)
            return net.pos_drop(net.patch_embed(state))
        if index <= len(blocks):
            _, stage, j = blocks[index - 1]
            state = net.features[stage][j](state)
            if j < len(net.features[stage]) - 1:
                return state
            if stage + 1 < len(net.features):
                return net.features[stage + 1](state)
            return net.avgpool(net.norm(state).permute(0, 4, 1, 2, 3)).flatten(1)
        return net.head(state)

    def new_classifier(self, num_classes: int) -> nn.Module:
        """``Linear(features, num_classes)``, weights truncated-normal (std 0.02) and zero bias, as torchvision."""
        fc = nn.Linear(self.net.head.in_features, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        return fc


class Swin3DT(TorchvisionSwin3D):
    """``torchvision.models.video.swin3d_t``."""

    backbone_name = "swin3d_t"
    tv_builder = video.swin3d_t
    tv_weights = video.Swin3D_T_Weights


class Swin3DS(TorchvisionSwin3D):
    """``torchvision.models.video.swin3d_s``."""

    backbone_name = "swin3d_s"
    tv_builder = video.swin3d_s
    tv_weights = video.Swin3D_S_Weights


class Swin3DB(TorchvisionSwin3D):
    """``torchvision.models.video.swin3d_b``."""

    backbone_name = "swin3d_b"
    tv_builder = video.swin3d_b
    tv_weights = video.Swin3D_B_Weights


#: AdamW, the classifier at 10x the backbone's rate.
TRAINING_DEFAULTS = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "head_lr_scale": 10.0}
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}


def _entry(cls: type[TorchvisionSwin3D]) -> BackboneEntry:
    weights = cls.tv_weights.KINETICS400_V1
    return BackboneEntry(
        MODEL_CLASS=cls,
        PRESETS={"kinetics": kinetics_preset(weights), "tiny": small_preset(weights, frames=4, size=32)},
        DEFAULT_PRESET="kinetics",
        TRAINING_DEFAULTS=TRAINING_DEFAULTS,
        GEOMETRY_KEYS=GEOMETRY_KEYS,
    )


MODELS = (Swin3DT, Swin3DS, Swin3DB)
#: The registry's per-name constants (see :mod:`vtransfer.models.registry`).
BACKBONES = {cls.backbone_name: _entry(cls) for cls in MODELS}
WEIGHT_SOURCES = [s for cls in MODELS for s in kinetics_weight_sources(cls.backbone_name, cls.tv_weights, "kinetics")]
FOREIGN_LAYOUTS = [torchvision_layout(cls.backbone_name, "head.weight",
                                      ("patch_embed.proj.weight", "features.0.0.attn.qkv.weight", "head.weight"))
                   for cls in MODELS]
