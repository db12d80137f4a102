"""Frame conventions between the model world and ROS (REP-103 / REP-105), as 4x4 float64 homogeneous matrices.

Naming: ``T_a_b`` maps coordinates expressed in frame b into frame a (p_a = T_a_b @ p_b), i.e. it is the pose of
b in a; TF publishes it as parent a -> child b.

- Model world = the first camera's OPTICAL frame (x right, y down, z forward).
- ROS body frames (base_link, camera_link, map for a camera-only setup): x forward, y left, z up.
- Camera-only setup: ``map`` is the model world rotated to the body convention (T_MAP_WORLD).
- Robot setup: ``map`` is base_link at the first frame. With the static base->camera transform T_base_cam (camera =
  optical frame) and the predicted T_world_cam (scaled to metres first!), T_map_cam = T_base_cam @ T_world_cam, and
  T_map_base = T_map_cam @ inv(T_base_cam).
"""

from __future__ import annotations

import numpy as np

# Columns are the optical axes expressed in the body frame: optical z (forward) = body x, optical x (right) =
# body -y, optical y (down) = body -z.
R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _as(a, shape, name) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def make_transform(R=None, t=None) -> np.ndarray:
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = _as(R, (3, 3), "R")
    if t is not None:
        T[:3, 3] = _as(t, (3,), "t")
    return T


T_BODY_OPTICAL = make_transform(R_BODY_OPTICAL)
# The map frame of a camera-only setup, with the model world as child.
T_MAP_WORLD = T_BODY_OPTICAL


def inverse(T) -> np.ndarray:
    """Closed-form inverse of a rigid 4x4 transform (or a stack [..., 4, 4])."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape[-2:] != (4, 4):
        raise ValueError(f"expected [..., 4, 4] transforms, got {T.shape}")
    R, t = T[..., :3, :3], T[..., :3, 3]
    out = np.zeros_like(T)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def transform_points(T, xyz) -> np.ndarray:
    """Apply a 4x4 transform to (..., 3) points (float64 maths, result in the input's float dtype)."""
    T = _as(T, (4, 4), "T")
    xyz = np.asarray(xyz)
    if xyz.shape[-1] != 3:
        raise ValueError(f"points must have a trailing dimension of 3, got {xyz.shape}")
    out = xyz.astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    return out.astype(xyz.dtype if np.issubdtype(xyz.dtype, np.floating) else np.float64)


def extrinsic_to_pose(extrinsic) -> np.ndarray:
    """Camera-from-world [R|t] (3x4 or 4x4, OpenCV) -> world-from-camera 4x4 (T_world_cam)."""
    E = np.asarray(extrinsic, dtype=np.float64)
    if E.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"extrinsic must be 3x4 or 4x4, got {E.shape}")
    return inverse(make_transform(E[:3, :3], E[:3, 3]))


def camera_only_map_cam(T_world_cam) -> np.ndarray:
    """Pose of the camera optical frame in ``map`` for a camera-only setup."""
    return T_MAP_WORLD @ _as(T_world_cam, (4, 4), "T_world_cam")


def robot_map_base(T_world_cam, T_base_cam) -> tuple[np.ndarray, np.ndarray]:
    """(T_map_cam, T_map_base) where map = base_link at the first frame. Both inputs in metres."""
    T_base_cam = _as(T_base_cam, (4, 4), "T_base_cam")
    T_map_cam = T_base_cam @ _as(T_world_cam, (4, 4), "T_world_cam")
    return T_map_cam, T_map_cam @ inverse(T_base_cam)


def map_to_odom(T_map_base, T_odom_base) -> np.ndarray:
    """T_map_odom such that T_map_odom @ T_odom_base = T_map_base (what to publish when odom->base exists)."""
    return _as(T_map_base, (4, 4), "T_map_base") @ inverse(_as(T_odom_base, (4, 4), "T_odom_base"))


def quaternion_from_matrix(R) -> np.ndarray:
    """Rotation matrix (3x3 or the top-left of 4x4) -> unit quaternion (x, y, z, w), w >= 0 (ROS order)."""
    R = np.asarray(R, dtype=np.float64)[:3, :3]
    if R.shape != (3, 3):
        raise ValueError(f"expected a 3x3 rotation, got {R.shape}")
    # Shepperd's method: pick the largest of w, x, y, z as the pivot for numerical stability.
    tr = np.trace(R)
    d = np.array([tr, R[0, 0], R[1, 1], R[2, 2]])
    i = int(np.argmax(d))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def matrix_from_quaternion(q) -> np.ndarray:
    """Quaternion (x, y, z, w), normalised here -> 3x3 rotation."""
    q = _as(q, (4,), "q")
    n = np.linalg.norm(q)
    if n < 1e-12:
        raise ValueError("quaternion has zero norm")
    x, y, z, w = q / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def pixel_rays(hw: tuple[int, int], K) -> np.ndarray:
    """(h, w, 3) camera-frame rays K^-1 [u, v, 1] through integer pixel coordinates (pixel centres), z = 1."""
    K = _as(K, (3, 3), "K")
    h, w = hw
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    uv1 = np.stack([uu, vv, np.ones((h, w))], -1)
    rays = uv1 @ np.linalg.inv(K).T
    rays /= rays[..., 2:3]  # a K whose last row is not [0, 0, 1] is normalised back to z = 1
    return rays


def unproject_depth(depth, K, T_world_cam=None) -> np.ndarray:
    """z-depth (h, w) -> (h, w, 3) float32 points in the camera frame, or in the world frame when T_world_cam is
    given. Non-finite depths give non-finite points."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (h, w), got {depth.shape}")
    pts = pixel_rays(depth.shape, K) * depth[..., None].astype(np.float64)
    if T_world_cam is not None:
        pts = transform_points(T_world_cam, pts)
    return pts.astype(np.float32)
