"""Per-frame handling shared by the live node and the offline bag processor: input checks (stamps, CameraInfo,
TF), one pipeline step, and the messages to publish. No threads, no publishers: callers own those.

Bad input never raises out of here: each fault is a reason (below), logged once per period per reason and counted
(the node reports the counts in /diagnostics as "bad input: <reason>"), and the frame is skipped:
  image: "image encoding", "image size", "image step", "image data_length", "image empty", "image corrupt",
         "image too small", "image size changed", "zero stamp", "duplicate stamp", "decreasing stamp"
  CameraInfo: "camera_info size mismatch", "camera_info invalid" (the frame is skipped when intrinsics_source is
         camera_info; otherwise it is processed without the CameraInfo)
  depth (scale_source=depth): "depth encoding", "depth size", ..., "depth no finite value", "depth size mismatch"
A device out-of-memory error during a step halves the rolling window (a new stream) and retries the frame.

Each frame ends as one outcome (mapping.pipeline): Skipped (with the reason), Gated (near-duplicate: the last pose
is republished) or Processed; the output assembler turns it into messages. The TF policy (ros/tf_policy.py) is
decided at the first frame of each stream and kept until the stream resets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sensor_msgs.msg import CompressedImage

from ros2_stream4d.mapping.pipeline import FrameOutcome, Gated, MappingPipeline, Processed, Skipped, is_out_of_memory
from ros2_stream4d.mapping.undistort import LensModel, Undistorter
from ros2_stream4d.ros import conversions as conv
from ros2_stream4d.ros.assembler import OutputAssembler
from ros2_stream4d.ros.tf_policy import TfDecision, TransformNotFound, decide

DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")  # REP-118: millimetres (16-bit) or metres (float)
BAD_IMAGE, BAD_DEPTH = "bad image skipped", "depth image skipped"
SIZE_CHANGE_FRAMES = 10  # this many consecutive frames at a new size mean the camera really changed resolution

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_COMPRESSED_DEPTH_HEADER = 12  # image_transport's compressedDepth prefixes the PNG with a 12-byte ConfigHeader
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, ...): 0xC0..0xCF except DHT, JPG, DAC
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def compressed_image_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG or PNG header without decoding the image, or None when the header cannot tell.

    Lets a node refuse a huge compressed image before the decoder allocates its pixels. Never raises on any input.
    """
    try:
        buf = bytes(data[:65536]) if not isinstance(data, bytes) else data[:65536]
    except Exception:  # noqa: BLE001 - whatever the field holds, "unknown" is the answer
        return None
    if buf[12:20] == _PNG_MAGIC and buf[:8] != _PNG_MAGIC:
        buf = buf[_COMPRESSED_DEPTH_HEADER:]
    if buf[:8] == _PNG_MAGIC:
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            return None
        return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no frame header before it
            return None
        length = int.from_bytes(buf[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = int.from_bytes(buf[i + 5:i + 7], "big")
            width = int.from_bytes(buf[i + 7:i + 9], "big")
            return width, height
        i += 2 + length
    return None


class RateLimitedWarnings:
    """One log line per reason per period; every occurrence is counted for diagnostics."""

    def __init__(self, logger, period_s: float = 5.0):
        self._logger, self._period = logger, period_s
        self._last: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def warn(self, reason: str, detail: str, action: str = "frame skipped") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self._period:
            self._last[reason] = now
            self._logger.warning(f"{reason}: {detail} ({action}; {self.counts[reason]} so far)")


@dataclass
class FrameOutput:
    """What one frame produced: its outcome and the messages to publish (empty when skipped)."""

    outcome: FrameOutcome
    messages: list[tuple[str, Any]]


class FrameProcessor:
    def __init__(self, cfg: Any, pipeline: MappingPipeline, tf, warnings: RateLimitedWarnings, logger,
                 num_cameras: int = 1):
        self.cfg = cfg
        self.pipeline = pipeline
        self.tf = tf  # ros/tf_policy.TfView, plus wait_for_stamp on our own buffer
        self.warnings = warnings
        self.logger = logger
        self.assembler = OutputAssembler(cfg, tf)
        self.camera_info: list[Any] = [None] * num_cameras
        self.sensor_depth: np.ndarray | None = None
        self.frames_done = self.frames_gated = self.resets = 0
        self.oom_recoveries = 0
        self.depth_invalid_pixels = 0  # NaN/Inf/<= 0 sensor depth pixels seen (legal in REP-118: masked out)
        self._last_stamp_ns = [-1] * num_cameras  # per camera: simultaneous cameras share stamps legitimately
        self._size: tuple[int, int] | None = None  # (h, w) of the current stream's images
        self._new_size: tuple[tuple[int, int], int] | None = None  # (size, consecutive frames) of a new size
        self._external_odom: bool | None = None  # decided once per stream: does another node publish odom->base?
        self.decisions: dict[str, TfDecision] = {}  # the stream's TF policy, per camera frame
        self.undistorter = Undistorter()  # remap tables cached per camera model (bounded)
        self.frames_undistorted = 0

    @property
    def path(self):
        return self.assembler.path

    @property
    def decision(self) -> TfDecision | None:
        """The first camera's TF decision in this stream (None before its first frame)."""
        return next(iter(self.decisions.values()), None)

    def set_config(self, cfg: Any) -> None:
        self.cfg = cfg
        self.assembler.set_config(cfg)

    # ------------------------------------------------------------------ inputs
    def decode(self, msg) -> np.ndarray | None:
        """Image/CompressedImage -> HxWx3 uint8, or None (warned, counted) when the message is unusable."""
        if conv.time_to_ns(msg.header.stamp) <= 0:
            self.warnings.warn("zero stamp", "image stamp is zero (an unset header?)", BAD_IMAGE)
            return None
        max_side = int(self.cfg.max_image_side)
        if isinstance(msg, CompressedImage):
            size = compressed_image_size(msg.data)
            if size is not None and max(size) > max_side:  # refused from the header: no pixels are allocated
                self.warnings.warn("image size", f"compressed image header says {size[0]}x{size[1]}, over the "
                                                 f"{max_side} px limit (max_image_side); not decoded", BAD_IMAGE)
                return None
        try:
            rgb = conv.to_rgb(msg, max_side=max_side)
        except conv.ImageConversionError as exc:
            self.warnings.warn(f"image {exc.reason}", str(exc), BAD_IMAGE)
            return None
        except Exception as exc:  # noqa: BLE001 - a decoder failing in an unforeseen way is one more bad image
            self.warnings.warn("image corrupt", f"{type(exc).__name__}: {exc}", BAD_IMAGE)
            return None
        min_side = int(self.cfg.min_image_side)
        if min(rgb.shape[:2]) < min_side:
            self.warnings.warn("image too small", f"image {rgb.shape[1]}x{rgb.shape[0]} is under the {min_side} px "
                                                  "minimum side (min_image_side)", BAD_IMAGE)
            return None
        return rgb

    def set_sensor_depth(self, msg) -> None:
        """A metric depth image for scale_source=depth. NaN/Inf/<= 0 pixels mean "no measurement" (REP-118) and
        are masked; an image with no usable pixel, a wrong encoding or a malformed layout is skipped."""
        if msg.encoding not in DEPTH_ENCODINGS:
            self.warnings.warn("depth encoding", f"depth encoding {msg.encoding!r} is not one of {DEPTH_ENCODINGS}",
                               BAD_DEPTH)
            return
        try:
            depth = conv.image_to_numpy(msg, max_side=int(self.cfg.max_image_side)).astype(np.float32)
        except conv.ImageConversionError as exc:
            self.warnings.warn(f"depth {exc.reason}", str(exc), BAD_DEPTH)
            return
        except ValueError as exc:
            self.warnings.warn("depth corrupt", str(exc), BAD_DEPTH)
            return
        if msg.encoding in ("16UC1", "mono16"):  # REP-118: 16-bit depth is millimetres, 0 = no measurement
            depth = depth * np.float32(1e-3)
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(depth) & (depth > 0)
        if not usable.any():
            self.warnings.warn("depth no finite value", f"depth image {depth.shape[1]}x{depth.shape[0]} has no "
                                                        "finite positive value", BAD_DEPTH)
            return
        self.depth_invalid_pixels += int(usable.size - usable.sum())
        self.sensor_depth = np.where(usable, depth, np.float32(np.nan)).astype(np.float32)

    def _intrinsics(self, cam: int, rgb: np.ndarray) -> tuple[np.ndarray | None, Any] | Skipped:
        """(K_src, info) from this camera's CameraInfo, (None, None) without a usable one, or Skipped when the
        CameraInfo is missing or wrong and intrinsics_source asks for it (the reason is warned here)."""
        info = self.camera_info[cam]
        needed = self.cfg.intrinsics_source == "camera_info"
        action = "frame skipped: intrinsics_source is camera_info" if needed else "CameraInfo ignored for this frame"
        if info is None:
            reason, detail = "no camera_info", f"no CameraInfo for camera {cam} yet"
        elif (info.width, info.height) != (rgb.shape[1], rgb.shape[0]):
            reason, detail = "camera_info size mismatch", (f"CameraInfo {info.width}x{info.height} vs image "
                                                           f"{rgb.shape[1]}x{rgb.shape[0]}")
        else:
            try:
                return conv.camera_info_to_k(info)[0], info
            except ValueError as exc:
                reason, detail = "camera_info invalid", str(exc)
        if info is not None or needed:  # a missing CameraInfo is only worth a word when it is needed
            self.warnings.warn(reason, detail, action)
        return Skipped("camera_info unusable") if needed else (None, None)

    def _check_size(self, rgb: np.ndarray) -> Skipped | None:
        """Frames of a stream share one size (the KV cache holds a fixed number of tokens per frame). A frame of
        another size is skipped, unless SIZE_CHANGE_FRAMES frames in a row have it: then the camera changed
        resolution and a new stream starts."""
        size = rgb.shape[:2]
        if self._size is None or size == self._size:
            self._new_size = None
            return None
        count = self._new_size[1] + 1 if self._new_size and self._new_size[0] == size else 1
        self._new_size = (size, count)
        if count >= SIZE_CHANGE_FRAMES:
            self.logger.warning(f"camera resolution changed from {self._size[1]}x{self._size[0]} to "
                                f"{size[1]}x{size[0]}: new stream and map")
            self.reset()
            return None
        return Skipped("image size changed", f"image {size[1]}x{size[0]} in a stream of "
                                             f"{self._size[1]}x{self._size[0]} images")

    # ------------------------------------------------------------------ one frame
    def wait_for_tf(self, stamp_ns: int) -> bool:
        """Wait up to tf_timeout until the odometry this frame reads (odom -> base_frame at stamp_ns) has arrived;
        False on timeout (process() then warns "late odometry" and uses the latest). process() itself never
        waits: a live caller calls this first, holding no lock that the thread delivering /tf may need."""
        base = self.cfg.base_frame
        if not base:
            return True
        deadline = time.monotonic() + self.cfg.tf_timeout
        external = self._external_odom
        if external is None:  # the first image may arrive just before the odometry of its instant
            while self.tf.parent_of(base) is None and time.monotonic() < deadline:
                time.sleep(0.002)
            external = self._odometry_is_external()
        if not (external or self.cfg.scale_source == "odometry"):
            return True
        return self.tf.wait_for_stamp(self.cfg.odom_frame, base, stamp_ns, max(0.0, deadline - time.monotonic()))

    def _odometry_is_external(self) -> bool:
        """Another node publishes the parent of base_frame (decided before we ever publish odom -> base)."""
        parent = self.tf.parent_of(self.cfg.base_frame)
        return parent is not None and (parent, self.cfg.base_frame) not in self.assembler.own_edges

    def process(self, cam: int, stamp_ns: int, header_frame: str, rgb: np.ndarray) -> FrameOutput:
        """One decoded frame: input checks, one pipeline step, and the messages to publish. Reads TF as it is
        now (see wait_for_tf)."""
        camera_frame = self.cfg.camera_frame or header_frame or "camera_optical_frame"
        outcome = self._outcome(cam, stamp_ns, camera_frame, rgb)
        if isinstance(outcome, Skipped):
            if outcome.detail:
                self.warnings.warn(outcome.reason, outcome.detail)
            return FrameOutput(outcome, [])
        if isinstance(outcome, Gated):
            self.frames_gated += 1
        else:
            self.frames_done += 1
        decision = self.decisions.get(camera_frame)
        if decision is None or self._taken_over(decision):
            decision = self.decisions[camera_frame] = self._decide(camera_frame)
        return FrameOutput(outcome, self.assembler.messages(outcome, decision, camera_frame))

    def _taken_over(self, decision: TfDecision) -> bool:
        """Another node now publishes the parent of a frame we publish (e.g. odometry started after our first
        frame): the decision is remade so that frame keeps one parent."""
        for parent, child in decision.edges(self.cfg):
            seen = self.tf.parent_of(child)
            if seen is not None and seen != parent:
                self.logger.error(f"TF: {child!r} now has the parent {seen!r} from another node; this node stops "
                                  f"publishing {parent} -> {child} and decides again")
                if child == self.cfg.base_frame:
                    self._external_odom = True  # odometry appeared: from now on only map -> odom is ours
                return True
        return False

    def _decide(self, camera_frame: str) -> TfDecision:
        try:
            decision = decide(self.cfg, self.tf, camera_frame, bool(self._external_odom), self.assembler.own_edges)
        except TransformNotFound as exc:
            decision = TfDecision("none", "", camera_frame, camera_frame, str(exc))
        if decision.conflict:
            self.logger.error(f"TF: {decision.conflict}")
        else:
            edges = ", ".join(f"{p} -> {c}" for p, c in decision.edges(self.cfg))
            self.logger.info(f"TF: publishing {edges or 'nothing'} ({decision.mode}); ~/odometry is "
                             f"{decision.moving_frame} in {decision.parent}")
        return decision

    def _outcome(self, cam: int, stamp_ns: int, camera_frame: str, rgb: np.ndarray) -> FrameOutcome:
        last = self._last_stamp_ns[cam]
        if stamp_ns == last:
            return Skipped("duplicate stamp", f"camera {cam} stamp {stamp_ns} seen already")
        if stamp_ns < last:
            if not self.cfg.reset_on_time_jump:
                return Skipped("decreasing stamp", f"camera {cam} image {(last - stamp_ns) / 1e9:.3f} s older "
                                                   "than the previous one")
            self.logger.warning(f"time jumped back by {(last - stamp_ns) / 1e9:.3f} s: new stream and map")
            self.reset()
        size_problem = self._check_size(rgb)
        if size_problem:
            return size_problem
        intrinsics = self._intrinsics(cam, rgb)
        if isinstance(intrinsics, Skipped):
            return intrinsics
        K_src, info = intrinsics
        if info is not None:  # a distorted lens (plumb_bob, rational_polynomial, equidistant): to the pinhole P
            try:
                lens = LensModel.from_camera_info(info)
            except ValueError as exc:
                return Skipped("camera_info invalid", f"{exc} (the lens cannot be undistorted)")
            if lens.distorted:
                rgb, K_src = self.undistorter.undistort(rgb, lens)
                self.frames_undistorted += 1

        T_base_cam = T_odom_base = None
        base = self.cfg.base_frame
        if base:
            try:
                T_base_cam = self.tf.lookup(base, camera_frame)
            except TransformNotFound:
                return Skipped("no extrinsic", f"waiting for TF {base} -> {camera_frame} on /tf_static")
            if self._external_odom is None:
                self._external_odom = self._odometry_is_external()
            if self._external_odom or self.cfg.scale_source == "odometry":
                at: int | None = stamp_ns  # odometry at the image's time (wait_for_tf gave it time to arrive)
                if not self.tf.wait_for_stamp(self.cfg.odom_frame, base, stamp_ns, 0.0):
                    self.warnings.warn("late odometry", f"no {self.cfg.odom_frame} -> {base} at the image stamp "
                                                        f"within {self.cfg.tf_timeout} s", "using the latest")
                    at = None
                try:
                    T_odom_base = self.tf.lookup(self.cfg.odom_frame, base, at)
                except TransformNotFound:
                    self.warnings.warn("no odometry", f"no TF {self.cfg.odom_frame} -> {base} yet",
                                       "frame processed without odometry")

        sensor_depth = self.sensor_depth
        if sensor_depth is not None and sensor_depth.shape != rgb.shape[:2]:
            self.warnings.warn("depth size mismatch", f"depth {sensor_depth.shape[1]}x{sensor_depth.shape[0]} vs "
                                                      f"image {rgb.shape[1]}x{rgb.shape[0]}",
                               "depth not used for this frame")
            sensor_depth = None
        outcome = self._step(cam, stamp_ns, rgb, K_src, T_base_cam, T_odom_base, sensor_depth)
        if isinstance(outcome, Processed) and not self._external_odom:
            outcome.result.T_map_odom = None  # we are the odometry source
        return outcome

    def _step(self, cam, stamp_ns, rgb, K_src, T_base_cam, T_odom_base, sensor_depth) -> FrameOutcome:
        """pipeline.process, recovering from device out-of-memory by halving the window (a new stream) and
        retrying this frame; Skipped when the frame could not be processed at any window."""
        while True:
            self._last_stamp_ns[cam] = stamp_ns  # only frames that reach the model count for duplicate/jump checks
            self._size = rgb.shape[:2]
            try:
                return self.pipeline.process(rgb, stamp_ns, camera=cam, K_src=K_src, T_base_cam=T_base_cam,
                                             T_odom_base=T_odom_base, sensor_depth=sensor_depth)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                old = self.pipeline.window()
                new = self.pipeline.shrink_window()
                if new is None:
                    self.reset()
                    return Skipped("out of memory", f"{type(exc).__name__}: {exc}; the window cannot shrink "
                                                     f"further (window {old or 'unlimited'})")
                self.oom_recoveries += 1
                self.logger.warning(f"device out of memory at window {old or 'unlimited'} "
                                    f"({type(exc).__name__}: {str(exc)[:200]}): new stream and map with window {new}")
                external_odom = self._external_odom  # the TF tree did not change
                self._reset_stream_state()
                self._external_odom = external_odom

    def _reset_stream_state(self) -> None:
        self.assembler.reset()
        self._last_stamp_ns = [-1] * len(self._last_stamp_ns)
        self._size = None
        self._new_size = None
        self._external_odom = None
        self.decisions = {}
        self.resets += 1

    def reset(self) -> None:
        self.pipeline.reset()
        self._reset_stream_state()

    def reset_stream_only(self) -> None:
        """After the pipeline replaced its map and started a new stream itself (a loaded map)."""
        self._reset_stream_state()
