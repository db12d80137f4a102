"""The other side of cross-process DDS tests; run as a child by the tests (python test/ros_peer.py COMMAND).

  image-publisher TOPIC WIDTH HEIGHT   publish rgb8 Images (reliable) at 20 Hz; frame i is filled with i % 251 and
                                       carries frame_id "frame_<i>"; waits for a subscriber first
  tf-static                            latch two static transforms on /tf_static, print PUBLISHED, keep serving
  camera PREFIX FRAME HZ               a camera driver: rgb8 Images on PREFIX/image_raw and CameraInfo on
                                       PREFIX/camera_info (reliable), stamped with the wall clock at HZ, frame_id
                                       FRAME; waits for a subscriber first
Runs until SIGINT.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException

from ros2_stream4d.ros.compat.tf_buffer import tf_static_qos
from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, numpy_to_image

STATIC_TRANSFORMS = {  # (parent, child): translation, the same values the tests expect
    ("base_link", "camera_link"): (0.10, 0.0, 0.30),
    ("camera_link", "camera_optical_frame"): (0.0, 0.02, 0.0),
}


def image_publisher(node, topic: str, width: int, height: int) -> None:
    from sensor_msgs.msg import Image
    publisher = node.create_publisher(Image, topic, 10)
    while rclpy.ok() and publisher.get_subscription_count() == 0:
        rclpy.spin_once(node, timeout_sec=0.05)
    index = 0
    while rclpy.ok():
        pixels = np.full((height, width, 3), index % 251, np.uint8)
        publisher.publish(numpy_to_image(pixels, "rgb8", stamp=node.get_clock().now(), frame_id=f"frame_{index}"))
        index += 1
        rclpy.spin_once(node, timeout_sec=0.05)


def camera(node, prefix: str, frame: str, hz: float) -> None:
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from ros2_stream4d.ros.conversions import make_camera_info

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    images = node.create_publisher(Image, f"{prefix}/image_raw", qos)
    infos = node.create_publisher(CameraInfo, f"{prefix}/camera_info", qos)
    while rclpy.ok() and images.get_subscription_count() == 0:
        rclpy.spin_once(node, timeout_sec=0.05)
    w, h = 112, 84
    K = np.array([[100.0, 0, w / 2 - 0.5], [0, 100.0, h / 2 - 0.5], [0, 0, 1]])
    index, period = 0, 1.0 / hz
    # publish on the wall clock's period boundaries, so two such cameras take frames at nearly the same instants
    # (like hardware-triggered cameras): their stamps differ by the processes' jitter, not by a random phase
    next_t = time.monotonic() + (-time.time()) % period
    while rclpy.ok():
        rclpy.spin_once(node, timeout_sec=max(0.0, next_t - time.monotonic()))
        stamp = node.get_clock().now()
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 2 + index * 7) % 256, (yy * 3) % 256, (xx + yy + index) % 256], -1).astype(np.uint8)
        infos.publish(make_camera_info(K, w, h, stamp=stamp, frame_id=frame))
        images.publish(numpy_to_image(rgb, "rgb8", stamp=stamp, frame_id=frame))
        index += 1
        next_t += period


def tf_static(node) -> None:
    from tf2_msgs.msg import TFMessage
    publisher = node.create_publisher(TFMessage, "/tf_static", tf_static_qos())
    transforms = []
    for (parent, child), translation in STATIC_TRANSFORMS.items():
        matrix = np.eye(4)
        matrix[:3, 3] = translation
        transforms.append(matrix_to_transform_stamped(matrix, node.get_clock().now(), parent, child))
    publisher.publish(TFMessage(transforms=transforms))
    print("PUBLISHED", flush=True)
    while rclpy.ok():
        rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    rclpy.init()
    node = rclpy.create_node("ros_peer")
    try:
        if argv[0] == "image-publisher":
            image_publisher(node, argv[1], int(argv[2]), int(argv[3]))
        elif argv[0] == "tf-static":
            tf_static(node)
        elif argv[0] == "camera":
            camera(node, argv[1], argv[2], float(argv[3]))
        else:
            raise SystemExit(f"unknown command {argv[0]!r}")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
