"""ROS 2 messages <-> numpy for rclpy: the codec (ros2_stream4d/codec.py) with a factory of rclpy messages.

The readers are the codec's own (they read rclpy and rosbags messages alike); the writers here are the codec's
writers bound to ``RCLPY``, a factory that builds rclpy message objects, under the names ros/ has always used.
Errors: ``ImageConversionError`` (its ``reason`` names the fault), ``CloudConversionError``,
``TransformConversionError``, all ValueErrors.
"""

from __future__ import annotations

import array
import importlib
from functools import cache
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header

from ros2_stream4d import codec
from ros2_stream4d.codec import (
    ENCODINGS,
    MAX_IMAGE_SIDE,
    CloudArrays,
    CloudConversionError,
    ImageConversionError,
    TransformConversionError,
    array_to_rgb,
    camera_info_to_k,
    compressed_to_numpy,
    compressed_to_rgb,
    image_to_numpy,
    image_to_rgb,
    matrix_to_quaternion,
    pack_rgb,
    pointcloud2_to_arrays,
    pointcloud2_to_numpy,
    pointcloud2_to_structured,
    pose_to_matrix,
    quaternion_to_matrix,
    time_to_ns,
    to_rgb,
    transform_to_matrix,
    unpack_rgb,
)

__all__ = [
    "ENCODINGS", "MAX_IMAGE_SIDE", "RCLPY", "message_class", "CloudArrays", "CloudConversionError", "ImageConversionError",
    "TransformConversionError", "array_to_rgb", "as_time_msg", "camera_info_to_k", "compressed_to_numpy",
    "compressed_to_rgb", "image_to_numpy", "image_to_rgb", "make_camera_info", "make_header",
    "matrix_to_odometry", "matrix_to_pose_stamped", "matrix_to_quaternion", "matrix_to_transform_stamped",
    "ns_to_time", "numpy_to_compressed", "numpy_to_image", "numpy_to_pointcloud2", "pack_rgb",
    "pointcloud2_to_arrays", "pointcloud2_to_numpy", "pointcloud2_to_structured", "pose_to_matrix",
    "quaternion_to_matrix", "scaled_camera_info", "time_to_ns", "to_rgb", "transform_to_matrix", "unpack_rgb",
]


# ------------------------------------------------------------------------------------------------ the factory

@cache
def message_class(msgtype: str) -> type:
    """'sensor_msgs/msg/Image' -> the rclpy message class (ImportError / AttributeError when not installed,
    ValueError for a name that is not pkg/kind/Name)."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def _store_array(msg: Any, name: str, value: np.ndarray) -> None:
    """Put a numpy array into an rclpy array field.

    Sequences (array.array) get one copy into an array.array of the field's type code, stored into the field's
    slot: the generated setter would copy it a second time, element by element (4 ms for a 6 MB cloud), unless
    field checks are on; storing into the slot is what the checked path does itself. Fixed-size fields are numpy
    arrays in rclpy and go through the setter (it checks the size).
    """
    slot = "_" + name
    current = getattr(msg, slot)
    if isinstance(current, array.array):
        out = array.array(current.typecode)
        out.frombytes(memoryview(np.ascontiguousarray(value, dtype=np.dtype(current.typecode))).cast("B"))
        setattr(msg, slot, out)
    else:
        setattr(msg, name, np.asarray(value, dtype=current.dtype))


def RCLPY(msgtype: str, **fields: Any) -> Any:  # noqa: N802  (a factory, named like the classes it makes)
    """The codec's message factory for rclpy: ``RCLPY("sensor_msgs/msg/Image", height=..., ...)``."""
    arrays = {k: fields.pop(k) for k in [k for k, v in fields.items() if isinstance(v, np.ndarray)]}
    msg = message_class(msgtype)(**fields)
    for name, value in arrays.items():
        _store_array(msg, name, value)
    return msg


# ------------------------------------------------------------------------------------------------ time

def ns_to_time(ns: int) -> Time:
    """Integer nanoseconds (>= 0) -> builtin_interfaces/Time."""
    return codec.time_msg(RCLPY, ns)


def as_time_msg(stamp: Any) -> Time:
    """Accept a builtin_interfaces/Time, integer nanoseconds, an rclpy Time or None (0)."""
    return stamp if isinstance(stamp, Time) else ns_to_time(codec.stamp_ns(stamp))


def make_header(stamp: Any = None, frame_id: str = "") -> Header:
    return Header(stamp=as_time_msg(stamp), frame_id=frame_id)


# ------------------------------------------------------------------------------------------------ writers

def numpy_to_image(arr: np.ndarray, encoding: str, stamp: Any = None, frame_id: str = "",
                   header: Header | None = None) -> Image:
    """HxW / HxWxC array -> sensor_msgs/Image (little-endian, unpadded rows)."""
    return codec.image_msg(RCLPY, arr, encoding, stamp, frame_id, header)


def numpy_to_compressed(arr: np.ndarray, fmt: str = "jpeg", encoding: str = "rgb8", quality: int = 90,
                        stamp: Any = None, frame_id: str = "", header: Header | None = None) -> CompressedImage:
    """Array in `encoding` (rgb8, bgr8, mono8, mono16/16UC1 for png) -> CompressedImage, as image_transport writes it."""
    return codec.compressed_image_msg(RCLPY, arr, fmt, encoding, quality, stamp, frame_id, header)


def make_camera_info(k: np.ndarray, width: int, height: int, stamp: Any = None, frame_id: str = "",
                     header: Header | None = None) -> CameraInfo:
    """A pinhole CameraInfo (no distortion, R = I, P = [K | 0]) for images the model produced."""
    return codec.camera_info_msg(RCLPY, k, width, height, stamp, frame_id, header)


def scaled_camera_info(info: CameraInfo, new_w: int, new_h: int, offsets: tuple[float, float] = (0.0, 0.0),
                       crop_size: tuple[float, float] | None = None) -> CameraInfo:
    """CameraInfo for a region of `info`'s image resized to new_w x new_h (codec.scaled_camera_info)."""
    return codec.scaled_camera_info(RCLPY, info, new_w, new_h, offsets, crop_size)


def numpy_to_pointcloud2(xyz: np.ndarray, rgb: np.ndarray | None = None, confidence: np.ndarray | None = None,
                         stamp: Any = None, frame_id: str = "", header: Header | None = None) -> PointCloud2:
    """(N,3) points [+ (N,3) uint8 or (N,) packed colours] [+ (N,) confidence] -> unorganised PointCloud2."""
    return codec.pointcloud2_msg(RCLPY, xyz, rgb, confidence, stamp, frame_id, header)


def matrix_to_transform_stamped(matrix: np.ndarray, stamp: Any, parent_frame: str, child_frame: str
                                ) -> TransformStamped:
    """parent_from_child 4x4 -> TransformStamped (header.frame_id = parent, child_frame_id = child)."""
    return codec.transform_stamped_msg(RCLPY, matrix, stamp, parent_frame, child_frame)


def matrix_to_pose_stamped(matrix: np.ndarray, stamp: Any, frame_id: str) -> PoseStamped:
    return codec.pose_stamped_msg(RCLPY, matrix, stamp, frame_id)


def matrix_to_odometry(matrix: np.ndarray, stamp: Any, frame_id: str, child_frame_id: str,
                       pose_covariance: np.ndarray | None = None, linear: Any = None, angular: Any = None,
                       twist_covariance: np.ndarray | None = None) -> Odometry:
    """frame_from_child 4x4 -> nav_msgs/Odometry; twist (in the child frame) and covariances when given."""
    return codec.odometry_msg(RCLPY, matrix, stamp, frame_id, child_frame_id, pose_covariance, linear, angular,
                              twist_covariance)


_POINT_MARK = (1.2345678901234567e-300, -2.345678901234567e-300, 3.456789012345678e-300)
_COLOUR_MARK = (0.12345679, 0.23456789, 0.34567891, 0.45678912)


def serialized_marker(template: Any, points: np.ndarray, colors: np.ndarray) -> bytes:
    """visualization_msgs/Marker serialised (CDR, what a publisher or a bag takes as bytes): `template`'s fields
    with ``points`` (N, 3) and ``colors`` (N, 4) rgba written straight from the arrays.

    A Python Point and ColorRGBA per vertex cost ~2.5 s and left ~60 MB of small-object memory behind for a 61k
    triangle mesh (docs/soak); here the arrays are copied into the byte layout rclpy itself produces: a one-vertex
    message is serialised to find where the two sequences sit (count, alignment padding) and the rest around them."""
    import copy
    import struct

    from geometry_msgs.msg import Point
    from rclpy.serialization import serialize_message
    from std_msgs.msg import ColorRGBA

    pts = np.ascontiguousarray(points, "<f8").reshape(-1, 3)
    cols = np.ascontiguousarray(colors, "<f4").reshape(-1, 4)
    if len(cols) not in (0, len(pts)):
        raise ValueError(f"colors must be empty or one per point: {len(cols)} for {len(pts)} points")
    m = copy.copy(template)
    m.points = [Point(x=_POINT_MARK[0], y=_POINT_MARK[1], z=_POINT_MARK[2])]
    m.colors = [ColorRGBA(r=_COLOUR_MARK[0], g=_COLOUR_MARK[1], b=_COLOUR_MARK[2], a=_COLOUR_MARK[3])]
    raw = serialize_message(m)
    if raw[:2] != b"\x00\x01":
        raise ValueError(f"expected little-endian CDR, got the encapsulation {raw[:4]!r}")
    one = struct.pack("<I", 1)
    ip = raw.index(struct.pack("<3d", *_POINT_MARK))
    ic = raw.index(struct.pack("<4f", *_COLOUR_MARK), ip + 24)
    cp = ip - 4 if raw[ip - 4:ip] == one else ip - 8  # the doubles are 8-aligned: 0 or 4 bytes of padding
    if raw[cp:cp + 4] != one or ic - 4 != ip + 24 or raw[ic - 4:ic] != one:
        raise ValueError("unexpected Marker layout")
    return b"".join((raw[:cp], struct.pack("<I", len(pts)), raw[cp + 4:ip], pts.tobytes(),
                     struct.pack("<I", len(cols)), cols.tobytes(), raw[ic + 16:]))
