"""Backbone names, their presets, and one builder for all of them.

Each model module (``vtransfer.models.slowfusion``, ``.i3d``, ``.vivit``,
``.effnet3d``) exposes ``MODEL_CLASS`` (a
:class:`~vtransfer.models.base.VideoBackbone` subclass), ``PRESETS`` (preset
name -> constructor kwargs), ``DEFAULT_PRESET``, ``TRAINING_DEFAULTS``
(optimiser, learning rate, weight decay measured to work for the family) and
optionally ``preferred_memory_format(device, precision)``. Modules are
imported lazily so listing names is cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from vtransfer.errors import ConfigError
from vtransfer.models.base import VideoBackbone

_MODULES = {
    "slowfusion": "vtransfer.models.slowfusion",
    "i3d": "vtransfer.models.i3d",
    "vivit": "vtransfer.models.vivit",
    "effnet3d": "vtransfer.models.effnet3d",
}


def backbone_names() -> list[str]:
    """Registered backbone names."""
    return list(_MODULES)


def backbone_module(name: str) -> ModuleType:
    """The module implementing backbone ``name``; unknown names list the valid ones."""
    if name not in _MODULES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])


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
    import torch

    chooser = getattr(backbone_module(name), "preferred_memory_format", None)
    return chooser(device, precision) if chooser else torch.contiguous_format
