"""Transformer blocks of the tracker's update former (nn.MultiheadAttention based)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AttnBlock", "CrossAttnBlock", "Mlp"]


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(
        self, in_features: int, hidden_features: int | None = None, out_features: int | None = None, bias=True
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttnBlock(nn.Module):
    """Self-attention block. As in the reference, the residual of the attention is taken from the NORMALISED input
    (x = norm1(x); x = x + attn(x)), then a pre-norm MLP residual."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x)
        attn_out, _ = self.attn(x, x, x, need_weights=False)
        x = x + attn_out
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block from x to context (residual from the normalised x, like AttnBlock)."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if context_dim != hidden_size:
            raise ValueError("the reference cross-attention block requires context_dim == hidden_size")
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        attn_out, _ = self.cross_attn(x, context, context, attn_mask=mask, need_weights=False)
        x = x + attn_out
        return x + self.mlp(self.norm2(x))
