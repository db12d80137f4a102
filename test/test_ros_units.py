"""ROS-free pieces the node relies on: camera grouping by stamp, odometry twist and covariance, the TF tree check,
topic resolution."""

import numpy as np
import pytest

from ros2_stream4d import topics
from ros2_stream4d.mapping.frame_sync import ApproximateSync
from ros2_stream4d.mapping.motion import MotionEstimator, confidence_factor


def test_two_cameras_are_grouped_by_stamp_within_the_slop():
    sync = ApproximateSync(2, slop_s=0.010)
    ms = 1_000_000
    assert sync.add(0, 100 * ms, "a100") is None
    assert sync.add(0, 133 * ms, "a133") is None
    assert sync.add(1, 131 * ms, "b131") == ["a133", "b131"], "the closest frame of each camera, camera order"
    assert sync.dropped == 1  # a100 never found a partner
    assert sync.add(1, 150 * ms, "b150") is None
    assert sync.add(0, 175 * ms, "a175") is None  # 25 ms from b150: over the slop
    assert sync.add(1, 170 * ms, "b170") == ["a175", "b170"]


def test_one_camera_passes_every_frame_through():
    sync = ApproximateSync(1, slop_s=0.0)
    assert [sync.add(0, i, i) for i in range(3)] == [[0], [1], [2]]


def test_twist_is_in_the_child_frame_and_covariance_follows_scale_and_confidence():
    est = MotionEstimator(pose_sigma_per_m=0.02, rotation_sigma=0.01, unscaled_sigma_factor=1000.0)
    T0 = np.eye(4)
    first = est.update(T0, 0, median_depth=2.0, median_confidence=5.0, scale_valid=True)
    assert np.all(first.linear == 0) and first.twist_covariance[0, 0] >= 1e6, "no velocity at a stream's start"
    yaw = np.deg2rad(90)
    T1 = np.eye(4)
    T1[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
    T1[:3, 3] = [1.0, 0.0, 0.0]  # moved 1 m along the old x while turning 90 deg, in 0.5 s
    m = est.update(T1, 500_000_000, median_depth=2.0, median_confidence=5.0, scale_valid=True)
    np.testing.assert_allclose(m.linear, [0.0, -2.0, 0.0], atol=1e-9)  # old x is the new -y
    np.testing.assert_allclose(m.angular, [0.0, 0.0, np.pi], atol=1e-9)
    sigma = 0.02 * 2.0 * confidence_factor(5.0)
    assert m.pose_covariance[0, 0] == pytest.approx(sigma ** 2)
    assert m.twist_covariance[0, 0] == pytest.approx(2 * sigma ** 2 / 0.25)
    unscaled = est.update(T1, 600_000_000, median_depth=2.0, median_confidence=5.0, scale_valid=False)
    assert unscaled.pose_covariance[0, 0] == pytest.approx((sigma * 1000.0) ** 2)
    unsure = est.update(T1, 700_000_000, median_depth=2.0, median_confidence=1.01, scale_valid=True)
    assert unsure.pose_covariance[5, 5] > 50 * m.pose_covariance[5, 5]


def test_topic_resolution_follows_namespace_and_remaps():
    assert topics.resolve("image", "/robot1") == "/robot1/image"
    assert topics.resolve("~/cloud", "/robot1") == "/robot1/stream4d/cloud"
    assert topics.resolve("image", "/", remaps={"image": "/cam/color/image_raw"}) == "/cam/color/image_raw"
    assert topics.resolve("image", "/r", remaps={"/r/image": "/x"}) == "/x"
    assert topics.camera_input("image", 1, 2) == "cam1/image" and topics.camera_input("image", 0, 1) == "image"


def test_tf_tree_check_finds_second_parents_and_cycles():
    from ros2_stream4d.ros.tf_policy import check_one_parent

    assert check_one_parent([("map", "odom"), ("odom", "base_link"), ("base_link", "camera_link")]) == []
    problems = check_one_parent([("camera_link", "cam_optical"), ("map", "cam_optical")])
    assert problems and "2 parents" in problems[0]
    assert any("cycle" in p for p in check_one_parent([("a", "b"), ("b", "a")]))
