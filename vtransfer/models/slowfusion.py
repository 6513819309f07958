"""Karpathy et al. 2014 ("Large-scale Video Classification with CNNs"): slow fusion and family.

The single-frame network is printed in the paper as::

    C(96,11,3)-N-P-C(256,5,1)-N-P-C(384,3,1)-C(384,3,1)-C(256,3,1)-P-FC(4096)-FC(4096)-softmax

``C(d, f, s)``: ``d`` filters of ``f x f`` at stride ``s``, ReLU. ``N``:
local response normalisation with the paper's k=2, n=5, alpha=1e-4,
beta=0.5 in Krizhevsky's printed formula ``b = a / (k + alpha * sum a^2)^beta``
(sum over the n neighbouring channels). ``torch.nn.LocalResponseNorm``
divides alpha by n, so it is built with ``alpha = 1e-4 * 5``, which
reproduces the printed formula exactly. ``P``: max pooling over
non-overlapping 2x2 regions (kernel 2, stride 2), as printed. Padding is not
printed; we use AlexNet's (conv1 none, conv2 2, conv3-5 1), which on the
170x170 input gives 54 -> 27 -> 27 -> 13 -> 13 -> 6, i.e. 256x6x6 = 9216
inputs to FC6, AlexNet's number. Dropout follows the ReLU of FC6 and FC7
(rate ``dropout``; the transfer recipes use 0.9).

Fusion variants (``fusion``), all with the same layers; a conv with temporal
extent ``t`` and stride ``s`` is a Conv3d of kernel ``t x f x f``:

* ``slow`` (default): 10-frame clip; conv1 extent 4 stride 2 (4 columns),
  conv2 extent 2 stride 2 (2), conv3 extent 2 stride 2 (1): conv3 sees all
  10 frames; conv4, conv5 are per-frame. Temporal groups: conv1-conv3.
* ``single``: one frame, all convs 2D. No temporal group.
* ``early``: 10-frame clip, conv1 spans all 10 frames (extent 10), the rest
  2D. Temporal group: conv1.
* ``late``: 16-frame clip; two single-frame towers with shared weights see
  frames 0 and 15 (15 apart) and are concatenated at FC6. The convs are 2D;
  FC6 is where time is mixed, so FC6 is the temporal group.

``multires=True`` adds the paper's two streams with separate conv towers,
concatenated at FC6: the fovea sees the centre ``input/2`` square at full
resolution, the context sees the whole frame averaged down 2x (area
interpolation; an exact 2x2 mean for even sizes). The paper uses a 178x178
input for these (two 89x89 streams, 256x3x3 each at conv5) and 170x170
otherwise; ``input_size`` defaults accordingly.

Preprocessing: clips of 10 frames (16 for ``late``, 1 for ``single``),
short side resized to 200 and a 170 (178 multires) crop, as in the paper.
The paper only subtracted a constant 117 from raw 0-255 pixels; we use the
ImageNet mean/std instead (unit-scale inputs suit the Kaiming
initialisation, and no published weights expect anything else since none
were ever released).

Parameter count of the full slow fusion network with 487 (Sports-1M)
classes, as the architecture implies::

    conv1  96*3*4*11*11 + 96     =    139,488
    conv2  256*96*2*5*5 + 256    =  1,229,056
    conv3  384*256*2*3*3 + 384   =  1,769,856
    conv4  384*384*3*3 + 384     =  1,327,488
    conv5  256*384*3*3 + 256     =    884,992
    fc6    9216*4096 + 4096      = 37,752,832
    fc7    4096*4096 + 4096      = 16,781,312
    head   4096*487 + 487        =  1,995,239
    total                          61,880,263
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.models.base import (
    LayerGroup,
    Preprocessing,
    State,
    VideoBackbone,
    fresh_linear_classifier,
    init_relu_network,
    module_param_names,
)
from vtransfer.utils.errors import ConfigError
from vtransfer.weights.source import NO_PUBLIC_WEIGHTS, WeightSource

#: Exact parameter count of ``SlowFusion(fusion="slow", num_classes=487)`` (see module docstring).
FULL_SLOW_FUSION_PARAMS = 61_880_263

FUSIONS = ("slow", "single", "early", "late")

#: Per fusion variant: (temporal extent, temporal stride) of conv1..conv5.
TEMPORAL_KERNELS: dict[str, list[tuple[int, int]]] = {
    "slow": [(4, 2), (2, 2), (2, 2), (1, 1), (1, 1)],
    "single": [(1, 1)] * 5,
    "early": [(10, 1), (1, 1), (1, 1), (1, 1), (1, 1)],
    "late": [(1, 1)] * 5,
}
#: Clip length each variant consumes.
CLIP_FRAMES = {"slow": 10, "single": 1, "early": 10, "late": 16}
#: Late fusion: the frames its two towers see (15 frames apart).
LATE_FRAMES = (0, 15)

#: conv1..conv5 at width 1: (filters, spatial kernel, spatial stride, spatial padding, LRN, max pool).
CONV_SPECS: list[tuple[int, int, int, int, bool, bool]] = [
    (96, 11, 3, 0, True, True),
    (256, 5, 1, 2, True, True),
    (384, 3, 1, 1, False, False),
    (384, 3, 1, 1, False, False),
    (256, 3, 1, 1, False, True),
]

#: Local response normalisation, paper values (alpha as in the printed formula).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.5, 2.0


class ConvLayer(nn.Module):
    """One ``C`` (+ ``N``) (+ ``P``) stage: Conv3d -> ReLU -> [LRN] -> [2x2 max pool, stride 2]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        padding: int,
        time_extent: int,
        time_stride: int,
        lrn: bool,
        pool: bool,
    ):
        super().__init__()
        self.time_extent = time_extent
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            (time_extent, kernel, kernel),
            (time_stride, stride, stride),
            (0, padding, padding),
        )
        # torch divides alpha by size; multiplying it back gives the paper's formula.
        self.norm = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K) if lrn else None
        self.pool = nn.MaxPool3d((1, 2, 2), (1, 2, 2)) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage to ``B x C x T x H x W``."""
        x = F.relu(self.conv(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.pool is not None:
            x = self.pool(x)
        return x


class SlowFusion(VideoBackbone):
    """Karpathy 2014 CNN (slow/single/early/late fusion, optional multiresolution).

    Args:
        num_classes: classifier size (487 for Sports-1M).
        fusion: ``slow`` | ``single`` | ``early`` | ``late`` (see module docstring).
        multires: fovea + context streams joined at FC6.
        width: channel multiplier for conv1-conv5 (``max(1, round(c * width))``).
        fc_dim: width of FC6 and FC7 (4096 in the paper).
        input_size: square crop fed to the network (default 170, 178 multires).
        dropout: dropout rate after FC6 and FC7.
        resize_short: short side before cropping (default keeps the paper's
            200 : 170 (or 178) ratio).
        frame_stride: temporal subsampling of the video when building clips.

    Layer groups: ``conv1`` .. ``conv5``, ``fc6``, ``fc7``, ``head``; the
    paper's "top 3 layers" are the last three. Multires groups hold both
    streams' conv of that depth. State between conv groups is a tensor, or
    ``(fovea, context)`` with ``multires``.
    """

    backbone_name = "slowfusion"

    def __init__(
        self,
        num_classes: int = 487,
        fusion: str = "slow",
        multires: bool = False,
        width: float = 1.0,
        fc_dim: int = 4096,
        input_size: int | None = None,
        dropout: float = 0.5,
        resize_short: int | None = None,
        frame_stride: int = 1,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"slowfusion: fusion must be one of {FUSIONS}, got {fusion!r}")
        if width <= 0 or fc_dim < 1 or num_classes < 1:
            raise ConfigError(
                f"slowfusion: width, fc_dim and num_classes must be positive (got {width}, {fc_dim}, {num_classes})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"slowfusion: dropout must be in [0, 1), got {dropout}")
        paper_size = 178 if multires else 170
        input_size = int(input_size or paper_size)
        resize_short = int(resize_short or round(input_size * 200 / paper_size))
        self.fusion = fusion
        self.multires = bool(multires)
        self.input_size = input_size
        self.frames = CLIP_FRAMES[fusion]
        self.streams = ("fovea", "context") if multires else ("frame",)
        self.config: dict[str, Any] = {
            "num_classes": int(num_classes),
            "fusion": fusion,
            "multires": self.multires,
            "width": float(width),
            "fc_dim": int(fc_dim),
            "input_size": input_size,
            "dropout": float(dropout),
            "resize_short": resize_short,
            "frame_stride": int(frame_stride),
        }
        self.preprocessing = Preprocessing(
            frames=self.frames,
            stride=int(frame_stride),
            crop_size=(input_size, input_size),
            resize_short=resize_short,
        )

        stream_size = input_size // 2 if multires else input_size
        columns = len(LATE_FRAMES) if fusion == "late" else 1
        in_ch, size, frames = 3, stream_size, (len(LATE_FRAMES) if fusion == "late" else self.frames)
        for i, ((filters, k, s, p, lrn, pool), (kt, st)) in enumerate(zip(CONV_SPECS, TEMPORAL_KERNELS[fusion]), 1):
            out_ch = max(1, int(round(filters * width)))

            def layer() -> ConvLayer:
                return ConvLayer(in_ch, out_ch, k, s, p, kt, st, lrn, pool)

            if multires:
                self.add_module(f"conv{i}", nn.ModuleDict({name: layer() for name in self.streams}))
            else:
                self.add_module(f"conv{i}", layer())
            size = (size + 2 * p - k) // s + 1
            size = size // 2 if pool else size
            frames = (frames - kt) // st + 1
            in_ch = out_ch
            if size < 1:
                raise ConfigError(
                    f"slowfusion: input_size {input_size} is too small (nothing left after conv{i}); "
                    f"use at least {64 if multires else 32}"
                )
        assert frames == columns, (fusion, frames)
        fc6_in = in_ch * columns * size * size * len(self.streams)
        self.fc6 = nn.Linear(fc6_in, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_relu_network(self, self.classifier)  # the paper does not say

    # -- contract ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh ``fc_dim -> num_classes`` layer."""
        self.classifier = fresh_linear_classifier(self.classifier, num_classes, "slowfusion")
        self.config["num_classes"] = int(num_classes)

    def temporal_group_names(self) -> list[str]:
        """Groups that mix information across time for this fusion variant."""
        convs = [f"conv{i}" for i, (kt, _) in enumerate(TEMPORAL_KERNELS[self.fusion], 1) if kt > 1]
        return convs + (["fc6"] if self.fusion == "late" else [])

    def layer_groups(self) -> list[LayerGroup]:
        """``conv1`` .. ``conv5``, ``fc6``, ``fc7``, ``head`` (see :meth:`temporal_group_names` for tags)."""
        temporal = set(self.temporal_group_names())
        groups = []
        dropout = {"fc6": ["drop6"], "fc7": ["drop7"]}
        for name in [f"conv{i}" for i in range(1, 6)] + ["fc6", "fc7"]:
            params = module_param_names(name, getattr(self, name))
            if name in temporal:
                groups.append(LayerGroup(name, "temporal", params, list(params), modules=dropout.get(name, [])))
            else:
                groups.append(LayerGroup(name, "spatial", params, modules=dropout.get(name, [])))
        groups.append(LayerGroup("head", "head", module_param_names("classifier", self.classifier)))
        return groups

    def run_group(self, index: int, state: State) -> State:
        """Run group ``index``: 0-4 the convs (0 also splits the clip), 5 fc6, 6 fc7, 7 the classifier."""
        if index == 0:
            state = self.split_input(state)
        if index < 5:
            layer = getattr(self, f"conv{index + 1}")
            if self.multires:
                return tuple(layer[name](x) for name, x in zip(self.streams, state))
            return layer(state)
        if index == 5:
            parts = state if isinstance(state, tuple) else (state,)
            x = torch.cat([p.flatten(1) for p in parts], dim=1)
            return self.drop6(F.relu(self.fc6(x)))
        if index == 6:
            return self.drop7(F.relu(self.fc7(state)))
        if index == 7:
            return self.classifier(state)
        raise IndexError(f"slowfusion has 8 layer groups, asked for {index}")

    def split_input(self, x: State) -> State:
        """Check the clip and turn it into what conv1 sees (late: two frames; multires: two streams)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"slowfusion: input must be B x 3 x T x H x W, got {shape}")
        t, h, w = x.shape[2:]
        if t != self.frames or h != self.input_size or w != self.input_size:
            raise ConfigError(
                f"slowfusion ({self.fusion} fusion): expects clips of {self.frames} frames at "
                f"{self.input_size}x{self.input_size}, got {t} frames at {h}x{w}"
            )
        if self.fusion == "late":
            x = x[:, :, list(LATE_FRAMES)]
        if not self.multires:
            return x
        half = self.input_size // 2
        off = (self.input_size - half) // 2
        fovea = x[:, :, :, off : off + half, off : off + half]
        context = F.interpolate(x, size=(x.shape[2], half, half), mode="area")
        return (fovea, context)


MODEL_CLASS = SlowFusion

PRESETS: dict[str, dict[str, Any]] = {
    "full": {"num_classes": 487, "fusion": "slow", "multires": False, "width": 1.0, "fc_dim": 4096},
    "tiny": {
        "num_classes": 10,
        "fusion": "slow",
        "multires": False,
        "width": 0.125,
        "fc_dim": 64,
        "input_size": 64,
    },
}

DEFAULT_PRESET = "full"

#: SGD with momentum, as Karpathy et al. train.
TRAINING_DEFAULTS = {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 5e-4}

#: Constructor keyword of each clip-geometry option (``--frames``, ``--stride``, ``--size``).
GEOMETRY_KEYS = {"size": "input_size", "stride": "frame_stride"}


# -- pretrained weights (collected by vtransfer.loading.sources) -------------------------------

WEIGHT_SOURCES = (
    WeightSource(
        name="slowfusion:sports1m",
        backbone="slowfusion",
        dataset={"name": "Sports-1M", "num_classes": 487, "size": "about 1.1M videos"},
        available=False,
        note="Karpathy et al. (2014) never published their Sports-1M model: "
        + NO_PUBLIC_WEIGHTS.format(backbone="slowfusion"),
    ),
)
