"""Track head: a feature-only DPT (half resolution) feeding a CoTracker-style iterative point tracker."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .dpt_head import DPTHead
from .track_modules.base_track_predictor import BaseTrackerPredictor

__all__ = ["TrackHead"]


class TrackHead(nn.Module):
    """Point tracking from aggregated tokens.

    Args:
        dim_in: token width (2 * embed_dim).
        patch_size: backbone patch size.
        features: feature width of the extractor and latent width of the tracker.
        iters: default number of refinement iterations.
        predict_conf: also predict a per-point confidence.
        stride: feature-map stride of the tracker relative to its input coordinates.
        corr_levels, corr_radius: correlation pyramid levels and window radius.
        hidden_size: width of the update transformer.
        out_channels, intermediate_layer_idx: of the DPT feature extractor (official defaults; small aggregators
            must pass layer indices that exist).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        predict_conf: bool = True,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
    ):
        super().__init__()
        self.patch_size = patch_size
        self.feature_extractor = DPTHead(
            dim_in=dim_in,
            patch_size=patch_size,
            features=features,
            out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx,
            feature_only=True,
            down_ratio=2,
            pos_embed=False,
        )
        self.tracker = BaseTrackerPredictor(
            latent_dim=features,
            predict_conf=predict_conf,
            stride=stride,
            corr_levels=corr_levels,
            corr_radius=corr_radius,
            hidden_size=hidden_size,
        )
        self.iters = iters

    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        query_points: torch.Tensor | None = None,
        iters: int | None = None,
    ):
        """Track `query_points` [B, N, 2] (pixels (x, y) of frame 0) through all S frames of `images` [B, S, 3, H, W].

        Returns (list of coords [B, S, N, 2] per iteration, visibility [B, S, N] in (0, 1), confidence [B, S, N] or
        None). Needs all frames at once (no streaming form).
        """
        if query_points is None:
            raise ValueError("TrackHead needs query_points [B, N, 2] (pixel x, y in the first frame)")
        feature_maps = self.feature_extractor(aggregated_tokens_list, images, patch_start_idx)
        return self.tracker(query_points=query_points, fmaps=feature_maps, iters=self.iters if iters is None else iters)
