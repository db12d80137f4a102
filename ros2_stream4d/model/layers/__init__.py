"""Transformer building blocks with the official (VGGT / DINOv2) parameter names."""

from .attention import BACKENDS, Attention, set_attention_backend
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import DINOV2_VARIANTS, DinoVisionTransformer, PatchEmbed, build_patch_embed
from .rope import PositionGetter, RotaryPositionEmbedding2D

__all__ = [
    "BACKENDS",
    "DINOV2_VARIANTS",
    "Attention",
    "Block",
    "DinoVisionTransformer",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "PositionGetter",
    "RotaryPositionEmbedding2D",
    "build_patch_embed",
    "set_attention_backend",
]
