"""From a vtransfer checkpoint file to a ready model: rebuild the stored architecture, redo its policy surgery, load.

:mod:`vtransfer.weights.checkpoint` owns the file format (reading, writing,
validating the metadata) and knows no model; this module adds the model
registry and the parameter-efficient policies' structure on top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vtransfer.data.preprocessing import Preprocessing
from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import backbone_names, build_from_config, is_backbone_name
from vtransfer.models.two_stream import STREAM_NAMES, TWO_STREAM, TwoStreamBackbone
from vtransfer.policies.peft import merge_lora, restore_structure, structure_of
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.weights.checkpoint import (
    Checkpoint,
    checkpoint_against_model,
    checkpoint_error,
    read_checkpoint_file,
    save_checkpoint,
)


def _read_known(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`~vtransfer.weights.checkpoint.read_checkpoint_file`, plus: its backbone is one this vtransfer has."""
    path, meta, state = read_checkpoint_file(path)
    if meta["backbone"] != TWO_STREAM and not is_backbone_name(meta["backbone"]):
        raise checkpoint_error(path, f"unknown backbone {meta['backbone']!r}; known backbones: {', '.join(backbone_names())}")
    return path, meta, state


def _build(path: Path, backbone: str, config: dict[str, Any], *, meta_device: bool,
           structure: dict[str, Any] | None = None) -> VideoBackbone:
    """Rebuild the stored architecture (and its policy ``structure``); on the meta device only shapes are made."""
    if backbone == TWO_STREAM:
        return _build_two_stream(path, config, meta_device=meta_device)
    if meta_device:
        try:
            with torch.device("meta"):
                return _with_structure(path, build_from_config(backbone, config), structure)
        except WeightsError:
            raise
        except Exception:  # noqa: BLE001 - retry on the CPU: a constructor may compute on tensors
            pass
    try:
        model = build_from_config(backbone, config)
    except Exception as e:  # noqa: BLE001 - any constructor failure means the stored config is bad
        raise checkpoint_error(path, f"metadata config does not build a {backbone}: {type(e).__name__}: {e}") from e
    return _with_structure(path, model, structure)


def _build_two_stream(path: Path, config: dict[str, Any], *, meta_device: bool) -> TwoStreamBackbone:
    """Rebuild a fused two-stream model: each stream as a one-stream checkpoint would be, then the fusion."""
    try:
        streams = [config["streams"][name] for name in STREAM_NAMES]
        nets = []
        for s in streams:
            if not is_backbone_name(s["backbone"]):
                raise checkpoint_error(path, f"its {s['backbone']!r} stream is not a backbone this vtransfer has")
            net = _build(path, s["backbone"], s["config"], meta_device=meta_device, structure=s.get("structure"))
            net.preprocessing = Preprocessing.from_dict(s["preprocessing"])
            nets.append(net)
        return TwoStreamBackbone(*nets, flow_weight=config["flow_weight"],
                                 temperatures=tuple(s.get("temperature") for s in streams),
                                 fusion_rule=config.get("fusion_rule", "mean"))  # files before --fusion-rule: mean
    except WeightsError:
        raise
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise checkpoint_error(path, f"malformed two-stream metadata: {type(e).__name__}: {e}") from e


def _with_structure(path: Path, model: VideoBackbone, structure: dict[str, Any] | None) -> VideoBackbone:
    """Redo the policy-time surgery (LoRA layers, ST-Adapters, a probe) the metadata records."""
    if not structure:
        return model
    try:
        return restore_structure(model, structure)
    except ImportError as e:
        raise checkpoint_error(path, f"holds {structure.get('kind')!r} layers that need a package not installed ({e}); "
                          "pip install peft, or save the model with its LoRA merged") from e
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise checkpoint_error(path, f"metadata structure {structure.get('kind')!r} does not apply to the stored "
                          f"{model.backbone_name}: {e}") from e


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a vtransfer checkpoint. Never unpickles.

    Validates: the file is safetensors with vtransfer metadata; required
    fields are present; the backbone is known; its config rebuilds the
    architecture; every tensor name and shape matches that architecture; the
    class list matches the head size.

    Raises:
        WeightsError: naming the file and the problem.
    """
    path, meta, state = _read_known(path)
    shape_model = _build(path, meta["backbone"], meta["config"], meta_device=True, structure=meta.get("structure"))
    return checkpoint_against_model(path, meta, state, shape_model)


def _merge_preprocessing(
    path: Path, meta: dict[str, Any], built: Preprocessing, stored: Preprocessing, overridden: bool
) -> Preprocessing:
    """The stored preprocessing, except fields that config overrides changed (3-way merge)."""
    if not overridden or meta["backbone"] == TWO_STREAM:
        return stored
    default = _build(path, meta["backbone"], meta["config"], meta_device=True).preprocessing
    changed = {k: v for k, v in vars(built).items() if getattr(default, k) != v}
    return stored.replace(**changed) if changed else stored


def model_from_checkpoint(
    path: str | Path, num_classes: int | None = None, *, config_overrides: dict[str, Any] | None = None
) -> tuple[VideoBackbone, Checkpoint]:
    """Rebuild the model stored in ``path``, load its weights, put it in eval mode.

    Performs every check of :func:`load_checkpoint`. ``config_overrides``
    change constructor arguments that leave the weights' shapes alone (e.g.
    ``dropout``); one that changes a shape is a :class:`WeightsError`. If
    ``num_classes`` is given and differs from the stored head, the classifier
    is replaced by a fresh one of that size. The returned :class:`Checkpoint`
    describes the file as stored.
    """
    path, meta, state = _read_known(path)
    config = {**meta["config"], **{k: v for k, v in (config_overrides or {}).items() if v is not None}}
    model = _build(path, meta["backbone"], config, meta_device=False, structure=meta.get("structure"))
    ckpt = checkpoint_against_model(path, meta, state, model)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        raise checkpoint_error(path, f"weights do not load into {ckpt.backbone}: {e}") from e
    model.preprocessing = _merge_preprocessing(path, meta, model.preprocessing, ckpt.preprocessing, config != meta["config"])
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model.eval()
    return model, ckpt


def merge_lora_checkpoint(path: str | Path) -> VideoBackbone:
    """Rewrite the LoRA checkpoint ``path`` with the updates merged (it then loads without peft); return the model.

    Metadata written by :func:`~vtransfer.weights.checkpoint.save_checkpoint`
    (classes, source, training, extra, temperature) is kept;
    ``training["lora_merged"]`` records what was folded in.
    """
    model, ckpt = model_from_checkpoint(path)
    structure = structure_of(model)
    merge_lora(model)
    temperature = getattr(ckpt, "temperature", None)  # a calibrated model stays calibrated
    save_checkpoint(path, model, classes=ckpt.classes, source=ckpt.source,
                    training={**ckpt.training, "lora_merged": structure}, extra=ckpt.metadata.get("extra"),
                    **({"temperature": temperature} if temperature is not None else {}))
    return model
