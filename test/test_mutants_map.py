"""The map modules (mapping/tsdf.py, mapping/occupancy.py, mapping/keyframe_map.py) on small exact inputs: the tests
that answer the mutants docs/mutation.md lists for them (fast, in-process)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_stream4d.mapping.tsdf import TsdfVolume

K = np.array([[40.0, 0.0, 31.5], [0.0, 40.0, 23.5], [0.0, 0.0, 1.0]])
H, W = 48, 64


def _pose(yaw=0.4, pitch=-0.2, t=(0.37, -0.21, 0.13)):
    """An asymmetric camera pose in map (rotations about two axes and a translation)."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    Rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    T = np.eye(4)
    T[:3, :3] = Rz @ Rx
    T[:3, 3] = t
    return T


def _wall(z=1.23, colour=(201, 99, 3)):
    depth = np.full((H, W), z, np.float32)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[...] = colour
    return depth, rgb


# ---------------------------------------------------------------------------------------------------- tsdf
def test_tsdf_options_are_validated():
    for kw in ({"voxel_size": 0.0}, {"voxel_size": -0.1}, {"voxel_size": float("nan")}, {"voxel_size": np.inf}):
        with pytest.raises(ValueError, match="voxel_size"):
            TsdfVolume(**kw)
    for kw in ({"trunc_voxels": 0.0}, {"depth_max": 0.0}, {"trunc_voxels": -1.0}, {"depth_max": -2.0}):
        with pytest.raises(ValueError, match="^trunc_voxels and depth_max must be > 0$"):
            TsdfVolume(**kw)
    small = TsdfVolume(trunc_voxels=0.5, depth_max=0.5)
    assert (small.trunc_voxels, small.depth_max) == (0.5, 0.5)
    d = TsdfVolume()  # the documented defaults
    assert (d.voxel_size, d.trunc_voxels, d.depth_max, d.block_resolution, d.block_count, d.min_weight) == (
        0.05, 6.0, 5.0, 8, 20_000, 1.0)
    v = TsdfVolume(voxel_size=0.04, trunc_voxels=5, depth_max=2.5, block_resolution=16, block_count=1000)
    assert (v.voxel_size, v.trunc_voxels, v.depth_max, v.block_resolution, v.block_count) == (0.04, 5.0, 2.5, 16, 1000)
    np.testing.assert_array_equal(v.offset, [0.02, 0.02, 0.02])
    assert v.frames == 0 and v.blocks() == 0


def test_tsdf_refuses_bad_shapes_and_skips_frames_without_usable_depth():
    v = TsdfVolume(voxel_size=0.05, depth_max=2.0)
    depth, rgb = _wall()
    with pytest.raises(ValueError, match="depth must be"):
        v.integrate(depth[None], rgb, K, np.eye(4))
    with pytest.raises(ValueError, match=r"rgb must be \(48, 64, 3\), got \(48, 63, 3\)"):
        v.integrate(depth, rgb[:, :-1], K, np.eye(4))
    with pytest.raises(ValueError, match="rgb must be"):
        v.integrate(depth, rgb[..., :2], K, np.eye(4))
    for bad in (np.full((H, W), np.nan, np.float32), np.zeros((H, W), np.float32), np.full((H, W), -1.0, np.float32),
                np.full((H, W), 2.01, np.float32), np.full((H, W), np.inf, np.float32)):
        assert v.integrate(bad, rgb, K, np.eye(4)) is False
    assert v.frames == 0 and v.blocks() == 0
    assert [(a.shape, a.dtype) for a in v.mesh()] == [((0, 3), np.float32), ((0, 3), np.int32), ((0, 3), np.uint8)]
    # depths exactly at depth_max touch no block (Open3D's own range test): skipped, not an error
    assert v.integrate(np.full((H, W), 2.0, np.float32), rgb, K, np.eye(4)) is False
    mixed = np.full((H, W), 2.5, np.float32)
    mixed[10:20, 10:30] = 1.5  # only these are within range
    assert v.integrate(mixed, rgb, K, np.eye(4)) is True
    assert v.frames == 1 and v.blocks() > 0
    v.reset()
    assert v.frames == 0 and v.blocks() == 0


def test_tsdf_mesh_lies_on_the_surface_in_map_with_its_colour():
    T = _pose()
    v = TsdfVolume(voxel_size=0.05, depth_max=3.0, min_weight=0.5)
    depth, rgb = _wall(1.23)
    depth[:, :4] = np.nan  # invalid pixels are not fused
    assert v.integrate(depth, rgb, K, T)
    verts, tris, cols = v.mesh()
    assert verts.dtype == np.float32 and tris.dtype == np.int32 and cols.dtype == np.uint8
    assert len(verts) > 200 and len(tris) > 300 and cols.shape == verts.shape
    # every vertex on the wall: 1.23 m along the camera's optical axis, in map
    n, t = T[:3, 2], T[:3, 3]
    np.testing.assert_allclose((verts.astype(np.float64) - t) @ n, 1.23, atol=2e-3)
    # and inside the image (the projection of every vertex falls in the frustum)
    cam = (verts.astype(np.float64) - t) @ T[:3, :3]
    u = cam[:, 0] / cam[:, 2] * K[0, 0] + K[0, 2]
    assert u.min() > -2.0 and u.max() < W + 1.0
    assert (cols == (201, 99, 3)).all(), "colour rounded, not truncated"
    assert tris.min() == 0 and tris.max() == len(verts) - 1


def test_tsdf_mesh_is_canonical_and_consistently_oriented():
    T = _pose()
    depth, rgb = _wall(1.1)
    meshes = []
    for _ in range(2):
        v = TsdfVolume(voxel_size=0.05, depth_max=3.0, min_weight=0.5)
        v.integrate(depth, rgb, K, T)
        meshes.append(v.mesh())
    for a, b in zip(*meshes):
        np.testing.assert_array_equal(a, b)
    verts, tris, _ = meshes[0]
    # vertices sorted by x, then y, then z; each triangle starts at its smallest index; triangles sorted
    np.testing.assert_array_equal(np.lexsort((verts[:, 2], verts[:, 1], verts[:, 0])), np.arange(len(verts)))
    assert (tris[:, 0] < tris[:, 1]).all() and (tris[:, 0] < tris[:, 2]).all()
    np.testing.assert_array_equal(np.lexsort((tris[:, 2], tris[:, 1], tris[:, 0])), np.arange(len(tris)))
    # one orientation for all: every triangle's normal points the same way along the optical axis
    p = verts.astype(np.float64)[tris]
    normals = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    side = np.sign(normals @ T[:3, 2])
    assert abs(side.sum()) == len(side)


def test_tsdf_fuses_surfaces_nearer_than_a_metre():
    v = TsdfVolume(voxel_size=0.02, depth_max=3.0, min_weight=0.5)
    depth, rgb = _wall(0.53)
    assert v.integrate(depth, rgb, K, np.eye(4)) is True
    verts = v.mesh()[0]
    assert len(verts) > 100
    np.testing.assert_allclose(verts[:, 2], 0.53, atol=2e-3)


def test_tsdf_mesh_is_on_the_half_shifted_lattice_faces_the_camera_and_keeps_zero_channels():
    v = TsdfVolume(voxel_size=0.04, depth_max=3.0, min_weight=0.5)
    depth, rgb = _wall(1.1, colour=(0, 99, 255))
    v.integrate(depth, rgb, K, np.eye(4))
    verts, tris, cols = v.mesh()
    assert tris.shape[1] == 3 and (cols == (0, 99, 255)).all()
    # a fronto-parallel wall: vertices on the lattice's z edges, at x = (k + 1/2) voxel
    x = np.unique(np.round(verts[:, 0].astype(np.float64), 6))
    np.testing.assert_allclose(np.diff(x), 0.04, atol=1e-5)
    k = x / 0.04 - 0.5
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    # Open3D's orientation kept: every triangle's normal points back to the camera
    p = verts.astype(np.float64)[tris]
    assert (np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])[:, 2] < 0).all()


def test_tsdf_min_weight_needs_more_observations():
    depth, rgb = _wall(1.3)
    v = TsdfVolume(voxel_size=0.05, depth_max=3.0, min_weight=1.5)
    v.integrate(depth, rgb, K, np.eye(4))
    assert len(v.mesh()[0]) == 0, "one observation is below the weight threshold"
    v.integrate(depth, rgb, K, np.eye(4))
    assert len(v.mesh()[0]) > 0 and v.frames == 2


# ---------------------------------------------------------------------------------------------------- keyframe map
def _map_frame(T, h=24, w=32, z=1.5, stamp=1_000_000_000):
    """A wall at z metres with a unique colour per pixel, a confidence ramp, some invalid and far pixels."""
    from ros2_stream4d.mapping.keyframe_map import MapFrame

    depth = np.full((h, w), z, np.float32)
    depth[0, 0] = np.nan
    depth[4, 4] = 0.0
    depth[4, 8] = -1.0
    depth[12, 12] = 3.0  # beyond cloud_depth_max in the test below
    vv, uu = np.mgrid[0:h, 0:w]
    rgb = np.stack([uu * 7 % 256, vv * 9 % 256, (uu + vv) % 256], -1).astype(np.uint8)
    conf = (1.0 + 0.5 * (uu % 4) + 0.25 * (vv % 8)).astype(np.float32)
    conf[8, 8] = np.nan
    Kf = np.array([[30.0, 0.0, 15.5], [0.0, 28.0, 11.5], [0.0, 0.0, 1.0]])
    return MapFrame(stamp, T, depth, rgb, Kf, conf)


def _cloud_config(**kw):
    from ros2_stream4d.mapping.keyframe_map import KeyframeMapConfig

    # conf_percentile=0: every stored pixel is fused (the map's own confidence cut has its tests in test_keyframe_map)
    base = dict(stride=2, cloud_stride=2, cloud_voxel_size=0.001, tsdf=False, occupancy=False, cloud_depth_max=2.0,
                conf_percentile=0.0)
    base.update(kw)
    return KeyframeMapConfig(**base)


def test_stored_frame_and_cloud_follow_the_strides_and_the_intrinsics():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    T = _pose()
    f = _map_frame(T)
    m = KeyframeMap(_cloud_config())
    kf = m.integrate(f)
    b = kf.frames
    assert len(b) == 1 and b.depth.shape == (1, 12, 16) and b.depth.dtype == np.float16
    assert b.conf.dtype == np.float16 and b.rgb.shape == (1, 12, 16, 3) and b.stamps.tolist() == [1_000_000_000]
    np.testing.assert_array_equal(kf.T_map_kf, T)
    np.testing.assert_allclose(b.T_kf_cam[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(b.K[0], [[15.0, 0.0, 7.75], [0.0, 14.0, 5.75], [0.0, 0.0, 1.0]])
    assert np.isnan(b.depth[0, 0, 0]) and np.isnan(b.depth[0, 2, 2]) and np.isnan(b.depth[0, 2, 4])
    assert b.depth[0, 6, 6] == 3.0 and b.depth[0, 1, 1] == 1.5
    assert b.conf[0, 4, 4] == 0.0, "a NaN confidence is stored as 0"
    np.testing.assert_array_equal(b.rgb[0], f.rgb[::2, ::2])

    # the cloud: full-resolution pixels (4 i, 4 j), valid and within cloud_depth_max, moved into map by T
    xyz, rgb, conf = m.points()
    vv, uu = np.mgrid[0:24:4, 0:32:4]
    d = f.depth[vv, uu].astype(np.float64)
    ok = np.isfinite(d) & (d > 0) & (d <= 2.0)
    cam = np.stack([(uu - 15.5) / 30.0 * d, (vv - 11.5) / 28.0 * d, d], -1)[ok]
    expect = cam @ T[:3, :3].T + T[:3, 3]
    assert ok.sum() == 6 * 8 - 4 and len(xyz) == ok.sum()
    order_got, order_exp = np.lexsort(xyz.T), np.lexsort(expect.T)
    np.testing.assert_allclose(xyz[order_got], expect[order_exp], atol=1e-5)
    np.testing.assert_array_equal(rgb[order_got], f.rgb[vv, uu][ok][order_exp])
    np.testing.assert_allclose(conf[order_got], np.nan_to_num(f.conf[vv, uu][ok][order_exp]), rtol=1e-3)
    assert len(m) == ok.sum()


def test_no_cloud_depth_limit_and_no_confidence():
    from dataclasses import replace

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    f = replace(_map_frame(np.eye(4)), conf=None)
    m = KeyframeMap(_cloud_config(cloud_depth_max=0.0, stride=1, cloud_stride=3))
    b = m.integrate(f).frames
    assert (b.conf == 1.0).all(), "no confidence: 1"
    np.testing.assert_allclose(b.K[0], f.K)
    xyz, _, conf = m.points()
    vv, uu = np.mgrid[0:24:3, 0:32:3]
    d = f.depth[vv, uu]
    assert len(xyz) == (np.isfinite(d) & (d > 0)).sum(), "0 = no depth limit: the far pixel is in"
    assert np.isclose(xyz[:, 2].max(), 3.0) and (conf == 1.0).all()


def test_keyframes_split_on_distance_count_and_resolution():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    m = KeyframeMap(_cloud_config(keyframe_distance=0.25, keyframe_max_frames=3))
    T0 = np.eye(4)
    m.integrate(_map_frame(T0))
    T1 = np.eye(4)
    T1[0, 3] = 0.25  # exactly the keyframe distance: still the same keyframe
    m.integrate(_map_frame(T1, stamp=2))
    assert len(m.keyframes) == 1 and m.keyframes[0].n_frames == 2
    m.integrate(_map_frame(T0, h=20, stamp=3))  # another resolution: a new keyframe
    assert [kf.n_frames for kf in m.keyframes] == [2, 1]
    assert m.keyframes[1].frames.depth.shape == (1, 10, 16)
    m.integrate(_map_frame(T0, h=20, stamp=4))
    m.integrate(_map_frame(T0, h=20, stamp=5))
    m.integrate(_map_frame(T0, h=20, stamp=6))  # the fourth frame: keyframe_max_frames = 3 reached
    assert [kf.n_frames for kf in m.keyframes] == [2, 3, 1]
    assert [kf.id for kf in m.keyframes] == [0, 1, 2] and m.frames == 6
    assert m.keyframes[1].frames.stamps.tolist() == [3, 4, 5]
    # a closed keyframe keeps its own copies (the open one's buffers are gone)
    assert m.keyframes[1].frames.depth.base is None or m.keyframes[1].frames.depth.base.shape[0] == 3


def test_segments_stats_erase_and_rebuild_from_stored_keyframes(tmp_path):
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, make_keyframe_map

    m = KeyframeMap(_cloud_config(keyframe_max_frames=2, max_keyframes_in_memory=1))
    m.new_segment()
    assert m.segment == 0, "a reset before any frame does not start a segment"
    for k in range(3):
        m.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.1 * k)), stamp=k))
    m.new_segment()
    m.integrate(_map_frame(np.eye(4), stamp=9))
    assert [(kf.id, kf.segment, kf.n_frames) for kf in m.keyframes] == [(0, 0, 2), (1, 0, 1), (2, 1, 1)]
    s = m.stats()
    assert (s["keyframes"], s["keyframes in memory"], s["map frames"], s["segments"]) == (3, 1, 4, 2)
    assert s["map points"] == len(m) > 0 and s["tsdf blocks"] == 0
    in_memory = [kf for kf in m.keyframes if kf.in_memory]
    assert in_memory == [m.keyframes[-1]], "the oldest are spilled first, the open keyframe stays"
    assert s["keyframe bytes in memory"] == m.memory_bytes() == in_memory[0].frames.nbytes() > 0
    spill = m.spill_root()
    assert spill.is_dir() and len(list(spill.iterdir())) == 2
    b0 = m.frames_of(m.keyframes[0])
    assert b0.stamps.tolist() == [0, 1]
    # a spilled keyframe is read back as itself: a file holding another keyframe is refused
    kf0, kf1 = m.keyframes[0], m.keyframes[1]
    saved = kf0.spill_path.read_bytes()
    kf0.spill_path.write_bytes(kf1.spill_path.read_bytes())
    with pytest.raises(ValueError, match="holds keyframe 1, expected 0"):
        m.frames_of(kf0)
    kf0.spill_path.write_bytes(saved)

    # a map made of the stored keyframes has the same cloud; the next frame starts a new segment and id
    stored = [(kf.id, kf.segment, kf.T_map_kf, m.frames_of(kf)) for kf in m.keyframes]
    m2 = make_keyframe_map(stored, _cloud_config())
    assert m2.segment == 2 and m2.frames == 4 and not m2.stale
    np.testing.assert_allclose(np.sort(m2.points()[0], axis=0), np.sort(m.points()[0], axis=0), atol=1e-6)
    assert m2.integrate(_map_frame(np.eye(4), stamp=10)).id == 3 and m2.keyframes[-1].segment == 2
    assert make_keyframe_map(stored, _cloud_config(), segment=7).segment == 7
    empty = make_keyframe_map([], _cloud_config())
    assert empty.segment == 0 and empty._next_id == 0 and len(empty) == 0

    m.erase()
    assert (m.keyframes, m.segment, m.frames, len(m)) == ([], 0, 0, 0)
    assert list(spill.iterdir()) == []
    assert m.integrate(_map_frame(np.eye(4))).id == 0
    m.close()
    assert not spill.exists(), "the map's own temporary spill directory goes with it"


def test_keyframe_files_round_trip_and_damage_is_named(tmp_path):
    from ros2_stream4d.mapping.keyframe_map import FrameBatch, KeyframeMap, read_keyframe_file, write_keyframe_file

    m = KeyframeMap(_cloud_config())
    m.integrate(_map_frame(np.eye(4), stamp=5))
    m.integrate(_map_frame(np.eye(4), stamp=6))
    frames = m.keyframes[0].frames
    path = tmp_path / "kf.npz"
    write_keyframe_file(path, 4, 3, frames)
    kid, seg, back = read_keyframe_file(path)
    assert (kid, seg) == (4, 3)
    for k, v in frames.arrays().items():
        np.testing.assert_array_equal(getattr(back, k), v)
        assert getattr(back, k).dtype == v.dtype
    assert read_keyframe_file(path, 4)[0] == 4
    with pytest.raises(ValueError, match="kf.npz holds keyframe 4, expected 5"):
        read_keyframe_file(path, 5)
    np.savez(tmp_path / "old.npz", version=np.int64(2), id=np.int64(0), segment=np.int64(0), **frames.arrays())
    with pytest.raises(ValueError, match="old.npz: unknown or missing version"):
        read_keyframe_file(tmp_path / "old.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"keyframe file cut.npz is unreadable \(BadZipFile: "):
        read_keyframe_file(tmp_path / "cut.npz")
    # no unpickling of a file's object arrays
    np.savez(tmp_path / "obj.npz", version=np.int64(1), id=np.int64(0), segment=np.int64(0),
             **{**frames.arrays(), "stamps": np.array([5, None], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        read_keyframe_file(tmp_path / "obj.npz")
    # a file's arrays are checked, and the error names the file
    np.savez(tmp_path / "f32.npz", version=np.int64(1), id=np.int64(0), segment=np.int64(0),
             **{**frames.arrays(), "depth": frames.depth.astype(np.float32)})
    with pytest.raises(ValueError, match=r"^keyframe file f32.npz: depth must be \(2, 12, 16\) float16"):
        read_keyframe_file(tmp_path / "f32.npz")

    a = frames.arrays()
    with pytest.raises(ValueError, match=r"here: missing arrays \['K', 'rgb'\]"):
        FrameBatch.from_arrays({k: v for k, v in a.items() if k not in ("K", "rgb")}, where="here")
    with pytest.raises(ValueError, match=r"depth must be \(n >= 1, h, w\)"):
        FrameBatch.from_arrays({**a, "depth": a["depth"][0]})
    with pytest.raises(ValueError, match=r"depth must be \(n >= 1, h, w\)"):
        FrameBatch.from_arrays({k: v[:0] for k, v in a.items()})
    with pytest.raises(ValueError, match=r"keyframe: conf must be \(2, 12, 16\) float16, got \(2, 12, 16\) float32"):
        FrameBatch.from_arrays({**a, "conf": a["conf"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"rgb must be \(2, 12, 16, 3\) uint8"):
        FrameBatch.from_arrays({**a, "rgb": a["rgb"][:, :, :-1]})
    with pytest.raises(ValueError, match=r"stamps must be \(2,\) int64, got \(2,\) int32"):
        FrameBatch.from_arrays({**a, "stamps": a["stamps"].astype(np.int32)})
    bad = a["T_kf_cam"].copy()
    bad[1, 0, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite poses or intrinsics"):
        FrameBatch.from_arrays({**a, "T_kf_cam": bad})
    badK = a["K"].copy()
    badK[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        FrameBatch.from_arrays({**a, "K": badK})
    ok = FrameBatch.from_arrays(a)
    assert len(ok) == 2 and ok.nbytes() == sum(v.nbytes for v in a.values())
    grown = ok.append(7, np.eye(4), np.eye(3), a["depth"][0], a["conf"][0], a["rgb"][0])
    assert grown.stamps.tolist() == [5, 6, 7] and grown.stamps.dtype == np.int64 and len(grown) == 3
    np.testing.assert_array_equal(grown.K[2], np.eye(3))
    np.testing.assert_array_equal(grown.depth[2], a["depth"][0])
    T = _pose()
    grown = ok.append(8, T, 2 * np.eye(3), a["depth"][1], a["conf"][1] + 1, 255 - a["rgb"][1])
    np.testing.assert_array_equal(grown.T_kf_cam[2], T)
    np.testing.assert_array_equal(grown.conf[2], a["conf"][1] + 1)
    np.testing.assert_array_equal(grown.rgb[2], 255 - a["rgb"][1])
    np.testing.assert_array_equal(grown.T_kf_cam[:2], a["T_kf_cam"])


def test_update_poses_validates_and_marks_only_real_changes_stale():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    m = KeyframeMap(_cloud_config())
    m.integrate(_map_frame(np.eye(4)))
    m.update_poses({})
    assert not m.stale
    with pytest.raises(ValueError, match="pose of keyframe 0 must be a finite 4x4"):
        m.update_poses({0: np.eye(3)})
    bad = np.eye(4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite 4x4"):
        m.update_poses({0: bad})
    with pytest.raises(KeyError, match=r"no keyframes with ids \[3, 7\]"):
        m.update_poses({7: np.eye(4), 3: np.eye(4), 0: np.eye(4)})
    T = _pose()
    m.update_poses({0: T})
    assert m.stale
    T[0, 3] = 99.0  # the map keeps its own copy
    assert m.keyframe_poses()[0][0, 3] == pytest.approx(0.37)
    poses = m.keyframe_poses()
    poses[0][1, 3] = 50.0
    assert m.keyframes[0].T_map_kf[1, 3] == pytest.approx(-0.21)
    with pytest.raises(ValueError, match="T_map_cam must be a finite 4x4"):
        m.integrate(_map_frame(np.full((4, 4), np.nan)))
    with pytest.raises(ValueError, match=r"rgb must be uint8 of the depth's size, got \(12, 16, 3\) float64"):
        from dataclasses import replace

        m.integrate(replace(_map_frame(np.eye(4)), rgb=np.zeros((24, 32, 3))))


# ---------------------------------------------------------------------------------------------------- occupancy
def test_grid_msg_fields_are_the_whole_nav_msgs_layout():
    from ros2_stream4d.mapping.occupancy import grid_msg_fields

    data = np.array([[-1, 0, 100], [100, 0, -1]], np.int16)  # any integer array: sent as int8
    f = grid_msg_fields(data, np.array([1.5, -2.25]), 0.05, "odom")
    flat = f.pop("data")
    assert f == {"header": {"frame_id": "odom"},
                 "info": {"resolution": 0.05, "width": 3, "height": 2,
                          "origin": {"position": {"x": 1.5, "y": -2.25, "z": 0.0},
                                     "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}}}
    assert flat.dtype == np.int8 and flat.shape == (6,) and flat.tolist() == [-1, 0, 100, 100, 0, -1]
    assert grid_msg_fields(data.astype(np.int8), (0, 0), 0.1)["header"] == {"frame_id": "map"}


def test_vote_cells_by_class():
    from ros2_stream4d.mapping.occupancy import Votes

    occ = np.zeros((2, 2, 3), bool)
    free = np.zeros((2, 2, 3), bool)
    floor = np.zeros((2, 3), bool)
    occ[1, 0, 0] = True  # cell (i, j) = (lo + col, lo + row)
    free[0, 1, 2] = True
    free[1, 0, 0] = True  # a free slab in an occupied cell: the cell is occupied, not free
    floor[1, 1] = True
    floor[0, 0] = True
    v = Votes(np.array([10, -5]), occ, free, floor)

    def cells(*which):
        return sorted(map(tuple, v.cells(*which).tolist()))

    assert cells() == cells("occ") == [(10, -5)]
    assert cells("free") == [(11, -4), (12, -4)]
    assert cells("any") == [(10, -5), (11, -4), (12, -4)]
    assert v.cells("any").dtype == np.int64


def test_band_edges_slabs_and_range_edge():
    from ros2_stream4d.mapping.occupancy import OccupancyOptions, frame_votes

    opt = OccupancyOptions(resolution=0.5, floor_z=0.25, min_height=0.25, max_height=1.25, max_range=5.0,
                           slab_height=0.25)
    assert opt.slabs == 4
    # slab k holds heights (min + k s, min + (k + 1) s]
    np.testing.assert_array_equal(opt.slab_of(np.array([0.26, 0.5, 0.51, 0.75, 1.0, 1.01, 1.25, 9.0, -1.0])),
                                  [0, 0, 1, 1, 2, 3, 3, 3, 0])
    assert OccupancyOptions(min_height=0.1, max_height=1.0, slab_height=0.2).slabs == 5
    assert OccupancyOptions(min_height=0.1, max_height=0.2, slab_height=1.0).slabs == 1
    cam = np.array([0.0, 0.0, 1.0])
    pts = np.array([[3.0, 4.0, 1.0],  # exactly max_range away (horizontally): used, height 0.75 -> slab 1
                    [3.0, -4.01, 1.0],  # just beyond: ignored
                    [-1.2, 0.2, 0.5],  # height 0.25 above the floor = min_height: a floor point
                    [1.2, -1.2, 1.5]])  # height 1.25 = max_height: in the band, top slab
    v = frame_votes(pts, cam, opt)
    occ = {(s, int(j + v.lo[1]), int(i + v.lo[0])) for s, j, i in zip(*np.nonzero(v.occ))}
    assert occ == {(1, 8, 6), (3, -3, 2)}
    assert (-3, 0) in {tuple(c) for c in v.cells("free")}, "the floor point's cell is free"
    fj, fi = np.nonzero(v.floor)
    assert list(zip((fi + v.lo[0]).tolist(), (fj + v.lo[1]).tolist())) == [(-3, 0)]
    # nothing usable (ceiling and NaN only): an empty window
    empty = frame_votes(np.array([[1.0, 1.0, 3.0], [np.nan, 0.0, 0.5]]), cam, opt)
    assert empty.occ.shape == (4, 0, 0) and empty.floor.shape == (0, 0) and len(empty.cells("any")) == 0


def test_the_grid_is_cropped_to_what_was_seen_and_origins_follow():
    from ros2_stream4d.mapping.occupancy import OCCUPIED, UNKNOWN, OccupancyGrid, OccupancyOptions, Votes

    opt = OccupancyOptions(resolution=0.25, min_height=0.1, max_height=0.5, slab_height=0.2)
    g = OccupancyGrid(opt)
    data, origin, res = g.to_arrays()
    assert data.shape == (0, 0) and data.dtype == np.int8 and res == 0.25 and origin.tolist() == [0.0, 0.0]
    occ = np.zeros((2, 1, 2), bool)
    occ[0, 0, 1] = True
    g.add(Votes(np.array([-7, 3]), occ, np.zeros_like(occ), np.zeros((1, 2), bool)))
    data, origin, _ = g.to_arrays()
    assert data.tolist() == [[OCCUPIED]]
    np.testing.assert_allclose(origin, [-1.5, 0.75])
    full, full_origin, _ = g.to_arrays(crop=False)
    assert full.shape[0] > 1 and full.shape[1] > 2 and (full == UNKNOWN).sum() == full.size - 1
    i, j = -6 - round(full_origin[0] / 0.25), 3 - round(full_origin[1] / 0.25)
    assert full[j, i] == OCCUPIED
    g.add(Votes(np.array([-7, 3]), occ, np.zeros_like(occ), np.zeros((1, 2), bool)), sign=-1)
    data, origin, _ = g.to_arrays()
    assert data.shape == (0, 0) and data.dtype == np.int8, "votes removed: nothing seen"
    assert origin.tolist() == [0.0, 0.0]
    g.clear()
    assert g.floor.shape == (0, 0) and g.occ.shape == (2, 0, 0)


def test_keyframe_config_dict_round_trips_and_spill_directories(tmp_path):
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, KeyframeMapConfig

    cfg = _cloud_config(keyframe_distance=0.7, spill_dir=str(tmp_path / "a" / "b"), max_keyframes_in_memory=1,
                        keyframe_max_frames=1)
    d = cfg.to_dict()
    assert d["keyframe_distance"] == 0.7 and d["stride"] == 2 and d["tsdf"] is False
    assert KeyframeMapConfig(**d) == cfg
    m = KeyframeMap(cfg)
    for k in range(3):
        m.integrate(_map_frame(np.eye(4), stamp=k))
    assert m.spill_root() == tmp_path / "a" / "b"
    assert sorted(p.suffix for p in (tmp_path / "a" / "b").iterdir()) == [".npz", ".npz"]
    m.close()
    assert (tmp_path / "a" / "b").is_dir(), "a configured spill directory is not the map's to remove"
    own = KeyframeMap(_cloud_config())
    assert own.spill_root().name.startswith("stream4d_keyframes_")
    own.close()


def test_the_grid_grows_to_a_tall_window_far_from_the_origin():
    """A window far away in x and taller (in y) than the growth margin: every vote lands in its own cell."""
    from ros2_stream4d.mapping.occupancy import FREE, OCCUPIED, OccupancyGrid, OccupancyOptions, Votes

    opt = OccupancyOptions(resolution=0.1, min_height=0.1, max_height=0.3, slab_height=0.2)
    g = OccupancyGrid(opt)
    rows, cols = 150, 3
    occ = np.zeros((1, rows, cols), bool)
    occ[0, 0, 0] = occ[0, rows - 1, cols - 1] = True
    floor = np.zeros((rows, cols), bool)
    floor[rows // 2, 1] = True
    g.add(Votes(np.array([400, -20]), occ, np.zeros_like(occ), floor))
    g.add(Votes(np.array([-300, 90]), occ[:, :1, :1], np.zeros((1, 1, 1), bool), np.zeros((1, 1), bool)))
    data, origin, _ = g.to_arrays(crop=False)

    def at(i, j):
        return data[j - round(origin[1] / 0.1), i - round(origin[0] / 0.1)]

    assert at(400, -20) == OCCUPIED and at(402, -20 + rows - 1) == OCCUPIED and at(401, -20 + rows // 2) == FREE
    assert at(-300, 90) == OCCUPIED
    assert (data == OCCUPIED).sum() == 3 and (data == FREE).sum() == 1


def test_rays_follow_the_floor_height_and_every_direction_casts_its_own():
    from ros2_stream4d.mapping.occupancy import OccupancyOptions, frame_votes

    # the floor at z = 1 m: the camera 0.5 m above it sees a wall point 0.5 m above it; the ray stays in the band
    opt = OccupancyOptions(resolution=0.1, floor_z=1.0, min_height=0.1, max_height=1.5, slab_height=0.2)
    v = frame_votes(np.array([[2.05, 0.05, 1.5]]), np.array([0.05, 0.05, 1.5]), opt)
    free = {tuple(c) for c in v.cells("free")}
    assert {(i, 0) for i in range(1, 19)} <= free, "the ray up to (about) a cell short of the wall is free"
    # two ends at the same height in directions 90 degrees apart: the nearer one casts its own ray too
    opt = OccupancyOptions(resolution=0.1)
    v = frame_votes(np.array([[2.05, 0.05, 0.5], [0.05, 1.05, 0.5]]), np.array([0.05, 0.05, 0.5]), opt)
    free = {tuple(c) for c in v.cells("free")}
    assert {(0, j) for j in range(1, 9)} <= free and {(i, 0) for i in range(1, 19)} <= free


def test_rays_clear_neither_the_camera_cell_for_a_neighbour_nor_anything_behind_an_obstacle():
    from ros2_stream4d.mapping.occupancy import OccupancyOptions, frame_votes

    opt = OccupancyOptions(resolution=0.1)
    # an obstacle in the next cell, 7 cm away: its ray is shorter than one cell, no sample at all
    v = frame_votes(np.array([[0.15, 0.05, 0.5]]), np.array([0.08, 0.05, 0.5]), opt)
    assert {tuple(c) for c in v.cells("any")} == {(1, 0)}
    cam = np.array([0.05, 0.05, 0.5])
    # an obstacle at x = 1.05 and another one further out (the window reaches past the first): the cells right
    # behind the first stay unknown
    v = frame_votes(np.array([[1.05, 0.05, 0.5], [2.05, 1.05, 0.5]]), cam, opt)
    free = {tuple(c) for c in v.cells("free")}
    assert (8, 0) in free and (10, 0) not in free and (11, 0) not in free and (12, 0) not in free


def test_tsdf_blocks_follow_the_block_size_and_the_truncation_band():
    depth, rgb = _wall(1.23)

    def blocks(**kw):
        v = TsdfVolume(voxel_size=0.02, depth_max=3.0, **kw)
        v.integrate(depth, rgb, K, np.eye(4))
        return v.blocks()

    assert blocks(block_resolution=4) > 2 * blocks(block_resolution=16), "smaller blocks: more of them"
    assert blocks(trunc_voxels=1.0, block_resolution=4) < blocks(trunc_voxels=12.0, block_resolution=4), \
        "a wider truncation band touches more blocks"


def test_short_rays_descending_rays_and_repeated_floor_votes():
    from ros2_stream4d.mapping.occupancy import FREE, OccupancyGrid, OccupancyOptions, frame_votes

    opt = OccupancyOptions(resolution=0.1)
    cam = np.array([0.05, 0.05, 0.5])
    # a ray shorter than a metre is sampled along its whole length
    free = {tuple(c) for c in frame_votes(np.array([[0.65, 0.05, 0.5]]), cam, opt).cells("free")}
    assert {(1, 0), (2, 0), (3, 0), (4, 0)} <= free
    # a ray from 1.4 m down to a floor point: its samples below the band (the last ~7 %) vote nothing
    v = frame_votes(np.array([[3.05, 0.05, 0.0]]), np.array([0.05, 0.05, 1.4]), opt)
    free = {tuple(c) for c in v.cells("free")}
    assert (20, 0) in free and (29, 0) not in free and (30, 0) in free, "(30, 0) is the floor cell itself"
    # floor votes add up: two frames' votes, one removed, the cell is still seen
    g = OccupancyGrid(opt)
    floor_only = frame_votes(np.array([[1.05, 0.05, 0.0]]), np.array([1.05, 0.05, 0.0]), opt)
    g.add(floor_only)
    g.add(floor_only)
    g.add(floor_only, sign=-1)
    data, origin, _ = g.to_arrays()
    assert data.tolist() == [[FREE]] and origin.tolist() == pytest.approx([1.0, 0.0])


def test_occupancy_option_limits():
    from ros2_stream4d.mapping.occupancy import OccupancyOptions

    with pytest.raises(ValueError, match=r"^occupancy band needs max_height > min_height, got 0.5, 0.5$"):
        OccupancyOptions(min_height=0.5, max_height=0.5)
    with pytest.raises(ValueError, match=r"^occupancy max_range must be > 0, got 0.0$"):
        OccupancyOptions(max_range=0.0)
    assert OccupancyOptions(max_range=0.5).max_range == 0.5


# ------------------------------------------------------------------------ keyframe_map: a rebuild's catch-up
@pytest.mark.parametrize("late", [2, 7], ids=["few-late-frames", "more-than-the-catch-up"])
def test_frames_integrated_while_a_rebuild_fuses_are_in_its_products_once(monkeypatch, late):
    """A background rebuild fuses a snapshot outside the lock; frames integrated meanwhile are fused into the new
    products afterwards: in catch-up rounds when more than CATCH_UP_FRAMES arrived, else under the lock before the
    swap. Each frame exactly once (a frame fused twice doubles its occupancy votes and TSDF weight), none lost: the
    swapped-in map equals one built from every frame with the corrected poses. The rebuild is held inside its first
    fuse while the late frames arrive, so both paths run every time."""
    import threading

    from map_helpers import assert_same_products, room, shifted, small_config

    from ros2_stream4d.mapping import keyframe_map as km

    assert 2 <= km.CATCH_UP_FRAMES < 7  # the two cases sit on either side of it
    frames, _ = room()
    early, rest = frames[:-late], frames[-late:]
    m = km.KeyframeMap(small_config(background_rebuild=True))
    for f in early:
        m.integrate(f)
    entered, release, names = threading.Event(), threading.Event(), []
    fuse_batch = km.MapProducts.fuse_batch

    def held_in_the_rebuild(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            names.append((threading.current_thread().name, threading.current_thread().daemon))
            if not release.is_set():
                entered.set()
                assert release.wait(30)
        return fuse_batch(self, *args, **kwargs)

    monkeypatch.setattr(km.MapProducts, "fuse_batch", held_in_the_rebuild)
    t = np.array([0.3, -0.2, 0.05])
    m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})
    assert entered.wait(30), "the rebuild started in its own thread"
    n_before = len(m.keyframes)
    for f in rest:  # the rebuild is inside its first fuse, outside the lock: integrating goes on
        m.integrate(f)
    release.set()
    assert m.wait_rebuilt(60) and not m.stale and m.rebuilds == 1
    assert set(names) == {("stream4d-map-rebuild", True)}, "a daemon thread: it never holds up the process's exit"
    ref = km.KeyframeMap(small_config())  # the same steps, rebuilt synchronously in update_poses
    for f in early:
        ref.integrate(f)
    ref.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in ref.keyframes})
    for f in rest:
        ref.integrate(f)
    assert len(ref.keyframes) == len(m.keyframes) > n_before
    assert_same_products(m, ref)


@pytest.mark.parametrize("extra", [2, 5], ids=["last-frames-under-the-lock", "another-round"])
def test_a_keyframe_growing_during_a_rebuild_is_fused_from_where_the_rebuild_left_it(monkeypatch, extra):
    """The open keyframe gains frames while the rebuild fuses its first frames: the rebuild goes on from the frame it
    reached (start=done), in another round when more than CATCH_UP_FRAMES arrived, else under the lock before the
    swap. A restart from frame 0 fuses frames twice and the products differ from a synchronous build. The rebuild is
    held twice: inside the snapshot (5 frames arrive into a new keyframe), then inside the round that fuses those 5
    (``extra`` more arrive into the same keyframe)."""
    import threading

    from map_helpers import assert_same_products, room, shifted, small_config

    from ros2_stream4d.mapping import keyframe_map as km

    frames, _ = room()
    early, late, later = frames[:12], frames[12:17], frames[17:17 + extra]
    config = dict(background_rebuild=True, keyframe_max_frames=12, keyframe_distance=5.0, keyframe_angle_deg=90.0)
    m = km.KeyframeMap(small_config(**config))
    for f in early:
        m.integrate(f)
    holds = [lambda n: True, lambda n: n == len(late)]  # where the rebuild waits, in order
    arrived, go = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    fuse_batch = km.MapProducts.fuse_batch

    def held(self, batch, T_map_kf, start=0):
        if threading.current_thread() is not threading.main_thread() and holds and holds[0](len(batch)):
            k = 2 - len(holds)
            holds.pop(0)
            arrived[k].set()
            assert go[k].wait(30)
        return fuse_batch(self, batch, T_map_kf, start=start)

    monkeypatch.setattr(km.MapProducts, "fuse_batch", held)
    t = np.array([0.3, -0.2, 0.05])
    m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})
    n_before = len(m.keyframes)
    assert arrived[0].wait(30)
    for f in late:
        m.integrate(f)
    go[0].set()
    assert arrived[1].wait(30), "a catch-up round fuses the 5 frames that arrived"
    for f in later:
        m.integrate(f)
    go[1].set()
    assert m.wait_rebuilt(60) and m.rebuilds == 1 and not holds
    assert len(m.keyframes) == n_before + 1, "the late frames are one keyframe"
    ref = km.KeyframeMap(small_config(**{**config, "background_rebuild": False}))
    for f in early:
        ref.integrate(f)
    ref.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in ref.keyframes})
    for f in late + later:
        ref.integrate(f)
    assert_same_products(m, ref)


def test_pose_updates_accept_rounding_noise_and_refuse_what_is_not_a_similarity():
    """A Sim(3) pose with float32 rounding (1e-7, as a pose read from a float32 message) is accepted; a bottom row or
    a rotation off by more than the 1e-6 tolerance is refused with the reason."""
    from map_helpers import room, small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    frames, _ = room(n=4)
    m = KeyframeMap(small_config())
    for f in frames:
        m.integrate(f)
    kid = m.keyframes[0].id
    c, s = np.cos(0.3), np.sin(0.3)
    good = np.array([[c, -s, 0, 0.1], [s, c, 0, 0.2], [0, 0, 1, 0.0], [0, 0, 0, 1.0]])
    good[:3, :3] *= 1.3  # a Sim(3) with scale 1.3
    for where, eps in (((3, 0), 4e-7), ((0, 2), 4e-7), ((2, 1), -4e-7)):
        T = good.copy()
        T[where] += eps  # inside the tolerance: off the bottom row or off an exact rotation by float rounding
        m.update_poses({kid: T})
        np.testing.assert_array_equal(m.keyframes[0].T_map_kf, T)
    for where, eps in (((3, 0), 1e-4), ((0, 2), 1e-3), ((3, 3), 1e-4)):
        T = good.copy()
        T[where] += eps
        with pytest.raises(ValueError, match=f"^pose of keyframe {kid} is not a rigid or Sim"):
            m.update_poses({kid: T})
    mirror = good.copy()
    mirror[:3, 0] *= -1  # a reflection (det < 0) is not a pose
    with pytest.raises(ValueError, match="not a rigid or Sim"):
        m.update_poses({kid: mirror})


def test_confident_depth_without_rated_even_pixels_cuts_on_every_rated_pixel():
    """The percentile is taken on the even-pixel subsample; when no even pixel is rated (a one-pixel-wide rated
    column at an odd index) it is taken on every rated pixel, not on an empty subsample. Nothing rated: all NaN, in
    the depth's dtype."""
    from ros2_stream4d.mapping.keyframe_map import confident_depth

    depth = np.arange(1.0, 1.0 + 6 * 8).reshape(6, 8).astype(np.float32)
    conf = np.zeros((6, 8), np.float32)
    conf[:, 3] = [1.0, 6.0, 2.0, 5.0, 3.0, 4.0]  # only column 3 rated
    out = confident_depth(depth, conf, 50.0)  # the median of 1..6 is 3.5: rows with conf 6, 5, 4 stay
    keep = np.isfinite(out)
    assert keep[:, 3].tolist() == [False, True, False, True, False, True] and keep.sum() == 3
    np.testing.assert_array_equal(out[keep], depth[keep])
    none = confident_depth(depth, np.zeros_like(conf), 10.0)
    assert none.dtype == np.float32 and none.shape == depth.shape and np.isnan(none).all()


def test_wait_rebuilt_gives_up_at_its_timeout_while_a_rebuild_runs(monkeypatch):
    """wait_rebuilt(timeout) returns False at the timeout while the background rebuild is still fusing, True once it
    is swapped in (and at once when nothing is stale)."""
    import threading

    from map_helpers import room, shifted, small_config

    from ros2_stream4d.mapping import keyframe_map as km

    frames, _ = room(n=6)
    m = km.KeyframeMap(small_config(background_rebuild=True))
    for f in frames:
        m.integrate(f)
    assert m.wait_rebuilt(0.0) is True
    entered, release = threading.Event(), threading.Event()
    fuse_batch = km.MapProducts.fuse_batch

    def held(self, *args, **kwargs):
        entered.set()
        assert release.wait(30)
        return fuse_batch(self, *args, **kwargs)

    monkeypatch.setattr(km.MapProducts, "fuse_batch", held)
    m.update_poses({kf.id: shifted(kf.T_map_kf, [0.1, 0.0, 0.0]) for kf in m.keyframes})
    assert entered.wait(30)
    threading.Timer(10.0, release.set).start()  # a wait that ignored its timeout would end here, with True
    assert m.wait_rebuilt(0.3) is False and m.stale
    release.set()
    assert m.wait_rebuilt(30) is True and not m.stale


def test_an_own_spill_directory_is_removed_at_close_even_if_already_gone(tmp_path):
    """Without spill_dir the map spills to a temporary directory of its own and removes it at close(); a directory
    removed by someone else first is not an error. A spill_dir given by the user is never removed."""
    import shutil

    from map_helpers import room, small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    frames, _ = room(n=12)
    own = KeyframeMap(small_config(max_keyframes_in_memory=1, keyframe_max_frames=2))
    given = KeyframeMap(small_config(max_keyframes_in_memory=1, keyframe_max_frames=2, spill_dir=str(tmp_path / "s")))
    for f in frames:
        own.integrate(f)
        given.integrate(f)
    root = own.spill_root()
    assert root.is_dir() and any(root.iterdir()) and any((tmp_path / "s").iterdir())
    own.close()
    given.close()
    assert not root.exists() and (tmp_path / "s").is_dir()
    again = KeyframeMap(small_config(max_keyframes_in_memory=1, keyframe_max_frames=2))
    for f in frames:
        again.integrate(f)
    shutil.rmtree(again.spill_root())
    again.close()  # the directory is already gone: no error


@pytest.mark.parametrize(("field", "value", "message"), [
    ("stride", 0, "stride, keyframe_max_frames and max_keyframes_in_memory must be >= 1"),
    ("cloud_stride", 0, "stride, keyframe_max_frames and max_keyframes_in_memory must be >= 1"),
    ("keyframe_max_frames", 0, "stride, keyframe_max_frames and max_keyframes_in_memory must be >= 1"),
    ("max_keyframes_in_memory", 0, "stride, keyframe_max_frames and max_keyframes_in_memory must be >= 1"),
    ("keyframe_distance", 0.0, "keyframe_distance, keyframe_angle_deg and depth_max must be > 0"),
    ("keyframe_angle_deg", 0.0, "keyframe_distance, keyframe_angle_deg and depth_max must be > 0"),
    ("depth_max", 0.0, "keyframe_distance, keyframe_angle_deg and depth_max must be > 0"),
])
def test_keyframe_map_config_refuses_each_bad_setting_alone_with_its_reason(field, value, message):
    """Each setting on its own is refused (one bad value among good ones), with the message naming the settings;
    values just inside the limits are accepted."""
    from ros2_stream4d.mapping.keyframe_map import KeyframeMapConfig

    with pytest.raises(ValueError, match=f"^{message}$"):
        KeyframeMapConfig(**{field: value})
    ok = KeyframeMapConfig(stride=1, cloud_stride=1, keyframe_max_frames=1, max_keyframes_in_memory=1,
                           keyframe_distance=0.01, keyframe_angle_deg=0.5, depth_max=0.5)
    assert (ok.stride, ok.keyframe_angle_deg, ok.depth_max) == (1, 0.5, 0.5)


def test_the_cloud_takes_depths_above_zero_up_to_and_including_cloud_depth_max():
    """Points fused into the cloud: depth > 0 (0 = no measurement) and <= cloud_depth_max (a point exactly at the
    limit is kept); a depth below a metre is a point like any other. A Sim(3) pose scales the depth it fuses."""
    from ros2_stream4d.mapping.keyframe_map import KeyframeMapConfig, MapProducts

    depth = np.full((H, W), np.nan, np.float32)
    depth[10, 10], depth[10, 20], depth[20, 10], depth[20, 20] = 0.0, 0.5, 2.0, 2.5
    rgb = np.full((H, W, 3), 77, np.uint8)
    conf = np.ones((H, W), np.float32)
    cfg = KeyframeMapConfig(cloud_stride=1, cloud_voxel_size=0.01, cloud_depth_max=2.0, conf_percentile=0.0,
                            tsdf=False, occupancy=False, cloud_surface_voxels=0.0)
    p = MapProducts(cfg)
    p.fuse(depth, conf, rgb, K, np.eye(4))
    (xyz, _, _), _ = p.cloud_snapshot()
    assert sorted(np.round(xyz[:, 2], 3).tolist()) == [0.5, 2.0]
    S = np.eye(4)
    S[:3, :3] *= 1.5  # a Sim(3) keyframe pose: depths x 1.5, then the same limit
    q = MapProducts(cfg)
    q.fuse(depth, conf, rgb, K, S)
    (xyz, _, _), _ = q.cloud_snapshot()
    assert sorted(np.round(xyz[:, 2], 3).tolist()) == [0.75]


def test_surface_snapshot_judges_points_in_its_blocks_from_its_offset_lattice():
    """A hand-built snapshot: blocks of 0.5 m on a lattice offset by (0.1, 0.2, 0.3), blocks (0, 0, 0) and (3, 0, 0)
    allocated (the last key of the sorted list included), one surface point. A point is judged only inside an
    allocated block; it is contradicted when farther than `distance` from every surface point (at exactly the
    distance: not contradicted); with no surface point every judged point is contradicted."""
    from ros2_stream4d.mapping.fusion import pack_voxel_keys
    from ros2_stream4d.mapping.tsdf import SurfaceSnapshot

    offset = np.array([0.1, 0.2, 0.3])
    keys = np.sort(pack_voxel_keys(np.array([[0, 0, 0], [3, 0, 0]], np.int64)))
    surface = offset + np.array([[0.25, 0.25, 0.25]])
    snap = SurfaceSnapshot(surface, keys, 0.5, offset)
    pts = offset + np.array([
        [0.25, 0.25, 0.25],  # on the surface point, block (0, 0, 0)
        [0.50 - 1e-9, 0.25, 0.25],  # block (0, 0, 0), 0.25 m from the surface point: exactly the distance
        [0.25, 0.25, 0.1],  # block (0, 0, 0), 0.15 m away
        [0.05, 0.05, 0.45],  # block (0, 0, 0), 0.37 m away: contradicted
        [1.75, 0.25, 0.25],  # block (3, 0, 0) (the last key): far from the surface: contradicted
        [1.25, 0.25, 0.25],  # block (2, 0, 0): not allocated, not judged
        [-0.05, 0.25, 0.25],  # block (-1, 0, 0): not allocated (the lattice starts at the offset, not at 0)
    ])
    np.testing.assert_array_equal(snap.allocated(pts), [True, True, True, True, True, False, False])
    gap = np.linalg.norm(pts[1] - surface[0])
    np.testing.assert_array_equal(snap.contradicted(pts, gap), [False, False, False, True, True, False, False])
    np.testing.assert_array_equal(snap.contradicted(pts, gap * (1 - 1e-9)),
                                  [False, True, False, True, True, False, False])
    bare = SurfaceSnapshot(np.zeros((0, 3)), keys, 0.5, offset)
    np.testing.assert_array_equal(bare.contradicted(pts, 0.3), [True, True, True, True, True, False, False])
    none = SurfaceSnapshot(surface, np.zeros(0, np.int64), 0.5, offset)
    assert none.contradicted(pts, 0.3).tolist() == [False] * 7 and none.allocated(pts[:1]).dtype == bool
    assert snap.allocated(np.zeros((0, 3))).shape == (0,)
    one = pts[3].tolist()  # a single point given flat
    assert snap.contradicted(one, 0.3).tolist() == [True]


def test_an_empty_tsdf_answers_with_empty_arrays_of_the_right_shapes():
    """Before any frame, and after frames with no valid depth (0, NaN, beyond depth_max): no block, and every query
    answers with an empty array of its documented shape and dtype (the node serialises these as empty messages)."""
    t = TsdfVolume(voxel_size=0.1, depth_max=3.0)

    def check():
        v, f, c = t.mesh()
        assert (v.shape, v.dtype, f.shape, f.dtype, c.shape, c.dtype) == ((0, 3), np.float32, (0, 3), np.int32,
                                                                           (0, 3), np.uint8)
        s = t.surface_points()
        assert s.shape == (0, 3)
        snap = t.snapshot()
        assert snap.surface.shape == (0, 3) and snap.block_keys.shape == (0,) and snap.block_keys.dtype == np.int64
        assert snap.allocated(np.zeros((2, 3))).tolist() == [False, False]

    check()
    depth, rgb = _wall(z=1.23)
    depth[:] = 0.0
    depth[:, :10] = np.nan
    depth[:, 20:30] = 3.5  # beyond depth_max
    assert t.integrate(depth, rgb, K, _pose()) is False and t.blocks() == 0 and t.frames == 0
    check()
    depth[:, 40:] = 2.9  # within depth_max: fused
    assert t.integrate(depth, rgb, K, _pose()) is True and t.blocks() > 0 and t.frames == 1
    t.integrate(depth, rgb, K, _pose())  # a second view: the surface's weight passes min_weight
    assert len(t.surface_points()) > 0 and len(t.mesh()[1]) > 0


def test_the_memory_bound_keeps_exactly_the_configured_number_of_keyframes_in_memory():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    m = KeyframeMap(_cloud_config(keyframe_max_frames=1, max_keyframes_in_memory=2))
    for k in range(4):
        m.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.1 * k)), stamp=k))
    assert [kf.in_memory for kf in m.keyframes] == [False, False, True, True]
    assert m.stats()["keyframes in memory"] == 2 and len(list(m.spill_root().iterdir())) == 2
    m.close()


def test_the_map_builds_its_products_from_its_own_settings():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap
    from ros2_stream4d.mapping.occupancy import OccupancyOptions

    cfg = _cloud_config(tsdf=True, occupancy=True, tsdf_voxel_size=0.04, tsdf_trunc_voxels=4.0, depth_max=2.0,
                        occupancy_resolution=0.07, occupancy_floor_z=-0.3, occupancy_min_height=0.15,
                        occupancy_max_height=1.2, occupancy_max_range=4.0, occupancy_slab_height=0.1)
    assert cfg.occupancy_options() == OccupancyOptions(0.07, -0.3, 0.15, 1.2, 4.0, 0.1)
    m = KeyframeMap(cfg)
    t = m.tsdf
    assert (t.voxel_size, t.trunc_voxels, t.depth_max) == (0.04, 4.0, 2.0)
    assert m.grid.options == cfg.occupancy_options()


def test_each_pose_update_rebuilds_the_products_once_at_the_next_query():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    m = KeyframeMap(_cloud_config(keyframe_max_frames=1))
    for k in range(2):
        m.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.1 * k)), stamp=k))
    assert m.rebuilds == 0
    before = m.points()[0]
    for n, dz in enumerate((0.5, 1.0), start=1):
        m.update_poses({0: _pose(t=(0.0, 0.0, dz))})
        m.points()
        m.points()  # nothing changed since: no second rebuild
        assert m.rebuilds == n
    assert not np.array_equal(m.points()[0], before)


def test_a_background_rebuild_of_a_loaded_map_whose_ids_do_not_start_at_zero():
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, make_keyframe_map

    src = KeyframeMap(_cloud_config(keyframe_max_frames=1))
    for k in range(2):
        src.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.1 * k)), stamp=k))
    stored = [(kf.id + 3, kf.segment, kf.T_map_kf, src.frames_of(kf)) for kf in src.keyframes]  # ids 3 and 4
    m = make_keyframe_map(stored, _cloud_config(background_rebuild=True))
    assert m.wait_rebuilt(timeout=60.0) and not m.stale
    np.testing.assert_allclose(np.sort(m.points()[0], axis=0), np.sort(src.points()[0], axis=0), atol=1e-6)
    m.update_poses({4: _pose(t=(0.0, 0.0, 0.7))})
    assert m.wait_rebuilt(timeout=60.0) and m.rebuilds == 2


def test_pixels_exactly_at_depth_max_are_fused_and_one_frame_has_a_surface_below_weight_one():
    depth, rgb = _wall(1.5)
    depth[10:30, 20:40] = 2.0  # exactly depth_max: inside the range ("within depth_max")
    without = depth.copy()
    without[10:30, 20:40] = np.nan
    a, b = (TsdfVolume(voxel_size=0.05, depth_max=2.0, min_weight=0.5) for _ in range(2))
    assert a.integrate(depth, rgb, K, np.eye(4)) and b.integrate(without, rgb, K, np.eye(4))
    assert len(a.mesh()[0]) > len(b.mesh()[0])
    s = a.surface_points()
    assert (np.abs(s[:, 2] - 1.5) < 0.03).sum() > 100, "one frame (weight 1 > min_weight 0.5) has the wall"


def test_a_failed_background_rebuild_is_reported_not_waited_on_forever(tmp_path):
    """A rebuild thread that fails (here: a spilled keyframe file damaged on disk) records why, wakes wait_rebuilt
    (MapRebuildError, not a hang), shows in stats(), is not retried per frame, and a pose update tries again."""
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, MapRebuildError

    m = KeyframeMap(_cloud_config(keyframe_max_frames=1, max_keyframes_in_memory=1, background_rebuild=True,
                                  spill_dir=str(tmp_path / "spill")))
    for k in range(3):
        m.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.1 * k)), stamp=k))
    assert m.stats()["map rebuild error"] == "none"
    path = m.keyframes[0].spill_path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    m.update_poses({0: _pose(t=(0.0, 0.0, 0.3))})
    with pytest.raises(MapRebuildError, match=r"could not be rebuilt after a pose update: ValueError: .*kf_"):
        m.wait_rebuilt(timeout=60.0)
    assert m.stale and m.rebuilds == 0 and m.stats()["map rebuild error"].startswith("ValueError: ")
    m.integrate(_map_frame(_pose(t=(0.0, 0.0, 0.4)), stamp=9))  # frames go on into the current products
    assert m._rebuilder is None or not m._rebuilder.is_alive(), "no new attempt per frame"
    path.write_bytes(good)
    m.update_poses({0: _pose(t=(0.0, 0.0, 0.3))})
    assert m.wait_rebuilt(timeout=60.0) and m.rebuilds == 1 and m.stats()["map rebuild error"] == "none"
    m.close()


def test_surface_snapshot_pulls_the_points_it_keeps_toward_the_local_plane_of_its_surface():
    """A tilted plane (normal not along an axis) sampled by surface points 5 cm apart, each a few mm off it, and
    cloud points up to 4 cm off it: with pull p a kept point's offset from the plane shrinks to (1 - p) of what it
    was (the plane through twenty surface points, not the nearest point's own position), along the plane's normal
    only; pull 0 moves nothing; points beyond `distance` are left out, points outside fused space stay as they are."""
    from ros2_stream4d.mapping.fusion import pack_voxel_keys
    from ros2_stream4d.mapping.tsdf import SurfaceSnapshot

    rng = np.random.default_rng(3)
    n = np.array([0.3, -0.2, 1.0])
    n /= np.linalg.norm(n)
    u = np.cross(n, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    origin = np.array([1.0, 1.0, 1.0])
    g = np.stack(np.meshgrid(np.arange(-0.5, 0.5, 0.05), np.arange(-0.5, 0.5, 0.05)), -1).reshape(-1, 2)
    surface = origin + g[:, :1] * u + g[:, 1:] * v + rng.normal(0, 0.003, (len(g), 1)) * n
    blocks = np.unique(np.floor(surface / 0.4).astype(np.int64), axis=0)
    snap = SurfaceSnapshot(surface, np.sort(pack_voxel_keys(blocks)), 0.4, np.zeros(3))
    a = rng.uniform(-0.4, 0.4, (500, 2))
    off = rng.uniform(-0.04, 0.04, 500)
    pts = origin + a[:, :1] * u + a[:, 1:] * v + off[:, None] * n
    pts = pts[snap.allocated(pts)]
    off = (pts - origin) @ n
    keep0, same = snap.fit(pts, 0.1, 0.0)
    assert keep0.all() and np.array_equal(same, pts)
    for pull in (0.5, 0.75, 1.0):
        keep, moved = snap.fit(pts, 0.1, pull)
        assert keep.all()
        new_off = (moved - origin) @ n
        # the fitted plane is off the true one by 1-2 mm (the surface points' 3 mm noise, twenty at a time)
        np.testing.assert_allclose(new_off, (1 - pull) * off, atol=0.003)
        step = moved - pts
        # along the normal (the fitted one is within a few degrees of the true one)
        assert (np.linalg.norm(np.cross(step, n), axis=1) <= 0.06 * np.linalg.norm(step, axis=1) + 1e-12).all()
    far = pts + 0.2 * n  # 16-24 cm off: contradicted in fused space, kept where the snapshot cannot judge
    keep, moved = snap.fit(far, 0.1, 0.75)
    judged = snap.allocated(far)
    assert judged.sum() > 50 and not keep[judged].any() and keep[~judged].all()
    assert np.array_equal(moved[~judged], far[~judged])
    outside = np.array([[5.0, 5.0, 5.0]])
    keep, moved = snap.fit(outside, 0.1, 0.75)
    assert keep.tolist() == [True] and np.array_equal(moved, outside)
    with pytest.raises(ValueError, match="pull"):
        snap.fit(pts, 0.1, 1.5)
    two = SurfaceSnapshot(surface[:2], snap.block_keys, 0.4, np.zeros(3))  # no plane: kept, not moved
    near = surface[:2] + 0.02 * n
    keep, moved = two.fit(near, 0.1, 0.75)
    assert keep.all() and np.array_equal(moved, near)
    with pytest.raises(ValueError, match=">= 3 surface points"):
        two.local_planes()
    keep32, moved32 = snap.fit(pts.astype(np.float32), 0.1, 0.75)  # float32 in: judged and moved the same
    assert keep32.all() and np.abs(moved32 - snap.fit(pts, 0.1, 0.75)[1]).max() < 1e-5
