"""The model a run starts from: built or loaded per the run's options, with the clip geometry they ask for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtransfer.data.clips import adapt_preprocessing
from vtransfer.data.flow import FLOW_MEAN, FLOW_STD
from vtransfer.data.flow_settings import FlowSettings
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.loading.backbone import check_weights_stream, load_backbone_with_info, weights_flow_channels
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import build_from_config, check_stream, geometry_keys, resolve_config
from vtransfer.run_config import RunConfig


def geometry_overrides(backbone: str, preset: str | None, frames: int | None, stride: int | None, size: int | None) -> dict[str, Any]:
    """Constructor overrides so a freshly built backbone takes ``frames``/``stride``/``size`` clips.

    The short-side resize keeps the preset's crop-to-resize ratio (the backbone's own rule when the preset does not say).
    """

    keys = geometry_keys(backbone)
    wanted = {"frames": frames, "stride": stride, "size": size}
    out = {keys[k]: v for k, v in wanted.items() if v is not None and k in keys}
    if size is not None and "size" in keys:
        cfg = resolve_config(backbone, preset)
        base = cfg.get(keys["size"])
        base = max(base) if isinstance(base, (list, tuple)) else base
        if cfg.get("resize_short") and base:  # else the constructor derives it from the size
            out["resize_short"] = max(size, int(round(size * cfg["resize_short"] / base)))
    return out


def build_run_model(cfg: RunConfig | dict, num_classes: int) -> tuple[VideoBackbone, dict]:
    """The model a run with configuration ``cfg`` (or flat options) starts from, and where its weights came from.

    ``scratch`` gets random weights with the preset's (or the geometry
    options') architecture; other policies load the ``weights``, whose own
    architecture wins for a checkpoint file. The preprocessing follows the
    ``frames``/``stride``/``size`` options.
    """

    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.from_options(cfg)
    m, c = cfg.model, cfg.clips
    check_stream(m.backbone, c.stream)
    check_weights_stream(m.weights, c.stream, m.flow_weights, c.flow_channels)
    fixed_channels = weights_flow_channels(m.weights) if c.stream == "flow" else None
    flow = c.flow_settings(weights_channels=fixed_channels)
    arch_overrides = {}
    if m.dropout is not None:
        arch_overrides["dropout"] = m.dropout
    if flow is not None:
        arch_overrides["in_channels"] = flow.channels  # pretrained RGB weights load into it cross-modality
    if m.weights is None:
        arch_overrides.update(geometry_overrides(m.backbone, m.preset, c.frames, c.stride, c.size))
    # a checkpoint carries its own architecture: the preset only applies to fresh or built-in-source models
    preset = m.preset if m.weights is None or not Path(str(m.weights)).exists() else None
    model, info = load_backbone_with_info(m.backbone, weights=m.weights, num_classes=num_classes, preset=preset, **arch_overrides)
    if cfg.policy.policy == "scratch" and (m.weights is not None or info["kind"] != "random"):  # hf:REPO brings weights
        model, info = _random_twin(model, info)
    model.preprocessing = adapt_preprocessing(model.preprocessing, c.frames, c.stride, c.size)
    if flow is not None:  # the bound follows the working resolution unless --flow-bound fixed it
        model.preprocessing = flow_preprocessing(model.preprocessing,
                                                 c.flow_settings(model.preprocessing.resize_short, fixed_channels))
    return model, info


def flow_preprocessing(base: Preprocessing, flow: FlowSettings) -> Preprocessing:
    """``base`` for a flow stream: flow clips at the same positions, their uint8 levels mapped to [-1, 1]."""
    return base.replace(stream="flow", flow=flow, mean=(FLOW_MEAN,) * flow.channels, std=(FLOW_STD,) * flow.channels)


def _random_twin(model: VideoBackbone, info: dict) -> tuple[VideoBackbone, dict]:
    """A randomly initialised model of exactly ``model``'s architecture and preprocessing (the scratch baseline).

    ``scratch`` beside pretrained policies must train the same network, so a
    comparison never sets a checkpoint's small preset against a full-size one.
    """

    twin = build_from_config(model.backbone_name, dict(model.config))
    twin.preprocessing = model.preprocessing
    twin.eval()
    random_info = {**info, "kind": "random", "source": None, "path": None, "pretrained_on": None,
                   "pretrained_classes": None, "classes": None, "architecture_from": info.get("weights")}
    return twin, random_info
