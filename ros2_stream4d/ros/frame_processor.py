"""Per-frame handling shared by the live node and the offline bag processor: input checks (stamps, CameraInfo,
TF), one pipeline step, and the messages to publish. No threads, no publishers: callers own those."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from nav_msgs.msg import Path

from ros2_stream4d.mapping.pipeline import FrameResult, MappingPipeline
from ros2_stream4d.ros import conversions as conv
from ros2_stream4d.ros.outputs import frame_messages
from ros2_stream4d.ros.tf_static import TransformNotFound

POSE_KEYS = ("camera_pose", "odometry", "tf")  # what a skipped (gated) frame republishes


class RateLimitedWarnings:
    """One log line per reason per period; every occurrence is counted for diagnostics."""

    def __init__(self, logger, period_s: float = 5.0):
        self._logger, self._period = logger, period_s
        self._last: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def warn(self, reason: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self._period:
            self._last[reason] = now
            self._logger.warning(f"{reason}: {detail} (frame skipped; {self.counts[reason]} so far)")


class FrameProcessor:
    def __init__(self, params: dict[str, Any], pipeline: MappingPipeline, tf, warnings: RateLimitedWarnings,
                 logger, num_cameras: int = 1):
        self.p = params
        self.pipeline = pipeline
        self.tf = tf  # lookup(target, source) -> 4x4 | TransformNotFound; has_parent(frame)
        self.warnings = warnings
        self.logger = logger
        self.camera_info: list[Any] = [None] * num_cameras
        self.sensor_depth: np.ndarray | None = None
        self.path = Path()
        self.path.header.frame_id = params["map_frame"]
        self.frames_done = self.frames_gated = self.resets = 0
        self._last_stamp_ns = -1
        self._external_odom: bool | None = None  # decided once per stream: does another node publish odom->base?

    # ------------------------------------------------------------------ inputs
    def decode(self, msg) -> np.ndarray | None:
        """Image/CompressedImage -> HxWx3 uint8, or None (warned, counted) when the message is unusable."""
        try:
            rgb = conv.to_rgb(msg, max_side=self.p["max_image_side"])
        except ValueError as exc:
            self.warnings.warn("bad image", f"{type(exc).__name__}: {exc}")
            return None
        if conv.time_to_ns(msg.header.stamp) <= 0:
            self.warnings.warn("bad stamp", "image stamp is zero")
            return None
        return rgb

    def set_sensor_depth(self, msg) -> None:
        try:
            depth = conv.image_to_numpy(msg).astype(np.float32)
        except ValueError as exc:
            self.warnings.warn("bad depth input", str(exc))
            return
        if msg.encoding in ("16UC1", "mono16"):  # REP-118: 16-bit depth is millimetres
            depth = np.where(depth > 0, depth * 1e-3, np.nan).astype(np.float32)
        bad = ~np.isfinite(depth)
        if bad.all():
            self.warnings.warn("bad depth input", "depth image has no finite value")
            return
        self.sensor_depth = depth

    def _intrinsics(self, cam: int, rgb: np.ndarray):
        info = self.camera_info[cam]
        if info is None:
            return None, None
        if (info.width, info.height) != (rgb.shape[1], rgb.shape[0]):
            self.warnings.warn("camera_info mismatch", f"CameraInfo {info.width}x{info.height} vs image "
                                                       f"{rgb.shape[1]}x{rgb.shape[0]}; ignoring the CameraInfo")
            return None, None
        try:
            return conv.camera_info_to_k(info)[0], info
        except ValueError as exc:
            self.warnings.warn("bad camera_info", str(exc))
            return None, None

    # ------------------------------------------------------------------ one frame
    def process(self, cam: int, stamp_ns: int, header_frame: str, rgb: np.ndarray) -> list[tuple[str, Any]]:
        """Messages to publish for this frame ([] when it was skipped)."""
        if stamp_ns == self._last_stamp_ns:
            self.warnings.warn("duplicate stamp", f"camera {cam} stamp {stamp_ns} seen already")
            return []
        if stamp_ns < self._last_stamp_ns:
            if not self.p["reset_on_time_jump"]:
                self.warnings.warn("decreasing stamp", "image older than the previous one")
                return []
            self.logger.warning(f"time jumped back by {(self._last_stamp_ns - stamp_ns) / 1e9:.3f} s: "
                                "new stream and map")
            self.reset()
        camera_frame = self.p["camera_frame"] or header_frame or "camera_optical_frame"
        K_src, info = self._intrinsics(cam, rgb)

        T_base_cam = T_odom_base = None
        base = self.p["base_frame"]
        if base:
            try:
                T_base_cam = self.tf.lookup(base, camera_frame)
            except TransformNotFound:
                self.warnings.warn("no extrinsic", f"waiting for TF {base} -> {camera_frame} on /tf_static")
                return []
            if self._external_odom is None:  # decided before we ever publish odom->base ourselves
                self._external_odom = self.tf.has_parent(base)
            if self._external_odom or self.p["scale_source"] == "odometry":
                wait = getattr(self.tf, "wait_for_stamp", None)
                if wait is not None and not wait(self.p["odom_frame"], base, stamp_ns, self.p["tf_timeout"]):
                    self.warnings.warn("late odometry", f"no {self.p['odom_frame']} -> {base} at the image stamp "
                                                        f"within {self.p['tf_timeout']} s; using the latest")
                try:
                    T_odom_base = self.tf.lookup(self.p["odom_frame"], base, stamp_ns)  # at the image's time
                except TransformNotFound:
                    self.warnings.warn("no odometry", f"no TF {self.p['odom_frame']} -> {base} yet")

        self._last_stamp_ns = stamp_ns  # only frames that reach the model count for duplicate/jump checks
        result = self.pipeline.process(rgb, stamp_ns, camera=cam, K_src=K_src, T_base_cam=T_base_cam,
                                       T_odom_base=T_odom_base, sensor_depth=self.sensor_depth)
        if result is None:  # a near-duplicate frame: the robot stands still, republish the last pose
            self.frames_gated += 1
            last = self.pipeline.last
            if last is None:
                return []
            moved = dataclasses.replace(last, stamp_ns=stamp_ns)
            return [(k, m) for k, m in self._messages(moved, camera_frame, info, path=None) if k in POSE_KEYS]
        if not self._external_odom:
            result.T_map_odom = None  # we are the odometry source
        self.frames_done += 1
        return self._messages(result, camera_frame, info, self.path)

    def _messages(self, result: FrameResult, camera_frame: str, info, path):
        return frame_messages(result, self.p, camera_frame, info, path)

    def reset(self) -> None:
        self.pipeline.reset()
        self.path.poses.clear()
        self._last_stamp_ns = -1
        self._external_odom = None
        self.resets += 1
