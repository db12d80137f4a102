"""stream4d_node: camera images in; point clouds, depth, TF, odometry, path and diagnostics out.

The node is an adapter: it decodes messages, queues frames, hands them to the mapping pipeline on a worker thread
(the executor thread never runs the model) and packs the pipeline's results into messages. All geometry lives in
ros2_stream4d.mapping.

Topics (relative to the node's namespace and name, default /stream4d/...):
  in : image_topics (Image or CompressedImage, SensorDataQoS), camera_info_topics, depth_topic (scale_source=depth),
       /tf and /tf_static (base->camera extrinsic, odom->base_link when another node publishes it)
  out: ~/cloud, ~/map (transient_local), ~/depth + ~/depth/camera_info, ~/confidence + ~/confidence/camera_info,
       ~/camera_pose, ~/odometry, ~/path, /tf, /diagnostics
Services: ~/reset (std_srvs/Trigger), ~/save_map (std_srvs/Trigger, writes map_save_path atomically).
"""

from __future__ import annotations

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
from nav_msgs.msg import Odometry, Path
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from ros2_stream4d.mapping.map_io import FORMATS, validate_map_path
from ros2_stream4d.ros import conversions as conv
from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings
from ros2_stream4d.ros.params import PARAMS
from ros2_stream4d.ros.tf_static import make_tf_listener

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
INPUT_RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class _Frame:
    camera: int
    stamp_ns: int
    header_frame: str
    rgb: np.ndarray
    received: float


class Stream4DNode(Node):
    def __init__(self, **kwargs):
        super().__init__("stream4d", **kwargs)
        for p in PARAMS:
            self.declare_parameter(p.name, p.default)
        self.p = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        self._check_map_save_path()
        self.warnings = RateLimitedWarnings(self.get_logger())
        self.tf = make_tf_listener(self)
        self.pipeline = build_pipeline(self.p)
        self.get_logger().info(f"model ready: {self.pipeline.describe()}")

        image_topics = list(self.p["image_topics"])
        info_topics = list(self.p["camera_info_topics"]) + [""] * len(image_topics)
        self.processor = FrameProcessor(self.p, self.pipeline, self.tf, self.warnings, self.get_logger(),
                                        num_cameras=len(image_topics))
        compressed = self.p["image_transport"] == "compressed"
        input_qos = qos_profile_sensor_data if self.p["input_qos"] == "sensor_data" else INPUT_RELIABLE
        for cam, topic in enumerate(image_topics):
            if compressed:
                topic = topic if topic.endswith("/compressed") else topic + "/compressed"
            self.create_subscription(CompressedImage if compressed else Image, topic,
                                     lambda m, c=cam: self._on_image(c, m), input_qos)
            info_topic = info_topics[cam] or image_topics[cam].rsplit("/", 1)[0] + "/camera_info"
            self.create_subscription(CameraInfo, info_topic, lambda m, c=cam: self._on_info(c, m), input_qos)
        if self.p["scale_source"] == "depth" and self.p["depth_topic"]:
            self.create_subscription(Image, self.p["depth_topic"], self.processor.set_sensor_depth, input_qos)

        self.publishers_by_key = {
            "cloud": self.create_publisher(PointCloud2, "~/cloud", RELIABLE),
            "depth": self.create_publisher(Image, "~/depth", RELIABLE),
            "depth_info": self.create_publisher(CameraInfo, "~/depth/camera_info", RELIABLE),
            "confidence": self.create_publisher(Image, "~/confidence", RELIABLE),
            "confidence_info": self.create_publisher(CameraInfo, "~/confidence/camera_info", RELIABLE),
            "camera_pose": self.create_publisher(PoseStamped, "~/camera_pose", RELIABLE),
            "odometry": self.create_publisher(Odometry, "~/odometry", RELIABLE),
            "path": self.create_publisher(Path, "~/path", RELIABLE),
            "tf": self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100)),
        }
        self.pub_map = self.create_publisher(PointCloud2, "~/map", LATCHED)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))

        self.create_service(Trigger, "~/reset", self._srv_reset)
        self.create_service(Trigger, "~/save_map", self._srv_save_map)
        if self.p["map_publish_rate"] > 0:
            self.create_timer(1.0 / self.p["map_publish_rate"], self._publish_map)
        # The path grows to path_max_length poses: sent with every frame it would cost O(length) per frame
        self._path_by_timer = self.p["path_publish_rate"] > 0
        self._path_dirty = False
        if self._path_by_timer:
            self.create_timer(1.0 / self.p["path_publish_rate"], self._publish_path)
        self.create_timer(1.0 / max(self.p["diagnostics_rate"], 1e-3), self._publish_diagnostics)

        # One slot per camera (latest wins) unless every frame must be processed (bags).
        self._queue: deque[_Frame] = deque()
        self._slots: list[_Frame | None] = [None] * len(image_topics)
        self._cv = threading.Condition()
        self._stop = False
        self._map_lock = threading.Lock()  # the worker fuses, timers and services read the map
        self._last_image_wall = time.monotonic()
        self._input_times: deque[float] = deque(maxlen=50)
        self._latencies: deque[float] = deque(maxlen=50)
        self.frames_in = 0
        self.frames_dropped = 0
        self.last_error = ""
        self._worker = threading.Thread(target=self._work, name="stream4d-model", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ input (executor thread: cheap work only)
    def _on_info(self, cam: int, msg: CameraInfo) -> None:
        self.processor.camera_info[cam] = msg

    def _on_image(self, cam: int, msg) -> None:
        self._last_image_wall = time.monotonic()
        self._input_times.append(self._last_image_wall)
        self.frames_in += 1
        rgb = self.processor.decode(msg)
        if rgb is None:
            return
        frame = _Frame(cam, conv.time_to_ns(msg.header.stamp), msg.header.frame_id, rgb, time.monotonic())
        with self._cv:
            if self.p["process_every_frame"]:
                self._queue.append(frame)
            else:
                if self._slots[cam] is not None:
                    self.frames_dropped += 1
                self._slots[cam] = frame
            self._cv.notify()

    def _next_frame(self) -> _Frame | None:
        with self._cv:
            while not self._stop:
                if self._queue:
                    return self._queue.popleft()
                waiting = [f for f in self._slots if f is not None]
                if waiting:
                    frame = min(waiting, key=lambda f: (f.stamp_ns, f.camera))  # fixed order for simultaneous frames
                    self._slots[frame.camera] = None
                    return frame
                self._cv.wait(0.2)
        return None

    # ------------------------------------------------------------------ work (model thread)
    def _work(self) -> None:
        while True:
            frame = self._next_frame()
            if frame is None:
                return
            try:
                with self._map_lock:
                    messages = self.processor.process(frame.camera, frame.stamp_ns, frame.header_frame, frame.rgb)
                    if self._path_by_timer and any(key == "path" for key, _ in messages):
                        messages = [(key, m) for key, m in messages if key != "path"]
                        self._path_dirty = True  # _publish_path sends it
                for key, msg in messages:
                    self.publishers_by_key[key].publish(msg)
                if messages:
                    self._latencies.append(time.monotonic() - frame.received)
            except Exception as exc:  # one bad frame must never kill the node
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.warnings.warn("processing failed", self.last_error)

    # ------------------------------------------------------------------ output
    def _publish_map(self) -> None:
        if not self.p["publish_map"]:
            return
        with self._map_lock:
            if self.pipeline.map_size() == 0:
                return
            xyz, rgb, conf = self.pipeline.map_points()
        self.pub_map.publish(conv.numpy_to_pointcloud2(xyz, rgb, conf, frame_id=self.p["map_frame"],
                                                       stamp=self.get_clock().now().to_msg()))

    def diagnostic_values(self) -> dict[str, object]:
        """The key/values of the node's DiagnosticStatus (bad inputs as "bad input: <reason>")."""
        now = time.monotonic()
        rate = 0.0
        if len(self._input_times) > 1 and now - self._input_times[-1] < 2.0:
            rate = (len(self._input_times) - 1) / max(self._input_times[-1] - self._input_times[0], 1e-6)
        with self._map_lock:  # the worker may be swapping the session (out-of-memory recovery)
            stats = self.pipeline.stats()
            window = self.pipeline.window()
        pr = self.processor
        return {
            "input rate [Hz]": f"{rate:.2f}",
            "latency mean [s]": f"{np.mean(self._latencies):.3f}" if self._latencies else "nan",
            "frames in": self.frames_in, "frames processed": pr.frames_done, "frames dropped": self.frames_dropped,
            "frames gated": pr.frames_gated, "resets": pr.resets,
            "oom recoveries": pr.oom_recoveries, "window": window if window is not None else "unlimited",
            "depth invalid pixels": pr.depth_invalid_pixels,
            **{f"bad input: {k}": v for k, v in sorted(self.warnings.counts.items())},
            **stats,
        }

    def _publish_path(self) -> None:
        with self._map_lock:
            if not self._path_dirty:
                return
            self._path_dirty = False
            path = self.processor.path
            msg = Path(header=path.header, poses=list(path.poses))  # a snapshot: the worker appends to the original
        self.publishers_by_key["path"].publish(msg)

    def _publish_diagnostics(self) -> None:
        silent = time.monotonic() - self._last_image_wall
        values = self.diagnostic_values()
        status = DiagnosticStatus(name="stream4d: mapping", hardware_id=str(values.get("device", "")))
        status.level, status.message = DiagnosticStatus.OK, "running"
        if silent > self.p["no_image_warn_s"]:
            status.level, status.message = DiagnosticStatus.WARN, f"no image for {silent:.1f} s"
        elif self.last_error:
            status.level, status.message = DiagnosticStatus.WARN, self.last_error
        elif self.processor.oom_recoveries:
            status.message = (f"running (window reduced to {values['window']} after "
                              f"{self.processor.oom_recoveries} out-of-memory recoveries)")
        status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(array)

    # ------------------------------------------------------------------ services
    def _srv_reset(self, _request, response):
        with self._cv:
            self._queue.clear()
            self._slots = [None] * len(self._slots)
        with self._map_lock:
            self.processor.reset()
        response.success, response.message = True, "new stream and map"
        return response

    def _map_save_path(self) -> str:
        if self.p["map_save_path"]:
            return self.p["map_save_path"]
        default_dir = os.path.join(os.path.expanduser("~"), ".ros")
        os.makedirs(default_dir, exist_ok=True)  # only the default location is created; a configured one must exist
        return os.path.join(default_dir, "stream4d_map.ply")

    def _check_map_save_path(self) -> None:
        """A map_save_path that can never work (wrong extension, a directory) stops the start-up; one whose
        directory is missing or read-only now may be fixed later (a disk mounted): a warning."""
        path = self.p["map_save_path"]
        if not path:
            return
        if os.path.splitext(path)[1].lower() not in FORMATS:
            raise ValueError(f"map_save_path {path!r} must end in one of {FORMATS}")
        if os.path.isdir(os.path.expanduser(path)):
            raise IsADirectoryError(f"map_save_path {path!r} is a directory")
        try:
            validate_map_path(path)
        except (OSError, ValueError) as exc:
            self.get_logger().warning(f"map_save_path: {exc} (~/save_map will fail until this is fixed)")

    def save_map(self) -> str:
        """Write the map atomically (temporary file + rename); ValueError/OSError with a clear message."""
        path = self._map_save_path()
        try:
            validate_map_path(path)
        except (OSError, ValueError) as exc:
            raise type(exc)(f"cannot save the map to {path!r}: {exc}") from exc
        with self._map_lock:
            return self.pipeline.save_map(path)

    def _srv_save_map(self, _request, response):
        try:
            path = self.save_map()
            response.success, response.message = True, f"saved {self.pipeline.map_size()} points to {path}"
        except (OSError, ValueError) as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"~/save_map failed: {response.message}")
        return response

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._worker.join(timeout=60)
        if self.p["save_map_on_shutdown"] and self.pipeline.map_size() > 0:
            try:
                self.get_logger().info(f"map saved to {self.save_map()}")
            except (OSError, ValueError) as exc:
                self.get_logger().error(f"could not save the map: {exc}")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_pipeline(p: dict):
    """The mapping pipeline the parameters ask for; the model is built here, before any subscription exists."""
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig

    device = resolve_device(p["device"])
    if p["model"] == "oracle":
        from ros2_stream4d.sim.oracle import OracleSession

        if not p["oracle_bag"]:
            raise ValueError("model 'oracle' needs the oracle_bag parameter (a sim bag with /ground_truth topics)")
        if not os.path.exists(os.path.expanduser(p["oracle_bag"])):
            raise FileNotFoundError(f"oracle_bag {p['oracle_bag']!r} does not exist")
        session, describe = OracleSession.from_bag(p["oracle_bag"]), f"oracle ({p['oracle_bag']})"
    else:
        from ros2_stream4d.mapping.reconstructor import build_session

        dtype = p["dtype"] if p["dtype"] != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        try:
            session = build_session(p["model"], device=device, dtype="float32" if dtype == "bfloat16" else dtype,
                                    window=p["window"] or None, anchors=p["anchors"], backend=p["attention_backend"],
                                    allow_download=bool(p["allow_download"]))
        except Exception as exc:
            raise _explain_model_error(p["model"], exc) from exc
        describe = (f"{p['model']} on {device} ({dtype}), window {p['window'] or 'unlimited'}, "
                    f"anchors {p['anchors']}, attention {p['attention_backend']}")
    cfg = PipelineConfig.from_params({**p, "device": device})
    return MappingPipeline(cfg, session, describe=describe)


def _explain_model_error(spec: str, exc: Exception) -> Exception:
    """A checkpoint file that exists but cannot be parsed: say so, with its size (the reader's own message can be
    as terse as "[Errno 22] Invalid argument" for a truncated zip)."""
    path = os.path.expanduser(str(spec))
    if not os.path.isfile(path) or "could not read" not in str(exc):
        return exc
    try:
        return type(exc)(f"{exc} -- {path} ({os.path.getsize(path)} bytes) is truncated, corrupt or not a "
                         "checkpoint (.safetensors, or a torch state dict readable with weights_only=True)")
    except Exception:  # noqa: BLE001 - an exception type with another constructor: keep the original
        return exc


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
    except Exception as exc:  # start-up errors (missing checkpoint...) get one clear line, not a traceback
        print(f"[stream4d] start-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
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
    executor = rclpy.executors.MultiThreadedExecutor(num_threads=2)
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
