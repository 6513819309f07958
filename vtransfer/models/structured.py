"""Backbones whose layer groups a policy extended with new modules (adapters, a probe, LoRA).

Parameter-efficient policies change a pretrained network's structure:
LoRA wraps its linear and conv layers, ST-Adapters run between its blocks,
an attentive probe replaces its global pooling. The families know nothing of
this. Policy-time surgery (:mod:`vtransfer.policies.peft`) gives the built
model a subclass of its own class that puts :class:`StructuredBackbone` in
front (the way ``torch.nn.utils.parametrize`` does), and records

* ``policy_structure``: a JSON document that lets the same surgery be redone
  on a freshly built model (checkpoints store it; see
  :func:`vtransfer.policies.peft.restore_structure`), and
* ``group_edits`` (:class:`GroupEdits`): which added submodule runs before or
  after which layer group, which group must hand over its map *before* the
  family pools it, and which group owns each added submodule's parameters.

The layer-group contract still holds: groups partition every parameter
(added ones included), run in sequence, and a frozen prefix can still be run
once and cached. :meth:`StructuredBackbone.describe` includes the structure,
so a feature-cache fingerprint never mistakes a probe's unpooled prefix for
a plain model's pooled one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from vtransfer.models.base import LayerGroup, State, VideoBackbone, module_param_names
from vtransfer.utils.errors import ConfigError

#: Element-wise ops a pre-pool tap may apply to the tapped module's output (named, so structures stay data).
TAP_POSTS = {"relu6": F.relu6}


@dataclass
class GroupEdits:
    """How added submodules hook into a backbone's groups (all keyed by group index).

    Attributes:
        before: submodule applied to the group's input.
        after: submodule applied to the group's output.
        unpooled: ``(module name, post op name or None)``: the group's output
            is replaced by that module's output during the group (post op
            applied), i.e. the map the family would have pooled next.
        owned: submodules whose parameters join the group.
        temporal: names (among ``owned``) of submodules that mix information across time.
    """

    before: dict[int, str] = field(default_factory=dict)
    after: dict[int, str] = field(default_factory=dict)
    unpooled: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    owned: dict[int, list[str]] = field(default_factory=dict)
    temporal: set[str] = field(default_factory=set)


class StructuredBackbone(VideoBackbone):
    """Mixin placed before a backbone family's class by :func:`make_structured`.

    Overrides :meth:`layer_groups` (added parameters join their groups),
    :meth:`run_group` (added submodules run where ``group_edits`` says),
    :meth:`features` (the head group's input, after any module that runs
    before the head) and :meth:`describe` (adds ``"structure"``).
    """

    policy_structure: dict[str, Any]
    group_edits: GroupEdits

    def describe(self) -> dict[str, Any]:
        """The family's description plus ``"structure"``: what surgery to redo after rebuilding it."""
        desc = super().describe()
        desc["structure"] = copy.deepcopy(self.policy_structure)
        return desc

    def layer_groups(self) -> list[LayerGroup]:
        """The family's groups, with each added submodule's parameters in the group that runs it."""
        groups = super().layer_groups()
        for index, owned in self.group_edits.owned.items():
            g = groups[index]
            params, temporal = list(g.params), list(g.temporal_params)
            for name in owned:
                names = module_param_names(name, self.get_submodule(name))
                params += names
                if name in self.group_edits.temporal:
                    temporal += names
            tag = "temporal" if temporal and g.tag == "spatial" else g.tag
            groups[index] = replace(g, tag=tag, params=params, temporal_params=temporal)
        return groups

    def run_group(self, index: int, state: State) -> State:
        """The family's group ``index``, with the added submodules around it."""
        edits = self.group_edits
        if index in edits.before:
            state = self.get_submodule(edits.before[index])(state)
        if index in edits.unpooled:
            state = self._run_unpooled(index, state, *edits.unpooled[index])
        else:
            state = super().run_group(index, state)
        if index in edits.after:
            state = self.get_submodule(edits.after[index])(state)
        return state

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: the ``B x D`` embedding, pooled by the probe when there is one."""
        head = len(super().layer_groups()) - 1
        state = self.forward_groups(x, 0, head)
        if head in self.group_edits.before:
            state = self.get_submodule(self.group_edits.before[head])(state)
        return state

    def _run_unpooled(self, index: int, state: State, module: str, post: str | None) -> State:
        """Run group ``index`` but return ``module``'s output (the map before the family's pooling)."""
        seen: list[torch.Tensor] = []
        handle = self.get_submodule(module).register_forward_hook(lambda _m, _inp, out: seen.append(out))
        try:
            super().run_group(index, state)
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"{self.backbone_name}: group {index} never ran {module!r}, the map the probe reads")
        out = seen[-1]
        return TAP_POSTS[post](out) if post else out


_STRUCTURED_CLASSES: dict[type, type] = {}


def structured_class(cls: type) -> type:
    """``cls`` with :class:`StructuredBackbone` in front (one class per family, created once)."""
    if issubclass(cls, StructuredBackbone):
        return cls
    if cls not in _STRUCTURED_CLASSES:
        _STRUCTURED_CLASSES[cls] = type(
            f"Structured{cls.__name__}",
            (StructuredBackbone, cls),
            {"__module__": __name__, "__doc__": f"{cls.__name__} with policy-time modules (see {__name__})."},
        )
    return _STRUCTURED_CLASSES[cls]


def structure_of(model: VideoBackbone) -> dict[str, Any] | None:
    """The policy structure recorded on ``model`` (a copy), or ``None`` for a plain model."""
    structure = getattr(model, "policy_structure", None) if isinstance(model, StructuredBackbone) else None
    return copy.deepcopy(structure) if structure else None


def make_structured(model: VideoBackbone, structure: dict[str, Any], edits: GroupEdits) -> VideoBackbone:
    """Turn ``model`` (in place) into a structured backbone recording ``structure`` and applying ``edits``."""
    if isinstance(model, StructuredBackbone):
        raise ConfigError(
            f"{model.backbone_name}: the model already carries a {model.policy_structure.get('kind')!r} structure; "
            "a model takes one parameter-efficient policy"
        )
    model.__class__ = structured_class(type(model))
    model.policy_structure = copy.deepcopy(structure)
    model.group_edits = edits
    return model


def remove_structure(model: VideoBackbone) -> VideoBackbone:
    """Give ``model`` back its family class (after the added modules were folded away, e.g. a LoRA merge)."""
    if isinstance(model, StructuredBackbone):
        family = next(c for c in type(model).__mro__[1:] if not issubclass(c, StructuredBackbone))
        del model.policy_structure
        del model.group_edits
        model.__class__ = family
    return model
