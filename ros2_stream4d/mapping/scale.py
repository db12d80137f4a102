"""Metric scale for up-to-scale predictions: fixed, from a depth sensor, or from wheel/visual odometry.

Every source reports ``scale`` (metres per model unit; 1.0 until valid) and ``valid``. Apply it with
``FramePrediction.scaled(source.scale)``.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class FixedScale:
    def __init__(self, scale: float = 1.0):
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and positive, got {scale}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def valid(self) -> bool:
        return True

    def reset(self) -> None:
        pass


class _WindowedMedian:
    """Median over the last ``window`` per-update estimates: a robust smoother (one bad frame cannot move it)."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._samples: deque[float] = deque(maxlen=int(window))

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def valid(self) -> bool:
        return len(self._samples) > 0

    @property
    def scale(self) -> float:
        return float(np.median(self._samples)) if self._samples else 1.0

    def reset(self) -> None:
        self._samples.clear()


class DepthSensorScale(_WindowedMedian):
    """scale = median over pixels of sensor_depth / predicted_depth, then a median over the last ``window`` frames.

    Both depth maps must share one pixel geometry (resample one with PixelMapping first). Pixels where either is
    NaN/Inf/<= 0 or the sensor is outside [min_depth, max_depth] are ignored; a frame with fewer than
    ``min_pixels`` usable pixels is rejected (``update`` returns None).
    """

    def __init__(self, window: int = 15, min_pixels: int = 100, min_depth: float = 0.05, max_depth: float = 20.0):
        super().__init__(window)
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_pixels, self.min_depth, self.max_depth = int(min_pixels), float(min_depth), float(max_depth)

    def update(self, sensor_depth, predicted_depth, mask=None) -> float | None:
        sensor = np.asarray(sensor_depth, dtype=np.float64)
        pred = np.asarray(predicted_depth, dtype=np.float64)
        if sensor.shape != pred.shape:
            raise ValueError(f"sensor depth {sensor.shape} and predicted depth {pred.shape} differ in shape")
        with np.errstate(invalid="ignore"):
            ok = (np.isfinite(sensor) & np.isfinite(pred) & (pred > 0) & (sensor >= self.min_depth)
                  & (sensor <= self.max_depth))
        if mask is not None:
            ok &= np.asarray(mask, dtype=bool)
        if ok.sum() < self.min_pixels:
            return None
        ratio = float(np.median(sensor[ok] / pred[ok]))
        if not (np.isfinite(ratio) and ratio > 0):
            return None
        self._samples.append(ratio)
        return ratio


class OdometryScale(_WindowedMedian):
    """scale = median over recent motions of |camera translation in odom| / |camera translation predicted|.

    ``update(T_odom_base, T_world_cam)`` is called once per frame with odom->base_link at the image's stamp and the
    predicted world-from-camera pose. A motion is measured from the last accepted pose pair and accepted once the
    odometry translation exceeds ``min_motion`` metres (short motions are dominated by noise). With
    ``T_base_cam`` given, the camera's own motion in odom is used, so rotating in place (which moves an offset
    camera) is handled; distances are frame-independent, so no axis convention is involved.
    """

    def __init__(self, min_motion: float = 0.1, window: int = 20, T_base_cam=None, min_predicted: float = 1e-6):
        super().__init__(window)
        if min_motion <= 0:
            raise ValueError(f"min_motion must be > 0, got {min_motion}")
        self.min_motion, self.min_predicted = float(min_motion), float(min_predicted)
        self.T_base_cam = None if T_base_cam is None else _pose(T_base_cam, "T_base_cam")
        self._ref: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        super().reset()
        self._ref = None

    def update(self, T_odom_base, T_world_cam) -> float | None:
        T_odom = _pose(T_odom_base, "T_odom_base")
        if self.T_base_cam is not None:
            T_odom = T_odom @ self.T_base_cam
        p_odom, p_pred = T_odom[:3, 3], _pose(T_world_cam, "T_world_cam")[:3, 3]
        if self._ref is None:
            self._ref = (p_odom, p_pred)
            return None
        d_odom = float(np.linalg.norm(p_odom - self._ref[0]))
        d_pred = float(np.linalg.norm(p_pred - self._ref[1]))
        if d_odom < self.min_motion:
            return None
        self._ref = (p_odom, p_pred)
        if d_pred < self.min_predicted:  # the model saw no motion: no usable ratio
            return None
        ratio = d_odom / d_pred
        self._samples.append(ratio)
        return ratio


def _pose(T, name) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"{name} must be a finite 4x4 transform, got shape {T.shape}")
    return T


def make_scale_source(kind: str, **kwargs):
    """'none' | 'fixed' | 'depth' | 'odometry' -> a scale source (the node's ``scale_source`` parameter)."""
    kinds = {"none": lambda: FixedScale(1.0), "fixed": lambda: FixedScale(**kwargs),
             "depth": lambda: DepthSensorScale(**kwargs), "odometry": lambda: OdometryScale(**kwargs)}
    if kind not in kinds:
        raise ValueError(f"scale source must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind]()
