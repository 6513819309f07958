"""The contract every vtransfer backbone meets.

A backbone is a sequence of *layer groups* run one after another, from the
input clip to the logits. Each group owns a disjoint set of parameters and is
tagged by what it mixes:

* ``spatial``  - mixes information within a frame only,
* ``temporal`` - mixes information across time (at least partly; see
  :attr:`LayerGroup.temporal_params` for the parameter-level rule),
* ``head``     - the classifier (always the last group; its input is the
  ``B x D`` pre-classifier embedding).

Because groups run in sequence, a policy can freeze a prefix of them and run
that prefix once without autograd (or cache its output), then train the rest:
``model.forward_groups(x, 0, k)`` gives the activations after group ``k-1``,
and ``model.forward_groups(h, k, len(groups))`` finishes the forward pass.
The state passed between groups is a tensor or a tuple of tensors (the
two-stream slow-fusion variants pass a tuple).

Models know nothing of files or training: they declare their preprocessing
(:class:`Preprocessing`) and the data pipeline honours it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from vtransfer.data.preprocessing import Preprocessing
from vtransfer.utils.errors import ConfigError
from vtransfer.utils.shapes import as_pair as as_pair  # re-exported: the families take it from here

GROUP_TAGS = ("spatial", "temporal", "head")

State = Union[torch.Tensor, tuple]


@dataclass
class LayerGroup:
    """One named, tagged set of parameters, in input-to-output order.

    Attributes:
        name: stable name (``conv1``, ``Mixed_4b``, ``spatial.3``, ``head``).
        tag: one of ``spatial``, ``temporal``, ``head``.
        params: fully qualified parameter names (as in ``model.named_parameters()``).
        temporal_params: the subset of ``params`` that mixes information across
            time. Equal to ``params`` for a purely temporal group, empty for a
            spatial group, a proper subset for mixed groups (an I3D Inception
            block's convs with temporal extent > 1, and their BatchNorms).
        buffers: fully qualified buffer names owned by the group (BatchNorm stats).
        modules: names of parameterless submodules the group applies that act
            differently in training (dropout). When the group is frozen they are
            put in eval mode with it, so a frozen group is a fixed function.
    """

    name: str
    tag: str
    params: list[str]
    temporal_params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tag not in GROUP_TAGS:
            raise ValueError(f"group {self.name!r}: tag must be one of {GROUP_TAGS}, got {self.tag!r}")
        extra = set(self.temporal_params) - set(self.params)
        if extra:
            raise ValueError(f"group {self.name!r}: temporal_params not in params: {sorted(extra)}")


class VideoBackbone(nn.Module):
    """Base class of all backbones.

    Subclasses set ``self.backbone_name`` (registry name), ``self.config``
    (JSON-serialisable constructor kwargs, so ``type(m)(**m.config)`` rebuilds
    the architecture) and ``self.preprocessing``, and implement
    :meth:`layer_groups`, :meth:`run_group` and :meth:`reset_classifier`.
    """

    backbone_name: str = ""
    config: dict[str, Any]
    preprocessing: Preprocessing

    # -- what subclasses implement ------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        """Ordered groups from input to output; together they partition all parameters."""
        raise NotImplementedError

    def run_group(self, index: int, state: State) -> State:
        """Apply group ``index`` to ``state`` (the clip for index 0)."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of output classes of the current classifier."""
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------
    def forward_groups(self, state: State, start: int, stop: int) -> State:
        """Run groups ``start .. stop-1`` on ``state`` and return the new state."""
        for i in range(start, stop):
            state = self.run_group(i, state)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x classes`` for a normalised float clip ``B x 3 x T x H x W``."""
        return self.forward_groups(x, 0, len(self.layer_groups()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``B x D`` pre-classifier embedding (the head group's input)."""
        return self.forward_groups(x, 0, len(self.layer_groups()) - 1)

    def group_names(self) -> list[str]:
        """Names of the layer groups, input to output."""
        return [g.name for g in self.layer_groups()]

    def describe(self) -> dict[str, Any]:
        """Architecture metadata stored in checkpoints: name, config, preprocessing."""
        return {
            "backbone": self.backbone_name,
            "config": copy.deepcopy(self.config),
            "preprocessing": self.preprocessing.to_dict(),
        }


def group_param_counts(model: VideoBackbone) -> list[tuple[str, str, int]]:
    """``(name, tag, number of parameters)`` for each layer group of ``model``."""
    params = dict(model.named_parameters())
    return [(g.name, g.tag, sum(params[p].numel() for p in g.params)) for g in model.layer_groups()]


def check_groups_partition(model: VideoBackbone) -> None:
    """Raise ``AssertionError`` unless the groups cover every parameter exactly once."""
    seen: dict[str, str] = {}
    for g in model.layer_groups():
        for p in g.params:
            assert p not in seen, f"parameter {p} is in groups {seen[p]} and {g.name}"
            seen[p] = g.name
    missing = [n for n, _ in model.named_parameters() if n not in seen]
    assert not missing, f"parameters in no group: {missing}"
    groups = model.layer_groups()
    assert groups[-1].tag == "head", "the last group must be the head"


def module_param_names(prefix: str, module: nn.Module) -> list[str]:
    """Fully qualified names of ``module``'s parameters under ``prefix``."""
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]


def module_buffer_names(prefix: str, module: nn.Module) -> list[str]:
    """Fully qualified names of ``module``'s buffers under ``prefix``."""
    return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers()]


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding ``(before, after)`` of one dimension of length ``size``.

    The output has ``ceil(size / stride)`` positions; the total padding is
    whatever makes that so, and an odd total puts the extra element after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def init_relu_network(model: nn.Module, classifier: nn.Linear, std: float = 0.01) -> None:
    """Kaiming (ReLU) weights and zero biases for every Conv3d/Linear of ``model``, then N(0, ``std``) for the classifier.

    The init of networks whose papers give none (slow fusion, C3D's port); a model
    built on the meta device (shapes only) is left alone.
    """
    if classifier.weight.is_meta:
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=std)
    nn.init.zeros_(classifier.bias)


def fresh_linear_classifier(old: nn.Linear, num_classes: int, family: str, std: float = 0.01) -> nn.Linear:
    """A new ``old.in_features -> num_classes`` classifier on ``old``'s device and dtype, N(0, ``std``), zero bias."""

    if num_classes < 1:
        raise ConfigError(f"{family}: num_classes must be >= 1, got {num_classes}")
    head = nn.Linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    return head
