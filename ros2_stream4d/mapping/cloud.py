"""Per-frame coloured point cloud from a FramePrediction (vectorised; no per-point Python)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_stream4d.mapping.conventions import transform_points
from ros2_stream4d.mapping.reconstructor import FramePrediction

FRAMES = ("world", "camera")


@dataclass(frozen=True)
class CloudOptions:
    conf_threshold: float | None = None  # keep conf >= this (absolute; VGGT confidences are >= 1)
    conf_percentile: float | None = None  # keep conf >= this percentile (0-100) of the frame's valid pixels
    stride: int = 1  # take every stride-th pixel in both directions
    max_points: int | None = None  # random (seeded, reproducible) subsample down to this
    frame: str = "world"  # "world" (model world) | "camera" (camera optical frame)
    max_depth: float | None = None  # drop points farther than this along the optical axis
    seed: int = 0

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.conf_percentile is not None and not 0 <= self.conf_percentile <= 100:
            raise ValueError(f"conf_percentile must be in [0, 100], got {self.conf_percentile}")
        if self.max_points is not None and self.max_points < 0:
            raise ValueError(f"max_points must be >= 0, got {self.max_points}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")


def frame_cloud(pred: FramePrediction, options: CloudOptions | None = None, **overrides):
    """(xyz float32 (N, 3), rgb uint8 (N, 3), conf float32 (N,)) of the prediction's valid, confident pixels.

    Pixels on padding, with non-finite/non-positive depth or non-finite points are always dropped.
    """
    if options is not None and overrides:
        raise TypeError("pass either options or keyword overrides, not both")
    opt = options or CloudOptions(**overrides)
    s = opt.stride
    valid = pred.valid_mask()[::s, ::s]
    conf = pred.points_conf[::s, ::s]
    valid &= np.isfinite(conf)
    if opt.max_depth is not None:
        valid &= pred.depth[::s, ::s] <= opt.max_depth
    if opt.conf_threshold is not None:
        valid &= conf >= opt.conf_threshold
    if opt.conf_percentile is not None and valid.any():
        valid &= conf >= np.percentile(conf[valid], opt.conf_percentile)
    idx = np.flatnonzero(valid)
    if opt.max_points is not None and idx.size > opt.max_points:
        idx = np.sort(np.random.default_rng(opt.seed).choice(idx, opt.max_points, replace=False))
    xyz = pred.points_world[::s, ::s].reshape(-1, 3)[idx]
    if opt.frame == "camera":
        xyz = transform_points(pred.T_cam_world, xyz)
    rgb = pred.rgb_model[::s, ::s].reshape(-1, 3)[idx]
    return np.ascontiguousarray(xyz, np.float32), np.ascontiguousarray(rgb, np.uint8), conf.reshape(-1)[idx].astype(
        np.float32
    )
