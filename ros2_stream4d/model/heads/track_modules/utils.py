"""Sampling and embedding helpers of the CoTracker-style tracker."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bilinear_sampler",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_embedding",
    "get_2d_sincos_pos_embed",
    "sample_features4d",
]


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[1, M, embed_dim] sin-cos embedding (base 10000, computed in float64) of the flattened positions."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = torch.arange(half, dtype=torch.float64) / half
    omega = 1.0 / 10000**omega
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[None].float()


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """[1, embed_dim, H, W] sin-cos embedding of an integer pixel grid.

    The first half of the channels embeds the column (x) index, the second half the row (y) index.
    """
    if isinstance(grid_size, int):
        gh = gw = grid_size
    else:
        gh, gw = (int(g) for g in grid_size)
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    cols = torch.arange(gw, dtype=torch.float32)[None, :].expand(gh, gw)
    rows = torch.arange(gh, dtype=torch.float32)[:, None].expand(gh, gw)
    emb = torch.cat(
        [
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols),
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows),
        ],
        dim=2,
    )
    return emb.reshape(1, gh, gw, embed_dim).permute(0, 3, 1, 2)


def get_2d_embedding(xy: torch.Tensor, C: int, cat_coords: bool = True) -> torch.Tensor:
    """Interleaved sin/cos embedding of 2D offsets [B, N, 2] -> [B, N, 2C] (x channels, then y channels).

    Frequencies are k * 1000 / C for k = 0, 2, 4, ... (the tracker's flow embedding; note: linear, not geometric).
    """
    B, N, D = xy.shape
    if D != 2:
        raise ValueError("xy must end in 2")
    x = xy[:, :, 0:1]
    y = xy[:, :, 1:2]
    div_term = (torch.arange(0, C, 2, device=xy.device, dtype=torch.float32) * (1000.0 / C)).reshape(1, 1, C // 2)
    pe_x = torch.zeros(B, N, C, device=xy.device, dtype=torch.float32)
    pe_y = torch.zeros(B, N, C, device=xy.device, dtype=torch.float32)
    pe_x[:, :, 0::2] = torch.sin(x * div_term)
    pe_x[:, :, 1::2] = torch.cos(x * div_term)
    pe_y[:, :, 0::2] = torch.sin(y * div_term)
    pe_y[:, :, 1::2] = torch.cos(y * div_term)
    pe = torch.cat([pe_x, pe_y], dim=2)
    if cat_coords:
        pe = torch.cat([xy, pe], dim=2)
    return pe


def bilinear_sampler(
    input: torch.Tensor, coords: torch.Tensor, align_corners: bool = True, padding_mode: str = "border"
) -> torch.Tensor:
    """grid_sample with pixel coordinates: input [B, C, H, W], coords [B, Ho, Wo, 2] as (x, y) in pixels
    (0 .. W-1 / 0 .. H-1 at pixel centres with align_corners). The coordinates are not differentiated."""
    coords = coords.detach().to(device=input.device, dtype=input.dtype)
    sizes = input.shape[2:]
    if len(sizes) != 2:
        raise ValueError("bilinear_sampler supports 4D inputs only")
    if align_corners:
        scale = [2.0 / max(s - 1, 1) for s in reversed(sizes)]
    else:
        scale = [2.0 / s for s in reversed(sizes)]
    scale = torch.tensor(scale, device=coords.device, dtype=coords.dtype)
    grid = coords * scale - 1
    return F.grid_sample(input, grid, align_corners=align_corners, padding_mode=padding_mode)


def sample_features4d(input: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear features of input [B, C, H, W] at pixel points coords [B, R, 2] (x, y) -> [B, R, C]."""
    B = input.shape[0]
    feats = bilinear_sampler(input, coords.unsqueeze(2))  # B C R 1
    return feats.permute(0, 2, 1, 3).reshape(B, -1, feats.shape[1] * feats.shape[3])
