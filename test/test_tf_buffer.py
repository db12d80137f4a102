"""TfBuffer lookups at a stamp: dynamic edges interpolate between samples, static ones do not move."""

import numpy as np
import pytest

pytest.importorskip("geometry_msgs")

from ros2_stream4d.ros.compat.tf_buffer import TfBuffer  # noqa: E402
from ros2_stream4d.ros.conversions import matrix_to_transform_stamped, ns_to_time  # noqa: E402
from ros2_stream4d.ros.tf_policy import TransformNotFound  # noqa: E402


def _yaw(deg: float, x: float) -> np.ndarray:
    a = np.deg2rad(deg)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    T[0, 3] = x
    return T


def test_lookup_at_stamp_interpolates_dynamic_edges():
    buf = TfBuffer()
    buf.set_transform(matrix_to_transform_stamped(_yaw(0, 0.1), ns_to_time(0), "base_link", "camera"), static=True)
    for i, (deg, x) in enumerate([(0, 0.0), (10, 1.0), (20, 2.0)]):
        buf.set_transform(matrix_to_transform_stamped(_yaw(deg, x), ns_to_time(i * 100), "odom", "base_link"))
    np.testing.assert_allclose(buf.lookup("odom", "base_link", 150), _yaw(15, 1.5), atol=1e-9)
    np.testing.assert_allclose(buf.lookup("odom", "base_link", 100), _yaw(10, 1.0), atol=1e-9)
    np.testing.assert_allclose(buf.lookup("odom", "base_link"), _yaw(20, 2.0), atol=1e-9)  # latest
    with pytest.raises(TransformNotFound, match="outside its history"):  # refused, as tf2 refuses to extrapolate
        buf.lookup("odom", "base_link", 10_000)
    with pytest.raises(TransformNotFound, match="outside its history"):
        buf.lookup("odom", "camera", -1)
    np.testing.assert_allclose(buf.lookup("base_link", "camera", 10_000), _yaw(0, 0.1), atol=1e-9), \
        "edges above the common ancestor are not evaluated"
    np.testing.assert_allclose(buf.lookup("odom", "camera", 50), _yaw(5, 0.5) @ _yaw(0, 0.1), atol=1e-9)
    assert buf.wait_for_stamp("odom", "camera", 200, timeout_s=0.0)
    assert not buf.wait_for_stamp("odom", "camera", 201, timeout_s=0.01)


def test_time_going_back_drops_the_old_history():
    buf = TfBuffer()
    buf.set_transform(matrix_to_transform_stamped(_yaw(0, 5.0), ns_to_time(1000), "odom", "base_link"))
    buf.set_transform(matrix_to_transform_stamped(_yaw(0, 0.0), ns_to_time(0), "odom", "base_link"))
    buf.set_transform(matrix_to_transform_stamped(_yaw(0, 1.0), ns_to_time(100), "odom", "base_link"))
    np.testing.assert_allclose(buf.lookup("odom", "base_link", 50)[0, 3], 0.5)
