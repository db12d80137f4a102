"""The keyframe map: pose corrections move the cloud, mesh and grid; rebuilds equal the live map; memory bound by
spilling; a stream reset keeps the map; erase drops it."""

import numpy as np
import pytest
from map_helpers import assert_same_points, assert_same_products, room, shifted, small_config
from scipy.spatial import cKDTree

from ros2_stream4d.mapping.keyframe_map import KeyframeMap, KeyframeMapConfig, MapFrame


def build(frames, **kw) -> KeyframeMap:
    m = KeyframeMap(small_config(**kw))
    for f in frames:
        m.integrate(f)
    return m


def test_products_exist_and_lie_on_the_scene():
    frames, (V, F) = room()
    m = build(frames)
    xyz, rgb, conf = m.points()
    assert len(xyz) > 1000 and rgb.dtype == np.uint8 and (conf == 5.0).all()
    import open3d as o3d

    from ros2_stream4d.sim.render import mesh_raycasting_scene

    rc = mesh_raycasting_scene(V, F)
    assert np.median(rc.compute_distance(o3d.core.Tensor(xyz)).numpy()) < 0.01
    mv, mf, mc = m.mesh()
    assert len(mf) > 100 and mc.shape == mv.shape and mc.dtype == np.uint8
    assert np.median(rc.compute_distance(o3d.core.Tensor(mv)).numpy()) < 0.03
    data, origin, res = m.occupancy()
    assert data.dtype == np.int8 and set(np.unique(data)) <= {-1, 0, 100} and res == 0.1
    assert (data == 100).sum() > 10 and (data == 0).sum() > 100
    assert len(m.keyframes) >= 6 and all(kf.n_frames <= 4 for kf in m.keyframes)


def test_pose_correction_of_every_keyframe_moves_cloud_mesh_and_grid():
    frames, _ = room()
    m = build(frames)
    before = (m.points(), m.mesh(), m.occupancy())
    t = np.array([0.4, 0.2, 0.0])  # whole voxels and cells: the lattices line up again after the move
    m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})
    assert m.stale
    xyz = m.points()[0]
    assert_same_points(xyz, before[0][0] + t, 1e-4)
    # the TSDF is re-integrated from the moved poses: the same surface, up to pixel-rounding flips at its rim
    mv, moved = m.mesh()[0], before[1][0] + t
    assert abs(len(mv) - len(moved)) <= 0.01 * len(moved)
    for a, b in ((moved, mv), (mv, moved)):  # 10 cm voxels: the surface moved to within a twentieth of a voxel
        dist = cKDTree(a).query(b)[0]
        assert np.median(dist) < 1e-4 and np.percentile(dist, 99) < 5e-3
    data, origin, _ = m.occupancy()
    np.testing.assert_array_equal(data, before[2][0])
    np.testing.assert_allclose(origin, before[2][1] + t[:2], atol=1e-9)
    assert not m.stale and m.rebuilds == 1


def test_pose_correction_of_one_keyframe_moves_only_its_geometry():
    frames, _ = room()
    m = build(frames)
    kf = m.keyframes[2]
    far = np.array([20.0, 0.0, 0.0])  # away from everything: what lands there came from keyframe 2 alone
    m.update_poses({kf.id: shifted(kf.T_map_kf, far)})
    xyz = m.points()[0]
    assert (xyz[:, 0] > 12).any() and (xyz[:, 0] < 8).any()
    assert (m.mesh()[0][:, 0] > 12).any()
    data, origin, res = m.occupancy()
    cols_x = origin[0] + (np.arange(data.shape[1]) + 0.5) * res
    assert (data[:, cols_x > 12] != -1).any(), "the grid votes of the moved keyframe moved with it"
    # only keyframe 2's frames moved: rebuild with its old pose restores the map
    m.update_poses({kf.id: shifted(kf.T_map_kf, -far)})
    assert_same_products(m, build(frames))


def test_a_sim3_correction_resizes_the_keyframes_geometry():
    """A model whose scale drifted to one half saw depth and motion half as long; the pose graph's Sim(3) (scale 2)
    written into the keyframes gives back the true map: cloud, mesh and grid equal to those of the true frames."""
    import dataclasses

    frames, _ = room()
    half = []
    for f in frames:
        T = f.T_map_cam.copy()
        T[:3, 3] /= 2
        half.append(dataclasses.replace(f, T_map_cam=T, depth=f.depth / 2))
    m = build(half)
    D = np.diag([2.0, 2.0, 2.0, 1.0])
    m.update_poses({kf.id: D @ kf.T_map_kf for kf in m.keyframes})
    assert_same_products(m, build(frames), atol=1e-4)
    # new frames integrate into the corrected map at their own (rigid) pose, whatever the keyframe's scale
    n = len(m.points()[0])
    m.integrate(frames[-1])
    assert len(m.points()[0]) == n, "the last true frame adds nothing new to the true map"

    with pytest.raises(ValueError, match="not a rigid or Sim"):
        shear = np.eye(4)
        shear[0, 1] = 0.3
        m.update_poses({m.keyframes[0].id: shear})
    with pytest.raises(ValueError, match="not a rigid or Sim"):
        m.update_poses({m.keyframes[0].id: np.diag([-1.0, 1.0, 1.0, 1.0])})  # a reflection
    # an update with one bad pose changes none (all are checked before any is written)
    before = m.keyframe_poses()
    with pytest.raises(ValueError, match=f"keyframe {m.keyframes[1].id} is not a rigid or Sim"):
        m.update_poses({m.keyframes[0].id: shifted(before[m.keyframes[0].id], (1.0, 0.0, 0.0)),
                        m.keyframes[1].id: np.diag([1.0, 1.0, 2.0, 1.0])})
    for kid, T in m.keyframe_poses().items():
        np.testing.assert_array_equal(T, before[kid])

    # frames may enter through a Sim(3) pose (a back-end's scale correction of the odometry): the half-size stream
    # integrated at D x its poses is the true map, and each frame's pose relative to its keyframe stays the stream's
    m2 = build([dataclasses.replace(f, T_map_cam=D @ f.T_map_cam) for f in half])
    assert_same_products(m2, build(frames), atol=1e-4)
    by_stamp = {f.stamp_ns: f.T_map_cam for f in half}
    for kf in m2.keyframes:
        fr = m2.frames_of(kf)
        for stamp, rel in zip(fr.stamps, fr.T_kf_cam):
            np.testing.assert_allclose(rel, np.linalg.inv(by_stamp[int(fr.stamps[0])]) @ by_stamp[int(stamp)],
                                       atol=1e-9)


def test_rebuild_equals_live_map_and_memory_is_bounded_by_spilling(tmp_path):
    frames, _ = room()
    live = build(frames, max_keyframes_in_memory=2, keyframe_max_frames=2, spill_dir=str(tmp_path))
    assert sum(kf.in_memory for kf in live.keyframes) <= 2 and len(live.keyframes) >= 10
    spilled = [kf for kf in live.keyframes if not kf.in_memory]
    assert spilled and all(kf.spill_path.parent == tmp_path and kf.spill_path.is_file() for kf in spilled)
    reference = build(frames, keyframe_max_frames=2)  # all in memory
    assert_same_products(live, reference)
    live.update_poses(live.keyframe_poses())  # same poses: the rebuild (reading spilled keyframes) is the live map
    assert live.stale
    assert_same_products(live, reference)
    live.erase()
    assert list(tmp_path.iterdir()) == [] and len(live) == 0 and live.keyframes == []
    assert live.mesh()[1].shape == (0, 3) and live.occupancy()[0].size == 0


def test_stream_reset_starts_a_new_segment_and_keeps_the_map():
    frames, _ = room()
    m = build(frames[:10])
    n = len(m)
    kfs = len(m.keyframes)
    m.new_segment()
    m.integrate(frames[10])  # right next to the last keyframe: a new one anyway (new segment)
    assert len(m.keyframes) == kfs + 1 and m.keyframes[-1].segment == 1 and m.keyframes[-2].segment == 0
    assert len(m) >= n
    for f in frames[11:]:
        m.integrate(f)
    assert {kf.segment for kf in m.keyframes} == {0, 1}


def test_keyframe_selection_by_distance_angle_and_count():
    frames, _ = room()
    f0 = frames[0]
    m = KeyframeMap(small_config(keyframe_distance=0.3, keyframe_angle_deg=15, keyframe_max_frames=3))

    def at(T):
        return MapFrame(f0.stamp_ns, T, f0.depth, f0.rgb, f0.K, f0.conf)

    m.integrate(at(f0.T_map_cam))
    m.integrate(at(shifted(f0.T_map_cam, [0.2, 0, 0])))
    assert len(m.keyframes) == 1
    m.integrate(at(shifted(f0.T_map_cam, [0.35, 0, 0])))
    assert len(m.keyframes) == 2
    R = np.eye(4)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    R[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    m.integrate(at(m.keyframes[-1].T_map_kf @ R))
    assert len(m.keyframes) == 3
    for _ in range(3):
        m.integrate(at(m.keyframes[-1].T_map_kf))
    assert [kf.n_frames for kf in m.keyframes] == [2, 1, 3, 1]
    # stored relative poses put every frame back where it was
    kf = m.keyframes[0]
    np.testing.assert_allclose(kf.T_map_kf @ kf.frames.T_kf_cam[1], shifted(f0.T_map_cam, [0.2, 0, 0]), atol=1e-12)


def test_invalid_depth_and_bad_inputs():
    frames, _ = room()
    f = frames[0]
    m = KeyframeMap(small_config())
    holes = f.depth.copy()
    holes[:, : f.depth.shape[1] // 2] = np.nan  # the confidence mask rejected the left half
    m.integrate(MapFrame(f.stamp_ns, f.T_map_cam, holes, f.rgb, f.K))
    full = build([f])
    assert 0 < len(m) < len(full)
    with pytest.raises(ValueError, match="4x4"):
        m.integrate(MapFrame(0, np.eye(3), f.depth, f.rgb, f.K))
    with pytest.raises(ValueError, match="rgb"):
        m.integrate(MapFrame(0, f.T_map_cam, f.depth, f.rgb[:, :-1], f.K))
    with pytest.raises(KeyError, match="no keyframes"):
        m.update_poses({99: np.eye(4)})
    with pytest.raises(ValueError):
        KeyframeMapConfig(occupancy_min_height=2.0, occupancy_max_height=1.0)


def test_products_can_be_switched_off():
    frames, _ = room()
    m = build(frames[:4], tsdf=False, occupancy=False)
    assert len(m) > 0 and m.mesh()[0].shape == (0, 3) and m.occupancy()[0].size == 0


def test_background_rebuild_keeps_integrating_and_ends_equal_to_a_synchronous_one(tmp_path):
    """background_rebuild (the back-end's setting): a pose update never rebuilds in the frame thread; frames
    integrated while the rebuild runs are in the swapped-in products, which equal a synchronous rebuild's."""
    frames, _ = room()
    half = len(frames) // 2
    t = np.array([0.4, 0.2, 0.0])
    sync = build(frames[:half], max_keyframes_in_memory=2, keyframe_max_frames=2, spill_dir=str(tmp_path / "a"))
    bg = build(frames[:half], max_keyframes_in_memory=2, keyframe_max_frames=2, spill_dir=str(tmp_path / "b"),
               background_rebuild=True)
    before = bg.points()[0]
    for m in (sync, bg):
        m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})
    assert bg.stale
    for f in frames[half:]:  # integrating goes on while the rebuild runs (into the current products)
        sync.integrate(f)
        bg.integrate(f)
    assert bg.wait_rebuilt(60) and not bg.stale and bg.rebuilds == 1
    assert_same_products(bg, sync)
    assert not np.array_equal(np.sort(bg.points()[0], axis=0), np.sort(before, axis=0))
    # a pose update during a rebuild lets it finish (swapped in) and another follows with the new poses; an erase
    # drops it
    bg.update_poses({kf.id: shifted(kf.T_map_kf, -t) for kf in bg.keyframes})
    bg.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in bg.keyframes})
    assert bg.wait_rebuilt(60)
    assert_same_products(bg, sync)
    bg.update_poses(bg.keyframe_poses())
    bg.erase()
    assert bg.wait_rebuilt(1) and len(bg) == 0 and bg.keyframes == []


def test_a_rebuild_finishes_when_poses_change_during_it_and_another_follows(monkeypatch):
    """On a long run corrections come faster than a rebuild of the whole map; a rebuild that restarted at every
    pose update never finished (the map never showed a correction). Now it is swapped in, then the next one runs."""
    import threading

    from ros2_stream4d.mapping import keyframe_map as km

    frames, _ = room()
    m = build(frames, background_rebuild=True)
    entered, release = threading.Event(), threading.Event()
    fuse_batch = km.MapProducts.fuse_batch

    def held_once(self, *args, **kwargs):
        if not release.is_set():
            entered.set()
            assert release.wait(30)
        return fuse_batch(self, *args, **kwargs)

    monkeypatch.setattr(km.MapProducts, "fuse_batch", held_once)
    t = np.array([0.4, 0.2, 0.0])
    m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})
    assert entered.wait(30), "the rebuild started"
    m.update_poses({kf.id: shifted(kf.T_map_kf, t) for kf in m.keyframes})  # while it runs
    release.set()
    assert m.wait_rebuilt(60) and m.rebuilds == 2, "the first build was swapped in, then one with the new poses"
    ref = build(frames)
    ref.update_poses({kf.id: shifted(kf.T_map_kf, 2 * t) for kf in ref.keyframes})
    assert_same_products(m, ref)


# ------------------------------------------------------------------------------- the cloud's surface filter
def _wall_frames(n=6, outlier_every=7, h=48, w=64, z=2.0):
    """n views of a wall z metres ahead, the camera sliding sideways; every outlier_every-th pixel of each frame has
    its depth 40 % short (a wrong depth in free space in front of the wall)."""
    K = np.array([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]])
    out = []
    for i in range(n):
        d = np.full((h, w), z, np.float32)
        d.reshape(-1)[i % outlier_every::outlier_every] = 0.6 * z
        T = np.eye(4)
        T[0, 3] = 0.05 * i
        out.append(MapFrame(1_000_000_000 + i * 100_000_000, T, d, np.full((h, w, 3), 128, np.uint8), K,
                            np.full((h, w), 5.0, np.float32)))
    return out


def test_the_map_cloud_leaves_out_what_the_fused_surface_contradicts():
    frames = _wall_frames()
    raw = build(frames, cloud_surface_voxels=0.0).points()[0]
    m = build(frames, cloud_surface_voxels=1.0)
    kept = m.points()[0]
    # the outliers (1.2 m) are in the unfiltered cloud and not in the filtered one; the wall (2 m) is in both
    assert (np.abs(raw[:, 2] - 1.2) < 0.05).sum() > 100
    assert not (np.abs(kept[:, 2] - 1.2) < 0.3).any()
    wall = np.abs(raw[:, 2] - 2.0) < 0.05
    # (the wall's side edges, seen by one frame only, have no surface (weight must exceed the TSDF's min_weight))
    assert (np.abs(kept[:, 2] - 2.0) < 0.05).sum() >= 0.9 * wall.sum()
    assert m.products.surface_filtered and not build(frames, cloud_surface_voxels=1.0, tsdf=False).products.surface_filtered
    # without the TSDF nothing can contradict a point: every voxel is kept
    assert len(build(frames, cloud_surface_voxels=1.0, tsdf=False).points()[0]) == len(raw)
    with pytest.raises(ValueError, match="cloud_surface_voxels"):
        small_config(cloud_surface_voxels=-1.0)


def test_tsdf_judges_points_only_in_the_space_it_fused():
    from ros2_stream4d.mapping.tsdf import TsdfVolume

    frames = _wall_frames(outlier_every=10**9)  # no outliers: one clean wall at z = 2 m
    vol = TsdfVolume(voxel_size=0.05, trunc_voxels=4.0, depth_max=5.0)
    for f in frames:
        vol.integrate(f.depth, f.rgb, f.K, f.T_map_cam)
    surface = vol.surface_points()
    assert len(surface) > 100 and np.abs(surface[:, 2] - 2.0).max() < 0.03
    pts = np.array([[0.1, 0.0, 2.0],    # on the wall: kept (surface points are ~a voxel apart along the wall)
                    [0.1, 0.0, 2.02],   # 2 cm behind it: within one voxel (5 cm) of a surface point
                    [0.1, 0.0, 1.9],    # 10 cm in front, in fused space: contradicted
                    [0.1, 0.0, 1.85],   # 15 cm in front: contradicted
                    [0.1, 0.0, 9.0],    # far behind, never fused (no block): not judged
                    [30.0, 0.0, 2.0]])  # beside the scene: not judged
    np.testing.assert_array_equal(vol.allocated(pts), [True, True, True, True, False, False])
    np.testing.assert_array_equal(vol.contradicted(pts, 0.05), [False, False, True, True, False, False])
    np.testing.assert_array_equal(vol.contradicted(pts, 0.12), [False, False, False, True, False, False])
    empty = TsdfVolume(voxel_size=0.05)
    assert len(empty.surface_points()) == 0 and not empty.contradicted(pts, 0.05).any()


def test_confident_depth_cuts_at_the_percentile_of_the_rated_pixels():
    from ros2_stream4d.mapping.keyframe_map import confident_depth

    depth = np.arange(1, 41, dtype=np.float32).reshape(4, 10)
    conf = np.tile(np.arange(10, dtype=np.float32), (4, 1))  # column 0 unrated (0), then 1 .. 9
    conf[3, 9] = np.nan
    out = confident_depth(depth, conf, 50.0)
    # the median of the rated confidences (1 .. 9) is 5: columns 5 .. 9 stay, the NaN confidence does not
    assert np.isnan(out[:, :5]).all() and np.isnan(out[3, 9])
    np.testing.assert_array_equal(out[:3, 5:], depth[:3, 5:])
    assert np.isfinite(out).sum() == 19 and out.dtype == np.float32
    assert np.isnan(confident_depth(depth, np.zeros_like(conf), 10.0)).all()  # nothing rated: nothing fused
    with pytest.raises(ValueError, match="conf_percentile"):
        small_config(conf_percentile=100.0)


def test_a_map_query_filters_the_cloud_outside_the_maps_lock(monkeypatch):
    """The frame thread integrates under the map's lock; the surface filter's KD-tree queries and plane fits (1-3 s
    for a large map) must not hold it."""
    import threading

    from ros2_stream4d.mapping.tsdf import SurfaceSnapshot

    m = build(_wall_frames(), cloud_surface_voxels=1.0)
    free = []
    real = SurfaceSnapshot.fit

    def probe(self, points, distance, pull):
        t = threading.Thread(target=lambda: free.append(m._lock.acquire(timeout=0) and (m._lock.release() or True)))
        t.start()
        t.join()
        return real(self, points, distance, pull)

    monkeypatch.setattr(SurfaceSnapshot, "fit", probe)
    kept = m.points()[0]
    assert free == [True]  # another thread could take the lock while the query ran
    assert not (np.abs(kept[:, 2] - 1.2) < 0.3).any()  # and the query still filtered


def test_the_map_cloud_is_pulled_toward_the_fused_surface():
    """Views of a wall with 3 cm of depth noise per pixel: the TSDF averages the frames, a 2 cm cloud voxel a few
    samples. With cloud_surface_pull 0.75 the cloud's points lie closer to the wall than without (RMS at most 60 %
    of it), the same points are kept, and the pull does not move the wall (mean offset within 5 mm)."""
    rng = np.random.default_rng(0)
    frames = _wall_frames(n=8, outlier_every=10**6)
    for f in frames:
        f.depth = (f.depth + rng.normal(0, 0.03, f.depth.shape)).astype(np.float32)
    raw = build(frames, cloud_surface_voxels=2.0, cloud_surface_pull=0.0).points()[0]
    pulled = build(frames, cloud_surface_voxels=2.0, cloud_surface_pull=0.75).points()[0]
    assert len(pulled) == len(raw) > 1000
    # z-depth is the distance to the wall (z = 2) for every pixel
    rms_raw, rms_pulled = np.sqrt(np.mean((raw[:, 2] - 2.0) ** 2)), np.sqrt(np.mean((pulled[:, 2] - 2.0) ** 2))
    assert rms_pulled < 0.6 * rms_raw, (rms_raw, rms_pulled)
    assert abs(np.mean(pulled[:, 2]) - 2.0) < 0.005
    with pytest.raises(ValueError, match="cloud_surface_pull"):
        small_config(cloud_surface_pull=1.5)
