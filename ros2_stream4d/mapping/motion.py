"""Velocity and uncertainty of the estimated motion, for nav_msgs/Odometry consumers (robot_localization, Nav2).

Twist: from two consecutive poses of the moving frame and their stamps, expressed in the moving (child) frame as
nav_msgs/Odometry requires: linear = R_k^T (t_k - t_{k-1}) / dt, angular = rotvec(R_{k-1}^T R_k) / dt.

Covariances (diagonal, [x y z roll pitch yaw] as in REP-103/robot_localization), from what the frame tells:
- position std  sigma_p = pose_sigma_per_m * median depth [m] * c_conf * (unscaled_sigma_factor if no valid
  metric scale): a monocular pose error grows with the scene's distance; without a metric scale the position is
  in model units and effectively unknown in metres;
- orientation std sigma_r = rotation_sigma * c_conf;
- confidence factor c_conf = 1 / (1 - 1 / median confidence), clipped to [1, 100]: the model's confidence is
  1 + exp(x) >= 1; a confident frame (c >> 1) gives c_conf ~ 1, an unsure one (c -> 1) a large factor;
- twist std = sqrt(2) * pose std / dt (the difference of two poses over the frame interval); the first frame of a
  stream has no velocity: its twist covariance is 1e6 on the diagonal ("unknown"), its twist zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_stream4d.mapping.conventions import rotation_vector

UNKNOWN_VARIANCE = 1e6
MAX_CONF_FACTOR = 100.0


@dataclass(frozen=True)
class MotionEstimate:
    linear: np.ndarray  # (3,) m/s (model units/s without a scale) in the child frame
    angular: np.ndarray  # (3,) rad/s in the child frame
    pose_covariance: np.ndarray  # (6, 6)
    twist_covariance: np.ndarray  # (6, 6)


def confidence_factor(median_confidence: float) -> float:
    c = float(median_confidence)
    if not np.isfinite(c) or c <= 1.0:
        return MAX_CONF_FACTOR
    return float(np.clip(1.0 / (1.0 - 1.0 / c), 1.0, MAX_CONF_FACTOR))


class MotionEstimator:
    """Keeps the previous pose of the moving frame; ``update`` gives twist and covariances for the next one."""

    def __init__(self, pose_sigma_per_m: float = 0.02, rotation_sigma: float = 0.01,
                 unscaled_sigma_factor: float = 1000.0):
        self.pose_sigma_per_m = pose_sigma_per_m
        self.rotation_sigma = rotation_sigma
        self.unscaled_sigma_factor = unscaled_sigma_factor
        self._last: tuple[int, np.ndarray] | None = None

    def reset(self) -> None:
        self._last = None

    def update(self, T: np.ndarray, stamp_ns: int, median_depth: float, median_confidence: float,
               scale_valid: bool) -> MotionEstimate:
        T = np.asarray(T, np.float64)
        c = confidence_factor(median_confidence)
        depth = float(median_depth) if np.isfinite(median_depth) and median_depth > 0 else 1.0
        sigma_p = self.pose_sigma_per_m * depth * c * (1.0 if scale_valid else self.unscaled_sigma_factor)
        sigma_r = self.rotation_sigma * c
        pose_cov = np.diag([sigma_p ** 2] * 3 + [sigma_r ** 2] * 3)
        linear = np.zeros(3)
        angular = np.zeros(3)
        twist_cov = np.eye(6) * UNKNOWN_VARIANCE
        if self._last is not None and stamp_ns > self._last[0]:
            dt = (stamp_ns - self._last[0]) * 1e-9
            T0 = self._last[1]
            linear = T[:3, :3].T @ (T[:3, 3] - T0[:3, 3]) / dt
            angular = rotation_vector(T0[:3, :3].T @ T[:3, :3]) / dt
            twist_cov = np.diag([2.0 * sigma_p ** 2 / dt ** 2] * 3 + [2.0 * sigma_r ** 2 / dt ** 2] * 3)
        self._last = (int(stamp_ns), T.copy())
        return MotionEstimate(linear, angular, pose_cov, twist_cov)
