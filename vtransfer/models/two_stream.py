"""A two-stream model: an RGB network and a flow network whose class probabilities are fused late.

As in the two-stream and I3D papers, each stream is trained on its own and
their softmax scores are averaged at test time, here with a weight:
``p = (1 - w) * p_rgb + w * p_flow``, where ``w`` is the flow stream's share
(0 is RGB alone, 1 flow alone, 0.5 the papers' plain average). The
``geometric`` rule instead takes ``p ~ p_rgb^(1 - w) * p_flow^w``,
renormalised: a stream that spreads its probability over several classes
(RGB among classes that differ only by motion) then leaves the choice among
them to the other stream, where an average lets its share dilute the other's
answer. Each stream's calibration temperature, when it has one, scales its
logits first.

The fused model is one :class:`~vtransfer.models.base.VideoBackbone`, so
evaluation, prediction, feature extraction and export take it as any model:

* its input clip holds the RGB channels, then the flow channels
  (:meth:`~vtransfer.data.preprocessing.Preprocessing.join_streams`);
* it has two layer groups: ``streams`` (both networks up to their heads,
  giving the pair of embeddings) and ``head`` (both classifiers and the fusion);
* its output is the log of the fused probabilities, so a softmax over it gives
  them back exactly;
* :meth:`features` is the two embeddings side by side.

It is built from two trained networks, never trained itself: each stream
trains under its policy as a one-stream run does.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from vtransfer.data.preprocessing import Preprocessing
from vtransfer.evaluation.fusion import check_fusion_rule, fuse_probabilities
from vtransfer.models.base import LayerGroup, State, VideoBackbone
from vtransfer.utils.errors import ConfigError

#: The checkpoint ``backbone`` name of a fused two-stream model.
TWO_STREAM = "two-stream"
STREAM_NAMES = ("rgb", "flow")


def check_flow_weight(weight: float) -> float:
    """``weight`` as a float in [0, 1], else :class:`ConfigError`."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = float("nan")
    if not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise ConfigError(f"the fusion weight is the flow stream's share of the fused probabilities, in [0, 1]; got {weight!r}")
    return w


class TwoStreamBackbone(VideoBackbone):
    """An RGB and a flow :class:`VideoBackbone` fused late (see the module docstring).

    Args:
        rgb: the RGB network (``preprocessing.stream == "rgb"``).
        flow: the flow network, reading the same frames (``stream == "flow"``).
        flow_weight: the flow stream's share of the fused probabilities, in [0, 1].
        temperatures: each stream's calibration temperature (``None``: uncalibrated).
        fusion_rule: ``mean`` or ``geometric`` (:func:`fuse_probabilities`).

    Raises:
        ConfigError: the streams are not RGB and flow, read different clips, have
            different class counts, the weight is outside [0, 1], or the rule is unknown.
    """

    backbone_name = TWO_STREAM

    def __init__(self, rgb: VideoBackbone, flow: VideoBackbone, flow_weight: float = 0.5,
                 temperatures: tuple[float | None, float | None] = (None, None), fusion_rule: str = "mean"):
        super().__init__()
        self.preprocessing = Preprocessing.join_streams(rgb.preprocessing, flow.preprocessing)
        if rgb.num_classes != flow.num_classes:
            raise ConfigError(f"the streams predict different class counts: rgb {rgb.num_classes}, flow {flow.num_classes}")
        self.rgb = rgb
        self.flow = flow
        self.flow_weight = check_flow_weight(flow_weight)
        self.temperatures = tuple(temperatures)
        self.fusion_rule = check_fusion_rule(fusion_rule)

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds it: each stream's description (family, config, input, structure) and the fusion."""
        return {
            "flow_weight": self.flow_weight,
            "fusion_rule": self.fusion_rule,
            "streams": {name: {**self.stream(name).describe(), "temperature": t}
                        for name, t in zip(STREAM_NAMES, self.temperatures)},
        }

    def stream(self, name: str) -> VideoBackbone:
        """The ``rgb`` or ``flow`` network."""
        return {"rgb": self.rgb, "flow": self.flow}[name]

    # -- the layer-group contract --------------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        """``streams`` (both networks below their heads) and ``head`` (both classifiers)."""
        body: dict[str, list[str]] = {"params": [], "temporal_params": [], "buffers": [], "modules": []}
        head: dict[str, list[str]] = {"params": [], "temporal_params": [], "buffers": [], "modules": []}
        for name in STREAM_NAMES:
            groups = self.stream(name).layer_groups()
            for target, part in ((body, groups[:-1]), (head, groups[-1:])):
                for g in part:
                    for key in target:
                        target[key] += [f"{name}.{n}" for n in getattr(g, key)]
        return [LayerGroup("streams", "temporal", **body), LayerGroup("head", "head", **head)]

    def run_group(self, index: int, state: State) -> State:
        """Group 0 splits the clip by channel and embeds each stream; group 1 classifies each and fuses."""
        if index == 0:
            rgb, flow = self.split_clip(state)
            return (self._embed(self.rgb, rgb), self._embed(self.flow, flow))
        if index == 1:
            rgb, flow = state
            p = [self._probabilities(net, f, t) for net, f, t in zip((self.rgb, self.flow), (rgb, flow), self.temperatures)]
            fused = fuse_probabilities(p[0], p[1], self.flow_weight, self.fusion_rule)
            return torch.log(fused.clamp_min(torch.finfo(p[0].dtype).tiny))
        raise IndexError(f"a two-stream model has 2 layer groups, not {index + 1}")

    @staticmethod
    def split_clip(clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A joint ``B x C x T x H x W`` clip's RGB channels (the first 3) and flow channels (the rest)."""
        return clip[:, :3], clip[:, 3:]

    @staticmethod
    def _embed(net: VideoBackbone, clip: torch.Tensor) -> torch.Tensor:
        return net.forward_groups(clip, 0, len(net.layer_groups()) - 1)

    @staticmethod
    def _probabilities(net: VideoBackbone, embedding: torch.Tensor, temperature: float | None) -> torch.Tensor:
        logits = net.run_group(len(net.layer_groups()) - 1, embedding).float()
        return torch.softmax(logits / temperature if temperature else logits, dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Both streams' pre-classifier embeddings, RGB first, side by side (``B x (D_rgb + D_flow)``)."""
        return torch.cat(self.forward_groups(x, 0, 1), dim=1)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier on each stream."""
        self.rgb.reset_classifier(num_classes)
        self.flow.reset_classifier(num_classes)

    @property
    def num_classes(self) -> int:
        """Classes of both streams' heads."""
        return self.rgb.num_classes

    def describe(self) -> dict[str, Any]:
        """Checkpoint metadata: ``backbone`` ``two-stream``, the streams in ``config``, the joint input."""
        return {"backbone": TWO_STREAM, "config": copy.deepcopy(self.config), "preprocessing": self.preprocessing.to_dict()}
