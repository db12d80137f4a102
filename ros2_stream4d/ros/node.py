"""stream4d_node: a managed (lifecycle) node. Camera images in; clouds, depth, TF, odometry, path, diagnostics out.

The node is an I/O shell: it declares the parameters (params.py), subscribes, queues frames, runs the frame
processor on a worker thread (the executor thread never runs the model) and publishes what the output assembler
built. Topic names live in ros2_stream4d.topics; maths lives in ros2_stream4d.mapping.

Lifecycle (rclpy.lifecycle; ``autostart:=true`` walks configure + activate at start-up):
  configure   loads the model and allocates the rolling cache; creates publishers and the services
  activate    subscribes to the inputs and starts the worker and the timers
  deactivate  unsubscribes and stops the worker; the map is kept (~/save_map still works)
  cleanup     frees the model (and device memory); configure loads it again
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import rclpy
import rclpy.executors
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import OccupancyGrid, Odometry, Path
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker

from ros2_stream4d import topics
from ros2_stream4d.loader import ModelOptions, load_pipeline
from ros2_stream4d.mapping.frame_sync import ApproximateSync
from ros2_stream4d.mapping.keyframe_map import MapRebuildError
from ros2_stream4d.mapping.map_io import validate_map_dir_path, validate_map_path
from ros2_stream4d.mapping.pipeline import PipelineConfig, Processed, start_pose_matrix
from ros2_stream4d.ros import conversions as conv
from ros2_stream4d.ros.compat.tf_buffer import make_tf_listener
from ros2_stream4d.ros.config import MAP_FORMATS, ParameterError, as_dict, check_change, make_config
from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings
from ros2_stream4d.ros.params import PARAMS, Param, describe

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
INPUT_RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
MESSAGE_TYPES = {"sensor_msgs/msg/PointCloud2": PointCloud2, "sensor_msgs/msg/Image": Image,
                 "sensor_msgs/msg/CameraInfo": CameraInfo, "geometry_msgs/msg/PoseStamped": PoseStamped,
                 "nav_msgs/msg/Odometry": Odometry, "nav_msgs/msg/Path": Path, "tf2_msgs/msg/TFMessage": TFMessage,
                 "diagnostic_msgs/msg/DiagnosticArray": DiagnosticArray, "visualization_msgs/msg/Marker": Marker,
                 "nav_msgs/msg/OccupancyGrid": OccupancyGrid}


@dataclass
class _Frame:
    camera: int
    stamp_ns: int
    header_frame: str
    rgb: np.ndarray
    received: float


def descriptor(p: Param) -> ParameterDescriptor:
    d = ParameterDescriptor(name=p.name, description=describe(p), read_only=not p.live)
    if p.choices:
        d.additional_constraints = f"one of: {', '.join(p.choices)}"
    if p.low is not None and p.high is not None and not isinstance(p.default, bool):
        if isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=0)]
        elif isinstance(p.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(p.low), to_value=float(p.high), step=0.0)]
    return d


class Stream4DNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__(topics.NODE_NAME, **kwargs)
        for p in PARAMS:
            self.declare_parameter(p.name, p.default, descriptor(p))
        # one validated configuration; bad values stop the start-up with every reason (ParameterError)
        self.cfg = make_config({p.name: self.get_parameter(p.name).value for p in PARAMS})
        self._check_map_save_path()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.warnings = RateLimitedWarnings(self.get_logger())
        self.tf = make_tf_listener(self)
        self.pipeline = None
        self.viewer = None  # a LiveViewer when viewer:=rerun (created at configure)
        self.processor: FrameProcessor | None = None
        self.startup_error = ""
        self._own_pubs: dict[str, object] = {}
        self._own_services: list = []
        self._own_subs: list = []
        self._own_timers: dict[str, object] = {}
        self._cv = threading.Condition()
        self._stop = True
        self._worker: threading.Thread | None = None
        self._map_lock = threading.Lock()  # the worker fuses, timers and services read the map
        self._queue: deque[list[_Frame]] = deque()
        self._slot: list[_Frame] | None = None  # latest group when frames may be dropped
        self._sync = ApproximateSync(self.cfg.num_cameras, self.cfg.sync_slop)
        self._last_image_wall = time.monotonic()
        self._input_times: deque[float] = deque(maxlen=50)
        self._latencies: deque[float] = deque(maxlen=50)
        self._path_dirty = False
        self.frames_in = 0
        self.frames_dropped = 0
        self.last_error = ""
        self.input_topics: list[str] = []
        if self.cfg.autostart:
            self.trigger_configure()
            if self.processor is not None:
                self.trigger_activate()
            if not self.startup_error:
                self.get_logger().info("active (autostart)")

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pipeline = load_pipeline(ModelOptions.from_config(self.cfg),
                                          PipelineConfig.from_params(as_dict(self.cfg)))
        except Exception as exc:  # a missing checkpoint, a bad card...: one clear line, the node stays unconfigured
            self.startup_error = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"configure failed: {self.startup_error}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"model ready: {self.pipeline.describe()}")
        self.processor = FrameProcessor(self.cfg, self.pipeline, self.tf, self.warnings, self.get_logger(),
                                        num_cameras=self.cfg.num_cameras)
        self.viewer = None
        if self.cfg.viewer == "rerun":  # starts in its own thread; a viewer that cannot start logs one warning
            from ros2_stream4d.viewer.live import LiveViewer

            c = self.cfg
            self.viewer = LiveViewer(c.viewer_mode, web_port=c.viewer_web_port, grpc_port=c.viewer_grpc_port,
                                     url=c.viewer_url or None, path=c.viewer_path or None,
                                     memory_limit=c.viewer_memory_limit, cloud_in_camera=c.cloud_frame == "camera",
                                     warn=self.get_logger().warning, info=self.get_logger().info)
        for key, (name, type_name) in topics.OUTPUTS.items():
            qos = LATCHED if key in topics.LATCHED_OUTPUTS else (QoSProfile(depth=100) if key == "tf" else RELIABLE)
            self._own_pubs[key] = self.create_publisher(MESSAGE_TYPES[type_name], name, qos)
        self._own_services = [self.create_service(Trigger, "~/reset", self._srv_reset),
                              self.create_service(Trigger, "~/save_map", self._srv_save_map),
                              self.create_service(Trigger, "~/load_map", self._srv_load_map),
                              self.create_service(Trigger, "~/erase_map", self._srv_erase_map)]
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception as exc:  # rclpy would turn it into an ERROR transition without a word
            self.startup_error = f"activate failed: {type(exc).__name__}: {exc}"
            self.get_logger().error(self.startup_error)
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _activate(self) -> None:
        cfg = self.cfg
        compressed = cfg.image_transport == "compressed"
        input_qos = qos_profile_sensor_data if cfg.input_qos == "sensor_data" else INPUT_RELIABLE
        self.input_topics = []
        for cam in range(cfg.num_cameras):
            image = topics.camera_input("image", cam, cfg.num_cameras)
            if compressed:  # image_transport's convention: the resolved (remapped) image name + /compressed
                image = self.resolve_topic_name(image) + "/compressed"
            self._own_subs.append(self.create_subscription(CompressedImage if compressed else Image, image,
                                                       lambda m, c=cam: self._on_image(c, m), input_qos))
            info = topics.camera_input("camera_info", cam, cfg.num_cameras)
            self._own_subs.append(self.create_subscription(CameraInfo, info, lambda m, c=cam: self._on_info(c, m),
                                                       input_qos))
            self.input_topics += [self.resolve_topic_name(image), self.resolve_topic_name(info)]
        if cfg.scale_source == "depth":
            depth = topics.INPUTS["sensor_depth"][0]
            self._own_subs.append(self.create_subscription(Image, depth, self.processor.set_sensor_depth, input_qos))
            self.input_topics.append(self.resolve_topic_name(depth))
        self.get_logger().info(f"inputs: {', '.join(self.input_topics)}")
        self._make_timers()
        self._stop = False
        self._last_image_wall = time.monotonic()
        self._worker = threading.Thread(target=self._work, name="stream4d-model", daemon=True)
        self._worker.start()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for sub in self._own_subs:
            self.destroy_subscription(sub)
        self._own_subs = []
        for timer in self._own_timers.values():
            self.destroy_timer(timer)
        self._own_timers = {}
        self._stop_worker()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        for pub in self._own_pubs.values():
            self.destroy_publisher(pub)
        for srv in self._own_services:
            self.destroy_service(srv)
        self._own_pubs, self._own_services = {}, []
        self._close_viewer()
        if self.pipeline is not None:
            self.pipeline.close()  # the back-end's worker thread, the map's spill directory
        self.processor = None
        self.pipeline = None
        _free_device_memory()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown()
        return TransitionCallbackReturn.SUCCESS

    def _make_timers(self) -> None:
        for timer in self._own_timers.values():
            self.destroy_timer(timer)
        self._own_timers = {"diagnostics": self.create_timer(1.0 / self.cfg.diagnostics_rate, self._publish_diagnostics)}
        if self.cfg.map_publish_rate > 0:
            self._own_timers["map"] = self.create_timer(1.0 / self.cfg.map_publish_rate,
                                                        self._guarded("~/map", self._publish_map))
        # the path grows to path_max_length poses: sent with every frame it would cost O(length) per frame
        if self.cfg.path_publish_rate > 0:
            self._own_timers["path"] = self.create_timer(1.0 / self.cfg.path_publish_rate,
                                                         self._guarded("~/path", self._publish_path))
        if self.cfg.mesh_enabled and self.cfg.mesh_publish_rate > 0:
            self._own_timers["mesh"] = self.create_timer(1.0 / self.cfg.mesh_publish_rate,
                                                         self._guarded("~/mesh", self._publish_mesh))
        if self.cfg.occupancy_enabled and self.cfg.occupancy_publish_rate > 0:
            self._own_timers["occupancy"] = self.create_timer(1.0 / self.cfg.occupancy_publish_rate,
                                                              self._guarded("~/occupancy", self._publish_occupancy))

    def _guarded(self, what: str, publish):
        """A product timer's callback: an exception while building or sending the product is logged and shown in
        diagnostics (as "publishing <what> failed"), and the node keeps running (an exception in a timer would end
        rclpy's spin and the node with it)."""

        def run() -> None:
            try:
                publish()
            except Exception as exc:
                self.last_error = f"publishing {what} failed: {type(exc).__name__}: {exc}"
                self.warnings.warn(f"publishing {what} failed", self.last_error, action="product not sent")

        return run

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params) -> SetParametersResult:
        changes = {p.name: p.value for p in params if p.name != "use_sim_time"}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            new = check_change(self.cfg, changes)
        except ParameterError as exc:
            self.get_logger().warning(f"parameter change refused: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        old, self.cfg = self.cfg, new
        with self._map_lock:
            if self.processor is not None:
                self.processor.set_config(new)
                self.pipeline.update_config(PipelineConfig.from_params({**as_dict(new),
                                                                         "device": self.pipeline.cfg.device}))
        self._sync.set_slop(new.sync_slop)
        rates = ("map_publish_rate", "path_publish_rate", "diagnostics_rate", "mesh_publish_rate",
                 "occupancy_publish_rate")
        if self._own_timers and any(getattr(old, r) != getattr(new, r) for r in rates):
            self._make_timers()
        self.get_logger().info(f"parameters changed: {changes}")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ input (executor thread: cheap work only)
    def _on_info(self, cam: int, msg: CameraInfo) -> None:
        if self.processor is not None:
            self.processor.camera_info[cam] = msg

    def _on_image(self, cam: int, msg) -> None:
        self._last_image_wall = time.monotonic()
        self._input_times.append(self._last_image_wall)
        self.frames_in += 1
        processor = self.processor
        if processor is None:
            return
        rgb = processor.decode(msg)
        if rgb is None:
            return
        frame = _Frame(cam, conv.time_to_ns(msg.header.stamp), msg.header.frame_id, rgb, time.monotonic())
        with self._cv:
            group = self._sync.add(cam, frame.stamp_ns, frame)
            if group is None:
                return
            if self.cfg.process_every_frame:
                self._queue.append(group)
            else:
                if self._slot is not None:
                    self.frames_dropped += len(self._slot)
                self._slot = group
            self._cv.notify()

    def _next_group(self) -> list[_Frame] | None:
        with self._cv:
            while not self._stop:
                if self._queue:
                    return self._queue.popleft()
                if self._slot is not None:
                    group, self._slot = self._slot, None
                    return group
                self._cv.wait(0.2)
        return None

    # ------------------------------------------------------------------ work (model thread)
    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            for frame in group:  # one instant: every camera's frame in camera order
                try:
                    # outside the map lock: the executor thread that delivers /tf may be waiting for that lock
                    # in a map timer; waiting for odometry while holding it stalled both for tf_timeout
                    self.processor.wait_for_tf(frame.stamp_ns)
                    with self._map_lock:
                        out = self.processor.process(frame.camera, frame.stamp_ns, frame.header_frame, frame.rgb)
                        messages = out.messages
                        if self.cfg.path_publish_rate > 0 and any(key == "path" for key, _ in messages):
                            messages = [(key, m) for key, m in messages if key != "path"]
                            self._path_dirty = True  # _publish_path sends it
                    for key, msg in messages:
                        self._own_pubs[key].publish(msg)
                    if isinstance(out.outcome, Processed):
                        self._latencies.append(time.monotonic() - frame.received)
                        if self.viewer is not None:  # non-blocking: a bounded queue, drop-oldest
                            self.viewer.submit(out.outcome, frame.rgb)
                except Exception as exc:  # one bad frame must never kill the node
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.warnings.warn("processing failed", self.last_error)

    def _stop_worker(self) -> None:
        with self._cv:
            self._stop = True
            self._queue.clear()
            self._slot = None
            self._sync.clear()
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=60)
            self._worker = None

    # ------------------------------------------------------------------ output
    def _publish_map(self) -> None:
        if not self.cfg.publish_map or self.pipeline is None:
            return
        with self._map_lock:
            if self.pipeline.map_size() == 0:
                return
            xyz, rgb, conf = self.pipeline.map_points()
            msg = self.processor.assembler.map_message(xyz, rgb, conf, self.get_clock().now().to_msg())
            last_stamp = self.pipeline.last.stamp_ns if self.pipeline.last is not None else None
        self._own_pubs["map"].publish(msg)
        if self.viewer is not None:
            self.viewer.submit_map(xyz, rgb, last_stamp)

    def _publish_mesh(self) -> None:
        with self._map_lock:
            if self.pipeline is None or self.pipeline.map_size() == 0:
                return
            vertices, triangles, colours = self.pipeline.mesh()
        if len(triangles) == 0:
            return
        for marker in self.processor.assembler.mesh_messages(vertices, triangles, colours,
                                                             self.get_clock().now().to_msg()):
            self._own_pubs["mesh"].publish(marker)

    def _publish_occupancy(self) -> None:
        with self._map_lock:
            if self.pipeline is None or self.pipeline.map_size() == 0:
                return
            data, origin, resolution = self.pipeline.occupancy()
        if data.size == 0:
            return
        self._own_pubs["occupancy"].publish(self.processor.assembler.occupancy_message(
            data, origin, resolution, self.get_clock().now().to_msg()))

    def _publish_path(self) -> None:
        with self._map_lock:
            if not self._path_dirty or self.processor is None:
                return
            self._path_dirty = False
            msg = self.processor.assembler.path_snapshot()
        self._own_pubs["path"].publish(msg)

    def diagnostic_values(self) -> dict[str, object]:
        """The key/values of the node's DiagnosticStatus (bad inputs as "bad input: <reason>")."""
        now = time.monotonic()
        rate = 0.0
        if len(self._input_times) > 1 and now - self._input_times[-1] < 2.0:
            rate = (len(self._input_times) - 1) / max(self._input_times[-1] - self._input_times[0], 1e-6)
        pr = self.processor
        with self._map_lock:  # the worker may be swapping the session (out-of-memory recovery)
            stats = self.pipeline.stats() if self.pipeline is not None else {}
            window = self.pipeline.window() if self.pipeline is not None else None
            decision = pr.decision if pr is not None else None
        values: dict[str, object] = {
            "input rate [Hz]": f"{rate:.2f}",
            "latency mean [s]": f"{np.mean(self._latencies):.3f}" if self._latencies else "nan",
            "inputs": ", ".join(self.input_topics),
            "frames in": self.frames_in, "frames dropped": self.frames_dropped,
            "frames dropped by camera sync": self._sync.dropped,
            "window": window if window is not None else "unlimited",
            "tf": (f"{decision.mode}: {decision.conflict}" if decision and decision.conflict else
                   ", ".join(f"{p} -> {c}" for p, c in decision.edges(self.cfg)) if decision else "not decided"),
            **{f"bad input: {k}": v for k, v in sorted(self.warnings.counts.items())},
            **stats,
        }
        if pr is not None:
            values.update({"frames processed": pr.frames_done, "frames gated": pr.frames_gated,
                           "resets": pr.resets, "oom recoveries": pr.oom_recoveries,
                           "depth invalid pixels": pr.depth_invalid_pixels})
        return values

    def _status(self, values: dict[str, object]) -> tuple[int, str]:
        """The diagnostics level and message: the most important condition first."""
        silent = time.monotonic() - self._last_image_wall
        pr = self.processor
        if silent > self.cfg.no_image_warn_s:
            return DiagnosticStatus.WARN, f"no image for {silent:.1f} s on {', '.join(self.input_topics[::2])}"
        if self.last_error:
            return DiagnosticStatus.WARN, self.last_error
        if values.get("map rebuild error", "none") != "none":
            return DiagnosticStatus.WARN, (f"the map does not follow the last pose correction (its rebuild failed: "
                                           f"{values['map rebuild error']})")
        if pr is not None and pr.decision is not None and pr.decision.conflict:
            return DiagnosticStatus.ERROR, f"TF not published: {pr.decision.conflict}"
        if self.cfg.publish_depth and self.pipeline is not None and not self.pipeline.scale_valid():
            why = ("scale_source is none" if self.cfg.scale_source == "none"
                   else f"scale_source {self.cfg.scale_source} has no valid scale yet")
            return DiagnosticStatus.WARN, f"no metric scale ({why}): depth goes to ~/depth_relative/image in model units"
        fallback = int(values.get("frames with nominal 60 deg intrinsics", 0))
        if fallback:
            return DiagnosticStatus.WARN, (f"{fallback} frame(s) had unusable model intrinsics: a nominal 60 deg field "
                                           "of view was used (give CameraInfo and intrinsics_source camera_info)")
        if pr is not None and pr.oom_recoveries:
            return DiagnosticStatus.OK, (f"running (window reduced to {values['window']} after "
                                         f"{pr.oom_recoveries} out-of-memory recoveries)")
        return DiagnosticStatus.OK, "running"

    def _publish_diagnostics(self) -> None:
        values = self.diagnostic_values()
        status = DiagnosticStatus(name="stream4d: mapping", hardware_id=str(values.get("device", "")))
        status.level, status.message = self._status(values)
        status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._own_pubs["diagnostics"].publish(array)

    # ------------------------------------------------------------------ services
    def _srv_reset(self, _request, response):
        with self._cv:
            self._queue.clear()
            self._slot = None
            self._sync.clear()
        with self._map_lock:
            self.processor.reset()
        if self.viewer is not None:
            self.viewer.reset()
        response.success, response.message = True, "new stream (the map is kept: ~/erase_map erases it)"
        return response

    def _map_save_path(self) -> str:
        if self.cfg.map_save_path:
            return self.cfg.map_save_path
        default_dir = os.path.join(os.path.expanduser("~"), ".ros")
        os.makedirs(default_dir, exist_ok=True)  # only the default location is created; a configured one must exist
        return os.path.join(default_dir, "stream4d_map")

    @staticmethod
    def _validate_save_target(path: str) -> None:
        """A .ply/.pcd cloud file or a whole map directory: mapping/map_io.py's checks for either."""
        if os.path.splitext(path)[1].lower() in MAP_FORMATS:
            validate_map_path(path)
        else:
            validate_map_dir_path(path)

    def _check_map_save_path(self) -> None:
        """A map_save_path whose directory is missing or read-only now may be fixed later (a disk mounted): a
        warning (an impossible one is refused by make_config)."""
        if not self.cfg.map_save_path:
            return
        try:
            self._validate_save_target(self.cfg.map_save_path)
        except (OSError, ValueError) as exc:
            self.get_logger().warning(f"map_save_path: {exc} (~/save_map will fail until this is fixed)")

    def save_map(self) -> str:
        """Write the map atomically (a .ply/.pcd cloud, or the whole map directory); ValueError/OSError with a
        clear message."""
        path = self._map_save_path()
        try:
            self._validate_save_target(path)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"cannot save the map to {path!r}: {exc}") from exc
        with self._map_lock:
            return self.pipeline.save_map(path)

    def _srv_load_map(self, _request, response):
        """Replace the map by the directory in map_load_path and continue in it from map_start_pose; a bad
        directory is refused with the reason and the running map is kept."""
        path = self.cfg.map_load_path
        if not path:
            response.success, response.message = False, "map_load_path is empty: set it first (ros2 param set)"
            return response
        with self._cv:
            self._queue.clear()
            self._slot = None
        try:
            with self._map_lock:
                meta = self.pipeline.load_map(path, start_pose_matrix(self.cfg.map_start_pose))
                self.processor.reset_stream_only()
            response.success = True
            response.message = f"loaded {path} ({meta.get('keyframes', '?')} keyframes)"
        except (OSError, ValueError) as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"~/load_map failed (the running map is kept): {response.message}")
        return response

    def _srv_erase_map(self, _request, response):
        with self._map_lock:
            self.pipeline.erase_map()
        response.success, response.message = True, "map erased"
        return response

    def _srv_save_map(self, _request, response):
        try:
            path = self.save_map()
            response.success, response.message = True, f"saved the map ({self.pipeline.map_size()} cloud voxels) to {path}"
        except (OSError, ValueError, MapRebuildError) as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"~/save_map failed: {response.message}")
        return response

    def _close_viewer(self) -> None:
        if self.viewer is not None:
            self.viewer.close()
            self.viewer = None

    def shutdown(self) -> None:
        self._stop_worker()
        self._close_viewer()
        if self.cfg.save_map_on_shutdown and self.pipeline is not None and self.pipeline.map_size() > 0:
            try:
                self.get_logger().info(f"map saved to {self.save_map()}")
            except (OSError, ValueError, MapRebuildError) as exc:
                self.get_logger().error(f"could not save the map: {exc}")
        if self.pipeline is not None:
            self.pipeline.close()


def _free_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the node until SIGINT or SIGTERM, then shut down in order: stop the worker, save the map when
    configured, destroy the node. rclpy's own signal handlers are off: they would invalidate the context while
    callbacks still publish. A second signal stops waiting (a map save in progress stays atomic)."""
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = Stream4DNode()
    except KeyboardInterrupt:
        print("[stream4d] interrupted during start-up", file=sys.stderr)
        rclpy.try_shutdown()
        return 130
    except Exception as exc:  # bad parameters: one clear line, not a traceback
        print(f"[stream4d] start-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    if node.cfg.autostart and node.startup_error:  # the transition failed: exit like a start-up error
        print(f"[stream4d] start-up failed: {node.startup_error}", file=sys.stderr)
        node.destroy_node()
        rclpy.try_shutdown()
        return 1
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        node.get_logger().info(f"{signal.Signals(signum).name}: shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # one executor thread: lifecycle transitions destroy subscriptions, publishers and timers from a callback, and
    # a second executor thread building its wait set at that moment crashed rclpy (InvalidHandle, seen in CI on
    # cleanup). The model runs on its own worker thread either way.
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        try:
            node.shutdown()
        except KeyboardInterrupt:
            print("[stream4d] shutdown interrupted by a second signal", file=sys.stderr)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
