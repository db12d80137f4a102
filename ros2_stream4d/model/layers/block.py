"""Pre-norm transformer block (official key names: norm1, attn, ls1, norm2, mlp, ls2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp


class Block(nn.Module):
    """x [B, N, C] -> [B, N, C]:  x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    norm_layer: nn.LayerNorm (eps 1e-5) for the aggregator and the camera-head trunk; DINOv2 blocks use
    functools.partial(nn.LayerNorm, eps=1e-6). qk-norm is always nn.LayerNorm(head_dim) with eps 1e-5.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: nn.Module | None = None,
        backend: str = "sdpa",
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, rope=rope,
            backend=backend,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), bias=ffn_bias, act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: Any = None,
        frame_causal: int | None = None,
    ) -> torch.Tensor:
        x = x + self.ls1(
            self.attn(self.norm1(x), pos=pos, attn_mask=attn_mask, kv_cache=kv_cache, frame_causal=frame_causal)
        )
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x
