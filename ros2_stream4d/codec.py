"""ROS messages <-> numpy without ROS: one codec for rclpy messages and rosbags messages alike.

Readers take any object with the ROS message's fields (an rclpy message, a rosbags message, a stand-in): they read
fields by name and buffers through the buffer protocol, so ``image_to_numpy`` works on what a live subscription
delivers and on what a bag reader deserializes. Writers take a message factory, ``factory(msgtype, **fields)``
with ROS 2 type names ("sensor_msgs/msg/Image"), and pass every field of every message they build (rosbags
classes have no defaults): ros/conversions.py passes one that makes rclpy messages, sim/ and eval/ pass a rosbags
typestore. ``message_factory`` turns a typestore, a {msgtype: class} mapping or a callable into such a factory.
Numeric array fields are handed to the factory as numpy arrays.

Images: sensor_msgs/Image for the encodings in ``ENCODINGS`` (row padding and big-endian data handled) and
CompressedImage (jpeg/png, compressedDepth; OpenCV imported lazily). Every malformed image raises
``ImageConversionError`` (a ValueError) whose ``reason`` names the fault, so a node can count faults by kind.
Also: CameraInfo <-> K, CameraInfo of a resized crop (REP-118 depth outputs), PointCloud2 <-> arrays (x, y, z,
packed rgb, confidence and any other fields), Transform / TransformStamped / Pose / PoseStamped / Odometry <-> 4x4
matrices, builtin_interfaces/Time <-> integer nanoseconds. Only message packing lives here; rotation maths is in
mapping/conventions.py. No ROS module is imported (test_package.py: sim/ and eval/ run without ROS).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from ros2_stream4d.mapping.conventions import matrix_from_quaternion, quaternion_from_matrix

MessageFactory = Callable[..., Any]  # factory(msgtype: str, **fields) -> message

# Largest accepted image side in pixels; bigger images are refused before any allocation.
MAX_IMAGE_SIDE = 8192

# encoding -> (numpy dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "8UC3": (np.dtype(np.uint8), 3),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}

# sensor_msgs/PointField datatype constants -> numpy type codes
POINTFIELD_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
POINTFIELD_FLOAT32 = 7

_NS = 1_000_000_000


class ImageConversionError(ValueError):
    """An image message that cannot be turned into an array (or an array that cannot become a message).

    `reason` is one of: "encoding", "size", "step", "data_length", "empty", "corrupt", "array".
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CloudConversionError(ValueError):
    """A PointCloud2 without the expected layout, or arrays that cannot form one."""


class TransformConversionError(ValueError):
    """A matrix or quaternion that cannot be packed into (or read from) a pose message."""


# ------------------------------------------------------------------------------------------------ factories

def message_factory(source: Any) -> MessageFactory:
    """A factory ``(msgtype, **fields) -> message`` from a rosbags Typestore (anything with a ``types`` mapping),
    a {msgtype: class} mapping, or a callable that already is one."""
    types = getattr(source, "types", None)
    if isinstance(types, Mapping):
        return lambda msgtype, **fields: types[msgtype](**fields)
    if isinstance(source, Mapping):
        return lambda msgtype, **fields: source[msgtype](**fields)
    if callable(source):
        return source
    raise TypeError(f"cannot make messages with {type(source).__name__}: pass a typestore, a mapping or a callable")


# ------------------------------------------------------------------------------------------------ time

def time_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (any message with sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def stamp_ns(stamp: Any) -> int:
    """A stamp in any accepted form -> integer nanoseconds: None (0), int ns, a Time message (sec, nanosec) or an
    rclpy Time (``nanoseconds``)."""
    if stamp is None:
        return 0
    if isinstance(stamp, (int, np.integer)):
        return int(stamp)
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return time_to_ns(stamp)
    if isinstance(getattr(stamp, "nanoseconds", None), int):
        return int(stamp.nanoseconds)
    raise TypeError(f"cannot use {type(stamp).__name__} as a stamp (expected Time, int ns or rclpy Time)")


def time_msg(factory: MessageFactory, ns: int) -> Any:
    """Integer nanoseconds (>= 0) -> builtin_interfaces/Time."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"ROS time cannot be negative: {ns} ns")
    return factory("builtin_interfaces/msg/Time", sec=ns // _NS, nanosec=ns % _NS)


def header_msg(factory: MessageFactory, stamp: Any = None, frame_id: str = "") -> Any:
    """std_msgs/Header; stamp as ``stamp_ns`` accepts it."""
    return factory("std_msgs/msg/Header", stamp=time_msg(factory, stamp_ns(stamp)), frame_id=str(frame_id))


def _header(factory: MessageFactory, header: Any, stamp: Any, frame_id: str) -> Any:
    return header if header is not None else header_msg(factory, stamp, frame_id)


# ------------------------------------------------------------------------------------------------ buffers

def _buffer(data: Any) -> np.ndarray:
    """Message `data` field (array.array, bytes, list or ndarray) as a flat uint8 array, zero-copy where possible."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else data.astype(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _bytes_of(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array as a flat uint8 view (no copy when it already is contiguous)."""
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


# ------------------------------------------------------------------------------------------------ Image

def _check_size(width: int, height: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageConversionError("size", f"image size {width}x{height} has a zero side")
    if width > max_side or height > max_side:
        raise ImageConversionError("size", f"image size {width}x{height} exceeds the {max_side} px limit per side")


def image_to_numpy(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/Image -> HxW (one channel) or HxWxC array in native byte order.

    A zero-copy view of the message buffer when the data is native-endian (read-only for rclpy messages); copy
    it before writing.
    """
    encoding = msg.encoding
    if encoding not in ENCODINGS:
        raise ImageConversionError("encoding", f"unsupported image encoding {encoding!r}; supported: "
                                               f"{', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size(width, height, max_side)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError("step", f"step {step} < width*bytes_per_pixel = {width}*{channels * dtype.itemsize}"
                                           f" = {row_bytes} for {encoding}")
    data = _buffer(msg.data)
    if data.size == 0:
        raise ImageConversionError("empty", f"{encoding} image {width}x{height} has no data")
    if data.size != step * height:
        raise ImageConversionError("data_length", f"data length {data.size} != step*height = {step}*{height} = "
                                                  f"{step * height}")
    wire = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    shape = (height, width, channels) if channels > 1 else (height, width)
    strides = (step, channels * dtype.itemsize, dtype.itemsize) if channels > 1 else (step, dtype.itemsize)
    view = np.ndarray(shape, dtype=wire, buffer=data, strides=strides)
    if not wire.isnative:
        return view.astype(dtype)
    return view


def _check_array(arr: Any, encoding: str) -> np.ndarray:
    if encoding not in ENCODINGS:
        raise ImageConversionError("encoding", f"unsupported image encoding {encoding!r}")
    dtype, channels = ENCODINGS[encoding]
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1 and channels == 1:
        arr = arr[:, :, 0]
    expected_ndim = 3 if channels > 1 else 2
    if arr.ndim != expected_ndim or (channels > 1 and arr.shape[2] != channels):
        raise ImageConversionError("array", f"array of shape {arr.shape} does not fit {encoding} "
                                            f"({channels} channel{'s' * (channels > 1)})")
    if arr.dtype != dtype:
        raise ImageConversionError("array", f"array dtype {arr.dtype} does not fit {encoding} (needs {dtype})")
    _check_size(arr.shape[1], arr.shape[0], MAX_IMAGE_SIDE)
    return arr


def image_msg(factory: MessageFactory, arr: np.ndarray, encoding: str, stamp: Any = None, frame_id: str = "",
              header: Any = None) -> Any:
    """HxW / HxWxC array -> sensor_msgs/Image (little-endian, unpadded rows)."""
    arr = _check_array(arr, encoding)
    dtype, channels = ENCODINGS[encoding]
    height, width = arr.shape[:2]
    return factory("sensor_msgs/msg/Image", header=_header(factory, header, stamp, frame_id), height=height,
                   width=width, encoding=encoding, is_bigendian=0, step=width * channels * dtype.itemsize,
                   data=_bytes_of(arr.astype(dtype.newbyteorder("<"), copy=False)))


def _gray_to_rgb(gray8: np.ndarray) -> np.ndarray:
    return np.repeat(gray8[:, :, None], 3, axis=2)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float image -> uint8 by its finite min..max (for viewing depth-like inputs); NaN/Inf become 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    span = hi - lo if hi > lo else 1.0
    out = np.where(finite, (values - lo) * (255.0 / span), 0.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def array_to_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    """An array in `encoding` -> contiguous HxWx3 uint8 RGB.

    Mono becomes gray RGB; 16-bit data keeps its full range (value >> 8, as camera mono16 is full-scale);
    32FC1 is scaled by its finite min..max.
    """
    if encoding in ("rgb8", "8UC3"):
        return np.ascontiguousarray(arr)
    if encoding == "bgr8":
        return np.ascontiguousarray(arr[:, :, ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(arr[:, :, :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(arr[:, :, 2::-1])
    if encoding in ("mono8", "8UC1"):
        return _gray_to_rgb(arr)
    if encoding in ("mono16", "16UC1"):
        return _gray_to_rgb((arr >> 8).astype(np.uint8))
    if encoding == "32FC1":
        return _gray_to_rgb(_scale_to_uint8(arr))
    raise ImageConversionError("encoding", f"unsupported image encoding {encoding!r}")


def image_to_rgb(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB (a fresh contiguous array), the model's input format."""
    return array_to_rgb(image_to_numpy(msg, max_side), msg.encoding)


# ------------------------------------------------------------------------------------------------ CompressedImage

def _cv2():
    import cv2  # lazy: only compressed images need OpenCV

    return cv2


# compressedDepth (image_transport's depth plugin) prefixes the PNG with a 12-byte ConfigHeader
_COMPRESSED_DEPTH_HEADER = 12
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_compressed(msg: Any) -> bool:
    """A sensor_msgs/CompressedImage (it has `format`; an Image has `encoding`)."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def compressed_to_numpy(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png, compressedDepth png) -> array as OpenCV decodes it.

    Colour comes back BGR (HxWx3) or BGRA, gray as HxW, 16-bit PNG as uint16.
    """
    data = _buffer(msg.data)
    if data.size == 0:
        raise ImageConversionError("empty", f"compressed image ({msg.format!r}) has no data")
    fmt = msg.format.lower()
    if "compresseddepth" in fmt:
        if data.size <= _COMPRESSED_DEPTH_HEADER or bytes(data[12:20]) != _PNG_MAGIC:
            raise ImageConversionError("corrupt", "compressedDepth data does not hold a PNG after its 12-byte header")
        data = data[_COMPRESSED_DEPTH_HEADER:]
    cv2 = _cv2()
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV refuses some malformed headers by raising instead of returning None
        raise ImageConversionError("corrupt", f"cannot decode compressed image ({msg.format!r}): {exc}") from exc
    if decoded is None or decoded.size == 0:
        raise ImageConversionError("corrupt", f"cannot decode compressed image ({msg.format!r}, {data.size} bytes)")
    _check_size(decoded.shape[1], decoded.shape[0], max_side)
    return decoded


def compressed_to_rgb(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/CompressedImage -> HxWx3 uint8 RGB."""
    decoded = compressed_to_numpy(msg, max_side)
    if decoded.ndim == 2:
        if decoded.dtype == np.uint8:
            return _gray_to_rgb(decoded)
        if decoded.dtype == np.uint16:
            return _gray_to_rgb((decoded >> 8).astype(np.uint8))
        return _gray_to_rgb(_scale_to_uint8(decoded.astype(np.float32)))
    if decoded.dtype == np.uint16:  # 16-bit colour PNG
        decoded = (decoded >> 8).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise ImageConversionError("encoding", f"decoded compressed image has unsupported dtype {decoded.dtype}")
    channels = decoded.shape[2]
    if channels == 3:
        return np.ascontiguousarray(decoded[:, :, ::-1])
    if channels == 4:
        return np.ascontiguousarray(decoded[:, :, 2::-1])
    if channels == 1:
        return _gray_to_rgb(decoded[:, :, 0])
    raise ImageConversionError("encoding", f"decoded compressed image has {channels} channels")


def to_rgb(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Image or CompressedImage -> HxWx3 uint8 RGB."""
    if is_compressed(msg):
        return compressed_to_rgb(msg, max_side)
    return image_to_rgb(msg, max_side)


def compressed_image_msg(factory: MessageFactory, arr: np.ndarray, fmt: str = "jpeg", encoding: str = "rgb8",
                         quality: int = 90, stamp: Any = None, frame_id: str = "", header: Any = None) -> Any:
    """Array in `encoding` (rgb8, bgr8, mono8, mono16/16UC1 for png) -> CompressedImage, as image_transport writes
    it (format "<encoding>; <fmt> compressed <stored encoding>")."""
    fmt = fmt.lower()
    if fmt not in ("jpeg", "png"):
        raise ImageConversionError("encoding", f"unsupported compression format {fmt!r} (jpeg or png)")
    arr = np.asarray(arr)
    if encoding == "rgb8":
        pixels, stored = arr[:, :, ::-1] if arr.ndim == 3 else arr, "bgr8"
    elif encoding in ("bgr8", "mono8", "8UC1", "mono16", "16UC1"):
        pixels, stored = arr, encoding
    else:
        raise ImageConversionError("encoding", f"cannot compress {encoding!r} images")
    dtype, channels = ENCODINGS[encoding]
    if arr.dtype != dtype or arr.ndim != (3 if channels > 1 else 2) or (channels > 1 and arr.shape[2] != channels):
        raise ImageConversionError("array", f"array {arr.shape} {arr.dtype} does not fit {encoding}")
    if fmt == "jpeg" and dtype != np.uint8:
        raise ImageConversionError("encoding", "jpeg holds 8-bit images only; use png for 16-bit")
    _check_size(arr.shape[1], arr.shape[0], MAX_IMAGE_SIDE)
    cv2 = _cv2()
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), np.ascontiguousarray(pixels), params)
    if not ok:
        raise ImageConversionError("array", f"OpenCV failed to encode a {arr.shape} {encoding} image as {fmt}")
    return factory("sensor_msgs/msg/CompressedImage", header=_header(factory, header, stamp, frame_id),
                   format=f"{encoding}; {fmt} compressed {stored}", data=buf.reshape(-1))


# ------------------------------------------------------------------------------------------------ CameraInfo

def camera_info_to_k(info: Any) -> tuple[np.ndarray, int, int]:
    """CameraInfo -> (K 3x3 float64, width, height). Raises ValueError for an uncalibrated (zero) or invalid K."""
    k = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 or k[2, 2] != 1.0:
        raise ValueError(f"CameraInfo K is not a valid calibration (fx, fy > 0, K[2,2] = 1): {k.reshape(-1).tolist()}")
    if info.width <= 0 or info.height <= 0:
        raise ValueError(f"CameraInfo size {info.width}x{info.height} has a zero side")
    return k, int(info.width), int(info.height)


def _camera_info(factory: MessageFactory, header: Any, width: int, height: int, distortion_model: str, d, k, r, p
                 ) -> Any:
    roi = factory("sensor_msgs/msg/RegionOfInterest", x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return factory("sensor_msgs/msg/CameraInfo", header=header, height=int(height), width=int(width),
                   distortion_model=str(distortion_model), d=np.asarray(d, np.float64).reshape(-1),
                   k=np.asarray(k, np.float64).reshape(9), r=np.asarray(r, np.float64).reshape(9),
                   p=np.asarray(p, np.float64).reshape(12), binning_x=0, binning_y=0, roi=roi)


def camera_info_msg(factory: MessageFactory, k: np.ndarray, width: int, height: int, stamp: Any = None,
                    frame_id: str = "", header: Any = None, distortion_model: str = "plumb_bob", d=None) -> Any:
    """A CameraInfo with R = I and P = [K | 0]; D = `d` (None or empty: the 5 zeros of an undistorted plumb_bob)."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        raise ValueError(f"K must be a finite 3x3 matrix, got shape {k.shape}")
    p = np.zeros((3, 4))
    p[:, :3] = k
    d = np.zeros(5) if d is None or not len(d) else np.asarray(d, np.float64)
    return _camera_info(factory, _header(factory, header, stamp, frame_id), width, height, distortion_model, d, k,
                        np.eye(3), p)


def scaled_camera_info(factory: MessageFactory, info: Any, new_w: int, new_h: int,
                       offsets: tuple[float, float] = (0.0, 0.0), crop_size: tuple[float, float] | None = None) -> Any:
    """CameraInfo for an image made from a region of `info`'s image resized to new_w x new_h.

    The region starts at `offsets` (x0, y0) in source pixels (negative = padding) and spans `crop_size`
    (default: centred, width - 2*x0 by height - 2*y0). Pixel centres follow the OpenCV resize convention
    u' + 0.5 = (u - x0 + 0.5) * s. K and P are rewritten, D and R kept, header identical (REP-118: a depth
    image and its CameraInfo share the header).
    """
    if new_w <= 0 or new_h <= 0:
        raise ValueError(f"new size {new_w}x{new_h} has a zero side")
    x0, y0 = float(offsets[0]), float(offsets[1])
    crop_w, crop_h = crop_size if crop_size is not None else (info.width - 2 * x0, info.height - 2 * y0)
    if crop_w <= 0 or crop_h <= 0:
        raise ValueError(f"crop {crop_w}x{crop_h} at offsets ({x0}, {y0}) is empty for a {info.width}x{info.height} image")
    sx, sy = new_w / crop_w, new_h / crop_h
    # u' = sx*u + bx maps source pixels to published pixels; applied to the image rows of K and P
    bx, by = (0.5 - x0) * sx - 0.5, (0.5 - y0) * sy - 0.5
    affine = np.array([[sx, 0.0, bx], [0.0, sy, by], [0.0, 0.0, 1.0]])
    k = affine @ np.asarray(info.k, np.float64).reshape(3, 3)
    p = affine @ np.asarray(info.p, np.float64).reshape(3, 4)
    return _camera_info(factory, info.header, new_w, new_h, info.distortion_model, info.d, k, info.r, p)


# ------------------------------------------------------------------------------------------------ PointCloud2

class CloudArrays(NamedTuple):
    xyz: np.ndarray                 # (N, 3) float32
    rgb: np.ndarray | None          # (N, 3) uint8 or None
    confidence: np.ndarray | None   # (N,) float32 or None


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) uint32 0x00RRGGBB (PCL / RViz convention)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    return (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) uint32 0x00RRGGBB -> (N, 3) uint8."""
    packed = np.asarray(packed, dtype=np.uint32)
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1).astype(np.uint8)


def pointcloud2_to_structured(msg: Any) -> np.ndarray:
    """PointCloud2 -> (height*width,) structured array view over the data; a field with count > 1 becomes a
    sub-array of that many values."""
    endian = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for field in msg.fields:
        if field.datatype not in POINTFIELD_DTYPES:
            raise CloudConversionError(f"field {field.name!r} has unknown datatype {field.datatype}")
        if field.count < 1:
            raise CloudConversionError(f"field {field.name!r} has count {field.count}")
        base = np.dtype(endian + POINTFIELD_DTYPES[field.datatype])
        names.append(field.name)
        formats.append(base if field.count == 1 else (base, (int(field.count),)))
        offsets.append(int(field.offset))
    point_step = int(msg.point_step)
    if point_step <= 0 or any(o + np.dtype(f).itemsize > point_step for o, f in zip(offsets, formats)):
        raise CloudConversionError(f"point_step {point_step} does not hold fields at offsets {offsets}")
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": point_step})
    data = _buffer(msg.data)
    n_rows, n_cols, row_step = int(msg.height), int(msg.width), int(msg.row_step)
    if row_step < n_cols * point_step or data.size != row_step * n_rows:
        raise CloudConversionError(f"data length {data.size} != row_step*height = {row_step}*{n_rows} "
                                   f"(width {n_cols}, point_step {point_step})")
    rows = np.ndarray((n_rows, n_cols), dtype=dtype, buffer=data, strides=(row_step, point_step))
    return rows.reshape(-1)


def _unpack_colour(raw: np.ndarray) -> np.ndarray:
    return unpack_rgb(np.ascontiguousarray(raw).view(np.uint32) if raw.dtype.itemsize == 4 else raw)


def _xyz(points: np.ndarray) -> np.ndarray:
    names = points.dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise CloudConversionError(f"cloud lacks x, y, z fields (has {list(names)})")
    return np.stack([points["x"], points["y"], points["z"]], axis=1).astype(np.float32)


def pointcloud2_to_numpy(msg: Any) -> CloudArrays:
    """PointCloud2 -> CloudArrays(xyz (N,3) float32, rgb (N,3) uint8 | None, confidence (N,) float32 | None)."""
    points = pointcloud2_to_structured(msg)
    names = points.dtype.names or ()
    xyz = _xyz(points)
    colour = "rgb" if "rgb" in names else "rgba" if "rgba" in names else None
    rgb = _unpack_colour(points[colour]) if colour else None
    confidence = points["confidence"].astype(np.float32) if "confidence" in names else None
    return CloudArrays(xyz, rgb, confidence)


def pointcloud2_to_arrays(msg: Any) -> dict[str, np.ndarray]:
    """PointCloud2 -> {"xyz": (N, 3) float32, "rgb": (N, 3) uint8 (from a packed rgb or rgba field), and every
    other field by its name: (N,) or (N, count), native byte order}."""
    points = pointcloud2_to_structured(msg)
    out = {"xyz": _xyz(points)}
    for name in points.dtype.names:
        if name in ("x", "y", "z"):
            continue
        if name in ("rgb", "rgba"):
            out["rgb"] = _unpack_colour(points[name])
        else:
            values = points[name]
            out[name] = values.astype(values.dtype.base.newbyteorder("="))
    return out


def pointcloud2_msg(factory: MessageFactory, xyz: np.ndarray, rgb: np.ndarray | None = None,
                    confidence: np.ndarray | None = None, stamp: Any = None, frame_id: str = "",
                    header: Any = None) -> Any:
    """(N,3) points [+ (N,3) uint8 colours or (N,) packed uint32] [+ (N,) confidence] -> unorganised PointCloud2.

    Fields x, y, z float32, then rgb (uint32 0x00RRGGBB stored as FLOAT32, what RViz expects), then confidence.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise CloudConversionError(f"xyz must be (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    names = ["x", "y", "z"]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if not ((rgb.ndim == 2 and rgb.shape == (n, 3)) or (rgb.ndim == 1 and rgb.shape[0] == n)):
            raise CloudConversionError(f"rgb must be (N, 3) uint8 or (N,) packed uint32 with N = {n}, got {rgb.shape}")
        names.append("rgb")
    if confidence is not None:
        confidence = np.asarray(confidence)
        if confidence.shape != (n,):
            raise CloudConversionError(f"confidence must be (N,) with N = {n}, got {confidence.shape}")
        names.append("confidence")
    buf = np.empty((n, len(names)), dtype=np.float32)
    buf[:, :3] = xyz
    column = 3
    if rgb is not None:
        if rgb.ndim == 2 and sys.byteorder == "little":
            # 0x00RRGGBB little-endian is the bytes B, G, R, 0: write them directly (no uint32 arithmetic)
            colour_bytes = buf.view(np.uint8).reshape(n, 4 * len(names))[:, 4 * column:4 * column + 4]
            colour_bytes[:, :3] = rgb[:, ::-1]
            colour_bytes[:, 3] = 0
        else:
            buf[:, column].view(np.uint32)[:] = pack_rgb(rgb) if rgb.ndim == 2 else rgb.astype(np.uint32)
        column += 1
    if confidence is not None:
        buf[:, column] = confidence
    fields = [factory("sensor_msgs/msg/PointField", name=name, offset=4 * i, datatype=POINTFIELD_FLOAT32, count=1)
              for i, name in enumerate(names)]
    return factory("sensor_msgs/msg/PointCloud2", header=_header(factory, header, stamp, frame_id), height=1,
                   width=n, fields=fields, is_bigendian=False, point_step=4 * len(names),
                   row_step=4 * len(names) * n, data=_bytes_of(buf), is_dense=bool(np.isfinite(xyz).all()))


# ------------------------------------------------------------------------------------------------ poses

def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (x, y, z, w), w >= 0; TransformConversionError unless it is a rotation."""
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise TransformConversionError(f"rotation must be a finite 3x3 matrix, got shape {m.shape}")
    if np.abs(m.T @ m - np.eye(3)).max() > 1e-3 or np.linalg.det(m) < 0:  # float32 poses keep ~1e-6
        raise TransformConversionError(f"matrix is not a rotation (orthonormal, det +1): {m.tolist()}")
    return quaternion_from_matrix(m)


def quaternion_to_matrix(q: Any) -> np.ndarray:
    """Quaternion (x, y, z, w) or a geometry_msgs Quaternion -> 3x3 rotation (normalised first)."""
    if hasattr(q, "w"):
        q = (q.x, q.y, q.z, q.w)
    q = np.asarray([float(v) for v in q], np.float64)
    norm = float(np.linalg.norm(q))
    if q.shape != (4,) or not np.isfinite(norm) or norm < 1e-9:
        raise TransformConversionError(f"quaternion {tuple(q.tolist())} has no rotation (zero or non-finite norm)")
    return matrix_from_quaternion(q)


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise TransformConversionError(f"pose must be a finite 4x4 matrix, got shape {m.shape}")
    return m


def _matrix(translation: Any, rotation: Any) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = quaternion_to_matrix(rotation)
    m[:3, 3] = (translation.x, translation.y, translation.z)
    return m


def transform_to_matrix(msg: Any) -> np.ndarray:
    """TransformStamped or Transform -> parent_from_child 4x4."""
    transform = getattr(msg, "transform", msg)
    return _matrix(transform.translation, transform.rotation)


def pose_to_matrix(msg: Any) -> np.ndarray:
    """Pose, PoseStamped, PoseWithCovariance(Stamped) or Odometry -> 4x4."""
    while hasattr(msg, "pose"):
        msg = msg.pose
    return _matrix(msg.position, msg.orientation)


def _xyz_fields(v) -> dict:
    x, y, z = (float(c) for c in v)
    return {"x": x, "y": y, "z": z}


def _quaternion(factory: MessageFactory, m: np.ndarray) -> Any:
    x, y, z, w = (float(v) for v in matrix_to_quaternion(m[:3, :3]))
    return factory("geometry_msgs/msg/Quaternion", x=x, y=y, z=z, w=w)


def _pose(factory: MessageFactory, m: np.ndarray) -> Any:
    return factory("geometry_msgs/msg/Pose", position=factory("geometry_msgs/msg/Point", **_xyz_fields(m[:3, 3])),
                   orientation=_quaternion(factory, m))


def transform_stamped_msg(factory: MessageFactory, matrix: np.ndarray, stamp: Any, parent_frame: str,
                          child_frame: str, header: Any = None) -> Any:
    """parent_from_child 4x4 -> TransformStamped (header.frame_id = parent, child_frame_id = child)."""
    m = _check_matrix(matrix)
    transform = factory("geometry_msgs/msg/Transform",
                        translation=factory("geometry_msgs/msg/Vector3", **_xyz_fields(m[:3, 3])),
                        rotation=_quaternion(factory, m))
    return factory("geometry_msgs/msg/TransformStamped", header=_header(factory, header, stamp, parent_frame),
                   child_frame_id=str(child_frame), transform=transform)


def pose_stamped_msg(factory: MessageFactory, matrix: np.ndarray, stamp: Any, frame_id: str,
                     header: Any = None) -> Any:
    """frame_from_pose 4x4 -> PoseStamped."""
    return factory("geometry_msgs/msg/PoseStamped", header=_header(factory, header, stamp, frame_id),
                   pose=_pose(factory, _check_matrix(matrix)))


def _covariance(cov: np.ndarray | None, what: str) -> np.ndarray:
    if cov is None:
        return np.zeros(36)
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (6, 6):
        raise TransformConversionError(f"{what} covariance must be 6x6, got {cov.shape}")
    return cov.reshape(-1)


def odometry_msg(factory: MessageFactory, matrix: np.ndarray, stamp: Any, frame_id: str, child_frame_id: str,
                 pose_covariance: np.ndarray | None = None, linear: Any = None, angular: Any = None,
                 twist_covariance: np.ndarray | None = None, header: Any = None) -> Any:
    """frame_from_child 4x4 -> nav_msgs/Odometry; twist (in the child frame) and covariances when given (zeros
    otherwise)."""
    m = _check_matrix(matrix)
    zero = (0.0, 0.0, 0.0)
    twist = factory("geometry_msgs/msg/Twist",
                    linear=factory("geometry_msgs/msg/Vector3", **_xyz_fields(zero if linear is None else linear)),
                    angular=factory("geometry_msgs/msg/Vector3", **_xyz_fields(zero if angular is None else angular)))
    return factory(
        "nav_msgs/msg/Odometry", header=_header(factory, header, stamp, frame_id), child_frame_id=str(child_frame_id),
        pose=factory("geometry_msgs/msg/PoseWithCovariance", pose=_pose(factory, m),
                     covariance=_covariance(pose_covariance, "pose")),
        twist=factory("geometry_msgs/msg/TwistWithCovariance", twist=twist,
                      covariance=_covariance(twist_covariance, "twist")))
