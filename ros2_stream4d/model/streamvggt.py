"""StreamVGGT: aggregator + camera / depth / point (/ track) heads, a causal forward and a streaming session.

Module attribute names are the official checkpoint keys (aggregator.*, camera_head.*, depth_head.*, point_head.*,
track_head.*), so an official state dict loads strict into ``StreamVGGT(ModelConfig())``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .aggregator import Aggregator
from .config import ModelConfig
from .kv_cache import CacheStats, StreamCache
from .layers import set_attention_backend
from .session import pooled_descriptor

OUTPUT_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class StreamVGGT(nn.Module):
    """images [B, S, 3, H, W] in [0, 1] -> dict(pose_enc [B, S, 9], depth [B, S, H, W, 1], depth_conf [B, S, H, W],
    world_points [B, S, H, W, 3], world_points_conf [B, S, H, W]).

    ``model.stream(window, anchors)`` opens a streaming session whose ``step(image [B, 3, H, W])`` returns the same
    keys for one frame (S dropped) and equals the causal forward when ``window=None``.
    """

    def __init__(self, cfg: ModelConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if cfg is None:
            cfg = ModelConfig(**overrides)
        elif overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
        self.cfg = cfg
        dim_in = 2 * cfg.embed_dim
        self.aggregator = Aggregator(cfg)
        self.camera_head = self._build_camera_head(cfg, dim_in) if cfg.camera_head else None
        if cfg.depth_head or cfg.point_head:
            from .heads.dpt_head import DPTHead
        self.depth_head = (
            DPTHead(
                dim_in=dim_in, patch_size=cfg.patch_size, output_dim=2, activation="exp",
                conf_activation="expp1", features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                intermediate_layer_idx=cfg.dpt_layers,
            )
            if cfg.depth_head
            else None
        )
        self.point_head = (
            DPTHead(
                dim_in=dim_in, patch_size=cfg.patch_size, output_dim=4, activation="inv_log",
                conf_activation="expp1", features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                intermediate_layer_idx=cfg.dpt_layers,
            )
            if cfg.point_head
            else None
        )
        self.track_head = self._build_track_head(cfg, dim_in) if cfg.track_head else None

    # -- construction ----------------------------------------------------------------------------------------------
    @staticmethod
    def _build_camera_head(cfg: ModelConfig, dim_in: int) -> nn.Module:
        from .heads.camera_head import CameraHead

        return CameraHead(dim_in=dim_in, trunk_depth=cfg.camera_trunk_depth, num_heads=cfg.camera_num_heads,
                          mlp_ratio=cfg.mlp_ratio, backend=cfg.attn_backend)

    @staticmethod
    def _build_track_head(cfg: ModelConfig, dim_in: int) -> nn.Module:
        from .heads.track_head import TrackHead

        return TrackHead(dim_in=dim_in, patch_size=cfg.patch_size, features=cfg.track_features,
                         intermediate_layer_idx=cfg.dpt_layers, out_channels=cfg.dpt_out_channels)

    # -- helpers ----------------------------------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> StreamVGGT:
        """Switch every attention layer (aggregator and heads) to "sdpa" | "eager" | "flash"."""
        set_attention_backend(self, backend)
        for m in self.modules():  # heads may keep their own backend attribute
            if hasattr(m, "attn_backend") and isinstance(m.attn_backend, str):
                m.attn_backend = backend
        self.cfg.attn_backend = backend
        return self

    def _autocast(self, device: torch.device):
        dt = self.cfg.cuda_autocast_dtype
        if device.type == "cuda" and dt:
            return torch.autocast("cuda", dtype=_DTYPES[dt])
        return contextlib.nullcontext()

    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        dt = self.cfg.cuda_autocast_dtype
        return _DTYPES[dt] if (device.type == "cuda" and dt) else None

    def _no_autocast(self, device: torch.device):
        if device.type == "cuda":
            return torch.autocast("cuda", enabled=False)
        return contextlib.nullcontext()

    def _keep_layers(self) -> list[int]:
        n = self.aggregator.aa_block_num
        keep = {n - 1}
        if self.depth_head is not None or self.point_head is not None:
            keep.update(i % n for i in self.cfg.dpt_layers)
        return sorted(keep)

    @staticmethod
    def _head_dtype(head: nn.Module) -> torch.dtype:
        for p in head.parameters():
            return p.dtype
        return torch.float32

    def _heads(
        self, tokens: list, images: torch.Tensor, patch_start_idx: int, camera_caches=None, causal: bool = True
    ) -> dict:
        """Run the heads in their own dtype (fp32 normally) with autocast disabled."""
        out: dict[str, torch.Tensor] = {}
        with self._no_autocast(images.device):
            if self.camera_head is not None:
                dt = self._head_dtype(self.camera_head)
                cam_tokens = [t.to(dt) if t is not None else None for t in tokens]
                kw: dict[str, Any] = {"num_iterations": self.cfg.camera_num_iterations, "kv_caches": camera_caches}
                if not causal:  # CameraHead.forward is causal only (StreamVGGT's training semantics)
                    raise NotImplementedError("this camera head has no non-causal (VGGT) mode")
                pose_enc_list = self.camera_head(cam_tokens, **kw)
                out["pose_enc"] = pose_enc_list[-1]
                if self.training:
                    out["pose_enc_list"] = pose_enc_list
            if self.depth_head is not None:
                dt = self._head_dtype(self.depth_head)
                depth, depth_conf = self.depth_head(tokens, images.to(dt), patch_start_idx)
                out["depth"], out["depth_conf"] = depth, depth_conf
            if self.point_head is not None:
                dt = self._head_dtype(self.point_head)
                pts, pts_conf = self.point_head(tokens, images.to(dt), patch_start_idx)
                out["world_points"], out["world_points_conf"] = pts, pts_conf
        return out

    # -- causal forward ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, causal: bool | None = None) -> dict[str, torch.Tensor]:
        """images [B, S, 3, H, W] (or [S, 3, H, W]) in [0, 1]; frame-causal global attention (the training and
        streaming semantics). causal=False gives VGGT's full attention in the aggregator."""
        if images.ndim == 4:
            images = images.unsqueeze(0)
        if images.ndim != 5:
            raise ValueError(f"images must be [B, S, 3, H, W], got {tuple(images.shape)}")
        causal = True if causal is None else causal
        with self._autocast(images.device):
            tokens, psi = self.aggregator(images, causal=causal, keep_layers=self._keep_layers())
        return self._heads(tokens, images, psi, causal=causal)

    # -- streaming --------------------------------------------------------------------------------------------------
    def stream(self, window: int | None = None, anchors: int = 1, cache_dtype: torch.dtype | None = None) -> StreamSession:
        """Open a streaming session. window: most recent frames kept (current one included), None = unlimited;
        anchors: first frames of the stream kept forever."""
        return StreamSession(self, window=window, anchors=anchors, cache_dtype=cache_dtype)


class StreamSession:
    """One stream through a StreamVGGT: ``step(image)`` per frame, ``reset()`` to start a new stream."""

    def __init__(
        self, model: StreamVGGT, window: int | None = None, anchors: int = 1, cache_dtype: torch.dtype | None = None
    ) -> None:
        self.model = model
        self.window = window
        self.anchors = anchors
        cfg = model.cfg
        cam = model.camera_head is not None
        self.cache = StreamCache(
            num_global_blocks=cfg.depth,
            camera_iterations=cfg.camera_num_iterations if cam else 0,
            camera_trunk_depth=cfg.camera_trunk_depth if cam else 0,
            window=window,
            anchors=anchors,
        )
        self._cache_dtype = cache_dtype

    @property
    def frames_seen(self) -> int:
        return self.cache.frames_seen

    def reset(self) -> None:
        """Forget the stream (the next frame becomes the new first frame / world frame) and free the cache."""
        self.cache.reset()

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def shrunk(self, window: int) -> StreamSession:
        """A new, empty session of the same model with a smaller window (after a device out-of-memory error);
        this session's cache is freed first."""
        self.reset()
        return StreamSession(self.model, window=window, anchors=self.anchors, cache_dtype=self._cache_dtype)

    @torch.inference_mode()
    def step(self, image: torch.Tensor, stamp_ns: int | None = None, mapping: Any = None) -> dict[str, torch.Tensor]:
        """image [B, 3, H, W] in [0, 1] -> dict of OUTPUT_KEYS and "descriptor" for this frame (no S dimension). stamp_ns and
        mapping are part of the session protocol (model/session.py); a learned model does not use them."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4:
            raise ValueError(f"step() takes one frame [B, 3, H, W], got {tuple(image.shape)}")
        m = self.model
        dev = image.device
        agg_dtype = self._cache_dtype or m._autocast_dtype(dev)
        for c in self.cache.aggregator:
            c.dtype = agg_dtype
        images = image.unsqueeze(1)
        first = self.cache.frames_seen == 0
        with m._autocast(dev):
            tokens, psi = m.aggregator.step(images, self.cache.aggregator, first=first, keep_layers=m._keep_layers())
        out = m._heads(tokens, images, psi, camera_caches=self.cache.camera if self.cache.camera else None)
        out["descriptor"] = pooled_descriptor(tokens[-1][:, :, psi:])  # the last aggregator layer's patch tokens
        return {k: v[:, 0] for k, v in out.items() if isinstance(v, torch.Tensor)}
