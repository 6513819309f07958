"""LoRA through Hugging Face ``peft``: which layers, injection, and folding back into the weights.

LoRA (Hu et al. 2021) adds to a frozen layer ``W`` a trainable low-rank
update ``(alpha / r) B A`` (``B`` starts at zero, so the adapted network is
the pretrained one at step 0). ``peft`` supplies the layers
(``peft.tuners.lora``: ``nn.Linear`` and ``nn.Conv1d/2d/3d``, the conv's
``A`` having the base kernel and ``B`` a 1x1 kernel) and injects them into
any ``nn.Module`` (:func:`peft.inject_adapter_in_model`) and merges them
(``layer.merge()``); vtransfer chooses the layers and keeps the layer groups:
a wrapped layer's parameters (``....base_layer.weight``,
``....lora_A.default.weight``) stay under the same module prefix, so each
family's groups pick them up unchanged. Only Conv3d kernels starting ``1x1``
are merged here, where peft 0.21 cannot (:func:`_merge_pointwise_conv3d`).

Layers peft can adapt *and merge*: ``nn.Linear`` and ungrouped convs.
Depthwise/grouped convs are left out (peft cannot merge them), and so is the
classifier, which trains in full under every policy.

``peft`` is imported only when LoRA is used (it takes seconds to import).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from vtransfer.models.base import VideoBackbone
from vtransfer.models.registry import backbone_module, family_module
from vtransfer.utils.errors import ConfigError

#: Hyper-parameters peft's conv wrappers do not expose but family code reads (effnet3d's SAME-padding conv).
_CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
LORA_PARAM_MARK = ".lora_"


def supported_layers(model: VideoBackbone) -> list[str]:
    """Names of the modules LoRA can adapt and merge (Linear, ungrouped Conv1d/2d/3d), classifier excluded."""
    head_modules = {p.rpartition(".")[0] for p in model.layer_groups()[-1].params}
    out = []
    for name, module in model.named_modules():
        if name in head_modules:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1):
            out.append(name)
    return out


def family_targets(model: VideoBackbone) -> tuple[str, ...] | None:
    """The family module's ``LORA_TARGETS`` (glob patterns over module names), or ``None``: every supported layer."""

    return getattr(backbone_module(model.backbone_name), "LORA_TARGETS", None) or \
        getattr(family_module(model.backbone_name), "LORA_TARGETS", None)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def resolve_targets(model: VideoBackbone, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Full module names LoRA adapts: ``targets`` (layer names, name suffixes or globs) or the family default.

    Raises:
        ConfigError: the backbone has no supported layer, or a target matches none, naming the valid names.
    """
    candidates = supported_layers(model)
    if not candidates:
        raise ConfigError(
            f"policy 'lora': backbone {model.backbone_name!r} has no layer LoRA can adapt (nn.Linear or an ungrouped "
            "nn.Conv1d/2d/3d outside the classifier); use bitfit, adapter, attentive-probe or a freezing policy"
        )
    default = family_targets(model)
    family_default = targets is None and default is not None
    patterns = list(default) if family_default else list(targets or ["*"])
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if _matches(n, pattern)]
        if not hits and not family_default:
            short = sorted({n.rpartition(".")[2] for n in candidates})
            raise ConfigError(
                f"--lora-targets: {pattern!r} matches no layer LoRA can adapt in {model.backbone_name}; "
                f"layer names: {', '.join(short)} (or glob patterns over module names, e.g. {candidates[0]!r})"
            )
        chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise ConfigError(f"policy 'lora': the default targets {patterns} match no layer of {model.backbone_name}; "
                          "give --lora-targets")
    return [n for n in candidates if n in chosen]


def inject_lora(model: VideoBackbone, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> VideoBackbone:
    """Wrap the modules ``targets`` (full names) of ``model`` in peft LoRA layers, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=list(targets),
                        bias="none")
    inject_adapter_in_model(config, model)
    for _name, layer in lora_layers(model):
        base = layer.get_base_layer()
        for attr in _CONV_ATTRIBUTES if isinstance(base, nn.modules.conv._ConvNd) else ():
            setattr(layer, attr, getattr(base, attr))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft tuner layer in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def lora_param_names(model: nn.Module) -> list[str]:
    """Names of the LoRA factors (``....lora_A.default.weight``, ``....lora_B.default.weight``), in model order."""
    return [n for n, _ in model.named_parameters() if LORA_PARAM_MARK in n]


def fold_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its base layer's weight and put the base layer back in its place."""
    for name, layer in lora_layers(model):
        base = layer.get_base_layer()
        if base.weight.dim() == 5 and tuple(base.weight.shape[2:4]) == (1, 1):
            _merge_pointwise_conv3d(layer)
        else:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model


def _merge_pointwise_conv3d(layer: Any) -> None:
    """Fold a Conv3d LoRA update whose kernel starts ``1 x 1`` (I3D's and effnet3d's 1x1x1 convs) into the weight.

    peft <= 0.21.2 sends these through its Conv2d-1x1 shortcut, which fails on
    5-D weights (huggingface/peft#3768, fixed by #3777 after 0.21.2). The
    update is a conv with ``A``'s kernel followed by the pointwise ``B``, so
    its weight is ``B @ A`` over the rank, times the scale.
    """

    base = layer.get_base_layer()
    for adapter in layer.active_adapters:
        a = layer.lora_A[adapter].weight
        b = layer.lora_B[adapter].weight.flatten(1)  # out x r (B is pointwise)
        delta = torch.einsum("or,r...->o...", b.float(), a.float()) * layer.scaling[adapter]
        if not torch.isfinite(delta).all():
            raise ValueError(f"LoRA update of {type(base).__name__} is not finite; nothing merged")
        with torch.no_grad():
            base.weight += delta.to(base.weight.dtype)
