"""The ROS-free codec on both message kinds: rclpy messages and rosbags messages, written through each factory,
read back by the same readers; the two factories must write the same bytes on the wire."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from ros2_stream4d import codec
from ros2_stream4d.codec import CloudConversionError, ImageConversionError, TransformConversionError
from ros2_stream4d.mapping.conventions import make_transform, rotation_from_vector

rclpy = pytest.importorskip("rclpy", reason="the rclpy side needs rclpy")

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from rclpy.time import Time as RclpyTime  # noqa: E402

from ros2_stream4d.ros.conversions import RCLPY  # noqa: E402

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
BAGS = codec.message_factory(TYPESTORE)
FACTORIES = {"rclpy": RCLPY, "rosbags": BAGS}
STAMP = 1_700_000_000_123_456_789
RNG = np.random.default_rng(5)


def wire(msg) -> bytes:
    """CDR bytes of either kind of message."""
    if hasattr(msg, "__msgtype__"):
        return bytes(TYPESTORE.serialize_cdr(msg, msg.__msgtype__))
    return serialize_message(msg)


def as_rosbags(msg):
    """The same message deserialized by rosbags (what a bag reader hands over)."""
    msgtype = msg.__msgtype__ if hasattr(msg, "__msgtype__") else type(msg).__module__.split(".")[0] + "/msg/" + \
        type(msg).__name__
    return TYPESTORE.deserialize_cdr(wire(msg), msgtype)


def as_rclpy(msg, cls):
    """The same message deserialized by rclpy (what a subscription hands over)."""
    return deserialize_message(wire(msg), cls)


def both_kinds(msg, cls):
    """The message as rclpy and as rosbags objects, whichever kind it was written as."""
    return {"rclpy": as_rclpy(msg, cls), "rosbags": as_rosbags(msg)}


def pixels(encoding, height=4, width=6):
    dtype, channels = codec.ENCODINGS[encoding]
    shape = (height, width, channels) if channels > 1 else (height, width)
    if dtype == np.float32:
        return RNG.standard_normal(shape).astype(np.float32)
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


# ------------------------------------------------------------------------------------------------ factories

def test_both_factories_write_identical_bytes_for_every_message_type():
    from geometry_msgs.msg import PoseStamped, TransformStamped
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
    from std_msgs.msg import Header

    T = make_transform(rotation_from_vector([0.3, -1.2, 2.0]), [1.5, -2.0, 0.25])
    K = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    xyz = RNG.standard_normal((50, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (50, 3)).astype(np.uint8)
    image = pixels("rgb8")
    writers = {
        Header: lambda f: codec.header_msg(f, STAMP, "cam"),
        Image: lambda f: codec.image_msg(f, image, "rgb8", STAMP, "cam"),
        CompressedImage: lambda f: codec.compressed_image_msg(f, image, "png", "rgb8", stamp=STAMP,
                                                              frame_id="cam"),
        CameraInfo: lambda f: codec.camera_info_msg(f, K, 640, 480, STAMP, "cam", distortion_model="equidistant",
                                                    d=[0.1, -0.01, 0.002, 0.0]),
        PointCloud2: lambda f: codec.pointcloud2_msg(f, xyz, rgb, np.linspace(1, 2, 50), STAMP, "map"),
        TransformStamped: lambda f: codec.transform_stamped_msg(f, T, STAMP, "map", "camera_link"),
        PoseStamped: lambda f: codec.pose_stamped_msg(f, T, STAMP, "map"),
        Odometry: lambda f: codec.odometry_msg(f, T, STAMP, "odom", "base_link", pose_covariance=np.eye(6) * 0.01,
                                               linear=[1.0, 0.0, 0.5], angular=np.array([0.0, 0.0, 0.2]),
                                               twist_covariance=np.eye(6) * 0.04),
    }
    for cls, write in writers.items():
        made = {name: write(f) for name, f in FACTORIES.items()}
        assert isinstance(made["rclpy"], cls)
        assert made["rosbags"].__msgtype__.endswith("/" + cls.__name__)
        # rclpy leaves CDR alignment padding uninitialised: compare after one pass through rosbags (zero padding)
        assert wire(as_rosbags(made["rclpy"])) == wire(made["rosbags"]), cls.__name__


def test_message_factory_accepts_a_typestore_a_mapping_or_a_callable():
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    by_mapping = codec.message_factory({"std_msgs/msg/Header": Header, "builtin_interfaces/msg/Time": Time})
    assert isinstance(codec.header_msg(by_mapping, 5, "a"), Header)
    assert codec.message_factory(RCLPY) is RCLPY
    assert codec.header_msg(BAGS, 5, "a").__msgtype__ == "std_msgs/msg/Header"
    with pytest.raises(TypeError, match="cannot make messages with int"):
        codec.message_factory(3)


# ------------------------------------------------------------------------------------------------ time

@pytest.mark.parametrize("kind", FACTORIES)
def test_stamps_in_every_form(kind):
    f = FACTORIES[kind]
    t = codec.time_msg(f, STAMP)
    assert (t.sec, t.nanosec) == (STAMP // 10**9, STAMP % 10**9)
    assert codec.time_to_ns(t) == codec.stamp_ns(t) == STAMP
    assert codec.stamp_ns(None) == 0 and codec.stamp_ns(np.int64(7)) == 7
    assert codec.stamp_ns(RclpyTime(nanoseconds=STAMP)) == STAMP
    h = codec.header_msg(f, RclpyTime(nanoseconds=STAMP), "cam")
    assert codec.time_to_ns(h.stamp) == STAMP and h.frame_id == "cam"
    with pytest.raises(ValueError, match="negative"):
        codec.time_msg(f, -1)
    with pytest.raises(TypeError, match="cannot use str as a stamp"):
        codec.stamp_ns("now")


# ------------------------------------------------------------------------------------------------ images

@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("encoding", sorted(codec.ENCODINGS))
def test_images_round_trip_on_both_kinds(kind, encoding):
    from sensor_msgs.msg import Image

    values = pixels(encoding)
    msg = codec.image_msg(FACTORIES[kind], values, encoding, STAMP, "cam")
    for got in both_kinds(msg, Image).values():
        back = codec.image_to_numpy(got)
        assert back.dtype == values.dtype and back.dtype.isnative and back.shape == values.shape
        np.testing.assert_array_equal(back, values)
        assert codec.time_to_ns(got.header.stamp) == STAMP
        assert codec.image_to_rgb(got).shape == values.shape[:2] + (3,)


def handmade_image(kind, encoding, data: bytes, width, height, step, bigendian):
    fields = dict(header=codec.header_msg(FACTORIES[kind], 0, ""), height=height, width=width, encoding=encoding,
                  is_bigendian=int(bigendian), step=step, data=np.frombuffer(data, np.uint8).copy())
    return FACTORIES[kind]("sensor_msgs/msg/Image", **fields)


@pytest.mark.parametrize("kind", FACTORIES)
def test_padded_big_endian_rows_and_bgr_read_alike(kind):
    values = np.array([[1, 258, 65535], [4096, 0, 77]], np.uint16)
    rows = b"".join(values[r].astype(">u2").tobytes() + b"\xee\xee" for r in range(2))
    back = codec.image_to_numpy(handmade_image(kind, "16UC1", rows, 3, 2, 8, True))
    assert back.dtype == np.uint16 and back.dtype.isnative
    np.testing.assert_array_equal(back, values)
    bgr = np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8)
    msg = handmade_image(kind, "bgr8", bgr.tobytes() + b"\x00", 2, 1, 7, False)
    np.testing.assert_array_equal(codec.image_to_rgb(msg), bgr[:, :, ::-1])
    np.testing.assert_array_equal(codec.to_rgb(msg), bgr[:, :, ::-1])


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("fields, reason, words", [
    (dict(encoding="yuv422"), "encoding", "unsupported image encoding"),
    (dict(width=0), "size", "zero side"),
    (dict(step=5), "step", "step 5 <"),
    (dict(data=bytes(30)), "data_length", "data length 30"),
    (dict(data=b""), "empty", "no data"),
])
def test_bad_images_raise_the_same_reason_on_both_kinds(kind, fields, reason, words):
    base = dict(encoding="rgb8", data=bytes(36), width=4, height=3, step=12, bigendian=False)
    base.update(fields)
    msg = handmade_image(kind, base["encoding"], base["data"], base["width"], base["height"], base["step"],
                         base["bigendian"])
    with pytest.raises(ImageConversionError, match=words) as info:
        codec.image_to_numpy(msg)
    assert info.value.reason == reason


def test_writing_refuses_arrays_that_do_not_fit():
    with pytest.raises(ImageConversionError, match="does not fit rgb8") as info:
        codec.image_msg(BAGS, np.zeros((2, 2), np.uint8), "rgb8")
    assert info.value.reason == "array"
    with pytest.raises(ImageConversionError, match="dtype float64"):
        codec.image_msg(BAGS, np.zeros((2, 2)), "32FC1")


@pytest.mark.parametrize("kind", FACTORIES)
def test_compressed_images_on_both_kinds(kind):
    from sensor_msgs.msg import CompressedImage

    rgb = pixels("rgb8", 8, 10)
    msg = codec.compressed_image_msg(FACTORIES[kind], rgb, "png", "rgb8", stamp=STAMP, frame_id="cam")
    assert msg.format == "rgb8; png compressed bgr8"
    for got in both_kinds(msg, CompressedImage).values():
        assert codec.is_compressed(got)
        np.testing.assert_array_equal(codec.to_rgb(got), rgb)
    depth = RNG.integers(0, 65535, (8, 10)).astype(np.uint16)
    png16 = codec.compressed_image_msg(FACTORIES[kind], depth, "png", "16UC1")
    np.testing.assert_array_equal(codec.compressed_to_numpy(as_rosbags(png16)), depth)
    broken = FACTORIES[kind]("sensor_msgs/msg/CompressedImage", header=codec.header_msg(FACTORIES[kind]),
                             format="jpeg", data=np.frombuffer(b"not a jpeg", np.uint8).copy())
    with pytest.raises(ImageConversionError) as info:
        codec.to_rgb(broken)
    assert info.value.reason == "corrupt"


# ------------------------------------------------------------------------------------------------ CameraInfo

@pytest.mark.parametrize("kind", FACTORIES)
def test_camera_info_on_both_kinds(kind):
    from sensor_msgs.msg import CameraInfo

    K = np.array([[400.0, 0, 160], [0, 410, 120], [0, 0, 1]])
    msg = codec.camera_info_msg(FACTORIES[kind], K, 320, 240, STAMP, "cam")
    for got in both_kinds(msg, CameraInfo).values():
        k, w, h = codec.camera_info_to_k(got)
        np.testing.assert_array_equal(k, K)
        assert (w, h) == (320, 240) and got.distortion_model == "plumb_bob" and list(got.d) == [0.0] * 5
        np.testing.assert_array_equal(np.asarray(got.p).reshape(3, 4)[:, :3], K)
        half = codec.scaled_camera_info(FACTORIES[kind], got, 160, 120)
        assert (half.width, half.height) == (160, 120) and half.header.frame_id == "cam"
        # pixel centres: u' + 0.5 = (u + 0.5) / 2
        np.testing.assert_allclose(codec.camera_info_to_k(half)[0], [[200, 0, 79.75], [0, 205, 59.75], [0, 0, 1]])
    with pytest.raises(ValueError, match="not a valid calibration"):
        codec.camera_info_to_k(codec.camera_info_msg(FACTORIES[kind], np.diag([0.0, 0.0, 1.0]), 320, 240))
    with pytest.raises(ValueError, match="finite 3x3"):
        codec.camera_info_msg(FACTORIES[kind], np.eye(2), 320, 240)


# ------------------------------------------------------------------------------------------------ PointCloud2

@pytest.mark.parametrize("kind", FACTORIES)
def test_pointcloud2_on_both_kinds(kind):
    from sensor_msgs.msg import PointCloud2

    n = 200
    xyz = RNG.standard_normal((n, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (n, 3)).astype(np.uint8)
    conf = RNG.random(n).astype(np.float32)
    msg = codec.pointcloud2_msg(FACTORIES[kind], xyz, rgb, conf, STAMP, "map")
    for got in both_kinds(msg, PointCloud2).values():
        arrays = codec.pointcloud2_to_numpy(got)
        np.testing.assert_array_equal(arrays.xyz, xyz)
        np.testing.assert_array_equal(arrays.rgb, rgb)
        np.testing.assert_array_equal(arrays.confidence, conf)
        by_name = codec.pointcloud2_to_arrays(got)
        assert sorted(by_name) == ["confidence", "rgb", "xyz"]
        np.testing.assert_array_equal(by_name["rgb"], rgb)
        assert got.is_dense and got.header.frame_id == "map"


@pytest.mark.parametrize("kind", FACTORIES)
def test_an_empty_coloured_cloud_is_a_valid_message(kind):
    """A map whose every point was filtered out is published as an empty cloud (it once killed the node)."""
    from sensor_msgs.msg import PointCloud2

    msg = codec.pointcloud2_msg(FACTORIES[kind], np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                                np.zeros(0, np.float32), STAMP, "map")
    for got in both_kinds(msg, PointCloud2).values():
        assert got.width == 0 and len(got.data) == 0 and got.point_step == 20  # x y z rgb confidence
        arrays = codec.pointcloud2_to_numpy(got)
        assert arrays.xyz.shape == (0, 3) and arrays.rgb.shape == (0, 3)


@pytest.mark.parametrize("kind", FACTORIES)
def test_pointcloud2_foreign_layout_reads_alike(kind):
    """An organised big-endian cloud with a uint16 ring field, a 3-float normal (count 3), point and row padding."""
    f = FACTORIES[kind]
    dtype = np.dtype({"names": ["x", "y", "z", "ring", "normal"], "formats": [">f4", ">f4", ">f4", ">u2", (">f4", 3)],
                      "offsets": [0, 4, 8, 12, 16], "itemsize": 32})
    pts = np.zeros((2, 2), dtype)
    pts["x"], pts["y"], pts["z"] = [[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 10], [11, 12]]
    pts["ring"] = [[0, 1], [2, 65535]]
    pts["normal"] = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    data = b"".join(pts[r].tobytes() + bytes(4) for r in range(2))  # row_step 68
    fields = [f("sensor_msgs/msg/PointField", name=name, offset=off, datatype=dt, count=count)
              for name, off, dt, count in (("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("ring", 12, 4, 1),
                                           ("normal", 16, 7, 3))]
    msg = f("sensor_msgs/msg/PointCloud2", header=codec.header_msg(f), height=2, width=2, fields=fields,
            is_bigendian=True, point_step=32, row_step=68, data=np.frombuffer(data, np.uint8).copy(), is_dense=True)
    arrays = codec.pointcloud2_to_arrays(msg)
    np.testing.assert_array_equal(arrays["xyz"], [[1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8, 12]])
    assert arrays["ring"].dtype == np.uint16 and arrays["ring"].dtype.isnative
    np.testing.assert_array_equal(arrays["ring"], [0, 1, 2, 65535])
    assert arrays["normal"].shape == (4, 3) and arrays["normal"].dtype.isnative
    np.testing.assert_array_equal(arrays["normal"], np.arange(12).reshape(4, 3))
    plain = codec.pointcloud2_to_numpy(msg)
    assert plain.rgb is None and plain.confidence is None


def test_bad_clouds_raise():
    with pytest.raises(CloudConversionError, match=r"xyz must be \(N, 3\)"):
        codec.pointcloud2_msg(BAGS, np.zeros((4, 2)))
    with pytest.raises(CloudConversionError, match="confidence must be"):
        codec.pointcloud2_msg(BAGS, np.zeros((4, 3)), confidence=np.zeros(3))
    msg = codec.pointcloud2_msg(BAGS, np.zeros((4, 3), np.float32))
    msg.data = msg.data[:-4]
    with pytest.raises(CloudConversionError, match="data length 44"):
        codec.pointcloud2_to_numpy(msg)
    msg = codec.pointcloud2_msg(BAGS, np.zeros((4, 3), np.float32))
    msg.fields[1].datatype = 42
    with pytest.raises(CloudConversionError, match="unknown datatype 42"):
        codec.pointcloud2_to_arrays(msg)


# ------------------------------------------------------------------------------------------------ poses

@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("angle", [0.0, 1e-7, 1.0, np.pi - 1e-6, np.pi])
def test_pose_messages_round_trip_on_both_kinds(kind, angle):
    from geometry_msgs.msg import PoseStamped, TransformStamped
    from nav_msgs.msg import Odometry

    f = FACTORIES[kind]
    axis = np.array([0.2, -0.5, 0.8]) / np.linalg.norm([0.2, -0.5, 0.8])
    T = make_transform(rotation_from_vector(axis * angle), [3.0, -1.0, 0.5])
    tf = both_kinds(codec.transform_stamped_msg(f, T, STAMP, "map", "camera_link"), TransformStamped)
    pose = both_kinds(codec.pose_stamped_msg(f, T, STAMP, "map"), PoseStamped)
    odom = both_kinds(codec.odometry_msg(f, T, STAMP, "odom", "base_link", pose_covariance=np.eye(6) * 0.1,
                                         linear=(1.0, 2.0, 3.0)), Odometry)
    for name in FACTORIES:
        assert (tf[name].header.frame_id, tf[name].child_frame_id) == ("map", "camera_link")
        np.testing.assert_allclose(codec.transform_to_matrix(tf[name]), T, atol=1e-12)
        np.testing.assert_allclose(codec.transform_to_matrix(tf[name].transform), T, atol=1e-12)
        np.testing.assert_allclose(codec.pose_to_matrix(pose[name]), T, atol=1e-12)
        np.testing.assert_allclose(codec.pose_to_matrix(pose[name].pose), T, atol=1e-12)
        np.testing.assert_allclose(codec.pose_to_matrix(odom[name]), T, atol=1e-12)
        assert odom[name].child_frame_id == "base_link" and odom[name].pose.covariance[7] == pytest.approx(0.1)
        assert odom[name].twist.twist.linear.z == 3.0 and odom[name].twist.twist.angular.z == 0.0
        assert odom[name].pose.pose.orientation.w >= 0


def test_bad_poses_raise():
    bad = np.eye(4)
    bad[1, 3] = np.inf
    with pytest.raises(TransformConversionError, match="finite 4x4"):
        codec.pose_stamped_msg(BAGS, bad, 0, "map")
    with pytest.raises(TransformConversionError, match="not a rotation"):
        codec.matrix_to_quaternion(np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(TransformConversionError, match="zero or non-finite"):
        codec.quaternion_to_matrix((0, 0, 0, 0))
    with pytest.raises(TransformConversionError, match="pose covariance must be 6x6"):
        codec.odometry_msg(BAGS, np.eye(4), 0, "odom", "base_link", pose_covariance=np.eye(3))


def test_the_codec_imports_no_ros():
    code = ("import sys, ros2_stream4d.codec, ros2_stream4d.sim.bag, ros2_stream4d.eval.bagio; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('rclpy', 'sensor_msgs', 'geometry_msgs', 'std_msgs', 'nav_msgs', 'builtin_interfaces')); "
            "print(bad); sys.exit(bool(bad))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
