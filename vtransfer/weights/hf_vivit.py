"""Hugging Face transformers' ViViT (``VivitForVideoClassification``) -> vtransfer's ViViT model 1.

``google/vivit-b-16x2-kinetics400`` (the ``vivit:kinetics400-joint`` source)
is Scenic's ViViT-B/16x2 "spatio-temporal attention" model converted to
PyTorch. transformers' ``VivitForVideoClassification``
(``transformers/models/vivit/modeling_vivit.py``) computes, on a clip
``B x T x 3 x H x W``: a Conv3d tubelet embedding flattened time-major, a
[CLS] token in front, ``position_embeddings`` ``1 x (1 + T'N) x D`` added to
every token, ``num_hidden_layers`` pre-norm layers (LayerNorm eps
``layer_norm_eps``, separate query/key/value projections, ``gelu_fast`` MLP),
a final LayerNorm and a linear classifier on the CLS token. That is
vtransfer's ``ViViT(variant="joint")`` in the ``b16x2-joint`` / ``tiny-joint``
layout, the query/key/value weights concatenated into one ``qkv`` layer.

Two key spellings are accepted, each complete on its own:

* files (the hub's ``pytorch_model.bin``, and what ``save_pretrained`` writes
  even in transformers 5): ``vivit.encoder.layer.N.attention.attention.query.weight``,
  ``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``,
  ``...layernorm_before`` / ``layernorm_after``;
* transformers >= 5 in memory (``model.state_dict()``): ``vivit.layers.N.attention.q_proj``,
  ``...o_proj``, ``...mlp.fc1`` / ``fc2``, ``...layernorm_before`` / ``layernorm_after``;

plus ``vivit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}``,
``vivit.layernorm`` and ``classifier``.

A file whose position table is longer in time than the model's (a 32-frame
checkpoint into a model built for 16 frames) keeps its first rows: the ones a
shorter clip uses at run time. Any other difference is an error naming the
keys and shapes.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.weights.inflate import load_converted

PREFIX = "vivit."
_LAYER_RE = re.compile(r"^vivit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
#: transformers layer sub-module (both spellings) -> vtransfer block sub-module; q/k/v are merged into qkv.
_BLOCK_MAP = {
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "proj", "attention.o_proj": "proj",
    "intermediate.dense": "fc1", "mlp.fc1": "fc1",
    "output.dense": "fc2", "mlp.fc2": "fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_TOP_MAP = {
    "vivit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vivit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vivit.embeddings.cls_token": "cls_token",
    "vivit.embeddings.position_embeddings": "pos_embed",
    "vivit.layernorm.weight": "norm.weight",
    "vivit.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
#: What the target model must be: transformers' layout.
REQUIRED_LAYOUT = {"variant": "joint", "patch_embed": "conv", "pos_embed": "joint", "pool": "cls"}
#: transformers ``hidden_act`` -> vtransfer ``gelu``.
_GELU_OF_ACT = {"gelu": "exact", "gelu_fast": "tanh", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def looks_like_hf_vivit(state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` has the keys of transformers' ``VivitForVideoClassification``."""
    keys = {"vivit.embeddings.patch_embeddings.projection.weight", "vivit.embeddings.position_embeddings"}
    return keys <= set(state_dict)


def vivit_config_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """vtransfer ``ViViT`` kwargs for the architecture of a transformers ``VivitConfig`` (``config.json`` as a dict).

    Gives the model-1 layout and every architecture key (image size, frames,
    tubelets, width, depth, heads, MLP, eps, GELU, qkv bias, class count,
    dropouts); preprocessing keys are left to the preset (``config.json`` has none).

    Raises:
        ConfigError: an activation, channel count or head width vtransfer cannot reproduce.
    """
    cfg = dict(hf_config)
    act = cfg.get("hidden_act", "gelu_fast")
    if act not in _GELU_OF_ACT:
        raise ConfigError(f"HF ViViT config: hidden_act {act!r} is not supported; one of {', '.join(_GELU_OF_ACT)}")
    if int(cfg.get("num_channels", 3)) != 3:
        raise ConfigError(f"HF ViViT config: num_channels={cfg['num_channels']}; vtransfer clips are RGB (3)")
    image = cfg.get("image_size", 224)
    h, w = (image, image) if isinstance(image, int) else (int(image[0]), int(image[1]))
    t, ph, pw = (int(v) for v in cfg.get("tubelet_size", (2, 16, 16)))
    dim, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 12))
    labels = cfg.get("id2label")
    hidden_drop = float(cfg.get("hidden_dropout_prob", 0.0))
    return {
        **REQUIRED_LAYOUT,
        "image_size": [h, w],
        "frames": int(cfg.get("num_frames", 32)),
        "image_patch_size": [ph, pw],
        "frame_patch_size": t,
        "dim": dim,
        "depth": int(cfg.get("num_hidden_layers", 12)),
        "heads": heads,
        "dim_head": int(cfg.get("head_dim") or dim // heads),
        "mlp_dim": int(cfg.get("intermediate_size", 3072)),
        "num_classes": len(labels) if labels else int(cfg.get("num_labels", 2)),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "norm_eps": float(cfg.get("layer_norm_eps", 1e-6)),
        "gelu": _GELU_OF_ACT[act],
        "dropout": hidden_drop,
        "attn_dropout": float(cfg.get("attention_probs_dropout_prob", 0.0)),
        "emb_dropout": hidden_drop,  # transformers' embeddings dropout uses hidden_dropout_prob
    }


def hf_vivit_tensors(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """vtransfer parameter name -> tensor for a transformers ViViT state dict, before any shape check.

    Returns ``(tensors, unexpected, incomplete)``: the keys that map to no
    vtransfer parameter, and the query/key/value keys of layers that lack one
    of the three.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        m = _LAYER_RE.match(key)
        sub = _BLOCK_MAP.get(m.group(2)) if m else None
        if sub is None:
            unexpected.append(key)
        elif sub in ("q", "k", "v"):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[sub] = value
        else:
            out[f"blocks.{m.group(1)}.{sub}.{m.group(3)}"] = value
    incomplete = []
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{layer}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            incomplete.append(f"layer {layer} {kind}: has {'/'.join(sorted(parts))} of q/k/v")
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].dim() == 3 and out["pos_embed"].shape[0] == 1:
        out["pos_embed"] = out["pos_embed"][0]
    return out, unexpected, incomplete


def load_hf_vivit(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Load a transformers ``VivitForVideoClassification`` state dict into ``model`` (a vtransfer ViViT model 1).

    ``model`` must be in transformers' layout (:data:`REQUIRED_LAYOUT`, e.g.
    preset ``b16x2-joint``); build it with ``ViViT(**vivit_config_from_hf(config))``
    when the checkpoint's geometry is another. Nothing is copied unless every
    parameter is found with its shape.

    Raises:
        WeightsError: the model is in another layout, or keys are missing,
            unexpected, incomplete (q without k/v) or of the wrong shape (each named).
    """
    cfg = getattr(model, "config", {})
    wrong = {k: cfg.get(k) for k, v in REQUIRED_LAYOUT.items() if cfg.get(k) != v}
    if wrong:
        raise WeightsError(f"HF ViViT import: the target model has {wrong}, but transformers' ViViT needs "
                           f"{REQUIRED_LAYOUT}; use preset b16x2-joint (or ViViT(**vivit_config_from_hf(config)))")
    tensors, unexpected, incomplete = hf_vivit_tensors(state_dict)
    own = dict(model.named_parameters())
    if "pos_embed" in tensors:
        tensors["pos_embed"] = _first_time_steps(tensors["pos_embed"], own["pos_embed"].shape[0], model)
    missing = [name for name in own if name not in tensors]
    unexpected += [name for name in tensors if name not in own]
    mismatched = [f"{name}: file {tuple(v.shape)} vs model {tuple(own[name].shape)}"
                  for name, v in tensors.items() if name in own and v.shape != own[name].shape]
    if incomplete:
        missing += incomplete
    load_converted(model, {k: v for k, v in tensors.items() if k in own}, missing, unexpected, mismatched,
                   "transformers ViViT state dict does not fit this vivit model")


def _first_time_steps(pos: torch.Tensor, rows: int, model: nn.Module) -> torch.Tensor:
    """The CLS row and the first time steps of a longer ``(1 + T'N) x D`` table (unchanged otherwise)."""
    patches = model.grid[0] * model.grid[1]
    longer = pos.dim() == 2 and pos.shape[0] > rows and (pos.shape[0] - 1) % patches == 0 and (rows - 1) % patches == 0
    return pos[:rows] if longer else pos
