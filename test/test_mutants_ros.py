"""The ROS output assembly (ros/assembler.py) and the TF policy (ros/tf_policy.py) in-process, without DDS: the
tests that answer the mutants docs/mutation.md lists for these two modules. Message types come from rclpy's
packages; no node, no executor, no discovery."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("geometry_msgs")

from ros2_stream4d.ros.tf_policy import (  # noqa: E402
    MAX_DEPTH,
    TfDecision,
    TransformNotFound,
    body_pose,
    camera_tree_root,
    check_one_parent,
    decide,
    edge_transforms,
)


def _T(x=0.0, y=0.0, z=0.0, yaw=0.0):
    """An asymmetric rigid transform: a rotation about z and a translation."""
    T = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = (x, y, z)
    return T


class FakeTf:
    """TfView: child -> parent edges, and a lookup table (target, source) -> target_from_source."""

    def __init__(self, parents=None, transforms=None):
        self.parents = dict(parents or {})
        self.transforms = dict(transforms or {})
        self.calls = []

    def parent_of(self, frame):
        return self.parents.get(frame)

    def lookup(self, target, source, stamp_ns=None):
        self.calls.append((target, source, stamp_ns))
        return self.transforms[(target, source)]


def _cfg(**kw):
    values = dict(map_frame="world", odom_frame="odom_x", base_frame="", tf_mode="auto", backend=False)
    values.update(kw)
    return SimpleNamespace(**values)


# ---------------------------------------------------------------------------------------------------- tf_policy
def test_decision_edges_per_mode():
    cfg = _cfg(base_frame="robot")
    assert TfDecision("none", "", "cam", "cam", "why").edges(cfg) == []
    assert TfDecision("odom_to_base", "odom_x", "robot", "robot").edges(cfg) == [("world", "odom_x"),
                                                                                   ("odom_x", "robot")]
    assert TfDecision("map_to_camera", "world", "camera_link", "camera_link").edges(cfg) == [("world", "camera_link")]
    assert TfDecision("map_to_odom", "world", "odom_x", "robot").edges(cfg) == [("world", "odom_x")]
    assert TfDecision("map_to_odom", "world", "odom_x", "robot").conflict == ""
    # with the back-end, camera only: map -> odom (the correction) above odom -> root
    backend = _cfg(backend=True)
    assert TfDecision("map_to_camera", "odom_x", "camera_link", "camera_link").edges(backend) == [
        ("world", "odom_x"), ("odom_x", "camera_link")]
    assert TfDecision("map_to_odom", "world", "odom_x", "robot").edges(backend) == [("world", "odom_x")]


def test_camera_tree_root_walks_up_and_stops_at_own_edges():
    tf = FakeTf({"opt": "link", "link": "mount", "mount": "base"})
    assert camera_tree_root(tf, "opt", set()) == "base"
    assert camera_tree_root(tf, "base", set()) == "base", "a frame without a parent is its own root"
    # an edge we published ourselves (map -> root of an earlier decision) is not part of the camera's tree
    assert camera_tree_root(tf, "opt", {("mount", "link")}) == "link"
    assert camera_tree_root(tf, "opt", {("base", "mount")}) == "mount"
    assert camera_tree_root(tf, "opt", {("link", "mount")}) == "base", "only the exact (parent, child) pair counts"


def test_camera_tree_root_refuses_cycles_and_too_deep_trees():
    tf = FakeTf({"a": "b", "b": "c", "c": "a"})
    with pytest.raises(TransformNotFound, match=r"cycle above 'a': a -> b -> c -> a"):
        camera_tree_root(tf, "a", set())
    # a chain of MAX_DEPTH - 1 edges is walked to its root; one of MAX_DEPTH edges is refused
    chain = {f"f{i}": f"f{i + 1}" for i in range(MAX_DEPTH - 1)}
    assert camera_tree_root(FakeTf(chain), "f0", set()) == f"f{MAX_DEPTH - 1}"
    chain[f"f{MAX_DEPTH - 1}"] = f"f{MAX_DEPTH}"
    with pytest.raises(TransformNotFound, match=f"deeper than {MAX_DEPTH}"):
        camera_tree_root(FakeTf(chain), "f0", set())
    assert MAX_DEPTH == 64


def test_decide_camera_only():
    cfg = _cfg()
    d = decide(cfg, FakeTf({"opt": "link"}), "opt", external_odom=False, own_edges=set())
    assert d == TfDecision("map_to_camera", "world", "link", "link")
    d = decide(cfg, FakeTf(), "opt", external_odom=True, own_edges=set())
    assert d == TfDecision("map_to_camera", "world", "opt", "opt"), "external odometry means nothing without a base"
    # the camera already hangs below the map frame through another node: no TF at all, one clear reason
    d = decide(cfg, FakeTf({"opt": "link", "link": "world"}), "opt", external_odom=False, own_edges=set())
    assert (d.mode, d.parent, d.child, d.moving_frame) == ("none", "", "opt", "opt")
    assert d.conflict == "'opt' already hangs below 'world' through another node's TF: the node publishes no TF"
    assert d.edges(cfg) == []
    # ... but below it through our own edge: the same decision again
    d = decide(cfg, FakeTf({"opt": "link", "link": "world"}), "opt", False, {("world", "link")})
    assert d == TfDecision("map_to_camera", "world", "link", "link")


def test_decide_robot_modes_and_conflicts():
    cfg = _cfg(base_frame="robot")
    assert decide(cfg, FakeTf({"cam": "robot"}), "cam", False, set()) == \
        TfDecision("odom_to_base", "odom_x", "robot", "robot")
    assert decide(cfg, FakeTf({"cam": "robot"}), "cam", True, set()) == \
        TfDecision("map_to_odom", "world", "odom_x", "robot")
    # our own edges never count as another node's
    own = {("odom_x", "robot"), ("world", "odom_x")}
    assert decide(cfg, FakeTf({"robot": "odom_x", "odom_x": "world"}), "cam", False, own).mode == "odom_to_base"
    assert decide(cfg, FakeTf({"odom_x": "world"}), "cam", True, own).mode == "map_to_odom"

    # odom_to_base forced: the base's parent from another node, external odometry, or odom's parent refuse it
    forced = _cfg(base_frame="robot", tf_mode="odom_to_base")
    d = decide(forced, FakeTf({"robot": "wheels"}), "cam", False, set())
    assert (d.mode, d.parent, d.child, d.moving_frame) == ("none", "", "robot", "robot")
    assert d.conflict == ("'robot' already has the parent 'wheels' from another node: the node publishes no "
                          "odom_x -> robot (use tf_mode map_to_odom)")
    d = decide(forced, FakeTf(), "cam", True, set())
    assert d.mode == "none" and d.conflict.startswith("'robot' already has the parent None")
    d = decide(forced, FakeTf({"odom_x": "earth"}), "cam", False, set())
    assert d.mode == "none" and d.conflict.startswith("'odom_x' already has the parent 'earth'")
    d = decide(forced, FakeTf({"robot": "odom_x", "odom_x": "earth"}), "cam", False, {("odom_x", "robot")})
    assert d.mode == "none" and "'earth'" in d.conflict, "odom's foreign parent is checked after the base's own edge"

    # map_to_odom: odom's parent from another node refuses it; our own is fine
    m2o = _cfg(base_frame="robot", tf_mode="map_to_odom")
    d = decide(m2o, FakeTf({"odom_x": "earth"}), "cam", False, set())
    assert (d.mode, d.parent, d.child, d.moving_frame) == ("none", "", "odom_x", "robot")
    assert d.conflict == ("'odom_x' already has the parent 'earth' from another node: the node publishes no "
                          "world -> odom_x")
    assert decide(m2o, FakeTf({"odom_x": "world"}), "cam", False, {("world", "odom_x")}) == \
        TfDecision("map_to_odom", "world", "odom_x", "robot")
    # map_to_camera forced on a robot: the camera tree's root
    d = decide(_cfg(base_frame="robot", tf_mode="map_to_camera"), FakeTf({"cam": "robot"}), "cam", False, set())
    assert d == TfDecision("map_to_camera", "world", "robot", "robot")


def _result(**kw):
    values = dict(T_map_cam=_T(1.0, 2.0, 0.5, 0.3), T_map_base=None, T_map_odom=None, stamp_ns=1_234_567_891,
                  odom_correction=None)
    values.update(kw)
    return SimpleNamespace(**values)


def test_body_pose_composes_the_static_chain_up_to_the_root():
    T_cam_root = _T(-0.1, 0.05, 0.2, -0.7)
    tf = FakeTf(transforms={("opt", "link"): T_cam_root})
    r = _result()
    body = body_pose(TfDecision("map_to_camera", "world", "link", "link"), r, tf, "opt")
    np.testing.assert_allclose(body, r.T_map_cam @ T_cam_root)
    assert tf.calls == [("opt", "link", 1_234_567_891)], "looked up at the frame's stamp, camera <- root"
    # the image frame is the root: the camera pose itself, no lookup
    tf.calls.clear()
    assert body_pose(TfDecision("map_to_camera", "world", "opt", "opt"), r, tf, "opt") is r.T_map_cam
    assert tf.calls == []
    # robot modes: the base when there is one, else the camera
    base = _T(3.0, -1.0, 0.0, 1.1)
    for mode in ("odom_to_base", "map_to_odom", "none"):
        d = TfDecision(mode, "odom_x", "robot", "robot")
        assert body_pose(d, _result(T_map_base=base), tf, "opt") is base
        assert body_pose(d, r, tf, "opt") is r.T_map_cam


def test_edge_transforms_per_mode():
    cfg = _cfg(base_frame="robot")
    body, base, odom = _T(1, 0, 0, 0.1), _T(0, 2, 0, 0.2), _T(0, 0, 3, 0.3)
    r = _result(T_map_base=base, T_map_odom=odom)
    (e,) = edge_transforms(TfDecision("map_to_camera", "world", "link", "link"), cfg, r, body)
    assert e[:2] == ("world", "link") and e[2] is body
    (a, b) = edge_transforms(TfDecision("odom_to_base", "odom_x", "robot", "robot"), cfg, r, body)
    assert a[:2] == ("world", "odom_x") and b[:2] == ("odom_x", "robot")
    np.testing.assert_array_equal(a[2], np.eye(4))
    assert b[2] is base
    (e,) = edge_transforms(TfDecision("map_to_odom", "world", "odom_x", "robot"), cfg, r, body)
    assert e[:2] == ("world", "odom_x")
    np.testing.assert_allclose(e[2], odom)
    assert edge_transforms(TfDecision("map_to_odom", "world", "odom_x", "robot"), cfg, _result(), body) == []
    assert edge_transforms(TfDecision("none", "", "robot", "robot"), cfg, r, body) == []


def test_check_one_parent_reports_each_problem_once_and_sorted():
    assert check_one_parent([]) == []
    assert check_one_parent([("map", "odom"), ("/map", "/odom"), ("odom", "base")]) == [], "a leading / is the same"
    problems = check_one_parent([("map", "z_cam"), ("odom", "z_cam"), ("rig", "z_cam"), ("map", "a_cam"),
                                 ("odom", "a_cam"), ("map", "a_cam")])
    assert problems == ["'a_cam' has 2 parents: ['map', 'odom']", "'z_cam' has 3 parents: ['map', 'odom', 'rig']"]
    # one cycle, reported once however many of its frames the walk starts from; a tree hanging off it is fine
    assert check_one_parent([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == ["cycle through 'a'",
                                                                                     "cycle through 'b'",
                                                                                     "cycle through 'c'"]
    assert check_one_parent([("a", "a")]) == ["cycle through 'a'"]
    # "/cam" and "cam" are one frame, as child and as parent
    assert check_one_parent([("map", "/cam"), ("odom", "cam")]) == ["'cam' has 2 parents: ['map', 'odom']"]
    assert check_one_parent([("/b", "a"), ("a", "b")]) == ["cycle through 'a'", "cycle through 'b'"]
    # only the leading "/" goes: a name may start with any other character
    assert check_one_parent([("map", "/Xtion"), ("odom", "Xtion")]) == ["'Xtion' has 2 parents: ['map', 'odom']"]
    assert check_one_parent([("/Xa", "b"), ("/Xb", "b")]) == ["'b' has 2 parents: ['Xa', 'Xb']"]


def test_decide_with_the_backend_puts_the_camera_root_below_odom():
    cfg = _cfg(backend=True)
    assert decide(cfg, FakeTf({"opt": "link"}), "opt", False, set()) == TfDecision("map_to_camera", "odom_x", "link",
                                                                                  "link")
    # our own map -> odom is no conflict; another node's parent of odom is
    assert decide(cfg, FakeTf({"opt": "link", "odom_x": "world"}), "opt", False, {("world", "odom_x")}).mode == \
        "map_to_camera"
    d = decide(cfg, FakeTf({"opt": "link", "odom_x": "earth"}), "opt", False, set())
    assert (d.mode, d.parent, d.child, d.moving_frame) == ("none", "", "opt", "opt")
    assert d.conflict == ("'odom_x' already has the parent 'earth' from another node: the back-end cannot publish "
                          "world -> odom_x")
    # the camera already hangs below odom (another node): with the back-end nothing, naming the frame it hangs
    # below; without it odom is the tree's root and gets map -> odom
    d = decide(cfg, FakeTf({"opt": "link", "link": "odom_x"}), "opt", False, set())
    assert d.mode == "none" and d.conflict.startswith("'opt' already hangs below 'odom_x' through another node")
    d = decide(_cfg(), FakeTf({"opt": "link", "link": "odom_x"}), "opt", False, set())
    assert (d.mode, d.parent, d.child, d.conflict) == ("map_to_camera", "world", "odom_x", "")


def test_the_backend_correction_in_body_pose_and_edges():
    C = _T(0.5, -0.2, 0.05, 0.3)
    body, base, odom = _T(1, 0, 0, 0.1), _T(0, 2, 0, 0.2), _T(0, 0, 3, 0.9)
    r = _result(T_map_base=base, T_map_odom=odom, odom_correction=C)
    tf = FakeTf()
    # map_to_odom: the header frame is map, so the odometry body pose is corrected; the others stay in odom
    np.testing.assert_allclose(body_pose(TfDecision("map_to_odom", "world", "odom_x", "robot"), r, tf, "cam"),
                               C @ base)
    assert body_pose(TfDecision("odom_to_base", "odom_x", "robot", "robot"), r, tf, "cam") is base
    assert body_pose(TfDecision("map_to_camera", "odom_x", "cam", "cam"), r, tf, "cam") is r.T_map_cam

    cfg = _cfg(base_frame="robot", backend=True)
    (a, b) = edge_transforms(TfDecision("map_to_camera", "odom_x", "link", "link"), cfg, r, body)
    assert a[:2] == ("world", "odom_x") and b[:2] == ("odom_x", "link") and b[2] is body
    np.testing.assert_allclose(a[2], C)
    (a, b) = edge_transforms(TfDecision("odom_to_base", "odom_x", "robot", "robot"), cfg, r, body)
    np.testing.assert_allclose(a[2], C)
    assert b[2] is base
    (e,) = edge_transforms(TfDecision("map_to_odom", "world", "odom_x", "robot"), cfg, r, body)
    np.testing.assert_allclose(e[2], C @ odom)
    # no correction yet: the back-end's map -> odom is the identity
    (a, _) = edge_transforms(TfDecision("map_to_camera", "odom_x", "link", "link"), cfg, _result(), body)
    np.testing.assert_array_equal(a[2], np.eye(4))


# ---------------------------------------------------------------------------------------------------- assembler
STAMP = 1_234_567_891


def _assembler(tf=None, **overrides):
    from ros2_stream4d.ros.assembler import OutputAssembler
    from ros2_stream4d.ros.config import make_config

    cfg = make_config({"model": "random-small", "map_frame": "world", "odom_frame": "odom_x", **overrides})
    return OutputAssembler(cfg, tf if tf is not None else FakeTf())


def _frame(stamp_ns=STAMP, T_map_cam=None, scale_valid=True, **kw):
    """A FrameResult with an asymmetric depth (4 x 6; finite median 2, mean 4) and confidence (median 2, mean 5)."""
    from ros2_stream4d.mapping.pipeline import FrameResult

    depth = np.full((4, 6), np.nan, np.float32)
    depth[0, :5] = (1.0, 2.0, 2.0, 9.0, 6.0)
    conf = np.full((4, 6), np.nan, np.float32)
    conf[1, :3] = (1.5, 2.0, 11.5)
    K = np.array([[50.0, 0.0, 2.5], [0.0, 40.0, 1.5], [0.0, 0.0, 1.0]])
    xyz = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], np.float32)
    values = dict(stamp_ns=stamp_ns, camera=0, prediction=None,
                  T_map_cam=_T(1.0, 2.0, 0.5, 0.3) if T_map_cam is None else T_map_cam, T_map_base=None,
                  T_map_odom=None, depth=depth, confidence=conf, K=K, cloud_xyz=xyz,
                  cloud_rgb=np.array([[255, 0, 10], [0, 128, 255]], np.uint8),
                  cloud_conf=np.array([0.5, 3.0], np.float32), scale=2.0, scale_valid=scale_valid)
    values.update(kw)
    return FrameResult(**values)


CAMERA = TfDecision("map_to_camera", "world", "cam", "cam")


def _stamp_ns(msg):
    from ros2_stream4d.ros.conversions import time_to_ns

    return time_to_ns(msg.header.stamp)


def test_every_output_of_a_processed_frame():
    from ros2_stream4d.mapping.pipeline import Processed
    from ros2_stream4d.ros.conversions import image_to_numpy, pointcloud2_to_numpy, pose_to_matrix, transform_to_matrix

    a = _assembler()
    r = _frame()
    msgs = a.messages(Processed(r), CAMERA, "cam")
    keys = [k for k, _ in msgs]
    assert keys == ["cloud", "depth", "depth_info", "confidence", "confidence_info", "camera_pose", "odometry",
                    "path", "tf"]
    out = dict(msgs)
    for k in keys:
        msg = out[k]
        if k != "tf":
            assert _stamp_ns(msg) == STAMP, k
    assert [_stamp_ns(t) for t in out["tf"].transforms] == [STAMP]
    cloud = pointcloud2_to_numpy(out["cloud"])
    assert out["cloud"].header.frame_id == "world"
    np.testing.assert_array_equal(cloud.xyz, r.cloud_xyz)
    np.testing.assert_array_equal(cloud.rgb, r.cloud_rgb)
    np.testing.assert_array_equal(cloud.confidence, r.cloud_conf)
    # depth, confidence and their CameraInfo: one header in the camera frame, the depth's size and K
    for k in ("depth", "depth_info", "confidence", "confidence_info"):
        assert out[k].header.frame_id == "cam", k
    depth = image_to_numpy(out["depth"])
    np.testing.assert_array_equal(depth, r.depth)
    np.testing.assert_array_equal(image_to_numpy(out["confidence"]), r.confidence)
    assert out["depth"].encoding == out["confidence"].encoding == "32FC1"
    info = out["depth_info"]
    assert (info.width, info.height) == (6, 4)
    np.testing.assert_allclose(np.reshape(info.k, (3, 3)), r.K)
    assert out["confidence_info"] is info
    # poses
    assert out["camera_pose"].header.frame_id == "world"
    np.testing.assert_allclose(pose_to_matrix(out["camera_pose"]), r.T_map_cam, atol=1e-12)
    odo = out["odometry"]
    assert (odo.header.frame_id, odo.child_frame_id) == ("world", "cam")
    np.testing.assert_allclose(pose_to_matrix(odo.pose), r.T_map_cam, atol=1e-12)
    assert out["path"].header.frame_id == "world" and _stamp_ns(out["path"]) == STAMP
    assert len(out["path"].poses) == 1 and out["path"].poses[0].header.frame_id == "world"
    np.testing.assert_allclose(pose_to_matrix(out["path"].poses[0]), r.T_map_cam, atol=1e-12)
    (t,) = out["tf"].transforms
    assert (t.header.frame_id, t.child_frame_id) == ("world", "cam")
    np.testing.assert_allclose(transform_to_matrix(t), r.T_map_cam, atol=1e-12)
    assert a.own_edges == {("world", "cam")}


def test_relative_depth_camera_cloud_and_publish_flags():
    from ros2_stream4d.mapping.pipeline import Processed

    decision = TfDecision("map_to_camera", "world", "cam_opt", "cam_opt")
    out = dict(_assembler(cloud_frame="camera").messages(Processed(_frame(scale_valid=False)), decision, "cam_opt"))
    assert "depth" not in out and "depth_info" not in out
    assert out["depth_relative"].header.frame_id == out["depth_relative_info"].header.frame_id == "cam_opt"
    assert out["cloud"].header.frame_id == "cam_opt"

    def keys(**flags):
        return [k for k, _ in _assembler(**flags).messages(Processed(_frame()), CAMERA, "cam")]

    assert keys(publish_cloud=False)[0] == "depth"
    assert keys(publish_depth=False) == ["cloud", "confidence", "confidence_info", "camera_pose", "odometry", "path",
                                         "tf"]
    assert keys(publish_confidence=False) == ["cloud", "depth", "depth_info", "camera_pose", "odometry", "path", "tf"]
    assert keys(publish_depth=False, publish_confidence=False) == ["cloud", "camera_pose", "odometry", "path", "tf"]
    assert "camera_pose" not in keys(publish_camera_pose=False)
    assert "odometry" not in keys(publish_odometry=False)
    assert "path" not in keys(publish_path=False)
    assert "tf" not in keys(publish_tf=False)


def test_skipped_and_gated_frames():
    from ros2_stream4d.mapping.pipeline import Gated, Processed, Skipped

    a = _assembler()
    assert a.messages(Skipped("no image"), CAMERA, "cam") == []
    assert a.messages(Gated(None), CAMERA, "cam") == []
    a.messages(Processed(_frame()), CAMERA, "cam")
    gated = a.messages(Gated(_frame(stamp_ns=STAMP + 100_000_000)), CAMERA, "cam")
    assert [k for k, _ in gated] == ["camera_pose", "odometry", "tf"], "a gated frame republishes only the pose"
    assert all(_stamp_ns(m) == STAMP + 100_000_000 for k, m in gated if k != "tf")
    assert len(a.path.poses) == 1, "a gated frame does not extend the path"
    # publish_tf off and an edge that cannot be formed this frame: no tf message, no own edge
    a = _assembler(base_frame="robot")
    m2o = TfDecision("map_to_odom", "world", "odom_x", "robot")
    out = dict(a.messages(Processed(_frame()), m2o, "cam"))
    assert "tf" not in out and a.own_edges == set()


def test_odometry_covariance_follows_the_median_depth_and_confidence_and_the_twist_the_motion():
    from dataclasses import replace

    from ros2_stream4d.mapping.pipeline import Processed

    a = _assembler()
    odo = dict(a.messages(Processed(_frame()), CAMERA, "cam"))["odometry"]
    # median depth 2 (mean 4), median confidence 2 (mean 5): factor 1 / (1 - 1/2) = 2
    sigma_p, sigma_r = 0.02 * 2.0 * 2.0, 0.01 * 2.0
    np.testing.assert_allclose(np.reshape(odo.pose.covariance, (6, 6)),
                               np.diag([sigma_p ** 2] * 3 + [sigma_r ** 2] * 3), rtol=1e-9)
    np.testing.assert_allclose(np.reshape(odo.twist.covariance, (6, 6)), np.eye(6) * 1e6)
    # 0.1 s later, 0.2 m further along the camera's x axis and turned 0.05 rad about z: the twist in the new body
    # frame (the step seen from the turned body), 0.5 rad/s
    T0 = _frame().T_map_cam
    T1 = T0 @ _T(0.2, 0.0, 0.0, 0.05)
    odo = dict(a.messages(Processed(_frame(STAMP + 100_000_000, T1, scale_valid=False)), CAMERA, "cam"))["odometry"]
    tw = odo.twist.twist
    np.testing.assert_allclose([tw.linear.x, tw.linear.y, tw.linear.z], [2.0 * np.cos(0.05), -2.0 * np.sin(0.05), 0.0],
                               atol=1e-9)
    np.testing.assert_allclose([tw.angular.x, tw.angular.y, tw.angular.z], [0.0, 0.0, 0.5], atol=1e-9)
    # no metric scale: the position sigma grows by unscaled_sigma_factor
    np.testing.assert_allclose(np.reshape(odo.pose.covariance, (6, 6))[0, 0], (sigma_p * 1000.0) ** 2, rtol=1e-9)
    np.testing.assert_allclose(np.reshape(odo.twist.covariance, (6, 6))[5, 5], 2 * sigma_r ** 2 / 0.1 ** 2,
                               rtol=1e-9)
    # the configured factor from the first frame on
    b = _assembler(unscaled_sigma_factor=50.0)
    odo = dict(b.messages(Processed(_frame(scale_valid=False)), CAMERA, "cam"))["odometry"]
    np.testing.assert_allclose(np.reshape(odo.pose.covariance, (6, 6))[0, 0], (sigma_p * 50.0) ** 2, rtol=1e-9)
    # live parameter change: new sigmas are used from the next frame
    a.set_config(replace(a.cfg, pose_sigma_per_m=0.05, rotation_sigma=0.03, unscaled_sigma_factor=10.0))
    odo = dict(a.messages(Processed(_frame(STAMP + 200_000_000, T1, scale_valid=False)), CAMERA, "cam"))["odometry"]
    np.testing.assert_allclose(np.reshape(odo.pose.covariance, (6, 6)),
                               np.diag([(0.05 * 2 * 2 * 10.0) ** 2] * 3 + [(0.03 * 2) ** 2] * 3), rtol=1e-9)
    # a reset forgets the last pose: no twist from the jump to the next frame
    a.reset()
    assert a.path.poses == []
    odo = dict(a.messages(Processed(_frame(STAMP + 300_000_000, T0)), CAMERA, "cam"))["odometry"]
    assert odo.twist.twist.linear.x == 0.0
    np.testing.assert_allclose(np.reshape(odo.twist.covariance, (6, 6)), np.eye(6) * 1e6)


def test_odometry_without_finite_depth_or_confidence():
    from ros2_stream4d.mapping.pipeline import Processed

    nan = np.full((4, 6), np.nan, np.float32)
    odo = dict(_assembler().messages(Processed(_frame(depth=nan, confidence=nan)), CAMERA, "cam"))["odometry"]
    # no depth: 1 m; no confidence: the largest factor
    from ros2_stream4d.mapping.motion import MAX_CONF_FACTOR

    np.testing.assert_allclose(np.reshape(odo.pose.covariance, (6, 6))[0, 0], (0.02 * MAX_CONF_FACTOR) ** 2,
                               rtol=1e-9)


def test_path_keeps_the_newest_poses_and_snapshots_are_copies():
    from dataclasses import replace

    from ros2_stream4d.mapping.pipeline import Processed
    from ros2_stream4d.ros.conversions import pose_to_matrix

    a = _assembler(path_max_length=3)
    assert a.path_snapshot().header.frame_id == "world" and a.path_snapshot().poses == []
    for k in range(5):
        a.messages(Processed(_frame(STAMP + k, _T(float(k)))), CAMERA, "cam")
    assert [pose_to_matrix(p)[0, 3] for p in a.path.poses] == [2.0, 3.0, 4.0]
    assert _stamp_ns(a.path) == STAMP + 4
    assert [_stamp_ns(p) for p in a.path.poses] == [STAMP + 2, STAMP + 3, STAMP + 4]
    assert {p.header.frame_id for p in a.path.poses} == {"world"}
    snap = a.path_snapshot()
    assert snap.header == a.path.header and snap.poses == a.path.poses
    a.messages(Processed(_frame(STAMP + 5, _T(5.0))), CAMERA, "cam")
    assert len(snap.poses) == 3 and [pose_to_matrix(p)[0, 3] for p in snap.poses] == [2.0, 3.0, 4.0]
    a.set_config(replace(a.cfg, path_max_length=2))
    assert [pose_to_matrix(p)[0, 3] for p in a.path.poses] == [4.0, 5.0]
    a.set_config(replace(a.cfg, path_max_length=5))
    assert len(a.path.poses) == 2
    assert a.path.header.frame_id == "world"


def test_the_backend_correction_moves_camera_pose_path_and_map_to_odom_odometry():
    from ros2_stream4d.mapping.pipeline import Processed
    from ros2_stream4d.ros.conversions import pose_to_matrix

    C = _T(0.5, -0.2, 0.05, 0.3)
    r = _frame(odom_correction=C, T_map_base=_T(3.0, 1.0, 0.0, -0.4))
    # camera only: odometry and the root's edge in odom; ~/camera_pose and ~/path in map
    out = dict(_assembler(backend=True).messages(Processed(r), TfDecision("map_to_camera", "odom_x", "cam", "cam"),
                                                 "cam"))
    np.testing.assert_allclose(pose_to_matrix(out["camera_pose"]), C @ r.T_map_cam, atol=1e-12)
    assert out["odometry"].header.frame_id == "odom_x"
    np.testing.assert_allclose(pose_to_matrix(out["odometry"].pose), r.T_map_cam, atol=1e-12)
    np.testing.assert_allclose(pose_to_matrix(out["path"].poses[-1]), C @ r.T_map_cam, atol=1e-12)
    # robot, another node owns odom -> base: odometry in map is already corrected (once), and so is the path
    out = dict(_assembler(base_frame="robot", backend=True).messages(
        Processed(r), TfDecision("map_to_odom", "world", "odom_x", "robot"), "cam"))
    assert out["odometry"].header.frame_id == "world" and out["odometry"].child_frame_id == "robot"
    np.testing.assert_allclose(pose_to_matrix(out["odometry"].pose), C @ r.T_map_base, atol=1e-12)
    np.testing.assert_allclose(pose_to_matrix(out["path"].poses[-1]), C @ r.T_map_base, atol=1e-12)
    # no decision yet (mode none, no parent): the header frame is map
    out = dict(_assembler().messages(Processed(_frame()), TfDecision("none", "", "cam", "cam", "x"), "cam"))
    assert out["odometry"].header.frame_id == "world" and "tf" not in out


def test_map_mesh_and_occupancy_messages():
    from ros2_stream4d.ros.conversions import ns_to_time, pointcloud2_to_numpy

    a = _assembler(occupancy_floor_z=-0.25)
    stamp = ns_to_time(STAMP)
    xyz = np.array([[0.0, 1.0, 2.0]], np.float32)
    m = a.map_message(xyz, np.array([[1, 2, 3]], np.uint8), np.array([0.5], np.float32), stamp)
    assert m.header.frame_id == "world" and _stamp_ns(m) == STAMP
    back = pointcloud2_to_numpy(m)
    np.testing.assert_array_equal(back.xyz, xyz)
    np.testing.assert_array_equal(back.rgb, [[1, 2, 3]])
    np.testing.assert_array_equal(back.confidence, [0.5])

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], np.float32)
    f = np.array([[0, 1, 2], [3, 2, 1]], np.int32)
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [51, 102, 153]], np.uint8)
    (raw,) = a.mesh_messages(v, f, c, stamp)
    from rclpy.serialization import deserialize_message
    from visualization_msgs.msg import Marker

    mk = deserialize_message(raw, Marker)
    assert mk.header.frame_id == "world" and _stamp_ns(mk) == STAMP
    assert (mk.ns, mk.id, mk.type, mk.action) == ("stream4d_mesh", 0, mk.TRIANGLE_LIST, mk.ADD)
    assert mk.frame_locked is True
    assert (mk.pose.orientation.x, mk.pose.orientation.y, mk.pose.orientation.z, mk.pose.orientation.w) == \
        (0.0, 0.0, 0.0, 1.0)
    assert (mk.scale.x, mk.scale.y, mk.scale.z) == (1.0, 1.0, 1.0)
    assert (mk.color.r, mk.color.g, mk.color.b, mk.color.a) == (1.0, 1.0, 1.0, 1.0)
    assert [(p.x, p.y, p.z) for p in mk.points] == [tuple(map(float, v[i])) for i in (0, 1, 2, 3, 2, 1)]
    np.testing.assert_allclose([(q.r, q.g, q.b, q.a) for q in mk.colors][3], (0.2, 0.4, 0.6, 1.0), rtol=1e-6)
    np.testing.assert_allclose([(q.r, q.g, q.b, q.a) for q in mk.colors][0], (1.0, 0.0, 0.0, 1.0))

    data = np.array([[-1, 0, 100], [100, 100, 0]], np.int8)  # 2 rows (y), 3 columns (x)
    g = a.occupancy_message(data, np.array([1.5, -2.25]), 0.1, stamp)
    assert g.header.frame_id == "world" and _stamp_ns(g) == STAMP
    assert g.info.map_load_time == g.header.stamp
    assert (g.info.width, g.info.height) == (3, 2)
    assert g.info.resolution == pytest.approx(0.1)
    p, q = g.info.origin.position, g.info.origin.orientation
    assert (p.x, p.y, p.z) == (1.5, -2.25, -0.25)
    assert (q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 1.0)
    assert list(g.data) == [-1, 0, 100, 100, 100, 0]


def test_serialized_marker_equals_rclpy_serialisation_and_is_fast():
    """~/mesh is written straight from the arrays: what rclpy serialises for the same Marker, read back equal (any
    count, with or without colours), and a 100k-triangle mesh takes well under the seconds a Python object per
    vertex took."""
    import time

    from geometry_msgs.msg import Point
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker

    from ros2_stream4d.ros.conversions import make_header, ns_to_time, serialized_marker

    rng = np.random.default_rng(0)
    for n, with_colours in ((1, True), (5, True), (7, False)):
        m = Marker(ns="x", id=3, type=Marker.TRIANGLE_LIST, text="odd length", frame_locked=True)
        m.header = make_header(ns_to_time(STAMP), "map_frame_9")
        pts = rng.normal(size=(n, 3))
        cols = rng.random((n, 4)).astype(np.float32) if with_colours else np.zeros((0, 4), np.float32)
        ref = Marker()
        for name in ("header", "ns", "id", "type", "text", "frame_locked"):
            setattr(ref, name, getattr(m, name))
        ref.points = [Point(x=float(a), y=float(b), z=float(c)) for a, b, c in pts]
        ref.colors = [ColorRGBA(r=float(r), g=float(g), b=float(b), a=float(a)) for r, g, b, a in cols]
        raw = serialized_marker(m, pts, cols)
        assert len(raw) == len(serialize_message(ref))  # the same layout (padding bytes are not initialised)
        assert deserialize_message(raw, Marker) == ref
    with pytest.raises(ValueError, match="one per point"):
        serialized_marker(Marker(), np.zeros((3, 3)), np.zeros((2, 4)))
    big = rng.normal(size=(300_000, 3))
    t0 = time.perf_counter()
    raw = serialized_marker(Marker(), big, np.ones((300_000, 4), np.float32))
    elapsed = time.perf_counter() - t0
    assert len(raw) > 300_000 * (24 + 16)
    print(f"300k vertices serialised in {elapsed * 1e3:.1f} ms")  # reported, not asserted (timings live in benches)
