"""mapping/: reconstructor (against fake sessions and a random-small model), scale, gating, clouds, fusion, frames."""

import numpy as np
import pytest
import torch

from ros2_stream4d.mapping import conventions as cv
from ros2_stream4d.mapping.cloud import CloudOptions, frame_cloud
from ros2_stream4d.mapping.fusion import VoxelMap, pack_voxel_keys, unpack_voxel_keys
from ros2_stream4d.mapping.gating import KeyframeGate
from ros2_stream4d.mapping.preprocess import Preprocessor
from ros2_stream4d.mapping.reconstructor import (
    FramePrediction,
    StreamingReconstructor,
    build_session,
    nominal_K,
    resolve_model_spec,
)
from ros2_stream4d.mapping.scale import DepthSensorScale, FixedScale, OdometryScale, make_scale_source


def rot(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def pose(i):
    """A known world-from-camera pose of frame i (frame 0 = identity = the world)."""
    return cv.make_transform(rot([0.2, 1, 0.1], 0.05 * i), [0.1 * i, -0.02 * i, 0.05 * i])


class FakeSession:
    """Sees a fronto-parallel-ish depth ramp; returns exact geometry like the sim oracle (or a pose encoding)."""

    window, anchors = None, 1  # the StreamingSession protocol (model/session.py)

    def __init__(self, exact=True, fov=(0.9, 1.1)):
        self.exact, self.fov, self.i, self.calls = exact, fov, 0, []

    @property
    def frames_seen(self):
        return self.i

    def stats(self):
        return None

    def shrunk(self, window):
        return None

    def reset(self):
        self.i = 0

    def step(self, image, stamp_ns=None, mapping=None):
        self.calls.append((tuple(image.shape), image.dtype, stamp_ns, mapping))
        _, _, h, w = image.shape
        depth = 2.0 + np.linspace(0, 1, w)[None, :] + np.linspace(0, 0.5, h)[:, None]
        K = np.array([[(w / 2) / np.tan(self.fov[1] / 2), 0, w / 2], [0, (h / 2) / np.tan(self.fov[0] / 2), h / 2],
                      [0, 0, 1]])
        T = pose(self.i)
        self.i += 1
        world = cv.unproject_depth(depth, K, T)
        E = cv.inverse(T)[:3]
        out = {
            "depth": torch.tensor(depth, dtype=torch.float32)[None, :, :, None],
            "depth_conf": torch.full((1, h, w), 3.0),
            "world_points": torch.tensor(world)[None],
            "world_points_conf": torch.full((1, h, w), 2.0),
        }
        if self.exact:
            out["extrinsic"], out["intrinsic"] = torch.tensor(E)[None], torch.tensor(K)[None]
        else:
            from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding

            out["pose_enc"] = extri_intri_to_pose_encoding(torch.tensor(E)[None], torch.tensor(K)[None], (h, w)).float()
        return out


IMG = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def recon(session=None, **kw):
    return StreamingReconstructor(session or FakeSession(), Preprocessor(112, kw.pop("mode", "crop")), **kw)


# ------------------------------------------------------------------------------------------------ reconstructor
def test_step_passes_the_image_its_stamp_and_its_pixel_mapping():
    r = recon()
    pred = r.step(IMG, 123)
    shape, dtype, stamp, mapping = r.session.calls[0]
    assert shape == (1, 3, 84, 112) and dtype == torch.float32 and stamp == 123 and mapping is pred.mapping


def test_prediction_geometry_from_exact_session():
    r = recon()
    for i in range(3):
        pred = r.step(IMG, i)
    assert pred.intrinsics_source == "session" and pred.stamp_ns == 2
    np.testing.assert_allclose(pred.T_world_cam, pose(2), atol=1e-6)
    assert pred.depth.shape == (84, 112) and pred.points_world.shape == (84, 112, 3)
    assert pred.rgb_model.dtype == np.uint8 and pred.rgb_model.shape == (84, 112, 3)
    # "depth" points (unprojected here) equal the session's exact world points used in "point_head" mode
    r_ph = recon(points_source="point_head")
    for i in range(3):
        pred_ph = r_ph.step(IMG, i)
    np.testing.assert_allclose(pred_ph.points_world, pred.points_world, atol=1e-4)
    assert pred.points_conf[0, 0] == 3.0 and pred_ph.points_conf[0, 0] == 2.0
    assert r.stats.frames == 3 and set(r.stats.last_s) == {"preprocess", "model", "postprocess"}


def test_pose_encoding_path_recovers_pose_and_fov_intrinsics():
    pytest.importorskip("ros2_stream4d.model.geometry")
    r = recon(FakeSession(exact=False))
    r.step(IMG, 0)
    pred = r.step(IMG, 1)
    assert pred.intrinsics_source == "model"
    np.testing.assert_allclose(pred.T_world_cam, pose(1), atol=1e-5)
    exact = recon().step(IMG, 0)
    np.testing.assert_allclose(pred.K_model, exact.K_model, rtol=1e-5)


def test_camera_info_intrinsics_and_source_geometry():
    K_src = np.array([[150.0, 0, 80.0], [0, 150.0, 60.0], [0, 0, 1]])
    pred = recon(intrinsics="camera_info").step(IMG, 0, K_src=K_src)
    assert pred.intrinsics_source == "camera_info"
    np.testing.assert_allclose(pred.K_model, pred.mapping.source_to_model_K(K_src))
    np.testing.assert_allclose(pred.K_source, K_src, atol=1e-9)
    # depth back in the source geometry: same size as the camera, finite where the model saw (all of it here)
    d = pred.depth_source()
    assert d.shape == (120, 160) and np.isfinite(d).all()
    # without CameraInfo the model's intrinsics are kept
    assert recon(intrinsics="camera_info").step(IMG, 0).intrinsics_source == "session"


def test_source_geometry_has_nan_where_cropped():
    tall = np.zeros((300, 100, 3), np.uint8)
    pred = recon().step(tall, 0)
    d = pred.depth_source()
    assert np.isnan(d[0]).all() and np.isnan(d[-1]).all() and np.isfinite(d[150]).all()
    assert np.isnan(pred.depth_conf_source()[0]).all()


def test_scaled_prediction():
    pred = recon().step(IMG, 0)
    r = recon()
    r.step(IMG, 0)
    p1 = r.step(IMG, 1)
    s = p1.scaled(2.5)
    np.testing.assert_allclose(s.depth, p1.depth * 2.5, rtol=1e-6)
    np.testing.assert_allclose(s.points_world, p1.points_world * 2.5, rtol=1e-5)
    np.testing.assert_allclose(s.T_world_cam[:3, :3], p1.T_world_cam[:3, :3])
    np.testing.assert_allclose(s.T_world_cam[:3, 3], p1.T_world_cam[:3, 3] * 2.5)
    assert s.scale == 2.5 and pred.scale == 1.0
    with pytest.raises(ValueError, match="positive"):
        p1.scaled(0.0)


def test_size_change_mid_stream_needs_reset():
    r = recon()
    r.step(IMG, 0)
    with pytest.raises(ValueError, match="reset"):
        r.step(np.zeros((300, 100, 3), np.uint8), 1)
    r.reset()
    assert r.step(np.zeros((300, 100, 3), np.uint8), 1).mapping.model_hw == (112, 112)


def test_bad_sessions_and_outputs():
    with pytest.raises(TypeError, match="StreamingSession protocol"):
        StreamingReconstructor(object(), Preprocessor(112))
    with pytest.raises(ValueError, match="points_source"):
        recon(points_source="lidar")

    class Broken(FakeSession):
        def step(self, image, stamp_ns=None, mapping=None):
            out = super().step(image, stamp_ns, mapping)
            out["depth"] = out["depth"][:, :10]
            return out

    with pytest.raises(ValueError, match="'depth' has shape"):
        recon(Broken()).step(IMG, 0)


@pytest.mark.timeout(120)
def test_random_small_model_end_to_end_is_finite():
    session = build_session("random-small", window=2)
    r = StreamingReconstructor(session, Preprocessor(56))
    for i in range(3):
        pred = r.step(IMG, i)
    assert pred.depth.shape == (42, 56)
    assert np.isfinite(pred.points_world).all() and np.isfinite(pred.T_world_cam).all()
    assert np.isfinite(pred.K_model).all() and pred.K_model[0, 0] > 0
    xyz, rgb, conf = frame_cloud(pred)
    assert xyz.shape[0] == 42 * 56 and np.isfinite(xyz).all()


def test_model_spec_resolution(tmp_path):
    assert resolve_model_spec("random-small") == ("random", None)
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"x")
    assert resolve_model_spec(str(ckpt)) == ("checkpoint", ckpt)
    card = tmp_path / "tiny.yaml"
    card.write_text("name: tiny\nconfig: {preset: small, depth: 2}\nseed: 3\n")
    assert resolve_model_spec(str(card)) == ("card", card)
    with pytest.raises(FileNotFoundError, match="model card"):
        resolve_model_spec("no-such-model")
    session = build_session(str(card), window=2)
    assert session.step(torch.rand(1, 3, 28, 28))["depth"].shape == (1, 28, 28, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: {preset: small}\nweigths: typo.pth\n")
    with pytest.raises(ValueError, match="unknown keys"):
        build_session(str(bad))


def test_nominal_K():
    K = nominal_K((392, 518), 90.0)
    assert K[0, 0] == pytest.approx(259.0) and K[0, 2] == 259.0 and K[1, 2] == 196.0


# ---------------------------------------------------------------------------------------------------------- scale
def test_fixed_scale():
    assert FixedScale(2.0).scale == 2.0 and FixedScale(2.0).valid
    with pytest.raises(ValueError):
        FixedScale(-1)
    assert make_scale_source("none").scale == 1.0
    with pytest.raises(ValueError, match="scale source"):
        make_scale_source("gps")


def test_depth_sensor_scale_known_answer_and_garbage():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.5, 3, (60, 80))
    sensor = pred * 1.7
    sensor[::7] = np.nan  # holes
    sensor[:, ::9] = 0.0  # invalid zeros
    sensor[5, :40] = np.inf
    sensor[10:14] *= 10  # 5 % outliers cannot move a median
    s = DepthSensorScale(window=5, min_pixels=100, max_depth=100)
    assert not s.valid and s.scale == 1.0
    assert s.update(sensor, pred) == pytest.approx(1.7)
    assert s.valid and s.scale == pytest.approx(1.7)
    # a frame of garbage is rejected and leaves the estimate alone
    assert s.update(np.full((60, 80), np.nan), pred) is None
    assert s.update(sensor, np.zeros_like(pred)) is None
    assert s.scale == pytest.approx(1.7)
    # one wild frame among several good ones: the windowed median ignores it
    s.update(sensor * 100, pred)
    s.update(sensor, pred)
    assert s.scale == pytest.approx(1.7)
    with pytest.raises(ValueError, match="shape"):
        s.update(sensor[:10], pred)
    s.reset()
    assert not s.valid


def test_odometry_scale_known_answer():
    T_base_cam = cv.make_transform(cv.R_BODY_OPTICAL, [0.3, 0.0, 0.5])
    s = OdometryScale(min_motion=0.1, window=10, T_base_cam=T_base_cam)
    true_scale = 0.4  # metres per model unit
    for i in range(12):
        T_odom_base = cv.make_transform(rot([0, 0, 1], 0.1 * i), [0.05 * i, 0.01 * i * i, 0])
        # world = the camera at i = 0, where odom = base: T_world_cam = inv(T_base_cam) @ T_odom_base @ T_base_cam
        T_world_cam = cv.inverse(T_base_cam) @ T_odom_base @ T_base_cam
        T_world_cam[:3, 3] /= true_scale
        s.update(T_odom_base, T_world_cam)
    assert s.valid and s.samples >= 3 and s.scale == pytest.approx(true_scale, rel=1e-9)


def test_odometry_scale_ignores_small_motion_and_garbage():
    s = OdometryScale(min_motion=0.5)
    s.update(np.eye(4), np.eye(4))
    assert s.update(cv.make_transform(t=[0.1, 0, 0]), cv.make_transform(t=[1, 0, 0])) is None  # below threshold
    assert s.update(cv.make_transform(t=[1.0, 0, 0]), np.eye(4)) is None  # no predicted motion: no ratio
    assert not s.valid
    with pytest.raises(ValueError, match="4x4"):
        s.update(np.full((4, 4), np.nan), np.eye(4))


# --------------------------------------------------------------------------------------------------------- gating
def test_keyframe_gate():
    g = KeyframeGate(threshold=0.02, max_skip=2)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
    assert g.check(a).reason == "first"
    d = g.check(noisy)
    assert not d.keep and d.reason == "duplicate" and d.difference < 0.02
    assert g.check(noisy).reason == "duplicate"
    d = g.check(noisy)
    assert d.keep and d.reason == "max_skip" and d.skipped == 2
    assert g.check(255 - a).reason == "changed"
    assert g.check(a[:24]).reason == "size_changed"
    assert KeyframeGate(enabled=False).check(a).reason == "disabled"
    with pytest.raises(ValueError, match="uint8"):
        g.check(a.astype(np.float32))


def test_gate_compares_against_last_kept_frame():
    g = KeyframeGate(threshold=0.05, max_skip=100)
    base = np.full((40, 40), 100, np.uint8)
    g.check(base)
    # a slow drift of 3 grey levels per frame: each step is tiny, but the sum triggers a keyframe
    reasons = [g.check(base + 3 * i).reason for i in range(1, 8)]
    assert "changed" in reasons and reasons[0] == "duplicate"


# ---------------------------------------------------------------------------------------------------------- cloud
def make_pred(h=6, w=8, mode="crop"):
    from ros2_stream4d.mapping.preprocess import PixelMapping

    mapping = PixelMapping((h, w), (h, w), 1.0, 1.0, 0.0, 0.0)
    K = np.array([[10.0, 0, w / 2], [0, 10.0, h / 2], [0, 0, 1]])
    depth = np.full((h, w), 2.0, np.float32)
    depth[0, 0] = np.nan
    T = cv.make_transform(rot([0, 1, 0], 0.3), [1, 2, 3])
    conf = np.arange(h * w, dtype=np.float32).reshape(h, w) + 1
    rgb = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    return FramePrediction(7, depth, conf, cv.unproject_depth(depth, K, T), conf, T, K, mapping, rgb)


def test_frame_cloud_filters_and_frames():
    p = make_pred()
    xyz, rgb, conf = frame_cloud(p)
    assert xyz.shape == (47, 3) and rgb.shape == (47, 3) and conf.shape == (47,)  # the NaN pixel is gone
    assert xyz.dtype == np.float32 and rgb.dtype == np.uint8 and conf.dtype == np.float32
    np.testing.assert_array_equal(rgb[0], p.rgb_model[0, 1])
    cam, _, _ = frame_cloud(p, frame="camera")
    np.testing.assert_allclose(cam[:, 2], 2.0, rtol=1e-6)  # z-depth in the optical frame
    np.testing.assert_allclose(cv.transform_points(p.T_world_cam, cam), xyz, atol=1e-5)
    assert (frame_cloud(p, conf_threshold=40)[2] >= 40).all() and len(frame_cloud(p, conf_threshold=40)[2]) == 9
    assert len(frame_cloud(p, conf_percentile=50)[2]) == 24
    assert len(frame_cloud(p, stride=2)[0]) == 11  # 3 x 4 grid minus the NaN corner
    sub = frame_cloud(p, max_points=10)
    assert len(sub[0]) == 10 and np.array_equal(sub[0], frame_cloud(p, max_points=10)[0])  # reproducible
    with pytest.raises(ValueError, match="stride"):
        frame_cloud(p, stride=0)
    with pytest.raises(TypeError, match="either"):
        frame_cloud(p, CloudOptions(), stride=2)


def test_frame_cloud_drops_padding():
    from ros2_stream4d.mapping.preprocess import PixelMapping

    p = make_pred()
    padded = FramePrediction(**{**p.__dict__, "mapping": PixelMapping((4, 8), (6, 8), 1.0, 1.0, 0.0, 1.0)})
    assert len(frame_cloud(padded)[0]) == 32  # rows 1..4 only, all finite


# --------------------------------------------------------------------------------------------------------- fusion
def test_voxel_keys_round_trip_and_order():
    ijk = np.array([[-(2**20), 0, 5], [2**20 - 1, -3, -(2**20)], [0, 0, 0], [0, 0, 1], [0, 1, -5]])
    np.testing.assert_array_equal(unpack_voxel_keys(pack_voxel_keys(ijk)), ijk)
    keys = pack_voxel_keys(ijk)
    assert (keys >= 0).all()
    assert list(np.argsort(keys)) == list(np.lexsort(ijk[:, ::-1].T))


def test_voxel_means_exact():
    m = VoxelMap(voxel_size=1.0, max_points=100)
    xyz = np.array([[0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [1.5, 0.5, 0.5], [-0.5, 0.5, 0.5]])
    rgb = np.array([[10, 20, 30], [20, 40, 60], [1, 2, 3], [255, 255, 255]], np.uint8)
    assert m.integrate(xyz, rgb, np.array([1.0, 3.0, 2.0, 5.0])) == 3
    assert m.integrate(np.array([[0.9, 0.1, 0.2]]), np.array([[30, 0, 0]], np.uint8), np.array([2.0])) == 0
    pts, cols, conf = m.points()
    order = np.argsort(pts[:, 0])
    pts, cols, conf = pts[order], cols[order], conf[order]
    np.testing.assert_allclose(pts[1], [0.5, 0.3, 0.4], atol=1e-7)  # mean of 3 points in voxel (0, 0, 0)
    np.testing.assert_array_equal(cols[1], [20, 20, 30])
    assert conf[1] == 3.0 and conf[0] == 5.0
    assert m.points(conf="mean")[2][np.argsort(m.points()[0][:, 0])][1] == pytest.approx(2.0)
    np.testing.assert_array_equal(m.voxel_indices()[np.argsort(m.points()[0][:, 0])], [[-1, 0, 0], [0, 0, 0],
                                                                                          [1, 0, 0]])


def test_voxel_map_bounded_under_long_stream():
    m = VoxelMap(voxel_size=0.05, max_points=5000)
    rng = np.random.default_rng(0)
    for i in range(40):
        xyz = rng.uniform(0, 1, (3000, 3)) + [0.2 * i, 0, 0]  # the camera moves on, the map keeps growing
        m.integrate(xyz, rng.integers(0, 256, (3000, 3), dtype=np.uint8), rng.uniform(1, 2, 3000))
        assert len(m) <= 5000
    assert len(m) == 5000 and m.evicted > 0 and m.frames == 40
    # the oldest were evicted: what remains is near the latest frames
    assert m.points()[0][:, 0].min() > 0.2 * 30


def test_eviction_order():
    m = VoxelMap(1.0, max_points=3)
    rgb = np.zeros((2, 3), np.uint8)
    m.integrate([[0.5, 0, 0], [1.5, 0, 0]], rgb, [5.0, 1.0])  # frame 1: voxels 0, 1
    m.integrate([[2.5, 0, 0], [3.5, 0, 0]], rgb, [9.0, 2.0])  # frame 2: voxels 2, 3 -> evict the worse of frame 1
    assert sorted(m.voxel_indices()[:, 0]) == [0, 2, 3]
    m.integrate([[0.5, 0, 0], [4.5, 0, 0]], rgb, [1.0, 1.0])  # frame 3 re-observes 0: voxel 3 (frame 2, conf 2) goes
    assert sorted(m.voxel_indices()[:, 0]) == [0, 2, 4]
    lc = VoxelMap(1.0, max_points=2, eviction="lowest_confidence")
    lc.integrate([[0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0]], np.zeros((3, 3), np.uint8), [3.0, 1.0, 2.0])
    assert sorted(lc.voxel_indices()[:, 0]) == [0, 2]


def test_fusion_rejects_garbage_and_respects_range():
    m = VoxelMap(0.1, 100, max_range=5.0)
    xyz = np.array([[1, 0, 0], [np.nan, 0, 0], [10, 0, 0], [1e9, 0, 0], [11, 0, 0.0]])
    assert m.integrate(xyz, np.zeros((5, 3), np.uint8), origin=[10, 0, 0]) == 2
    assert m.dropped == 3
    with pytest.raises(ValueError, match="N, 3"):
        m.integrate(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="conf"):
        m.integrate(np.zeros((3, 3)), np.zeros((3, 3)), np.zeros(2))
    m.clear()
    assert len(m) == 0 and m.points()[0].shape == (0, 3)
    with pytest.raises(ValueError):
        VoxelMap(0.0, 10)


# ---------------------------------------------------------------------------------------------------- conventions
def test_optical_to_body_axes():
    # optical z (forward) -> body x, optical x (right) -> body -y, optical y (down) -> body -z
    np.testing.assert_allclose(cv.R_BODY_OPTICAL @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(cv.R_BODY_OPTICAL @ [1, 0, 0], [0, -1, 0])
    np.testing.assert_allclose(cv.R_BODY_OPTICAL @ [0, 1, 0], [0, 0, -1])
    assert np.linalg.det(cv.R_BODY_OPTICAL) == pytest.approx(1.0)
    # a camera-only setup: a camera that moved 1 unit forward (optical z) is 1 m ahead (x) in map
    T_map_cam = cv.camera_only_map_cam(cv.make_transform(t=[0, 0, 1]))
    np.testing.assert_allclose(T_map_cam[:3, 3], [1, 0, 0])
    # the first camera looks along map +x
    np.testing.assert_allclose(cv.camera_only_map_cam(np.eye(4))[:3, :3] @ [0, 0, 1], [1, 0, 0])


def test_robot_map_base_and_map_to_odom():
    T_base_cam = cv.make_transform(cv.R_BODY_OPTICAL, [0.2, 0.0, 0.4])  # camera on the robot looking forward
    # the robot drives 1 m forward and turns 90 degrees left: the camera moves in its own optical frame
    T_map_base_true = cv.make_transform(rot([0, 0, 1], np.pi / 2), [1.0, 0, 0])
    T_world_cam = cv.inverse(T_base_cam) @ T_map_base_true @ T_base_cam
    T_map_cam, T_map_base = cv.robot_map_base(T_world_cam, T_base_cam)
    np.testing.assert_allclose(T_map_base, T_map_base_true, atol=1e-12)
    np.testing.assert_allclose(T_map_cam, T_map_base_true @ T_base_cam, atol=1e-12)
    np.testing.assert_allclose(cv.robot_map_base(np.eye(4), T_base_cam)[1], np.eye(4), atol=1e-12)
    T_odom_base = cv.make_transform(rot([0, 0, 1], 1.4), [0.9, 0.1, 0])  # drifting odometry
    T_map_odom = cv.map_to_odom(T_map_base, T_odom_base)
    np.testing.assert_allclose(T_map_odom @ T_odom_base, T_map_base, atol=1e-12)


def test_inverse_quaternions_and_points():
    rng = np.random.default_rng(3)
    for _ in range(20):
        R = rot(rng.normal(size=3), rng.uniform(-np.pi, np.pi))
        T = cv.make_transform(R, rng.normal(size=3))
        np.testing.assert_allclose(cv.inverse(T) @ T, np.eye(4), atol=1e-12)
        q = cv.quaternion_from_matrix(R)
        assert q[3] >= 0 and np.linalg.norm(q) == pytest.approx(1.0)
        np.testing.assert_allclose(cv.matrix_from_quaternion(q), R, atol=1e-12)
    np.testing.assert_allclose(cv.quaternion_from_matrix(rot([0, 0, 1], np.pi)), [0, 0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(cv.quaternion_from_matrix(rot([0, 0, 1], np.pi / 2)),
                               [0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)])
    pts = cv.transform_points(cv.make_transform(t=[1, 2, 3]), np.zeros((2, 5, 3), np.float32))
    assert pts.shape == (2, 5, 3) and pts.dtype == np.float32 and (pts[..., 2] == 3).all()
    E = cv.inverse(cv.make_transform(rot([1, 0, 0], 0.3), [1, 2, 3]))[:3]
    np.testing.assert_allclose(cv.extrinsic_to_pose(E), cv.make_transform(rot([1, 0, 0], 0.3), [1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        cv.map_to_odom(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="zero norm"):
        cv.matrix_from_quaternion([0, 0, 0, 0])


def test_unproject_depth_hits_pixel_centres():
    K = np.array([[100.0, 0, 50], [0, 120.0, 40], [0, 0, 1]])
    d = np.full((80, 100), 3.0)
    pts = cv.unproject_depth(d, K)
    proj = pts.reshape(-1, 3) @ K.T
    uv = proj[:, :2] / proj[:, 2:]
    vv, uu = np.mgrid[0:80, 0:100]
    np.testing.assert_allclose(uv, np.stack([uu.ravel(), vv.ravel()], 1), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- pipeline map
def map_pipeline(**kw):
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig

    cfg = PipelineConfig(input_width=112, map_voxel_size=0.05, tsdf_voxel_size=0.1, occupancy_resolution=0.1,
                         occupancy_floor_z=-3.0, occupancy_max_height=5.0, map_keyframe_max_frames=2, **kw)
    return MappingPipeline(cfg, FakeSession())


def test_pipeline_map_products_pose_correction_save_and_load(tmp_path):
    from ros2_stream4d.mapping.map_store import MapDirectoryError

    p = map_pipeline()
    for i in range(5):
        p.process(IMG, i)
    assert p.map_size() > 0 and len(p.mesh()[1]) > 0 and (p.occupancy()[0] != -1).any()
    poses = p.keyframe_poses()
    assert len(poses) == 3
    # a pose correction of one keyframe moves its geometry in the cloud, the mesh and the grid
    moved = cv.make_transform(t=[30.0, 0, 0]) @ poses[0]
    p.update_keyframe_pose(0, moved)
    assert (p.map_points()[0][:, 0] > 20).any() and (p.mesh()[0][:, 0] > 20).any()
    data, origin, res = p.occupancy()
    assert origin[0] + data.shape[1] * res > 20
    p.update_keyframe_pose(0, poses[0])
    # save a directory, refuse a bad one without touching the running map, load the good one
    path = p.save_map(tmp_path / "map")
    assert (tmp_path / "map" / "occupancy.yaml").is_file() and path == str(tmp_path / "map")
    (tmp_path / "junk").mkdir()
    n, kfs = p.map_size(), p.keyframe_poses()
    with pytest.raises(MapDirectoryError, match="no metadata.json"):
        p.load_map(tmp_path / "junk")
    assert p.map_size() == n and p.keyframe_poses().keys() == kfs.keys()
    p.process(IMG, 5)  # the stream goes on after the refusal
    q = map_pipeline()
    meta = q.load_map(path)
    assert meta["keyframes"] == 3 and q.map_size() == n
    r = q.process(IMG, 0)  # a new stream in the loaded map starts at the map origin (start pose identity)
    r = getattr(r, "result", r)
    np.testing.assert_allclose(r.T_map_cam, cv.T_MAP_WORLD, atol=1e-9)
    assert q.map.keyframes[-1].segment == 1 and len(q.keyframe_poses()) == 4
    # the cloud file alone still works for .ply / .pcd paths
    assert p.save_map(tmp_path / "cloud.ply").endswith("cloud.ply")


def test_pipeline_reset_keeps_the_map_and_continues_from_the_last_pose():
    p = map_pipeline()
    for i in range(4):
        p.process(IMG, i)
    n = p.map_size()
    last = p.last.T_map_cam.copy()
    p.reset()
    assert p.map_size() == n, "a stream reset keeps the map"
    r = p.process(IMG, 10)
    r = getattr(r, "result", r)
    np.testing.assert_allclose(r.T_map_cam, last, atol=1e-9)  # the new stream starts where the old one was
    assert {kf.segment for kf in p.map.keyframes} == {0, 1}
    p.erase_map()
    assert p.map_size() == 0 and p.keyframe_poses() == {}


def test_pipeline_start_pose():
    from ros2_stream4d.mapping.pipeline import start_pose_matrix

    p = map_pipeline(map_start_pose=(1.0, 2.0, 0.0, np.pi / 2))
    r = p.process(IMG, 0)
    r = getattr(r, "result", r)
    np.testing.assert_allclose(r.T_map_cam, start_pose_matrix((1.0, 2.0, 0.0, np.pi / 2)) @ cv.T_MAP_WORLD,
                               atol=1e-9)
    with pytest.raises(ValueError, match="x, y, z, yaw"):
        start_pose_matrix((1.0, 2.0))


class RampConfidenceSession(FakeSession):
    """FakeSession whose depth confidence rises from left to right (1 .. w): a percentile cut keeps the right part."""

    def step(self, image, stamp_ns=None, mapping=None):
        out = super().step(image, stamp_ns, mapping)
        _, h, w = out["depth_conf"].shape
        out["depth_conf"] = torch.arange(1, w + 1, dtype=torch.float32).expand(1, h, w).clone()
        return out


def test_the_map_fuses_only_pixels_above_its_own_confidence_percentile():
    """The keyframes store what the node's cloud keeps (conf_percentile: the back-end measures on it); the map's
    products fuse only the pixels above map_conf_percentile of each frame's confidence."""
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig

    def columns(map_pct, live_pct):
        cfg = PipelineConfig(input_width=112, map_stride=1, map_cloud_stride=1, map_voxel_size=0.005,
                             conf_percentile=live_pct, map_conf_percentile=map_pct, map_cloud_surface_voxels=0.0)
        p = MappingPipeline(cfg, RampConfidenceSession())
        res = p.process(IMG, 0).result
        frames = p.map.frames_of(p.map.keyframes[0])
        depth = frames.depth[0].astype(np.float32)
        w = depth.shape[1]
        stored = np.flatnonzero(np.isfinite(depth).all(axis=0))
        assert np.isnan(depth[:, :stored.min()]).all()  # everything left of the cut is gone, everything right kept
        # the map's points, back in the frame's pixels: their columns
        cam = cv.transform_points(cv.inverse(res.T_map_cam), p.map_points()[0].astype(np.float64))
        u = frames.K[0][0, 0] * cam[:, 0] / cam[:, 2] + frames.K[0][0, 2]
        return stored.min() / w, u.min() / w, len(res.cloud_xyz)

    stored, fused, cloud = columns(75.0, 10.0)
    assert 0.07 <= stored <= 0.13 and 0.72 <= fused <= 0.78
    stored0, fused0, cloud0 = columns(0.0, 10.0)
    assert stored0 == stored and fused0 <= 0.13 and cloud0 == cloud  # the live cloud follows conf_percentile alone
    stored_hi, fused_hi, _ = columns(25.0, 90.0)
    assert 0.87 <= stored_hi <= 0.93 and fused_hi >= 0.87  # a stricter live cut: nothing else is stored to fuse


class DescriptorSession(FakeSession):
    """FakeSession with a learned model's place descriptor: a unit vector that encodes the frame number."""

    def step(self, image, stamp_ns=None, mapping=None):
        i = self.i
        out = super().step(image, stamp_ns, mapping)
        d = torch.zeros(1, 32)
        d[0, i % 32] = 1.0
        out["descriptor"] = d
        return out


def test_a_models_descriptor_reaches_the_keyframes_and_the_back_ends_loop_detector():
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig

    cfg = PipelineConfig(input_width=112, map_keyframe_max_frames=2, backend=True, occupancy_enabled=False)
    p = MappingPipeline(cfg, DescriptorSession())
    try:
        for i in range(5):
            p.process(IMG, i)
        assert p.settle_backend(timeout=60)
        kfs = p.map.keyframes
        assert len(kfs) == 3
        for kf, first in zip(kfs, (0, 2, 4)):  # each keyframe keeps its first frame's descriptor
            np.testing.assert_array_equal(kf.descriptor, np.eye(32, dtype=np.float32)[first])
        det = p.backend.detector
        assert det.descriptor_kind == "model tokens" and len(det.views) == 3
        np.testing.assert_array_equal(det.views[1].descriptor, np.eye(32, dtype=np.float32)[2])
        assert p.backend.diagnostics()["loop descriptor"] == "model tokens"
    finally:
        p.close()
    q = MappingPipeline(cfg, FakeSession())  # a session without descriptors: the classical one, said so
    try:
        q.process(IMG, 0)
        assert q.settle_backend(timeout=60) and q.map.keyframes[0].descriptor is None
        assert q.backend.diagnostics()["loop descriptor"] == "classical"
    finally:
        q.close()


def test_session_outputs_are_read_batched_or_not_with_or_without_the_depth_axis():
    from ros2_stream4d.mapping.reconstructor import _frame

    d = np.arange(12, dtype=np.float32).reshape(3, 4)
    for shape in ((3, 4), (3, 4, 1), (1, 3, 4), (1, 3, 4, 1), (2, 3, 4), (2, 3, 4, 1)):
        a = np.zeros(shape, np.float32)
        a[...] = d[..., None] if shape[-1] == 1 else d
        np.testing.assert_array_equal(_frame({"depth": a}, "depth", (3, 4), trailing=(1,), squeeze_last=True), d)
    with pytest.raises(ValueError, match="expected"):
        _frame({"depth": np.zeros((2, 3, 5), np.float32)}, "depth", (3, 4), trailing=(1,), squeeze_last=True)
