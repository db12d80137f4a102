"""The node's per-frame code without DDS: several cameras in one stream, and the near-duplicate gate."""

import numpy as np
import pytest

pytest.importorskip("rclpy")

from processor_helpers import make_processor as _processor  # noqa: E402


def _image(seed, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_simultaneous_cameras_each_get_their_own_outputs_in_one_stream():
    processor, pipeline, log = _processor(num_cameras=2)
    stamp = 1_000_000_000
    for k in range(3):
        for cam, frame in ((0, "front_optical"), (1, "rear_optical")):
            out = dict(processor.process(cam, stamp + k * 100_000_000, frame, _image(10 * k + cam)).messages)
            assert out["camera_pose"].header.frame_id == "map"
            assert out["depth_relative"].header.frame_id == frame
            (tf,) = out["tf"].transforms
            assert (tf.header.frame_id, tf.child_frame_id) == ("map", frame)
    assert processor.frames_done == 6
    assert pipeline.reconstructor.session.stats().frames_seen == 6  # one stream: both cameras share the cache
    assert not any("duplicate" in line for line in log.lines)


def test_gate_skips_a_still_camera_and_republishes_the_last_pose():
    processor, _, _ = _processor(gate_threshold=2.0, gate_max_skip=5)
    still = _image(1)
    first = dict(processor.process(0, 1_000_000_000, "cam", still).messages)
    skipped = dict(processor.process(0, 1_100_000_000, "cam", still.copy()).messages)
    assert processor.frames_gated == 1 and processor.frames_done == 1
    assert set(skipped) == {"camera_pose", "odometry", "tf"}, "a skipped frame republishes only the pose"
    assert skipped["camera_pose"].header.stamp.nanosec == 100_000_000
    assert skipped["camera_pose"].pose == first["camera_pose"].pose
    moved = dict(processor.process(0, 1_200_000_000, "cam", _image(2)).messages)
    assert "depth_relative" in moved and processor.frames_done == 2


def _static(buf, parent, child, xyz):
    from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, ns_to_time

    T = np.eye(4)
    T[:3, 3] = xyz
    buf.set_transform(matrix_to_transform_stamped(T, ns_to_time(0), parent, child), static=True)
    return T


def test_camera_driver_tree_gets_map_to_its_root_composed_with_the_static_chain():
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.conversions import pose_to_matrix, transform_to_matrix

    buf = TfBuffer()
    T_link_opt = _static(buf, "camera_link", "camera_color_optical_frame", (0.0, 0.015, 0.0))
    processor, _, log = _processor(tf=buf)
    for k in range(3):
        out = dict(processor.process(0, 1_000_000_000 + k * 100_000_000, "camera_color_optical_frame",
                                     _image(k)).messages)
        (tf,) = out["tf"].transforms
        assert (tf.header.frame_id, tf.child_frame_id) == ("map", "camera_link"), "never a second parent"
        T_map_cam = transform_to_matrix(tf) @ T_link_opt  # composed: the optical frame where ~/camera_pose says
        np.testing.assert_allclose(T_map_cam, pose_to_matrix(out["camera_pose"]), atol=1e-6)
        assert out["odometry"].header.frame_id == "map" and out["odometry"].child_frame_id == "camera_link"
        # REP-118: image and CameraInfo share one header; the depth geometry is pinhole
        assert out["depth_relative"].header == out["depth_relative_info"].header
        assert out["confidence"].header == out["confidence_info"].header == out["depth_relative"].header
        assert not any(out["depth_relative_info"].d)
        assert "depth" not in out, "no metric scale: nothing on ~/depth/image"


def test_a_frame_already_parented_by_another_node_is_never_published():
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer

    buf = TfBuffer()
    _static(buf, "map", "camera_link", (0, 0, 0))  # someone else localises the camera in map
    _static(buf, "camera_link", "cam_optical", (0, 0, 0))
    processor, _, log = _processor(tf=buf)
    out = dict(processor.process(0, 1_000_000_000, "cam_optical", _image(0)).messages)
    assert "tf" not in out and processor.decision.conflict
    assert any("publishes no TF" in line for line in log.lines)


def test_robot_odometry_ownership_and_metric_depth():
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, ns_to_time

    buf = TfBuffer()
    _static(buf, "base_link", "cam", (0.1, 0, 0.3))
    processor, _, _ = _processor(tf=buf, base_frame="base_link", scale_source="fixed", fixed_scale=2.0)
    out = dict(processor.process(0, 1_000_000_000, "cam", _image(0)).messages)
    edges = {(t.header.frame_id, t.child_frame_id) for t in out["tf"].transforms}
    assert edges == {("map", "odom"), ("odom", "base_link")}, "nothing else publishes odometry: we do"
    assert (out["odometry"].header.frame_id, out["odometry"].child_frame_id) == ("odom", "base_link")
    assert "depth" in out and "depth_relative" not in out, "a valid scale: metric depth"

    # another node publishes odom -> base_link (wheel odometry): the node owns only map -> odom
    for i, stamp in enumerate((900_000_000, 1_500_000_000)):
        T = np.eye(4)
        T[0, 3] = i
        buf.set_transform(matrix_to_transform_stamped(T, ns_to_time(stamp), "odom", "base_link"))
    processor, _, _ = _processor(tf=buf, base_frame="base_link", scale_source="fixed", fixed_scale=2.0,
                                 tf_timeout=0.0)
    out = dict(processor.process(0, 1_100_000_000, "cam", _image(1)).messages)
    edges = {(t.header.frame_id, t.child_frame_id) for t in out["tf"].transforms}
    assert edges == {("map", "odom")}
    assert (out["odometry"].header.frame_id, out["odometry"].child_frame_id) == ("map", "base_link")


def test_waiting_for_odometry_happens_in_wait_for_tf_never_inside_process():
    """The node calls wait_for_tf before it takes the map lock: the executor thread that delivers /tf may be
    blocked on that lock in a map timer, so a wait inside process() stalled both for tf_timeout (CI saw a late
    odometry warning and a wrong map -> odom)."""
    import dataclasses
    import threading

    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.conversions import (
        matrix_to_transform_stamped,
        ns_to_time,
        pose_to_matrix,
        transform_to_matrix,
    )

    class CountingBuffer(TfBuffer):
        def __init__(self):
            super().__init__()
            self.waits = []

        def wait_for_stamp(self, target, source, stamp_ns, timeout_s):
            self.waits.append(timeout_s)
            return super().wait_for_stamp(target, source, stamp_ns, timeout_s)

    def odom(buf, stamp, x):
        T = np.eye(4)
        T[0, 3] = x
        buf.set_transform(matrix_to_transform_stamped(T, ns_to_time(stamp), "odom", "base_link"))

    buf = CountingBuffer()
    _static(buf, "base_link", "cam", (0.1, 0, 0.3))
    odom(buf, 900_000_000, 0.0)
    processor, _, log = _processor(tf=buf, base_frame="base_link", scale_source="fixed", fixed_scale=2.0,
                                   tf_timeout=10.0)
    # the odometry of the image's instant arrives from another thread while wait_for_tf waits
    timer = threading.Timer(0.2, odom, (buf, 1_100_000_000, 2.0))
    timer.start()
    assert processor.wait_for_tf(1_000_000_000)
    timer.join()
    buf.waits.clear()
    out = dict(processor.process(0, 1_000_000_000, "cam", _image(0)).messages)
    assert buf.waits and all(t == 0.0 for t in buf.waits), f"process() waited for TF: {buf.waits}"
    (tf,) = out["tf"].transforms
    assert (tf.header.frame_id, tf.child_frame_id) == ("map", "odom")
    # map -> odom at the image stamp: odometry interpolated half-way (x = 1.0), not the latest (x = 2.0)
    T_odom_base = np.eye(4)
    T_odom_base[0, 3] = 1.0
    assert out["odometry"].header.frame_id == "map"
    np.testing.assert_allclose(transform_to_matrix(tf) @ T_odom_base, pose_to_matrix(out["odometry"].pose),
                               atol=1e-6)
    assert not any("late odometry" in line for line in log.lines)

    # odometry that never comes: wait_for_tf gives up after tf_timeout; process() warns and uses the latest
    processor.set_config(dataclasses.replace(processor.cfg, tf_timeout=0.05))  # a live parameter
    assert not processor.wait_for_tf(1_300_000_000)
    buf.waits.clear()
    processor.process(0, 1_300_000_000, "cam", _image(1))
    assert all(t == 0.0 for t in buf.waits)
    assert any("late odometry" in line for line in log.lines)


def test_a_backwards_time_jump_starts_a_new_stream():
    processor, pipeline, log = _processor()
    processor.process(0, 2_000_000_000, "cam", _image(0))
    processor.process(0, 2_100_000_000, "cam", _image(1))
    assert len(processor.path.poses) == 2
    processor.process(0, 1_000_000_000, "cam", _image(2))
    assert processor.resets == 1 and len(processor.path.poses) == 1
    assert pipeline.reconstructor.session.stats().frames_seen == 1


def test_a_distorted_lens_is_undistorted_before_the_model_and_depth_info_is_pinhole(tmp_path):
    """Item 7 of the ROS-citizen issue: the frame processor undistorts with the CameraInfo's lens before the model;
    the image the model sees matches the pinhole render, and the published CameraInfo has no distortion."""
    from ros2_stream4d.cli import main
    from ros2_stream4d.ros.conversions import numpy_to_image
    from ros2_stream4d.sim.bag import TOPICS, iter_messages, read_ground_truth
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    w, h, D = 160, 120, [-0.25, 0.08, 0.0, 0.0, -0.015]
    out = tmp_path / "lens"
    assert main(["sim", "--scene", "room", "--frames", "2", "--width", str(w), "--height", str(h), "--seed", "5",
                 "--out", str(out), "--quiet", "--distortion", "plumb_bob:" + ",".join(map(str, D))]) == 0
    gt = read_ground_truth(out, with_images=True)
    info = next(m for _, _, m in iter_messages(out, [TOPICS["camera_info"]]))
    scene = build_scene("room", 5)
    pinhole = Renderer(scene, CameraModel.from_hfov(w, h, 60.0)).render(
        make_trajectory(scene, "handheld", 2, seed=5).T_world_cam[0])

    processor, pipeline, _ = _processor(intrinsics_source="camera_info", input_width=154)
    processor.camera_info[0] = info
    rgb = processor.decode(numpy_to_image(gt.images[0], "rgb8", stamp=1, frame_id="cam"))
    outputs = dict(processor.process(0, 1_000_000_000, "cam", rgb).messages)
    seen = pipeline.last.prediction.rgb_model.astype(float)
    ideal = pipeline.reconstructor.preprocessor.prepare(pinhole.rgb)[0].permute(1, 2, 0).numpy() * 255.0
    raw = pipeline.reconstructor.preprocessor.prepare(gt.images[0])[0].permute(1, 2, 0).numpy() * 255.0
    inner = (slice(8, -8), slice(8, -8))  # interpolation differs at the border
    assert np.abs(seen - ideal)[inner].mean() < 0.5 * np.abs(raw - ideal)[inner].mean()
    assert processor.frames_undistorted == 1
    info_out = outputs["depth_relative_info"]
    assert not any(info_out.d) and info_out.distortion_model == "plumb_bob"


def test_a_resolution_change_mid_stream_skips_then_starts_a_new_stream():
    from ros2_stream4d.ros.frame_processor import SIZE_CHANGE_FRAMES

    processor, pipeline, log = _processor()
    processor.process(0, 1_000_000_000, "cam", _image(0))
    stamp = 1_000_000_000
    for k in range(SIZE_CHANGE_FRAMES - 1):  # a few odd frames are skipped, the stream goes on
        stamp += 100_000_000
        out = processor.process(0, stamp, "cam", _image(k + 1, h=60, w=80))
        assert out.messages == [] and out.outcome.reason == "image size changed"
    assert processor.resets == 0
    out = processor.process(0, stamp + 100_000_000, "cam", _image(99, h=60, w=80))
    assert processor.resets == 1 and out.messages, "the camera really changed resolution: a new stream"
    assert dict(out.messages)["depth_relative"].width == 80


def test_cloud_frame_camera_publishes_points_in_the_optical_frame():
    from ros2_stream4d.ros.conversions import pointcloud2_to_numpy, pose_to_matrix

    proc_map, _, _ = _processor()
    proc_cam, _, _ = _processor(cloud_frame="camera")
    for k in range(2):
        stamp = 1_000_000_000 + k * 100_000_000
        in_map = dict(proc_map.process(0, stamp, "cam", _image(k)).messages)
        in_cam = dict(proc_cam.process(0, stamp, "cam", _image(k)).messages)
    assert in_map["cloud"].header.frame_id == "map" and in_cam["cloud"].header.frame_id == "cam"
    xyz_cam = pointcloud2_to_numpy(in_cam["cloud"]).xyz.astype(np.float64)
    assert np.median(xyz_cam[:, 2]) > 0, "optical frame: z forward"
    T = pose_to_matrix(in_cam["camera_pose"])
    xyz_map = pointcloud2_to_numpy(in_map["cloud"]).xyz.astype(np.float64)
    moved = xyz_cam @ T[:3, :3].T + T[:3, 3]
    # the same model and input: the camera-frame cloud moved by ~/camera_pose is the map-frame cloud
    np.testing.assert_allclose(np.sort(moved, axis=0), np.sort(xyz_map, axis=0), atol=1e-3)


def _correction():
    from ros2_stream4d.mapping.conventions import rotation_from_vector

    C = np.eye(4)
    C[:3, :3] = rotation_from_vector(np.array([0.0, 0.0, 0.3]))
    C[:3, 3] = (0.5, -0.2, 0.05)
    return C


def _tf_of(out):
    from ros2_stream4d.ros.conversions import transform_to_matrix

    return {(t.header.frame_id, t.child_frame_id): transform_to_matrix(t) for t in out["tf"].transforms}


def test_backend_correction_goes_to_map_to_odom_in_every_tf_mode():
    """backend:=true: the estimate is odometry, the back-end's correction is map -> odom. A known correction (as
    if a loop had been applied) must reach /tf, ~/camera_pose, ~/odometry, ~/path and ~/cloud consistently."""
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, ns_to_time, pose_to_matrix

    C = _correction()
    # camera only, a driver's static tree: map -> odom (C) and odom -> camera_link (the odometry)
    buf = TfBuffer()
    T_link_opt = _static(buf, "camera_link", "camera_color_optical_frame", (0.0, 0.015, 0.0))
    processor, pipeline, _ = _processor(tf=buf, backend=True)
    try:
        pipeline.map_correction = C
        for k in range(2):
            out = dict(processor.process(0, 1_000_000_000 + k * 100_000_000, "camera_color_optical_frame",
                                         _image(k)).messages)
            tf = _tf_of(out)
            assert set(tf) == {("map", "odom"), ("odom", "camera_link")}
            np.testing.assert_allclose(tf["map", "odom"], C, atol=1e-6)
            T_odom_cam = pipeline.last.T_map_cam  # the pipeline's pose: odometry
            np.testing.assert_allclose(tf["odom", "camera_link"] @ T_link_opt, T_odom_cam, atol=1e-6)
            np.testing.assert_allclose(pose_to_matrix(out["camera_pose"]), C @ T_odom_cam, atol=1e-6)
            assert out["camera_pose"].header.frame_id == "map"
            assert (out["odometry"].header.frame_id, out["odometry"].child_frame_id) == ("odom", "camera_link")
            np.testing.assert_allclose(pose_to_matrix(out["odometry"].pose), tf["odom", "camera_link"], atol=1e-6)
            np.testing.assert_allclose(pose_to_matrix(out["path"].poses[-1]), C @ tf["odom", "camera_link"], atol=1e-6)
        from ros2_stream4d.ros.conversions import pointcloud2_to_numpy

        # ~/cloud is in map: taken back into the camera by ~/camera_pose, its points land on the published depth
        assert out["cloud"].header.frame_id == "map"
        xyz = pointcloud2_to_numpy(out["cloud"]).xyz.astype(np.float64)
        T_cam_map = np.linalg.inv(pose_to_matrix(out["camera_pose"]))
        p = xyz @ T_cam_map[:3, :3].T + T_cam_map[:3, 3]
        r = pipeline.last
        uv = p @ r.K.T
        u, v = np.round(uv[:, 0] / uv[:, 2]).astype(int), np.round(uv[:, 1] / uv[:, 2]).astype(int)
        h, w = r.depth.shape
        inside = (p[:, 2] > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        assert inside.mean() > 0.95
        rel = np.abs(r.depth[v[inside], u[inside]] - p[inside, 2]) / p[inside, 2]
        assert np.nanmedian(rel) < 0.05
    finally:
        pipeline.close()

    # robot, the node owns odometry: map -> odom (C) and odom -> base_link
    buf = TfBuffer()
    T_base_cam = _static(buf, "base_link", "cam", (0.1, 0, 0.3))
    processor, pipeline, _ = _processor(tf=buf, base_frame="base_link", backend=True)
    try:
        pipeline.map_correction = C
        out = dict(processor.process(0, 1_000_000_000, "cam", _image(0)).messages)
        tf = _tf_of(out)
        assert set(tf) == {("map", "odom"), ("odom", "base_link")}
        np.testing.assert_allclose(tf["map", "odom"], C, atol=1e-6)
        np.testing.assert_allclose(C @ tf["odom", "base_link"] @ T_base_cam, pose_to_matrix(out["camera_pose"]),
                                   atol=1e-6)
    finally:
        pipeline.close()

    # robot with wheel odometry (another node owns odom -> base_link): map -> odom = C x the node's estimate
    buf = TfBuffer()
    T_base_cam = _static(buf, "base_link", "cam", (0.1, 0, 0.3))
    T_odom_base = np.eye(4)
    T_odom_base[:3, 3] = (2.0, 1.0, 0.0)
    for stamp in (900_000_000, 1_500_000_000):
        buf.set_transform(matrix_to_transform_stamped(T_odom_base, ns_to_time(stamp), "odom", "base_link"))
    processor, pipeline, _ = _processor(tf=buf, base_frame="base_link", backend=True, tf_timeout=0.0)
    try:
        pipeline.map_correction = C
        out = dict(processor.process(0, 1_100_000_000, "cam", _image(1)).messages)
        tf = _tf_of(out)
        assert set(tf) == {("map", "odom")}
        T_map_cam = tf["map", "odom"] @ T_odom_base @ T_base_cam  # through the wheel odometry's chain
        np.testing.assert_allclose(T_map_cam, pose_to_matrix(out["camera_pose"]), atol=1e-6)
        np.testing.assert_allclose(T_map_cam, C @ pipeline.last.T_map_cam, atol=1e-6)
        assert out["odometry"].header.frame_id == "map"
        np.testing.assert_allclose(pose_to_matrix(out["odometry"].pose), T_map_cam @ np.linalg.inv(T_base_cam),
                                   atol=1e-6)
    finally:
        pipeline.close()


def test_backend_refuses_a_forced_odom_to_base_mode():
    from ros2_stream4d.ros.config import ParameterError, make_config

    with pytest.raises(ParameterError, match="backend"):
        make_config({"model": "random-small", "backend": True, "tf_mode": "odom_to_base", "base_frame": "base_link"})
    with pytest.raises(ParameterError, match="segment_overlap_frames"):
        make_config({"model": "random-small", "segment_overlap_frames": 30, "segment_min_frames": 24})


def test_backend_loop_settings_change_live_and_the_worker_stops_with_the_pipeline():
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.ros.config import as_dict, check_change

    processor, pipeline, _ = _processor(backend=True)
    try:
        cfg = check_change(processor.cfg, {"loop_min_similarity": 0.9, "loop_min_inliers": 35})
        pipeline.update_config(PipelineConfig.from_params(as_dict(cfg)))
        c = pipeline.backend.detector.config
        assert (c.min_similarity, c.min_inliers) == (0.9, 35)
        thread = pipeline.backend._thread
        assert thread.is_alive()
    finally:
        pipeline.close()
    assert not thread.is_alive() and pipeline.backend is None


def test_a_camera_tree_under_odom_gets_map_to_odom_and_conflicts_only_with_the_backend():
    """A driver or simulator publishing odom -> ... -> the camera (no base_frame given): camera only, the tree's
    root is odom and the node publishes map -> odom; with the back-end, odom would get the back-end's map -> odom
    and the estimate's odom -> root at once, so the node refuses with one clear error."""
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer

    buf = TfBuffer()
    _static(buf, "odom", "cam_link", (0.0, 0.0, 0.5))
    _static(buf, "cam_link", "cam_optical", (0.0, 0.0, 0.0))
    processor, _, _ = _processor(tf=buf)
    out = dict(processor.process(0, 1_000_000_000, "cam_optical", _image(0)).messages)
    assert set(_tf_of(out)) == {("map", "odom")}
    processor, pipeline, log = _processor(tf=buf, backend=True)
    try:
        out = dict(processor.process(0, 1_000_000_000, "cam_optical", _image(0)).messages)
        assert "tf" not in out and "odom" in processor.decision.conflict
    finally:
        pipeline.close()
