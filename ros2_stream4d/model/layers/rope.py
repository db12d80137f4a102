"""2D rotary position embedding (RoPE) as used by VGGT / StreamVGGT.

The head dimension is split into a y half and an x half; each half is rotated by the 1D RoPE of its coordinate
(rotate-half style, not interleaved), with frequencies base ** (-2i / half_dim) duplicated across the half.
Patch positions are (row, col) + 1 and special tokens sit at (0, 0) (see the aggregator).
There is no temporal component: a cached frame's keys do not depend on where the frame sits in the stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PositionGetter:
    """Integer (row, col) positions of a patch grid, row-major: [B, h * w, 2] (long)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(self, batch_size: int, height: int, width: int, device: torch.device | str) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._cache:
            ys = torch.arange(height, device=device)
            xs = torch.arange(width, device=device)
            self._cache[key] = torch.cartesian_prod(ys, xs)
        pos = self._cache[key]
        return pos.view(1, height * width, 2).expand(batch_size, -1, -1).clone()


class RotaryPositionEmbedding2D(nn.Module):
    """Applies 2D RoPE: tokens [B, heads, N, head_dim], positions [B, N, 2] (y, x) -> same shape as tokens."""

    def __init__(self, frequency: float = 100.0, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.base_frequency = frequency
        self.scaling_factor = scaling_factor
        self._tables: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _components(self, dim: int, seq_len: int, device: torch.device, dtype: torch.dtype):
        # Rows of the table do not depend on its length (angle = position * inv_freq), so one table per
        # (dim, device, dtype) grown on demand gives the same numbers as recomputing it.
        key = (dim, str(device), dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < seq_len:
            n = max(seq_len, 64 if cached is None else 2 * cached[0].shape[0])
            exponents = torch.arange(0, dim, 2, device=device).float() / dim
            inv_freq = 1.0 / (self.base_frequency**exponents)
            positions = torch.arange(n, device=device, dtype=inv_freq.dtype)
            angles = torch.outer(positions, inv_freq).to(dtype)
            angles = torch.cat((angles, angles), dim=-1)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._tables[key] = cached
        return cached

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    def _apply_1d(self, tokens, positions, cos_table, sin_table):
        cos = F.embedding(positions, cos_table)[:, None, :, :]
        sin = F.embedding(positions, sin_table)[:, None, :, :]
        return tokens * cos + self._rotate_half(tokens) * sin

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert tokens.size(-1) % 2 == 0, "head dim must be even for 2D RoPE"
        assert positions.ndim == 3 and positions.shape[-1] == 2, "positions must be [B, N, 2]"
        half = tokens.size(-1) // 2
        max_position = int(positions.max()) + 1
        cos_t, sin_t = self._components(half, max_position, tokens.device, tokens.dtype)
        y_feats, x_feats = tokens.chunk(2, dim=-1)
        y_feats = self._apply_1d(y_feats, positions[..., 0], cos_t, sin_t)
        x_feats = self._apply_1d(x_feats, positions[..., 1], cos_t, sin_t)
        return torch.cat((y_feats, x_feats), dim=-1)
