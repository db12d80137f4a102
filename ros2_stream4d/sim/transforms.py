"""Small numpy helpers for rigid transforms and quaternions (x, y, z, w: scalar last, as in ROS messages)."""

from __future__ import annotations

import numpy as np

from ros2_stream4d.mapping.conventions import inverse as inv_se3  # noqa: F401  (one rigid inverse for the project)


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions xyzw (normalised here) -> (..., 3, 3) rotation matrices."""
    q = np.asarray(q, np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions xyzw with w >= 0 (numerically stable branch)."""
    R = np.asarray(R, np.float64)
    m = R.reshape(-1, 3, 3)
    tr = np.trace(m, axis1=1, axis2=2)
    # candidates for 4*q_i^2 - 1 .. pick the largest diagonal term for stability
    diag = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], 1)
    k = np.argmax(diag, axis=1)
    q = np.empty((len(m), 4))
    for case in range(4):
        s = k == case
        if not np.any(s):
            continue
        a = m[s]
        if case == 0:
            r = np.sqrt(1.0 + tr[s]) * 2
            q[s] = np.stack([(a[:, 2, 1] - a[:, 1, 2]) / r, (a[:, 0, 2] - a[:, 2, 0]) / r,
                             (a[:, 1, 0] - a[:, 0, 1]) / r, 0.25 * r], 1)
        elif case == 1:
            r = np.sqrt(1.0 + a[:, 0, 0] - a[:, 1, 1] - a[:, 2, 2]) * 2
            q[s] = np.stack([0.25 * r, (a[:, 0, 1] + a[:, 1, 0]) / r, (a[:, 0, 2] + a[:, 2, 0]) / r,
                             (a[:, 2, 1] - a[:, 1, 2]) / r], 1)
        elif case == 2:
            r = np.sqrt(1.0 + a[:, 1, 1] - a[:, 0, 0] - a[:, 2, 2]) * 2
            q[s] = np.stack([(a[:, 0, 1] + a[:, 1, 0]) / r, 0.25 * r, (a[:, 1, 2] + a[:, 2, 1]) / r,
                             (a[:, 0, 2] - a[:, 2, 0]) / r], 1)
        else:
            r = np.sqrt(1.0 + a[:, 2, 2] - a[:, 0, 0] - a[:, 1, 1]) * 2
            q[s] = np.stack([(a[:, 0, 2] + a[:, 2, 0]) / r, (a[:, 1, 2] + a[:, 2, 1]) / r, 0.25 * r,
                             (a[:, 1, 0] - a[:, 0, 1]) / r], 1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 3] < 0] *= -1
    return q.reshape(R.shape[:-2] + (4,))


def so3_exp(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors (axis * angle, rad) -> (..., 3, 3) rotation matrices (Rodrigues)."""
    v = np.asarray(rotvec, np.float64)
    theta = np.linalg.norm(v, axis=-1, keepdims=True)
    safe = np.where(theta > 1e-12, theta, 1.0)
    k = v / safe
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = k[..., 2], -k[..., 1], k[..., 0]
    th = theta[..., None]
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * (K @ K)


def rotation_angle(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (...,) rotation angles in radians, in [0, pi]."""
    R = np.asarray(R, np.float64)
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    v = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.arctan2(0.5 * np.linalg.norm(v, axis=-1), c)  # accurate for small and large angles alike
