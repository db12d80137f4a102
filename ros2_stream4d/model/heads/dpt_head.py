"""DPT dense prediction head (depth, point map, and the track head's feature extractor).

Four intermediate aggregator outputs are normalised, projected by 1x1 convolutions to `out_channels`, resampled to
4x, 2x, 1x and 1/2x of the patch grid, fused coarse to fine by RefineNet-style blocks, upsampled to the image size
(divided by `down_ratio`) and turned into `output_dim` channels: values (activated by `activation`) and one
confidence channel (activated by `conf_activation`). With `feature_only=True` the head stops after the fusion and the
resize and returns `features` channels per pixel (used by the track head).

Module names follow the official StreamVGGT / VGGT state dict (norm, projects, resize_layers, scratch.*).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .head_act import activate_head
from .utils import create_uv_grid, position_grid_to_embed, safe_interpolate

__all__ = ["DPTHead", "FeatureFusionBlock", "ResidualConvUnit"]

_USE_DEFAULT = object()


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus a skip connection.

    The reference applies an in-place ReLU to its input before the first convolution, so the skip connection carries
    relu(x), not x. We reproduce that explicitly (without mutating the caller's tensor).
    """

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        out = self.conv2(F.relu(self.conv1(x)))
        return out + x


class FeatureFusionBlock(nn.Module):
    """Fuse a coarser path with a skip feature, refine, upsample (bilinear, align_corners) and project (1x1)."""

    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        out = x
        if self.has_residual:
            if skip is None:
                raise ValueError("this fusion block expects a skip feature")
            out = out + self.resConfUnit1(skip)
        out = self.resConfUnit2(out)
        if size is None:
            out = safe_interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            out = safe_interpolate(out, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class DPTHead(nn.Module):
    """DPT head over aggregated tokens.

    Args:
        dim_in: channel width of the aggregated tokens (2 * embed_dim).
        patch_size: patch size of the backbone (14).
        output_dim: output channels incl. the confidence channel (2 for depth, 4 for points).
        activation: activation of the value channels ("exp" for depth, "inv_log" for points, ...).
        conf_activation: activation of the confidence channel ("expp1").
        features: width of the fusion path.
        out_channels: widths of the four projected intermediate layers.
        intermediate_layer_idx: which entries of the aggregated token list feed the four levels.
        pos_embed: add the 0.1-scaled sin-cos uv embedding after projection and after the final resize.
        feature_only: return the fused feature map instead of predictions (track head feature extractor).
        down_ratio: output resolution divisor (2 for the track head features).
        frames_chunk_size: frames processed at once (memory bound); None or <= 0 processes all frames together.
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
        frames_chunk_size: int | None = 8,
    ) -> None:
        super().__init__()
        out_channels = tuple(int(c) for c in out_channels)
        if len(out_channels) != 4 or len(tuple(intermediate_layer_idx)) != 4:
            raise ValueError("DPTHead needs exactly four out_channels and four intermediate_layer_idx")
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.intermediate_layer_idx = tuple(int(i) for i in intermediate_layer_idx)
        self.frames_chunk_size = frames_chunk_size
        self.output_dim = output_dim

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(
            [nn.Conv2d(dim_in, oc, kernel_size=1, stride=1, padding=0) for oc in out_channels]
        )
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4, padding=0),  # 4x
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2, padding=0),  # 2x
                nn.Identity(),  # 1x
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),  # 1/2x
            ]
        )

        scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(scratch, f"layer{i}_rn", nn.Conv2d(oc, features, kernel_size=3, stride=1, padding=1, bias=False))
        scratch.refinenet1 = FeatureFusionBlock(features)
        scratch.refinenet2 = FeatureFusionBlock(features)
        scratch.refinenet3 = FeatureFusionBlock(features)
        scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        head_features_2 = 32
        if feature_only:
            scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1)
        else:
            scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1)
            scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, head_features_2, kernel_size=3, stride=1, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_features_2, output_dim, kernel_size=1, stride=1, padding=0),
            )
        self.scratch = scratch

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        frames_chunk_size=_USE_DEFAULT,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dense predictions.

        Args:
            aggregated_tokens_list: per-layer tokens [B, S, P, dim_in] (only the shape of `images` and the layers in
                `intermediate_layer_idx` are used).
            images: [B, S, 3, H, W]; only its shape is read. H and W must be multiples of the patch size.
            patch_start_idx: index of the first patch token (after camera and register tokens).
            frames_chunk_size: override of the constructor's chunk size (None: all frames at once).

        Returns:
            feature_only: features [B, S, features, H/down_ratio, W/down_ratio];
            else (preds [B, S, H, W, output_dim-1], conf [B, S, H, W]).
        """
        if frames_chunk_size is _USE_DEFAULT:
            frames_chunk_size = self.frames_chunk_size
        S = images.shape[1]
        if not frames_chunk_size or frames_chunk_size <= 0 or frames_chunk_size >= S:
            return self._forward_impl(aggregated_tokens_list, images, patch_start_idx, 0, S)

        outs = [
            self._forward_impl(aggregated_tokens_list, images, patch_start_idx, s0, min(s0 + frames_chunk_size, S))
            for s0 in range(0, S, frames_chunk_size)
        ]
        if self.feature_only:
            return torch.cat(outs, dim=1)
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)

    def _forward_impl(
        self,
        aggregated_tokens_list: Sequence[torch.Tensor],
        images: torch.Tensor,
        patch_start_idx: int,
        s0: int,
        s1: int,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, S_all, _, H, W = images.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        S = s1 - s0
        ph, pw = H // self.patch_size, W // self.patch_size
        dtype = self.norm.weight.dtype  # the head runs in its own parameter dtype (fp32 in the reference)

        levels = []
        for level, layer_idx in enumerate(self.intermediate_layer_idx):
            x = aggregated_tokens_list[layer_idx]
            if x.shape[1] != S_all:
                raise ValueError(f"tokens have {x.shape[1]} frames, images {S_all}")
            x = x[:, s0:s1, patch_start_idx:]
            if x.shape[2] != ph * pw:
                raise ValueError(f"expected {ph * pw} patch tokens for {H}x{W}, got {x.shape[2]}")
            x = self.norm(x.reshape(B * S, ph * pw, x.shape[-1]).to(dtype))
            x = x.permute(0, 2, 1).reshape(B * S, -1, ph, pw)
            x = self.projects[level](x)
            if self.pos_embed:
                x = self._apply_pos_embed(x, W, H)
            levels.append(self.resize_layers[level](x))

        out = self._fuse(levels)
        out = safe_interpolate(
            out,
            size=(int(ph * self.patch_size / self.down_ratio), int(pw * self.patch_size / self.down_ratio)),
            mode="bilinear",
            align_corners=True,
        )
        if self.pos_embed:
            out = self._apply_pos_embed(out, W, H)
        if self.feature_only:
            return out.reshape(B, S, *out.shape[1:])

        out = self.scratch.output_conv2(out)
        preds, conf = activate_head(out, activation=self.activation, conf_activation=self.conf_activation)
        return preds.reshape(B, S, *preds.shape[1:]), conf.reshape(B, S, *conf.shape[1:])

    def _fuse(self, levels: list[torch.Tensor]) -> torch.Tensor:
        sc = self.scratch
        l1 = sc.layer1_rn(levels[0])
        l2 = sc.layer2_rn(levels[1])
        l3 = sc.layer3_rn(levels[2])
        l4 = sc.layer4_rn(levels[3])
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)

    @staticmethod
    def _apply_pos_embed(x: torch.Tensor, W: int, H: int, ratio: float = 0.1) -> torch.Tensor:
        """Add ratio * sin-cos embedding of a uv grid of x's size, spanning the image aspect ratio W/H."""
        h, w = x.shape[-2:]
        grid = create_uv_grid(w, h, aspect_ratio=W / H, dtype=x.dtype, device=x.device)
        emb = position_grid_to_embed(grid, x.shape[1]) * ratio
        return x + emb.permute(2, 0, 1)[None].to(x.dtype)
