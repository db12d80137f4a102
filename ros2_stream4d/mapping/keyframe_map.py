"""The keyframe map: geometry kept per keyframe in its own frame with its pose beside it, and the products built
from it (the ``~/map`` cloud, a TSDF mesh, a 2D occupancy grid).

A keyframe is a small submap: the frames processed while the camera stays near the keyframe's first camera pose
(``keyframe_distance`` metres, ``keyframe_angle_deg`` degrees, at most ``keyframe_max_frames`` frames). Each frame
is stored as what rebuilds every product: metric z-depth (float16, NaN = invalid or rejected by the confidence
mask), its confidence (float16), colour (uint8) and intrinsics, at a pixel ``stride`` of the model's resolution,
with its camera pose relative to the keyframe (fixed). The keyframe's pose in ``map`` (T_map_kf) is the only
thing a pose correction changes: ``update_poses`` moves the keyframe and the products follow (they are rebuilt from
the stored frames at the next query; nothing re-runs the model). A pose may be a Sim(3) ``[[s R, t], [0, 1]]``
(a pose graph that corrected the scale of the segment the keyframe came from): its frames' depth is then s times
longer in ``map`` (a monocular model whose scale drifted saw everything s times too small or large).

Products are caches: every integrated frame goes into them at once (cheap: one TSDF integration, one voxel fusion,
one set of grid votes), and a pose update marks them stale and rebuilds them from all keyframes in the original
order, so a rebuilt map equals the one a stream with the corrected poses would have built. The cloud a query
returns leaves out the voxels the fused TSDF surface contradicts (``cloud_surface_voxels``; noisy depth and outliers
fall in space the TSDF has fused yet far from its surface) and moves the ones it keeps part of the way to that
surface (``cloud_surface_pull``: the TSDF averaged every frame that saw the place); what lies beyond the TSDF's reach
is kept as fused.

Memory: at most ``max_keyframes_in_memory`` keyframes keep their frames in RAM; older ones are spilled to
``spill_dir`` (one .npz each, no pickle) and read back only for a rebuild or a save. Their poses stay in memory.

Segments: ``new_segment()`` (a stream reset) starts a new keyframe in a new segment and keeps the map; ``erase()``
is the explicit way to drop it. The frames of the map are: ``map`` (everything returned here), each keyframe's
frame ``kf`` (its first camera's optical frame).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.conventions import inverse, pixel_rays, rotation_angle_deg, transform_points
from ros2_stream4d.mapping.fusion import VoxelMap
from ros2_stream4d.mapping.occupancy import OccupancyGrid, OccupancyOptions, frame_votes
from ros2_stream4d.mapping.tsdf import TsdfVolume

KEYFRAME_FILE_VERSION = 1
CATCH_UP_FRAMES = 3  # a background rebuild fuses at most this many frames under the lock before its swap


@dataclass
class KeyframeMapConfig:
    cloud_voxel_size: float = 0.02  # m: voxel of the ~/map cloud
    cloud_max_points: int = 1_000_000
    cloud_batch_points: int = 100_000  # frames' points wait until this many, then fuse at once (or at a query)
    tsdf: bool = True
    tsdf_voxel_size: float = 0.05  # m
    tsdf_trunc_voxels: float = 6.0  # truncation distance in voxels (grazing floors need > 4: corridor recall 0.93 -> 0.98)
    depth_max: float = 5.0  # m: depth beyond this is not fused into the TSDF
    cloud_depth_max: float = 0.0  # m: depth of the points fused into the cloud; 0 = no limit (as ~/map was)
    # ~/map leaves out the cloud's voxels the fused TSDF surface contradicts (in fused space, farther than this many
    # TSDF voxels from its surface: noisy depth, outliers); 0 = every voxel; nothing is dropped without the TSDF
    cloud_surface_voxels: float = 2.0
    # ... and moves the voxels it keeps this fraction of their distance to the surface's local plane (0 = not at all,
    # 1 = onto it): the TSDF averaged every frame that saw the place, a 2 cm cloud voxel a few samples
    cloud_surface_pull: float = 0.75
    # the products fuse each stored frame's pixels whose confidence is at or above this percentile of the frame's
    # (pixels with confidence > 0; 0 = every stored pixel). The stored frames keep what the node's cloud keeps (the
    # back-end measures on them); fusion cannot undo a wrong depth, so the products take the most confident ones
    conf_percentile: float = 50.0
    tsdf_device: str = "CPU:0"  # Open3D device ("CUDA:0" on a robot with the CUDA build)
    occupancy: bool = True
    occupancy_resolution: float = 0.05  # m per cell
    occupancy_floor_z: float = 0.0  # m, floor height in map
    occupancy_min_height: float = 0.1  # m above the floor
    occupancy_max_height: float = 1.5  # m above the floor
    occupancy_max_range: float = 5.0  # m
    occupancy_slab_height: float = 0.2  # m: height resolution of the grid's evidence inside the band
    keyframe_distance: float = 0.3  # m
    keyframe_angle_deg: float = 15.0
    keyframe_max_frames: int = 10
    stride: int = 2  # pixel stride of the stored depth / colour (of the model resolution)
    cloud_stride: int = 2  # pixel stride (of the stored frame) of the points fused into the cloud and the grid
    max_keyframes_in_memory: int = 50
    # a pose update rebuilds the products in a background thread (the frame thread keeps integrating into the
    # current ones, queries return them until the rebuilt set is swapped in); False = at the next query or frame
    background_rebuild: bool = False
    spill_dir: str = ""  # "" = a private temporary directory, removed with the map

    def __post_init__(self):
        if self.stride < 1 or self.cloud_stride < 1 or self.keyframe_max_frames < 1 or self.max_keyframes_in_memory < 1:
            raise ValueError("stride, keyframe_max_frames and max_keyframes_in_memory must be >= 1")
        if not (self.keyframe_distance > 0 and self.keyframe_angle_deg > 0 and self.depth_max > 0):
            raise ValueError("keyframe_distance, keyframe_angle_deg and depth_max must be > 0")
        if not self.cloud_surface_voxels >= 0:
            raise ValueError(f"cloud_surface_voxels must be >= 0, got {self.cloud_surface_voxels}")
        if not 0 <= self.cloud_surface_pull <= 1:
            raise ValueError(f"cloud_surface_pull must be in [0, 1], got {self.cloud_surface_pull}")
        if not 0 <= self.conf_percentile < 100:
            raise ValueError(f"conf_percentile must be in [0, 100), got {self.conf_percentile}")
        self.occupancy_options()  # validates the band and resolution

    def occupancy_options(self) -> OccupancyOptions:
        return OccupancyOptions(self.occupancy_resolution, self.occupancy_floor_z, self.occupancy_min_height,
                                self.occupancy_max_height, self.occupancy_max_range, self.occupancy_slab_height)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class MapFrame:
    """One processed frame for the map: metric z-depth (NaN = invalid or below the confidence mask), its
    confidence, colour, pinhole K of that image and the camera optical frame's pose in ``map``: rigid, or a Sim(3)
    whose scale sizes the depth (a back-end's correction of the odometry's scale)."""

    stamp_ns: int
    T_map_cam: np.ndarray
    depth: np.ndarray  # (h, w) float
    rgb: np.ndarray  # (h, w, 3) uint8
    K: np.ndarray  # (3, 3)
    conf: np.ndarray | None = None  # (h, w) float; None = 1
    descriptor: np.ndarray | None = None  # (D,) the model's place descriptor of the frame; None = the model has none


@dataclass
class FrameBatch:
    """The stored frames of one keyframe (arrays stacked over its n frames)."""

    stamps: np.ndarray  # (n,) int64
    T_kf_cam: np.ndarray  # (n, 4, 4) float64
    K: np.ndarray  # (n, 3, 3) float64
    depth: np.ndarray  # (n, h, w) float16
    conf: np.ndarray  # (n, h, w) float16
    rgb: np.ndarray  # (n, h, w, 3) uint8

    def __len__(self) -> int:
        return len(self.stamps)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.stamps, self.T_kf_cam, self.K, self.depth, self.conf, self.rgb))

    def append(self, stamp, T_kf_cam, K, depth, conf, rgb) -> FrameBatch:
        return FrameBatch(np.append(self.stamps, np.int64(stamp)), np.concatenate([self.T_kf_cam, T_kf_cam[None]]),
                          np.concatenate([self.K, K[None]]), np.concatenate([self.depth, depth[None]]),
                          np.concatenate([self.conf, conf[None]]), np.concatenate([self.rgb, rgb[None]]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"stamps": self.stamps, "T_kf_cam": self.T_kf_cam, "K": self.K, "depth": self.depth,
                "conf": self.conf, "rgb": self.rgb}

    @classmethod
    def from_arrays(cls, a, where: str = "keyframe") -> FrameBatch:
        """Validated batch from a mapping of arrays (an opened .npz); ValueError naming what is wrong."""
        missing = [k for k in ("stamps", "T_kf_cam", "K", "depth", "conf", "rgb") if k not in a]
        if missing:
            raise ValueError(f"{where}: missing arrays {missing}")
        b = cls(np.asarray(a["stamps"]), np.asarray(a["T_kf_cam"]), np.asarray(a["K"]), np.asarray(a["depth"]),
                np.asarray(a["conf"]), np.asarray(a["rgb"]))
        n = len(b.stamps)
        if b.depth.ndim != 3 or n == 0:
            raise ValueError(f"{where}: depth must be (n >= 1, h, w), got {b.depth.shape}")
        h, w = b.depth.shape[1:]
        expect = {"stamps": ((n,), np.int64), "T_kf_cam": ((n, 4, 4), np.float64), "K": ((n, 3, 3), np.float64),
                  "depth": ((n, h, w), np.float16), "conf": ((n, h, w), np.float16), "rgb": ((n, h, w, 3), np.uint8)}
        for k, (shape, dtype) in expect.items():
            arr = getattr(b, k)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"{where}: {k} must be {shape} {np.dtype(dtype).name}, got {arr.shape} {arr.dtype}")
        if not (np.isfinite(b.T_kf_cam).all() and np.isfinite(b.K).all()):
            raise ValueError(f"{where}: non-finite poses or intrinsics")
        return b


def empty_batch(h: int, w: int) -> FrameBatch:
    return FrameBatch(np.zeros(0, np.int64), np.zeros((0, 4, 4)), np.zeros((0, 3, 3)), np.zeros((0, h, w), np.float16),
                      np.zeros((0, h, w), np.float16), np.zeros((0, h, w, 3), np.uint8))


@dataclass
class Keyframe:
    id: int
    segment: int
    T_map_kf: np.ndarray  # (4, 4) float64: the keyframe frame (its first camera) in map; rigid or a Sim(3)
    frames: FrameBatch | None  # None while spilled to disk
    n_frames: int = 0
    spill_path: Path | None = None
    descriptor: np.ndarray | None = None  # the model's place descriptor of its first frame (in memory, not saved)

    @property
    def in_memory(self) -> bool:
        return self.frames is not None


def _is_similarity(T: np.ndarray, tol: float = 1e-6) -> bool:
    """[[s R, t], [0, 0, 0, 1]] with R a rotation and s > 0."""
    A = T[:3, :3]
    det = np.linalg.det(A)
    if not det > 0 or not np.allclose(T[3], (0, 0, 0, 1), atol=tol):
        return False
    R = A / np.cbrt(det)
    return bool(np.allclose(R @ R.T, np.eye(3), atol=tol))


class MapRebuildError(RuntimeError):
    """A background rebuild of the products failed (e.g. a spilled keyframe file could not be read back): the
    products do not follow the last pose update; the next pose update tries again."""


def _locked(method):
    """Run a KeyframeMap method under the map's lock (integration and product queries come from several threads)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def write_keyframe_file(path: Path, kf_id: int, segment: int, frames: FrameBatch) -> None:
    """One keyframe's frames as an uncompressed .npz (no pickle); fsynced."""
    with open(path, "wb") as f:
        np.savez(f, version=np.int64(KEYFRAME_FILE_VERSION), id=np.int64(kf_id), segment=np.int64(segment),
                 **frames.arrays())
        f.flush()
        os.fsync(f.fileno())


def read_keyframe_file(path: Path, kf_id: int | None = None) -> tuple[int, int, FrameBatch]:
    """(id, segment, frames) of a keyframe file; ValueError naming the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "version" not in z or int(z["version"]) != KEYFRAME_FILE_VERSION:
                raise ValueError(f"keyframe file {path.name}: unknown or missing version")
            kid, seg = int(z["id"]), int(z["segment"])
            if kf_id is not None and kid != kf_id:
                raise ValueError(f"keyframe file {path.name} holds keyframe {kid}, expected {kf_id}")
            return kid, seg, FrameBatch.from_arrays({k: z[k] for k in z.files}, where=f"keyframe file {path.name}")
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, OSError, KeyError of a truncated file
        raise ValueError(f"keyframe file {path.name} is unreadable ({type(exc).__name__}: {exc})") from exc


def confident_depth(depth: np.ndarray, conf: np.ndarray, percentile: float) -> np.ndarray:
    """depth (h, w) with NaN where conf is below the given percentile of the frame's confidences (pixels with
    confidence > 0, finite), or is not finite."""
    c = np.asarray(conf, np.float32)
    rated = np.isfinite(c) & (c > 0)
    if not rated.any():
        return np.full_like(depth, np.nan)
    sub = rated[::2, ::2]  # the percentile of a regular subsample: the same cut, a quarter of the work
    ref = c[::2, ::2][sub] if sub.any() else c[rated]
    keep = rated & (c >= np.percentile(ref, percentile))
    return np.where(keep, depth, np.float32(np.nan)).astype(depth.dtype, copy=False)


class MapProducts:
    """One set of products (the ~/map cloud, the TSDF, the occupancy grid), fed frame by frame. A rebuild fills a
    fresh set from the stored keyframes."""

    def __init__(self, config: KeyframeMapConfig):
        c = self.config = config
        self.cloud = VoxelMap(c.cloud_voxel_size, c.cloud_max_points)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_points = 0
        self.tsdf = TsdfVolume(c.tsdf_voxel_size, c.tsdf_trunc_voxels, c.depth_max, device=c.tsdf_device) \
            if c.tsdf else None
        self.grid = OccupancyGrid(c.occupancy_options()) if c.occupancy else None
        self._ray_cache: tuple = (None, None)

    def _rays(self, hw, K: np.ndarray) -> np.ndarray:
        key = (hw, K.tobytes())
        if self._ray_cache[0] != key:
            self._ray_cache = (key, pixel_rays(hw, K))
        return self._ray_cache[1]

    def fuse(self, depth: np.ndarray, conf: np.ndarray, rgb: np.ndarray, K: np.ndarray, T_map_cam: np.ndarray):
        """Every product takes one stored frame (depth float32 with NaN, already strided). T_map_cam may be a
        Sim(3): its scale goes into the depth, the products see a rigid pose."""
        if self.config.conf_percentile > 0:
            depth = confident_depth(depth, conf, self.config.conf_percentile)
        R, t, scale = S3.decompose(T_map_cam)
        if abs(scale - 1.0) > 1e-9:
            depth = depth * np.float32(scale)
            T_map_cam = np.eye(4)
            T_map_cam[:3, :3], T_map_cam[:3, 3] = R, t
        if self.tsdf is not None:
            self.tsdf.integrate(depth, rgb, K, T_map_cam)
        cs = self.config.cloud_stride
        d = depth[::cs, ::cs]
        Kc = K.copy()
        Kc[:2] /= cs
        valid = np.isfinite(d) & (d > 0) & (d <= (self.config.cloud_depth_max or np.inf))
        pts = self._rays(d.shape, Kc)[valid] * d[valid, None].astype(np.float64)
        pts_map = transform_points(T_map_cam, pts)
        # the voxel hash re-sorts its arrays on every merge: merge batches of frames, not every frame
        self._pending.append((pts_map, rgb[::cs, ::cs][valid], conf[::cs, ::cs][valid].astype(np.float32)))
        self._pending_points += len(pts_map)
        if self._pending_points >= self.config.cloud_batch_points:
            self.flush_cloud()
        if self.grid is not None:
            self.grid.add(frame_votes(pts_map, T_map_cam[:3, 3], self.grid.options))

    def fuse_batch(self, frames: FrameBatch, T_map_kf: np.ndarray, start: int = 0) -> None:
        """Frames start.. of a keyframe whose pose in map is T_map_kf."""
        for i in range(start, len(frames)):
            self.fuse(frames.depth[i].astype(np.float32), frames.conf[i], frames.rgb[i], frames.K[i],
                      T_map_kf @ frames.T_kf_cam[i])

    def flush_cloud(self) -> None:
        if self._pending:
            xyz, rgb, conf = (np.concatenate(a) for a in zip(*self._pending))
            self._pending, self._pending_points = [], 0
            self.cloud.integrate(xyz, rgb, conf)

    @property
    def surface_filtered(self) -> bool:
        """Whether the map's cloud leaves out what the TSDF surface contradicts (needs the TSDF)."""
        return self.tsdf is not None and self.config.cloud_surface_voxels > 0

    def cloud_snapshot(self):
        """(the cloud's (xyz, rgb, conf), the TSDF's SurfaceSnapshot or None when the filter is off), copied: what
        fit_to_surface filters, taken under the map's lock; the filtering itself needs no lock."""
        self.flush_cloud()
        cloud = self.cloud.points()
        return cloud, (self.tsdf.snapshot() if self.surface_filtered and len(cloud[0]) else None)


def fit_to_surface(cloud, surface, config: KeyframeMapConfig):
    """The cloud (xyz, rgb, conf) without the points the surface snapshot contradicts (cloud_surface_voxels TSDF
    voxels), the rest moved cloud_surface_pull of the way to the fused surface (SurfaceSnapshot.fit); all of it, where
    it was, when there is no snapshot."""
    xyz, rgb, conf = cloud
    if surface is None:
        return xyz, rgb, conf
    keep, moved = surface.fit(xyz, config.cloud_surface_voxels * config.tsdf_voxel_size, config.cloud_surface_pull)
    return moved[keep].astype(xyz.dtype), rgb[keep], conf[keep]


class KeyframeMap:
    """The one map interface: ``integrate(frame)``, ``update_poses``, ``points()`` (cloud), ``mesh()``,
    ``occupancy()``, ``new_segment()``, ``erase()`` (see the module docstring)."""

    def __init__(self, config: KeyframeMapConfig | None = None):
        self.config = config or KeyframeMapConfig()
        self._lock = threading.RLock()  # the node's worker integrates while timers and services read products
        self._spill_root: Path | None = None
        self._finalizer = None
        self.keyframes: list[Keyframe] = []
        self._spilled = 0  # keyframes[:_spilled] are on disk
        self._buf: dict[str, np.ndarray] = {}  # the open keyframe's preallocated frame buffers
        self.segment = 0
        self._current: Keyframe | None = None
        self._next_id = 0
        self._build_products()
        self.stale = False
        self.frames = 0
        self.rebuilds = 0
        self._generation = 0  # pose updates so far (a background rebuild is current while this is unchanged)
        self._epoch = 0  # erases so far (a rebuild started before an erase is dropped)
        self._rebuilder: threading.Thread | None = None
        self._rebuilt = threading.Condition(self._lock)
        self.rebuild_error: str | None = None  # why the last background rebuild failed (None: it did not)

    # ------------------------------------------------------------------ products
    @property
    def cloud(self) -> VoxelMap:
        return self.products.cloud

    @property
    def tsdf(self) -> TsdfVolume | None:
        return self.products.tsdf

    @property
    def grid(self) -> OccupancyGrid | None:
        return self.products.grid

    def _build_products(self) -> None:
        self.products = MapProducts(self.config)

    def _refresh(self) -> None:
        """Products stale after a pose update: rebuilt now, or (background_rebuild) by the rebuild thread while the
        current ones stay in use."""
        if not self.stale:
            return
        if self.config.background_rebuild:
            if self.rebuild_error is None:  # a failed rebuild is tried again at the next pose update, not per frame
                self._start_rebuild()
            return
        self._build_products()
        for kf in self.keyframes:
            self.products.fuse_batch(self._frames_of(kf), kf.T_map_kf)
        self.stale = False
        self.rebuilds += 1

    def _start_rebuild(self) -> None:
        if self._rebuilder is None or not self._rebuilder.is_alive():
            self._rebuilder = threading.Thread(target=self._rebuild, name="stream4d-map-rebuild", daemon=True)
            self._rebuilder.start()

    def _rebuild(self) -> None:
        """The rebuild thread's body: a failure is recorded (rebuild_error, stats()) and wakes wait_rebuilt, which
        raises MapRebuildError, instead of ending the thread silently with the products stale for good."""
        try:
            self._rebuild_products()
        except Exception as exc:  # noqa: BLE001 - any failure of the thread is reported to the map's users
            with self._rebuilt:
                self.rebuild_error = f"{type(exc).__name__}: {exc}"
                self._rebuilt.notify_all()

    def _rebuild_products(self) -> None:
        """Background rebuild: a fresh product set from a snapshot of the keyframes and their poses (each one's
        frames copied under the lock, fused outside it), then, under the lock, the frames integrated since the
        snapshot, and the swap. A pose update during the build does not restart it (on a long run corrections come
        faster than a rebuild of the whole map, which then never finished: ~/map never showed a correction): the
        build finishes with the poses it started from, and another follows after a pause as long as the build took
        (the rebuilds take at most about half of a core). An erase drops it."""
        while True:
            t0 = time.monotonic()
            with self._lock:
                if not self.stale:
                    return
                generation, epoch = self._generation, self._epoch
                snapshot = [(kf, kf.T_map_kf.copy(), kf.n_frames) for kf in self.keyframes]
            new = MapProducts(self.config)
            done: dict[int, int] = {}  # frames of each keyframe fused into `new`
            while snapshot:  # rounds: the snapshot, then what was integrated meanwhile, until little is left
                for kf, T_map_kf, n in snapshot:
                    with self._lock:
                        if self._epoch != epoch:
                            return
                        frames = FrameBatch(**{k: v[:n].copy() for k, v in self._frames_of(kf).arrays().items()})
                    new.fuse_batch(frames, T_map_kf, start=done.get(kf.id, 0))
                    done[kf.id] = n
                with self._lock:
                    if self._epoch != epoch:
                        return
                    behind = [(kf, kf.T_map_kf.copy(), kf.n_frames) for kf in self.keyframes
                              if kf.n_frames > done.get(kf.id, 0)]
                snapshot = behind if sum(n - done.get(kf.id, 0) for kf, _, n in behind) > CATCH_UP_FRAMES else []
            with self._rebuilt:
                if self._epoch != epoch:
                    return
                for kf in self.keyframes:  # the last few frames, under the lock: then the swap
                    if kf.n_frames > done.get(kf.id, 0):
                        new.fuse_batch(self._frames_of(kf), kf.T_map_kf, start=done.get(kf.id, 0))
                self.products = new
                self.stale = self._generation != generation
                self.rebuilds += 1
                self._rebuilt.notify_all()
                if not self.stale:
                    return
            time.sleep(time.monotonic() - t0)

    def wait_rebuilt(self, timeout: float | None = None) -> bool:
        """Until the products follow every pose update (a background rebuild finished); False at the timeout,
        MapRebuildError when the rebuild failed."""
        with self._rebuilt:
            if self.stale:
                self._refresh()
            done = self._rebuilt.wait_for(lambda: not self.stale or self.rebuild_error is not None, timeout)
            if self.stale and self.rebuild_error is not None:
                raise MapRebuildError(f"the map's products could not be rebuilt after a pose update: "
                                      f"{self.rebuild_error}")
            return done

    # ------------------------------------------------------------------ the interface
    @_locked
    def integrate(self, frame: MapFrame) -> Keyframe:
        """Store the frame in the current keyframe (or start a new one) and fuse it into every product."""
        self._refresh()
        s = self.config.stride
        T = np.asarray(frame.T_map_cam, np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError(f"T_map_cam must be a finite 4x4, got {T.shape}")
        depth = np.asarray(frame.depth, np.float32)[::s, ::s]
        h, w = depth.shape
        rgb = np.asarray(frame.rgb)[::s, ::s]
        if rgb.shape != (h, w, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be uint8 of the depth's size, got {rgb.shape} {rgb.dtype}")
        conf = np.ones((h, w), np.float32) if frame.conf is None else np.asarray(frame.conf, np.float32)[::s, ::s]
        K = np.asarray(frame.K, np.float64).copy()
        K[:2] /= s  # pixel i of the strided image is pixel s*i of the full one
        depth16 = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float16)
        conf16 = np.nan_to_num(conf, nan=0.0).astype(np.float16)

        kf = self._current
        if kf is None or self._needs_keyframe(kf, T, (h, w)):
            kf = self._new_keyframe(T, (h, w))
            kf.descriptor = None if frame.descriptor is None else np.asarray(frame.descriptor, np.float32).copy()
        # the open keyframe fills preallocated buffers (no per-frame re-allocation); frames = views of the filled part
        n, buf = kf.n_frames, self._buf
        for name, value in (("stamps", np.int64(frame.stamp_ns)), ("T_kf_cam", S3.inverse(kf.T_map_kf) @ T), ("K", K),
                            ("depth", depth16), ("conf", conf16), ("rgb", rgb)):
            buf[name][n] = value
        kf.n_frames = n + 1
        kf.frames = FrameBatch(**{name: a[:n + 1] for name, a in buf.items()})
        # products see exactly what a rebuild will see: the stored (float16) frame at the stored relative pose
        self.products.fuse(depth16.astype(np.float32), conf16, rgb, K, kf.T_map_kf @ kf.frames.T_kf_cam[-1])
        self.frames += 1
        self._bound_memory()
        return kf

    def _needs_keyframe(self, kf: Keyframe, T: np.ndarray, hw) -> bool:
        c = self.config
        if kf.n_frames >= c.keyframe_max_frames or kf.frames is None or kf.frames.depth.shape[1:] != hw:
            return True
        rel = inverse(S3.to_se3(kf.T_map_kf)) @ S3.to_se3(T)  # metres in map, whatever either pose's scale
        return bool(np.linalg.norm(rel[:3, 3]) > c.keyframe_distance or rotation_angle_deg(rel) > c.keyframe_angle_deg)

    def _close_current(self) -> None:
        """Trim the open keyframe's buffers to its frames (copies, so the buffers can be dropped)."""
        kf = self._current
        if kf is not None and kf.frames is not None:
            kf.frames = FrameBatch(**{k: v.copy() for k, v in kf.frames.arrays().items()})
        self._buf = {}

    def _new_keyframe(self, T_map_kf: np.ndarray, hw) -> Keyframe:
        self._close_current()
        cap, (h, w) = self.config.keyframe_max_frames, hw
        self._buf = {"stamps": np.zeros(cap, np.int64), "T_kf_cam": np.zeros((cap, 4, 4)), "K": np.zeros((cap, 3, 3)),
                     "depth": np.zeros((cap, h, w), np.float16), "conf": np.zeros((cap, h, w), np.float16),
                     "rgb": np.zeros((cap, h, w, 3), np.uint8)}
        kf = Keyframe(self._next_id, self.segment, T_map_kf.copy(), empty_batch(*hw))
        self._next_id += 1
        self.keyframes.append(kf)
        self._current = kf
        return kf

    @_locked
    def update_poses(self, poses: dict[int, np.ndarray]) -> None:
        """New T_map_kf (rigid or Sim(3)) for the given keyframe ids; the products follow at the next query or
        integration. ValueError for a matrix that is neither (then no pose changes: all are checked first)."""
        by_id = {kf.id: kf for kf in self.keyframes}
        unknown = sorted(set(poses) - set(by_id))
        if unknown:
            raise KeyError(f"no keyframes with ids {unknown}")
        checked = {}
        for kid, T in poses.items():
            T = np.array(T, np.float64)
            if T.shape != (4, 4) or not np.isfinite(T).all():
                raise ValueError(f"pose of keyframe {kid} must be a finite 4x4")
            if not _is_similarity(T):
                raise ValueError(f"pose of keyframe {kid} is not a rigid or Sim(3) transform [[s R, t], [0, 1]]")
            checked[kid] = T
        for kid, T in checked.items():
            by_id[kid].T_map_kf = T
        if poses:
            self.stale = True
            self._generation += 1
            if self.config.background_rebuild:
                self.rebuild_error = None
                self._start_rebuild()

    @_locked
    def keyframe_poses(self) -> dict[int, np.ndarray]:
        return {kf.id: kf.T_map_kf.copy() for kf in self.keyframes}

    def points(self):
        """(xyz float32 (M, 3), rgb uint8 (M, 3), conf float32 (M,)) of the fused cloud in map, without what the TSDF
        surface contradicts and pulled toward it (fit_to_surface). The cloud and the surface are copied under the
        lock; the KD-tree queries and plane fits (a few seconds for 2 M points here) run outside it, so the frame
        thread is not held up by a ~/map query."""
        with self._lock:
            self._refresh()
            cloud, surface = self.products.cloud_snapshot()
        return fit_to_surface(cloud, surface, self.config)

    @_locked
    def mesh(self):
        """(vertices float32 (V, 3), triangles int32 (T, 3), colours uint8 (V, 3)) in map; empty without TSDF."""
        self._refresh()
        if self.tsdf is None:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.uint8)
        return self.tsdf.mesh()

    @_locked
    def occupancy(self):
        """(data int8 (H, W) -1/0/100, origin (x, y), resolution) like nav_msgs/OccupancyGrid; empty without it."""
        self._refresh()
        if self.grid is None:
            return np.zeros((0, 0), np.int8), np.zeros(2), self.config.occupancy_resolution
        return self.grid.to_arrays()

    @_locked
    def new_segment(self) -> None:
        """A stream reset: the next frame starts a new keyframe in a new segment; the map is kept."""
        if self._current is not None or self.keyframes:
            self.segment += 1
        self._close_current()
        self._current = None

    @_locked
    def erase(self) -> None:
        """Drop every keyframe and product (the explicit action; a stream reset does not do this)."""
        for kf in self.keyframes:
            if kf.spill_path is not None:
                kf.spill_path.unlink(missing_ok=True)
        self.keyframes, self._current, self._spilled, self._buf = [], None, 0, {}
        self.segment, self._next_id, self.frames = 0, 0, 0
        self.stale = False
        self.rebuild_error = None
        self._epoch += 1
        self._build_products()

    @_locked
    def __len__(self) -> int:
        """Voxels of the fused cloud (pending frames fused first; points() may leave some out)."""
        self._refresh()
        self.products.flush_cloud()
        return len(self.cloud)

    @_locked
    def stats(self) -> dict:
        return {"keyframes": len(self.keyframes), "keyframes in memory": sum(kf.in_memory for kf in self.keyframes),
                "map frames": sum(kf.n_frames for kf in self.keyframes), "segments": self.segment + 1,
                "map points": len(self), "tsdf blocks": self.tsdf.blocks() if self.tsdf else 0,
                "keyframe bytes in memory": self.memory_bytes(), "map rebuild error": self.rebuild_error or "none"}

    def memory_bytes(self) -> int:
        return sum(kf.frames.nbytes() for kf in self.keyframes if kf.frames is not None)

    # ------------------------------------------------------------------ memory bound
    def spill_root(self) -> Path:
        if self._spill_root is None:
            if self.config.spill_dir:
                self._spill_root = Path(self.config.spill_dir).expanduser()
                self._spill_root.mkdir(parents=True, exist_ok=True)
            else:
                self._spill_root = Path(tempfile.mkdtemp(prefix="stream4d_keyframes_"))
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._spill_root), True)
        return self._spill_root

    def _bound_memory(self) -> None:
        # keyframes are spilled oldest first, so the spilled ones are a prefix of the list: O(spilled now) per call
        kfs, i = self.keyframes, self._spilled
        while len(kfs) - i > self.config.max_keyframes_in_memory and kfs[i] is not self._current:
            kf = kfs[i]
            if kf.frames is not None:
                path = self.spill_root() / f"kf_{id(self):x}_{kf.id:07d}.npz"
                write_keyframe_file(path, kf.id, kf.segment, kf.frames)
                kf.spill_path, kf.frames = path, None
            i += 1
        self._spilled = i

    def _frames_of(self, kf: Keyframe) -> FrameBatch:
        if kf.frames is not None:
            return kf.frames
        return read_keyframe_file(kf.spill_path, kf.id)[2]

    def frames_of(self, kf: Keyframe) -> FrameBatch:
        """The stored frames of a keyframe (read back from disk when spilled)."""
        return self._frames_of(kf)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def make_keyframe_map(keyframes: list[tuple[int, int, np.ndarray, FrameBatch]], config: KeyframeMapConfig,
                      segment: int | None = None) -> KeyframeMap:
    """A map holding the given keyframes (id, segment, T_map_kf, frames), products built from them; the next frame
    starts a new keyframe in a new segment (loading a map, then continuing)."""
    m = KeyframeMap(config)
    for kid, seg, T, frames in keyframes:
        m.keyframes.append(Keyframe(int(kid), int(seg), np.asarray(T, np.float64).copy(), frames, len(frames)))
    m._next_id = 1 + max((kf.id for kf in m.keyframes), default=-1)
    m.segment = (max((kf.segment for kf in m.keyframes), default=-1) + 1) if segment is None else segment
    m.stale = bool(m.keyframes)
    m.wait_rebuilt()
    m._bound_memory()
    m.frames = sum(kf.n_frames for kf in m.keyframes)
    return m


__all__ = ["KeyframeMap", "KeyframeMapConfig", "MapFrame", "FrameBatch", "Keyframe", "make_keyframe_map",
           "read_keyframe_file", "write_keyframe_file"]
