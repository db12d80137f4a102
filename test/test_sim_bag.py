"""Sim bags: written with rosbags, read back with rosbags AND mcap; topics, types, counts, stamps, TF, geometry."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability

from ros2_stream4d.cli import main
from ros2_stream4d.codec import transform_to_matrix
from ros2_stream4d.mapping.conventions import rotation_angle
from ros2_stream4d.sim.bag import (
    FRAMES,
    TOPICS,
    TYPESTORE,
    SimConfig,
    bag_topics,
    image_to_numpy,
    iter_messages,
    noisy_odometry,
    read_ground_truth,
    stamp_ns,
    write_sim_bag,
)
from ros2_stream4d.sim.render import mesh_raycasting_scene, unproject
from ros2_stream4d.sim.scenes import Scene, load_mesh

N = 12
EXPECTED = {
    TOPICS["image"]: ("sensor_msgs/msg/Image", N),
    TOPICS["compressed"]: ("sensor_msgs/msg/CompressedImage", N),
    TOPICS["camera_info"]: ("sensor_msgs/msg/CameraInfo", N),
    TOPICS["tf"]: ("tf2_msgs/msg/TFMessage", N),
    TOPICS["tf_static"]: ("tf2_msgs/msg/TFMessage", 1),
    TOPICS["gt_depth"]: ("sensor_msgs/msg/Image", N),
    TOPICS["gt_pose"]: ("geometry_msgs/msg/PoseStamped", N),
}


@pytest.fixture(scope="module")
def mcap_bag(tmp_path_factory):
    out = tmp_path_factory.mktemp("bags") / "robot"
    cfg = SimConfig(scene="objects", trajectory="ground_robot", frames=N, width=64, height=48, fps=5.0, seed=1,
                    compressed=True, start_time_ns=1_650_000_000_123_000_000)
    meta = write_sim_bag(out, cfg, progress=False)
    return out, cfg, meta


def test_mcap_bag_reads_back_with_rosbags(mcap_bag):
    path, cfg, meta = mcap_bag
    assert bag_topics(path) == EXPECTED
    assert meta["counts"] == {k: v[1] for k, v in EXPECTED.items()}
    with AnyReader([path], default_typestore=TYPESTORE) as reader:
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert qos[TOPICS["tf_static"]][0].durability == QosDurability.TRANSIENT_LOCAL
    stamps = cfg.stamps()
    assert stamps[0] == 1_650_000_000_123_000_000 and np.all(np.diff(stamps) == 200_000_000)
    seen = Counter()
    for topic, t, msg in iter_messages(path, list(TOPICS.values())):
        seen[topic] += 1
        if topic == TOPICS["tf_static"]:
            pairs = [(tf.header.frame_id, tf.child_frame_id) for tf in msg.transforms]
            assert pairs == [(FRAMES["base"], FRAMES["camera_link"]), (FRAMES["camera_link"], FRAMES["optical"])]
            assert stamp_ns(msg.transforms[0].header.stamp) == stamps[0]
            continue
        if topic == TOPICS["tf"]:
            hdr = msg.transforms[0].header
            assert (hdr.frame_id, msg.transforms[0].child_frame_id) == (FRAMES["odom"], FRAMES["base"])
        else:
            hdr = msg.header
        ns = stamp_ns(hdr.stamp)
        assert ns == t and ns in stamps  # bag time = header stamp, on the fps grid
        if topic == TOPICS["gt_pose"]:
            assert hdr.frame_id == "world"
        elif topic != TOPICS["tf"]:
            assert hdr.frame_id == FRAMES["optical"]
        if topic == TOPICS["image"]:
            assert msg.encoding == "rgb8" and (msg.height, msg.width, msg.step) == (48, 64, 192)
        if topic == TOPICS["gt_depth"]:
            d = image_to_numpy(msg)
            assert msg.encoding == "32FC1" and d.dtype == np.float32 and d.shape == (48, 64)
            assert np.isnan(d).any() and np.nanmin(d) > 0  # open scene: sky is NaN
        if topic == TOPICS["camera_info"]:
            assert msg.distortion_model == "plumb_bob" and np.all(msg.d == 0)
            K = np.asarray(msg.k).reshape(3, 3)
            assert np.allclose(K, meta["camera"]["K"]) and K[0, 2] == 32 and K[1, 2] == 24
            assert np.allclose(np.asarray(msg.p).reshape(3, 4)[:, :3], K)
    assert dict(seen) == {k: v[1] for k, v in EXPECTED.items()}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mcap_ros2.reader's own notice about mcap_ros1
def test_mcap_bag_reads_back_with_mcap(mcap_bag):
    from mcap.reader import make_reader
    from mcap_ros2.reader import read_ros2_messages

    path, cfg, _ = mcap_bag
    files = list(path.glob("*.mcap"))
    assert len(files) == 1
    counts, schemas = Counter(), {}
    rosbags_images = {stamp_ns(m.header.stamp): image_to_numpy(m)
                      for _, _, m in iter_messages(path, [TOPICS["image"]])}
    for m in read_ros2_messages(str(files[0])):
        counts[m.channel.topic] += 1
        schemas[m.channel.topic] = m.schema.name
        if m.channel.topic == TOPICS["image"]:
            img = np.frombuffer(bytes(m.ros_msg.data), np.uint8).reshape(48, 64, 3)
            assert np.array_equal(img, rosbags_images[stamp_ns(m.ros_msg.header.stamp)])
        if m.channel.topic == TOPICS["compressed"]:
            assert m.ros_msg.format.endswith("jpeg compressed bgr8")
            dec = cv2.imdecode(np.frombuffer(bytes(m.ros_msg.data), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            ref = rosbags_images[stamp_ns(m.ros_msg.header.stamp)]
            assert np.abs(dec.astype(int) - ref).mean() < 8  # jpeg of the same frame
        if m.channel.topic == TOPICS["gt_pose"]:
            assert m.ros_msg.header.frame_id == "world"
    assert dict(counts) == {k: v[1] for k, v in EXPECTED.items()}
    assert schemas == {k: v[0] for k, v in EXPECTED.items()}
    with open(files[0], "rb") as f:
        summary = make_reader(f).get_summary()
    latched = [c for c in summary.channels.values() if c.topic == TOPICS["tf_static"]][0]
    assert "transient_local" in latched.metadata.get("offered_qos_profiles", "")


def test_sqlite3_bag_reads_back_with_rosbags(tmp_path):
    out = tmp_path / "sq"
    cfg = SimConfig(scene="room", trajectory="handheld", frames=6, width=48, height=32, storage="sqlite3",
                    encoding="bgr8", seed=4)
    write_sim_bag(out, cfg, progress=False)
    assert list(out.glob("*.db3"))
    topics = bag_topics(out)
    assert TOPICS["compressed"] not in topics
    assert {k: v for k, v in topics.items()} == {k: (v[0], 1 if k == TOPICS["tf_static"] else 6)
                                                 for k, v in EXPECTED.items() if k != TOPICS["compressed"]}
    gt = read_ground_truth(out, with_images=True)
    assert gt.images.shape == (6, 32, 48, 3) and gt.depths.shape == (6, 32, 48)
    assert np.all(np.isfinite(gt.depths))  # closed room
    # bgr8 on the wire, RGB after reading: equal to a fresh render
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("room", 4)
    f = Renderer(scene, CameraModel.from_hfov(48, 32)).render(make_trajectory(scene, "handheld", 6, seed=4)
                                                              .T_world_cam[3])
    assert np.array_equal(gt.images[3], f.rgb)
    for _, _, msg in iter_messages(out, [TOPICS["image"]]):
        assert msg.encoding == "bgr8"


@pytest.mark.parametrize("scene,traj", [("room", "handheld"), ("corridor", "ground_robot"), ("outdoor", "orbit")])
def test_ground_truth_from_the_bag_lies_on_the_written_mesh(tmp_path, scene, traj):
    out = tmp_path / "b"
    write_sim_bag(out, SimConfig(scene=scene, trajectory=traj, frames=8, width=64, height=48, seed=2), progress=False)
    gt = read_ground_truth(out)
    V, F = load_mesh(gt.mesh_path)
    meta = json.loads((out / "scene.json").read_text())
    rebuilt = Scene.from_dict(meta["scene"]).mesh()
    assert np.array_equal(np.asarray(rebuilt.vertices), V)  # the PLY keeps full precision
    import open3d as o3d

    rc = mesh_raycasting_scene(V, F)
    for i in (0, 4, 7):
        pts = unproject(gt.depths[i], gt.K, gt.T_world_cam[i]).reshape(-1, 3)
        pts = pts[np.isfinite(pts).all(axis=1)]
        assert len(pts) > 0.4 * 64 * 48
        dist = rc.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()
        assert dist.max() < 1e-3


def test_tf_chain_equals_the_ground_truth_pose_and_odometry_noise_drifts(tmp_path):
    def chain(path):
        static, odom = {}, []
        for topic, _, msg in iter_messages(path, [TOPICS["tf"], TOPICS["tf_static"]]):
            for tf in msg.transforms:
                if topic == TOPICS["tf_static"]:
                    static[tf.child_frame_id] = transform_to_matrix(tf.transform)
                else:
                    odom.append(transform_to_matrix(tf.transform))
        return np.stack(odom) @ static[FRAMES["camera_link"]] @ static[FRAMES["optical"]]

    exact, noisy = tmp_path / "exact", tmp_path / "noisy"
    base = dict(scene="room", trajectory="ground_robot", frames=40, width=32, height=24, seed=3)
    write_sim_bag(exact, SimConfig(**base), progress=False)
    write_sim_bag(noisy, SimConfig(**base, odom_noise=0.05), progress=False)
    gt = read_ground_truth(exact, with_depth=False)
    assert np.allclose(chain(exact), gt.T_world_cam, atol=1e-9)
    n = chain(noisy)
    assert np.allclose(n[0], gt.T_world_cam[0], atol=1e-9)  # odometry starts at the true pose
    err = np.linalg.norm(n[:, :3, 3] - gt.T_world_cam[:, :3, 3], axis=1)
    assert 0 < err[-1] < 0.5 and err[-10:].mean() > err[:10].mean()  # drift grows with distance
    assert np.allclose(n[:, 2, 3], gt.T_world_cam[:, 2, 3])  # a ground robot's odometry stays planar
    assert np.allclose(n[:, 2, 2], 0.0, atol=1e-9)


def test_noisy_odometry_is_planar_for_robots_and_zero_noise_is_exact():
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    t = make_trajectory(build_scene("room", 0), "ground_robot", 50, seed=0)
    assert np.array_equal(noisy_odometry(t.T_world_base, 0.0, np.random.default_rng(0), True), t.T_world_base)
    n = noisy_odometry(t.T_world_base, 0.1, np.random.default_rng(0), True)
    assert np.allclose(n[:, 2, 3], 0) and np.allclose(n[:, :3, 2], [0, 0, 1])
    assert rotation_angle(n[-1, :3, :3].T @ t.T_world_base[-1, :3, :3]) > 0


def test_sim_bags_are_reproducible_bit_for_bit(tmp_path):
    cfg = SimConfig(scene="outdoor", trajectory="handheld", frames=4, width=40, height=30, seed=9, odom_noise=0.02)
    write_sim_bag(tmp_path / "a", cfg, progress=False)
    write_sim_bag(tmp_path / "b", cfg, progress=False)

    def raw(path):
        with AnyReader([path], default_typestore=TYPESTORE) as r:
            return [(c.topic, t, bytes(d)) for c, t, d in r.messages()]

    assert raw(tmp_path / "a") == raw(tmp_path / "b")
    assert (tmp_path / "a" / "scene.ply").read_bytes() == (tmp_path / "b" / "scene.ply").read_bytes()


def test_stream4d_sim_cli(tmp_path, capsys):
    out = tmp_path / "bag"
    out.mkdir()  # an empty directory is fine
    rc = main(["sim", "--scene", "corridor", "--trajectory", "handheld", "--frames", "5", "--width", "32",
               "--height", "24", "--out", str(out), "--compressed", "--fps", "20", "--seed", "1", "--quiet",
               "--scene-param", "length=14", "--odom-noise", "0.01"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "/ground_truth/depth: 5" in printed
    meta = json.loads((out / "scene.json").read_text())
    assert meta["scene"]["params"]["length"] == 14 and meta["config"]["fps"] == 20.0
    assert bag_topics(out)[TOPICS["compressed"]] == ("sensor_msgs/msg/CompressedImage", 5)
    with pytest.raises(FileExistsError):
        main(["sim", "--frames", "2", "--width", "32", "--height", "24", "--out", str(out), "--quiet"])
    assert main(["sim", "--frames", "2", "--width", "32", "--height", "24", "--out", str(out), "--quiet",
                 "--overwrite", "--storage", "sqlite3"]) == 0
    assert bag_topics(out)[TOPICS["image"]][1] == 2


def test_oracle_from_a_sim_bag_matches_its_ground_truth(mcap_bag):
    torch = pytest.importorskip("torch")
    from ros2_stream4d.sim.oracle import OracleSession

    path, cfg, _ = mcap_bag
    gt = read_ground_truth(path)
    for use_mesh in (True, False):
        o = OracleSession.from_bag(path, use_mesh=use_mesh)
        assert len(o) == N and (o._rc is not None) == use_mesh
        for i in (0, 5, N - 1):
            out = o.step(torch.zeros(1, 3, 48, 64), int(gt.stamps[i]))
            d = out["depth"][0, ..., 0].numpy()
            valid = out["depth_conf"][0].numpy() > 0
            assert np.array_equal(valid, np.isfinite(gt.depths[i]))  # sky is invalid (depth 0, confidence 0)
            assert np.allclose(d[valid], gt.depths[i][valid], rtol=1e-5)
            assert np.all(d[~valid] == 0)
            rel = np.linalg.inv(gt.T_world_cam[i]) @ gt.T_world_cam[0]  # camera-from-first-camera
            assert np.allclose(out["extrinsic"][0].numpy(), rel[:3], atol=1e-5)
