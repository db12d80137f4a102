"""Small helpers shared by the heads: the DPT sin-cos position embedding and a safe bilinear resize."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["create_uv_grid", "make_sincos_pos_embed", "position_grid_to_embed", "safe_interpolate"]

# F.interpolate fails on outputs with more elements than this (a CUDA indexing limit); larger inputs go in chunks.
_INTERP_MAX_ELEMENTS = 1610612736


def make_sincos_pos_embed(embed_dim: int, pos: torch.Tensor, omega_0: float = 100.0) -> torch.Tensor:
    """1D sin-cos embedding of positions `pos` (any shape, flattened) -> [M, embed_dim] float32.

    Frequencies omega_0^(-k / (embed_dim/2)), k = 0 .. embed_dim/2 - 1, computed in float64; the first half of the
    channels are the sines, the second half the cosines.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=pos.device) / half
    omega = 1.0 / omega_0**omega
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def position_grid_to_embed(pos_grid: torch.Tensor, embed_dim: int, omega_0: float = 100.0) -> torch.Tensor:
    """[H, W, 2] grid of (x, y) -> [H, W, embed_dim]: half the channels embed x, the other half y."""
    h, w, two = pos_grid.shape
    if two != 2:
        raise ValueError(f"expected a [H, W, 2] grid, got {tuple(pos_grid.shape)}")
    flat = pos_grid.reshape(-1, 2)
    emb_x = make_sincos_pos_embed(embed_dim // 2, flat[:, 0], omega_0=omega_0)
    emb_y = make_sincos_pos_embed(embed_dim // 2, flat[:, 1], omega_0=omega_0)
    return torch.cat([emb_x, emb_y], dim=-1).view(h, w, embed_dim)


def create_uv_grid(
    width: int,
    height: int,
    aspect_ratio: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Normalised pixel-centre grid [height, width, 2] of (u, v).

    The full plane spans [-a/d, a/d] x [-1/d, 1/d] with a the aspect ratio (width / height unless given) and
    d = sqrt(a^2 + 1), i.e. the half diagonal is 1; the samples sit at the centres of width x height cells.
    """
    if aspect_ratio is None:
        aspect_ratio = float(width) / float(height)
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x = aspect_ratio / diag
    span_y = 1.0 / diag
    x_end = span_x * (width - 1) / width
    y_end = span_y * (height - 1) / height
    xs = torch.linspace(-x_end, x_end, steps=width, dtype=dtype, device=device)
    ys = torch.linspace(-y_end, y_end, steps=height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")  # both [height, width]
    return torch.stack((uu, vv), dim=-1)


def safe_interpolate(
    x: torch.Tensor,
    size: tuple[int, int] | None = None,
    scale_factor: float | None = None,
    mode: str = "bilinear",
    align_corners: bool | None = True,
) -> torch.Tensor:
    """F.interpolate to an explicit size (scale_factor turned into int(size * factor)), chunked over the batch
    when the output would exceed the element limit of the CUDA kernels."""
    if size is None:
        if scale_factor is None:
            raise ValueError("give size or scale_factor")
        size = (int(x.shape[-2] * scale_factor), int(x.shape[-1] * scale_factor))
    size = (int(size[0]), int(size[1]))
    n_out = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n_out > _INTERP_MAX_ELEMENTS:
        chunks = torch.chunk(x, chunks=n_out // _INTERP_MAX_ELEMENTS + 1, dim=0)
        return torch.cat(
            [F.interpolate(c, size=size, mode=mode, align_corners=align_corners) for c in chunks], dim=0
        ).contiguous()
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
