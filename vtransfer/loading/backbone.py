"""``load_backbone``: one call from a backbone name and a weights spec to a ready model.

``weights`` may be:

* ``None`` - random initialisation from the preset;
* a source name - built-in (``i3d:kinetics400``, see :mod:`vtransfer.loading.sources`)
  or registered with ``vtransfer weights add``;
* a path to a vtransfer checkpoint - the architecture comes from its metadata;
* a path to a foreign state dict in a recognised layout (the PyTorch I3D port,
  vit-pytorch's ViViT, torchvision's GoogLeNet / ViT) - imported into the
  preset's architecture (plus any overrides).

Pickled files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.loading.sources import (
    BUILTIN_SOURCES,
    detect_layout,
    known_layouts_text,
    list_sources,
    registered_source_path,
    registered_sources,
    source_names,
)
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import (
    backbone_module,
    build_backbone,
    default_preset,
    family_module,
    presets,
    resolve_config,
    training_defaults,
)
from vtransfer.policies.freezing import plan_policy
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.weights.checkpoint import (
    is_vtransfer_checkpoint,
    read_checkpoint_metadata,
    read_foreign_state_dict,
    trained_on,
)
from vtransfer.weights.source import resolve_dotted


def _info(name: str, kind: str, weights: Any, **fields: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "backbone": name,
        "kind": kind,
        "weights": None if weights is None else str(weights),
        "source": None,
        "path": None,
        "pretrained_on": None,
        "pretrained_classes": None,
        "classes": None,
    }
    info.update(fields)
    return info


def _finish(model: VideoBackbone, info: dict[str, Any], num_classes: int | None) -> tuple[VideoBackbone, dict[str, Any]]:
    """Replace the head if the class count differs, record the result, set eval mode."""
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        info["head_reset"] = True
        info["classes"] = None
    else:
        info.setdefault("head_reset", False)
    info["num_classes"] = model.num_classes
    info["preprocessing"] = model.preprocessing.to_dict()
    model.eval()
    return model, info


def _check_backbone(name: str | None, found: str, what: str) -> str:
    if name is not None and name != found:
        raise WeightsError(f"{what} holds a backbone of type {found}, but the backbone asked for is {name}")
    return found


def _load_builtin_source(
    name: str | None, source_name: str, num_classes: int | None, preset: str | None, overrides: dict[str, Any]
) -> tuple[VideoBackbone, dict[str, Any]]:

    source = BUILTIN_SOURCES[source_name]
    name = _check_backbone(name, source.backbone, f"weight source {source_name}")
    if not source.available:
        raise WeightsError(f"weight source {source_name}: {source.note}")
    # Fetch first: an offline failure should not wait for a full-size model to be built.
    path = source.fetch()
    clash = {k: (v, overrides[k]) for k, v in source.config.items() if k in overrides and overrides[k] != v}
    if clash:
        raise WeightsError(f"weight source {source_name} needs " + ", ".join(
            f"{k}={need} (asked: {asked})" for k, (need, asked) in clash.items()))
    model = build_backbone(name, preset or source.preset, num_classes=source.num_classes,
                           **{**source.config, **overrides})
    source.load_into(model, path)
    classes = source.class_names()
    info = _info(
        name,
        "source",
        source_name,
        source=source_name,
        path=str(path),
        pretrained_on=dict(source.dataset),
        pretrained_classes=classes,
        classes=classes,
    )
    return _finish(model, info, num_classes)


def _differs_from_preset(meta: dict[str, Any], preset: str) -> bool:
    """True if a checkpoint's stored config is not the preset's (the class count aside)."""

    try:
        wanted = resolve_config(str(meta.get("backbone")), preset)
    except ConfigError:
        return True
    stored = meta["config"]
    return any(k != "num_classes" and k in stored and stored[k] != v for k, v in wanted.items())


def _load_checkpoint_file(
    name: str | None, path: Path, num_classes: int | None, preset: str | None, overrides: dict[str, Any], weights: Any
) -> tuple[VideoBackbone, dict[str, Any]]:

    meta = read_checkpoint_metadata(path) or {}
    if isinstance(meta.get("backbone"), str):  # otherwise model_from_checkpoint reports what is wrong
        _check_backbone(name, meta["backbone"], str(path))
    if preset is not None and isinstance(meta.get("config"), dict) and _differs_from_preset(meta, preset):
        warnings.warn(
            f"{path}: the architecture comes from the checkpoint, which differs from preset {preset!r}; the preset was ignored",
            stacklevel=4,
        )
    model, ckpt = model_from_checkpoint(path, config_overrides=overrides)
    source = ckpt.source or {}
    info = _info(
        ckpt.backbone,
        "checkpoint",
        weights,
        source=source.get("name") or (source.get("pretrain_source") or {}).get("name"),
        path=str(path),
        pretrained_on=trained_on(ckpt.metadata),
        pretrained_classes=list(ckpt.classes),
        classes=list(ckpt.classes),
        training=ckpt.training or None,
    )
    return _finish(model, info, num_classes)


def _load_foreign_file(
    name: str | None, path: Path, num_classes: int | None, preset: str | None, overrides: dict[str, Any], weights: Any
) -> tuple[VideoBackbone, dict[str, Any]]:

    state = read_foreign_state_dict(path)
    layout = detect_layout(state)
    if layout is None:
        sample = ", ".join(list(state)[:5])
        raise WeightsError(
            f"{path}: not a vtransfer checkpoint and not a recognised state-dict layout (first keys: {sample}). "
            f"Known layouts: {known_layouts_text()}"
        )
    name = _check_backbone(name, layout.backbone, f"{path} ({layout.description})")
    model = build_backbone(name, preset or layout.default_preset, num_classes=layout.num_classes(state), **overrides)
    try:
        resolve_dotted(layout.converter)(state, model)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    info = _info(name, "foreign", weights, path=str(path), layout=layout.name)
    return _finish(model, info, num_classes)


def _load_path(
    name: str | None, path: Path, num_classes: int | None, preset: str | None, overrides: dict[str, Any], weights: Any
) -> tuple[VideoBackbone, dict[str, Any]]:

    if is_vtransfer_checkpoint(path):
        return _load_checkpoint_file(name, path, num_classes, preset, overrides, weights)
    return _load_foreign_file(name, path, num_classes, preset, overrides, weights)


def load_backbone_with_info(
    name: str | None,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    preset: str | None = None,
    **overrides: Any,
) -> tuple[VideoBackbone, dict[str, Any]]:
    """Like :func:`load_backbone`, and also return where the weights came from.

    The info dict has ``backbone``, ``kind`` (``random``, ``source``,
    ``checkpoint``, ``foreign``; ``hf`` for ``hf:REPO`` built with its own weights), ``weights``, ``source`` (source name or
    ``None``), ``path``, ``pretrained_on`` (dataset dict: name, num_classes,
    size), ``pretrained_classes``, ``classes`` (names of the current head's
    outputs; ``None`` if unknown or reset), ``num_classes``, ``head_reset``
    and ``preprocessing``; ``layout`` for foreign files, ``training`` for checkpoints.
    """

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if weights is None:
        if name is None:
            raise WeightsError("load_backbone: give a backbone name, or weights to take it from")
        model = build_backbone(name, preset, num_classes=num_classes, **overrides)
        # a backbone that brings its own weights when built (hf:REPO) says where they came from
        return _finish(model, {**_info(name, "random", None), **(getattr(model, "pretrained_info", None) or {})}, num_classes)

    spec = str(weights)
    if isinstance(weights, str) and spec in BUILTIN_SOURCES:
        return _load_builtin_source(name, spec, num_classes, preset, overrides)
    if isinstance(weights, str) and spec in registered_sources():
        path, _entry = registered_source_path(spec)
        model, info = _load_path(name, path, num_classes, preset, overrides, weights)
        info["source"] = spec
        return model, info

    path = Path(spec).expanduser()
    if path.is_file():
        return _load_path(name, path, num_classes, preset, overrides, weights)
    known = ", ".join(source_names(name)) or "none"
    raise WeightsError(
        f"--weights {spec}: no such file and no weight source of that name "
        f"(sources{' for ' + name if name else ''}: {known})"
    )


def load_backbone(
    name: str | None,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    preset: str | None = None,
    **overrides: Any,
) -> VideoBackbone:
    """A backbone in eval mode, randomly initialised or loaded from ``weights``.

    Args:
        name: backbone name (``slowfusion``, ``i3d``, ``vivit``); may be ``None``
            when ``weights`` is a checkpoint or source (the name is then taken from it).
            If given and the weights hold another backbone: :class:`WeightsError`.
        weights: ``None`` (random init), a source name, a vtransfer checkpoint path,
            or a foreign state-dict path in a recognised layout.
        num_classes: wanted classifier size; a loaded head of another size is
            replaced by a fresh one.
        preset: architecture preset (default: the source's, else the backbone's).
        **overrides: constructor arguments overriding the preset; for a vtransfer
            checkpoint (whose architecture is stored, so ``preset`` is ignored with a
            warning) only those that keep every weight's shape, such as ``dropout``.

    The model's forward takes a float ``B x 3 x T x H x W`` clip normalised as
    ``model.preprocessing`` declares and returns ``B x classes`` logits.
    """
    return load_backbone_with_info(name, weights, num_classes, preset, **overrides)[0]


# -- describing backbones (what `vtransfer backbones` and `vtransfer inspect` show) -------------


def _shape_only(name: str, preset: str | None, num_classes: int | None = None, **overrides: Any) -> VideoBackbone:
    """Build a backbone on the meta device: real parameter shapes, no memory, no initialisation."""

    with torch.device("meta"):
        return build_backbone(name, preset, num_classes=num_classes, **overrides)


def backbone_summary(name: str) -> dict[str, Any]:
    """What `vtransfer backbones` lists for one backbone.

    Keys: ``name``, ``presets``, ``default_preset``, ``params`` (default preset,
    its own head), ``num_classes``, ``input`` (``{"frames", "stride", "size"}``),
    ``preprocessing``, ``sources`` (from :func:`~vtransfer.loading.sources.list_sources`),
    ``training`` (the family's default optimiser, learning rate, weight decay)
    and ``description`` (the family module's ``DESCRIPTION``, or ``None``).
    """

    preset = default_preset(name)
    model = _shape_only(name, preset)
    pre = model.preprocessing
    return {
        "name": name,
        "presets": list(presets(name)),
        "default_preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "num_classes": model.num_classes,
        "input": {"frames": pre.frames, "stride": pre.stride, "size": list(pre.crop_size)},
        "preprocessing": pre.to_dict(),
        "sources": list_sources(name),
        "training": training_defaults(name),
        "description": getattr(backbone_module(name), "DESCRIPTION", None) or getattr(family_module(name), "DESCRIPTION", None),
    }


def inspect_backbone(
    name: str,
    preset: str | None = None,
    policy: str | None = None,
    train_groups: list[str] | None = None,
    num_classes: int | None = None,
    policy_options=None,
) -> dict[str, Any]:
    """Layer groups of a backbone with parameter counts, and what a policy would train.

    ``policy_options`` (:class:`vtransfer.policies.peft.PolicyOptions`) set the
    parameter-efficient policies' rank, targets and sizes.

    Returns ``{"backbone", "preset", "num_classes", "total_params",
    "temporal_params", "groups": [...], "policy": {...} | None}``; each group
    has ``index``, ``name``, ``tag``, ``params``, ``temporal_params`` and, with
    a policy, ``trainable_params`` and ``trains`` (``all``, ``part`` or ``none``).
    The policy dict has ``policy``, ``trainable_params``, ``total_params``,
    ``fraction``, ``trainable_groups``, ``first_trainable_group``, ``reinit``.
    """

    preset = preset or default_preset(name)
    model = _shape_only(name, preset, num_classes)
    plan = None
    if policy is not None or train_groups:

        model, plan = plan_policy(model, policy or "custom", policy_options, train_groups)  # adds LoRA, adapters, a probe
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    trainable = set(plan.trainable) if plan else set()
    groups = []
    for i, g in enumerate(model.layer_groups()):
        row: dict[str, Any] = {
            "index": i,
            "name": g.name,
            "tag": g.tag,
            "params": sum(sizes[p] for p in g.params),
            "temporal_params": sum(sizes[p] for p in g.temporal_params),
        }
        if plan is not None:
            n_train = sum(sizes[p] for p in g.params if p in trainable)
            row["trainable_params"] = n_train
            row["trains"] = "none" if n_train == 0 else ("all" if n_train == row["params"] else "part")
        groups.append(row)
    total = sum(sizes.values())
    out: dict[str, Any] = {
        "backbone": name,
        "preset": preset,
        "num_classes": model.num_classes,
        "total_params": total,
        "temporal_params": sum(g["temporal_params"] for g in groups),
        "groups": groups,
        "policy": None,
    }
    if plan is not None:
        n_train = sum(sizes[p] for p in plan.trainable)
        out["policy"] = {
            "policy": plan.policy,
            "trainable_params": n_train,
            "total_params": total,
            "fraction": n_train / total if total else 0.0,
            "trainable_groups": list(plan.trainable_groups),
            "first_trainable_group": plan.first_trainable_group,
            "reinit": plan.reinit,
            "train_patterns": list(getattr(plan, "train_patterns", []) or []),
        }
    return out


def check_weights_stream(weights: str | Path | None, stream: str, flow_weights: str | Path | None = None,
                         flow_channels: int | None = None) -> None:
    """Raise :class:`ConfigError` when ``weights`` cannot start a network for input ``stream`` (reads no video).

    A built-in source says which streams it can start (2D ImageNet weights start RGB and, by
    cross-modality averaging, flow; a video network only the stream it was trained on); a
    vtransfer checkpoint starts only the stream its preprocessing records. A two-stream run
    checks both networks' weights (:func:`stream_weights`); ``flow_weights`` is only for it.
    ``flow_channels`` (``--flow-channels``) must match what weights trained on flow take.
    """
    if stream == "two-stream":
        stream_weights(weights, flow_weights, flow_channels)
        return
    if flow_weights is not None:
        raise ConfigError(f"--flow-weights is for --stream two-stream; this run is --stream {stream}")
    if weights is None:
        return
    text = str(weights)
    if text in BUILTIN_SOURCES:
        streams = BUILTIN_SOURCES[text].streams
        if stream not in streams:
            raise ConfigError(f"--weights {text} starts a {' or '.join(streams)} network, not --stream {stream}"
                              + ("; add --stream flow" if streams == ("flow",) else ""))
    else:
        path = Path(text).expanduser()
        meta = read_checkpoint_metadata(path) if path.is_file() else None
        if meta and isinstance(meta.get("preprocessing"), dict):
            saved = meta["preprocessing"].get("stream", "rgb")
            if saved != stream:
                raise ConfigError(f"--weights {path} is a {saved} network, but --stream is {stream}")
    fixed = weights_flow_channels(weights) if stream == "flow" and flow_channels is not None else None
    if fixed is not None and flow_channels != fixed:
        raise ConfigError(f"--weights {text} is a flow network on {fixed} channels; --flow-channels {flow_channels} "
                          f"does not fit it (leave --flow-channels out: it follows the weights)")


def weights_flow_channels(weights: str | Path | None) -> int | None:
    """The flow channels that a flow network started from ``weights`` must take, or ``None`` when any count will do.

    Weights trained on flow fix it (a built-in flow source's ``in_channels``, a flow checkpoint's
    recorded flow settings); RGB weights start any count the cross-modality way, random weights too.
    """
    if weights is None:
        return None
    text = str(weights)
    source = BUILTIN_SOURCES.get(text)
    if source is not None:
        return source.config.get("in_channels") if source.streams == ("flow",) else None
    path = Path(text).expanduser()
    meta = read_checkpoint_metadata(path) if path.is_file() else None
    pre = meta.get("preprocessing") if meta else None
    if isinstance(pre, dict) and pre.get("stream") == "flow" and isinstance(pre.get("flow"), dict):
        return pre["flow"].get("channels")
    return None


def stream_weights(weights: str | Path | None, flow_weights: str | Path | None,
                   flow_channels: int | None = None) -> tuple[str | None, str | None]:
    """The RGB and the flow network's weights of a two-stream run, each checked (reads no video).

    The flow network takes ``flow_weights`` when given; else ``weights`` when
    they can start a flow network (2D ImageNet weights, by averaging over
    colour); else the source's flow twin (``i3d:kinetics400`` ->
    ``i3d:kinetics400-flow``). No weights at all: both start at random.

    Raises:
        ConfigError: weights that cannot start the stream they are given for,
            RGB weights with no flow counterpart and no ``flow_weights``, or
            ``flow_channels`` that the flow network's weights do not take.
    """
    rgb = None if weights is None else str(weights)
    check_weights_stream(rgb, "rgb")
    if flow_weights is None and rgb is not None:
        source = BUILTIN_SOURCES.get(rgb)
        if source is not None and "flow" in source.streams:
            flow_weights = rgb
        elif f"{rgb}-flow" in BUILTIN_SOURCES:
            flow_weights = f"{rgb}-flow"
        else:
            raise ConfigError(f"--stream two-stream: --weights {rgb} cannot start the flow network; "
                              "give its weights with --flow-weights")
    flow = None if flow_weights is None else str(flow_weights)
    check_weights_stream(flow, "flow", flow_channels=flow_channels)
    return rgb, flow
