"""Synthetic worlds: scenes, textures, trajectories, rendering (exact geometry, bit-for-bit), the oracle."""

import numpy as np
import pytest

from ros2_stream4d.mapping.conventions import inverse as inv_se3
from ros2_stream4d.mapping.conventions import matrix_from_quaternion as quat_to_matrix
from ros2_stream4d.mapping.conventions import quaternion_from_matrix as matrix_to_quat
from ros2_stream4d.mapping.conventions import rotation_angle
from ros2_stream4d.mapping.conventions import rotation_from_vector as so3_exp
from ros2_stream4d.sim.render import CameraModel, Renderer, unproject
from ros2_stream4d.sim.scenes import SCENE_KINDS, Scene, build_scene
from ros2_stream4d.sim.textures import PATTERNS, Texture, hash01
from ros2_stream4d.sim.trajectories import R_CAMLINK_OPTICAL, TRAJECTORY_KINDS, make_trajectory

SMALL = CameraModel.from_hfov(64, 48, 60.0)


# ---------------------------------------------------------------------------------------------------- scenes
@pytest.mark.parametrize("kind", SCENE_KINDS)
def test_scene_is_deterministic_and_rebuilds_from_its_json(kind):
    a, b = build_scene(kind, 3), build_scene(kind, 3)
    assert len(a.parts) == len(b.parts) > 3
    for pa, pb in zip(a.parts, b.parts):
        assert pa.name == pb.name and np.array_equal(pa.vertices, pb.vertices)
        assert np.array_equal(pa.triangles, pb.triangles)
    assert a.to_dict() == b.to_dict()
    c = Scene.from_dict(a.to_dict())
    assert all(np.array_equal(p.vertices, q.vertices) for p, q in zip(a.parts, c.parts))
    other = build_scene(kind, 4)
    assert other.to_dict()["params"] != a.to_dict()["params"]
    # the floor is the plane z = 0 and nothing lies below it except sunk hills
    floor = next(p for p in a.parts if p.name in ("floor", "ground"))
    assert np.all(floor.vertices[:, 2] == 0.0)


def test_scene_overrides_and_unknown_parameters():
    s = build_scene("room", 0, size_x=5.0, n_objects=2)
    assert s.params["size_x"] == 5.0 and s.params["n_objects"] == 2
    walls = [p for p in s.parts if p.name.startswith("wall")]
    xs = np.concatenate([p.vertices[:, 0] for p in walls])
    assert xs.min() == -2.5 and xs.max() == 2.5
    # overriding one parameter does not shift the others' random draws
    assert build_scene("room", 0, size_x=5.0).params["size_y"] == build_scene("room", 0).params["size_y"]
    with pytest.raises(TypeError):
        build_scene("room", 0, colour="red")
    with pytest.raises(ValueError):
        build_scene("castle", 0)


def test_textures_are_pure_functions_of_the_point():
    rng = np.random.default_rng(0)
    p = rng.uniform(-5, 5, (1000, 3)).astype(np.float32)
    for i, pattern in enumerate(PATTERNS):
        t = Texture(pattern, (0.1, 0.2, 0.3), (0.9, 0.8, 0.7), scale=0.5, seed=i)
        v = t.evaluate(p)
        assert v.shape == (1000, 3) and v.dtype == np.float32
        assert np.all(v >= 0) and np.all(v <= 1.0 + t.detail / 2 + 1e-6) and v.std() > 0.02
        assert np.array_equal(v, Texture.from_dict(t.to_dict()).evaluate(p))
    # a floor at z = 0 seen with rounding noise of +-1e-6 m keeps its checker cells (lattices are offset)
    t = Texture("checker", (0, 0, 0), (1, 1, 1), scale=0.5, detail=0.0)
    q = p.copy()
    q[:, 2] = 0.0
    assert np.array_equal(t.value(q + np.float32([0, 0, 1e-6])), t.value(q - np.float32([0, 0, 1e-6])))
    h = hash01(*rng.integers(-1000, 1000, (3, 10000)).astype(np.int32), 5)
    assert h.min() >= 0 and h.max() < 1 and abs(h.mean() - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------------- transforms
def test_quaternion_round_trip_and_rotation_angle():
    rng = np.random.default_rng(1)
    R = so3_exp(rng.normal(size=(200, 3)))
    q = matrix_to_quat(R)
    assert np.allclose(np.linalg.norm(q, axis=1), 1) and np.all(q[:, 3] >= 0)
    assert np.allclose(quat_to_matrix(q), R, atol=1e-12)
    v = rng.normal(size=(200, 3)) * 1e-4
    assert np.allclose(rotation_angle(so3_exp(v)), np.linalg.norm(v, axis=1), rtol=1e-9)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R[0], [1, 2, 3]
    assert np.allclose(inv_se3(T) @ T, np.eye(4))
    # REP-103: camera_link -> optical is the quaternion (-0.5, 0.5, -0.5, 0.5)
    assert np.allclose(matrix_to_quat(R_CAMLINK_OPTICAL), [-0.5, 0.5, -0.5, 0.5])


# ---------------------------------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("kind", SCENE_KINDS)
@pytest.mark.parametrize("traj", TRAJECTORY_KINDS)
def test_trajectories_are_collision_free_smooth_and_reproducible(kind, traj):
    scene = build_scene(kind, 0)
    t = make_trajectory(scene, traj, 60, fps=10.0, seed=1)
    t2 = make_trajectory(scene, traj, 60, fps=10.0, seed=1)
    assert np.array_equal(t.T_world_cam, t2.T_world_cam)
    T = t.T_world_cam
    assert T.shape == (60, 4, 4)
    assert np.allclose(np.swapaxes(T[:, :3, :3], 1, 2) @ T[:, :3, :3], np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(T[:, :3, :3]), 1.0)
    cam = T[:, :3, 3]
    clearance = t.params["clearance"]
    assert np.all(scene.distance(cam) >= clearance - 1e-6)
    assert not scene.in_obstacle(cam).any()
    step = np.linalg.norm(np.diff(cam, axis=0), axis=1)
    assert step.max() < 2.0 * t.params["speed"] / 10.0 + 0.05  # smooth: no jumps
    rot_step = np.degrees(rotation_angle(np.swapaxes(T[:-1, :3, :3], 1, 2) @ T[1:, :3, :3]))
    assert rot_step.max() < 8.0
    assert cam[:, 2].min() > 0.2  # above the floor


def test_ground_robot_is_planar_with_a_static_rep103_camera():
    scene = build_scene("room", 0)
    t = make_trajectory(scene, "ground_robot", 80, fps=10.0, seed=0)
    B = t.T_world_base
    assert np.all(B[:, 2, 3] == 0.0)  # base on the floor
    assert np.allclose(B[:, :3, 2], [0, 0, 1])  # no roll or pitch
    # the base's x axis points along its motion (a differential drive)
    v = np.diff(B[:, :2, 3], axis=0)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert np.all(np.einsum("ij,ij->i", v, B[:-1, :2, 0]) > 0.98)
    C = t.T_world_cam
    assert np.allclose(C[:, 2, 3], 0.3)  # camera_link at (0.1, 0, 0.3) on the base
    assert np.allclose(C[:, 2, 2], 0.0, atol=1e-12)  # optical z (forward) horizontal
    assert np.allclose(C[:, :3, 1], [0, 0, -1])  # optical y points down
    assert np.allclose(C[:, :3, 2], B[:, :3, 0])  # optical z = base forward
    assert np.allclose(t.T_base_cam[:3, 3], [0.1, 0.0, 0.3])


def test_orbit_looks_at_its_centre_and_prefix_is_stable():
    scene = build_scene("objects", 2)
    t = make_trajectory(scene, "orbit", 50, fps=10.0, seed=0)
    C = t.T_world_cam
    centre = np.asarray(t.params["centre"])
    to_c = centre - C[:, :3, 3]
    to_c /= np.linalg.norm(to_c, axis=1, keepdims=True)
    assert np.allclose(np.einsum("ij,ij->i", to_c, C[:, :3, 2]), 1.0)
    r = np.linalg.norm(C[:, :2, 3] - centre[:2], axis=1)
    assert np.allclose(r, t.params["radius"])
    short = make_trajectory(scene, "orbit", 20, fps=10.0, seed=0)
    if short.params["attempt"] == t.params["attempt"]:
        assert np.array_equal(short.T_world_cam, C[:20])


# ---------------------------------------------------------------------------------------------------- rendering
def _on_mesh_error(scene, depth, K, T):
    pts = unproject(depth, K, T).reshape(-1, 3)
    pts = pts[np.isfinite(pts).all(axis=1)]
    return pts, scene.distance(pts)


@pytest.mark.parametrize("traj", TRAJECTORY_KINDS)
@pytest.mark.parametrize("kind", ["room", "objects", "outdoor"])
def test_unprojected_ground_truth_depth_lies_on_the_mesh(kind, traj):
    scene = build_scene(kind, 1)
    t = make_trajectory(scene, traj, 30, fps=10.0, seed=2)
    r = Renderer(scene, SMALL)
    for i in (0, 11, 29):
        f = r.render(t.T_world_cam[i])
        assert f.depth.dtype == np.float32 and f.rgb.dtype == np.uint8 and f.rgb.shape == (48, 64, 3)
        pts, dist = _on_mesh_error(scene, f.depth, f.K, t.T_world_cam[i])
        assert len(pts) > 0.4 * 64 * 48
        assert dist.max() < 1e-3, f"frame {i}: max distance {dist.max()} m"
        # not vacuous: 1 % more depth moves the points off the surfaces
        _, off = _on_mesh_error(scene, f.depth * np.float32(1.01), f.K, t.T_world_cam[i])
        assert np.median(off) > 2e-3  # (a floor point 0.3 m below the camera moves 3 mm)
        if scene.sky is None:
            assert np.isfinite(f.depth).all()


def test_open_scenes_have_nan_sky_and_closed_ones_none():
    scene = build_scene("objects", 0)
    t = make_trajectory(scene, "ground_robot", 5, seed=0)
    f = Renderer(scene, SMALL).render(t.T_world_cam[0])
    sky = np.isnan(f.depth)
    assert 0 < sky.mean() < 0.9
    assert sky[0].mean() > sky[-1].mean()  # sky at the top of the image
    assert f.rgb[sky].mean(axis=0)[2] > f.rgb[sky].mean(axis=0)[0]  # bluish


def test_rendering_is_bit_for_bit_reproducible_and_seeds_differ():
    def frame(seed):
        scene = build_scene("room", seed)
        t = make_trajectory(scene, "handheld", 10, seed=seed)
        return Renderer(scene, CameraModel.from_hfov(80, 60)).render(t.T_world_cam[9])

    a, b, c = frame(5), frame(5), frame(6)
    assert a.rgb.tobytes() == b.rgb.tobytes() and a.depth.tobytes() == b.depth.tobytes()
    assert a.rgb.tobytes() != c.rgb.tobytes()
    assert a.rgb.std() > 10  # textured, not flat


def test_depth_is_z_depth_and_pixel_centres_are_integer():
    scene = build_scene("room", 0, size_x=6.0, size_y=6.0, height=3.0, n_objects=0)
    cam = CameraModel.from_hfov(64, 48)
    # camera at the room centre looking along +x at the wall x = 3: z-depth is 3 everywhere on the wall
    R = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, [0, 0, 1.5]
    d = Renderer(scene, cam).render_depth(T)
    wall = d[16:32, 16:48]  # the centre of the image sees the wall (pictures hang up to 2 cm in front of it)
    assert np.all(np.abs(wall - 3.0) < 0.021)
    assert np.mean(np.abs(wall - 3.0) < 1e-5) > 0.5
    # pixel (u, v) looks along K^-1 [u, v, 1]: the principal point (W/2, H/2) is the optical axis
    assert cam.cx == 32.0 and cam.cy == 24.0
    dirs = cam.ray_directions().reshape(48, 64, 3)
    assert np.array_equal(dirs[24, 32], [0, 0, 1])
    assert np.allclose(dirs[0, 0], [-32 / cam.fx, -24 / cam.fy, 1])


# ---------------------------------------------------------------------------------------------------- oracle
def _oracle_inputs(n=8):
    scene = build_scene("room", 2)
    t = make_trajectory(scene, "handheld", n, seed=3)
    r = Renderer(scene, SMALL)
    depths = np.stack([r.render_depth(T) for T in t.T_world_cam])
    stamps = 1_000 + np.arange(n) * 100
    mesh = (np.concatenate([p.vertices for p in scene.parts]),
            np.concatenate([p.triangles + o for p, o in zip(scene.parts, np.cumsum(
                [0] + [len(p.vertices) for p in scene.parts[:-1]]))]))
    return scene, t, depths, stamps, mesh


def test_oracle_outputs_ground_truth_in_the_model_format():
    torch = pytest.importorskip("torch")
    from ros2_stream4d.model.geometry import pose_encoding_to_extri_intri
    from ros2_stream4d.sim.oracle import OracleSession

    scene, t, depths, stamps, _ = _oracle_inputs()
    o = OracleSession(stamps, t.T_world_cam, SMALL.K, depths, scale=2.0)
    img = torch.zeros(1, 3, 48, 64)
    outs = [o.step(img, int(s)) for s in stamps[:4]]
    out = outs[2]
    assert out["depth"].shape == (1, 48, 64, 1) and out["depth_conf"].shape == (1, 48, 64)
    assert out["world_points"].shape == (1, 48, 64, 3) and out["world_points_conf"].shape == (1, 48, 64)
    assert out["pose_enc"].shape == (1, 9) and out["extrinsic"].shape == (1, 3, 4)
    assert out["intrinsic"].shape == (1, 3, 3)
    assert all(v.dtype == torch.float32 for v in out.values())
    assert np.allclose(out["depth"][0, ..., 0].numpy(), 2.0 * depths[2], rtol=1e-6)
    assert np.allclose(outs[0]["extrinsic"][0].numpy(), np.eye(4)[:3], atol=1e-6)  # first frame = world
    # world points are in the first camera's frame: back in the world they lie on the mesh
    T0 = t.T_world_cam[0]
    pw = out["world_points"][0].numpy().reshape(-1, 3).astype(np.float64) / 2.0
    pw = pw @ T0[:3, :3].T + T0[:3, 3]
    assert scene.distance(pw).max() < 1e-3
    # the extrinsic is camera-from-first-camera; the pose encoding decodes to it and to K
    E_true = inv_se3(inv_se3(T0) @ t.T_world_cam[2])
    E_true[:3, 3] *= 2.0
    assert np.allclose(out["extrinsic"][0].numpy(), E_true[:3], atol=1e-5)
    E, K = pose_encoding_to_extri_intri(out["pose_enc"].double(), (48, 64))
    assert np.allclose(E[0].numpy(), E_true[:3], atol=1e-5)
    assert np.allclose(K[0].numpy(), SMALL.K, atol=1e-3)
    # reset: the next frame becomes the new world
    o.reset()
    assert np.allclose(o.step(img, int(stamps[5]))["extrinsic"][0].numpy(), np.eye(4)[:3], atol=1e-6)
    with pytest.raises(KeyError):
        o.step(img, 12345)
    with pytest.raises(ValueError):
        o.step(torch.zeros(1, 3, 42, 56), int(stamps[0]))  # another size needs the pixel mapping


def test_oracle_with_a_pixel_mapping_is_exact_at_the_model_resolution():
    pytest.importorskip("torch")
    from ros2_stream4d.mapping.preprocess import Preprocessor
    from ros2_stream4d.sim.oracle import OracleSession

    scene, t, depths, stamps, mesh = _oracle_inputs()
    rgb = np.zeros((48, 64, 3), np.uint8)
    for mode in ("crop", "pad"):
        image, mapping = Preprocessor(width=56, mode=mode, height=42 if mode == "crop" else 56).prepare(rgb)
        o = OracleSession(stamps, t.T_world_cam, SMALL.K, depths, mesh=mesh)
        out = o.step(image[None], int(stamps[4]), mapping=mapping)
        h, w = mapping.model_hw
        assert out["depth"].shape == (1, h, w, 1)
        K = out["intrinsic"][0].numpy().astype(np.float64)
        assert np.allclose(K, mapping.source_to_model_K(SMALL.K), atol=1e-4)
        valid = out["depth_conf"][0].numpy() > 0
        assert valid.sum() > 0.5 * h * w
        if mode == "pad":
            assert not valid[~mapping.valid_model_mask()].any()
        # exact: model-resolution depth unprojected with the model K and the pose lands on the mesh
        d = np.where(valid, out["depth"][0, ..., 0].numpy(), np.nan)
        pts, dist = _on_mesh_error(scene, d, K, t.T_world_cam[4])
        assert dist.max() < 1e-3
        # and agrees with the source depth resampled to the model grid (nearest) on most pixels
        near = mapping.resample_to_model(depths[4])
        close = np.abs(near - d)[valid] < 0.05 * d[valid]
        assert close.mean() > 0.9
        # without the mesh the oracle falls back to the resampled depth
        o2 = OracleSession(stamps, t.T_world_cam, SMALL.K, depths)
        out2 = o2.step(image[None], int(stamps[4]), mapping=mapping)
        assert np.allclose(out2["depth"][0, ..., 0].numpy()[valid], np.nan_to_num(near)[valid])


def test_oracle_drives_the_streaming_reconstructor():
    pytest.importorskip("torch")
    from ros2_stream4d.mapping.preprocess import Preprocessor
    from ros2_stream4d.mapping.reconstructor import StreamingReconstructor
    from ros2_stream4d.sim.oracle import OracleSession

    scene, t, depths, stamps, mesh = _oracle_inputs()
    rec = StreamingReconstructor(OracleSession(stamps, t.T_world_cam, SMALL.K, depths, mesh=mesh),
                                 Preprocessor(width=56))
    T0 = t.T_world_cam[0]
    for i in range(4):
        pred = rec.step(np.zeros((48, 64, 3), np.uint8), int(stamps[i]))
        assert pred.intrinsics_source == "session"
        assert np.allclose(pred.T_world_cam, inv_se3(T0) @ t.T_world_cam[i], atol=1e-5)
        pts = pred.points_world[pred.valid_mask()].astype(np.float64) @ T0[:3, :3].T + T0[:3, 3]
        assert scene.distance(pts).max() < 1e-3
