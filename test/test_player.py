"""`stream4d play`: a bag written here is replayed in another process; a use_sim_time node follows its clock."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("rosbags", reason="bags are written and read with rosbags")

from ros_harness import MessageCollector, python_command, wait_until  # noqa: E402

pytestmark = pytest.mark.ros
T0 = 1_700_000_000 * 10**9
FRAMES = 10
PERIOD_NS = 50_000_000  # 20 Hz: the bag lasts 0.45 s


def write_bag(path, storage="mcap"):
    """Image, CameraInfo and /tf at 20 Hz, and one latched /tf_static, as `ros2 bag record` stores them."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    t = ts.types
    Header, Time = t["std_msgs/msg/Header"], t["builtin_interfaces/msg/Time"]

    def header(ns):
        return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera_optical_frame")

    def tf_message(ns, parent, child, x):
        transform = t["geometry_msgs/msg/Transform"](
            translation=t["geometry_msgs/msg/Vector3"](x=x, y=0.0, z=0.0),
            rotation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
        stamped = t["geometry_msgs/msg/TransformStamped"](
            header=Header(stamp=header(ns).stamp, frame_id=parent), child_frame_id=child, transform=transform)
        return t["tf2_msgs/msg/TFMessage"](transforms=[stamped])

    forever = QosTime(sec=2147483647, nsec=4294967295)
    latched = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                  durability=QosDurability.TRANSIENT_LOCAL, deadline=forever, lifespan=forever,
                  liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=forever,
                  avoid_ros_namespace_conventions=False)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        image_c = writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        info_c = writer.add_connection("/camera/camera_info", "sensor_msgs/msg/CameraInfo", typestore=ts)
        tf_c = writer.add_connection("/tf", "tf2_msgs/msg/TFMessage", typestore=ts)
        static_c = writer.add_connection("/tf_static", "tf2_msgs/msg/TFMessage", typestore=ts,
                                         offered_qos_profiles=[latched])

        def write(connection, ns, msg):
            writer.write(connection, ns, ts.serialize_cdr(msg, connection.msgtype))

        write(static_c, T0, tf_message(T0, "base_link", "camera_optical_frame", 0.1))
        for i in range(FRAMES):
            ns = T0 + i * PERIOD_NS
            write(image_c, ns, t["sensor_msgs/msg/Image"](
                header=header(ns), height=4, width=6, encoding="rgb8", is_bigendian=0, step=18,
                data=np.full(72, i, np.uint8)))
            write(info_c, ns, t["sensor_msgs/msg/CameraInfo"](
                header=header(ns), height=4, width=6, distortion_model="plumb_bob", d=np.zeros(5),
                k=np.array([5.0, 0, 3, 0, 5.0, 2, 0, 0, 1]), r=np.eye(3).reshape(-1),
                p=np.array([5.0, 0, 3, 0, 0, 5.0, 2, 0, 0, 0, 1, 0]), binning_x=0, binning_y=0,
                roi=t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                          do_rectify=False)))
            write(tf_c, ns, tf_message(ns, "odom", "base_link", 0.01 * i))
    return path


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_replayed_in_another_process_drives_a_sim_time_node(ros_node, ros_process, tmp_path, storage):
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    from ros2_stream4d.ros.compat.tf_buffer import TfListener, tf_static_qos
    from ros2_stream4d.ros.conversions import image_to_numpy, time_to_ns

    bag = write_bag(tmp_path / "bag", storage)
    ros_node.set_parameters([Parameter("use_sim_time", value=True)])
    images = MessageCollector(ros_node, Image, "/camera/image_raw", 100, with_clock=True)
    infos = MessageCollector(ros_node, CameraInfo, "/camera/camera_info", 100)
    tfs = MessageCollector(ros_node, TFMessage, "/tf", 100)
    statics = MessageCollector(ros_node, TFMessage, "/tf_static", tf_static_qos())
    listener = TfListener(ros_node)

    player = ros_process(python_command("-m", "ros2_stream4d.cli", "play", bag, "--quiet", "--wait-for-subscribers",
                                        "/camera/image_raw", "/camera/camera_info", "/tf", "/clock"), "player")
    wait_until(lambda: player.poll() is not None and len(images.messages) >= FRAMES and len(tfs.messages) >= FRAMES
               and len(infos.messages) >= FRAMES and statics.messages, 30.0, ros_node, "the whole bag")
    assert player.poll() == 0, player.output()
    assert "published 31 messages" in player.output()
    assert (len(images.messages), len(infos.messages), len(tfs.messages), len(statics.messages)) == \
        (FRAMES, FRAMES, FRAMES, 1)

    stamps = [time_to_ns(m.header.stamp) for m in images.messages]
    assert stamps == [T0 + i * PERIOD_NS for i in range(FRAMES)]
    assert [int(image_to_numpy(m)[0, 0, 0]) for m in images.messages] == list(range(FRAMES))
    # The node clock is bag time, not wall time: it reads 0 until the first /clock message is taken (DDS may deliver
    # that after the first images), then bag times that never go backwards and never pass the bag's last stamp, and
    # it ends exactly on the last stamp. How far it lags an image depends on scheduling, so no bound is put on that.
    ticking = [arrival for arrival in images.arrival_ns if arrival != 0]
    assert ticking == sorted(ticking)
    assert all(T0 <= arrival <= stamps[-1] for arrival in ticking)
    assert ros_node.get_clock().now().nanoseconds == T0 + (FRAMES - 1) * PERIOD_NS
    np.testing.assert_allclose(listener.lookup("odom", "camera_optical_frame")[:3, 3], [0.1 + 0.09, 0, 0])


def test_loop_replays_from_the_start_and_rate_is_validated(ros_node, tmp_path):
    """In-process API: a looping playback stopped by should_stop; the subscriber is spun in a thread."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    from ros2_stream4d.ros.compat.player import play_bag

    bag = write_bag(tmp_path / "bag")
    context = rclpy.Context()
    rclpy.init(context=context)
    listener_node = rclpy.create_node("loop_listener", context=context)
    images = MessageCollector(listener_node, Image, "/camera/image_raw", 100)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        stats = play_bag(bag, rate=4.0, loop=True, clock=False, topics=["/camera/image_raw", "/not/there"],
                         node=ros_node, wait_for_matching=["/camera/image_raw"], timeout=20.0,
                         should_stop=lambda: len(images.messages) >= FRAMES + 3)
        wait_until(lambda: len(images.messages) >= FRAMES + 3, 10.0, None, "images of the second pass")
    finally:
        executor.shutdown()
        spinner.join(5)
        listener_node.destroy_node()
        context.try_shutdown()
    assert stats.loops >= 1 and stats.skipped_topics == {"/not/there": "not in the bag"}
    firsts = [int(bytes(m.data)[0]) for m in images.messages[FRAMES:FRAMES + 3]]
    assert firsts == [0, 1, 2]  # the second pass starts from the bag's first frame
    with pytest.raises(ValueError, match="rate must be > 0"):
        play_bag(bag, rate=0, node=ros_node)


def test_bad_bags_and_unmatched_waits_fail_clearly(ros_node, tmp_path):
    from ros2_stream4d.ros.compat.player import BagPlayError, play_bag

    with pytest.raises(BagPlayError, match="does not exist"):
        play_bag(tmp_path / "missing", node=ros_node)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagPlayError, match="cannot open bag"):
        play_bag(tmp_path / "empty", node=ros_node)
    bag = write_bag(tmp_path / "bag")
    with pytest.raises(BagPlayError, match="nothing to play"):
        play_bag(bag, topics=["/nope"], node=ros_node)
    with pytest.raises(TimeoutError, match="no subscriber on /tf"):
        play_bag(bag, wait_for_matching=["/tf"], timeout=0.3, node=ros_node)


def test_cli_reports_errors_without_a_traceback(tmp_path, ros_process):
    process = ros_process(python_command("-m", "ros2_stream4d.cli", "play", tmp_path / "missing"), "play_missing")
    assert process.wait(30) == 1
    assert "stream4d play: bag" in process.output() and "does not exist" in process.output()
    assert "Traceback" not in process.output()
