"""C3D (Tran et al., ICCV 2015, "Learning Spatiotemporal Features with 3D Convolutional Networks").

**This is C3D, not Karpathy et al.'s slow fusion.** Karpathy's Sports-1M
slow-fusion weights were never released (``slowfusion:sports1m`` says so);
C3D's Sports-1M model is the only public Sports-1M video CNN, so
``c3d:sports1m`` is what "a Sports-1M backbone" can really mean.

The network, with the module names of the widely used PyTorch port
(DavideA/c3d-pytorch, ``C3D_model.py``; weights ``c3d.pickle`` linked from its
README; other projects' READMEs describe the file as ported from Keras, i.e.
from albertomontesg's Keras conversion of the Caffe model)::

    conv1 64 -> pool1 1x2x2 -> conv2 128 -> pool2 2x2x2
    -> conv3a 256, conv3b 256 -> pool3 -> conv4a 512, conv4b 512 -> pool4
    -> conv5a 512, conv5b 512 -> pool5 2x2x2 (spatial padding 0,1,1)
    -> fc6 4096 -> fc7 4096 -> fc8 487 (Sports-1M classes)

Every conv is 3x3x3, stride 1, padding 1, with bias, followed by ReLU; there
is no normalisation layer. Dropout 0.5 follows the ReLU of fc6 and of fc7.
On the port's 16 x 112 x 112 clip pool5 gives 512 x 1 x 4 x 4 = 8192 inputs
to fc6, flattened channel-major (the port's ``view(-1, 8192)``).

**pool5.** The port (like the Keras model it came from, which zero-pads
``(0, 1, 1)`` before pool5) pads one position on *both* sides of H and W, so
its windows over the 7x7 conv5b map start at -1, 1, 3, 5. Caffe's pooling
rounds the output size up instead (windows at 0, 2, 4, 6, the last one
clipped), which is what the released Caffe model was trained with. Both
give 4x4, so the file fits either; ``pool5="port"`` (default) reproduces the
port, ``pool5="caffe"`` the Caffe alignment. Which classifies better was not
measured here.

**Preprocessing the weights expect.** The Caffe model was trained on BGR
frames in 0-255 (OpenCV decoding) minus the per-pixel Sports-1M mean cube
(``sport1m_train16_128_mean.binaryproto``, 3 x 16 x 128 x 171), resized to
128 x 171 and cropped to 112 x 112. The port's ``predict.py`` feeds raw RGB
0-255 without the mean and says it was "tested only qualitatively"; its
issue #1 ("pretrained weights", DavideA/c3d-pytorch) shows that subtracting
the Sports-1M mean and swapping to BGR gives the expected predictions, and
computes the channel means of the mean cube (albertomontesg/keras-model-zoo
``kerasmodelzoo/data/c3d_mean.npy``) as 90.25, 97.66, 101.41 (B, G, R).
The pipeline applies one mean per channel, so **the mean cube's variation
over space and time cannot be reproduced**; its channel means are the
closest honest declaration, and they are what this family declares:
``mean = (101.41, 97.66, 90.25) / 255`` (RGB order), ``std = 1``, frames
resized to short side 128 and centre-cropped to 112.

The pipeline's input is therefore ``(X - M) / 255`` in RGB, where the port
wants ``X - M`` in BGR. The importer (:func:`load_c3d_port_state_dict`)
folds both differences into conv1 exactly: it reverses conv1's input
channels (BGR -> RGB) and multiplies them by ``255 * std`` (a linear map on
the input commutes with the convolution; zero padding stays zero). Keeping
the inputs at unit scale rather than 0-255 also suits the Kaiming
initialisation of a model trained from scratch.

**Layer groups**: ``conv1`` (conv1 + pool1), ``conv2`` (conv2 + pool2),
``conv3`` (conv3a, conv3b, pool3), ``conv4``, ``conv5`` (..., pool5),
``fc6``, ``fc7``, ``head`` (fc8, replaced by a fresh classifier for the
user's classes). Every conv has temporal extent 3, so all five conv groups
are ``temporal`` in full: the ``temporal`` policy trains every conv plus
the classifier, which for C3D is ``all`` minus fc6 and fc7 (27.7 M conv
parameters of 80 M, about 36% with the head), with no frozen prefix to cache. fc6 and
fc7 are ``spatial`` at 16 frames (pool5 leaves one time step, so fc6 mixes
no time positions); with 32 or more frames pool5 leaves several and fc6 is
tagged ``temporal``.

Parameter count with 487 classes at width 1 (the port's state dict,
22 tensors)::

    conv1   64*3*27 + 64         =      5,248
    conv2   128*64*27 + 128      =    221,312
    conv3   884,992 + 1,769,728  =  2,654,720
    conv4   3,539,456 + 7,078,400 = 10,617,856
    conv5   2 * 7,078,400        = 14,156,800
    fc6     8192*4096 + 4096     = 33,558,528
    fc7     4096*4096 + 4096     = 16,781,312
    head    4096*487 + 487       =  1,995,239
    total                          79,991,015
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.models.base import (
    LayerGroup,
    Preprocessing,
    State,
    VideoBackbone,
    as_pair,
    fresh_linear_classifier,
    init_relu_network,
    module_param_names,
)
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.weights.keymatch import state_dict_problems
from vtransfer.weights.source import ForeignLayout, WeightSource

#: What ``vtransfer backbones`` can show for this family (the CLI reads no description yet).
DESCRIPTION = (
    "C3D (Tran et al. 2015), Sports-1M weights of the DavideA/c3d-pytorch port. "
    "Not Karpathy et al.'s slow fusion, whose Sports-1M weights were never released."
)

#: Conv layers: name -> (group, output channels at width 1). Input channels follow the order.
CONVS: dict[str, tuple[str, int]] = {
    "conv1": ("conv1", 64),
    "conv2": ("conv2", 128),
    "conv3a": ("conv3", 256),
    "conv3b": ("conv3", 256),
    "conv4a": ("conv4", 512),
    "conv4b": ("conv4", 512),
    "conv5a": ("conv5", 512),
    "conv5b": ("conv5", 512),
}
CONV_GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
GROUP_NAMES = (*CONV_GROUPS, "fc6", "fc7", "head")

#: Sports-1M mean-cube channel means in 0-255, (B, G, R) as the Caffe model's input (see the module docstring).
SPORTS1M_MEAN_BGR = (90.25, 97.66, 101.41)
#: The same means in the pipeline's terms: RGB order, [0, 1] scale.
SPORTS1M_MEAN = tuple(v / 255.0 for v in reversed(SPORTS1M_MEAN_BGR))
POOL5_MODES = ("port", "caffe")
#: Fewest frames: pool2-pool5 halve time, and pool5 needs two steps.
MIN_FRAMES = 16
#: Smallest height/width: pool1-pool4 halve space, leaving at least one position.
MIN_SIZE = 16


def _halve_up(n: int) -> int:
    """``ceil((n - 2) / 2) + 1``: a kernel-2 stride-2 pool that rounds up (Caffe)."""
    return -(-(n - 2) // 2) + 1


def pool5_shape(frames: int, crop: tuple[int, int], pool5: str) -> tuple[int, int, int]:
    """``(T', H', W')`` of pool5's output for a ``frames x crop`` clip."""
    t4, h4, w4 = frames // 8, crop[0] // 16, crop[1] // 16
    if pool5 == "caffe":
        return _halve_up(t4), _halve_up(h4), _halve_up(w4)
    return (t4 - 2) // 2 + 1, h4 // 2 + 1, w4 // 2 + 1


class C3D(VideoBackbone):
    """C3D with the PyTorch port's module names, for clips of a fixed ``frames x crop_size``.

    Args:
        num_classes: size of ``fc8`` (487 for Sports-1M).
        width: channel multiplier of the convs (1.0 is the paper's; tests use 1/16).
            Every channel count ``c`` becomes ``max(1, round(c * width))``.
        fc_dim: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout after fc6 and fc7 (0.5 in the paper and the port).
        frames, crop_size, resize_short: the declared :class:`Preprocessing`.
            fc6's size follows from them, so the model takes only that geometry
            (the port's file fits 16 x 112 x 112).
        frame_stride: take every ``frame_stride``-th frame of the video.
        pool5: ``"port"`` (pad H, W by one on both sides, as the port) or
            ``"caffe"`` (round up, as Caffe); see the module docstring.
    """

    backbone_name = "c3d"

    def __init__(
        self,
        num_classes: int = 487,
        width: float = 1.0,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        frames: int = 16,
        crop_size: int | tuple[int, int] = 112,
        resize_short: int = 128,
        frame_stride: int = 1,
        pool5: str = "port",
    ):
        super().__init__()
        crop = as_pair(crop_size)
        if pool5 not in POOL5_MODES:
            raise ConfigError(f"c3d: pool5 must be one of {POOL5_MODES}, got {pool5!r}")
        if width <= 0 or fc_dim < 1 or num_classes < 1:
            raise ConfigError(f"c3d: width, fc_dim and num_classes must be positive; got {width}, {fc_dim}, {num_classes}")
        if frames < MIN_FRAMES or min(crop) < MIN_SIZE:
            raise ConfigError(
                f"c3d: needs at least {MIN_FRAMES} frames of at least {MIN_SIZE}x{MIN_SIZE}; "
                f"got frames={frames}, crop_size={crop}"
            )
        self.config: dict[str, Any] = {
            "num_classes": int(num_classes),
            "width": float(width),
            "fc_dim": int(fc_dim),
            "dropout": float(dropout),
            "frames": int(frames),
            "crop_size": list(crop),
            "resize_short": int(resize_short),
            "frame_stride": int(frame_stride),
            "pool5": pool5,
        }
        self.preprocessing = Preprocessing(
            frames=int(frames),
            stride=int(frame_stride),
            crop_size=crop,
            resize_short=int(resize_short),
            mean=SPORTS1M_MEAN,
            std=(1.0, 1.0, 1.0),
        )
        self.frames, self.crop, self.pool5_mode = int(frames), crop, pool5

        in_ch = 3
        for name, (_, out) in CONVS.items():
            out = max(1, int(round(out * width)))
            self.add_module(name, nn.Conv3d(in_ch, out, kernel_size=3, padding=1))
            in_ch = out
        self.pool5_out = pool5_shape(self.frames, crop, pool5)
        t5, h5, w5 = self.pool5_out
        self.fc6 = nn.Linear(in_ch * t5 * h5 * w5, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_relu_network(self, self.fc8)  # the port ships no initialisation

    # -- contract ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.fc8.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc8`` with a fresh ``fc_dim -> num_classes`` layer."""
        self.fc8 = fresh_linear_classifier(self.fc8, num_classes, "c3d")
        self.config["num_classes"] = int(num_classes)

    def layer_groups(self) -> list[LayerGroup]:
        """``conv1`` .. ``conv5`` (temporal), ``fc6``, ``fc7``, ``head`` (see the module docstring)."""
        groups = []
        for group in CONV_GROUPS:
            params = [p for name, (g, _) in CONVS.items() if g == group for p in module_param_names(name, getattr(self, name))]
            groups.append(LayerGroup(group, "temporal", params, list(params)))
        fc6 = module_param_names("fc6", self.fc6)
        if self.pool5_out[0] > 1:  # fc6 sees several time steps and mixes them
            groups.append(LayerGroup("fc6", "temporal", fc6, list(fc6), modules=["drop6"]))
        else:
            groups.append(LayerGroup("fc6", "spatial", fc6, modules=["drop6"]))
        groups.append(LayerGroup("fc7", "spatial", module_param_names("fc7", self.fc7), modules=["drop7"]))
        groups.append(LayerGroup("head", "head", module_param_names("fc8", self.fc8)))
        return groups

    def run_group(self, index: int, state: State) -> State:
        """Run group ``index``: 0-4 the conv blocks with their pools, 5 fc6, 6 fc7, 7 fc8."""
        if index == 0:
            self._check_input(state)
        assert isinstance(state, torch.Tensor)
        if index < len(CONV_GROUPS):
            group = CONV_GROUPS[index]
            for name, (g, _) in CONVS.items():
                if g == group:
                    state = F.relu(getattr(self, name)(state))
            return self.pool_after(index, state)
        if index == 5:
            return self.drop6(F.relu(self.fc6(state.flatten(1))))
        if index == 6:
            return self.drop7(F.relu(self.fc7(state)))
        if index == 7:
            return self.fc8(state)
        raise IndexError(f"c3d has {len(GROUP_NAMES)} layer groups, asked for {index}")

    # -- helpers ------------------------------------------------------------------
    def pool_after(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The pool ending conv group ``index``: pool1 (1x2x2), pool2-pool4 (2x2x2), pool5 (2x2x2, port padding or Caffe rounding)."""
        if index == 0:
            return F.max_pool3d(x, (1, 2, 2), (1, 2, 2))
        if index < 4:
            return F.max_pool3d(x, 2, 2)
        if self.pool5_mode == "caffe":
            return F.max_pool3d(x, 2, 2, ceil_mode=True)
        return F.max_pool3d(x, 2, 2, padding=(0, 1, 1))

    def _check_input(self, x: Any) -> None:
        want = (3, self.frames, *self.crop)
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"c3d: expects clips B x 3 x {self.frames} x {self.crop[0]} x {self.crop[1]} (fc6 is sized for "
                f"that geometry), got {got}"
            )


# -- importing the PyTorch port's state dict ----------------------------------------------


def load_c3d_port_state_dict(state_dict: Mapping[str, torch.Tensor], model: C3D) -> None:
    """Load a state dict in DavideA/c3d-pytorch's layout into ``model``, exactly.

    The names are the port's (``conv1.weight`` ... ``fc8.bias``), so the only
    change is to conv1's weight: its input channels are reversed (the port
    reads BGR, the pipeline gives RGB) and multiplied by ``255 * std`` of the
    model's declared preprocessing (the port reads 0-255 minus the mean, the
    pipeline gives ``(x/255 - mean) / std``). The file's tensors are not modified.

    Raises:
        WeightsError: missing or unexpected keys, or shapes that differ, naming
            them in model order (the first mismatch first); ``model`` is then untouched.
    """
    target = model.state_dict()
    sd = dict(state_dict)
    problems = state_dict_problems(target, sd)
    if problems:
        hint = ""
        if "fc6.weight" in sd and tuple(sd["fc6.weight"].shape) != tuple(target["fc6.weight"].shape):
            t5, h5, w5 = model.pool5_out
            hint = (
                f" (this model's fc6 takes {model.conv5b.out_channels} x {t5} x {h5} x {w5} inputs from "
                f"{model.frames} x {model.crop[0]} x {model.crop[1]} clips; the port's file fits 16 x 112 x 112)"
            )
        raise WeightsError(
            f"state dict does not match the C3D port layout of this model ({model.num_classes} classes, "
            f"{len(target)} tensors): " + "; ".join(problems) + hint
        )
    weight = sd["conv1.weight"]
    scale = torch.tensor([255.0 * s for s in model.preprocessing.std], dtype=torch.float64, device=weight.device)
    conv1 = weight.to(torch.float64).flip(1) * scale.view(1, 3, 1, 1, 1)
    sd["conv1.weight"] = conv1.to(target["conv1.weight"].dtype)
    model.load_state_dict(sd, strict=True)


# -- registry constants ---------------------------------------------------------------


MODEL_CLASS = C3D

PRESETS: dict[str, dict[str, Any]] = {
    "sports1m": {
        "num_classes": 487,
        "width": 1.0,
        "fc_dim": 4096,
        "dropout": 0.5,
        "frames": 16,
        "crop_size": 112,
        "resize_short": 128,
    },
    "tiny": {
        "num_classes": 10,
        "width": 0.0625,
        "fc_dim": 32,
        "dropout": 0.5,
        "frames": 16,
        "crop_size": 32,
        "resize_short": 36,
    },
}

DEFAULT_PRESET = "sports1m"

#: SGD with momentum at the C3D paper's initial learning rate (0.003); not measured on vtransfer's data.
TRAINING_DEFAULTS = {"optimizer": "sgd", "lr": 3e-3, "weight_decay": 5e-4}

#: Constructor keyword of each clip-geometry option (``--frames``, ``--stride``, ``--size``).
GEOMETRY_KEYS = {"size": "crop_size", "frames": "frames", "stride": "frame_stride"}

#: The port's published file. The URL is the one in the port's README; no independent source
#: publishes its hash, so none is pinned: the first download's sha256 is recorded beside the
#: file and enforced afterwards (trust on first use, see vtransfer.weights.hub).
WEIGHT_SOURCES = (
    WeightSource(
        name="c3d:sports1m",
        backbone="c3d",
        preset="sports1m",
        url="http://imagelab.ing.unimore.it/files/c3d_pytorch/c3d.pickle",
        filename="c3d.pickle",
        sha256=None,
        converter="vtransfer.models.c3d:load_c3d_port_state_dict",
        num_classes=487,
        dataset={
            "name": "Sports-1M",
            "num_classes": 487,
            "size": "about 1.1M videos",
            "model": "C3D (Tran et al. 2015), converted Caffe -> Keras -> PyTorch by DavideA/c3d-pytorch",
        },
        note=(
            "C3D's Sports-1M model as ported to PyTorch by DavideA/c3d-pytorch (c3d.pickle, about 320 MB; "
            "no published sha256, so the first download's is recorded). This is C3D, not Karpathy's slow "
            "fusion. Inputs: the Sports-1M channel means, not the per-pixel mean cube the Caffe model used."
        ),
    ),
)

FOREIGN_LAYOUTS = (
    ForeignLayout(
        name="c3d-port",
        backbone="c3d",
        converter="vtransfer.models.c3d:load_c3d_port_state_dict",
        required_keys=("conv1.weight", "conv3a.weight", "conv5b.weight", "fc6.weight", "fc7.weight", "fc8.weight"),
        head_key="fc8.weight",
        description="the PyTorch C3D port (DavideA/c3d-pytorch c3d.pickle)",
        default_preset="sports1m",
    ),
)
