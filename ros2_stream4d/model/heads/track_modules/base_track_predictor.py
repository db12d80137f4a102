"""CoTracker-style iterative point tracker over per-frame feature maps."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import CorrBlock, EfficientUpdateFormer
from .modules import Mlp
from .utils import get_2d_embedding, get_2d_sincos_pos_embed, sample_features4d

__all__ = ["BaseTrackerPredictor"]


class BaseTrackerPredictor(nn.Module):
    """Tracks query points of frame 0 through all frames by iterative refinement.

    forward(query_points [B, N, 2] in image pixels (x, y), fmaps [B, S, C, H', W'], iters) ->
    (list of coords [B, S, N, 2] in image pixels, one per iteration; visibility [B, S, N]; confidence [B, S, N] or None).
    """

    def __init__(
        self,
        stride: int = 1,
        corr_levels: int = 5,
        corr_radius: int = 4,
        latent_dim: int = 128,
        hidden_size: int = 384,
        use_spaceatt: bool = True,
        depth: int = 6,
        max_scale: int = 518,
        predict_conf: bool = True,
    ):
        super().__init__()
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.hidden_size = hidden_size
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2

        self.corr_mlp = Mlp(
            in_features=corr_levels * (2 * corr_radius + 1) ** 2, hidden_features=hidden_size, out_features=latent_dim
        )
        # flow embedding (latent_dim) + 2 x raw flow (4) + correlation features (latent_dim) + track features (latent_dim)
        self.transformer_dim = 3 * latent_dim + 4
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            space_depth=depth if use_spaceatt else 0,
            time_depth=depth,
            input_dim=self.transformer_dim,
            hidden_size=hidden_size,
            output_dim=latent_dim + 2,
            mlp_ratio=4.0,
            add_space_attn=use_spaceatt,
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self,
        query_points: torch.Tensor,
        fmaps: torch.Tensor,
        iters: int = 6,
        return_feat: bool = False,
        down_ratio: int = 1,
        apply_sigmoid: bool = True,
    ):
        B, N, D = query_points.shape
        _, S, C, HH, WW = fmaps.shape
        if D != 2:
            raise ValueError("query points must be [B, N, 2] (x, y)")
        latent = self.latent_dim

        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

        # query points from image pixels to feature-map pixels
        if down_ratio > 1:
            query_points = query_points / float(down_ratio)
        query_points = query_points / float(self.stride)

        coords = query_points.clone().reshape(B, 1, N, 2).repeat(1, S, 1, 1)
        query_track_feat = sample_features4d(fmaps[:, 0], coords[:, 0])  # B N C
        track_feats = query_track_feat.unsqueeze(1).repeat(1, S, 1, 1)  # B S N C
        coords_query = coords[:, 0].clone()

        corr_fn = CorrBlock(fmaps, num_levels=self.corr_levels, radius=self.corr_radius)
        pos_embed = get_2d_sincos_pos_embed(self.transformer_dim, grid_size=(HH, WW)).to(query_points.device)
        ref_token = torch.cat(
            [self.query_ref_token[:, 0:1], self.query_ref_token[:, 1:2].expand(-1, S - 1, -1)], dim=1
        )  # 1 S D: token 0 for the query frame, token 1 for the others

        coord_preds = []
        for _ in range(iters):
            coords = coords.detach()
            fcorrs = corr_fn.corr_sample(track_feats, coords)  # B S N L
            fcorrs = self.corr_mlp(fcorrs.permute(0, 2, 1, 3).reshape(B * N, S, fcorrs.shape[3]))

            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(B * N, S, 2)
            flows_emb = get_2d_embedding(flows, self.flows_emb_dim, cat_coords=False)
            flows_emb = torch.cat([flows_emb, flows / self.max_scale, flows / self.max_scale], dim=-1)

            track_feats_ = track_feats.permute(0, 2, 1, 3).reshape(B * N, S, latent)
            x = torch.cat([flows_emb, fcorrs, track_feats_], dim=2)

            sampled_pos = sample_features4d(pos_embed.expand(B, -1, -1, -1), coords[:, 0])  # B N D
            x = x + sampled_pos.reshape(B * N, 1, -1)
            x = x + ref_token.to(device=x.device, dtype=x.dtype)

            delta, _ = self.updateformer(x.reshape(B, N, S, -1))
            delta = delta.reshape(B * N, S, -1)
            delta_coords = delta[:, :, :2]
            delta_feats = delta[:, :, 2:].reshape(B * N * S, latent)

            track_feats_ = track_feats_.reshape(B * N * S, latent)
            track_feats_ = self.ffeat_updater(self.ffeat_norm(delta_feats)) + track_feats_
            track_feats = track_feats_.reshape(B, N, S, latent).permute(0, 2, 1, 3)

            coords = coords + delta_coords.reshape(B, N, S, 2).permute(0, 2, 1, 3)
            coords[:, 0] = coords_query  # the query frame keeps the query points
            scale = self.stride * down_ratio if down_ratio > 1 else self.stride
            coord_preds.append(coords * scale)

        feats = track_feats.reshape(B * S * N, latent)
        vis = self.vis_predictor(feats).reshape(B, S, N)
        conf = self.conf_predictor(feats).reshape(B, S, N) if self.predict_conf else None
        if apply_sigmoid:
            vis = torch.sigmoid(vis)
            conf = torch.sigmoid(conf) if conf is not None else None
        if return_feat:
            return coord_preds, vis, track_feats, query_track_feat, conf
        return coord_preds, vis, conf
