"""torchvision's Multiscale Vision Transformers: MViT-v1-B and MViT-v2-S (Fan et al. 2021, Li et al. 2022).

``conv_proj`` (a 3x7x7 conv, stride 2x4x4) cuts the clip into space-time patches; ``pos_encoding``
prepends a class token (and, in v1, adds separate spatial and temporal position embeddings); 16
multiscale blocks attend over all tokens at once, pooling queries, keys and values with 3x3x3
depthwise convs (the query pool halves the spatial resolution at blocks 1, 3 and 14); the final
LayerNorm's class token goes through dropout and a linear classifier.

**Fixed input.** Both networks take exactly 16 frames of 224x224 (``meta["min_temporal_size"]``
and ``meta["min_size"]`` of their Weights): v1's position embeddings and v2's relative position
tables are sized for that token grid when the network is built, and torchvision's builders fix it.
So there is no ``tiny`` preset; ``kinetics`` is the only one, and ``--frames`` or ``--size`` other
than 16 and 224 is a clear error. (Only ``--stride`` changes: 4, i.e. torchvision's 7.5 fps of 30
fps video, by default.)

Layer groups: ``stem`` (patch embedding and position encoding), ``blocks.0`` ... ``blocks.15``
(the last one ends with the final LayerNorm and takes the class token), ``head`` (dropout and
linear). **No temporal parameters**: attention, the pooling convs and the patch embedding all mix
space and time jointly, so nothing can be trained "across time only" and the ``temporal`` policy
is refused with a message naming the policies that apply. (Position embeddings say where a token
is; they do not mix anything.)

Training defaults: AdamW, as transformers are fine-tuned (lr 1e-4, weight decay 0.05, the new
classifier at 10x).
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
    torchvision_layout,
)

NO_TEMPORAL_REASON = "its attention, query/key/value pooling and patch embedding all mix space and time jointly"


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class TorchvisionMViT(TorchvisionVideoBackbone):
    """Base of both MViT variants (see the module docstring); subclasses name the builder."""

    classifier = "net.head.1"
    no_temporal_reason = NO_TEMPORAL_REASON
    fixed_input = True
    group_dropouts = {"head": ["net.head.0"]}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # torchvision's head dropout works in place; on an embedding that a frozen prefix cached that would
        # overwrite the cache, so it writes a new tensor (the same numbers).
        self.net.head[0].inplace = False
        self.block_thw = self._token_grids()

    def _token_grids(self) -> list[tuple[int, int, int]]:
        """The (T, H, W) token grid each block receives, as ``MViT.forward`` threads it through."""
        thw = (self.net.pos_encoding.temporal_size, *self.net.pos_encoding.spatial_size)
        grids = []
        for block in self.net.blocks:
            grids.append(thw)
            pool = block.attn.pool_q
            if pool is not None:
                conv = pool.pool
                thw = tuple(_conv_out(n, k, s, p) for n, k, s, p in zip(thw, conv.kernel_size, conv.stride, conv.padding))
        return grids

    def group_modules(self) -> list[tuple[str, list[str]]]:
        """``stem``, ``blocks.0`` ... ``blocks.15`` (the last with ``norm``), ``head``."""
        last = len(self.net.blocks) - 1
        blocks = [(f"blocks.{i}", [f"net.blocks.{i}"] + (["net.norm"] if i == last else [])) for i in range(last + 1)]
        return [("stem", ["net.conv_proj", "net.pos_encoding"]), *blocks, ("head", ["net.head"])]

    def run_group(self, index: int, state: State) -> State:
        """As ``MViT.forward``: patchify and encode, one block per group, then norm, class token, head."""
        assert isinstance(state, torch.Tensor)
        if index == 0:
            self.check_input(state)
            return self.net.pos_encoding(self.net.conv_proj(state).flatten(2).transpose(1, 2))
        blocks = self.net.blocks
        if index <= len(blocks):
            state, _ = blocks[index - 1](state, self.block_thw[index - 1])
            return self.net.norm(state)[:, 0] if index == len(blocks) else state
        return self.net.head(state)

    def new_classifier(self, num_classes: int) -> nn.Module:
        """``Linear(768, num_classes)``, weights truncated-normal (std 0.02) and zero bias, as torchvision."""
        fc = nn.Linear(self.net.head[1].in_features, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        return fc


class MViTV1B(TorchvisionMViT):
    """``torchvision.models.video.mvit_v1_b``."""

    backbone_name = "mvit_v1_b"
    tv_builder = video.mvit_v1_b
    tv_weights = video.MViT_V1_B_Weights


class MViTV2S(TorchvisionMViT):
    """``torchvision.models.video.mvit_v2_s``."""

    backbone_name = "mvit_v2_s"
    tv_builder = video.mvit_v2_s
    tv_weights = video.MViT_V2_S_Weights


#: AdamW, the classifier at 10x the backbone's rate.
TRAINING_DEFAULTS = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "head_lr_scale": 10.0}
#: ``--frames`` and ``--size`` reach the constructor, which refuses anything but 16 and 224.
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}


def _entry(cls: type[TorchvisionMViT]) -> BackboneEntry:
    # Only the fixed 16 x 224 x 224 geometry: no smaller "tiny" preset is possible (see the module docstring).
    return BackboneEntry(
        MODEL_CLASS=cls,
        PRESETS={"kinetics": kinetics_preset(cls.tv_weights.KINETICS400_V1)},
        DEFAULT_PRESET="kinetics",
        TRAINING_DEFAULTS=TRAINING_DEFAULTS,
        GEOMETRY_KEYS=GEOMETRY_KEYS,
    )


MODELS = (MViTV1B, MViTV2S)
#: The registry's per-name constants (see :mod:`vtransfer.models.registry`).
BACKBONES = {cls.backbone_name: _entry(cls) for cls in MODELS}
WEIGHT_SOURCES = [s for cls in MODELS for s in kinetics_weight_sources(cls.backbone_name, cls.tv_weights, "kinetics")]
FOREIGN_LAYOUTS = [torchvision_layout(cls.backbone_name, "head.1.weight",
                                      ("conv_proj.weight", "pos_encoding.class_token", "head.1.weight"))
                   for cls in MODELS]
