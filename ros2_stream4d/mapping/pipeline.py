"""One frame in, everything the node publishes out: gate -> reconstructor -> scale -> frames -> cloud -> map.

The node (ros/) and the offline bag processor share this pipeline; they only turn its FrameResult into messages.
Frames: ``world`` is the model's (first camera's optical frame); ``map`` is REP-103 body axes (camera only) or the
robot base at the first frame (when a base->camera extrinsic is given). Lengths are in model units times the
current scale (metres when a scale source is valid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ros2_stream4d.mapping.cloud import CloudOptions, frame_cloud
from ros2_stream4d.mapping.conventions import T_MAP_WORLD, inverse, map_to_odom, transform_points
from ros2_stream4d.mapping.fusion import VoxelMap
from ros2_stream4d.mapping.gating import KeyframeGate
from ros2_stream4d.mapping.map_io import save_map
from ros2_stream4d.mapping.preprocess import Preprocessor
from ros2_stream4d.mapping.reconstructor import FramePrediction, StreamingReconstructor
from ros2_stream4d.mapping.scale import DepthSensorScale, FixedScale, OdometryScale


@dataclass
class PipelineConfig:
    input_width: int = 518
    input_mode: str = "crop"
    intrinsics_source: str = "model"
    points_source: str = "depth"
    device: str = "cpu"
    dtype: str = "float32"
    gate_threshold: float = 0.0  # grey levels (0-255); 0 = off
    gate_max_skip: int = 30
    cloud_frame: str = "map"  # map | camera
    cloud_max_points: int = 200_000
    conf_threshold: float = 0.0
    conf_percentile: float = 20.0
    map_voxel_size: float = 0.02
    map_max_points: int = 1_000_000
    scale_source: str = "none"
    fixed_scale: float = 1.0
    depth_geometry: str = "camera"  # camera | model

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PipelineConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in params.items() if k in known})


@dataclass
class FrameResult:
    """Everything published for one input frame (all arrays numpy; transforms 4x4 float64)."""

    stamp_ns: int
    camera: int
    prediction: FramePrediction  # scaled
    T_map_cam: np.ndarray  # camera optical frame in map
    T_map_base: np.ndarray | None  # robot base in map (robot set-ups)
    T_map_odom: np.ndarray | None  # when another node publishes odom->base_link
    depth: np.ndarray  # (H, W) float32, NaN invalid, in the published geometry
    confidence: np.ndarray  # (H, W) float32
    K: np.ndarray  # 3x3 intrinsics of the published depth geometry
    cloud_xyz: np.ndarray  # (N, 3) float32 in cloud_frame
    cloud_rgb: np.ndarray  # (N, 3) uint8
    cloud_conf: np.ndarray  # (N,) float32
    scale: float
    scale_valid: bool
    timings: dict[str, float] = field(default_factory=dict)


class MappingPipeline:
    def __init__(self, cfg: PipelineConfig, session, logger=None, describe: str = ""):
        self.cfg = cfg
        self._describe = describe or type(session).__name__
        self.logger = logger
        self.reconstructor = StreamingReconstructor(
            session, Preprocessor(width=cfg.input_width, mode=cfg.input_mode), device=cfg.device, dtype="float32",
            intrinsics=cfg.intrinsics_source, points_source=cfg.points_source)
        self.gate = KeyframeGate(threshold=cfg.gate_threshold / 255.0, max_skip=cfg.gate_max_skip,
                                 enabled=cfg.gate_threshold > 0)
        self.scale_source = self._make_scale_source()
        self.map = VoxelMap(cfg.map_voxel_size, cfg.map_max_points)
        self.cloud_options = CloudOptions(
            conf_threshold=cfg.conf_threshold if cfg.conf_threshold > 0 else None,
            conf_percentile=cfg.conf_percentile if cfg.conf_percentile > 0 else None,
            max_points=cfg.cloud_max_points, frame="camera" if cfg.cloud_frame == "camera" else "world")
        self.T_map_world: np.ndarray | None = None  # fixed at the first frame of a stream
        self.last: FrameResult | None = None
        self.timings: dict[str, float] = {}

    def _make_scale_source(self):
        kind = self.cfg.scale_source
        if kind == "fixed":
            return FixedScale(self.cfg.fixed_scale)
        if kind == "depth":
            return DepthSensorScale()
        if kind == "odometry":
            return OdometryScale()
        return FixedScale(1.0)

    def describe(self) -> str:
        return self._describe

    # ------------------------------------------------------------------ stream
    def reset(self) -> None:
        self.reconstructor.reset()
        self.gate.reset()
        self.scale_source.reset()
        self.map.clear()
        self.T_map_world = None
        self.last = None

    def process(self, rgb: np.ndarray, stamp_ns: int, camera: int = 0, K_src=None, T_base_cam=None,
                T_odom_base=None, sensor_depth=None) -> FrameResult | None:
        """None when the keyframe gate skips the frame (near-duplicate); the caller republishes the last pose."""
        t0 = time.perf_counter()
        if not self.gate.check(rgb).keep:
            return None
        raw = self.reconstructor.step(rgb, stamp_ns, K_src=K_src)
        t_model = time.perf_counter()

        scale = self._update_scale(raw, sensor_depth, T_odom_base, T_base_cam)
        pred = raw.scaled(scale) if scale != 1.0 else raw
        if self.T_map_world is None:
            # map = REP-103 body axes at the first camera (camera only) or the robot base at the first frame
            self.T_map_world = T_MAP_WORLD.copy() if T_base_cam is None else np.asarray(T_base_cam, np.float64)
        T_map_cam = self.T_map_world @ pred.T_world_cam
        T_map_base = T_map_odom = None
        if T_base_cam is not None:
            T_map_base = T_map_cam @ inverse(T_base_cam)
            if T_odom_base is not None:
                T_map_odom = map_to_odom(T_map_base, T_odom_base)

        if self.cfg.depth_geometry == "camera":
            depth, confidence, K = pred.depth_source(), pred.depth_conf_source(), pred.K_source
        else:
            valid = pred.valid_mask()
            depth = np.where(valid, pred.depth, np.nan).astype(np.float32)
            confidence = np.where(valid, pred.depth_conf, np.nan).astype(np.float32)
            K = pred.K_model
        t_post = time.perf_counter()

        xyz, colours, conf = frame_cloud(pred, self.cloud_options)
        xyz_map = transform_points(self.T_map_world, xyz) if self.cloud_options.frame == "world" else None
        if xyz_map is None:  # cloud wanted in the camera frame: the map still needs map coordinates
            xyz_map = transform_points(T_map_cam, xyz)
        t_cloud = time.perf_counter()
        self.map.integrate(xyz_map, colours, conf)
        t_map = time.perf_counter()

        self.timings = {**{f"{k}": v for k, v in self.reconstructor.stats.last_s.items()},
                        "scale_and_frames": t_post - t_model, "cloud": t_cloud - t_post, "map_fusion": t_map - t_cloud,
                        "pipeline_total": t_map - t0}
        result = FrameResult(
            stamp_ns=stamp_ns, camera=camera, prediction=pred, T_map_cam=T_map_cam, T_map_base=T_map_base,
            T_map_odom=T_map_odom, depth=depth, confidence=confidence, K=K,
            cloud_xyz=xyz_map if self.cloud_options.frame == "world" else xyz, cloud_rgb=colours, cloud_conf=conf,
            scale=float(scale), scale_valid=bool(self.scale_source.valid), timings=dict(self.timings))
        self.last = result
        return result

    def _update_scale(self, raw: FramePrediction, sensor_depth, T_odom_base, T_base_cam) -> float:
        src = self.scale_source
        if isinstance(src, DepthSensorScale) and sensor_depth is not None:
            sensor = np.asarray(sensor_depth, np.float32)
            pred_src = raw.depth_source()
            if sensor.shape == pred_src.shape:
                src.update(sensor, pred_src)
        elif isinstance(src, OdometryScale) and T_odom_base is not None:
            if T_base_cam is not None and src.T_base_cam is None:
                src.T_base_cam = np.asarray(T_base_cam, np.float64)
            src.update(T_odom_base, raw.T_world_cam)
        return float(src.scale) if src.valid else 1.0

    # ------------------------------------------------------------------ map
    def map_size(self) -> int:
        return len(self.map)

    def map_points(self):
        return self.map.points()

    def save_map(self, path) -> str:
        xyz, rgb, conf = self.map.points()
        return str(save_map(path, xyz, rgb, conf))

    # ------------------------------------------------------------------ faults
    def window(self) -> int | None:
        """The rolling window of the current session (None = unlimited or not a windowed session)."""
        return getattr(self.reconstructor.session, "window", None)

    def shrink_window(self) -> int | None:
        """After a device out-of-memory error: open a new session of the same model with half the window.

        The KV cache is the memory that grows with the window, so halving it is the cheapest way to fit again. The
        new session is a new stream (new world frame), so the whole pipeline is reset (map included). Returns the
        new window, or None when the session cannot shrink (window already 1, the first frame of an unlimited
        stream, or a session without a model, e.g. the oracle).
        """
        session = self.reconstructor.session
        model = getattr(session, "model", None)
        if model is None or not callable(getattr(model, "stream", None)):
            return None
        old = getattr(session, "window", None)
        anchors = int(getattr(session, "anchors", 1))
        if old is None:  # unlimited: half of what it held when memory ran out
            held = int(getattr(session, "frames_seen", 0)) - anchors
            new = held // 2
        else:
            new = int(old) // 2
        if new < 1:
            return None
        session.reset()  # frees the old cache before the new one is allocated
        del session
        _free_device_memory()
        self.reconstructor.session = model.stream(window=new, anchors=anchors)
        self.reset()
        return new

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frames": self.reconstructor.stats.frames, "map points": len(self.map),
                               "scale": f"{self.last.scale:.4f}" if self.last else "nan",
                               "scale valid": self.last.scale_valid if self.last else False,
                               "scale source": self.cfg.scale_source}
        session_stats = getattr(self.reconstructor.session, "stats", None)
        if callable(session_stats):
            s = session_stats()
            out.update({"cache frames held": getattr(s, "frames_held", ""),
                        "cache capacity": getattr(s, "capacity_frames", "") or "unlimited",
                        "cache bytes": getattr(s, "aggregator_bytes", 0) + getattr(s, "camera_bytes", 0)})
        out.update({f"time {k} [ms]": f"{v * 1e3:.1f}" for k, v in self.timings.items()})
        try:
            import torch

            if torch.cuda.is_available():
                out["device memory allocated [MiB]"] = f"{torch.cuda.memory_allocated() / 2**20:.0f}"
                out["device memory peak [MiB]"] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        except ImportError:
            pass
        return out


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (torch.OutOfMemoryError), or a RuntimeError saying "out of memory" (what CPU
    and other device allocators raise)."""
    try:
        import torch

        oom_types: tuple[type, ...] = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                                        getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    except ImportError:
        oom_types = ()
    if oom_types and isinstance(exc, oom_types):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower())


def _free_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
