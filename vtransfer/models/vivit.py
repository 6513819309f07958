"""Factorised-encoder ViViT (Arnab et al. 2021, "model 2").

A clip ``B x 3 x T x H x W`` is cut into non-overlapping tubelets of
``frame_patch_size x ph x pw`` voxels and each tubelet is embedded as one
token. For every time index ``t' = 0 .. T/frame_patch_size - 1`` a *spatial*
transformer attends over that time index's tokens plus a spatial CLS token;
the per-time CLS outputs (``B x T' x D``) then go through a *temporal*
transformer with its own CLS token, whose output feeds the linear head.

The module is configurable enough to be exactly either reference layout:

* ``vit-pytorch``'s ``ViViT(variant='factorized_encoder')`` (as in the seed
  paper): ``patch_embed="ln_linear_ln"`` (tubelets flattened in
  ``(frame, row, col, channel)`` order, then LayerNorm-Linear-LayerNorm),
  ``pos_embed="joint"`` (one ``T' x N x D`` table added to the patch tokens
  only; CLS tokens get no position and the temporal transformer gets none),
  ``qkv_bias=False``, LayerNorm eps 1e-5. See
  :mod:`vtransfer.weights.vit_pytorch_import`.
* torchvision's ViT-B/16 as the spatial encoder: ``patch_embed="conv"``
  (a Conv3d over tubelets; with one frame it is torchvision's ``conv_proj``),
  ``pos_embed="factorised"`` (a ``(1+N) x D`` spatial table that includes the
  CLS slot and is shared by every time index, plus a ``(1+T') x D`` temporal
  table), ``qkv_bias=True``, eps 1e-6. See :mod:`vtransfer.weights.vit_init`.

Both use pre-norm blocks (LayerNorm, attention via
``torch.nn.functional.scaled_dot_product_attention``, residual; LayerNorm,
GELU MLP, residual) and a final LayerNorm after each transformer.

Layer groups, input to output: ``embed`` (tubelet embedding, spatial
position table(s), spatial CLS; ``spatial``), ``spatial.0`` ..
``spatial.{L-1}`` (``spatial``; the last one also applies the spatial final
norm and pools, so its output is the per-time CLS tokens ``B x T' x D``),
``temporal.0`` .. ``temporal.{M-1}`` (``temporal``; the first one prepends
the temporal CLS and adds the temporal positions, the last one applies the
final norm and pools to ``B x D``) and ``head``. The tubelet projection does
combine the ``frame_patch_size`` frames of one tubelet, but like the ViViT
paper and the seed paper's "temporal transformer + FC" policy we count the
embedding as spatial: nothing in it relates one tubelet to another in time.

Parameter counts (``vtransfer inspect`` shows them per group):
``vivit-seed`` with 99 classes has 125,691,747 parameters, exactly the
current ``vit-pytorch`` model with the same arguments; ``vivit-b`` with 400
classes has 115,062,928 (torchvision ViT-B/16 minus its head, plus a
second tubelet frame, 4 temporal layers, temporal CLS/positions and head).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.errors import ConfigError
from vtransfer.models.base import LayerGroup, Preprocessing, State, VideoBackbone, as_pair, module_param_names

PATCH_EMBEDS = ("conv", "ln_linear_ln")
POS_EMBEDS = ("factorised", "joint")
POOLS = ("cls", "mean")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Layout shared by the presets that follow torchvision's ViT-B/16.
_TORCHVISION_LAYOUT: dict[str, Any] = {
    "patch_embed": "conv",
    "pos_embed": "factorised",
    "qkv_bias": True,
    "norm_eps": 1e-6,
    "pool": "cls",
}
# Layout of vit-pytorch's ViViT (factorized_encoder variant).
_VIT_PYTORCH_LAYOUT: dict[str, Any] = {
    "patch_embed": "ln_linear_ln",
    "pos_embed": "joint",
    "qkv_bias": False,
    "norm_eps": 1e-5,
    "pool": "cls",
}

PRESETS: dict[str, dict[str, Any]] = {
    # ViViT-B factorised encoder as in the ViViT paper (Kinetics-400: 32 frames at
    # stride 2, tubelets 2x16x16, 4 temporal layers), laid out like torchvision's
    # ViT-B/16 so `vivit:imagenet` can initialise its spatial transformer.
    # Preprocessing = torchvision's ViT_B_16_Weights.IMAGENET1K_V1 transform
    # (resize 256, crop 224, ImageNet mean/std).
    "vivit-b": {
        **_TORCHVISION_LAYOUT,
        "image_size": [224, 224],
        "image_patch_size": [16, 16],
        "frames": 32,
        "frame_patch_size": 2,
        "dim": 768,
        "spatial_depth": 12,
        "temporal_depth": 4,
        "heads": 12,
        "dim_head": 64,
        "mlp_dim": 3072,
        "num_classes": 400,
        "frame_stride": 2,
        "resize_short": 256,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
    # The seed paper's model: vit-pytorch ViViT with image patch 40, frame patch 10,
    # dim 1024, depths 6/6, 8 heads (dim_head left at vit-pytorch's default 64),
    # MLP 2048, 240x320 input, 150 consecutive frames, UCF-101's 99 classes kept
    # after dropping videos shorter than 150 frames. The paper states no pixel
    # normalisation; we declare ImageNet mean/std.
    "vivit-seed": {
        **_VIT_PYTORCH_LAYOUT,
        "image_size": [240, 320],
        "image_patch_size": [40, 40],
        "frames": 150,
        "frame_patch_size": 10,
        "dim": 1024,
        "spatial_depth": 6,
        "temporal_depth": 6,
        "heads": 8,
        "dim_head": 64,
        "mlp_dim": 2048,
        "num_classes": 99,
        "frame_stride": 1,
        "resize_short": 240,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
    # Same topology as vivit-b at toy widths, for tests and CPU smoke runs.
    "tiny": {
        **_TORCHVISION_LAYOUT,
        "image_size": [64, 64],
        "image_patch_size": [16, 16],
        "frames": 8,
        "frame_patch_size": 2,
        "dim": 64,
        "spatial_depth": 2,
        "temporal_depth": 2,
        "heads": 4,
        "dim_head": 16,
        "mlp_dim": 128,
        "num_classes": 10,
        "frame_stride": 2,
        "resize_short": 64,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
}
DEFAULT_PRESET = "vivit-b"

#: AdamW, as transformers are fine-tuned (the seed paper's ViViT included).
TRAINING_DEFAULTS = {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05}

#: Constructor keyword of each clip-geometry option (``--frames``, ``--stride``, ``--size``).
GEOMETRY_KEYS = {"size": "image_size", "frames": "frames", "stride": "frame_stride"}


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    ``qkv`` is one linear layer whose output is ``[q | k | v]``, each laid out
    ``(head, dim_head)`` - the layout of both ``nn.MultiheadAttention.in_proj``
    and vit-pytorch's ``to_qkv``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        qkv_bias: bool,
        norm_eps: float,
        dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.attn_dropout = attn_dropout
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of ``x`` (``N x S x D``), before the output projection."""
        n, s, _ = x.shape
        qkv = self.qkv(x).view(n, s, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(n, s, self.heads * self.dim_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x S x D`` -> ``N x S x D``."""
        x = x + self.drop(self.proj(self.attention(self.norm1(x))))
        y = self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x)))))
        return x + self.drop(y)


class ConvTubeletEmbed(nn.Module):
    """Tubelets -> tokens with a strided Conv3d (torchvision ``conv_proj`` extended in time)."""

    def __init__(self, dim: int, tubelet: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x T x H x W`` -> ``B x T' x N x D`` (tokens in row-major grid order)."""
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)


class LinearTubeletEmbed(nn.Module):
    """Tubelets flattened in ``(frame, row, col, channel)`` order, then LayerNorm-Linear-LayerNorm.

    This is vit-pytorch's ViViT patch embedding (its ``Rearrange`` pattern
    ``b c (f pf) (h p1) (w p2) -> b f (h w) (pf p1 p2 c)``).
    """

    def __init__(self, dim: int, tubelet: tuple[int, int, int], norm_eps: float) -> None:
        super().__init__()
        self.tubelet = tubelet
        patch_dim = 3 * tubelet[0] * tubelet[1] * tubelet[2]
        self.norm_in = nn.LayerNorm(patch_dim, eps=norm_eps)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x T x H x W`` -> ``B x T' x N x D``."""
        b, c, t, h, w = x.shape
        pt, ph, pw = self.tubelet
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, t // pt, (h // ph) * (w // pw), pt * ph * pw * c)
        return self.norm_out(self.proj(self.norm_in(x)))


class ViViT(VideoBackbone):
    """Factorised-encoder ViViT; see the module docstring for layouts and groups.

    Args:
        image_size: input ``(height, width)`` (or one int for square frames).
        frames: clip length ``T`` the model is built for; shorter clips (a
            multiple of ``frame_patch_size``) use the first rows of the
            temporal position table.
        image_patch_size: spatial tubelet size ``(ph, pw)`` (or one int).
        frame_patch_size: temporal tubelet size ``t``.
        dim: token width ``D``.
        spatial_depth, temporal_depth: number of blocks in each transformer (>= 1).
        heads: attention heads; ``dim_head`` is each head's width (default ``dim // heads``).
        mlp_dim: hidden width of the MLPs.
        num_classes: classifier outputs.
        pool: ``"cls"`` (CLS tokens) or ``"mean"`` (no CLS tokens, average the tokens).
        patch_embed: ``"conv"`` or ``"ln_linear_ln"``.
        pos_embed: ``"factorised"`` (spatial ``(1+N) x D`` shared over time plus
            temporal ``(1+T') x D``; without the CLS row when ``pool="mean"``) or
            ``"joint"`` (one ``T' x N x D`` table on the patch tokens only).
        qkv_bias: bias on the query/key/value projection.
        norm_eps: epsilon of every LayerNorm.
        dropout: dropout after attention output, inside and after the MLP.
        attn_dropout: dropout on attention weights.
        emb_dropout: dropout on the embedded tokens (and on the temporal
            tokens after their positions are added, when there is a temporal table).
        frame_stride, resize_short, mean, std: the declared preprocessing (the
            crop is ``image_size`` and the clip length ``frames``).
    """

    backbone_name = "vivit"

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        frames: int = 32,
        image_patch_size: int | Sequence[int] = 16,
        frame_patch_size: int = 2,
        dim: int = 768,
        spatial_depth: int = 12,
        temporal_depth: int = 4,
        heads: int = 12,
        dim_head: int | None = None,
        mlp_dim: int = 3072,
        num_classes: int = 400,
        pool: str = "cls",
        patch_embed: str = "conv",
        pos_embed: str = "factorised",
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        emb_dropout: float = 0.0,
        frame_stride: int = 2,
        resize_short: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        h, w = as_pair(image_size)
        ph, pw = as_pair(image_patch_size)
        dim_head = dim // heads if dim_head is None else int(dim_head)
        _check_choice("patch_embed", patch_embed, PATCH_EMBEDS)
        _check_choice("pos_embed", pos_embed, POS_EMBEDS)
        _check_choice("pool", pool, POOLS)
        if h % ph or w % pw:
            raise ConfigError(f"vivit: image_size {h}x{w} is not divisible by image_patch_size {ph}x{pw}")
        if frames % frame_patch_size:
            raise ConfigError(f"vivit: frames {frames} is not divisible by frame_patch_size {frame_patch_size}")
        if spatial_depth < 1 or temporal_depth < 1:
            raise ConfigError(f"vivit: spatial_depth and temporal_depth must be >= 1, got {spatial_depth}/{temporal_depth}")
        self.config = {
            "image_size": [h, w],
            "frames": int(frames),
            "image_patch_size": [ph, pw],
            "frame_patch_size": int(frame_patch_size),
            "dim": int(dim),
            "spatial_depth": int(spatial_depth),
            "temporal_depth": int(temporal_depth),
            "heads": int(heads),
            "dim_head": dim_head,
            "mlp_dim": int(mlp_dim),
            "num_classes": int(num_classes),
            "pool": pool,
            "patch_embed": patch_embed,
            "pos_embed": pos_embed,
            "qkv_bias": bool(qkv_bias),
            "norm_eps": float(norm_eps),
            "dropout": float(dropout),
            "attn_dropout": float(attn_dropout),
            "emb_dropout": float(emb_dropout),
            "frame_stride": int(frame_stride),
            "resize_short": int(resize_short if resize_short is not None else min(h, w)),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        }
        self.preprocessing = Preprocessing(
            frames=int(frames),
            stride=int(frame_stride),
            crop_size=(h, w),
            resize_short=self.config["resize_short"],
            mean=tuple(self.config["mean"]),
            std=tuple(self.config["std"]),
        )
        self.grid = (h // ph, w // pw)
        self.time_tokens = frames // frame_patch_size
        self.tubelet = (int(frame_patch_size), ph, pw)
        num_patches = self.grid[0] * self.grid[1]
        use_cls = pool == "cls"

        if patch_embed == "conv":
            self.patch_embed: nn.Module = ConvTubeletEmbed(dim, self.tubelet)
        else:
            self.patch_embed = LinearTubeletEmbed(dim, self.tubelet, norm_eps)
        if pos_embed == "joint":
            self.pos_embed = nn.Parameter(torch.zeros(self.time_tokens, num_patches, dim))
        else:
            self.spatial_pos = nn.Parameter(torch.zeros(num_patches + use_cls, dim))
            self.temporal_pos = nn.Parameter(torch.zeros(self.time_tokens + use_cls, dim))
        self.spatial_cls = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
        self.temporal_cls = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
        self.emb_drop = nn.Dropout(emb_dropout)
        self.temporal_emb_drop = nn.Dropout(emb_dropout)  # its own module: it belongs to group temporal.0

        def blocks(depth: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, heads, dim_head, mlp_dim, qkv_bias, norm_eps, dropout, attn_dropout)
                for _ in range(depth)
            )

        self.spatial_blocks = blocks(spatial_depth)
        self.spatial_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_blocks = blocks(temporal_depth)
        self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    # -- initialisation -----------------------------------------------------------
    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(("_pos", "pos_embed", "_cls")):
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Patch projection: torchvision's conv_proj rule (truncated normal, std 1/sqrt(fan_in)).
        proj = self.patch_embed.proj
        fan_in = proj.weight[0].numel()
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(proj.bias)
        self._init_head(self.head)

    @staticmethod
    def _init_head(head: nn.Linear) -> None:
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)

    # -- VideoBackbone contract ---------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes of the current classifier."""
        return self.head.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh ``Linear(dim, num_classes)`` (same device and dtype)."""
        old = self.head
        self.head = nn.Linear(old.in_features, int(num_classes), device=old.weight.device, dtype=old.weight.dtype)
        self._init_head(self.head)
        self.config["num_classes"] = int(num_classes)

    def layer_groups(self) -> list[LayerGroup]:
        """``embed``, ``spatial.i``, ``temporal.i``, ``head`` (see the module docstring)."""
        embed = module_param_names("patch_embed", self.patch_embed)
        for name in ("pos_embed", "spatial_pos", "spatial_cls"):
            if getattr(self, name, None) is not None:
                embed.append(name)
        groups = [LayerGroup("embed", "spatial", embed, modules=["emb_drop"])]
        n_sp = len(self.spatial_blocks)
        for i, block in enumerate(self.spatial_blocks):
            params = module_param_names(f"spatial_blocks.{i}", block)
            if i == n_sp - 1:
                params += module_param_names("spatial_norm", self.spatial_norm)
            groups.append(LayerGroup(f"spatial.{i}", "spatial", params))
        n_tm = len(self.temporal_blocks)
        for i, block in enumerate(self.temporal_blocks):
            params = []
            if i == 0:
                params += [n for n in ("temporal_cls", "temporal_pos") if getattr(self, n, None) is not None]
            params += module_param_names(f"temporal_blocks.{i}", block)
            if i == n_tm - 1:
                params += module_param_names("temporal_norm", self.temporal_norm)
            groups.append(LayerGroup(f"temporal.{i}", "temporal", params, temporal_params=list(params),
                                     modules=["temporal_emb_drop"] if i == 0 else []))
        groups.append(LayerGroup("head", "head", module_param_names("head", self.head)))
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x classes`` for a normalised clip ``B x 3 x T x H x W``."""
        return self.forward_groups(x, 0, self._num_groups())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``B x D`` pooled temporal embedding (the head's input)."""
        return self.forward_groups(x, 0, self._num_groups() - 1)

    def run_group(self, index: int, state: State) -> State:
        """Apply group ``index``.

        States: clip ``B x 3 x T x H x W`` -> (embed) tokens ``B x T' x S x D``
        -> (spatial.*) same, and per-time CLS ``B x T' x D`` after the last
        spatial group -> (temporal.*) ``B x (1+T') x D`` (``B x T' x D`` with
        mean pooling), ``B x D`` after the last -> (head) logits.
        """
        n_sp, n_tm = len(self.spatial_blocks), len(self.temporal_blocks)
        if index == 0:
            return self._embed(state)
        if 1 <= index <= n_sp:
            return self._spatial(index - 1, state)
        if n_sp < index <= n_sp + n_tm:
            return self._temporal(index - 1 - n_sp, state)
        if index == n_sp + n_tm + 1:
            return self.head(state)
        raise IndexError(f"vivit has {n_sp + n_tm + 2} groups; no group {index}")

    # -- the stages ---------------------------------------------------------------
    def _num_groups(self) -> int:
        return len(self.spatial_blocks) + len(self.temporal_blocks) + 2

    def _check_clip(self, x: torch.Tensor) -> None:
        h, w = self.config["image_size"]
        pt = self.tubelet[0]
        ok = x.dim() == 5 and x.shape[1] == 3 and tuple(x.shape[3:]) == (h, w)
        t = x.shape[2] if x.dim() == 5 else 0
        if not ok or t % pt or not 0 < t // pt <= self.time_tokens:
            raise ConfigError(
                f"vivit expects a clip B x 3 x T x {h} x {w} with T a multiple of {pt} and at most "
                f"{self.config['frames']}; got {tuple(x.shape)}"
            )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_clip(x)
        tok = self.patch_embed(x)  # B x T' x N x D
        b, t = tok.shape[:2]
        if self.config["pos_embed"] == "joint":
            tok = tok + self.pos_embed[:t]
            if self.spatial_cls is not None:
                tok = torch.cat([self.spatial_cls.expand(b, t, 1, -1), tok], dim=2)
        else:
            if self.spatial_cls is not None:
                tok = torch.cat([self.spatial_cls.expand(b, t, 1, -1), tok], dim=2)
            tok = tok + self.spatial_pos
        return self.emb_drop(tok)

    def _spatial(self, i: int, tok: torch.Tensor) -> torch.Tensor:
        b, t, s, d = tok.shape
        y = self.spatial_blocks[i](tok.reshape(b * t, s, d)).reshape(b, t, s, d)
        if i < len(self.spatial_blocks) - 1:
            return y
        y = self.spatial_norm(y)
        return y[:, :, 0] if self.spatial_cls is not None else y.mean(dim=2)

    def _temporal(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            b = x.shape[0]
            if self.temporal_cls is not None:
                x = torch.cat([self.temporal_cls.expand(b, 1, -1), x], dim=1)
            if self.config["pos_embed"] == "factorised":
                x = self.temporal_emb_drop(x + self.temporal_pos[: x.shape[1]])
        x = self.temporal_blocks[i](x)
        if i < len(self.temporal_blocks) - 1:
            return x
        x = self.temporal_norm(x)
        return x[:, 0] if self.temporal_cls is not None else x.mean(dim=1)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"vivit: {option} must be one of {', '.join(choices)}; got {value!r}")


MODEL_CLASS = ViViT
