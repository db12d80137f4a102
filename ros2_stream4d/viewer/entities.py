"""The entities of every stream4d Rerun recording, logged by one class for offline bags and the live node alike.

Entity tree (3D content lives under /map, the node's map frame: REP-103 body axes, x forward, y left, z up):

    /map                            ViewCoordinates RIGHT_HAND_Z_UP (static)
    /map/camera                     Transform3D: the camera optical frame in map, one per frame
    /map/camera/image               Pinhole + EncodedImage (JPEG): the camera image (a frustum in 3D)
    /map/camera/cloud               Points3D: the per-frame cloud when the node published it in the camera frame
    /map/cloud                      Points3D: the per-frame cloud (downsampled), map frame
    /map/map                        Points3D: the accumulated map (downsampled)
    /map/mesh                       Mesh3D: the map's mesh, when there is one
    /map/trajectory                 LineStrips3D: the camera path up to this stamp (bounded length)
    /map/ground_truth/trajectory    LineStrips3D: the ground-truth camera path, Sim(3)-aligned to the prediction
    /map/ground_truth/scene         Mesh3D: the sim scene mesh, same alignment (static)
    /camera/depth                   DepthImage (downsampled; uint16, meter = 1000: millimetres of the map unit)
    /camera/confidence              Image (downsampled; float16)

One timeline, TIMELINE ("ros2_timestamp"): the header stamp of the camera image each result belongs to. The
name is the one Rerun's own MCAP importer gives header stamps, so its entities line up with ours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import rerun as rr
import rerun.blueprint as rrb

TIMELINE = "ros2_timestamp"
APPLICATION_ID = "stream4d"

MAP = "map"
CAMERA = "map/camera"
IMAGE = "map/camera/image"
CAMERA_CLOUD = "map/camera/cloud"
CLOUD = "map/cloud"
MAP_CLOUD = "map/map"
MESH = "map/mesh"
TRAJECTORY = "map/trajectory"
GT_TRAJECTORY = "map/ground_truth/trajectory"
GT_SCENE = "map/ground_truth/scene"
DEPTH = "camera/depth"
CONFIDENCE = "camera/confidence"

PATH_COLOUR = (255, 140, 0)
GT_COLOUR = (40, 200, 80)
POINT_RADIUS = rr.Radius.ui_points(2.0)
MAP_RADIUS = rr.Radius.ui_points(1.5)


@dataclass
class ViewOptions:
    """How much of a run goes into a recording (the size knobs)."""

    jpeg_quality: int = 80
    image_width: int = 0  # camera images wider than this are resized before encoding (0 = as recorded)
    depth_width: int = 160  # depth and confidence are subsampled (every k-th pixel) to at most this width
    cloud_points: int = 4000  # per-frame cloud points kept (evenly spread over the cloud)
    map_points: int = 150_000  # accumulated map points kept per logged map
    map_updates: int = 10  # offline: at most this many map messages are logged (evenly spread, the last always)
    path_points: int = 2000  # trajectory line strips keep at most this many vertices (older ones thinned)
    path_updates: int = 300  # offline: the growing trajectory strips are logged at most this often (the last always)
    frame_stride: int = 1  # offline: images, depth, confidence and clouds of every n-th frame (poses of all)


def default_blueprint() -> rrb.Blueprint:
    """3D map view on the left, camera / depth / confidence on the right, side panels collapsed."""
    return rrb.Blueprint(
        rrb.Horizontal(
            rrb.Spatial3DView(origin="/map", name="map (3D)"),
            rrb.Vertical(
                rrb.Spatial2DView(origin=f"/{IMAGE}", name="camera"),
                rrb.Spatial2DView(origin=f"/{DEPTH}", name="depth"),
                rrb.Spatial2DView(origin=f"/{CONFIDENCE}", name="confidence"),
            ),
            column_shares=[3, 1],
        ),
        rrb.BlueprintPanel(state="collapsed"),
        rrb.SelectionPanel(state="collapsed"),
        rrb.TimePanel(state="collapsed"),
        auto_views=False,
    )


def spread_indices(n: int, k: int) -> np.ndarray | None:
    """k indices evenly spread over range(n), or None when all n are to be kept."""
    if k <= 0 or n <= k:
        return None
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def subsample_points(xyz: np.ndarray, rgb: np.ndarray | None, k: int):
    """(xyz float32 (m, 3), rgb uint8 (m, 3) or None): at most k points evenly spread over the cloud, the finite
    ones of them. Picks first, then filters: the cost is O(k), not O(cloud), which keeps the GIL free for the node
    when the live viewer's thread does it."""
    xyz = np.asarray(xyz).reshape(-1, 3)
    idx = spread_indices(len(xyz), k)
    if idx is not None:
        xyz = xyz[idx]
        rgb = None if rgb is None else np.asarray(rgb).reshape(-1, 3)[idx]
    xyz = xyz.astype(np.float32, copy=False)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.all():
        xyz = xyz[finite]
        rgb = None if rgb is None else np.asarray(rgb)[finite]
    return np.ascontiguousarray(xyz), None if rgb is None else np.ascontiguousarray(rgb, np.uint8).reshape(-1, 3)


def image_stride(width: int, max_width: int) -> int:
    return max(1, -(-int(width) // int(max_width))) if max_width > 0 else 1


def depth_to_mm(depth: np.ndarray) -> np.ndarray:
    """float depth (NaN / <= 0 invalid) -> uint16 thousandths (0 = invalid, Rerun's convention)."""
    d = np.asarray(depth, np.float32) * 1000.0
    ok = np.isfinite(d) & (d > 0) & (d < 65535.0)
    return np.where(ok, np.rint(np.where(ok, d, 0)), 0).astype(np.uint16)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        img = rgb
    else:
        img = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, :3], np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class BoundedPath:
    """Positions of a path, at most `cap` of them: when full, every other older vertex is dropped (the newest
    is always kept), so a long run keeps its whole shape at a coarser spacing in constant memory."""

    def __init__(self, cap: int):
        self.cap = max(4, int(cap))
        self._points: list[np.ndarray] = []

    def append(self, p) -> None:
        self._points.append(np.asarray(p, np.float32).reshape(3))
        if len(self._points) > self.cap:
            last = self._points[-1]
            self._points = self._points[:-1][::2] + [last]

    def array(self) -> np.ndarray:
        return np.stack(self._points) if self._points else np.zeros((0, 3), np.float32)

    def clear(self) -> None:
        self._points = []

    def __len__(self) -> int:
        return len(self._points)


class RunLogger:
    """Logs one run's entities into a Rerun RecordingStream (file, viewer or server: the stream's sinks decide).

    `counts` holds how many rows each entity got (tests and the CLI summary read it)."""

    def __init__(self, rec: rr.RecordingStream, options: ViewOptions | None = None, between=None):
        self.rec = rec
        self._between = between  # called after each logged row (the live viewer yields the GIL there)
        self.opt = options or ViewOptions()
        self.path = BoundedPath(self.opt.path_points)
        self.gt_path = BoundedPath(self.opt.path_points)
        self.counts: Counter[str] = Counter()
        self._pinhole: tuple | None = None

    # ------------------------------------------------------------------ basics
    def setup(self, blueprint: bool = True) -> None:
        self.rec.log(MAP, rr.ViewCoordinates.RIGHT_HAND_Z_UP, static=True)
        if blueprint:
            self.rec.send_blueprint(default_blueprint())

    def _log(self, entity: str, *archetypes, static: bool = False) -> None:
        self.rec.log(entity, *archetypes, static=static)
        self.counts[entity] += 1
        if self._between is not None:
            self._between()

    def time(self, stamp_ns: int) -> None:
        self.rec.set_time(TIMELINE, timestamp=np.datetime64(int(stamp_ns), "ns"))

    def reset_paths(self) -> None:
        """A new stream (the node reset its map): start the trajectory over."""
        self.path.clear()

    # ------------------------------------------------------------------ per frame
    def camera_pose(self, stamp_ns: int, T_map_cam: np.ndarray, log_path: bool = True) -> None:
        """The camera transform, and the trajectory so far (when log_path: a strip of up to path_points vertices
        per call, so offline recordings of long runs log it only every few frames)."""
        T = np.asarray(T_map_cam, np.float64)
        if not np.isfinite(T).all():
            return
        self.time(stamp_ns)
        self._log(CAMERA, rr.Transform3D(translation=T[:3, 3], mat3x3=T[:3, :3]))
        self.path.append(T[:3, 3])
        if log_path:
            self._log(TRAJECTORY, rr.LineStrips3D([self.path.array()], colors=[PATH_COLOUR],
                                                  radii=rr.Radius.ui_points(2.0)))

    def ground_truth_pose(self, stamp_ns: int, position, log_path: bool = True) -> None:
        self.gt_path.append(position)
        if log_path:
            self.time(stamp_ns)
            self._log(GT_TRAJECTORY, rr.LineStrips3D([self.gt_path.array()], colors=[GT_COLOUR],
                                                     radii=rr.Radius.ui_points(2.0)))

    def image(self, stamp_ns: int, K: np.ndarray | None, rgb: np.ndarray | None = None,
              jpeg: bytes | None = None, size: tuple[int, int] | None = None) -> None:
        """The camera image (RGB uint8, or JPEG bytes as recorded with its (width, height)) and its pinhole."""
        self.time(stamp_ns)
        if rgb is not None:
            rgb = np.asarray(rgb)
            h, w = rgb.shape[:2]
            if self.opt.image_width and w > self.opt.image_width:
                f = self.opt.image_width / w
                rgb = cv2.resize(rgb, (self.opt.image_width, max(1, round(h * f))), interpolation=cv2.INTER_AREA)
                if K is not None:
                    K = np.diag([f, f, 1.0]) @ np.asarray(K, np.float64)
                h, w = rgb.shape[:2]
            jpeg = encode_jpeg(rgb, self.opt.jpeg_quality)
            size = (w, h)
        if jpeg is None:
            return
        if K is not None and size is not None:
            key = (tuple(np.round(np.asarray(K, np.float64).ravel(), 6)), tuple(size))
            if key != self._pinhole:
                self._pinhole = key
                self.rec.log(IMAGE, rr.Pinhole(image_from_camera=np.asarray(K, np.float64), resolution=list(size),
                                               camera_xyz=rr.ViewCoordinates.RDF, image_plane_distance=0.3))
        self._log(IMAGE, rr.EncodedImage(contents=jpeg, media_type="image/jpeg"))

    def depth(self, stamp_ns: int, depth: np.ndarray) -> None:
        d = np.asarray(depth)
        s = image_stride(d.shape[1], self.opt.depth_width)
        self.time(stamp_ns)
        self._log(DEPTH, rr.DepthImage(depth_to_mm(d[::s, ::s]), meter=1000.0, colormap="turbo"))

    def confidence(self, stamp_ns: int, confidence: np.ndarray) -> None:
        c = np.asarray(confidence, np.float32)
        s = image_stride(c.shape[1], self.opt.depth_width)
        c = np.nan_to_num(c[::s, ::s], nan=0.0, posinf=0.0, neginf=0.0)
        self.time(stamp_ns)
        self._log(CONFIDENCE, rr.Image(np.ascontiguousarray(c.astype(np.float16)), color_model="L"))

    def cloud(self, stamp_ns: int, xyz: np.ndarray, rgb: np.ndarray | None = None, in_camera: bool = False) -> None:
        xyz, rgb = subsample_points(xyz, rgb, self.opt.cloud_points)
        self.time(stamp_ns)
        self._log(CAMERA_CLOUD if in_camera else CLOUD, rr.Points3D(xyz, colors=rgb, radii=POINT_RADIUS))

    def map(self, stamp_ns: int | None, xyz: np.ndarray, rgb: np.ndarray | None = None) -> None:
        """The accumulated map at a stamp (None: static, shown at every time)."""
        xyz, rgb = subsample_points(xyz, rgb, self.opt.map_points)
        if stamp_ns is not None:
            self.time(stamp_ns)
        self._log(MAP_CLOUD, rr.Points3D(xyz, colors=rgb, radii=MAP_RADIUS), static=stamp_ns is None)

    def mesh(self, vertices: np.ndarray, triangles: np.ndarray, colours: np.ndarray | None = None,
             entity: str = MESH, stamp_ns: int | None = None, albedo=None) -> None:
        if stamp_ns is not None:
            self.time(stamp_ns)
        self._log(entity, rr.Mesh3D(vertex_positions=np.asarray(vertices, np.float32),
                                    triangle_indices=np.asarray(triangles, np.uint32),
                                    vertex_colors=None if colours is None else np.asarray(colours),
                                    albedo_factor=albedo), static=stamp_ns is None)

    def frame(self, result, rgb: np.ndarray | None = None, K_rgb: np.ndarray | None = None,
              cloud_in_camera: bool = False) -> None:
        """Everything of one mapping FrameResult (duck-typed: stamp_ns, T_map_cam, depth, confidence, K,
        cloud_xyz, cloud_rgb, prediction.rgb_model / K_model). rgb: the source image (with K_rgb, default
        result.K); without it the image the model saw is shown."""
        stamp = int(result.stamp_ns)
        self.camera_pose(stamp, result.T_map_cam)
        if rgb is None:
            pred = getattr(result, "prediction", None)
            rgb = getattr(pred, "rgb_model", None)
            K_rgb = getattr(pred, "K_model", None)
        elif K_rgb is None:
            K_rgb = result.K
        if rgb is not None:
            self.image(stamp, K_rgb, rgb=rgb)
        if result.depth is not None:
            self.depth(stamp, result.depth)
        if result.confidence is not None:
            self.confidence(stamp, result.confidence)
        if result.cloud_xyz is not None and len(result.cloud_xyz):
            self.cloud(stamp, result.cloud_xyz, result.cloud_rgb, in_camera=cloud_in_camera)
