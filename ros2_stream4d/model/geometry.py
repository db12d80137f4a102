"""Camera geometry of the StreamVGGT outputs (torch, any leading batch dimensions).

Conventions (the reference model's):
- Quaternions are (x, y, z, w), scalar last. quat_to_mat accepts unnormalised quaternions (it divides by |q|^2).
- A pose encoding "absT_quaR_FoV" is 9 numbers: translation t (3), quaternion q (4), fov_h, fov_w (radians).
- Extrinsics [R | t] (3x4) map world to camera (camera-from-world), OpenCV axes: x right, y down, z forward.
  The world frame of a stream is the first frame's camera.
- Intrinsics: fy = (H/2) / tan(fov_h/2), fx = (W/2) / tan(fov_w/2), cx = W/2, cy = H/2 (pixels).
- Depth is z-depth. Unprojection uses integer pixel coordinates u = 0..W-1, v = 0..H-1 (no +0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "camera_to_world",
    "closed_form_inverse_se3",
    "depth_to_cam_coords_points",
    "depth_to_world_coords_points",
    "extri_intri_to_pose_encoding",
    "extrinsics_to_4x4",
    "intrinsics_from_fov",
    "mat_to_quat",
    "pose_encoding_to_extri_intri",
    "quat_to_mat",
    "standardize_quaternion",
    "unproject_depth_map_to_point_map",
]


# ----------------------------------------------------------------------------------------------------- rotations
def quat_to_mat(quaternions: torch.Tensor) -> torch.Tensor:
    """(x, y, z, w) quaternions [..., 4] (need not be unit) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = torch.unbind(quaternions, -1)
    two_s = 2.0 / (quaternions * quaternions).sum(-1)
    m = torch.stack(
        (
            1 - two_s * (y * y + z * z),
            two_s * (x * y - z * w),
            two_s * (x * z + y * w),
            two_s * (x * y + z * w),
            1 - two_s * (x * x + z * z),
            two_s * (y * z - x * w),
            two_s * (x * z - y * w),
            two_s * (y * z + x * w),
            1 - two_s * (x * x + y * y),
        ),
        -1,
    )
    return m.reshape(quaternions.shape[:-1] + (3, 3))


def standardize_quaternion(quaternions: torch.Tensor) -> torch.Tensor:
    """Flip the sign of (x, y, z, w) quaternions with w < 0 (q and -q are the same rotation)."""
    return torch.where(quaternions[..., 3:4] < 0, -quaternions, quaternions)


def _sqrt_positive_part(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with a zero (not NaN) gradient where x <= 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit (x, y, z, w) quaternions [..., 4] with w >= 0.

    Numerically robust: of the four algebraically equivalent formulas (each divides by one of 4w^2, 4x^2, 4y^2, 4z^2)
    the best-conditioned one is used.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected [..., 3, 3] rotation matrices, got {tuple(matrix.shape)}")
    batch = matrix.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(matrix.reshape(batch + (9,)), dim=-1)
    # |w|, |x|, |y|, |z| times 2
    q_abs = _sqrt_positive_part(
        torch.stack(
            [
                1.0 + m00 + m11 + m22,
                1.0 + m00 - m11 - m22,
                1.0 - m00 + m11 - m22,
                1.0 - m00 - m11 + m22,
            ],
            dim=-1,
        )
    )
    # row k: the quaternion (w, x, y, z) multiplied by 4 * (w, x, y, z)[k]
    cand = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    )
    floor = torch.tensor(0.1, dtype=q_abs.dtype, device=q_abs.device)
    cand = cand / (2.0 * q_abs[..., None].maximum(floor))
    best = q_abs.argmax(dim=-1)  # [...]
    wxyz = torch.gather(cand, -2, best[..., None, None].expand(batch + (1, 4))).squeeze(-2)
    return standardize_quaternion(wxyz[..., [1, 2, 3, 0]])


# ------------------------------------------------------------------------------------------------ pose encoding
def intrinsics_from_fov(
    fov_h: torch.Tensor, fov_w: torch.Tensor, image_size_hw: Sequence[int] | Sequence[float]
) -> torch.Tensor:
    """Pinhole intrinsics [..., 3, 3] with the principal point at the image centre."""
    H, W = float(image_size_hw[0]), float(image_size_hw[1])
    fy = (H / 2.0) / torch.tan(fov_h / 2.0)
    fx = (W / 2.0) / torch.tan(fov_w / 2.0)
    K = torch.zeros(fov_h.shape + (3, 3), dtype=fov_h.dtype, device=fov_h.device)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = W / 2.0
    K[..., 1, 2] = H / 2.0
    K[..., 2, 2] = 1.0
    return K


def pose_encoding_to_extri_intri(
    pose_encoding: torch.Tensor,
    image_size_hw: Sequence[int] | None = None,
    pose_encoding_type: str = "absT_quaR_FoV",
    build_intrinsics: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pose encoding [..., 9] -> (extrinsics [..., 3, 4] camera-from-world, intrinsics [..., 3, 3] or None).

    image_size_hw = (H, W) in pixels is needed for the intrinsics.
    """
    if pose_encoding_type != "absT_quaR_FoV":
        raise NotImplementedError(f"pose encoding {pose_encoding_type!r}")
    if pose_encoding.shape[-1] != 9:
        raise ValueError(f"expected [..., 9] pose encodings, got {tuple(pose_encoding.shape)}")
    t = pose_encoding[..., :3]
    q = pose_encoding[..., 3:7]
    extrinsics = torch.cat([quat_to_mat(q), t[..., None]], dim=-1)
    intrinsics = None
    if build_intrinsics:
        if image_size_hw is None:
            raise ValueError("image_size_hw (H, W) is needed to build intrinsics")
        intrinsics = intrinsics_from_fov(pose_encoding[..., 7], pose_encoding[..., 8], image_size_hw)
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(
    extrinsics: torch.Tensor,
    intrinsics: torch.Tensor,
    image_size_hw: Sequence[int],
    pose_encoding_type: str = "absT_quaR_FoV",
) -> torch.Tensor:
    """(extrinsics [..., 3, 4] (or 4x4) camera-from-world, intrinsics [..., 3, 3]) -> pose encoding [..., 9].

    The inverse of pose_encoding_to_extri_intri (for intrinsics with a centred principal point; the quaternion comes
    back unit-norm with w >= 0). Keeps the input dtype.
    """
    if pose_encoding_type != "absT_quaR_FoV":
        raise NotImplementedError(f"pose encoding {pose_encoding_type!r}")
    R = extrinsics[..., :3, :3]
    t = extrinsics[..., :3, 3]
    H, W = float(image_size_hw[0]), float(image_size_hw[1])
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat([t, mat_to_quat(R), fov_h[..., None], fov_w[..., None]], dim=-1)


# --------------------------------------------------------------------------------------------------------- SE(3)
def extrinsics_to_4x4(extrinsics: torch.Tensor) -> torch.Tensor:
    """[..., 3, 4] (or [..., 4, 4]) -> homogeneous [..., 4, 4]."""
    if extrinsics.shape[-2:] == (4, 4):
        return extrinsics
    if extrinsics.shape[-2:] != (3, 4):
        raise ValueError(f"expected [..., 3, 4] or [..., 4, 4], got {tuple(extrinsics.shape)}")
    bottom = torch.zeros(extrinsics.shape[:-2] + (1, 4), dtype=extrinsics.dtype, device=extrinsics.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([extrinsics, bottom], dim=-2)


def closed_form_inverse_se3(
    se3: torch.Tensor, R: torch.Tensor | None = None, T: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4] or [..., 3, 4] -> [..., 4, 4]: [R^T | -R^T t].

    R [..., 3, 3] and T [..., 3, 1] may be given to skip extracting them from se3.
    """
    if se3.shape[-2:] not in ((4, 4), (3, 4)):
        raise ValueError(f"expected [..., 4, 4] or [..., 3, 4], got {tuple(se3.shape)}")
    if R is None:
        R = se3[..., :3, :3]
    if T is None:
        T = se3[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -(Rt @ T)], dim=-1)
    return extrinsics_to_4x4(top)


def camera_to_world(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera poses [..., 4, 4] (world-from-camera) from camera-from-world extrinsics [..., 3, 4] or [..., 4, 4]."""
    return closed_form_inverse_se3(extrinsics)


# --------------------------------------------------------------------------------------------------- unprojection
def depth_to_cam_coords_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """z-depth [..., H, W] -> camera-frame points [..., H, W, 3] at integer pixel coordinates (u, v)."""
    H, W = depth.shape[-2:]
    fx = intrinsics[..., 0, 0][..., None, None]
    fy = intrinsics[..., 1, 1][..., None, None]
    cx = intrinsics[..., 0, 2][..., None, None]
    cy = intrinsics[..., 1, 2][..., None, None]
    u = torch.arange(W, dtype=depth.dtype, device=depth.device)[None, :]
    v = torch.arange(H, dtype=depth.dtype, device=depth.device)[:, None]
    x = (u - cx) * depth / fx
    y = (v - cy) * depth / fy
    x, y, z = torch.broadcast_tensors(x, y, depth)
    return torch.stack([x, y, z], dim=-1)


def _squeeze_depth(depth: torch.Tensor, n_batch: int) -> torch.Tensor:
    """Accept depth [..., H, W] or [..., H, W, 1] with n_batch leading dims."""
    if depth.dim() == n_batch + 3 and depth.shape[-1] == 1:
        return depth[..., 0]
    if depth.dim() == n_batch + 2:
        return depth
    raise ValueError(
        f"depth of shape {tuple(depth.shape)} does not match {n_batch} batch dims ([..., H, W] or [..., H, W, 1])"
    )


def depth_to_world_coords_points(
    depth: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z-depth [..., H, W(, 1)] -> (world points [..., H, W, 3], camera points [..., H, W, 3], valid [..., H, W]).

    extrinsics [..., 3, 4] camera-from-world, intrinsics [..., 3, 3]; valid = depth > eps.
    """
    depth = _squeeze_depth(depth, extrinsics.dim() - 2)
    cam = depth_to_cam_coords_points(depth, intrinsics)
    c2w = closed_form_inverse_se3(extrinsics)
    R = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    t = c2w[..., None, None, :3, 3]
    world = (R @ cam[..., None])[..., 0] + t
    return world, cam, depth > eps


def unproject_depth_map_to_point_map(
    depth: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> torch.Tensor:
    """z-depth [..., H, W] or [..., H, W, 1] -> world points [..., H, W, 3].

    extrinsics [..., 3, 4] (camera-from-world), intrinsics [..., 3, 3]; batch dims broadcast. Pixel (u, v) at
    integer coordinates: X_cam = ((u - cx) d / fx, (v - cy) d / fy, d), X_world = R^T (X_cam - t).
    """
    return depth_to_world_coords_points(depth, extrinsics, intrinsics)[0]
