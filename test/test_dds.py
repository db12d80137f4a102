"""Messages cross between processes over real DDS (loopback only): a 1 MB Image, and a latched /tf_static."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ros_harness import MessageCollector, python_command, wait_until

PEER = os.path.join(os.path.dirname(__file__), "ros_peer.py")


@pytest.mark.ros
def test_another_domain_is_invisible_and_ours_is_seen(ros_node, ros_process, ros_domain_id):
    """Domain isolation as DDS does it: a publisher in another ROS_DOMAIN_ID is never discovered, the same one in
    ours is (so concurrent test processes with their own domains cannot cross-talk)."""
    import time

    from ros_harness import ros_environment

    topic = "/dds_isolation/image"
    other = ros_domain_id + 1 if ros_domain_id < 232 else ros_domain_id - 1
    stranger = ros_process(python_command(PEER, "image-publisher", topic, 8, 8), "other_domain",
                           env=ros_environment(other))
    seen: list[int] = []
    deadline = time.monotonic() + 3.0  # a bounded look: discovery on loopback takes well under a second

    def look() -> bool:
        seen.append(ros_node.count_publishers(topic))
        return time.monotonic() > deadline

    wait_until(look, 10, ros_node, "three seconds of discovery")
    assert max(seen) == 0, "a publisher from another domain was discovered"
    assert stranger.poll() is None, stranger.output()
    ros_process(python_command(PEER, "image-publisher", topic, 8, 8), "our_domain")
    wait_until(lambda: ros_node.count_publishers(topic) == 1, 20, ros_node, "the publisher in our domain")


@pytest.mark.ros
def test_one_megabyte_image_crosses_processes(ros_node, ros_process):
    from sensor_msgs.msg import Image

    from ros2_stream4d.ros.conversions import image_to_numpy

    width, height = 640, 546  # 1,048,320 bytes of rgb8
    publisher = ros_process(python_command(PEER, "image-publisher", "/dds_test/image", width, height), "image_pub")
    collector = MessageCollector(ros_node, Image, "/dds_test/image", 10)
    messages = collector.wait_for(3, timeout=20.0)
    assert publisher.poll() is None
    for msg in messages:
        assert (msg.width, msg.height, msg.encoding) == (width, height, "rgb8")
        index = int(msg.header.frame_id.removeprefix("frame_"))
        pixels = image_to_numpy(msg)
        assert pixels.nbytes > 1_000_000
        assert np.all(pixels == index % 251)


@pytest.mark.ros
def test_latched_tf_static_reaches_late_subscriber(ros_node, ros_process):
    from ros2_stream4d.ros.compat.tf_buffer import TfListener

    peer = ros_process(python_command(PEER, "tf-static"), "tf_static_pub")
    peer.wait_for_output("PUBLISHED", timeout=20.0)
    # Subscribe only after the one-off publication: only TRANSIENT_LOCAL durability can deliver it now.
    listener = TfListener(ros_node, dynamic=False)
    wait_until(lambda: listener.can_transform("base_link", "camera_optical_frame"), 20.0, ros_node,
               "latched /tf_static from the peer")
    base_from_optical = listener.lookup("base_link", "camera_optical_frame")
    np.testing.assert_allclose(base_from_optical[:3, 3], [0.10, 0.02, 0.30], atol=1e-12)
    assert listener.parent_of("camera_optical_frame") == "camera_link"
    assert listener.has_parent("camera_link") and not listener.has_parent("base_link")


def _stamped(parent, child, translation, yaw=0.0, stamp=0):
    from ros2_stream4d.ros.conversions import matrix_to_transform_stamped
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    matrix[:3, 3] = translation
    return matrix_to_transform_stamped(matrix, stamp, parent, child), matrix


def test_tf_buffer_chains_static_and_dynamic_edges_through_the_common_ancestor():
    pytest.importorskip("geometry_msgs", reason="the buffer stores geometry_msgs transforms")
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer, TransformNotFound

    buffer = TfBuffer()
    msg, map_odom = _stamped("map", "odom", [1, 0, 0], yaw=0.3)
    buffer.set_transform(msg)
    msg, odom_base = _stamped("odom", "base_link", [0, 2, 0], yaw=-0.7)
    buffer.set_transform(msg)
    msg, base_cam = _stamped("/base_link", "camera", [0.1, 0, 0.3], yaw=1.2)  # leading slash ignored, like tf2
    buffer.set_transform(msg, static=True)
    msg, base_lidar = _stamped("base_link", "lidar", [0, 0, 0.5], yaw=0.1)
    buffer.set_transform(msg, static=True)

    np.testing.assert_allclose(buffer.lookup("map", "camera"), map_odom @ odom_base @ base_cam, atol=1e-12)
    np.testing.assert_allclose(buffer.lookup("camera", "lidar"), np.linalg.inv(base_cam) @ base_lidar, atol=1e-12)
    np.testing.assert_allclose(buffer.lookup("lidar", "map"),
                               np.linalg.inv(map_odom @ odom_base @ base_lidar), atol=1e-12)
    assert buffer.has_parent("base_link") and buffer.parent_of("base_link") == "odom"
    assert not buffer.has_parent("map")

    msg, newer = _stamped("odom", "base_link", [5, 0, 0], stamp=10)  # latest value wins
    buffer.set_transform(msg)
    np.testing.assert_allclose(buffer.lookup("odom", "camera"), newer @ base_cam, atol=1e-12)

    with pytest.raises(TransformNotFound, match="no TF chain between 'camera' and 'elsewhere'"):
        buffer.lookup("camera", "elsewhere")
    buffer.clear()  # a time jump: dynamic edges go, static ones stay
    assert not buffer.has_parent("base_link") and buffer.can_transform("camera", "lidar")

    msg, _ = _stamped("camera", "odom", [0, 0, 0])
    buffer.set_transform(msg)
    msg, _ = _stamped("odom", "base_link", [0, 0, 0])
    buffer.set_transform(msg)  # base_link -> camera -> odom -> base_link: a cycle from bad publishers
    with pytest.raises(TransformNotFound, match="cycle"):
        buffer.lookup("map", "lidar")
    with pytest.raises(ValueError, match="invalid transform edge"):
        buffer.set_transform(_stamped("a", "a", [0, 0, 0])[0])
