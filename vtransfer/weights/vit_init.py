"""Initialise ViViT's spatial transformer from torchvision's ImageNet ViT (``vivit:imagenet``).

Following the ViViT paper (Arnab et al. 2021, section 3.4):

* **Central-frame tubelet initialisation.** The Conv3d tubelet kernel
  ``D x 3 x t x p x p`` is zero except its temporal slice ``t // 2``, which is
  the 2D ``conv_proj`` kernel. Each tubelet token is therefore exactly the
  ViT patch token of the tubelet's centre frame (frame ``t // 2`` of the
  tubelet; the later of the two middle frames when ``t`` is even), so at
  initialisation the spatial CLS at time ``i`` equals the image model's CLS
  on frame ``i * t + t // 2``.
* The spatial CLS token, position table (CLS row included), every encoder
  block and the final ``encoder.ln`` are copied one to one
  (``nn.MultiheadAttention``'s ``in_proj`` is already the ``[q | k | v]``
  layout of vtransfer's ``qkv``).
* **Position interpolation.** When the model's patch grid differs from the
  checkpoint's (another image size), the patch rows of the position table are
  resized as a ``D``-channel image with bicubic interpolation,
  ``align_corners=True`` - what torchvision's own
  ``vision_transformer.interpolate_embeddings`` does - while the CLS row is
  kept as is. Non-square targets (e.g. 240x320) are supported.
* The temporal transformer, its CLS/positions and the head keep the model's
  fresh initialisation; the ImageNet classifier (``heads.*``) is ignored.

The target must be in torchvision's layout: ``patch_embed="conv"``,
``qkv_bias=True``, ``pos_embed="factorised"``, ``pool="cls"``,
``heads * dim_head == dim``, same width, MLP width, patch size and number of
spatial blocks as the checkpoint. Use ``norm_eps=1e-6`` (the ``vivit-b``
preset does) for outputs identical to torchvision's.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F

from vtransfer.utils.errors import WeightsError

_LAYER_RE = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
# torchvision block sub-key -> vtransfer block sub-key
_BLOCK_MAP = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "qkv.weight",
    "self_attention.in_proj_bias": "qkv.bias",
    "self_attention.out_proj.weight": "proj.weight",
    "self_attention.out_proj.bias": "proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "fc1.weight",
    "mlp.0.bias": "fc1.bias",
    "mlp.3.weight": "fc2.weight",
    "mlp.3.bias": "fc2.bias",
    # torchvision < 0.14 named the MLP layers linear_1 / linear_2
    "mlp.linear_1.weight": "fc1.weight",
    "mlp.linear_1.bias": "fc1.bias",
    "mlp.linear_2.weight": "fc2.weight",
    "mlp.linear_2.bias": "fc2.bias",
}
_REQUIRED_LAYOUT = {"patch_embed": "conv", "qkv_bias": True, "pos_embed": "factorised", "pool": "cls"}


def init_vivit_from_torchvision_vit(vit_state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Load a torchvision ``VisionTransformer`` state dict into ``model``'s spatial part, in place.

    Args:
        vit_state_dict: e.g. ``torchvision.models.vit_b_16(weights=...).state_dict()``
            (keys ``conv_proj.*``, ``class_token``, ``encoder.pos_embedding``,
            ``encoder.layers.encoder_layer_N.*``, ``encoder.ln.*``, ``heads.*``).
        model: a vtransfer ViViT in torchvision's layout (see the module docstring).

    Raises:
        WeightsError: wrong model layout, unknown or missing keys, or shapes
            that do not fit (each named); nothing is copied in that case.
    """
    cfg = getattr(model, "config", {})
    wrong = {k: cfg.get(k) for k, v in _REQUIRED_LAYOUT.items() if cfg.get(k) != v}
    if wrong or cfg.get("heads", 0) * cfg.get("dim_head", 0) != cfg.get("dim"):
        raise WeightsError(
            f"torchvision ViT init: the ViViT must have layout {_REQUIRED_LAYOUT} and heads*dim_head == dim; "
            f"got {wrong or {k: cfg.get(k) for k in ('heads', 'dim_head', 'dim')}}"
        )
    params = dict(model.named_parameters())
    new: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    unexpected: list[str] = []
    layers_seen: set[int] = set()

    for key, value in vit_state_dict.items():
        if key.startswith("heads."):
            continue
        m = _LAYER_RE.match(key)
        if m:
            idx, sub = int(m.group(1)), m.group(2)
            if sub not in _BLOCK_MAP:
                unexpected.append(key)
                continue
            layers_seen.add(idx)
            if idx >= cfg["spatial_depth"]:
                continue  # reported below as a depth mismatch
            new[f"spatial_blocks.{idx}.{_BLOCK_MAP[sub]}"] = value
        elif key == "conv_proj.weight":
            new["patch_embed.proj.weight"] = _central_frame_kernel(value, model.tubelet, problems)
        elif key == "conv_proj.bias":
            new["patch_embed.proj.bias"] = value
        elif key == "class_token":
            new["spatial_cls"] = value
        elif key == "encoder.pos_embedding":
            new["spatial_pos"] = _resize_pos_embedding(value, model.grid, problems)
        elif key == "encoder.ln.weight":
            new["spatial_norm.weight"] = value
        elif key == "encoder.ln.bias":
            new["spatial_norm.bias"] = value
        else:
            unexpected.append(key)

    depth = max(layers_seen) + 1 if layers_seen else 0
    if depth != cfg["spatial_depth"]:
        problems.append(f"checkpoint has {depth} encoder layers, model has spatial_depth {cfg['spatial_depth']}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}")
    expected = [n for n in params if n.startswith(("patch_embed.", "spatial_"))]
    missing = [n for n in expected if n not in new]
    if missing:
        problems.append(f"no checkpoint tensor for: {', '.join(missing[:8])}")
    for name, value in new.items():
        if value is not None and tuple(value.shape) != tuple(params[name].shape):
            problems.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(params[name].shape)}")
    if problems:
        raise WeightsError("torchvision ViT init: " + "; ".join(problems))
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value.reshape(params[name].shape))


def _central_frame_kernel(w2d: torch.Tensor, tubelet: tuple[int, int, int], problems: list[str]) -> torch.Tensor | None:
    """``D x 3 x p x p`` -> ``D x 3 x t x p x p``, zero except the centre frame ``t // 2``."""
    t, ph, pw = tubelet
    if w2d.dim() != 4 or tuple(w2d.shape[2:]) != (ph, pw):
        problems.append(f"conv_proj.weight: checkpoint {tuple(w2d.shape)} vs model patch {ph}x{pw}")
        return None
    w3d = w2d.new_zeros(w2d.shape[0], w2d.shape[1], t, ph, pw)
    w3d[:, :, t // 2] = w2d
    return w3d


def _resize_pos_embedding(pos: torch.Tensor, grid: tuple[int, int], problems: list[str]) -> torch.Tensor | None:
    """``1 x (1+n*n) x D`` -> ``(1+gh*gw) x D``; bicubic (align_corners=True) when the grid differs."""
    if pos.dim() != 3 or pos.shape[0] != 1:
        problems.append(f"encoder.pos_embedding: expected 1 x (1+N) x D, got {tuple(pos.shape)}")
        return None
    cls, patches = pos[0, :1], pos[0, 1:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        problems.append(f"encoder.pos_embedding: {patches.shape[0]} patch positions is not a square grid")
        return None
    gh, gw = grid
    if (side, side) != (gh, gw):
        img = patches.T.reshape(1, -1, side, side)
        img = F.interpolate(img.float(), size=(gh, gw), mode="bicubic", align_corners=True).to(patches.dtype)
        patches = img.reshape(-1, gh * gw).T
    return torch.cat([cls, patches], dim=0)
