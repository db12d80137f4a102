"""Exact frames of a sim room for the map tests: ground-truth depth from the scene mesh, poses in ``map``."""

from __future__ import annotations

import functools

import numpy as np

from ros2_stream4d.mapping.conventions import inverse
from ros2_stream4d.mapping.keyframe_map import KeyframeMapConfig, MapFrame


@functools.lru_cache(maxsize=4)
def room(n: int = 24, hw: tuple[int, int] = (60, 80), seed: int = 0):
    """(frames, scene mesh (V, F) in map): a ground robot driving through a sim room; map = base at frame 0."""
    from ros2_stream4d.sim.render import CameraModel, raycast_depth
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("room", seed)
    traj = make_trajectory(scene, "ground_robot", n, 10.0, seed)
    h, w = hw
    K = CameraModel.from_hfov(w, h, 60.0).K
    T_map_world = inverse(traj.T_world_base[0])
    frames = []
    for i, T_wc in enumerate(traj.T_world_cam):
        d = raycast_depth(scene.raycasting_scene, K, T_wc, w, h).astype(np.float32)
        shade = np.clip(40 * d, 0, 255).astype(np.uint8)
        rgb = np.stack([shade, 255 - shade, np.full_like(shade, 90)], axis=-1)
        frames.append(MapFrame(1_000_000_000 + i * 100_000_000, T_map_world @ T_wc, d, rgb, K,
                               np.full((h, w), 5.0, np.float32)))
    V = np.concatenate([p.vertices for p in scene.parts])
    offs = np.cumsum([0] + [len(p.vertices) for p in scene.parts[:-1]])
    F = np.concatenate([p.triangles + o for p, o in zip(scene.parts, offs)])
    return tuple(frames), (V @ T_map_world[:3, :3].T + T_map_world[:3, 3], F)


def small_config(**kw) -> KeyframeMapConfig:
    """Small maps for tests; the cloud's surface filter is off (cloud_surface_voxels=0) so that the cloud is every
    fused voxel and moves exactly with its keyframes (the filter's own tests turn it on)."""
    base = dict(stride=1, cloud_stride=1, keyframe_max_frames=4, cloud_voxel_size=0.05, tsdf_voxel_size=0.1,
                occupancy_resolution=0.1, cloud_surface_voxels=0.0)
    base.update(kw)
    return KeyframeMapConfig(**base)


def shifted(T: np.ndarray, t) -> np.ndarray:
    D = np.eye(4)
    D[:3, 3] = t
    return D @ T


def assert_same_points(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> None:
    """Two point sets are the same up to order: as many points, each within atol of one of the other set."""
    from scipy.spatial import cKDTree

    assert len(a) == len(b) > 0
    assert cKDTree(b).query(a)[0].max() <= atol and cKDTree(a).query(b)[0].max() <= atol


def assert_same_products(a, b, atol: float = 1e-5) -> None:
    """Cloud, mesh and grid of two maps are the same."""
    pa, pb = a.points(), b.points()
    assert_same_points(pa[0], pb[0], atol)
    ma, mb = a.mesh(), b.mesh()
    assert len(ma[1]) == len(mb[1])
    assert_same_points(ma[0], mb[0], atol)
    ga, gb = a.occupancy(), b.occupancy()
    np.testing.assert_array_equal(ga[0], gb[0])
    np.testing.assert_allclose(ga[1], gb[1])
