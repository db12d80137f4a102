"""stream4d_node in its own process over real DDS (loopback only): inputs, outputs, services, TF tree.

These use the random-weight small model: the outputs are meaningless geometry, but every message must be
well-formed, finite, stamped with its input's stamp, and the TF tree must follow REP-105. Geometry against ground
truth is tested with the oracle model in test_node_oracle.py.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from ros_harness import MessageCollector, python_command, wait_for_subscribers, wait_until

from ros2_stream4d.ros.conversions import time_to_ns

pytestmark = pytest.mark.ros

W, H = 112, 84


def node_command(*params: str) -> list[str]:
    args = []
    for p in ("model:=random-small", "input_width:=112", "window:=4", "process_every_frame:=true",
              "path_publish_rate:=0.0",  # the path with every frame: these tests count it per frame
              "map_publish_rate:=5.0", "diagnostics_rate:=5.0", *params):
        args += ["-p", p]
    return python_command("-m", "ros2_stream4d.ros.node", "--ros-args", *args, *REMAPS)


REMAPS = ("-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info", "-r", "depth/image:=/camera/depth")


def make_image(i: int, stamp_ns: int, frame_id: str = "camera_optical_frame"):
    from ros2_stream4d.ros.conversions import ns_to_time, numpy_to_image

    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 2 + i * 7) % 256, (yy * 3) % 256, ((xx + yy) * 5 + i) % 256], axis=-1).astype(np.uint8)
    return numpy_to_image(rgb, "rgb8", stamp=ns_to_time(stamp_ns), frame_id=frame_id)


def make_info(stamp_ns: int):
    from ros2_stream4d.ros.conversions import make_camera_info, ns_to_time

    K = np.array([[100.0, 0, W / 2 - 0.5], [0, 100.0, H / 2 - 0.5], [0, 0, 1]])
    return make_camera_info(K, W, H, stamp=ns_to_time(stamp_ns), frame_id="camera_optical_frame")


def start_node(ros_process, *params):
    node = ros_process(node_command(*params), name="stream4d_node")
    node.wait_for_output("model ready", timeout=60)
    return node


def publisher_pair(ros_node):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    # reliable publishers serve best-effort and reliable subscriptions alike
    image_pub = ros_node.create_publisher(Image, "/camera/image_raw",
                                          QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    info_pub = ros_node.create_publisher(CameraInfo, "/camera/camera_info",
                                         QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    wait_for_subscribers(ros_node, image_pub, timeout=20)
    wait_for_subscribers(ros_node, info_pub, timeout=20)
    return image_pub, info_pub


def deliver(ros_node, image_pub, image, collector, count, info_pub=None, timeout=90.0):
    """Publish `image` until `collector` holds `count` messages. Best-effort input can be lost while the node's
    side of discovery is still completing; resending the same stamp is harmless (the node drops duplicates)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if info_pub is not None:
            info_pub.publish(make_info(time_to_ns(image.header.stamp)))
        image_pub.publish(image)
        try:
            return collector.wait_for(count, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def test_random_model_end_to_end_outputs_are_well_formed(ros_node, ros_process, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Odometry, Path
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_srvs.srv import Trigger
    from tf2_msgs.msg import TFMessage

    from ros2_stream4d.ros.conversions import image_to_numpy, pointcloud2_to_numpy

    map_path = tmp_path / "map.ply"
    start_node(ros_process, f"map_save_path:={map_path}")
    depth = MessageCollector(ros_node, Image, "/stream4d/depth_relative/image")
    depth_info = MessageCollector(ros_node, CameraInfo, "/stream4d/depth_relative/camera_info")
    cloud = MessageCollector(ros_node, PointCloud2, "/stream4d/cloud")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    odom = MessageCollector(ros_node, Odometry, "/stream4d/odometry")
    path = MessageCollector(ros_node, Path, "/stream4d/path")
    tf = MessageCollector(ros_node, TFMessage, "/tf", qos=QoSProfile(depth=100))
    diag = MessageCollector(ros_node, DiagnosticArray, "/diagnostics")
    image_pub, info_pub = publisher_pair(ros_node)
    wait_until(lambda: depth.subscription.get_publisher_count() > 0 and tf.subscription.get_publisher_count() > 0,
               20, ros_node, "node outputs")

    stamps = [1_000_000_000 + i * 100_000_000 for i in range(5)]
    for i, stamp in enumerate(stamps):
        deliver(ros_node, image_pub, make_image(i, stamp), pose, i + 1, info_pub=info_pub)
    depth.wait_for(5, timeout=30)
    depth_info.wait_for(5, timeout=30)
    cloud.wait_for(5, timeout=30)
    odom.wait_for(5, timeout=30)
    path.wait_for(5, timeout=30)

    assert [time_to_ns(m.header.stamp) for m in pose.messages] == stamps
    for d, info in zip(depth.messages, depth_info.messages):
        assert d.header == info.header, "REP-118: depth and its CameraInfo share one header"
        assert (d.width, d.height, d.encoding) == (W, H, "32FC1")
        assert (info.width, info.height) == (W, H)
        arr = image_to_numpy(d)
        assert np.isfinite(arr).any() and (arr[np.isfinite(arr)] > 0).all()
        assert d.header.frame_id == "camera_optical_frame"
    for c in cloud.messages:
        assert c.header.frame_id == "map"
        xyz, rgb, conf = pointcloud2_to_numpy(c)
        assert len(xyz) > 0 and np.isfinite(xyz).all() and conf is not None
        assert [f.name for f in c.fields][:4] == ["x", "y", "z", "rgb"]
    for o in odom.messages:
        q = o.pose.pose.orientation
        assert math.isclose(q.x**2 + q.y**2 + q.z**2 + q.w**2, 1.0, rel_tol=1e-6)
        assert (o.header.frame_id, o.child_frame_id) == ("map", "camera_optical_frame")
    assert len(path.messages[-1].poses) == 5
    wait_until(lambda: any(t.transforms for t in tf.messages), 10, ros_node, "TF")
    edges = {(t.header.frame_id, t.child_frame_id) for m in tf.messages for t in m.transforms}
    assert edges == {("map", "camera_optical_frame")}

    latched = MessageCollector(ros_node, PointCloud2, "/stream4d/map",
                               qos=QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                              durability=DurabilityPolicy.TRANSIENT_LOCAL))
    latched.wait_for(1, timeout=20)
    assert latched.messages[0].width > 0
    map_info = ros_node.get_publishers_info_by_topic("/stream4d/map")
    assert map_info and map_info[0].qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
    assert map_info[0].qos_profile.reliability == ReliabilityPolicy.RELIABLE
    image_subs = ros_node.get_subscriptions_info_by_topic("/camera/image_raw")
    assert any(i.node_name == "stream4d" and i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
               for i in image_subs), "live camera input uses SensorDataQoS"

    def latest_diagnostics():
        values = {}
        for m in diag.messages:
            for s in m.status:
                values.update({kv.key: kv.value for kv in s.values})
        return values

    wait_until(lambda: int(latest_diagnostics().get("frames processed", 0)) >= 5, 10, ros_node, "diagnostics")
    assert int(latest_diagnostics()["cache frames held"]) == 5  # anchor + window 4

    save = ros_node.create_client(Trigger, "/stream4d/save_map")
    assert save.wait_for_service(timeout_sec=20)
    future = save.call_async(Trigger.Request())
    wait_until(future.done, 20, ros_node, "save_map")
    assert future.result().success, future.result().message
    import open3d as o3d

    assert len(o3d.io.read_point_cloud(str(map_path)).points) > 0

    # the confidence image and its CameraInfo, beside each other
    conf_img = MessageCollector(ros_node, Image, "/stream4d/confidence/image")
    conf_info = MessageCollector(ros_node, CameraInfo, "/stream4d/confidence/camera_info")
    wait_until(lambda: conf_img.subscription.get_publisher_count() > 0, 20, ros_node, "confidence publisher")
    # ~/reset: a new stream and map; the next frame starts a new path and a new cache
    reset = ros_node.create_client(Trigger, "/stream4d/reset")
    assert reset.wait_for_service(timeout_sec=20)
    future = reset.call_async(Trigger.Request())
    wait_until(future.done, 20, ros_node, "reset")
    assert future.result().success
    deliver(ros_node, image_pub, make_image(7, stamps[-1] + 100_000_000), pose, 6, info_pub=info_pub)
    path.wait_for(6, timeout=30)
    assert len(path.messages[-1].poses) == 1, "after ~/reset the path starts again"
    (c_img,), (c_info,) = conf_img.wait_for(1, timeout=30), conf_info.wait_for(1, timeout=30)
    assert c_img.header == c_info.header and c_img.encoding == "32FC1" and (c_info.width, c_info.height) == (W, H)
    wait_until(lambda: latest_diagnostics().get("resets") == "1", 10, ros_node, "the reset in diagnostics")

    # no image for no_image_warn_s (2 s): diagnostics warn, naming the input
    def warned():
        return any(s.level == DiagnosticStatus.WARN and "no image" in s.message and "/camera/image_raw" in s.message
                   for m in diag.messages[-3:] for s in m.status)

    wait_until(warned, 20, ros_node, "the no-image warning")


def test_a_slow_model_drops_old_frames_unless_every_frame_is_wanted(ros_node, ros_process):
    """Live mode (process_every_frame false): a one-slot queue keeps the latest frame, older ones are dropped and
    counted; every output still belongs to a frame that was sent."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped

    start_node(ros_process, "process_every_frame:=false", "input_qos:=reliable", "input_width:=224")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    diag = MessageCollector(ros_node, DiagnosticArray, "/diagnostics")
    image_pub, info_pub = publisher_pair(ros_node)
    wait_until(lambda: pose.subscription.get_publisher_count() > 0, 20, ros_node, "node outputs")
    stamps = [1_000_000_000 + i * 10_000_000 for i in range(40)]
    for i, stamp in enumerate(stamps):  # far faster than the model
        image_pub.publish(make_image(i, stamp))
    wait_until(lambda: any(kv.key == "frames dropped" and int(kv.value) > 0 for m in diag.messages
                           for s in m.status for kv in s.values), 60, ros_node, "dropped frames in diagnostics")
    wait_until(lambda: pose.messages and time_to_ns(pose.messages[-1].header.stamp) == stamps[-1], 60, ros_node,
               "the latest frame to be processed")
    got = [time_to_ns(m.header.stamp) for m in pose.messages]
    assert set(got) <= set(stamps) and len(got) < len(stamps) and got == sorted(got)


def test_robot_setup_publishes_map_to_odom_with_one_parent_per_frame(ros_node, ros_process):
    from nav_msgs.msg import Odometry
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    from ros2_stream4d.mapping.conventions import T_BODY_OPTICAL
    from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, ns_to_time

    start_node(ros_process, "base_frame:=base_link")
    static_pub = ros_node.create_publisher(
        TFMessage, "/tf_static",
        QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    tf_pub = ros_node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100))
    T_base_link = np.eye(4)
    T_base_link[:3, 3] = [0.1, 0.0, 0.3]
    static_pub.publish(TFMessage(transforms=[
        matrix_to_transform_stamped(T_base_link, ns_to_time(0), "base_link", "camera_link"),
        matrix_to_transform_stamped(T_BODY_OPTICAL, ns_to_time(0), "camera_link", "camera_optical_frame"),
    ]))
    tf = MessageCollector(ros_node, TFMessage, "/tf", qos=QoSProfile(depth=100))
    odom_out = MessageCollector(ros_node, Odometry, "/stream4d/odometry")
    image_pub, info_pub = publisher_pair(ros_node)
    wait_for_subscribers(ros_node, tf_pub, timeout=20)

    stamps = [3_000_000_000 + i * 100_000_000 for i in range(3)]
    published = []
    for i, stamp in enumerate(stamps):
        odom = np.eye(4)
        odom[0, 3] = 0.05 * i
        tf_pub.publish(TFMessage(transforms=[matrix_to_transform_stamped(odom, ns_to_time(stamp), "odom",
                                                                         "base_link")]))
        # the odometry edge must be known before the image is processed
        wait_until(lambda: any(t.child_frame_id == "base_link" and t.header.frame_id == "odom"
                               for m in tf.messages for t in m.transforms), 10, ros_node, "odom edge echo")
        deliver(ros_node, image_pub, make_image(i, stamp), odom_out, i + 1)
        published.append(stamp)

    parents: dict[str, set[str]] = {}
    for m in tf.messages:
        for t in m.transforms:
            parents.setdefault(t.child_frame_id, set()).add(t.header.frame_id)
    assert parents["odom"] == {"map"}
    assert parents["base_link"] == {"odom"}, "the node must not publish odom->base_link when another node does"
    assert all(len(p) == 1 for p in parents.values()), parents


def test_time_jump_backwards_resets_the_stream(ros_node, ros_process):
    from nav_msgs.msg import Path

    node = start_node(ros_process)
    path = MessageCollector(ros_node, Path, "/stream4d/path")
    image_pub, info_pub = publisher_pair(ros_node)
    for i, stamp in enumerate([5_000_000_000, 5_100_000_000, 5_200_000_000, 1_000_000_000]):
        deliver(ros_node, image_pub, make_image(i, stamp), path, i + 1)
    assert len(path.messages[2].poses) == 3
    assert len(path.messages[3].poses) == 1, "a bag looping back must start a new stream"
    assert "time jumped back" in node.output()


def test_missing_checkpoint_fails_at_startup_with_a_clear_error(ros_process, tmp_path):
    missing = pathlib.Path(tmp_path) / "nope.safetensors"
    node = ros_process(python_command("-m", "ros2_stream4d.ros.node", "--ros-args", "-p", f"model:={missing}"),
                       name="stream4d_bad")
    assert node.wait(60) == 1
    out = node.output()
    assert "start-up failed" in out and "nope.safetensors" in out
