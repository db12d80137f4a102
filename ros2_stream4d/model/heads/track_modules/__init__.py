"""CoTracker-style tracker modules of the track head (parameter names follow the official state dict)."""

from .base_track_predictor import BaseTrackerPredictor
from .blocks import CorrBlock, EfficientUpdateFormer
from .modules import AttnBlock, CrossAttnBlock, Mlp

__all__ = ["AttnBlock", "BaseTrackerPredictor", "CorrBlock", "CrossAttnBlock", "EfficientUpdateFormer", "Mlp"]
