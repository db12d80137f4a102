"""Camera geometry: quaternion/matrix round trips, pose encoding <-> extrinsics/intrinsics, SE(3) inverse, and depth
unprojection (a known camera, a tilted plane seen by a posed camera, broadcasting over batch dimensions)."""

from __future__ import annotations

import math

import pytest
import torch

from ros2_stream4d.model.geometry import (
    camera_to_world,
    closed_form_inverse_se3,
    depth_to_world_coords_points,
    extri_intri_to_pose_encoding,
    extrinsics_to_4x4,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    standardize_quaternion,
    unproject_depth_map_to_point_map,
)

D = torch.float64


def _rand_quat(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, 4, generator=g, dtype=D)
    return q / q.norm(dim=-1, keepdim=True)


def _rand_pose_enc(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, 3, generator=g, dtype=D)
    q = _rand_quat(*shape, seed=seed + 1)
    fov = 0.3 + 1.5 * torch.rand(*shape, 2, generator=g, dtype=D)
    return torch.cat([t, q, fov], dim=-1)


# ---------------------------------------------------------------------------------------------------- rotations
def test_quat_to_mat_known_rotations():
    assert torch.allclose(quat_to_mat(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=D)), torch.eye(3, dtype=D))
    th = 0.7  # rotation about z by th: (x, y, z, w) = (0, 0, sin(th/2), cos(th/2))
    R = quat_to_mat(torch.tensor([0.0, 0.0, math.sin(th / 2), math.cos(th / 2)], dtype=D))
    c, s = math.cos(th), math.sin(th)
    assert torch.allclose(R, torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=D), atol=1e-12)
    # about x by 90 degrees: y -> z
    R = quat_to_mat(torch.tensor([math.sin(math.pi / 4), 0.0, 0.0, math.cos(math.pi / 4)], dtype=D))
    assert torch.allclose(R @ torch.tensor([0.0, 1.0, 0.0], dtype=D), torch.tensor([0.0, 0.0, 1.0], dtype=D))


def test_quat_to_mat_is_scale_invariant_and_orthonormal():
    q = _rand_quat(4, 5)
    R = quat_to_mat(q)
    R_scaled = quat_to_mat(q * torch.linspace(0.1, 7.0, 5, dtype=D)[:, None])
    assert R.shape == (4, 5, 3, 3)
    assert torch.allclose(R, R_scaled, atol=1e-12)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=D).expand(4, 5, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(4, 5, dtype=D), atol=1e-12)
    assert torch.allclose(quat_to_mat(-q), R, atol=1e-12)  # q and -q: same rotation


def test_mat_to_quat_round_trip_including_half_turns():
    q = _rand_quat(200)
    # near-180-degree rotations (w ~ 0) and exact half turns about the axes
    half = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1e-9]], dtype=D)
    q = torch.cat([q, half / half.norm(dim=-1, keepdim=True)])
    back = mat_to_quat(quat_to_mat(q))
    assert (back[..., 3] >= 0).all()
    assert torch.allclose(back.norm(dim=-1), torch.ones(len(q), dtype=D), atol=1e-9)
    # same rotation, and the same quaternion up to the sign convention
    assert torch.allclose(quat_to_mat(back), quat_to_mat(q), atol=1e-9)
    exp = standardize_quaternion(q)
    close = (back - exp).abs().max(dim=-1).values < 1e-9
    w_zero = exp[..., 3].abs() < 1e-8  # w == 0: q and -q both have w >= 0
    assert (close | (w_zero & ((back + exp).abs().max(dim=-1).values < 1e-8))).all()


def test_mat_to_quat_float32_batched():
    q = _rand_quat(3, 7).float()
    back = mat_to_quat(quat_to_mat(q))
    assert back.shape == (3, 7, 4) and back.dtype == torch.float32
    assert torch.allclose(back, standardize_quaternion(q), atol=1e-5)
    with pytest.raises(ValueError):
        mat_to_quat(torch.eye(4))


# ------------------------------------------------------------------------------------------------ pose encoding
def test_known_camera_pose_encoding():
    H, W = 392, 518
    # identity rotation, translation (1, 2, 3), 90 degree fields of view -> f = half the image size
    pe = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0, math.pi / 2, math.pi / 2], dtype=D)
    E, K = pose_encoding_to_extri_intri(pe, (H, W))
    assert torch.allclose(E, torch.tensor([[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3]], dtype=D))
    assert torch.allclose(K, torch.tensor([[W / 2, 0, W / 2], [0, H / 2, H / 2], [0, 0, 1]], dtype=D))
    # fov_h from fy: fy = (H/2) / tan(fov_h/2)
    pe2 = pe.clone()
    pe2[7], pe2[8] = 0.8, 1.1
    _, K2 = pose_encoding_to_extri_intri(pe2, (H, W))
    assert K2[1, 1].item() == pytest.approx((H / 2) / math.tan(0.4))
    assert K2[0, 0].item() == pytest.approx((W / 2) / math.tan(0.55))
    E3, K3 = pose_encoding_to_extri_intri(pe, build_intrinsics=False)
    assert K3 is None and torch.equal(E3, E)


def test_pose_encoding_round_trip():
    H, W = 294, 518
    pe = _rand_pose_enc(2, 5)
    E, K = pose_encoding_to_extri_intri(pe, (H, W))
    assert E.shape == (2, 5, 3, 4) and K.shape == (2, 5, 3, 3) and K.dtype == D
    back = extri_intri_to_pose_encoding(E, K, (H, W))
    assert back.shape == (2, 5, 9)
    expect = pe.clone()
    expect[..., 3:7] = standardize_quaternion(pe[..., 3:7])
    assert torch.allclose(back, expect, atol=1e-9)
    # and the other way round from matrices
    E2, K2 = pose_encoding_to_extri_intri(back, (H, W))
    assert torch.allclose(E2, E, atol=1e-9) and torch.allclose(K2, K, atol=1e-9)


def test_pose_encoding_unnormalised_quaternion_and_any_batch_shape():
    pe = _rand_pose_enc(3, 2, 4)
    scaled = pe.clone()
    scaled[..., 3:7] *= 3.5
    E1, _ = pose_encoding_to_extri_intri(pe, (14, 28))
    E2, _ = pose_encoding_to_extri_intri(scaled, (14, 28))
    assert E1.shape == (3, 2, 4, 3, 4) and torch.allclose(E1, E2, atol=1e-12)
    E0, K0 = pose_encoding_to_extri_intri(pe[0, 0, 0], (14, 28))
    assert E0.shape == (3, 4) and K0.shape == (3, 3)


# -------------------------------------------------------------------------------------------------------- SE(3)
def test_closed_form_inverse_se3():
    E, _ = pose_encoding_to_extri_intri(_rand_pose_enc(2, 3), (10, 10))
    inv = closed_form_inverse_se3(E)
    assert inv.shape == (2, 3, 4, 4)
    eye = torch.eye(4, dtype=D).expand(2, 3, 4, 4)
    assert torch.allclose(inv @ extrinsics_to_4x4(E), eye, atol=1e-12)
    assert torch.allclose(extrinsics_to_4x4(E) @ inv, eye, atol=1e-12)
    assert torch.allclose(closed_form_inverse_se3(extrinsics_to_4x4(E)), inv)
    assert torch.allclose(closed_form_inverse_se3(inv), extrinsics_to_4x4(E), atol=1e-12)
    with pytest.raises(ValueError):
        closed_form_inverse_se3(torch.eye(3))


def test_camera_to_world_centre_and_axes():
    # a camera at world position C looking along world +x: its optical axis (z) maps to +x
    R_wc = torch.tensor([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=D)  # columns: camera x, y, z in world
    C = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    E = torch.cat([R_wc.T, (-R_wc.T @ C)[:, None]], dim=1)  # camera-from-world
    T = camera_to_world(E)
    assert torch.allclose(T[:3, 3], C) and torch.allclose(T[:3, :3], R_wc)
    assert torch.allclose(T[3], torch.tensor([0, 0, 0, 1], dtype=D))
    X_world = C + 4.0 * torch.tensor([1.0, 0, 0], dtype=D)  # 4 m ahead of the camera
    assert torch.allclose(E[:, :3] @ X_world + E[:, 3], torch.tensor([0.0, 0.0, 4.0], dtype=D))


# ------------------------------------------------------------------------------------------------- unprojection
def test_unproject_constant_depth_identity_camera():
    H, W, d = 6, 8, 2.5
    K = torch.tensor([[10.0, 0, W / 2], [0, 12.0, H / 2], [0, 0, 1]], dtype=D)
    E = torch.cat([torch.eye(3, dtype=D), torch.zeros(3, 1, dtype=D)], dim=1)
    pts = unproject_depth_map_to_point_map(torch.full((H, W), d, dtype=D), E, K)
    assert pts.shape == (H, W, 3)
    assert torch.allclose(pts[..., 2], torch.full((H, W), d, dtype=D))
    # integer pixel coordinates: pixel (u=0, v=0) is at x = (0 - W/2) d / fx; the centre pixel (W/2, H/2) on the axis
    assert pts[0, 0, 0].item() == pytest.approx((0 - W / 2) * d / 10.0)
    assert pts[0, 0, 1].item() == pytest.approx((0 - H / 2) * d / 12.0)
    assert torch.allclose(pts[H // 2, W // 2, :2], torch.zeros(2, dtype=D))
    assert pts[2, 7, 0].item() == pytest.approx((7 - W / 2) * d / 10.0)


def test_unproject_tilted_plane_seen_by_posed_camera():
    H, W = 14, 28
    pe = torch.tensor([0.3, -0.2, 2.0, 0.1, -0.2, 0.05, 1.0, 1.0, 1.3], dtype=D)
    E, K = pose_encoding_to_extri_intri(pe, (H, W))
    R, t = E[:, :3], E[:, 3]
    C = -R.T @ t  # camera centre in the world
    n = torch.tensor([0.2, -0.1, 1.0], dtype=D)
    n = n / n.norm()
    c = float(n @ C) + 3.0  # plane n.X = c, 3 m in front of the camera along n
    # ray through each integer pixel, intersected with the plane -> z-depth
    v, u = torch.meshgrid(torch.arange(H, dtype=D), torch.arange(W, dtype=D), indexing="ij")
    rays_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], dim=-1)
    rays_world = rays_cam @ R  # R^T r for each ray
    depth = (c - n @ C) / (rays_world @ n)
    assert (depth > 0).all()
    pts = unproject_depth_map_to_point_map(depth[..., None], E, K)  # [H, W, 1] input form
    assert pts.shape == (H, W, 3)
    assert torch.allclose(pts @ n, torch.full((H, W), c, dtype=D), atol=1e-9)  # on the plane
    # projecting back lands on the pixel with the same depth
    cam = pts @ R.T + t
    assert torch.allclose(cam[..., 2], depth, atol=1e-9)
    proj = cam @ K.T
    assert torch.allclose(proj[..., 0] / proj[..., 2], u, atol=1e-9)
    assert torch.allclose(proj[..., 1] / proj[..., 2], v, atol=1e-9)


def test_unproject_batched_shapes_and_mask():
    B, S, H, W = 2, 3, 5, 7
    E, K = pose_encoding_to_extri_intri(_rand_pose_enc(B, S).float(), (H, W))
    depth = torch.rand(B, S, H, W, 1) + 0.1
    depth[0, 1, 2, 3, 0] = 0.0
    pts = unproject_depth_map_to_point_map(depth, E, K)
    assert pts.shape == (B, S, H, W, 3) and pts.dtype == torch.float32
    same = unproject_depth_map_to_point_map(depth[..., 0], E, K)
    assert torch.equal(pts, same)
    # per-frame results equal the batched ones
    one = unproject_depth_map_to_point_map(depth[1, 2], E[1, 2], K[1, 2])
    assert torch.allclose(one, pts[1, 2], atol=1e-6)
    world, cam, valid = depth_to_world_coords_points(depth, E, K)
    assert cam.shape == (B, S, H, W, 3) and valid.shape == (B, S, H, W)
    assert not valid[0, 1, 2, 3] and valid.sum() == B * S * H * W - 1
    with pytest.raises(ValueError):
        unproject_depth_map_to_point_map(torch.rand(H, W), E, K)  # batch dims missing
