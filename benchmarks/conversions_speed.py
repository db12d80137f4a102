"""Time the message conversions the node runs per frame (prints medians; no pass/fail).

    python benchmarks/conversions_speed.py [--points 300000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import PointCloud2

from ros2_stream4d.ros import conversions as cv


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.points
    xyz = rng.standard_normal((n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    conf = rng.random(n).astype(np.float32)
    cloud = cv.numpy_to_pointcloud2(xyz, rgb, conf, frame_id="map")
    wire = serialize_message(cloud)
    image = rng.integers(0, 256, (480, 640, 3)).astype(np.uint8)
    image_msg = cv.numpy_to_image(image, "bgr8")
    depth = rng.random((480, 640)).astype(np.float32)
    jpeg = cv.numpy_to_compressed(image, "jpeg")
    rows = [
        (f"PointCloud2 build, {n} pts xyz+rgb+conf ({len(cloud.data) / 1e6:.1f} MB)",
         lambda: cv.numpy_to_pointcloud2(xyz, rgb, conf, frame_id="map")),
        (f"PointCloud2 build, {n} pts xyz only", lambda: cv.numpy_to_pointcloud2(xyz)),
        ("PointCloud2 -> numpy", lambda: cv.pointcloud2_to_numpy(cloud)),
        ("PointCloud2 serialize (CDR)", lambda: serialize_message(cloud)),
        ("PointCloud2 deserialize (CDR)", lambda: deserialize_message(wire, PointCloud2)),
        ("Image 640x480 bgr8 -> RGB array", lambda: cv.image_to_rgb(image_msg)),
        ("depth 640x480 32FC1 -> Image", lambda: cv.numpy_to_image(depth, "32FC1")),
        ("CompressedImage 640x480 jpeg -> RGB", lambda: cv.compressed_to_rgb(jpeg)),
    ]
    print(f"{'conversion':60s} median ms ({args.repeat} runs)")
    for name, fn in rows:
        print(f"{name:60s} {median_ms(fn, args.repeat):8.2f}")


if __name__ == "__main__":
    main()
