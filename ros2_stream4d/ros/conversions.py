"""ROS 2 messages <-> numpy, without cv_bridge, sensor_msgs_py or tf_transformations.

Images: sensor_msgs/Image for the encodings in `ENCODINGS` (row padding and big-endian data handled) and
CompressedImage (jpeg/png via OpenCV, imported lazily). Every malformed image raises `ImageConversionError`
(a ValueError) whose `reason` names the fault, so a node can count faults by kind and skip the frame.

Also: CameraInfo <-> K, CameraInfo scaled to a published resolution (REP-118 depth outputs), PointCloud2 with
x, y, z, rgb (packed float32) and confidence, TransformStamped / PoseStamped / Odometry <-> 4x4 matrices,
builtin_interfaces/Time <-> integer nanoseconds. Only message packing lives here; geometry is in mapping/.
"""

from __future__ import annotations

import array
import sys
from typing import Any, NamedTuple

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped, TransformStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

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


# ------------------------------------------------------------------------------------------------ time

def time_to_ns(stamp: Time) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * _NS + int(stamp.nanosec)


def ns_to_time(ns: int) -> Time:
    """Integer nanoseconds (>= 0) -> builtin_interfaces/Time."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"ROS time cannot be negative: {ns} ns")
    return Time(sec=ns // _NS, nanosec=ns % _NS)


def as_time_msg(stamp: Any) -> Time:
    """Accept a builtin_interfaces/Time, integer nanoseconds, an rclpy Time (anything with to_msg()) or None (0)."""
    if stamp is None:
        return Time()
    if isinstance(stamp, Time):
        return stamp
    if isinstance(stamp, (int, np.integer)):
        return ns_to_time(int(stamp))
    if hasattr(stamp, "to_msg"):
        return stamp.to_msg()
    raise TypeError(f"cannot use {type(stamp).__name__} as a stamp (expected Time, int ns or rclpy Time)")


def make_header(stamp: Any = None, frame_id: str = "") -> Header:
    return Header(stamp=as_time_msg(stamp), frame_id=frame_id)


# ------------------------------------------------------------------------------------------------ buffers

def _buffer(data: Any) -> np.ndarray:
    """Message `data` field (array.array, bytes, list or ndarray) as a flat uint8 array, zero-copy where possible."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else data.astype(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _set_uint8_field(msg: Any, name: str, arr: np.ndarray) -> None:
    """Store an array in a uint8[] field with one copy.

    The generated setter would copy an array.array a second time, element by element (4 ms for a 6 MB cloud),
    unless field checks are on; storing into its slot is what the checked path does itself.
    """
    out = array.array("B")
    out.frombytes(memoryview(np.ascontiguousarray(arr)).cast("B"))
    if hasattr(type(msg), "_" + name):
        setattr(msg, "_" + name, out)
    else:
        setattr(msg, name, out)


# ------------------------------------------------------------------------------------------------ Image

def _check_size(width: int, height: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageConversionError("size", f"image size {width}x{height} has a zero side")
    if width > max_side or height > max_side:
        raise ImageConversionError("size", f"image size {width}x{height} exceeds the {max_side} px limit per side")


def image_to_numpy(msg: Image, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/Image -> HxW (one channel) or HxWxC array in native byte order.

    A read-only zero-copy view of the message buffer when the data is native-endian; copy it before writing.
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


def numpy_to_image(arr: np.ndarray, encoding: str, stamp: Any = None, frame_id: str = "",
                   header: Header | None = None) -> Image:
    """HxW / HxWxC array -> sensor_msgs/Image (little-endian, unpadded rows)."""
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
    height, width = arr.shape[:2]
    _check_size(width, height, MAX_IMAGE_SIDE)
    msg = Image()
    msg.header = header if header is not None else make_header(stamp, frame_id)
    msg.height, msg.width, msg.encoding, msg.is_bigendian = height, width, encoding, 0
    msg.step = width * channels * dtype.itemsize
    _set_uint8_field(msg, "data", arr.astype(dtype.newbyteorder("<"), copy=False))
    return msg


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


def image_to_rgb(msg: Image, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB (a fresh contiguous array), the model's input format."""
    return array_to_rgb(image_to_numpy(msg, max_side), msg.encoding)


# ------------------------------------------------------------------------------------------------ CompressedImage

def _cv2():
    import cv2  # lazy: only compressed images need OpenCV
    return cv2


# compressedDepth (image_transport's depth plugin) prefixes the PNG with a 12-byte ConfigHeader
_COMPRESSED_DEPTH_HEADER = 12
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compressed_to_numpy(msg: CompressedImage, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
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


def compressed_to_rgb(msg: CompressedImage, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
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


def numpy_to_compressed(arr: np.ndarray, fmt: str = "jpeg", encoding: str = "rgb8", quality: int = 90,
                        stamp: Any = None, frame_id: str = "", header: Header | None = None) -> CompressedImage:
    """Array in `encoding` (rgb8, bgr8, mono8, mono16/16UC1 for png) -> CompressedImage, as image_transport writes it."""
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
    msg = CompressedImage()
    msg.header = header if header is not None else make_header(stamp, frame_id)
    msg.format = f"{encoding}; {fmt} compressed {stored}"
    _set_uint8_field(msg, "data", buf)
    return msg


def to_rgb(msg: Image | CompressedImage, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Image or CompressedImage -> HxWx3 uint8 RGB."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg, max_side)
    return image_to_rgb(msg, max_side)


# ------------------------------------------------------------------------------------------------ CameraInfo

def camera_info_to_k(info: CameraInfo) -> tuple[np.ndarray, int, int]:
    """CameraInfo -> (K 3x3 float64, width, height). Raises ValueError for an uncalibrated (zero) or invalid K."""
    k = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 or k[2, 2] != 1.0:
        raise ValueError(f"CameraInfo K is not a valid calibration (fx, fy > 0, K[2,2] = 1): {k.reshape(-1).tolist()}")
    if info.width <= 0 or info.height <= 0:
        raise ValueError(f"CameraInfo size {info.width}x{info.height} has a zero side")
    return k, int(info.width), int(info.height)


def make_camera_info(k: np.ndarray, width: int, height: int, stamp: Any = None, frame_id: str = "",
                     header: Header | None = None) -> CameraInfo:
    """A pinhole CameraInfo (no distortion, R = I, P = [K | 0]) for images the model produced."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != (3, 3) or not np.isfinite(k).all():
        raise ValueError(f"K must be a finite 3x3 matrix, got shape {k.shape}")
    info = CameraInfo()
    info.header = header if header is not None else make_header(stamp, frame_id)
    info.width, info.height = int(width), int(height)
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    info.k = k.reshape(-1).tolist()
    info.r = np.eye(3).reshape(-1).tolist()
    p = np.zeros((3, 4))
    p[:, :3] = k
    info.p = p.reshape(-1).tolist()
    return info


def scaled_camera_info(info: CameraInfo, new_w: int, new_h: int, offsets: tuple[float, float] = (0.0, 0.0),
                       crop_size: tuple[float, float] | None = None) -> CameraInfo:
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
    out = CameraInfo()
    out.header = info.header
    out.width, out.height = int(new_w), int(new_h)
    out.distortion_model = info.distortion_model
    out.d = list(info.d)
    out.r = list(info.r)
    out.k = (affine @ np.asarray(info.k, np.float64).reshape(3, 3)).reshape(-1).tolist()
    out.p = (affine @ np.asarray(info.p, np.float64).reshape(3, 4)).reshape(-1).tolist()
    return out


# ------------------------------------------------------------------------------------------------ PointCloud2

class CloudArrays(NamedTuple):
    xyz: np.ndarray                 # (N, 3) float32
    rgb: np.ndarray | None          # (N, 3) uint8 or None
    confidence: np.ndarray | None   # (N,) float32 or None


_FLOAT32 = PointField.FLOAT32


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) uint32 0x00RRGGBB (PCL / RViz convention)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    return (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) uint32 0x00RRGGBB -> (N, 3) uint8."""
    packed = np.asarray(packed, dtype=np.uint32)
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=1).astype(np.uint8)


def numpy_to_pointcloud2(xyz: np.ndarray, rgb: np.ndarray | None = None, confidence: np.ndarray | None = None,
                         stamp: Any = None, frame_id: str = "", header: Header | None = None) -> PointCloud2:
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
            colour_bytes = buf.view(np.uint8).reshape(n, -1)[:, 4 * column:4 * column + 4]
            colour_bytes[:, :3] = rgb[:, ::-1]
            colour_bytes[:, 3] = 0
        else:
            buf[:, column].view(np.uint32)[:] = pack_rgb(rgb) if rgb.ndim == 2 else rgb.astype(np.uint32)
        column += 1
    if confidence is not None:
        buf[:, column] = confidence
    msg = PointCloud2()
    msg.header = header if header is not None else make_header(stamp, frame_id)
    msg.height, msg.width = 1, n
    msg.fields = [PointField(name=name, offset=4 * i, datatype=_FLOAT32, count=1) for i, name in enumerate(names)]
    msg.is_bigendian = False
    msg.point_step = 4 * len(names)
    msg.row_step = msg.point_step * n
    msg.is_dense = bool(np.isfinite(xyz).all())
    _set_uint8_field(msg, "data", buf)
    return msg


_POINTFIELD_DTYPES = {PointField.INT8: "i1", PointField.UINT8: "u1", PointField.INT16: "i2", PointField.UINT16: "u2",
                      PointField.INT32: "i4", PointField.UINT32: "u4", PointField.FLOAT32: "f4",
                      PointField.FLOAT64: "f8"}


def pointcloud2_to_structured(msg: PointCloud2) -> np.ndarray:
    """PointCloud2 -> (height*width,) structured array view over the data (all single-count fields)."""
    endian = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for field in msg.fields:
        if field.datatype not in _POINTFIELD_DTYPES:
            raise CloudConversionError(f"field {field.name!r} has unknown datatype {field.datatype}")
        if field.count != 1:
            raise CloudConversionError(f"field {field.name!r} has count {field.count}; only 1 is supported")
        names.append(field.name)
        formats.append(endian + _POINTFIELD_DTYPES[field.datatype])
        offsets.append(field.offset)
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": msg.point_step})
    if msg.point_step <= 0 or any(o + np.dtype(f).itemsize > msg.point_step for o, f in zip(offsets, formats)):
        raise CloudConversionError(f"point_step {msg.point_step} does not hold fields at offsets {offsets}")
    data = _buffer(msg.data)
    n_rows, n_cols = int(msg.height), int(msg.width)
    if msg.row_step < n_cols * msg.point_step or data.size != msg.row_step * n_rows:
        raise CloudConversionError(f"data length {data.size} != row_step*height = {msg.row_step}*{n_rows} "
                                   f"(width {n_cols}, point_step {msg.point_step})")
    rows = np.ndarray((n_rows, n_cols), dtype=dtype, buffer=data, strides=(msg.row_step, msg.point_step))
    return rows.reshape(-1)


def pointcloud2_to_numpy(msg: PointCloud2) -> CloudArrays:
    """PointCloud2 -> CloudArrays(xyz (N,3) float32, rgb (N,3) uint8 | None, confidence (N,) float32 | None)."""
    points = pointcloud2_to_structured(msg)
    names = points.dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise CloudConversionError(f"cloud lacks x, y, z fields (has {list(names)})")
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=1).astype(np.float32)
    rgb = None
    if "rgb" in names or "rgba" in names:
        raw = points["rgb" if "rgb" in names else "rgba"]
        rgb = unpack_rgb(np.ascontiguousarray(raw).view(np.uint32) if raw.dtype.itemsize == 4 else raw)
    confidence = points["confidence"].astype(np.float32) if "confidence" in names else None
    return CloudArrays(xyz, rgb, confidence)


# ------------------------------------------------------------------------------------------------ poses

def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (x, y, z, w), w >= 0."""
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise TransformConversionError(f"rotation must be a finite 3x3 matrix, got shape {m.shape}")
    if np.abs(m.T @ m - np.eye(3)).max() > 1e-3 or np.linalg.det(m) < 0:  # float32 poses keep ~1e-6
        raise TransformConversionError(f"matrix is not a rotation (orthonormal, det +1): {m.tolist()}")
    # Shepperd's method: branch on the largest diagonal term for numerical stability
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 1e-300))
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 1e-300))
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 1e-300))
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def quaternion_to_matrix(q: Any) -> np.ndarray:
    """Quaternion (x, y, z, w) or a geometry_msgs Quaternion -> 3x3 rotation (normalised first)."""
    if hasattr(q, "w"):
        q = (q.x, q.y, q.z, q.w)
    x, y, z, w = (float(v) for v in q)
    norm = np.sqrt(x * x + y * y + z * z + w * w)
    if not np.isfinite(norm) or norm < 1e-9:
        raise TransformConversionError(f"quaternion {(x, y, z, w)} has no rotation (zero or non-finite norm)")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise TransformConversionError(f"pose must be a finite 4x4 matrix, got shape {m.shape}")
    return m


def _fill_pose(pose, m: np.ndarray) -> None:
    """geometry_msgs Pose <- 4x4 matrix."""
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in m[:3, 3])
    q = matrix_to_quaternion(m[:3, :3])
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in q)


def _matrix(translation, rotation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = quaternion_to_matrix(rotation)
    m[:3, 3] = (translation.x, translation.y, translation.z)
    return m


def matrix_to_transform_stamped(matrix: np.ndarray, stamp: Any, parent_frame: str, child_frame: str
                                ) -> TransformStamped:
    """parent_from_child 4x4 -> TransformStamped (header.frame_id = parent, child_frame_id = child)."""
    m = _check_matrix(matrix)
    msg = TransformStamped()
    msg.header = make_header(stamp, parent_frame)
    msg.child_frame_id = child_frame
    t = msg.transform.translation
    t.x, t.y, t.z = (float(v) for v in m[:3, 3])
    r = msg.transform.rotation
    r.x, r.y, r.z, r.w = (float(v) for v in matrix_to_quaternion(m[:3, :3]))
    return msg


def transform_to_matrix(msg: Any) -> np.ndarray:
    """TransformStamped or Transform -> parent_from_child 4x4."""
    transform = getattr(msg, "transform", msg)
    return _matrix(transform.translation, transform.rotation)


def matrix_to_pose_stamped(matrix: np.ndarray, stamp: Any, frame_id: str) -> PoseStamped:
    msg = PoseStamped()
    msg.header = make_header(stamp, frame_id)
    _fill_pose(msg.pose, _check_matrix(matrix))
    return msg


def pose_to_matrix(msg: Any) -> np.ndarray:
    """Pose, PoseStamped, PoseWithCovariance or Odometry -> 4x4."""
    while hasattr(msg, "pose"):
        msg = msg.pose
    return _matrix(msg.position, msg.orientation)


def matrix_to_odometry(matrix: np.ndarray, stamp: Any, frame_id: str, child_frame_id: str,
                       pose_covariance: np.ndarray | None = None, linear: Any = None, angular: Any = None,
                       twist_covariance: np.ndarray | None = None) -> Odometry:
    """frame_from_child 4x4 -> nav_msgs/Odometry; twist (in the child frame) and covariances when given."""
    msg = Odometry()
    if linear is not None:
        msg.twist.twist.linear.x, msg.twist.twist.linear.y, msg.twist.twist.linear.z = (float(v) for v in linear)
    if angular is not None:
        msg.twist.twist.angular.x, msg.twist.twist.angular.y, msg.twist.twist.angular.z = (float(v) for v in angular)
    if twist_covariance is not None:
        tcov = np.asarray(twist_covariance, dtype=np.float64)
        if tcov.shape != (6, 6):
            raise TransformConversionError(f"twist covariance must be 6x6, got {tcov.shape}")
        msg.twist.covariance = tcov.reshape(-1).tolist()
    msg.header = make_header(stamp, frame_id)
    msg.child_frame_id = child_frame_id
    _fill_pose(msg.pose.pose, _check_matrix(matrix))
    if pose_covariance is not None:
        cov = np.asarray(pose_covariance, dtype=np.float64)
        if cov.shape != (6, 6):
            raise TransformConversionError(f"pose covariance must be 6x6, got {cov.shape}")
        msg.pose.covariance = cov.reshape(-1).tolist()
    return msg
