"""Message <-> numpy conversions: exact round trips through CDR, every rejection, and a fuzz pass (issue 8 item 5)."""

from __future__ import annotations

import array

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="the conversions build rclpy message objects")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField  # noqa: E402

from ros2_stream4d.ros import conversions as cv  # noqa: E402
from ros2_stream4d.ros.conversions import ImageConversionError  # noqa: E402

RNG = np.random.default_rng(7)


def cdr_round_trip(msg):
    return deserialize_message(serialize_message(msg), type(msg))


def random_pixels(encoding, height=5, width=7):
    dtype, channels = cv.ENCODINGS[encoding]
    shape = (height, width, channels) if channels > 1 else (height, width)
    if dtype == np.float32:
        return RNG.standard_normal(shape).astype(np.float32)
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


# ------------------------------------------------------------------------------------------------ Image

@pytest.mark.parametrize("encoding", sorted(cv.ENCODINGS))
def test_every_encoding_round_trips_exactly_through_cdr(encoding):
    pixels = random_pixels(encoding)
    msg = cdr_round_trip(cv.numpy_to_image(pixels, encoding, stamp=1_700_000_000_123_456_789, frame_id="cam"))
    assert msg.encoding == encoding and msg.header.frame_id == "cam"
    assert cv.time_to_ns(msg.header.stamp) == 1_700_000_000_123_456_789
    back = cv.image_to_numpy(msg)
    assert back.dtype == pixels.dtype and back.shape == pixels.shape
    np.testing.assert_array_equal(back, pixels)


def handmade_image(encoding, pixels_bytes_rows, width, height, step, bigendian=False):
    msg = Image(encoding=encoding, width=width, height=height, step=step, is_bigendian=int(bigendian))
    msg.data = array.array("B", b"".join(pixels_bytes_rows))
    return msg


def test_padded_big_endian_16uc1_is_read_in_native_order():
    values = np.array([[1, 258, 65535], [4096, 0, 77]], dtype=np.uint16)
    rows = [values[r].astype(">u2").tobytes() + b"\xee\xee\xee" for r in range(2)]  # 3 padding bytes per row
    back = cv.image_to_numpy(handmade_image("16UC1", rows, 3, 2, 9, bigendian=True))
    assert back.dtype == np.dtype(np.uint16) and back.dtype.isnative
    np.testing.assert_array_equal(back, values)


def test_padded_rgb8_rows_drop_the_padding():
    pixels = random_pixels("rgb8", 3, 4)
    rows = [pixels[r].tobytes() + b"\x00" * 4 for r in range(3)]
    np.testing.assert_array_equal(cv.image_to_numpy(handmade_image("rgb8", rows, 4, 3, 16)), pixels)


def test_image_to_rgb_per_encoding():
    rgb = random_pixels("rgb8")
    np.testing.assert_array_equal(cv.image_to_rgb(cv.numpy_to_image(rgb, "rgb8")), rgb)
    np.testing.assert_array_equal(cv.image_to_rgb(cv.numpy_to_image(rgb[:, :, ::-1].copy(), "bgr8")), rgb)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(cv.image_to_rgb(cv.numpy_to_image(rgba, "rgba8")), rgb)
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    np.testing.assert_array_equal(cv.image_to_rgb(cv.numpy_to_image(bgra, "bgra8")), rgb)
    gray = random_pixels("mono8")
    np.testing.assert_array_equal(cv.image_to_rgb(cv.numpy_to_image(gray, "mono8")), np.stack([gray] * 3, axis=2))
    gray16 = np.array([[0, 255, 256, 65535]], np.uint16)
    out16 = cv.image_to_rgb(cv.numpy_to_image(gray16, "mono16"))
    np.testing.assert_array_equal(out16[..., 0], [[0, 0, 1, 255]])
    depth = np.array([[1.0, np.nan, 3.0, np.inf]], np.float32)
    out32 = cv.image_to_rgb(cv.numpy_to_image(depth, "32FC1"))
    np.testing.assert_array_equal(out32[..., 1], [[0, 0, 255, 0]])
    assert out32.shape == (1, 4, 3) and out32.dtype == np.uint8 and out32.flags.c_contiguous


def valid_image():
    return cv.numpy_to_image(random_pixels("rgb8", 4, 6), "rgb8")


@pytest.mark.parametrize("mutate, reason, words", [
    (lambda m: setattr(m, "encoding", "yuv422"), "encoding", "unsupported image encoding 'yuv422'"),
    (lambda m: setattr(m, "encoding", ""), "encoding", "unsupported"),
    (lambda m: setattr(m, "step", 17), "step", r"step 17 < width\*bytes_per_pixel"),
    (lambda m: setattr(m, "data", m.data[:-1]), "data_length", r"data length 71 != step\*height"),
    (lambda m: setattr(m, "height", 5), "data_length", r"!= step\*height"),
    (lambda m: setattr(m, "data", array.array("B")), "empty", "has no data"),
    (lambda m: setattr(m, "width", 0), "size", "has a zero side"),
    (lambda m: setattr(m, "height", 0), "size", "has a zero side"),
    (lambda m: (setattr(m, "width", 10000), setattr(m, "step", 30000)), "size", "exceeds the 8192 px limit"),
])
def test_bad_images_raise_a_specific_error(mutate, reason, words):
    msg = valid_image()
    mutate(msg)
    with pytest.raises(ImageConversionError, match=words) as info:
        cv.image_to_rgb(msg)
    assert info.value.reason == reason and isinstance(info.value, ValueError)


def test_size_limit_is_configurable():
    msg = valid_image()
    with pytest.raises(ImageConversionError, match="exceeds the 5 px limit"):
        cv.image_to_rgb(msg, max_side=5)


def test_array_that_does_not_fit_the_encoding_is_refused():
    with pytest.raises(ImageConversionError, match="does not fit rgb8"):
        cv.numpy_to_image(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ImageConversionError, match="dtype float64"):
        cv.numpy_to_image(np.zeros((4, 4)), "32FC1")


# ------------------------------------------------------------------------------------------------ CompressedImage

def test_png_round_trip_is_exact_and_jpeg_is_close():
    rgb = random_pixels("rgb8", 16, 24)
    png = cdr_round_trip(cv.numpy_to_compressed(rgb, "png", stamp=5, frame_id="cam"))
    assert png.format == "rgb8; png compressed bgr8" and png.header.frame_id == "cam"
    np.testing.assert_array_equal(cv.compressed_to_rgb(png), rgb)
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = np.stack([xx * 5, yy * 7, 255 - xx * 5], axis=2).astype(np.uint8)  # gradients survive jpeg well
    jpeg = cv.numpy_to_compressed(smooth, "jpeg", quality=95)
    assert np.abs(cv.to_rgb(jpeg).astype(int) - smooth).mean() < 3


def test_png16_and_compressed_depth():
    depth_mm = RNG.integers(0, 65535, size=(6, 5)).astype(np.uint16)
    png = cv.numpy_to_compressed(depth_mm, "png", encoding="16UC1")
    np.testing.assert_array_equal(cv.compressed_to_numpy(png), depth_mm)
    depth_msg = CompressedImage(format="16UC1; compressedDepth png")
    depth_msg.data = array.array("B", bytes(12) + bytes(png.data))
    np.testing.assert_array_equal(cv.compressed_to_numpy(depth_msg), depth_mm)
    np.testing.assert_array_equal(cv.compressed_to_rgb(depth_msg)[..., 0], depth_mm >> 8)


@pytest.mark.parametrize("data, fmt, reason", [
    (b"", "jpeg", "empty"),
    (b"\xff\xd8\xff\xe0 definitely not a jpeg", "jpeg", "corrupt"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "png", "corrupt"),
    (bytes(30), "16UC1; compressedDepth png", "corrupt"),
])
def test_corrupt_compressed_images_raise(data, fmt, reason):
    msg = CompressedImage(format=fmt)
    msg.data = array.array("B", data)
    with pytest.raises(ImageConversionError) as info:
        cv.compressed_to_rgb(msg)
    assert info.value.reason == reason


def test_truncated_jpeg_is_refused_or_decoded_but_never_crashes():
    jpeg = bytes(cv.numpy_to_compressed(random_pixels("rgb8", 32, 32), "jpeg").data)
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", jpeg[: len(jpeg) // 3])
    try:
        out = cv.compressed_to_rgb(msg)
    except ImageConversionError as exc:
        assert exc.reason == "corrupt"
    else:
        assert out.shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------------ fuzz

ENCODING_NAMES = st.sampled_from(sorted(cv.ENCODINGS) + ["yuv422", "", "RGB8", "32FC3", "bayer_rggb8"])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(encoding=ENCODING_NAMES, width=st.integers(0, 2**32 - 1) | st.integers(0, 40),
       height=st.integers(0, 2**32 - 1) | st.integers(0, 40), step=st.integers(0, 2**32 - 1) | st.integers(0, 200),
       bigendian=st.integers(0, 255), data=st.binary(max_size=4096))
def test_fuzz_image_to_rgb_returns_an_image_or_raises_the_conversion_error(encoding, width, height, step, bigendian,
                                                                           data):
    msg = Image(encoding=encoding, width=width, height=height, step=step, is_bigendian=bigendian)
    msg.data = array.array("B", data)
    try:
        out = cv.image_to_rgb(msg)
    except ImageConversionError:
        return
    assert out.shape == (height, width, 3) and out.dtype == np.uint8


FUZZ_BASES = {fmt: bytes(cv.numpy_to_compressed(random_pixels("rgb8", 8, 8), fmt).data) for fmt in ("jpeg", "png")}


@st.composite
def mangled_compressed(draw):
    fmt = draw(st.sampled_from(["jpeg", "png"]))
    base = FUZZ_BASES[fmt]
    cut = draw(st.integers(0, len(base)))
    flips = draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=8))
    data = bytearray(base[:cut] if draw(st.booleans()) else base)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    if draw(st.booleans()):
        data = bytearray(draw(st.binary(max_size=512)))
    return fmt + draw(st.sampled_from(["", "; compressedDepth"])), bytes(data)


@FUZZ
@given(case=mangled_compressed())
def test_fuzz_compressed_decoding_returns_an_image_or_raises_the_conversion_error(case):
    fmt, data = case
    msg = CompressedImage(format=fmt)
    msg.data = array.array("B", data)
    try:
        out = cv.compressed_to_rgb(msg)
    except ImageConversionError:
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and out.size > 0


# ------------------------------------------------------------------------------------------------ CameraInfo

def test_camera_info_k_round_trip_and_invalid_k():
    k = np.array([[500.0, 0, 320.5], [0, 510.0, 240.25], [0, 0, 1]])
    info = cdr_round_trip(cv.make_camera_info(k, 640, 480, stamp=42, frame_id="cam"))
    k_back, width, height = cv.camera_info_to_k(info)
    np.testing.assert_array_equal(k_back, k)
    assert (width, height) == (640, 480)
    np.testing.assert_array_equal(np.asarray(info.p).reshape(3, 4)[:, :3], k)
    with pytest.raises(ValueError, match="not a valid calibration"):
        cv.camera_info_to_k(CameraInfo(width=640, height=480))


def test_scaled_camera_info_projects_like_the_resized_crop():
    k = np.array([[500.0, 0, 330.0], [0, 505.0, 245.0], [0, 0, 1]])
    info = cv.make_camera_info(k, 640, 480, stamp=123, frame_id="optical")
    x0, y0, new_w, new_h = 40.0, 16.0, 280, 224  # centred crop 560x448, then halved
    scaled = cv.scaled_camera_info(info, new_w, new_h, offsets=(x0, y0))
    assert scaled.header == info.header and (scaled.width, scaled.height) == (new_w, new_h)
    point = np.array([0.3, -0.2, 2.0])
    u, v, _ = k @ point / point[2]
    s = new_w / (640 - 2 * x0)
    expected = ((u - x0 + 0.5) * s - 0.5, (v - y0 + 0.5) * s - 0.5)
    for matrix in (np.asarray(scaled.k).reshape(3, 3), np.asarray(scaled.p).reshape(3, 4)[:, :3]):
        projected = matrix @ point / point[2]
        np.testing.assert_allclose(projected[:2], expected, atol=1e-9)
    with pytest.raises(ValueError, match="zero side"):
        cv.scaled_camera_info(info, 0, 10)


# ------------------------------------------------------------------------------------------------ PointCloud2

def test_pointcloud2_round_trip_with_colour_and_confidence():
    n = 1000
    xyz = RNG.standard_normal((n, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (n, 3)).astype(np.uint8)
    conf = RNG.random(n).astype(np.float32)
    msg = cdr_round_trip(cv.numpy_to_pointcloud2(xyz, rgb, conf, stamp=9, frame_id="map"))
    assert [f.name for f in msg.fields] == ["x", "y", "z", "rgb", "confidence"]
    assert all(f.datatype == PointField.FLOAT32 for f in msg.fields) and msg.point_step == 20
    assert msg.is_dense and msg.width == n and msg.height == 1 and msg.header.frame_id == "map"
    # RViz reads rgb as the float32 bit pattern of 0x00RRGGBB, little-endian on the wire: B, G, R, 0
    first = bytes(msg.data[12:16])
    assert first == bytes([rgb[0, 2], rgb[0, 1], rgb[0, 0], 0])
    back = cv.pointcloud2_to_numpy(msg)
    np.testing.assert_array_equal(back.xyz, xyz)
    np.testing.assert_array_equal(back.rgb, rgb)
    np.testing.assert_array_equal(back.confidence, conf)


def test_pointcloud2_xyz_only_and_non_finite_marks_not_dense():
    xyz = np.array([[0, 0, 1], [np.nan, 0, 0]], np.float32)
    msg = cv.numpy_to_pointcloud2(xyz)
    assert [f.name for f in msg.fields] == ["x", "y", "z"] and not msg.is_dense
    back = cv.pointcloud2_to_numpy(msg)
    assert back.rgb is None and back.confidence is None
    np.testing.assert_array_equal(back.xyz, xyz)


def test_pointcloud2_reader_handles_foreign_layouts():
    # organised 2x2 cloud, point_step 16 with a padding word, a row padding of 8 bytes, fields out of order
    points = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], np.float32)
    rows = []
    for r in range(2):
        row = b"".join(np.array([p[2], 0, p[0], p[1]], np.float32).tobytes() for p in points[2 * r:2 * r + 2])
        rows.append(row + bytes(8))
    msg = PointCloud2(height=2, width=2, point_step=16, row_step=40, fields=[
        PointField(name="z", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="x", offset=8, datatype=PointField.FLOAT32, count=1),
        PointField(name="y", offset=12, datatype=PointField.FLOAT32, count=1)])
    msg.data = array.array("B", b"".join(rows))
    np.testing.assert_array_equal(cv.pointcloud2_to_numpy(msg).xyz, points)


def test_bad_clouds_raise():
    with pytest.raises(cv.CloudConversionError, match=r"xyz must be \(N, 3\)"):
        cv.numpy_to_pointcloud2(np.zeros((4, 2)))
    with pytest.raises(cv.CloudConversionError, match="rgb must be"):
        cv.numpy_to_pointcloud2(np.zeros((4, 3)), rgb=np.zeros((3, 3), np.uint8))
    msg = cv.numpy_to_pointcloud2(np.zeros((4, 3), np.float32))
    msg.data = msg.data[:-4]
    with pytest.raises(cv.CloudConversionError, match="data length 44"):
        cv.pointcloud2_to_numpy(msg)


# ------------------------------------------------------------------------------------------------ poses, stamps

def random_pose(rng, angle=None):
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-np.pi, np.pi) if angle is None else angle
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew
    m[:3, 3] = rng.standard_normal(3) * 5
    return m


@pytest.mark.parametrize("angle", [None, None, None, 0.0, np.pi, -np.pi + 1e-9, np.pi / 2])
def test_pose_messages_round_trip(angle):
    m = random_pose(np.random.default_rng(11), angle)
    tf = cdr_round_trip(cv.matrix_to_transform_stamped(m, 1_500_000_000_000_000_001, "map", "camera"))
    assert (tf.header.frame_id, tf.child_frame_id) == ("map", "camera")
    assert cv.time_to_ns(tf.header.stamp) == 1_500_000_000_000_000_001
    np.testing.assert_allclose(cv.transform_to_matrix(tf), m, atol=1e-12)
    pose = cdr_round_trip(cv.matrix_to_pose_stamped(m, 5, "map"))
    np.testing.assert_allclose(cv.pose_to_matrix(pose), m, atol=1e-12)
    odom = cdr_round_trip(cv.matrix_to_odometry(m, 5, "odom", "base_link", pose_covariance=np.eye(6) * 0.1))
    assert (odom.header.frame_id, odom.child_frame_id) == ("odom", "base_link")
    np.testing.assert_allclose(cv.pose_to_matrix(odom), m, atol=1e-12)
    assert odom.pose.covariance[0] == pytest.approx(0.1)
    q = cv.matrix_to_quaternion(m[:3, :3])
    assert q[3] >= 0 and np.linalg.norm(q) == pytest.approx(1.0)


def test_bad_poses_raise():
    bad = np.eye(4)
    bad[0, 3] = np.nan
    with pytest.raises(cv.TransformConversionError, match="finite 4x4"):
        cv.matrix_to_transform_stamped(bad, 0, "a", "b")
    with pytest.raises(cv.TransformConversionError, match="not a rotation"):
        cv.matrix_to_quaternion(np.zeros((3, 3)))
    with pytest.raises(cv.TransformConversionError, match="zero or non-finite"):
        cv.quaternion_to_matrix((0, 0, 0, 0))


def test_stamps():
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_987_654_321):
        assert cv.time_to_ns(cv.ns_to_time(ns)) == ns
    assert cv.ns_to_time(1_000_000_001).sec == 1 and cv.ns_to_time(1_000_000_001).nanosec == 1
    with pytest.raises(ValueError, match="negative"):
        cv.ns_to_time(-1)
    with pytest.raises(TypeError, match="cannot use str as a stamp"):
        cv.as_time_msg("now")
