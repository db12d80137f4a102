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


# ------------------------------------------------------------------------------------------------ rotations
# The project's one home for rotation maths (numpy, float64, any leading batch dimensions). Quaternions are
# (x, y, z, w), scalar last, as in ROS messages; rotation vectors are axis * angle in radians. The model's torch
# versions (model/geometry.py) work on tensors inside the network and stay there.

# Shepperd's method as tables over the row-major entries m0..m8 of R. Pivot k (w, x, y, z) has
# four_sq[k] = 1 + D[k] . (m0, m4, m8) (= 4 w^2, 4 x^2, 4 y^2, 4 z^2); row k of the candidates is (x, y, z, w) times
# 4 (w, x, y, z)[k]: m[A] + S * m[B] off the pivot (e.g. 4wx = m7 - m5, 4xy = m1 + m3), four_sq[k] at it (PIVOT).
_SHEPPERD_D = np.array([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
_SHEPPERD_A = np.array([[7, 2, 3, 0], [0, 1, 2, 7], [1, 0, 5, 2], [2, 5, 0, 3]])
_SHEPPERD_B = np.array([[5, 6, 1, 0], [0, 3, 6, 5], [3, 0, 7, 6], [6, 7, 0, 1]])
_SHEPPERD_S = np.array([[-1.0, -1, -1, 0], [0, 1, 1, -1], [1, 0, 1, -1], [1, 1, 0, -1]])
_SHEPPERD_PIVOT = np.array([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], bool)


def quaternion_from_matrix(R) -> np.ndarray:
    """Rotations [..., 3, 3] (or the top-left of [..., 4, 4]) -> unit quaternions [..., 4] (x, y, z, w), w >= 0.

    Shepperd's method: per rotation, the largest of 4w^2, 4x^2, 4y^2, 4z^2 is the pivot (numerically stable)."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim < 2 or R.shape[-2:] not in ((3, 3), (4, 4)):
        raise ValueError(f"expected [..., 3, 3] rotations, got {R.shape}")
    m = R[..., :3, :3].reshape(R.shape[:-2] + (9,))
    four_sq = 1.0 + m[..., [0, 4, 8]] @ _SHEPPERD_D.T
    cand = np.where(_SHEPPERD_PIVOT, four_sq[..., :, None], m[..., _SHEPPERD_A] + _SHEPPERD_S * m[..., _SHEPPERD_B])
    k = np.argmax(four_sq, axis=-1)[..., None]
    q = np.take_along_axis(cand, k[..., None], -2)[..., 0, :] / (2.0 * np.sqrt(np.take_along_axis(four_sq, k, -1)))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., 3:] < 0, -q, q)


def matrix_from_quaternion(q) -> np.ndarray:
    """Quaternions [..., 4] (x, y, z, w), normalised here -> rotations [..., 3, 3]. ValueError for a zero or
    non-finite quaternion."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim < 1 or q.shape[-1] != 4:
        raise ValueError(f"q must have a trailing dimension of 4, got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("q contains NaN or Inf")
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n < 1e-12):
        raise ValueError("quaternion has zero norm")
    x, y, z, w = np.moveaxis(q / n, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rot_x(angle) -> np.ndarray:
    """Rotations [..., 3, 3] about the x axis by angles [...] (rad, right-handed)."""
    c, s = np.cos(angle), np.sin(angle)
    return _stack3([[1, 0, 0], [0, c, -s], [0, s, c]], angle)


def rot_y(angle) -> np.ndarray:
    """Rotations [..., 3, 3] about the y axis by angles [...] (rad, right-handed)."""
    c, s = np.cos(angle), np.sin(angle)
    return _stack3([[c, 0, s], [0, 1, 0], [-s, 0, c]], angle)


def rot_z(angle) -> np.ndarray:
    """Rotations [..., 3, 3] about the z axis by angles [...] (rad, right-handed; yaw in REP-103 body frames)."""
    c, s = np.cos(angle), np.sin(angle)
    return _stack3([[c, -s, 0], [s, c, 0], [0, 0, 1]], angle)


def _stack3(rows, like) -> np.ndarray:
    """(..., 3, 3) from nested rows whose entries are scalars or arrays shaped like `like`."""
    like = np.asarray(like, np.float64)
    return np.stack([np.stack([np.broadcast_to(np.asarray(e, np.float64), like.shape) for e in r], -1)
                     for r in rows], -2)


def rotation_from_vector(rotvec) -> np.ndarray:
    """Rotation vectors [..., 3] (axis * angle, rad) -> rotations [..., 3, 3].

    Rodrigues as R = I + a [v]x + b [v]x^2 with a = sin(t)/t, b = (1 - cos(t))/t^2, their series below 1e-4 rad,
    so tiny rotations stay exact (a 1e-12 rad rotation is not rounded to the identity)."""
    v = np.asarray(rotvec, dtype=np.float64)
    if v.ndim < 1 or v.shape[-1] != 3:
        raise ValueError(f"rotation vectors must have a trailing dimension of 3, got {v.shape}")
    t = np.linalg.norm(v, axis=-1)[..., None, None]
    small = t < 1e-4
    safe = np.where(small, 1.0, t)
    a = np.where(small, 1.0 - t * t / 6.0, np.sin(safe) / safe)
    b = np.where(small, 0.5 - t * t / 24.0, (1.0 - np.cos(safe)) / (safe * safe))
    K = np.zeros(v.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    K[..., 1, 0], K[..., 2, 0], K[..., 2, 1] = v[..., 2], -v[..., 1], v[..., 0]
    return np.eye(3) + a * K + b * (K @ K)


def rotation_vector(R) -> np.ndarray:
    """Rotations [..., 3, 3] -> rotation vectors [..., 3] (axis * angle, angle in [0, pi]).

    Through the unit quaternion: angle = 2 atan2(|xyz|, w), accurate near 0 and near pi alike."""
    q = quaternion_from_matrix(R)
    xyz, w = q[..., :3], q[..., 3:]
    n = np.linalg.norm(xyz, axis=-1, keepdims=True)
    small = n < 1e-12
    # small angles: angle / sin(angle / 2) -> 2 / w (w ~ 1)
    scale = np.where(small, 2.0 / np.maximum(w, 1e-300), 2.0 * np.arctan2(n, w) / np.where(small, 1.0, n))
    return xyz * scale


def rotation_angle(R) -> np.ndarray:
    """Rotations [..., 3, 3] -> angles [...] in radians, in [0, pi] (atan2 form: accurate for small and large
    angles alike)."""
    R = np.asarray(R, dtype=np.float64)
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    v = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.arctan2(0.5 * np.linalg.norm(v, axis=-1), c)


def rotation_angle_deg(R) -> float:
    """The angle of one rotation (3x3, or the rotation of a 4x4 transform) in degrees, in [0, 180]."""
    return float(np.degrees(rotation_angle(np.asarray(R, np.float64)[:3, :3])))


def slerp(q0, q1, w: float) -> np.ndarray:
    """Spherical interpolation between unit quaternions (x, y, z, w) at weight w in [0, 1], the short way."""
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    dot = float(np.dot(q0, q1))
    if dot < 0:
        q1, dot = -q1, -dot
    angle = np.arccos(min(dot, 1.0))
    if angle < 1e-9:
        return q0.copy()
    return (np.sin((1.0 - w) * angle) * q0 + np.sin(w * angle) * q1) / np.sin(angle)


def interpolate_transform(T0, T1, w: float) -> np.ndarray:
    """Rigid 4x4 transform between T0 (w = 0) and T1 (w = 1): translation linear, rotation slerp."""
    T0, T1 = _as(T0, (4, 4), "T0"), _as(T1, (4, 4), "T1")
    out = np.eye(4)
    out[:3, :3] = matrix_from_quaternion(slerp(quaternion_from_matrix(T0), quaternion_from_matrix(T1), w))
    out[:3, 3] = (1.0 - w) * T0[:3, 3] + w * T1[:3, 3]
    return out


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
