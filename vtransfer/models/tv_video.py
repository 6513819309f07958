"""torchvision's Kinetics-400 video classifiers behind the vtransfer backbone contract.

The family modules (:mod:`~vtransfer.models.tv_resnet3d`, ``tv_s3d``,
``tv_mvit``, ``tv_swin3d``) each wrap torchvision networks built by
torchvision's own builders (``torchvision.models.video.r3d_18(weights=None,
num_classes=...)``). What they share lives here:

* :class:`TorchvisionVideoBackbone` holds the built network as ``net``, so
  its parameter names are torchvision's under ``net.`` (``net.stem.0.weight``,
  ``net.fc.weight``) and a torchvision state dict loads into ``model.net``
  with a plain, checked ``load_state_dict``. (Adopting the network's modules
  directly is not possible: S3D's and Swin's ``features`` would shadow
  :meth:`~vtransfer.models.base.VideoBackbone.features`.) Subclasses say how
  the modules form layer groups and run each group as torchvision's
  ``forward`` does.
* Everything that describes the published weights comes from torchvision's
  ``Weights`` enum, never typed here: normalisation (``mean``, ``std``), crop
  and resize from ``transforms()``, clip length and frame rate from the
  evaluation settings in ``meta["_docs"]``, the smallest accepted input from
  ``meta["min_size"]`` / ``meta["min_temporal_size"]``, and URL, hash prefix,
  class names and accuracy for the :class:`~vtransfer.weights.source.WeightSource`
  of each enum member (:func:`kinetics_weight_sources`).

**Temporal parameters** follow the rule of the other CNN families (I3D,
effnet3d): a convolution whose kernel has temporal extent > 1, and the
BatchNorm that normalises its output. Transformer families set
:attr:`TorchvisionVideoBackbone.no_temporal_reason` instead: their
attention mixes space and time jointly, nothing acts across time alone, and
the ``temporal`` policy says so (:func:`vtransfer.policies.freezing.resolve_policy`).

**Frame stride.** torchvision states the frame rate its weights were evaluated
at (15 fps, 7.5 fps for MViT); vtransfer's ``stride`` counts frames of the
source video, which for Kinetics is mostly 30 fps, so the presets use
``stride = 30 / frame_rate`` (2, or 4 for MViT).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.hub import HASH_REGEX
from torchvision.models import WeightsEnum

from vtransfer.models.base import (
    LayerGroup,
    Preprocessing,
    VideoBackbone,
    as_pair,
    module_buffer_names,
    module_param_names,
)
from vtransfer.utils.errors import ConfigError
from vtransfer.weights.source import WeightSource
from vtransfer.weights.torchvision_video import TorchvisionVideoLayout

#: Frame rate of the Kinetics source videos the stride is counted in (most are 30 fps).
SOURCE_FPS = 30.0
#: Source-name suffix of each torchvision Weights member vtransfer exposes (others are not listed).
SOURCE_SUFFIX = {"KINETICS400_V1": "kinetics400", "KINETICS400_IMAGENET22K_V1": "kinetics400-in22k"}
#: What each member was initialised from before Kinetics-400, where its name says so.
MEMBER_INIT = {"KINETICS400_IMAGENET22K_V1": "ImageNet-22k"}


# -- what the Weights enum says ------------------------------------------------------


def weights_transform_geometry(weights: WeightsEnum) -> dict[str, Any]:
    """``crop_size``, ``resize_short``, ``mean`` and ``std`` of ``weights.transforms()``.

    torchvision resizes to ``resize_size`` (one side, or both: ``(128, 171)``
    for the ResNets, the 4:3 frame of a 128-px-high clip); vtransfer resizes
    the short side, to the smaller of those numbers.
    """
    t = weights.transforms()
    return {
        "crop_size": list(as_pair(tuple(t.crop_size))),
        "resize_short": int(min(t.resize_size)),
        "mean": tuple(float(v) for v in t.mean),
        "std": tuple(float(v) for v in t.std),
    }


def weights_clip_geometry(weights: WeightsEnum) -> dict[str, int]:
    """``frames`` and ``frame_stride`` of the evaluation torchvision reports for ``weights``.

    Read from ``meta["_docs"]`` ("... with parameters `frame_rate=15`, ... and
    `clip_len=16`"); the stride assumes :data:`SOURCE_FPS` source video.
    """
    docs = weights.meta.get("_docs", "")
    rate = re.search(r"frame_rate=([0-9.]+)", docs)
    clip = re.search(r"clip_len=([0-9]+)", docs)
    if not rate or not clip:
        raise RuntimeError(f"{weights}: torchvision's metadata no longer states frame_rate and clip_len: {docs!r}")
    return {"frames": int(clip.group(1)), "frame_stride": max(1, round(SOURCE_FPS / float(rate.group(1))))}


def min_input(weights: WeightsEnum) -> tuple[int, int]:
    """``(frames, side)``: the smallest clip torchvision declares the weights' network accepts."""
    return int(weights.meta.get("min_temporal_size", 1)), int(max(weights.meta.get("min_size", (1, 1))))


def kinetics_preset(weights: WeightsEnum) -> dict[str, Any]:
    """Constructor kwargs of the geometry the weights were evaluated at, with their classifier size."""
    geo = weights_transform_geometry(weights)
    return {
        "num_classes": len(weights.meta["categories"]),
        **weights_clip_geometry(weights),
        "crop_size": geo["crop_size"],
        "resize_short": geo["resize_short"],
    }


def small_preset(weights: WeightsEnum, frames: int, size: int) -> dict[str, Any]:
    """A test-sized preset: ``frames`` x ``size`` clips, the resize keeping the weights' crop ratio."""
    base = kinetics_preset(weights)
    ratio = base["resize_short"] / max(base["crop_size"])
    return {**base, "frames": frames, "crop_size": [size, size], "resize_short": max(size, round(size * ratio))}


def kinetics_weight_sources(backbone: str, enum: type[WeightsEnum], preset: str) -> list[Any]:
    """One :class:`~vtransfer.weights.source.WeightSource` per exposed member of ``enum``, all from its metadata."""

    sources = []
    for member in enum:  # aliases (DEFAULT) are not iterated
        suffix = SOURCE_SUFFIX.get(member.name)
        if suffix is None:
            continue
        filename = member.url.rsplit("/", 1)[-1]
        prefix = HASH_REGEX.search(filename)
        accuracy = dict(member.meta["_metrics"]["Kinetics-400"])
        dataset = {
            "name": "Kinetics-400",
            "num_classes": len(member.meta["categories"]),
            "size": "about 240k training clips (10 s each)",
            "published_accuracy": accuracy,
        }
        if member.name in MEMBER_INIT:
            dataset["init"] = MEMBER_INIT[member.name]
        geo = weights_transform_geometry(member)
        sources.append(WeightSource(
            name=f"{backbone}:{suffix}",
            backbone=backbone,
            preset=preset,
            url=member.url,
            filename=filename,
            sha256_prefix=prefix.group(1) if prefix else None,
            converter="vtransfer.weights.torchvision_video:load_torchvision_video_state_dict",
            num_classes=len(member.meta["categories"]),
            preprocessing={"mean": geo["mean"], "std": geo["std"]},
            dataset=dataset,
            classes="vtransfer.weights.source:kinetics400_classes",
            note=(
                f"torchvision's {enum.__name__}.{member.name}: Kinetics-400 acc@1 {accuracy['acc@1']:.1f}%, "
                f"acc@5 {accuracy['acc@5']:.1f}% as torchvision reports them. {member.meta.get('_docs', '')}"
            ).strip(),
        ))
    return sources


def torchvision_layout(backbone: str, head_key: str, required_keys: Sequence[str]) -> Any:
    """The :class:`~vtransfer.weights.torchvision_video.TorchvisionVideoLayout` of ``backbone``'s state dicts."""

    return TorchvisionVideoLayout(
        name=f"torchvision-{backbone}",
        backbone=backbone,
        converter="vtransfer.weights.torchvision_video:load_torchvision_video_state_dict",
        required_keys=tuple(required_keys),
        head_key=head_key,
        description=f"torchvision's {backbone}",
        default_preset="kinetics",
    )


# -- the wrapper ---------------------------------------------------------------------


def temporal_conv_params(model: nn.Module, module_names: Sequence[str]) -> list[str]:
    """Parameters of the convs with temporal extent > 1 under ``module_names``, and of the BatchNorm after each.

    Modules are visited in registration order, which in torchvision's video
    CNNs is the order they run in, so "the BatchNorm after" is the next one
    met (R(2+1)D's temporal 3x1x1 conv is followed by its block's BatchNorm).
    """
    out: list[str] = []
    for prefix in module_names:
        after_temporal_conv = False
        for name, module in model.get_submodule(prefix).named_modules(prefix=prefix):
            if isinstance(module, nn.Conv3d) and module.kernel_size[0] > 1:
                out += module_param_names(name, module)
                after_temporal_conv = True
            elif isinstance(module, nn.BatchNorm3d) and after_temporal_conv:
                out += module_param_names(name, module)
                after_temporal_conv = False
    return out


class TorchvisionVideoBackbone(VideoBackbone):
    """A torchvision video network (``self.net``, built by torchvision's builder) as a vtransfer backbone.

    Subclasses set :attr:`tv_builder` (torchvision's builder), :attr:`tv_weights`
    (its ``Weights`` enum), :attr:`backbone_name` (the builder's name) and
    :attr:`classifier` (the classifier's module path, ``net.fc``), and implement
    :meth:`group_modules` and :meth:`run_group`.

    Args:
        num_classes: classifier outputs (400 for the Kinetics weights).
        frames, frame_stride, crop_size, resize_short: the declared :class:`Preprocessing`;
            the normalisation is always the Weights enum's.
    """

    tv_builder: Callable[..., nn.Module]
    tv_weights: type[WeightsEnum]
    classifier: str = ""
    #: Set by families without temporal parameters: why (see :func:`vtransfer.policies.freezing.resolve_policy`).
    no_temporal_reason: str = ""
    #: True when the network takes only its Weights' ``min_temporal_size`` x ``min_size`` clips (MViT).
    fixed_input: bool = False
    #: Parameterless modules (dropout) each group applies, by group name.
    group_dropouts: dict[str, list[str]] = {}

    def __init__(
        self,
        num_classes: int = 400,
        frames: int = 16,
        frame_stride: int = 2,
        crop_size: int | Sequence[int] = 112,
        resize_short: int | None = None,
    ):
        super().__init__()
        crop = as_pair(crop_size)
        min_frames, min_side = min_input(self.tv_weights.DEFAULT)
        if num_classes < 1 or frame_stride < 1:
            raise ConfigError(f"{self.backbone_name}: num_classes and frame_stride must be >= 1; got {num_classes}, {frame_stride}")
        if self.fixed_input and (frames != min_frames or crop != (min_side, min_side)):
            raise ConfigError(f"{self.backbone_name}: takes exactly {min_frames} frames of {min_side}x{min_side} (its "
                              f"position embeddings are sized for that input); got frames={frames}, crop={crop}")
        if frames < min_frames or min(crop) < min_side:
            raise ConfigError(f"{self.backbone_name}: needs clips of at least {min_frames} frames of {min_side}x{min_side}; "
                              f"got frames={frames}, crop={crop}")
        norm = weights_transform_geometry(self.tv_weights.DEFAULT)
        ratio = norm["resize_short"] / max(norm["crop_size"])
        resize = int(resize_short) if resize_short else max(max(crop), round(max(crop) * ratio))
        self.config: dict[str, Any] = {"num_classes": int(num_classes), "frames": int(frames), "frame_stride": int(frame_stride),
                                       "crop_size": list(crop), "resize_short": resize}
        self.preprocessing = Preprocessing(frames=int(frames), stride=int(frame_stride), crop_size=crop,
                                           resize_short=resize, mean=norm["mean"], std=norm["std"])
        self.net = type(self).tv_builder(weights=None, num_classes=int(num_classes))

    # -- what subclasses implement ------------------------------------------------------
    def group_modules(self) -> list[tuple[str, list[str]]]:
        """``(group name, top-level or nested module names)`` from input to output; the last is the head."""
        raise NotImplementedError

    def new_classifier(self, num_classes: int) -> nn.Module:
        """A freshly initialised classifier for ``num_classes`` classes, initialised as torchvision does."""
        raise NotImplementedError

    # -- contract ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        head = self.get_submodule(self.classifier)
        return int(head.out_features if isinstance(head, nn.Linear) else head.out_channels)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (same device and dtype) with a fresh one for ``num_classes`` classes."""
        if num_classes < 1:
            raise ConfigError(f"{self.backbone_name}: num_classes must be >= 1, got {num_classes}")
        old = self.get_submodule(self.classifier).weight
        parent, _, leaf = self.classifier.rpartition(".")
        new = self.new_classifier(num_classes).to(device=old.device, dtype=old.dtype)
        setattr(self.get_submodule(parent) if parent else self, leaf, new)
        self.config["num_classes"] = int(num_classes)

    def temporal_params_of(self, modules: list[str]) -> list[str]:
        """The temporal parameters of a group made of ``modules`` (the conv rule; none for transformers)."""
        return [] if self.no_temporal_reason else temporal_conv_params(self, modules)

    def layer_groups(self) -> list[LayerGroup]:
        """Groups from :meth:`group_modules`: ``temporal`` where they mix time, ``spatial`` otherwise, then ``head``."""
        specs = self.group_modules()
        out = []
        for i, (name, modules) in enumerate(specs):
            params: list[str] = []
            buffers: list[str] = []
            for m in modules:
                params += module_param_names(m, self.get_submodule(m))
                buffers += module_buffer_names(m, self.get_submodule(m))
            if i == len(specs) - 1:
                tag, temporal = "head", []
            else:
                temporal = self.temporal_params_of(modules)
                tag = "temporal" if temporal or self.no_temporal_reason else "spatial"
            out.append(LayerGroup(name, tag, params, temporal, buffers, modules=list(self.group_dropouts.get(name, []))))
        return out

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`ConfigError` unless ``x`` is ``B x 3 x T x H x W`` at least as large as the network takes."""
        min_frames, min_side = min_input(self.tv_weights.DEFAULT)
        if x.dim() != 5 or x.shape[1] != 3:
            raise ConfigError(f"{self.backbone_name}: input must be B x 3 x T x H x W, got shape {tuple(x.shape)}")
        if self.fixed_input and tuple(x.shape[2:]) != (min_frames, min_side, min_side):
            raise ConfigError(f"{self.backbone_name}: takes exactly {min_frames} frames of {min_side}x{min_side}, "
                              f"got {tuple(x.shape[2:])}")
        if x.shape[2] < min_frames or min(x.shape[3:]) < min_side:
            raise ConfigError(f"{self.backbone_name}: needs clips of at least {min_frames} frames of {min_side}x{min_side}, "
                              f"got {tuple(x.shape[2:])}")
