"""Attentive probe: pool a frozen backbone's unpooled features with a learned query.

The way V-JEPA (Bardes et al. 2024) and V-JEPA 2 evaluate a frozen video
encoder: instead of averaging the last feature map, one learned query
attends over all of its positions with multi-head cross-attention, so the
probe can pick *where and when* to look. Its output (``B x D``, the width of
the features) feeds the backbone's own linear classifier.

Input: tokens ``B x L x D`` (ViViT's temporal tokens) or a CNN map
``B x D x T x H x W`` (each ``(t, h, w)`` position is one token).
Parameters: the query (``heads x dim_head``), LayerNorm over the features,
key and value projections ``D -> E`` and an output projection ``E -> D``
(``E = heads * dim_head``, the attention width; ``D`` unless given).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentiveProbe(nn.Module):
    """One learned query, multi-head cross-attention over the feature positions, ``B x D`` out.

    Args:
        dim: feature width ``D``.
        heads: attention heads.
        attn_dim: attention width ``E`` (a multiple of ``heads``; ``dim`` when ``None``).
    """

    def __init__(self, dim: int, heads: int = 8, attn_dim: int | None = None):
        super().__init__()
        attn_dim = int(attn_dim or dim)
        if heads < 1 or attn_dim % heads:
            raise ValueError(f"attention width {attn_dim} is not a multiple of heads {heads}")
        self.heads = int(heads)
        self.dim_head = attn_dim // heads
        self.query = nn.Parameter(torch.zeros(heads, self.dim_head))
        self.norm = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, attn_dim)
        self.to_v = nn.Linear(dim, attn_dim)
        self.to_out = nn.Linear(attn_dim, dim)
        nn.init.trunc_normal_(self.query, std=0.02)

    @staticmethod
    def tokens(features: torch.Tensor) -> torch.Tensor:
        """``B x L x D`` tokens from tokens or from a ``B x D x T x H x W`` map."""
        if features.dim() == 5:
            return features.flatten(2).transpose(1, 2)
        if features.dim() != 3:
            raise ValueError(f"the probe reads B x L x D tokens or a B x D x T x H x W map, got {tuple(features.shape)}")
        return features

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """Attention weights ``B x heads x L`` of the query over the feature positions."""
        k = self.to_k(self.norm(self.tokens(features)))
        b, n, _ = k.shape
        k = k.view(b, n, self.heads, self.dim_head)
        scores = torch.einsum("hd,bnhd->bhn", self.query.to(k.dtype), k) / math.sqrt(self.dim_head)
        return scores.softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``B x D``: the attention-pooled features."""
        x = self.norm(self.tokens(features))
        b, n, _ = x.shape
        q = self.query.to(x.dtype).view(1, self.heads, 1, self.dim_head).expand(b, -1, -1, -1)
        k = self.to_k(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # B x heads x 1 x dim_head
        return self.to_out(pooled.reshape(b, self.heads * self.dim_head))
