"""The other side of cross-process DDS tests; run as a child by the tests (python test/ros_peer.py COMMAND).

  image-publisher TOPIC WIDTH HEIGHT   publish rgb8 Images (reliable) at 20 Hz; frame i is filled with i % 251 and
                                       carries frame_id "frame_<i>"; waits for a subscriber first
  tf-static                            latch two static transforms on /tf_static, print PUBLISHED, keep serving
Runs until SIGINT.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException

from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, numpy_to_image
from ros2_stream4d.ros.compat.tf_buffer import tf_static_qos

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
