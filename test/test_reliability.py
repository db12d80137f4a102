"""Reliability: bad input over real DDS, device out-of-memory, corrupt checkpoints, map saves under signals, paths.

Every bad input must be skipped with a specific, rate-limited warning, counted in /diagnostics as
"bad input: <reason>", and the node must go on processing good frames. BAD_INPUTS_TRIED counts what these tests send.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import struct
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ros_harness import MessageCollector, python_command, wait_for_subscribers, wait_until
from test_node import H, W, deliver, make_image, make_info, node_command, publisher_pair, start_node

from ros2_stream4d.ros.conversions import ns_to_time, numpy_to_compressed, numpy_to_image, time_to_ns
from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings, compressed_image_size

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers

def diag_values(collector) -> dict[str, str]:
    values: dict[str, str] = {}
    for m in collector.messages:
        for s in m.status:
            values.update({kv.key: kv.value for kv in s.values})
    return values


def bad_count(collector, reason: str) -> int:
    return int(diag_values(collector).get(f"bad input: {reason}", 0))


def wait_counted(ros_node, diag, expected: dict[str, int], timeout: float = 30.0) -> None:
    wait_until(lambda: all(bad_count(diag, r) >= n for r, n in expected.items()), timeout, ros_node,
               f"bad-input counters {expected} (have { {r: bad_count(diag, r) for r in expected} })")


def until_counted(ros_node, diag, reason: str, send, timeout: float = 60.0) -> int:
    """Call send(i) (a fresh attempt) until the node has counted `reason`; returns the attempts made. For inputs
    on two topics (CameraInfo + image, depth + image) whose relative arrival order DDS does not guarantee."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while bad_count(diag, reason) < 1:
        send(attempt)
        attempt += 1
        try:
            wait_until(lambda: bad_count(diag, reason) >= 1, 3.0, ros_node, reason)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    return attempt


class ListLogger:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, msg):
        self.lines.append(("info", msg))

    def warning(self, msg):
        self.lines.append(("warning", msg))

    def error(self, msg):
        self.lines.append(("error", msg))


# ------------------------------------------------------------------------------------------------ bad input, raw images (DDS)

@pytest.mark.ros
def test_bad_images_stamps_camera_info_and_depth_are_skipped_counted_and_survived(ros_node, ros_process, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    missing_dir_map = tmp_path / "no_such_dir" / "map.ply"
    node = start_node(ros_process, "input_qos:=reliable", "intrinsics_source:=camera_info", "scale_source:=depth",
                      "reset_on_time_jump:=false", "max_image_side:=512",
                      f"map_save_path:={missing_dir_map}")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    diag = MessageCollector(ros_node, DiagnosticArray, "/diagnostics")
    image_pub, info_pub = publisher_pair(ros_node)
    depth_pub = ros_node.create_publisher(Image, "/camera/depth", QoSProfile(depth=100,
                                                                            reliability=ReliabilityPolicy.RELIABLE))
    wait_for_subscribers(ros_node, depth_pub, timeout=20)
    tried = 0

    s0 = 10_000_000_000
    deliver(ros_node, image_pub, make_image(0, s0), pose, 1, info_pub=info_pub)  # the node is listening now

    # --- images: each refused before the model, for its own reason
    oversize = numpy_to_image(np.zeros((20, 600, 3), np.uint8), "rgb8", stamp=ns_to_time(s0 + 1),
                              frame_id="camera_optical_frame")  # a real 600 px wide image, over max_image_side=512
    huge_header = make_image(1, s0 + 2)  # claims 10000x10000 with 33 kB of data: refused from the header alone
    huge_header.width = huge_header.height = 10000
    huge_header.step = 30000
    one_px = numpy_to_image(np.zeros((1, 1, 3), np.uint8), "rgb8", stamp=ns_to_time(s0 + 3))
    weird = make_image(1, s0 + 4)
    weird.encoding = "yuv422_weird"
    truncated = make_image(1, s0 + 5)
    truncated.data = truncated.data[:100]
    empty = make_image(1, s0 + 6)
    empty.data = []
    bad_step = make_image(1, s0 + 7)
    bad_step.step = 7
    zero = make_image(1, s0 + 8)
    zero.width = zero.height = 0
    zero_stamp = make_image(1, 0)
    other_size = numpy_to_image(np.full((42, 56, 3), 128, np.uint8), "rgb8", stamp=ns_to_time(s0 + 9),
                                frame_id="camera_optical_frame")  # valid, but not this stream's 112x84
    older = make_image(2, s0 - 1_000_000_000)  # decreasing stamp, reset_on_time_jump:=false
    duplicate = make_image(2, s0)
    expected = {"image size": 3, "image too small": 1, "image encoding": 1, "image data_length": 1,
                "image empty": 1, "image step": 1, "zero stamp": 1, "image size changed": 1, "decreasing stamp": 1,
                "duplicate stamp": 1}
    for msg in (oversize, huge_header, one_px, weird, truncated, empty, bad_step, zero, zero_stamp, other_size,
                older, duplicate):
        image_pub.publish(msg)
        tried += 1
    wait_counted(ros_node, diag, expected)
    deliver(ros_node, image_pub, make_image(3, s0 + 100_000_000), pose, 2, info_pub=info_pub)

    # --- CameraInfo that disagrees with the image, or has a zero K: with intrinsics_source=camera_info the frame
    # cannot be processed correctly and is skipped
    def send_with_info(info, base):
        def send(i):
            info_pub.publish(info)
            image_pub.publish(make_image(4, base + i * 1000))
        return send

    wrong_size = make_info(0)
    wrong_size.width, wrong_size.height = 640, 480
    zero_k = make_info(0)
    zero_k.k = [0.0] * 9
    tried += until_counted(ros_node, diag, "camera_info size mismatch", send_with_info(wrong_size, s0 + 200_000_000))
    tried += until_counted(ros_node, diag, "camera_info invalid", send_with_info(zero_k, s0 + 300_000_000))
    n = len(pose.messages)
    deliver(ros_node, image_pub, make_image(5, s0 + 400_000_000), pose, n + 1, info_pub=info_pub)

    # --- depth input (scale_source=depth): unusable depth images are skipped at reception
    def depth_msg(arr, encoding="32FC1"):
        return numpy_to_image(arr, encoding, stamp=ns_to_time(s0 + 450_000_000), frame_id="camera_optical_frame")

    all_nan = depth_msg(np.full((H, W), np.nan, np.float32))
    all_inf = depth_msg(np.full((H, W), np.inf, np.float32))
    mixed_non_finite = np.full((H, W), np.nan, np.float32)
    mixed_non_finite[::2] = np.inf
    mixed_non_finite[1::4] = -np.inf
    colour_depth = depth_msg(np.zeros((H, W, 3), np.uint8), "rgb8")
    cut_depth = depth_msg(np.ones((H, W), np.float32))
    cut_depth.data = cut_depth.data[:64]
    for msg in (all_nan, all_inf, depth_msg(mixed_non_finite), colour_depth, cut_depth):
        depth_pub.publish(msg)
        tried += 1
    wait_counted(ros_node, diag, {"depth no finite value": 3, "depth encoding": 1, "depth data_length": 1})

    def send_small_depth(i):
        depth_pub.publish(depth_msg(np.full((20, 20), 2.0, np.float32)))
        info_pub.publish(make_info(0))
        image_pub.publish(make_image(6, s0 + 500_000_000 + i * 1000))
    tried += until_counted(ros_node, diag, "depth size mismatch", send_small_depth)

    # REP-118: NaN / +-Inf pixels in an otherwise good depth image mean "no measurement": masked, not fatal
    partly = np.full((H, W), 2.0, np.float32)
    partly[:10] = np.nan
    partly[10:20] = np.inf
    partly[20:25] = -np.inf
    partly[25:30] = -1.0
    depth_pub.publish(depth_msg(partly))
    tried += 1
    wait_until(lambda: int(diag_values(diag).get("depth invalid pixels", 0)) >= 30 * W, 30, ros_node,
               "the partly invalid depth image")
    n = len(pose.messages)
    deliver(ros_node, image_pub, make_image(7, s0 + 600_000_000), pose, n + 1, info_pub=info_pub)
    wait_until(lambda: diag_values(diag).get("scale valid") == "True", 30, ros_node, "a valid depth scale")
    assert np.isfinite(float(diag_values(diag)["scale"])) and float(diag_values(diag)["scale"]) > 0

    # --- ~/save_map to a directory that does not exist: a clear failure, the node keeps running
    save = ros_node.create_client(Trigger, "/stream4d/save_map")
    assert save.wait_for_service(timeout_sec=20)
    future = save.call_async(Trigger.Request())
    wait_until(future.done, 30, ros_node, "save_map")
    assert not future.result().success
    assert "does not exist" in future.result().message and "no_such_dir" in future.result().message
    assert not missing_dir_map.parent.exists(), "a configured map directory is never created"

    # --- still alive and processing, nothing crashed, every stamp published once and in order
    n = len(pose.messages)
    deliver(ros_node, image_pub, make_image(8, s0 + 700_000_000), pose, n + 1, info_pub=info_pub)
    assert node.poll() is None
    stamps = [time_to_ns(m.header.stamp) for m in pose.messages]
    assert stamps == sorted(set(stamps)), "no duplicate or older frame may reach the outputs"
    assert s0 - 1_000_000_000 not in stamps
    out = node.output()
    for reason in (*expected, "camera_info size mismatch", "camera_info invalid", "depth no finite value",
                   "depth encoding", "depth data_length", "depth size mismatch"):
        assert f"{reason}:" in out, f"no warning logged for {reason!r}"
    assert "processing failed" not in out and "Traceback" not in out
    print(f"BAD_INPUTS_TRIED raw/camera_info/depth: {tried}")


# ------------------------------------------------------------------------------------------------ bad input, compressed (DDS)

def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    i = 2
    while i < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xC2:
            return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]
        i += 2 + length
    raise AssertionError("no SOF marker")


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    return data[:16] + struct.pack(">II", width, height) + data[24:]


@pytest.mark.ros
def test_corrupt_and_absurd_compressed_images_are_skipped(ros_node, ros_process):
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    node = start_node(ros_process, "image_transport:=compressed", "input_qos:=reliable", "max_image_side:=512")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    diag = MessageCollector(ros_node, DiagnosticArray, "/diagnostics")
    pub = ros_node.create_publisher(CompressedImage, "/camera/image_raw/compressed",
                                    QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    wait_for_subscribers(ros_node, pub, timeout=20)

    def compressed(i, stamp, fmt="jpeg", rgb=None):
        if rgb is None:
            from ros2_stream4d.ros.conversions import image_to_rgb

            rgb = image_to_rgb(make_image(i, stamp))
        return numpy_to_compressed(rgb, fmt, stamp=ns_to_time(stamp), frame_id="camera_optical_frame")

    def with_data(stamp, data, fmt="rgb8; jpeg compressed bgr8"):
        msg = CompressedImage(format=fmt, data=list(data))
        msg.header.stamp = ns_to_time(stamp)
        return msg

    s0 = 20_000_000_000
    deliver(ros_node, pub, compressed(0, s0), pose, 1)
    jpeg = bytes(compressed(1, s0).data)
    png = bytes(compressed(1, s0, "png").data)
    rng = np.random.default_rng(0)
    bad = [
        with_data(s0 + 1, rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()),  # random bytes
        with_data(s0 + 2, jpeg[: len(jpeg) // 2]),  # truncated JPEG
        with_data(s0 + 3, jpeg[:300]),  # only the headers
        with_data(s0 + 4, b"\xff\xd8" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()),  # JPEG magic + junk
        with_data(s0 + 5, b""),  # empty
        with_data(s0 + 6, _patch_jpeg_size(jpeg, 10000, 10000)),  # JPEG header claims 10000x10000
        with_data(s0 + 7, _patch_png_size(png, 10000, 10000), "rgb8; png compressed bgr8"),  # PNG likewise
        compressed(0, s0 + 8, rgb=np.zeros((20, 600, 3), np.uint8)),  # a real JPEG over max_image_side
        compressed(0, s0 + 9, "png", rgb=np.zeros((1, 1, 3), np.uint8)),  # 1x1
        with_data(s0 + 10, rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "bmp"),  # unknown format
    ]
    for msg in bad:
        pub.publish(msg)
    wait_counted(ros_node, diag, {"image corrupt": 5, "image empty": 1, "image size": 3, "image too small": 1})
    deliver(ros_node, pub, compressed(2, s0 + 100_000_000), pose, 2)
    assert node.poll() is None
    out = node.output()
    assert "not decoded" in out, "the 10000x10000 headers must be refused before decoding"
    assert "processing failed" not in out and "Traceback" not in out
    print(f"BAD_INPUTS_TRIED compressed: {len(bad)}")


# ------------------------------------------------------------------------------------------------ units

def test_warnings_are_rate_limited_but_all_counted():
    log = ListLogger()
    w = RateLimitedWarnings(log, period_s=60.0)
    for _ in range(100):
        w.warn("image corrupt", "x")
    w.warn("zero stamp", "y")
    assert w.counts == {"image corrupt": 100, "zero stamp": 1}
    assert [m for _, m in log.lines if m.startswith("image corrupt")] == [
        "image corrupt: x (frame skipped; 1 so far)"]
    assert len(log.lines) == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"\xff\xd8" + b),
                 st.binary(max_size=300).map(lambda b: b"\xff\xd8\xff\xc0" + b),
                 st.binary(max_size=300).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
                 st.binary(max_size=300).map(lambda b: bytes(12) + b"\x89PNG\r\n\x1a\n" + b)))
def test_compressed_header_peek_never_raises(data):
    size = compressed_image_size(data)
    assert size is None or (len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size))
    assert compressed_image_size(list(data)) == size  # the message field may be a list or an array


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.sampled_from(["jpeg", "png"]), st.sampled_from(["rgb8", "mono8"]))
def test_compressed_header_peek_matches_the_decoder(w, h, fmt, encoding):
    from ros2_stream4d.ros.conversions import compressed_to_numpy

    arr = np.random.default_rng(w * h).integers(0, 256, (h, w, 3) if encoding == "rgb8" else (h, w), dtype=np.uint8)
    msg = numpy_to_compressed(arr, fmt, encoding)
    decoded = compressed_to_numpy(msg)
    assert compressed_image_size(msg.data) == (decoded.shape[1], decoded.shape[0]) == (w, h)


def test_depth_inputs_mask_non_finite_and_skip_unusable():
    from ros2_stream4d.ros.config import make_config

    log = ListLogger()
    proc = FrameProcessor(make_config({}), pipeline=None, tf=None, warnings=RateLimitedWarnings(log), logger=log)
    d = np.full((8, 8), 1.5, np.float32)
    d[0] = np.nan
    d[1] = np.inf
    d[2] = -np.inf
    proc.set_sensor_depth(numpy_to_image(d, "32FC1", stamp=1))
    assert proc.depth_invalid_pixels == 24 and np.isnan(proc.sensor_depth[:3]).all()
    assert np.isfinite(proc.sensor_depth[3:]).all() and not np.isinf(proc.sensor_depth).any()
    mm = np.full((8, 8), 1500, np.uint16)
    mm[0] = 0
    proc.set_sensor_depth(numpy_to_image(mm, "16UC1", stamp=1))
    assert np.allclose(proc.sensor_depth[1:], 1.5) and np.isnan(proc.sensor_depth[0]).all()
    kept = proc.sensor_depth
    proc.set_sensor_depth(numpy_to_image(np.full((8, 8), np.nan, np.float32), "32FC1", stamp=1))
    assert proc.sensor_depth is kept and proc.warnings.counts == {"depth no finite value": 1}


# ------------------------------------------------------------------------------------------------ out of memory

class OutOfMemoryOnce:
    """Wraps a session; its next step raises the allocator's out-of-memory error once. INJECTED: no real
    out-of-memory can be produced safely on a shared test machine, so the error a device raises is simulated."""

    def __init__(self, inner, error: BaseException):
        self.inner, self.error, self.raised = inner, error, 0

    def step(self, image, stamp_ns=None, mapping=None):
        if self.error is not None:
            error, self.error = self.error, None
            self.raised += 1
            raise error
        return self.inner.step(image, stamp_ns, mapping)

    def reset(self):
        self.inner.reset()

    @property
    def window(self):
        return self.inner.window

    @property
    def anchors(self):
        return self.inner.anchors

    @property
    def frames_seen(self):
        return self.inner.frames_seen

    def stats(self):
        return self.inner.stats()

    def shrunk(self, window):
        return self.inner.shrunk(window)


def _small_params(**over):
    from ros2_stream4d.ros.config import make_config

    return make_config({"model": "random-small", "device": "cpu", "input_width": 56, "window": 8,
                        "process_every_frame": True, **over})


def build_pipeline(cfg):
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.ros.config import as_dict

    return load_pipeline(ModelOptions.from_config(cfg), PipelineConfig.from_params(as_dict(cfg)))


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate "
                 "123456789 bytes. CPU out of memory (injected)"),
    "cuda",
])
def test_out_of_memory_in_a_step_halves_the_window_and_continues(error):
    import torch

    from ros2_stream4d.mapping.pipeline import is_out_of_memory
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer

    if error == "cuda":
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    assert is_out_of_memory(error) and not is_out_of_memory(RuntimeError("shape mismatch"))
    params = _small_params()
    pipeline = build_pipeline(params)
    log = ListLogger()
    proc = FrameProcessor(params, pipeline, TfBuffer(), RateLimitedWarnings(log), log)
    for i in range(5):
        msg = make_image(i, 1_000_000_000 + i)
        assert proc.process(0, 1_000_000_000 + i, "cam", proc.decode(msg)).messages
    assert pipeline.window() == 8 and pipeline.map_size() > 0
    model = pipeline.reconstructor.session.model
    wrapper = OutOfMemoryOnce(pipeline.reconstructor.session, error)
    pipeline.reconstructor.session = wrapper

    out = proc.process(0, 2_000_000_000, "cam", proc.decode(make_image(9, 2_000_000_000))).messages
    assert wrapper.raised == 1
    assert out, "the frame that hit the error is retried in the new stream and published"
    assert proc.oom_recoveries == 1 and pipeline.window() == 4
    assert pipeline.reconstructor.session is not wrapper and pipeline.reconstructor.session.model is model
    assert len(proc.path.poses) == 1, "a new stream (and path) starts with the retried frame"
    assert any("out of memory at window 8" in m and "window 4" in m for _, m in log.lines)
    for i in range(6):  # keeps going; the cache now holds anchor + 4 frames at most
        stamp = 2_000_000_001 + i
        assert proc.process(0, stamp, "cam", proc.decode(make_image(10 + i, stamp))).messages
    stats = pipeline.stats()
    assert stats["cache capacity"] == 5 and stats["cache frames held"] == 5


def test_out_of_memory_at_window_one_skips_the_frame_and_goes_on():
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer

    params = _small_params(window=1)
    pipeline = build_pipeline(params)
    log = ListLogger()
    proc = FrameProcessor(params, pipeline, TfBuffer(), RateLimitedWarnings(log), log)
    assert proc.process(0, 1, "cam", proc.decode(make_image(0, 1))).messages
    pipeline.reconstructor.session = OutOfMemoryOnce(pipeline.reconstructor.session,
                                                     RuntimeError("out of memory (injected)"))
    assert proc.process(0, 2, "cam", proc.decode(make_image(1, 2))).messages == []
    assert proc.warnings.counts == {"out of memory": 1} and proc.oom_recoveries == 0
    assert proc.process(0, 3, "cam", proc.decode(make_image(2, 3))).messages, "the next frame is processed"


@pytest.mark.ros
def test_node_reports_out_of_memory_recovery_in_diagnostics():
    """The node's worker thread meets the (injected) error; diagnostics report the recovery and the new window."""
    import rclpy
    from rclpy.parameter import Parameter

    from ros2_stream4d.ros.node import Stream4DNode

    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter("model", value="random-small"), Parameter("input_width", value=56),
                 Parameter("window", value=8), Parameter("process_every_frame", value=True),
                 Parameter("autostart", value=False)]
    node = Stream4DNode(context=context, parameter_overrides=overrides)
    node.trigger_configure()
    node.trigger_activate()  # the inputs are fed directly below, not over DDS
    try:
        node._on_image(0, make_image(0, 1_000_000_000))
        wait_until(lambda: node.processor.frames_done >= 1, 60, None, "first frame")
        node.pipeline.reconstructor.session = OutOfMemoryOnce(node.pipeline.reconstructor.session,
                                                              RuntimeError("CPU out of memory (injected)"))
        node._on_image(0, make_image(1, 1_100_000_000))
        node._on_image(0, make_image(2, 1_200_000_000))
        wait_until(lambda: node.processor.frames_done >= 3, 60, None, "frames after the error")
        values = node.diagnostic_values()
        assert values["oom recoveries"] == 1 and values["window"] == 4
        assert values["cache capacity"] == 5
        assert node.last_error == ""
    finally:
        node.shutdown()
        node.destroy_node()
        context.try_shutdown()


@pytest.mark.ros
def test_a_product_that_fails_to_publish_is_reported_and_the_node_goes_on(tmp_path):
    """An exception while building ~/map (a bug like the empty coloured cloud that once ended the node) is logged,
    counted in diagnostics and shown as the last error; the next map publish works again. A map whose background
    rebuild failed: ~/save_map answers with the reason and diagnostics warn (the node goes on)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticStatus
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    from ros2_stream4d.mapping.keyframe_map import MapRebuildError
    from ros2_stream4d.ros.node import Stream4DNode

    context = rclpy.Context()
    rclpy.init(context=context)
    overrides = [Parameter("model", value="random-small"), Parameter("input_width", value=56),
                 Parameter("window", value=8), Parameter("process_every_frame", value=True),
                 Parameter("map_cloud_surface_voxels", value=0.0), Parameter("autostart", value=False),
                 Parameter("map_save_path", value=str(tmp_path / "map"))]
    node = Stream4DNode(context=context, parameter_overrides=overrides)
    node.trigger_configure()
    node.trigger_activate()
    try:
        node._on_image(0, make_image(0, 1_000_000_000))
        wait_until(lambda: node.processor.frames_done >= 1 and node.pipeline.map_size() > 0, 60, None, "a map")
        sent = []
        real_publish = node._own_pubs["map"].publish
        node._own_pubs["map"].publish = lambda msg: sent.append(msg) or real_publish(msg)
        real = node.processor.assembler.map_message

        def broken(*a, **k):
            raise ValueError("injected")

        node.processor.assembler.map_message = broken
        node._own_timers["map"].callback()  # raises inside: caught, reported
        assert node.last_error == "publishing ~/map failed: ValueError: injected" and sent == []
        assert node.diagnostic_values()["bad input: publishing ~/map failed"] == 1
        node.processor.assembler.map_message = real
        node._own_timers["map"].callback()
        assert len(sent) == 1 and sent[0].width == node.pipeline.map_size()

        m = node.pipeline.map
        m.rebuild_error = "ValueError: keyframe file damaged (injected)"

        def failed(timeout=None):
            raise MapRebuildError(f"the map's products could not be rebuilt after a pose update: {m.rebuild_error}")

        m.wait_rebuilt = failed
        node.last_error = ""
        level, message = node._status(node.diagnostic_values())
        assert level == DiagnosticStatus.WARN and "its rebuild failed: ValueError: keyframe file damaged" in message
        response = node._srv_save_map(Trigger.Request(), Trigger.Response())
        assert not response.success and response.message.startswith("MapRebuildError: the map's products could not")
        assert not (tmp_path / "map").exists()
    finally:
        node.shutdown()
        node.destroy_node()
        context.try_shutdown()


# ------------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.ros
@pytest.mark.parametrize("kind", ["random_safetensors", "truncated_pth"])
def test_corrupt_checkpoint_fails_at_startup_naming_the_file(ros_process, tmp_path, kind):
    import torch

    if kind == "random_safetensors":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        path = tmp_path / "cut.pth"
        torch.save({"aggregator.camera_token": torch.zeros(1, 2, 1, 384), "x": torch.ones(4096)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    node = ros_process(python_command("-m", "ros2_stream4d.ros.node", "--ros-args", "-p", f"model:={path}"),
                       name=f"stream4d_{kind}")
    assert node.wait(120) == 1
    out = node.output()
    assert "start-up failed: CheckpointError" in out and path.name in out
    assert "could not read" in out and "truncated, corrupt or not a checkpoint" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------------------------ map files

SAVE_LOOP = """
import signal
import sys
import numpy as np
# a suite started in the background by a shell without job control inherits SIGINT ignored, and Python then keeps it
# ignored: the child would save on through the SIGINT runs (seen once, 60 s timeout); Ctrl-C's default here
signal.signal(signal.SIGINT, signal.default_int_handler)
from ros2_stream4d.mapping.map_io import save_map
path, sizes = sys.argv[1], [int(a) for a in sys.argv[2:]]
rng = np.random.default_rng(0)
clouds = [(rng.random((n, 3), dtype=np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8),
           rng.random(n, dtype=np.float32)) for n in sizes]
i = 0
while True:
    save_map(path, *clouds[i % len(clouds)])
    print(f"saved {i}", flush=True)
    i += 1
"""


def _interrupt_a_save_loop(log, target, sizes, sig, delay_s) -> None:
    import subprocess

    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(target), *map(str, sizes)],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: "saved" in log.read_text() or child.poll() is not None, 120, None, "first save")
        assert child.poll() is None, log.read_text()
        saves = log.read_text().count("saved")
        wait_until(lambda: log.read_text().count("saved") > saves, 120, None, "a save boundary")
        time.sleep(delay_s)  # a varying moment inside the next saves (not a timing assertion)
        child.send_signal(sig)
        child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_signals_during_map_saves_leave_the_old_or_the_new_file(tmp_path):
    """A child saves two big maps alternately to one path; SIGTERM / SIGINT arrive at varied moments. The file
    must parse every time, with either map's point count: never a partial file."""
    import open3d as o3d

    sizes = (300_000, 450_000)
    target = tmp_path / "map.ply"
    rnd = random.Random(0)
    mid_write = 0
    runs = 8
    for run in range(runs):
        sig = signal.SIGTERM if run % 2 == 0 else signal.SIGINT
        _interrupt_a_save_loop(tmp_path / f"child{run}.log", target, sizes, sig, rnd.uniform(0.0, 0.4))
        leftovers = list(tmp_path.glob(".map.ply.*.tmp"))
        mid_write += bool(leftovers)
        for f in leftovers:  # SIGTERM kills without cleanup: a hidden temporary, never the target itself
            f.unlink()
        cloud = o3d.io.read_point_cloud(str(target))
        assert len(cloud.points) in sizes, f"run {run} ({sig.name}): {len(cloud.points)} points"
    print(f"signals: {runs} runs, {mid_write} (SIGTERM) interrupted a write in progress")


@pytest.mark.ros
def test_sigterm_saves_the_map_on_shutdown(ros_node, ros_process, tmp_path):
    import open3d as o3d
    from geometry_msgs.msg import PoseStamped

    target = tmp_path / "shutdown_map.pcd"
    node = start_node(ros_process, "save_map_on_shutdown:=true", f"map_save_path:={target}")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    image_pub, info_pub = publisher_pair(ros_node)
    for i in range(2):
        deliver(ros_node, image_pub, make_image(i, 30_000_000_000 + i * 100_000_000), pose, i + 1)
    assert not target.exists()
    node.popen.send_signal(signal.SIGTERM)
    assert node.wait(60) == 0
    assert "map saved to" in node.output()
    assert len(o3d.io.read_point_cloud(str(target)).points) > 0


@pytest.mark.ros
@pytest.mark.parametrize("bad", ["a_file", "a_directory.ply"])
def test_unusable_map_save_path_fails_at_startup(ros_process, tmp_path, bad):
    path = tmp_path / bad
    if bad.startswith("a_directory"):  # a .ply path that is a directory
        path.mkdir()
    else:  # a directory-map path that is an existing file
        path.write_text("not a map directory")
    node = ros_process(node_command(f"map_save_path:={path}"), name="stream4d_bad_map_path")
    assert node.wait(120) == 1
    out = node.output()
    assert "start-up failed" in out and "map_save_path" in out and bad in out


def test_validate_map_path_messages(tmp_path):
    from ros2_stream4d.mapping.map_io import validate_map_path

    with pytest.raises(ValueError, match="must end in"):
        validate_map_path(tmp_path / "m.xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validate_map_path(tmp_path / "nope" / "m.ply")
    (tmp_path / "d.ply").mkdir()
    with pytest.raises(IsADirectoryError):
        validate_map_path(tmp_path / "d.ply")
    with pytest.raises(PermissionError, match="outside"):
        validate_map_path("../escape.ply", root=tmp_path)
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                validate_map_path(ro / "m.ply")
        finally:
            ro.chmod(0o700)
    assert validate_map_path(tmp_path / "ok.PCD") == (tmp_path / "ok.PCD").resolve()



def test_model_paths_are_checked_before_anything_starts(tmp_path):

    from ros2_stream4d.ros.config import ParameterError

    with pytest.raises(ParameterError, match="oracle_bag"):
        _small_params(model="oracle")
    with pytest.raises(FileNotFoundError, match="oracle_bag .*nope_bag.* does not exist"):
        build_pipeline(_small_params(model="oracle", oracle_bag=str(tmp_path / "nope_bag")))
    with pytest.raises(FileNotFoundError, match="no_model.safetensors"):
        build_pipeline(_small_params(model=str(tmp_path / "no_model.safetensors")))
    (tmp_path / "dir.pth").mkdir()  # a directory is not a checkpoint
    with pytest.raises(FileNotFoundError, match="dir.pth"):
        build_pipeline(_small_params(model=str(tmp_path / "dir.pth")))


@pytest.mark.ros
def test_path_published_by_timer_holds_every_pose(ros_node, ros_process):
    """path_publish_rate > 0: the path (which grows to path_max_length poses) is sent from a timer, not with every
    frame; the latest message still holds every pose, stamped with the newest frame's stamp."""
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Path

    start_node(ros_process, "path_publish_rate:=5.0")
    pose = MessageCollector(ros_node, PoseStamped, "/stream4d/camera_pose")
    path = MessageCollector(ros_node, Path, "/stream4d/path")
    image_pub, info_pub = publisher_pair(ros_node)
    stamps = [40_000_000_000 + i * 100_000_000 for i in range(4)]
    for i, stamp in enumerate(stamps):
        deliver(ros_node, image_pub, make_image(i, stamp), pose, i + 1)
    wait_until(lambda: path.messages and len(path.messages[-1].poses) == 4, 30, ros_node, "the whole path")
    last = path.messages[-1]
    assert [time_to_ns(p.header.stamp) for p in last.poses] == stamps
    assert time_to_ns(last.header.stamp) == stamps[-1]
