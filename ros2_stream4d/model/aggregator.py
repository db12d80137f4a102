"""The alternating-attention aggregator (frame attention inside each frame, global attention across frames).

Token layout per frame: [camera (1), registers (R), patches ((H/p)(W/p))]; patch_start_idx = 1 + R.
Camera/register token index 0 is used for the first frame of a stream and index 1 for every later frame.
Global attention is frame-causal in the causal forward (a frame sees itself fully and every earlier frame) and in
streaming (the KV cache holds the earlier frames); ``causal=False`` gives VGGT's full attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .layers import Block, PositionGetter, RotaryPositionEmbedding2D, build_patch_embed

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


def frame_causal_mask(S: int, P: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [S*P, S*P]: token of frame i may attend to token of frame j iff j <= i."""
    frame = torch.arange(S, device=device).repeat_interleave(P)
    return frame[:, None] >= frame[None, :]


class Aggregator(nn.Module):
    """images [B, S, 3, H, W] in [0, 1] -> (list of [B, S, P, 2C] per block pair, patch_start_idx)."""

    # the causal forward builds a bool [S*P, S*P] mask up to this size, and loops over frames beyond it
    causal_mask_max_elements: int = 1 << 24

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.depth = cfg.depth
        self.aa_block_size = cfg.aa_block_size
        self.aa_block_num = cfg.depth // cfg.aa_block_size
        self.aa_order = tuple(cfg.aa_order)
        self.patch_embed = build_patch_embed(
            cfg.patch_embed, cfg.img_size, cfg.patch_size, C, depth=cfg.patch_embed_depth, backend=cfg.attn_backend
        )
        self.rope = RotaryPositionEmbedding2D(frequency=cfg.rope_freq) if cfg.rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None

        def make_block() -> Block:
            return Block(
                C, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                ffn_bias=cfg.ffn_bias, init_values=cfg.init_values, qk_norm=cfg.qk_norm, rope=self.rope,
                backend=cfg.attn_backend,
            )

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, C))
        self.patch_start_idx = 1 + cfg.num_register_tokens
        if not self.camera_token.is_meta:
            nn.init.normal_(self.camera_token, std=1e-6)
            nn.init.normal_(self.register_token, std=1e-6)
        self.register_buffer("_resnet_mean", torch.tensor(_RESNET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_RESNET_STD).view(1, 1, 3, 1, 1), persistent=False)

    # -- pieces ------------------------------------------------------------------------------------------------
    def _embed(self, images: torch.Tensor, first_index: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, S, 3, H, W] in [0, 1]; first_index[s] in {0, 1} selects the special tokens of frame s.
        Returns tokens [B*S, P, C] and positions [B*S, P, 2] (or None without RoPE)."""
        B, S, C_in, H, W = images.shape
        if C_in != 3:
            raise ValueError(f"expected RGB images [B, S, 3, H, W], got {tuple(images.shape)}")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}")
        if not images.is_floating_point():
            raise TypeError("images must be floating point in [0, 1]")
        # ImageNet normalisation from the exact constants (the buffers may have been cast to bf16 with the model)
        mean = torch.tensor(_RESNET_MEAN, device=images.device, dtype=images.dtype).view(1, 1, 3, 1, 1)
        std = torch.tensor(_RESNET_STD, device=images.device, dtype=images.dtype).view(1, 1, 3, 1, 1)
        images = (images - mean) / std
        # run in the parameters' dtype (bf16 weights without autocast); under autocast, autocast decides
        pdtype = self.camera_token.dtype
        if not torch.is_autocast_enabled(images.device.type) and images.dtype != pdtype:
            images = images.to(pdtype)
        patch_tokens = self.patch_embed(images.reshape(B * S, C_in, H, W))
        if isinstance(patch_tokens, dict):
            patch_tokens = patch_tokens["x_norm_patchtokens"]
        idx = torch.as_tensor(first_index, device=images.device, dtype=torch.long)
        cam = self.camera_token[0, idx]  # [S, 1, C]
        reg = self.register_token[0, idx]  # [S, R, C]
        special = torch.cat([cam, reg], dim=1).unsqueeze(0).expand(B, -1, -1, -1)
        special = special.reshape(B * S, self.patch_start_idx, -1).to(patch_tokens.dtype)
        tokens = torch.cat([special, patch_tokens], dim=1)
        pos = None
        if self.rope is not None:
            pos = self.position_getter(B * S, H // p, W // p, device=images.device) + 1
            pos_special = torch.zeros(B * S, self.patch_start_idx, 2, device=images.device, dtype=pos.dtype)
            pos = torch.cat([pos_special, pos], dim=1)
        return tokens, pos

    # -- causal / full forward -----------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        causal: bool = True,
        keep_layers: Sequence[int] | None = None,
    ) -> tuple[list[torch.Tensor | None], int]:
        """images [B, S, 3, H, W] -> (outputs, patch_start_idx); outputs[i] is [B, S, P, 2C] for every block pair i
        (None for indices not in keep_layers, when given; negative indices allowed)."""
        B, S = images.shape[:2]
        first_index = [0] + [1] * (S - 1)
        tokens, pos = self._embed(images, first_index)
        P, C = tokens.shape[1:]
        mask, frame_causal = None, None
        if causal and S > 1:
            if (S * P) ** 2 <= self.causal_mask_max_elements:
                mask = frame_causal_mask(S, P, tokens.device)
            else:  # long sequences: attend frame by frame to the prefix instead of building an [SP, SP] mask
                frame_causal = P
        keep = self._keep_set(keep_layers)
        pos_g = pos.reshape(B, S * P, 2) if pos is not None else None
        outputs: list[torch.Tensor | None] = []
        fi = gi = 0
        for _ in range(self.aa_block_num):
            frame_inter: list[torch.Tensor] = []
            global_inter: list[torch.Tensor] = []
            for kind in self.aa_order:
                if kind == "frame":
                    tokens = tokens.reshape(B * S, P, C)
                    for _ in range(self.aa_block_size):
                        tokens = self.frame_blocks[fi](tokens, pos=pos)
                        fi += 1
                        frame_inter.append(tokens.reshape(B, S, P, C))
                else:
                    tokens = tokens.reshape(B, S * P, C)
                    for _ in range(self.aa_block_size):
                        tokens = self.global_blocks[gi](tokens, pos=pos_g, attn_mask=mask, frame_causal=frame_causal)
                        gi += 1
                        global_inter.append(tokens.reshape(B, S, P, C))
            for f, g in zip(frame_inter, global_inter):
                outputs.append(torch.cat([f, g], dim=-1) if len(outputs) in keep else None)
        return outputs, self.patch_start_idx

    # -- streaming -------------------------------------------------------------------------------------------------
    def step(
        self,
        image: torch.Tensor,
        kv_caches: Sequence,
        first: bool,
        keep_layers: Sequence[int] | None = None,
    ) -> tuple[list[torch.Tensor | None], int]:
        """One frame: image [B, 3, H, W] (or [B, 1, 3, H, W]); kv_caches[i] serves global block i.
        Returns outputs [B, 1, P, 2C] per block pair (None where not kept), patch_start_idx."""
        if image.ndim == 4:
            image = image.unsqueeze(1)
        if image.shape[1] != 1:
            raise ValueError("step() takes one frame per call")
        B = image.shape[0]
        tokens, pos = self._embed(image, [0 if first else 1])
        P, C = tokens.shape[1:]
        keep = self._keep_set(keep_layers)
        outputs: list[torch.Tensor | None] = []
        fi = gi = 0
        for _ in range(self.aa_block_num):
            frame_inter, global_inter = [], []
            for kind in self.aa_order:
                for _ in range(self.aa_block_size):
                    if kind == "frame":
                        tokens = self.frame_blocks[fi](tokens, pos=pos)
                        fi += 1
                        frame_inter.append(tokens)
                    else:
                        tokens = self.global_blocks[gi](tokens, pos=pos, kv_cache=kv_caches[gi])
                        gi += 1
                        global_inter.append(tokens)
            for f, g in zip(frame_inter, global_inter):
                outputs.append(torch.cat([f, g], dim=-1).reshape(B, 1, P, 2 * C) if len(outputs) in keep else None)
        return outputs, self.patch_start_idx

    def _keep_set(self, keep_layers: Sequence[int] | None) -> set[int]:
        n = self.aa_block_num
        if keep_layers is None:
            return set(range(n))
        return {i % n for i in keep_layers}
