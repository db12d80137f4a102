"""Prediction heads of the StreamVGGT-compatible model (parameter names follow the official state dict).

- CameraHead: iterative absT_quaR_FoV pose refinement from the camera tokens (frame-causal trunk, per-iteration
  KV caches for streaming).
- DPTHead: dense depth / point-map head (and the track head's feature extractor with feature_only=True).
- TrackHead: feature-only DPT + CoTracker-style point tracker.
"""

from .camera_head import CameraHead
from .dpt_head import DPTHead
from .head_act import activate_head, activate_pose, inverse_log_transform
from .track_head import TrackHead

__all__ = ["CameraHead", "DPTHead", "TrackHead", "activate_head", "activate_pose", "inverse_log_transform"]
