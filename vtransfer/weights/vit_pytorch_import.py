"""Import state dicts of the ``vit-pytorch`` package's ViViT into vtransfer's ViViT.

The reference is the current ``vit_pytorch.vivit.ViViT(variant="factorized_encoder")``:

* ``to_patch_embedding`` = ``Rearrange`` (tubelet flattened ``(pf p1 p2 c)``),
  ``.1`` LayerNorm(patch_dim), ``.2`` Linear, ``.3`` LayerNorm(dim);
* ``pos_embedding`` ``1 x T' x N x D``: one table, added to the patch tokens
  only (not to the CLS tokens), sliced to the clip's ``T'``; the temporal
  transformer has no position table;
* ``spatial_cls_token`` / ``temporal_cls_token`` ``1 x 1 x D`` (absent with ``pool="mean"``);
* ``{spatial,temporal}_transformer.layers.i.0`` = attention (``norm``,
  ``to_qkv`` without bias, ``to_out.0``; ``to_out`` is an identity, with no
  weights, when ``heads == 1`` and ``dim_head == dim``), ``.1.net`` = MLP
  (``0`` LayerNorm, ``1`` Linear, ``4`` Linear), then a final ``.norm``;
* ``mlp_head`` Linear.

Build the target with ``ViViT(**vivit_config_from_vit_pytorch(**kwargs))``
using the kwargs the vit-pytorch model was built with, then call
:func:`load_vit_pytorch_vivit`.

Older vit-pytorch releases (``PreNorm`` wrappers, a LayerNorm inside
``mlp_head`` and no final transformer norm) are a different layout and are
rejected with the list of keys that do not match.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.utils.shapes import as_pair
from vtransfer.weights.keymatch import key_problems

# vit-pytorch's ViViT defaults for the optional constructor arguments.
_VIT_PYTORCH_DEFAULTS = {
    "pool": "cls",
    "channels": 3,
    "dim_head": 64,
    "dropout": 0.0,
    "emb_dropout": 0.0,
    "variant": "factorized_encoder",
}
_REQUIRED = (
    "image_size",
    "image_patch_size",
    "frames",
    "frame_patch_size",
    "num_classes",
    "dim",
    "spatial_depth",
    "temporal_depth",
    "heads",
    "mlp_dim",
)
_IGNORED = ("use_flash_attn",)

_LAYOUT = {"patch_embed": "ln_linear_ln", "pos_embed": "joint", "qkv_bias": False}


def vivit_config_from_vit_pytorch(**vit_pytorch_kwargs: Any) -> dict[str, Any]:
    """vtransfer ViViT kwargs that build exactly ``vit_pytorch.vivit.ViViT(**vit_pytorch_kwargs)``.

    Accepts vit-pytorch's constructor arguments (``image_size``,
    ``image_patch_size``, ``frames``, ``frame_patch_size``, ``num_classes``,
    ``dim``, ``spatial_depth``, ``temporal_depth``, ``heads``, ``mlp_dim``,
    optional ``pool``, ``channels``, ``dim_head``, ``dropout``,
    ``emb_dropout``, ``variant``, ``use_flash_attn``). Only the
    ``factorized_encoder`` variant with 3 channels is supported.

    Raises:
        ConfigError: a required argument is missing, an argument is unknown,
            or the variant / channel count is not supported.
    """
    kw = dict(vit_pytorch_kwargs)
    missing = [k for k in _REQUIRED if k not in kw]
    if missing:
        raise ConfigError(f"vit-pytorch ViViT config: missing argument(s) {', '.join(missing)}")
    unknown = sorted(set(kw) - set(_REQUIRED) - set(_VIT_PYTORCH_DEFAULTS) - set(_IGNORED))
    if unknown:
        raise ConfigError(f"vit-pytorch ViViT config: unknown argument(s) {', '.join(unknown)}")
    kw = {**_VIT_PYTORCH_DEFAULTS, **kw}
    if kw["variant"] != "factorized_encoder":
        raise ConfigError(
            f"vit-pytorch ViViT config: variant {kw['variant']!r} is not supported; only 'factorized_encoder'"
        )
    if int(kw["channels"]) != 3:
        raise ConfigError(f"vit-pytorch ViViT config: channels={kw['channels']}; vtransfer clips are RGB (3)")
    if kw["pool"] not in ("cls", "mean"):
        raise ConfigError(f"vit-pytorch ViViT config: pool must be 'cls' or 'mean', got {kw['pool']!r}")
    return {
        **_LAYOUT,
        "norm_eps": 1e-5,  # nn.LayerNorm's default, used throughout vit-pytorch
        "image_size": list(as_pair(_pair_arg(kw["image_size"]))),
        "image_patch_size": list(as_pair(_pair_arg(kw["image_patch_size"]))),
        "frames": int(kw["frames"]),
        "frame_patch_size": int(kw["frame_patch_size"]),
        "num_classes": int(kw["num_classes"]),
        "dim": int(kw["dim"]),
        "spatial_depth": int(kw["spatial_depth"]),
        "temporal_depth": int(kw["temporal_depth"]),
        "heads": int(kw["heads"]),
        "dim_head": int(kw["dim_head"]),
        "mlp_dim": int(kw["mlp_dim"]),
        "pool": kw["pool"],
        "dropout": float(kw["dropout"]),
        "attn_dropout": float(kw["dropout"]),  # vit-pytorch uses one rate for both
        "emb_dropout": float(kw["emb_dropout"]),
    }


def _pair_arg(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else int(v)


def looks_like_vit_pytorch_vivit(state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` has the key layout of vit-pytorch's factorised-encoder ViViT."""
    keys = set(_strip_module_prefix(state_dict))
    return {"to_patch_embedding.2.weight", "pos_embedding", "mlp_head.weight"} <= keys and any(
        k.startswith("temporal_transformer.layers.") for k in keys
    )


def vit_pytorch_key_map(model: torch.nn.Module) -> dict[str, str]:
    """vit-pytorch key -> vtransfer parameter name, for a ViViT built in vit-pytorch's layout."""
    cfg = model.config
    out: dict[str, str] = {
        "to_patch_embedding.1.weight": "patch_embed.norm_in.weight",
        "to_patch_embedding.1.bias": "patch_embed.norm_in.bias",
        "to_patch_embedding.2.weight": "patch_embed.proj.weight",
        "to_patch_embedding.2.bias": "patch_embed.proj.bias",
        "to_patch_embedding.3.weight": "patch_embed.norm_out.weight",
        "to_patch_embedding.3.bias": "patch_embed.norm_out.bias",
        "pos_embedding": "pos_embed",
        "mlp_head.weight": "head.weight",
        "mlp_head.bias": "head.bias",
    }
    if cfg["pool"] == "cls":
        out["spatial_cls_token"] = "spatial_cls"
        out["temporal_cls_token"] = "temporal_cls"
    has_out_proj = _has_out_proj(cfg)
    for src, dst, depth in (
        ("spatial_transformer", "spatial", cfg["spatial_depth"]),
        ("temporal_transformer", "temporal", cfg["temporal_depth"]),
    ):
        for i in range(depth):
            a, f, b = f"{src}.layers.{i}.0", f"{src}.layers.{i}.1.net", f"{dst}_blocks.{i}"
            pairs = [
                (f"{a}.norm", f"{b}.norm1"),
                (f"{f}.0", f"{b}.norm2"),
                (f"{f}.1", f"{b}.fc1"),
                (f"{f}.4", f"{b}.fc2"),
            ]
            if has_out_proj:
                pairs.append((f"{a}.to_out.0", f"{b}.proj"))
            for s, d in pairs:
                out[f"{s}.weight"] = f"{d}.weight"
                out[f"{s}.bias"] = f"{d}.bias"
            out[f"{a}.to_qkv.weight"] = f"{b}.qkv.weight"
        out[f"{src}.norm.weight"] = f"{dst}_norm.weight"
        out[f"{src}.norm.bias"] = f"{dst}_norm.bias"
    return out


def _has_out_proj(cfg: Mapping[str, Any]) -> bool:
    # vit-pytorch drops the output projection when one head already has width dim.
    return not (cfg["heads"] == 1 and cfg["dim_head"] == cfg["dim"])


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_vit_pytorch_vivit(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Copy a vit-pytorch ViViT ``state_dict`` into ``model`` (a vtransfer ViViT) in place.

    ``model`` must be built in vit-pytorch's layout (see
    :func:`vivit_config_from_vit_pytorch`). A ``module.`` prefix (from
    ``DataParallel``) is removed first. Nothing is copied unless every key
    maps and every shape matches.

    Raises:
        WeightsError: the model is not in vit-pytorch's layout, or keys are
            missing / unexpected / of the wrong shape (each named with both shapes).
    """
    cfg = getattr(model, "config", {})
    wrong = {k: cfg.get(k) for k, v in _LAYOUT.items() if cfg.get(k) != v}
    if wrong:
        raise WeightsError(
            f"vit-pytorch ViViT import: the target model has layout {wrong}, expected {_LAYOUT}; "
            "build it with ViViT(**vivit_config_from_vit_pytorch(...))"
        )
    sd = _strip_module_prefix(state_dict)
    key_map = vit_pytorch_key_map(model)
    params = dict(model.named_parameters())
    missing = [k for k in key_map if k not in sd]
    unexpected = [k for k in sd if k not in key_map]
    mismatched = []
    for src, dst in key_map.items():
        if src not in sd:
            continue
        want = _source_shape(src, params[dst])
        got = tuple(sd[src].shape)
        if got != want:
            mismatched.append(f"{src}: file {got} vs model {want}")
    problems = key_problems(missing, unexpected, mismatched)
    if problems:
        raise WeightsError("vit-pytorch ViViT import: state dict does not match the model; " + "; ".join(problems))
    with torch.no_grad():
        for src, dst in key_map.items():
            params[dst].copy_(sd[src].reshape(params[dst].shape))
        if not _has_out_proj(cfg):
            for block in list(model.spatial_blocks) + list(model.temporal_blocks):
                block.proj.weight.copy_(torch.eye(cfg["dim"]))
                block.proj.bias.zero_()


def _source_shape(src: str, param: torch.Tensor) -> tuple[int, ...]:
    # vit-pytorch keeps leading singleton batch dims on its position table.
    if src == "pos_embedding":
        return (1, *param.shape)
    return tuple(param.shape)


