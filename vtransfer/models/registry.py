"""Backbone names, their presets, and one builder for all of them.

Each model module (``vtransfer.models.slowfusion``, ``.i3d``, ``.vivit``,
``.effnet3d``) exposes ``MODEL_CLASS`` (a
:class:`~vtransfer.models.base.VideoBackbone` subclass), ``PRESETS`` (preset
name -> constructor kwargs), ``DEFAULT_PRESET``, ``TRAINING_DEFAULTS``
(optimiser, learning rate, weight decay measured to work for the family),
``GEOMETRY_KEYS`` (which constructor keywords set the clip's ``frames``,
``stride`` and ``size``) and optionally ``preferred_memory_format(device,
precision)``. Modules are
imported lazily so listing names is cheap.

A module may serve several names (torchvision's ``r3d_18``, ``mc3_18`` and
``r2plus1d_18`` share ``vtransfer.models.tv_resnet3d``): it then maps each
name to a :class:`BackboneEntry` in ``BACKBONES``, and the registry reads
the constants from that entry instead of the module. A family module may
also declare ``WEIGHT_SOURCES`` and ``FOREIGN_LAYOUTS``, which
:mod:`vtransfer.loading.sources` collects on first use (see
:func:`family_module`).

Names with a prefix in ``_PREFIXES`` stand for a whole open family:
``hf:REPO_OR_DIR`` is any Hugging Face ``AutoModelForVideoClassification``
checkpoint (a hub repo id or a ``save_pretrained`` folder), served by
``vtransfer.models.hf_video``. The part after the prefix is passed to the
constructor under the module's ``REFERENCE_KEY``; such names are not listed
by :func:`backbone_names`, and :func:`is_backbone_name` accepts them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Union

import torch

from vtransfer.data.flow_settings import FLOW_STREAMS
from vtransfer.models.base import VideoBackbone
from vtransfer.utils.errors import ConfigError

_MODULES = {
    "slowfusion": "vtransfer.models.slowfusion",
    "i3d": "vtransfer.models.i3d",
    "vivit": "vtransfer.models.vivit",
    "effnet3d": "vtransfer.models.effnet3d",
    "c3d": "vtransfer.models.c3d",
    **dict.fromkeys(("r3d_18", "mc3_18", "r2plus1d_18"), "vtransfer.models.tv_resnet3d"),
    "s3d": "vtransfer.models.tv_s3d",
    **dict.fromkeys(("mvit_v1_b", "mvit_v2_s"), "vtransfer.models.tv_mvit"),
    **dict.fromkeys(("swin3d_t", "swin3d_s", "swin3d_b"), "vtransfer.models.tv_swin3d"),
}
#: Name prefix -> module serving every name that starts with it (the rest of the name is the model reference).
_PREFIXES = {"hf:": "vtransfer.models.hf_video"}


@dataclass(frozen=True)
class BackboneEntry:
    """The registry constants of one name, for a module that serves several (its ``BACKBONES[name]``)."""

    MODEL_CLASS: type
    PRESETS: dict[str, dict[str, Any]]
    DEFAULT_PRESET: str
    TRAINING_DEFAULTS: dict[str, Any]
    GEOMETRY_KEYS: dict[str, str] = field(default_factory=dict)


def backbone_names() -> list[str]:
    """Registered backbone names."""
    return list(_MODULES)


def _prefix_of(name: str) -> str | None:
    """The prefix in ``_PREFIXES`` that ``name`` starts with, or ``None``."""
    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    if prefix is not None and not name[len(prefix):].strip():
        raise ConfigError(f"backbone {name!r}: give a hub repo id or a folder after {prefix!r} ({prefix}REPO_OR_DIR)")
    return prefix


def is_backbone_name(name: str) -> bool:
    """True for a registered name or a prefixed one (``hf:REPO_OR_DIR``)."""
    return name in _MODULES or any(name.startswith(p) and name[len(p):].strip() for p in _PREFIXES)


def family_module(name: str) -> ModuleType:
    """The Python module implementing backbone ``name`` (imported now); unknown names list the valid ones."""
    prefix = _prefix_of(name)
    if prefix is not None:
        return importlib.import_module(_PREFIXES[prefix])
    if name not in _MODULES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(_MODULES)}, or hf:REPO_OR_DIR")
    return importlib.import_module(_MODULES[name])


def backbone_module(name: str) -> Union[ModuleType, BackboneEntry]:
    """Where the registry constants of ``name`` live: its module, or the module's ``BACKBONES[name]``."""
    module = family_module(name)
    entries = getattr(module, "BACKBONES", None)
    return entries[name] if entries is not None else module


def presets(name: str) -> dict[str, dict[str, Any]]:
    """Preset name -> constructor kwargs for backbone ``name``."""
    return backbone_module(name).PRESETS


def default_preset(name: str) -> str:
    """The preset used when none is given."""
    return backbone_module(name).DEFAULT_PRESET


def resolve_config(name: str, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs for ``name`` from ``preset`` plus non-``None`` ``overrides``."""
    mod = backbone_module(name)
    preset = preset or mod.DEFAULT_PRESET
    if preset not in mod.PRESETS:
        raise ConfigError(f"unknown preset {preset!r} for {name}; choose one of: {', '.join(mod.PRESETS)}")
    cfg = dict(mod.PRESETS[preset])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    prefix = _prefix_of(name)
    if prefix is not None:  # hf:REPO: the rest of the name says which model
        cfg[mod.REFERENCE_KEY] = name[len(prefix):]
    return cfg


def build_backbone(name: str, preset: str | None = None, num_classes: int | None = None, **overrides: Any) -> VideoBackbone:
    """Build an untrained backbone from a preset, with optional overrides and class count."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    cfg = resolve_config(name, preset, **overrides)
    try:
        return backbone_module(name).MODEL_CLASS(**cfg)
    except TypeError as e:
        raise ConfigError(f"bad configuration for {name}: {e}") from e


def build_from_config(name: str, config: dict[str, Any]) -> VideoBackbone:
    """Rebuild a backbone from the ``config`` stored in a checkpoint."""
    return backbone_module(name).MODEL_CLASS(**config)


def training_defaults(name: str) -> dict[str, Any]:
    """The family's default ``optimizer``, ``lr`` and ``weight_decay`` (used where the user gives none)."""
    return dict(backbone_module(name).TRAINING_DEFAULTS)


def memory_format(name: str, device: Any, precision: str) -> Any:
    """The memory format the family runs fastest in on ``device`` at ``precision`` (contiguous unless it says)."""

    chooser = getattr(backbone_module(name), "preferred_memory_format", None)
    return chooser(device, precision) if chooser else torch.contiguous_format


def geometry_keys(name: str) -> dict[str, str]:
    """Constructor keyword for each clip-geometry option (``frames``, ``stride``, ``size``) the family accepts."""
    return dict(getattr(backbone_module(name), "GEOMETRY_KEYS", {}))


def preferred_memory_format(backbone: str, precision: str, device: torch.device) -> torch.memory_format:
    """The memory format backbone family ``backbone`` declares for ``device`` and ``precision``.

    Each family measures its own choice (``benchmarks/bench_step.py``); see
    ``preferred_memory_format`` in its module (contiguous when it declares none).
    """
    return memory_format(backbone, device, precision)


def takes_flow(name: str) -> bool:
    """True if backbone ``name`` can be built for a flow stream: its constructor takes ``in_channels``."""
    cls = getattr(backbone_module(name), "MODEL_CLASS", None)
    return cls is not None and "in_channels" in inspect.signature(cls.__init__).parameters


def check_stream(name: str, stream: str) -> None:
    """Raise :class:`ConfigError` when backbone ``name`` cannot take the input ``stream`` (before any data is read)."""
    if stream in FLOW_STREAMS and not takes_flow(name):
        flow_families = [b for b in backbone_names() if takes_flow(b)]
        raise ConfigError(f"--stream {stream}: backbone {name!r} cannot take optical flow (its first layer is built for "
                          f"3 colour channels only); backbones that can: {', '.join(flow_families)}")
