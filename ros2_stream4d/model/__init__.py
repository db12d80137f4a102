"""The streaming visual-geometry transformer (torch only; never imports rclpy).

    from ros2_stream4d.model import ModelConfig, StreamVGGT
    model = StreamVGGT(ModelConfig())          # the official 1.2B StreamVGGT
    out = model(images)                        # causal forward, images [B, S, 3, H, W] in [0, 1]
    session = model.stream(window=None, anchors=1)
    frame_out = session.step(image)            # image [B, 3, H, W]
    model, report = load_checkpoint("checkpoints.pth")   # config inferred from the file, strict
"""

from .checkpoint import CheckpointError, LoadReport, infer_config, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .hub import CheckpointNotAvailable, load_pretrained, resolve_checkpoint
from .kv_cache import CacheStats, RollingKVCache, StreamCache
from .streamvggt import OUTPUT_KEYS, StreamSession, StreamVGGT

__all__ = [
    "OUTPUT_KEYS",
    "CacheStats",
    "CheckpointError",
    "CheckpointNotAvailable",
    "LoadReport",
    "ModelConfig",
    "RollingKVCache",
    "StreamCache",
    "StreamSession",
    "StreamVGGT",
    "infer_config",
    "load_checkpoint",
    "load_pretrained",
    "resolve_checkpoint",
    "save_checkpoint",
]
