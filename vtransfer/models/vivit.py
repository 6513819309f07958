"""ViViT (Arnab et al. 2021): the factorised encoder ("model 2", the default) and joint attention ("model 1").

**Model 2, ``variant="factorised"``** (every preset without ``-joint``). A
clip ``B x 3 x T x H x W`` is cut into non-overlapping tubelets of
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

**Model 1, ``variant="joint"``** (presets ``b16x2-joint``, ``tiny-joint``): the
"spatio-temporal attention" model, laid out exactly like transformers'
``VivitForVideoClassification`` (the Hugging Face port of Scenic's
ViViT-B/16x2, ``vivit:kinetics400-joint``, see :mod:`vtransfer.weights.hf_vivit`):
Conv3d tubelet embedding, the tokens flattened time-major (``t' * N + row * W' + col``),
a [CLS] token in front, one learned ``(1 + T' * N) x D`` position table added
to all of them (CLS row first), ``depth`` pre-norm blocks attending over all
``1 + T' * N`` tokens at once, a final LayerNorm, the CLS token into the head.
Scenic (and so the port) uses the tanh approximation of GELU (Flax's
``nn.gelu`` default; transformers' ``gelu_fast``): ``gelu="tanh"``; LayerNorm eps 1e-6.
Layer groups: ``embed`` (tubelet projection, CLS, position table; ``spatial``:
it relates no tubelet to another), ``block.0`` .. ``block.{depth-1}`` (the
last one also applies the final norm and pools to ``B x D``) and ``head``.
Each block attends across frames, so the blocks are tagged ``temporal``, but
the same weights mix space and time: no parameter acts on time alone, the
blocks have no ``temporal_params`` and the ``temporal`` policy is refused
with :attr:`ViViT.no_temporal_reason`.

Parameter counts (``vtransfer inspect`` shows them per group):
``vivit-seed`` with 99 classes has 125,691,747 parameters, exactly the
current ``vit-pytorch`` model with the same arguments; ``vivit-b`` with 400
classes has 115,062,928 (torchvision ViT-B/16 minus its head, plus a
second tubelet frame, 4 temporal layers, temporal CLS/positions and head);
``b16x2-joint`` has 88,954,000, exactly transformers' ``VivitForVideoClassification``
with ``VivitConfig()``'s defaults and 400 labels (the hub checkpoint's geometry).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.models.base import LayerGroup, Preprocessing, State, VideoBackbone, as_pair, module_param_names
from vtransfer.models.peft_sites import AdapterSite, ProbeTap
from vtransfer.utils.errors import ConfigError
from vtransfer.weights.scenic_vivit import FlaxMsgpackSource
from vtransfer.weights.source import NO_PUBLIC_WEIGHTS, ForeignLayout, WeightSource

VARIANTS = ("factorised", "joint")
PATCH_EMBEDS = ("conv", "ln_linear_ln")
POS_EMBEDS = ("factorised", "joint")
POOLS = ("cls", "mean")
#: ``exact`` is ``erf`` GELU (torchvision, vit-pytorch); ``tanh`` its tanh approximation (Flax / Scenic).
GELUS = ("exact", "tanh")

NO_TEMPORAL_REASON = (
    "ViViT model 1 (variant 'joint') attends over the tokens of all frames at once: every block's attention "
    "mixes space and time with the same weights, so no parameter acts on time alone"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Scenic's ``zero_centering`` ([0, 1] -> [-1, 1]) as vtransfer's ``(x - mean) / std``.
ZERO_CENTERED_MEAN = (0.5, 0.5, 0.5)
ZERO_CENTERED_STD = (0.5, 0.5, 0.5)
#: What google/vivit-b-16x2-kinetics400's ``preprocessor_config.json`` declares (ViViTImageProcessor,
#: rescale_factor 1/127.5 with its default ``offset`` -1, then image_mean = image_std = 0.5) rewritten as
#: vtransfer's ``(x01 - mean) / std``: ``((x01 * 2 - 1) - 0.5) / 0.5 = (x01 - 0.75) / 0.25``, a [-3, 1]
#: range. It is what transformers feeds that checkpoint (and what ``hf:`` derives from the same file);
#: Scenic itself trained on [-1, 1] (``zero_centering``).
HF_VIVIT_MEAN = ((1.0 + 0.5) / 2.0,) * 3
HF_VIVIT_STD = (0.5 / 2.0,) * 3

# Layout shared by the presets that follow torchvision's ViT-B/16.
_TORCHVISION_LAYOUT: dict[str, Any] = {
    "patch_embed": "conv",
    "pos_embed": "factorised",
    "qkv_bias": True,
    "norm_eps": 1e-6,
    "pool": "cls",
}
# Layout of transformers' VivitForVideoClassification (Scenic's ViViT model 1).
_HF_JOINT_LAYOUT: dict[str, Any] = {
    "variant": "joint",
    "patch_embed": "conv",
    "pos_embed": "joint",
    "qkv_bias": True,
    "norm_eps": 1e-6,
    "gelu": "tanh",
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
    # Between tiny and vivit-b: ViT-S/16 widths (384, 6 heads, MLP 1536), 6 spatial + 2 temporal layers,
    # 8 frames of 112 px; for CPU runs and the step-time/memory benchmarks of the policies.
    "small": {
        **_TORCHVISION_LAYOUT,
        "image_size": [112, 112],
        "image_patch_size": [16, 16],
        "frames": 8,
        "frame_patch_size": 2,
        "dim": 384,
        "spatial_depth": 6,
        "temporal_depth": 2,
        "heads": 6,
        "dim_head": 64,
        "mlp_dim": 1536,
        "num_classes": 10,
        "frame_stride": 2,
        "resize_short": 128,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    },
    # Scenic's ViViT-B/16x2 factorised encoder (`vivit:kinetics400`): vivit-b's geometry and layout with
    # Flax's tanh GELU and Scenic's Kinetics-400 input (configs/kinetics400/vivit_base_factorised_encoder.py:
    # 32 frames at stride 2, min_resize 256, crop 224, zero_centering -> [-1, 1]).
    "b16x2-fe": {
        **_TORCHVISION_LAYOUT,
        "gelu": "tanh",
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
        "mean": list(ZERO_CENTERED_MEAN),
        "std": list(ZERO_CENTERED_STD),
    },
    # ViViT-B/16x2 model 1 as google/vivit-b-16x2-kinetics400 has it (`vivit:kinetics400-joint`; its
    # config.json = VivitConfig's defaults): 32 frames of 224x224, tubelets 2x16x16, 12 layers of width
    # 768, 12 heads, MLP 3072, 400 classes. Preprocessing = the checkpoint's preprocessor_config.json
    # (shortest edge 224, centre crop 224, HF_VIVIT_MEAN/STD); frame stride 2 from Scenic's
    # configs/kinetics400/vivit_base_k400.py ("32 frames, sampled at a stride of 2").
    "b16x2-joint": {
        **_HF_JOINT_LAYOUT,
        "image_size": [224, 224],
        "image_patch_size": [16, 16],
        "frames": 32,
        "frame_patch_size": 2,
        "dim": 768,
        "depth": 12,
        "heads": 12,
        "dim_head": 64,
        "mlp_dim": 3072,
        "num_classes": 400,
        "frame_stride": 2,
        "resize_short": 224,
        "mean": list(HF_VIVIT_MEAN),
        "std": list(HF_VIVIT_STD),
    },
    # Same topology as b16x2-joint at toy widths, for tests and CPU smoke runs.
    "tiny-joint": {
        **_HF_JOINT_LAYOUT,
        "image_size": [64, 64],
        "image_patch_size": [16, 16],
        "frames": 8,
        "frame_patch_size": 2,
        "dim": 64,
        "depth": 2,
        "heads": 4,
        "dim_head": 16,
        "mlp_dim": 128,
        "num_classes": 10,
        "frame_stride": 2,
        "resize_short": 64,
        "mean": list(HF_VIVIT_MEAN),
        "std": list(HF_VIVIT_STD),
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
    and vit-pytorch's ``to_qkv``. ``gelu="tanh"`` is the tanh approximation
    of the MLP's GELU (Flax's default, transformers' ``gelu_fast``).
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
        gelu: str = "exact",
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.attn_dropout = attn_dropout
        self.gelu_approximate = "tanh" if gelu == "tanh" else "none"
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
        y = self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x)), approximate=self.gelu_approximate)))
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
    """ViViT model 2 (factorised encoder) or model 1 (joint); see the module docstring for layouts and groups.

    Args:
        variant: ``"factorised"`` (model 2, the default) or ``"joint"`` (model 1).
        image_size: input ``(height, width)`` (or one int for square frames).
        frames: clip length ``T`` the model is built for; shorter clips (a
            multiple of ``frame_patch_size``) use the first rows of the
            temporal (model 1: the joint) position table.
        image_patch_size: spatial tubelet size ``(ph, pw)`` (or one int).
        frame_patch_size: temporal tubelet size ``t``.
        dim: token width ``D``.
        spatial_depth, temporal_depth: blocks in each transformer of model 2
            (>= 1; default 12 and 4). Not accepted by model 1.
        depth: blocks of model 1's single transformer (>= 1; default 12). Not accepted by model 2.
        heads: attention heads; ``dim_head`` is each head's width (default ``dim // heads``).
        mlp_dim: hidden width of the MLPs.
        num_classes: classifier outputs.
        pool: ``"cls"`` (CLS tokens) or ``"mean"`` (no CLS tokens, average the tokens).
        patch_embed: ``"conv"`` or ``"ln_linear_ln"``.
        pos_embed: model 2: ``"factorised"`` (spatial ``(1+N) x D`` shared over
            time plus temporal ``(1+T') x D``; without the CLS row when
            ``pool="mean"``) or ``"joint"`` (one ``T' x N x D`` table on the
            patch tokens only). Model 1 takes only ``"joint"``: one ``(1+T'N) x D``
            table over all tokens, CLS row first (``T'N x D`` with ``pool="mean"``).
        qkv_bias: bias on the query/key/value projection.
        norm_eps: epsilon of every LayerNorm.
        gelu: ``"exact"`` or ``"tanh"`` (the tanh approximation Flax/Scenic use).
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
        spatial_depth: int | None = None,
        temporal_depth: int | None = None,
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
        variant: str = "factorised",
        depth: int | None = None,
        gelu: str = "exact",
    ) -> None:
        super().__init__()
        h, w = as_pair(image_size)
        ph, pw = as_pair(image_patch_size)
        dim_head = dim // heads if dim_head is None else int(dim_head)
        _check_choice("variant", variant, VARIANTS)
        _check_choice("patch_embed", patch_embed, PATCH_EMBEDS)
        _check_choice("pos_embed", pos_embed, POS_EMBEDS)
        _check_choice("pool", pool, POOLS)
        _check_choice("gelu", gelu, GELUS)
        if h % ph or w % pw:
            raise ConfigError(f"vivit: image_size {h}x{w} is not divisible by image_patch_size {ph}x{pw}")
        if frames % frame_patch_size:
            raise ConfigError(f"vivit: frames {frames} is not divisible by frame_patch_size {frame_patch_size}")
        depths = _resolve_depths(variant, spatial_depth, temporal_depth, depth, pos_embed)
        self.config = {
            "variant": variant,
            "image_size": [h, w],
            "frames": int(frames),
            "image_patch_size": [ph, pw],
            "frame_patch_size": int(frame_patch_size),
            "dim": int(dim),
            **depths,
            "heads": int(heads),
            "dim_head": dim_head,
            "mlp_dim": int(mlp_dim),
            "num_classes": int(num_classes),
            "pool": pool,
            "patch_embed": patch_embed,
            "pos_embed": pos_embed,
            "qkv_bias": bool(qkv_bias),
            "norm_eps": float(norm_eps),
            "gelu": gelu,
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

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, heads, dim_head, mlp_dim, qkv_bias, norm_eps, dropout, attn_dropout, gelu)
                for _ in range(n)
            )

        if variant == "joint":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
            self.pos_embed = nn.Parameter(torch.zeros(use_cls + self.time_tokens * num_patches, dim))
            self.emb_drop = nn.Dropout(emb_dropout)
            self.blocks = blocks(depths["depth"])
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
        else:
            if pos_embed == "joint":
                self.pos_embed = nn.Parameter(torch.zeros(self.time_tokens, num_patches, dim))
            else:
                self.spatial_pos = nn.Parameter(torch.zeros(num_patches + use_cls, dim))
                self.temporal_pos = nn.Parameter(torch.zeros(self.time_tokens + use_cls, dim))
            self.spatial_cls = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
            self.temporal_cls = nn.Parameter(torch.zeros(1, 1, dim)) if use_cls else None
            self.emb_drop = nn.Dropout(emb_dropout)
            self.temporal_emb_drop = nn.Dropout(emb_dropout)  # its own module: it belongs to group temporal.0
            self.spatial_blocks = blocks(depths["spatial_depth"])
            self.spatial_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.temporal_blocks = blocks(depths["temporal_depth"])
            self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    # -- initialisation -----------------------------------------------------------
    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(("_pos", "pos_embed", "_cls", "cls_token")):
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
    def is_joint(self) -> bool:
        """True for model 1 (one transformer over all space-time tokens)."""
        return self.config["variant"] == "joint"

    @property
    def no_temporal_reason(self) -> str:
        """Why the ``temporal`` policy does not apply (model 1), or ``""`` (model 2 has a temporal transformer)."""
        return NO_TEMPORAL_REASON if self.is_joint else ""

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
        """Model 2: ``embed``, ``spatial.i``, ``temporal.i``, ``head``; model 1: ``embed``, ``block.i``, ``head``."""
        if self.is_joint:
            return self._joint_groups()
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

    def _joint_groups(self) -> list[LayerGroup]:
        embed = module_param_names("patch_embed", self.patch_embed)
        embed += [n for n in ("cls_token", "pos_embed") if getattr(self, n, None) is not None]
        groups = [LayerGroup("embed", "spatial", embed, modules=["emb_drop"])]
        for i, block in enumerate(self.blocks):
            params = module_param_names(f"blocks.{i}", block)
            if i == len(self.blocks) - 1:
                params += module_param_names("norm", self.norm)
            # every block attends across frames (tag), but nothing in it acts on time alone (no temporal_params)
            groups.append(LayerGroup(f"block.{i}", "temporal", params))
        groups.append(LayerGroup("head", "head", module_param_names("head", self.head)))
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x classes`` for a normalised clip ``B x 3 x T x H x W``."""
        return self.forward_groups(x, 0, self._num_groups())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``B x D`` pooled embedding (the head's input)."""
        return self.forward_groups(x, 0, self._num_groups() - 1)

    def run_group(self, index: int, state: State) -> State:
        """Apply group ``index``.

        Model 2 states: clip ``B x 3 x T x H x W`` -> (embed) tokens
        ``B x T' x S x D`` -> (spatial.*) same, and per-time CLS ``B x T' x D``
        after the last spatial group -> (temporal.*) ``B x (1+T') x D``
        (``B x T' x D`` with mean pooling), ``B x D`` after the last -> (head)
        logits. Model 1: clip -> (embed) ``B x (1+T'N) x D`` -> (block.*) same,
        ``B x D`` after the last -> (head) logits.
        """
        if self.is_joint:
            return self._run_joint(index, state)
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
        if self.is_joint:
            return len(self.blocks) + 2
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

    def _run_joint(self, index: int, state: State) -> State:
        depth = len(self.blocks)
        if index == 0:
            return self._embed_joint(state)
        if 1 <= index <= depth:
            x = self.blocks[index - 1](state)
            if index < depth:
                return x
            x = self.norm(x)
            return x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        if index == depth + 1:
            return self.head(state)
        raise IndexError(f"vivit has {depth + 2} groups; no group {index}")

    def _embed_joint(self, x: torch.Tensor) -> torch.Tensor:
        self._check_clip(x)
        tok = self.patch_embed(x).flatten(1, 2)  # B x T'N x D, time-major like transformers' flatten(2)
        if self.cls_token is not None:
            tok = torch.cat([self.cls_token.expand(tok.shape[0], 1, -1), tok], dim=1)
        return self.emb_drop(tok + self.pos_embed[: tok.shape[1]])


def _resolve_depths(
    variant: str, spatial_depth: int | None, temporal_depth: int | None, depth: int | None, pos_embed: str
) -> dict[str, int]:
    """The depth keys of ``variant``'s config, after refusing the other variant's."""
    if variant == "joint":
        if spatial_depth is not None or temporal_depth is not None:
            raise ConfigError("vivit: variant 'joint' (model 1) has one transformer: give depth, not "
                              "spatial_depth/temporal_depth")
        if pos_embed != "joint":
            raise ConfigError(f"vivit: variant 'joint' (model 1) has one position table over all tokens: "
                              f"pos_embed must be 'joint', got {pos_embed!r}")
        resolved = {"depth": 12 if depth is None else int(depth)}
    else:
        if depth is not None:
            raise ConfigError("vivit: variant 'factorised' (model 2) has two transformers: give spatial_depth and "
                              "temporal_depth, not depth")
        resolved = {"spatial_depth": 12 if spatial_depth is None else int(spatial_depth),
                    "temporal_depth": 4 if temporal_depth is None else int(temporal_depth)}
    if min(resolved.values()) < 1:
        raise ConfigError(f"vivit: every depth must be >= 1, got {resolved}")
    return resolved


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"vivit: {option} must be one of {', '.join(choices)}; got {value!r}")


MODEL_CLASS = ViViT

HF_JOINT_REPO = "google/vivit-b-16x2-kinetics400"
SCENIC_FE_URL = "https://storage.googleapis.com/scenic-bucket/vivit/kinetics_400/vivit_base_16x2_fe/checkpoint"


def _weight_sources() -> list[Any]:
    """``vivit:kinetics400`` (Scenic's ViViT-B/16x2 FE) and ``vivit:kinetics400-joint`` (the HF port of model 1)."""

    kinetics = {"name": "Kinetics-400", "num_classes": 400, "size": "about 240k training clips (10 s each)"}
    return [
        FlaxMsgpackSource(
            name="vivit:kinetics400",
            backbone="vivit",
            preset="b16x2-fe",
            url=SCENIC_FE_URL,
            filename="scenic_vivit_base_16x2_fe_kinetics400.msgpack",
            converter="vtransfer.weights.scenic_vivit:load_scenic_vivit_fe",
            num_classes=400,
            dataset={**kinetics, "init": "ImageNet-21k ViT-B/16",
                     "published_accuracy": {"acc@1": 78.4, "views": "4x3"},
                     "config": "google-research/scenic scenic/projects/vivit/configs/kinetics400/"
                               "vivit_base_factorised_encoder.py"},
            classes="vtransfer.weights.source:kinetics400_classes",
            note=(
                "Scenic's own ViViT-B/16x2 factorised encoder trained on Kinetics-400 (78.4% top-1 with 4x3 views, "
                "scenic/projects/vivit/README.md), a Flax msgpack train state read without JAX; input [-1, 1]. "
                "No hash is published: the first file seen is recorded and enforced after."
            ),
        ),
        WeightSource(
            name="vivit:kinetics400-joint",
            backbone="vivit",
            preset="b16x2-joint",
            url=f"https://huggingface.co/{HF_JOINT_REPO}/resolve/main/pytorch_model.bin",
            filename="google_vivit-b-16x2-kinetics400_pytorch_model.bin",
            # the hub's Git LFS sha256 of pytorch_model.bin ("Fix model head weights", the file on main)
            sha256="160c79526e796d6101c4d9d0fe4000e26a6098a4d8e97f4cb8935fa6deb060d0",
            converter="vtransfer.weights.hf_vivit:load_hf_vivit",
            num_classes=400,
            dataset={**kinetics, "init": "ImageNet-21k ViT-B/16", "repo": HF_JOINT_REPO,
                     "published_accuracy": {"acc@1": 79.9, "views": "4x3", "of": "Scenic's ViViT-B/16x2 checkpoint"}},
            classes="vtransfer.weights.source:kinetics400_classes",
            note=(
                f"ViViT-B/16x2 model 1 (joint space-time attention) trained on Kinetics-400, as Hugging Face hosts "
                f"it ({HF_JOINT_REPO}, converted from Scenic, whose README gives 79.9% top-1 with 4x3 views); "
                "read with torch.load(weights_only=True). Input as its preprocessor_config.json declares."
            ),
        ),
    ]


def _foreign_layouts() -> list[Any]:
    return [
        ForeignLayout(
            name="hf-vivit",
            backbone="vivit",
            converter="vtransfer.weights.hf_vivit:load_hf_vivit",
            required_keys=("vivit.embeddings.patch_embeddings.projection.weight",
                           "vivit.embeddings.position_embeddings"),
            head_key="classifier.weight",
            description="transformers' VivitForVideoClassification (ViViT model 1)",
            default_preset="b16x2-joint",
        ),
        ForeignLayout(
            name="scenic-vivit-fe",
            backbone="vivit",
            converter="vtransfer.weights.scenic_vivit:load_scenic_vivit_fe_flat",
            required_keys=(),
            required_suffixes=("embedding/kernel", "output_projection/kernel", "SpatialTransformer/encoder_norm/scale",
                               "TemporalTransformer/encoder_norm/scale"),
            head_key="output_projection/bias",
            description="Scenic's Flax factorised-encoder ViViT checkpoint (msgpack)",
            default_preset="b16x2-fe",
        ),
    ]


WEIGHT_SOURCES = (
    WeightSource(
        name="vivit:imagenet",
        backbone="vivit",
        preset="vivit-b",
        url="https://download.pytorch.org/models/vit_b_16-c867db91.pth",
        filename="vit_b_16-c867db91.pth",
        sha256_prefix="c867db91",
        converter="vtransfer.weights.vit_init:init_vivit_from_torchvision_vit",
        dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
        note=(
            "spatial transformer from torchvision's ImageNet ViT-B/16 with central-frame tubelet "
            "initialisation; the temporal transformer and the classifier start fresh."
        ),
    ),
    WeightSource(
        name="vivit:ucf101",
        backbone="vivit",
        preset="vivit-seed",
        dataset={"name": "UCF-101", "num_classes": 101, "size": "13,320 videos"},
        available=False,
        note="the seed paper's UCF-101 ViViT was not published: " + NO_PUBLIC_WEIGHTS.format(backbone="vivit"),
    ),
    *_weight_sources(),
)
FOREIGN_LAYOUTS = (
    ForeignLayout(
        name="vit-pytorch-vivit",
        backbone="vivit",
        converter="vtransfer.weights.vit_pytorch_import:load_vit_pytorch_vivit",
        required_keys=("pos_embedding", "mlp_head.weight"),
        required_prefixes=("to_patch_embedding.", "spatial_transformer.layers.", "temporal_transformer.layers."),
        head_key="mlp_head.weight",
        description="the vit-pytorch package's ViViT (factorised encoder)",
        default_preset="vivit-seed",
    ),
    ForeignLayout(
        name="torchvision-vit",
        backbone="vivit",
        converter="vtransfer.weights.vit_init:init_vivit_from_torchvision_vit",
        required_keys=("conv_proj.weight", "class_token", "encoder.pos_embedding"),
        head_key=None,
        description="torchvision's ViT (2D, spatial transformer initialisation)",
        default_preset="vivit-b",
    ),
    *_foreign_layouts(),
)


# -- where the parameter-efficient policies go in (vtransfer.models.peft_sites) ----------------------
#: --policy lora's default targets: every transformer block's attention (qkv, output projection) and
#: MLP linears, not the patch embedding.
LORA_TARGETS = ("*blocks.*.qkv", "*blocks.*.proj", "*blocks.*.fc1", "*blocks.*.fc2")


def adapter_sites(model: "ViViT") -> list[AdapterSite]:
    """--policy adapter: an ST-Adapter on the tokens before each spatial block (the authors' pre-attention place)."""
    if model.config.get("variant", "factorised") != "factorised":
        raise ConfigError(
            f"policy 'adapter': vivit variant {model.config.get('variant')!r} has no spatial-only blocks to adapt "
            "(its blocks already attend across frames); use the factorised encoder, or lora, bitfit, attentive-probe"
        )
    skip = 1 if getattr(model, "spatial_cls", None) is not None else 0
    dim = int(model.config["dim"])
    return [AdapterSite(g.name, "before", dim, "tokens", skip) for g in model.layer_groups() if g.name.startswith("spatial.")]


def probe_tap(model: "ViViT") -> ProbeTap:
    """--policy attentive-probe reads the tokens (B x (1 + L) x D) after the final LayerNorm."""
    norm = "norm" if model.config.get("variant", "factorised") == "joint" else "temporal_norm"
    return ProbeTap(norm, None, int(model.config["dim"]))
