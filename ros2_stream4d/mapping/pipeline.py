"""One frame in, everything the node publishes out: gate -> reconstructor -> scale -> frames -> cloud -> map.

The node (ros/) and the offline bag processor share this pipeline; they only turn its FrameResult into messages.
Frames: ``world`` is the model's (first camera's optical frame); ``map`` is REP-103 body axes (camera only) or the
robot base at the first frame (when a base->camera extrinsic is given). Lengths are in model units times the
current scale (metres when a scale source is valid).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ros2_stream4d.mapping.backend.loops import LoopConfig
from ros2_stream4d.mapping.backend.posegraph import PoseGraphConfig
from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession
from ros2_stream4d.mapping.backend.service import BackendConfig, LongRunBackend
from ros2_stream4d.mapping.cloud import CloudOptions, frame_cloud
from ros2_stream4d.mapping.conventions import T_MAP_WORLD, inverse, map_to_odom, transform_points
from ros2_stream4d.mapping.gating import KeyframeGate
from ros2_stream4d.mapping.keyframe_map import KeyframeMap, KeyframeMapConfig, MapFrame
from ros2_stream4d.mapping.map_io import FORMATS, save_map
from ros2_stream4d.mapping.map_store import load_map_dir, save_map_dir
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
    gate_threshold: float = 0.0  # grey levels (0-255); 0 = off
    gate_max_skip: int = 30
    cloud_frame: str = "map"  # map | camera
    cloud_max_points: int = 200_000
    conf_threshold: float = 0.0
    conf_percentile: float = 20.0
    map_voxel_size: float = 0.02
    map_max_points: int = 1_000_000
    # keyframe map and its products (mapping/keyframe_map.py); lengths in metres (model units without scale)
    map_keyframe_distance: float = 0.3  # m: a new keyframe when the camera moved this far from the last
    map_keyframe_angle: float = 15.0  # deg: ... or turned this much
    map_keyframe_max_frames: int = 10  # frames stored per keyframe at most
    map_stride: int = 2  # pixel stride of the stored depth/colour (model resolution)
    map_cloud_stride: int = 2  # extra stride of the points fused into the cloud and the grid
    map_depth_max: float = 5.0  # m: depth fused into the TSDF
    map_cloud_depth_max: float = 0.0  # m: depth fused into the ~/map cloud; 0 = no limit
    map_conf_percentile: float = 50.0  # %: the map's products fuse each frame's pixels at or above this percentile
    map_cloud_surface_voxels: float = 2.0  # ~/map leaves out what the TSDF surface contradicts (voxels); 0 = off
    map_cloud_surface_pull: float = 0.75  # ... and moves what it keeps this fraction of the way to the surface
    map_max_keyframes_in_memory: int = 50  # older keyframes are spilled to map_spill_dir
    map_spill_dir: str = ""  # "" = a private temporary directory
    map_load_path: str = ""  # a saved map directory to continue from (start pose map_start_pose)
    map_start_pose: tuple = ()  # x, y, z, yaw (m, rad) of the body frame in map at the first frame
    mesh_enabled: bool = True  # TSDF + mesh
    tsdf_voxel_size: float = 0.05  # m
    tsdf_trunc_voxels: float = 6.0  # truncation distance in voxels (grazing floors need > 4)
    tsdf_device: str = "CPU:0"  # Open3D device, "CUDA:0" with the CUDA build of Open3D
    occupancy_enabled: bool = True
    occupancy_resolution: float = 0.05  # m per cell
    occupancy_floor_z: float = 0.0  # m: floor height in map
    occupancy_min_height: float = 0.1  # m above the floor: lower bound (exclusive) of obstacles
    occupancy_max_height: float = 1.5  # m above the floor: upper bound of obstacles
    occupancy_max_range: float = 5.0  # m: horizontal range of the grid's votes
    occupancy_slab_height: float = 0.2  # m: height resolution of the grid's evidence inside the band
    scale_source: str = "none"
    fixed_scale: float = 1.0
    depth_geometry: str = "camera"  # camera | model
    # long-run back-end (mapping/backend): segments, loop closure, Sim(3) pose graph; off = odometry only
    backend: bool = False
    segment_min_anchor_overlap: float = 0.3
    segment_max_frames: int = 120
    segment_min_frames: int = 24
    segment_overlap_frames: int = 8
    segment_alignment: str = "poses"  # poses | points (mapping/backend/segments.py)
    loop_min_similarity: float = 0.8
    loop_min_inliers: int = 20
    loop_search_radius: float = 1.0  # m
    loop_search_drift_fraction: float = 0.15
    loop_gate_distance: float = 0.5  # m: a loop disagreeing with the corrected map by more (+ per metre) is held
    loop_release_after: int = 3  # held loops join the graph once this many agree (0 = no gate)
    loop_release_wait: int = 8  # keyframes past a held loop's newer end before it is weighed (0 = at once)
    backend_drift_calibration: bool = True  # the graph estimates the front-end's rotation drift per metre
    backend_max_correction: float = 2.0  # m (+ a fraction of the path): a larger correction is dropped
    backend_apply_rate: float = 1.0  # Hz: how often an accepted correction is written into the map

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PipelineConfig:
        """From the node's parameter values. map_start_pose only means something with a map to load: without
        map_load_path the map is anchored at the first frame as usual."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in params.items() if k in known}
        if "map_start_pose" in values:
            values["map_start_pose"] = tuple(values["map_start_pose"]) if values.get("map_load_path") else ()
        return cls(**values)


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
    # with a back-end the poses of this result are odometry (their "map" is the odom frame) and this is the back-end's
    # map <- odom correction in force for this frame (identity until a loop is applied); None without a back-end
    odom_correction: np.ndarray | None = None


@dataclass(frozen=True)
class Skipped:
    """The frame was not used: ``reason`` is the short key counted in diagnostics, ``detail`` the log text."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Gated:
    """The keyframe gate judged the frame a near-duplicate: ``result`` is the last processed frame restamped with
    this frame's stamp (the robot stands still: its pose is republished), None before the first frame."""

    result: FrameResult | None


@dataclass(frozen=True)
class Processed:
    result: FrameResult


FrameOutcome = Skipped | Gated | Processed


class MappingPipeline:
    def __init__(self, cfg: PipelineConfig, session, logger=None, describe: str = ""):
        self.cfg = cfg
        self._describe = describe or type(session).__name__
        self.logger = logger
        self.backend: LongRunBackend | None = None  # the long-run back-end (cfg.backend)
        self._backend_applied_at = 0.0
        if cfg.backend:
            session = SegmentedSession(session, reanchor_policy(cfg))
            self.backend = LongRunBackend(backend_config(cfg), logger=logger)
            self._describe += ", back-end on (segments, loop closure, Sim(3) pose graph)"
        self.reconstructor = StreamingReconstructor(
            session, Preprocessor(width=cfg.input_width, mode=cfg.input_mode), device=cfg.device, dtype="float32",
            intrinsics=cfg.intrinsics_source, points_source=cfg.points_source)
        self.gate = KeyframeGate(threshold=cfg.gate_threshold / 255.0, max_skip=cfg.gate_max_skip,
                                 enabled=cfg.gate_threshold > 0)
        self.scale_source = self._make_scale_source()
        self.map = KeyframeMap(map_config(cfg))
        self._start_T_map_body: np.ndarray | None = start_pose_matrix(cfg.map_start_pose)
        self._next_T_map_world: np.ndarray | None = None  # a reset stream continues where the last left
        # a back-end's correction (mapping/backend/service.py); the poses published stay odometry. map_correction: the
        # rigid T_map_odom that map -> odom publishes. map_integration: the Sim(3) map <- odom that new frames enter the
        # keyframe map through (the graph's correction at its newest keyframe, scale included), so a frame's pose
        # relative to its keyframe stays the odometry's and a keyframe's Sim(3) pose scales all its frames alike.
        # None = identity.
        self.map_correction: np.ndarray | None = None
        self.map_integration: np.ndarray | None = None
        self.cloud_options = CloudOptions(
            conf_threshold=cfg.conf_threshold if cfg.conf_threshold > 0 else None,
            conf_percentile=cfg.conf_percentile if cfg.conf_percentile > 0 else None,
            max_points=cfg.cloud_max_points, frame="camera" if cfg.cloud_frame == "camera" else "world")
        self.T_map_world: np.ndarray | None = None  # fixed at the first frame of a stream
        self.last: FrameResult | None = None
        self.timings: dict[str, float] = {}
        if cfg.map_load_path:
            self.load_map(cfg.map_load_path, self._start_T_map_body)

    def update_config(self, cfg: PipelineConfig) -> None:
        """Apply the settings that may change while a stream runs (gate, cloud filtering, depth geometry);
        the others (model, input size, scale source, map bounds) need a new pipeline."""
        self.cfg = cfg
        self.gate.threshold, self.gate.max_skip = cfg.gate_threshold / 255.0, cfg.gate_max_skip
        self.gate.enabled = cfg.gate_threshold > 0
        self.cloud_options = CloudOptions(
            conf_threshold=cfg.conf_threshold if cfg.conf_threshold > 0 else None,
            conf_percentile=cfg.conf_percentile if cfg.conf_percentile > 0 else None,
            max_points=cfg.cloud_max_points, frame="camera" if cfg.cloud_frame == "camera" else "world")
        if self.backend is not None:  # loop acceptance may be tuned live (the worker reads them per keyframe)
            self.backend.detector.config = dataclasses.replace(
                self.backend.detector.config, min_similarity=cfg.loop_min_similarity,
                min_inliers=cfg.loop_min_inliers, search_radius_m=cfg.loop_search_radius,
                search_drift_fraction=cfg.loop_search_drift_fraction)

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
        # a new stream continues the map in a new segment (erase_map() is the explicit way to drop it); its
        # first camera is placed where the last stream's last camera was (a back-end may re-anchor it)
        self.map.new_segment()
        if self.T_map_world is not None and self.last is not None:
            self._next_T_map_world = self.last.T_map_cam.copy()
        self.T_map_world = None
        self.last = None

    def process(self, rgb: np.ndarray, stamp_ns: int, camera: int = 0, K_src=None, T_base_cam=None,
                T_odom_base=None, sensor_depth=None) -> Processed | Gated:
        """One frame through the model and the map; Gated when the keyframe gate skips it (near-duplicate)."""
        t0 = time.perf_counter()
        if not self.gate.check(rgb).keep:
            last = self.last
            return Gated(dataclasses.replace(last, stamp_ns=stamp_ns, camera=camera) if last is not None else None)
        raw = self.reconstructor.step(rgb, stamp_ns, K_src=K_src)
        t_model = time.perf_counter()

        scale = self._update_scale(raw, sensor_depth, T_odom_base, T_base_cam)
        pred = raw.scaled(scale) if scale != 1.0 else raw
        if self.T_map_world is None:
            # map = REP-103 body axes at the first camera (camera only) or the robot base at the first frame,
            # unless a start pose of that body frame was given (a loaded map) or a reset stream continues
            body = T_MAP_WORLD.copy() if T_base_cam is None else np.asarray(T_base_cam, np.float64)
            if self._next_T_map_world is not None:
                self.T_map_world = self._next_T_map_world
            elif self._start_T_map_body is not None:
                self.T_map_world = self._start_T_map_body @ body
            else:
                self.T_map_world = body
            self._next_T_map_world = self._start_T_map_body = None
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
        if self.cloud_options.frame == "world":  # ~/cloud in map; in the camera frame it stays as it is
            xyz = transform_points(self.T_map_world, xyz)
        t_cloud = time.perf_counter()
        T_map_cam_map = T_map_cam if self.map_integration is None else self.map_integration @ T_map_cam
        self.map.integrate(self._map_frame(pred, T_map_cam_map, stamp_ns))
        t_map = time.perf_counter()

        self.timings = {**{f"{k}": v for k, v in self.reconstructor.stats.last_s.items()},
                        "scale_and_frames": t_post - t_model, "cloud": t_cloud - t_post, "map_fusion": t_map - t_cloud,
                        "pipeline_total": t_map - t0}
        result = FrameResult(
            stamp_ns=stamp_ns, camera=camera, prediction=pred, T_map_cam=T_map_cam, T_map_base=T_map_base,
            T_map_odom=T_map_odom, depth=depth, confidence=confidence, K=K,
            cloud_xyz=xyz, cloud_rgb=colours, cloud_conf=conf,
            scale=float(scale), scale_valid=self.scale_valid(), timings=dict(self.timings))
        self.last = result
        if self.backend is not None:
            result.odom_correction = C = self._run_backend()
            if self.cloud_options.frame == "world" and not np.array_equal(C, np.eye(4)):  # ~/cloud stays in map
                result.cloud_xyz = transform_points(C, result.cloud_xyz).astype(np.float32)
            t_backend = time.perf_counter()
            self.timings.update(backend=t_backend - t_map, pipeline_total=t_backend - t0)
            result.timings = dict(self.timings)
        return Processed(result)

    def _run_backend(self) -> np.ndarray:
        """Hand new keyframes to the back-end's worker (a copy of each one's first frame) and, at most
        backend_apply_rate times a second, write its newest accepted correction into the keyframe map. Returns the
        map <- odom correction in force (what map -> odom publishes)."""
        self.backend.observe(self)
        now = time.monotonic()
        if now - self._backend_applied_at >= 1.0 / self.cfg.backend_apply_rate:
            self._backend_applied_at = now
            self.backend.apply(self)
        return np.eye(4) if self.map_correction is None else self.map_correction.copy()

    def scale_valid(self) -> bool:
        """True when lengths are metres: a scale source other than 'none' holds a valid scale."""
        return self.cfg.scale_source != "none" and bool(self.scale_source.valid)

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
    def _map_frame(self, pred: FramePrediction, T_map_cam: np.ndarray, stamp_ns: int) -> MapFrame:
        """The frame for the keyframe map: model-resolution metric depth with the cloud's confidence mask applied
        (rejected pixels NaN), its confidence, colour and K. The back-end measures its geometry on this; the
        products apply the map's own, stricter cut (map_conf_percentile) when they fuse it."""
        valid = pred.valid_mask()
        conf = pred.depth_conf
        valid &= np.isfinite(conf)
        o = self.cloud_options
        if o.conf_threshold is not None:
            valid &= conf >= o.conf_threshold
        if o.conf_percentile is not None and valid.any():
            sub = valid[::4, ::4]  # the percentile of a regular subsample: same cut, a sixteenth of the work
            ref = conf[::4, ::4][sub] if sub.any() else conf[valid]
            valid &= conf >= np.percentile(ref, o.conf_percentile)
        depth = np.where(valid, pred.depth, np.nan).astype(np.float32)
        return MapFrame(stamp_ns, T_map_cam, depth, pred.rgb_model, pred.K_model, conf, descriptor=pred.descriptor)

    def map_size(self) -> int:
        """Voxels of the fused cloud: what ~/map holds before the surface filter leaves out what the TSDF
        contradicts (map_cloud_surface_voxels), so an upper bound on ~/map's points (0: no map yet)."""
        return len(self.map)

    def map_points(self):
        """(xyz float32 (N, 3), rgb uint8 (N, 3), conf float32 (N,)) of the ~/map cloud, in map."""
        return self.map.points()

    def mesh(self):
        """(vertices float32 (V, 3), triangles int32 (T, 3), colours uint8 (V, 3)) of the TSDF mesh, in map."""
        return self.map.mesh()

    def occupancy(self):
        """(data int8 (H, W) -1/0/100, origin (x, y) in map, resolution): nav_msgs/OccupancyGrid layout."""
        return self.map.occupancy()

    def keyframe_poses(self) -> dict[int, np.ndarray]:
        """T_map_kf of every keyframe (id -> 4x4)."""
        return self.map.keyframe_poses()

    def update_keyframe_pose(self, keyframe_id: int, T_map_kf) -> None:
        """A pose correction of one keyframe; the cloud, mesh and grid follow (rebuilt at the next query)."""
        self.map.update_poses({int(keyframe_id): np.asarray(T_map_kf, np.float64)})

    def update_keyframe_poses(self, poses: dict) -> None:
        self.map.update_poses({int(k): np.asarray(v, np.float64) for k, v in poses.items()})

    def erase_map(self) -> None:
        """Drop the whole map (the explicit action; a stream reset keeps it) and the back-end's graph over it."""
        self.map.erase()
        self._restart_backend()

    def settle_backend(self, timeout: float | None = None) -> bool:
        """Wait until the back-end's worker has handled every keyframe handed to it, then apply its newest
        correction (the end of an offline run, tests). False when the worker was still busy at the timeout."""
        if self.backend is None:
            return True
        idle = self.backend.wait_idle(timeout)
        self.backend.apply(self)
        return self.map.wait_rebuilt(timeout) and idle

    def _restart_backend(self) -> None:
        """A new map: the back-end's graph (keyframe ids of the old map) and its correction start again."""
        self.map_correction = self.map_integration = None
        if self.backend is not None:
            self.backend.close()
            self.backend = LongRunBackend(backend_config(self.cfg), logger=self.logger)

    def close(self) -> None:
        """Stop the back-end's worker thread and free the map's spill directory (the pipeline is not used after)."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.map.close()

    def save_map(self, path) -> str:
        """A .ply / .pcd path: the cloud alone (atomic file). Any other path: the whole map as a directory
        (keyframes, cloud, mesh, nav2 grid, metadata; atomic; mapping/map_store.py)."""
        if str(path).lower().endswith(FORMATS):
            xyz, rgb, conf = self.map.points()
            return str(save_map(path, xyz, rgb, conf))
        last = self.last
        self.map.wait_rebuilt()  # the saved mesh and grid follow every pose correction applied so far
        return str(save_map_dir(self.map, path, scale=last.scale if last else None,
                                scale_valid=bool(last and last.scale_valid)))

    def load_map(self, path, start_pose=None) -> dict:
        """Replace the map by a saved map directory and start a new stream in it; the next stream's body frame
        (base_link, or the camera's body axes) starts at ``start_pose`` (4x4 T_map_body; None = the map origin).
        A bad directory raises MapDirectoryError and leaves the running map as it was. Returns the metadata."""
        new_map, meta = load_map_dir(path, map_config(self.cfg))
        old = self.map
        self.map = new_map
        old.close()
        self.reconstructor.reset()
        self.gate.reset()
        self.scale_source.reset()
        self.T_map_world, self.last, self._next_T_map_world = None, None, None
        self._start_T_map_body = np.eye(4) if start_pose is None else np.asarray(start_pose, np.float64)
        self._restart_backend()
        return meta


    # ------------------------------------------------------------------ faults
    def window(self) -> int | None:
        """The rolling window of the current session (None = unlimited or not a windowed session)."""
        return self.reconstructor.session.window

    def shrink_window(self) -> int | None:
        """After a device out-of-memory error: open a new session of the same model with half the window.

        The KV cache is the memory that grows with the window, so halving it is the cheapest way to fit again. The
        new session is a new stream (new world frame), so the whole pipeline is reset (map included). Returns the
        new window, or None when the session cannot shrink (window already 1, the first frame of an unlimited
        stream, or a session without a cache, e.g. the oracle).
        """
        session = self.reconstructor.session
        old = session.window
        new = (session.frames_seen - session.anchors) // 2 if old is None else int(old) // 2  # unlimited: half held
        if new < 1:
            return None
        smaller = session.shrunk(new)  # frees the old cache before the new one is allocated
        if smaller is None:
            return None
        del session
        _free_device_memory()
        self.reconstructor.session = smaller
        self.reset()
        return new

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"frames": self.reconstructor.stats.frames,
                               "frames with nominal 60 deg intrinsics": self.reconstructor.stats.fallback_intrinsics, **self.map.stats(),
                               "scale": f"{self.last.scale:.4f}" if self.last else "nan",
                               "scale valid": self.last.scale_valid if self.last else False,
                               "scale source": self.cfg.scale_source}
        s = self.reconstructor.session.stats()
        if s is not None:
            out.update({"cache frames held": s.frames_held, "cache capacity": s.capacity_frames or "unlimited",
                        "cache bytes": s.aggregator_bytes + s.camera_bytes})
        out.update({f"time {k} [ms]": f"{v * 1e3:.1f}" for k, v in self.timings.items()})
        if self.backend is not None:
            out.update({f"backend {k}": v for k, v in self.backend.diagnostics().items()})
            seg = self.reconstructor.session.segment_stats
            out.update({"backend segments": seg.segments, "backend segment alignments failed": seg.failed_alignments})
        try:
            import torch

            if torch.cuda.is_available():
                out["device memory allocated [MiB]"] = f"{torch.cuda.memory_allocated() / 2**20:.0f}"
                out["device memory peak [MiB]"] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}"
        except ImportError:
            pass
        return out


def reanchor_policy(cfg: PipelineConfig) -> ReanchorPolicy:
    """When the back-end's segmented session starts a new segment."""
    return ReanchorPolicy(min_anchor_overlap=cfg.segment_min_anchor_overlap, max_segment_frames=cfg.segment_max_frames,
                          min_segment_frames=cfg.segment_min_frames, overlap_frames=cfg.segment_overlap_frames,
                          alignment=cfg.segment_alignment)


def backend_config(cfg: PipelineConfig) -> BackendConfig:
    """The back-end's loop detection and pose-graph settings from the pipeline's."""
    return BackendConfig(
        loops=LoopConfig(min_similarity=cfg.loop_min_similarity, min_inliers=cfg.loop_min_inliers,
                         search_radius_m=cfg.loop_search_radius, search_drift_fraction=cfg.loop_search_drift_fraction),
        graph=PoseGraphConfig(max_correction_m=cfg.backend_max_correction, gate_trans_m=cfg.loop_gate_distance,
                              drift_calibration=cfg.backend_drift_calibration),
        release_after=cfg.loop_release_after, release_wait=cfg.loop_release_wait)


def map_config(cfg: PipelineConfig) -> KeyframeMapConfig:
    """The keyframe map's settings from the pipeline's."""
    return KeyframeMapConfig(
        cloud_voxel_size=cfg.map_voxel_size, cloud_max_points=cfg.map_max_points, tsdf=cfg.mesh_enabled,
        tsdf_voxel_size=cfg.tsdf_voxel_size, tsdf_trunc_voxels=cfg.tsdf_trunc_voxels, depth_max=cfg.map_depth_max,
        cloud_depth_max=cfg.map_cloud_depth_max, cloud_surface_voxels=cfg.map_cloud_surface_voxels,
        cloud_surface_pull=cfg.map_cloud_surface_pull,
        conf_percentile=cfg.map_conf_percentile,
        tsdf_device=cfg.tsdf_device, occupancy=cfg.occupancy_enabled, occupancy_resolution=cfg.occupancy_resolution,
        occupancy_floor_z=cfg.occupancy_floor_z, occupancy_min_height=cfg.occupancy_min_height,
        occupancy_max_height=cfg.occupancy_max_height, occupancy_max_range=cfg.occupancy_max_range,
        occupancy_slab_height=cfg.occupancy_slab_height,
        keyframe_distance=cfg.map_keyframe_distance, keyframe_angle_deg=cfg.map_keyframe_angle,
        keyframe_max_frames=cfg.map_keyframe_max_frames, stride=cfg.map_stride, cloud_stride=cfg.map_cloud_stride,
        max_keyframes_in_memory=cfg.map_max_keyframes_in_memory, spill_dir=cfg.map_spill_dir,
        background_rebuild=cfg.backend)  # the back-end's corrections must not stall the frame thread


def start_pose_matrix(pose) -> np.ndarray | None:
    """(x, y, z, yaw) in metres / radians -> 4x4 T_map_body; () or None -> None (the map origin)."""
    if pose is None or len(pose) == 0:
        return None
    if len(pose) != 4:
        raise ValueError(f"map_start_pose must be [x, y, z, yaw], got {list(pose)}")
    x, y, z, yaw = (float(v) for v in pose)
    T = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = [x, y, z]
    return T


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
