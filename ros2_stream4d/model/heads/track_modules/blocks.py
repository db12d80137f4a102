"""The tracker's update transformer and its correlation pyramid."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import AttnBlock, CrossAttnBlock
from .utils import bilinear_sampler

__all__ = ["CorrBlock", "EfficientUpdateFormer"]


class EfficientUpdateFormer(nn.Module):
    """Alternating attention over time (per track) and over space (tracks <-> a set of learned virtual tracks).

    Input [B, N, T, input_dim] -> (updates [B, N, T, output_dim], None).
    """

    def __init__(
        self,
        space_depth: int = 6,
        time_depth: int = 6,
        input_dim: int = 320,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        add_space_attn: bool = True,
        num_virtual_tracks: int = 64,
    ):
        super().__init__()
        self.out_channels = 2
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks

        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size, bias=True)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim, bias=True)
        # (sic) "virual": the official parameter name
        if add_space_attn:
            self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        else:
            self.virual_tracks = None

        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)])
        if add_space_attn:
            if space_depth < 1 or time_depth < space_depth:
                raise ValueError("need 1 <= space_depth <= time_depth")
            self.space_virtual_blocks = nn.ModuleList(
                [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
            )
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
            )
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, input_tensor: torch.Tensor, mask: torch.Tensor | None = None):
        tokens = self.input_transform(self.input_norm(input_tensor))
        init_tokens = tokens
        B, _, T, _ = tokens.shape
        if self.add_space_attn:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(B, 1, T, 1)], dim=1)
        N = tokens.shape[1]
        n_virtual = self.num_virtual_tracks if self.add_space_attn else 0
        every = len(self.time_blocks) // len(self.space_virtual_blocks) if self.add_space_attn else 0

        j = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(B * N, T, -1)).view(B, N, T, -1)
            if self.add_space_attn and i % every == 0 and j < len(self.space_virtual_blocks):
                space = tokens.permute(0, 2, 1, 3).reshape(B * T, N, -1)
                point_tokens = space[:, : N - n_virtual]
                virtual_tokens = space[:, N - n_virtual :]
                virtual_tokens = self.space_virtual2point_blocks[j](virtual_tokens, point_tokens, mask=mask)
                virtual_tokens = self.space_virtual_blocks[j](virtual_tokens)
                point_tokens = self.space_point2virtual_blocks[j](point_tokens, virtual_tokens, mask=mask)
                space = torch.cat([point_tokens, virtual_tokens], dim=1)
                tokens = space.view(B, T, N, -1).permute(0, 2, 1, 3)
                j += 1

        if self.add_space_attn:
            tokens = tokens[:, : N - n_virtual]
        tokens = self.output_norm(tokens + init_tokens)
        return self.flow_head(tokens), None


class CorrBlock:
    """Correlation pyramid of feature maps [B, S, C, H, W] (num_levels levels, each 2x average-pooled), sampled in
    a (2r+1)^2 window around track coordinates. Not an nn.Module: no parameters."""

    def __init__(self, fmaps: torch.Tensor, num_levels: int = 4, radius: int = 4, padding_mode: str = "zeros"):
        B, S, C, H, W = fmaps.shape
        self.num_levels = num_levels
        self.radius = radius
        self.padding_mode = padding_mode
        self.fmaps_pyramid = [fmaps]
        cur = fmaps
        for _ in range(num_levels - 1):
            b, s, c, h, w = cur.shape
            cur = F.avg_pool2d(cur.reshape(b * s, c, h, w), kernel_size=2, stride=2)
            cur = cur.reshape(b, s, c, cur.shape[-2], cur.shape[-1])
            self.fmaps_pyramid.append(cur)
        # Window offsets: entry [i, j] is the (x, y) offset (o_i, o_j). The x offset varies along the first window
        # axis; that fixed ordering of the (2r+1)^2 correlation features is what the trained corr_mlp expects.
        r = radius
        o = torch.linspace(-r, r, 2 * r + 1, device=fmaps.device, dtype=fmaps.dtype)
        ox, oy = torch.meshgrid(o, o, indexing="ij")
        self.delta = torch.stack([ox, oy], dim=-1)

    def corr_sample(self, targets: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """targets [B, S, N, C], coords [B, S, N, 2] (level-0 pixels) -> [B, S, N, num_levels * (2r+1)^2]."""
        B, S, N, C = targets.shape
        k = 2 * self.radius + 1
        delta = self.delta.to(device=coords.device, dtype=coords.dtype).view(1, k, k, 2)
        out = []
        for level, fmaps in enumerate(self.fmaps_pyramid):
            _, _, c, h, w = fmaps.shape
            corrs = torch.matmul(targets, fmaps.reshape(B, S, c, h * w)) / math.sqrt(c)  # B S N HW
            centroid = coords.reshape(B * S * N, 1, 1, 2) / (2**level)
            sampled = bilinear_sampler(
                corrs.reshape(B * S * N, 1, h, w), centroid + delta, padding_mode=self.padding_mode
            )
            out.append(sampled.view(B, S, N, -1))
        return torch.cat(out, dim=-1).contiguous()
