"""Write a rendered scene as a real rosbag2 (mcap or sqlite3, format version 9), and read its ground truth back.

Topics (all stamps = start_time + round(i * 1e9 / fps); bag receive time = stamp):

    /camera/image_raw             sensor_msgs/msg/Image            rgb8 (or bgr8), frame camera_optical_frame
    /camera/image_raw/compressed  sensor_msgs/msg/CompressedImage  jpeg (optional, --compressed)
    /camera/camera_info           sensor_msgs/msg/CameraInfo       the lens (default plumb_bob, D zeros), P = [K | 0]
    /tf                           tf2_msgs/msg/TFMessage           odom -> base_link, ground truth (+ optional noise)
    /tf_static                    tf2_msgs/msg/TFMessage           base_link -> camera_link -> camera_optical_frame,
                                                                   one message, offered TRANSIENT_LOCAL (latched)
    /ground_truth/depth           sensor_msgs/msg/Image            32FC1 z-depth metres, NaN = no hit
    /ground_truth/pose            geometry_msgs/msg/PoseStamped    camera optical frame pose in frame "world"

The odom frame coincides with the world frame (odom -> base_link at frame i is the true base pose unless odometry
noise is asked for). With ``odom_noise = s`` each frame-to-frame base motion gets a relative error like wheel
odometry: a per-bag systematic scale error and yaw drift (standard deviation s and s/2 rad per metre) plus per-step
random errors of the same size, integrated, so the error grows with distance. Ground robots stay planar.

Lens distortion (``distortion_model`` + ``distortion_coeffs``, ``stream4d sim --distortion``): the images are
rendered through the lens (render.py: each distorted pixel's exact ray) and CameraInfo carries the model and D.
/ground_truth/depth stays in the PINHOLE geometry of K: it is what an undistortion to P = [K | 0] (mapping/
undistort.py, new_K "P") yields, so the oracle, read_ground_truth and the evaluation (which pair depth with K) are
unchanged, and a node that skips the undistortion is caught by them.

Beside the bag data, inside the bag directory: ``scene.ply`` (the scene mesh, world frame, for map accuracy) and
``scene.json`` (scene, trajectory, camera and bag parameters; ``Scene.from_dict`` rebuilds the scene). rosbag2 tools
ignore files that metadata.yaml does not list.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rosbags.highlevel import AnyReader
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from ros2_stream4d import codec
from ros2_stream4d.codec import (
    camera_info_to_k,
    compressed_image_msg,
    compressed_to_rgb,
    header_msg,
    image_to_numpy,
    image_to_rgb,
    message_factory,
    pose_stamped_msg,
    pose_to_matrix,
    stamp_ns,
    time_msg,
    transform_stamped_msg,
)
from ros2_stream4d.mapping.conventions import inverse, rotation_angle, rotation_from_vector
from ros2_stream4d.mapping.undistort import DISTORTION_MODELS, LensModel

from .render import CameraModel, Renderer
from .scenes import build_scene
from .trajectories import T_CAMLINK_OPTICAL, Trajectory, make_trajectory

TOPICS = {
    "image": "/camera/image_raw",
    "compressed": "/camera/image_raw/compressed",
    "camera_info": "/camera/camera_info",
    "tf": "/tf",
    "tf_static": "/tf_static",
    "gt_depth": "/ground_truth/depth",
    "gt_pose": "/ground_truth/pose",
}
FRAMES = {"world": "world", "odom": "odom", "base": "base_link", "camera_link": "camera_link",
          "optical": "camera_optical_frame"}
DEFAULT_START_NS = 1_700_000_000 * 10**9
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
TYPESTORE = get_typestore(Stores.ROS2_KILTED)
_T = TYPESTORE.types
_INF = QosTime(sec=2147483647, nsec=4294967295)
LATCHED_QOS = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                  durability=QosDurability.TRANSIENT_LOCAL, deadline=_INF, lifespan=_INF,
                  liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=_INF,
                  avoid_ros_namespace_conventions=False)


@dataclass
class SimConfig:
    """Everything that determines a sim bag (``stream4d sim`` flags map 1:1)."""

    scene: str = "room"
    trajectory: str = "handheld"
    frames: int = 300
    width: int = 640
    height: int = 480
    fps: float = 10.0
    seed: int = 0
    hfov_deg: float = 60.0
    storage: str = "mcap"
    raw: bool = True  # write /camera/image_raw
    compressed: bool = False  # write /camera/image_raw/compressed (jpeg)
    jpeg_quality: int = 90
    encoding: str = "rgb8"  # or bgr8
    odom_noise: float = 0.0
    start_time_ns: int = DEFAULT_START_NS
    nthreads: int = 1  # Embree threads for rendering
    distortion_model: str = "plumb_bob"  # CameraInfo naming: plumb_bob, rational_polynomial, equidistant
    distortion_coeffs: list = field(default_factory=list)  # D; empty = all zero (a pinhole camera)
    scene_params: dict = field(default_factory=dict)
    trajectory_params: dict = field(default_factory=dict)

    def stamps(self) -> np.ndarray:
        return self.start_time_ns + np.round(np.arange(self.frames) * 1e9 / self.fps).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- messages
# rosbags messages through the codec (ros2_stream4d/codec.py): its readers (image_to_numpy, pose_to_matrix,
# transform_to_matrix, stamp_ns, image_to_rgb) read these and rclpy messages alike; the writers below bind its
# writers to this module's typestore with the (ns, frame_id, ...) argument order the sim uses.
MSG = message_factory(TYPESTORE)


def stamp_msg(ns: int):
    return time_msg(MSG, ns)


def header(ns: int, frame_id: str):
    return header_msg(MSG, ns, frame_id)


def transform_msg(ns: int, parent: str, child: str, T: np.ndarray):
    return transform_stamped_msg(MSG, T, ns, parent, child)


def pose_msg(ns: int, frame_id: str, T: np.ndarray):
    return pose_stamped_msg(MSG, T, ns, frame_id)


def image_msg(ns: int, frame_id: str, array: np.ndarray, encoding: str):
    return codec.image_msg(MSG, array, encoding, ns, frame_id)


def compressed_msg(ns: int, frame_id: str, rgb: np.ndarray, quality: int = 90):
    return compressed_image_msg(MSG, rgb, "jpeg", "rgb8", quality, ns, frame_id)


def camera_info_msg(ns: int, frame_id: str, K: np.ndarray, width: int, height: int,
                    distortion_model: str = "plumb_bob", D=None):
    """CameraInfo with P = [K | 0]; D None = the model's zeros (5 for plumb_bob)."""
    return codec.camera_info_msg(MSG, K, width, height, ns, frame_id, distortion_model=distortion_model, d=D)


# ---------------------------------------------------------------------------------------------------- odometry
def noisy_odometry(T_world_base: np.ndarray, level: float, rng: np.random.Generator, planar: bool) -> np.ndarray:
    """Integrate frame-to-frame base motions with wheel-odometry-like errors (see the module docstring).
    Starts at the true first pose; level 0 returns the input."""
    T_world_base = np.asarray(T_world_base, np.float64)
    if level <= 0:
        return T_world_base.copy()
    scale_bias = level * rng.normal()
    drift_bias = 0.5 * level * rng.normal(size=3)  # rad per metre
    if planar:
        drift_bias[:2] = 0.0
    out = np.empty_like(T_world_base)
    out[0] = T_world_base[0]
    for i in range(1, len(T_world_base)):
        D = inverse(T_world_base[i - 1]) @ T_world_base[i]
        t = D[:3, 3]
        step = float(np.linalg.norm(t))
        ang = float(rotation_angle(D[:3, :3]))
        noise_t = level * step * rng.normal(size=3)
        noise_r = level * (step + ang) * rng.normal(size=3)
        if planar:
            noise_t[2] = 0.0
            noise_r[:2] = 0.0
        Dn = np.eye(4)
        Dn[:3, :3] = rotation_from_vector(noise_r + drift_bias * step) @ D[:3, :3]
        Dn[:3, 3] = t * (1.0 + scale_bias + level * rng.normal()) + noise_t
        out[i] = out[i - 1] @ Dn
    return out


# ---------------------------------------------------------------------------------------------------- writing
def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """rosbags writes into a directory that must not exist: remove an empty one, or an old bag if overwrite."""
    out = Path(out)
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite and out.is_dir() and (out / "metadata.yaml").exists():
            shutil.rmtree(out)
        else:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite for an old bag)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_sim_bag(out: str | Path, cfg: SimConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Render ``cfg.frames`` frames and write the bag plus scene.ply / scene.json. Returns a summary dict."""
    if cfg.storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {cfg.storage!r}")
    if cfg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"encoding must be rgb8 or bgr8, got {cfg.encoding!r}")
    if not (cfg.raw or cfg.compressed):
        raise ValueError("nothing to write: enable the raw image, the compressed image or both")
    camera = CameraModel.from_hfov(cfg.width, cfg.height, cfg.hfov_deg)
    lens = sim_lens(cfg, camera)  # a bad lens fails before anything is written
    info_D = list(lens.D) or [0.0] * DISTORTION_MODELS[cfg.distortion_model][0]
    out = prepare_out_dir(out, overwrite)
    scene = build_scene(cfg.scene, cfg.seed, **cfg.scene_params)
    traj = make_trajectory(scene, cfg.trajectory, cfg.frames, cfg.fps, cfg.seed, **cfg.trajectory_params)
    renderer = Renderer(scene, camera, nthreads=cfg.nthreads)
    lens_renderer = Renderer(scene, camera, nthreads=cfg.nthreads, lens=lens) if lens.distorted else None
    stamps = cfg.stamps()
    odom = noisy_odometry(traj.T_world_base, cfg.odom_noise, np.random.default_rng([cfg.seed, 99]),
                          planar=cfg.trajectory == "ground_robot")
    F = FRAMES
    counts = {}

    def put(conn, ns, msg):
        writer.write(conn, int(ns), TYPESTORE.serialize_cdr(msg, msg.__msgtype__))
        counts[conn.topic] = counts.get(conn.topic, 0) + 1

    meta = sim_metadata(cfg, scene, traj, camera, stamps)
    bar = _progress(cfg.frames, progress, f"sim {cfg.scene}/{cfg.trajectory}")
    with Writer(out, version=9, storage_plugin=STORAGES[cfg.storage]) as writer:
        writer.set_custom_data("stream4d.sim", json.dumps({"config": meta["config"]}))

        def conn(key, msgtype, **kw):
            return writer.add_connection(TOPICS[key], msgtype, typestore=TYPESTORE, **kw)

        c_img = conn("image", "sensor_msgs/msg/Image") if cfg.raw else None
        c_cmp = conn("compressed", "sensor_msgs/msg/CompressedImage") if cfg.compressed else None
        c_info = conn("camera_info", "sensor_msgs/msg/CameraInfo")
        c_tf = conn("tf", "tf2_msgs/msg/TFMessage")
        c_tfs = conn("tf_static", "tf2_msgs/msg/TFMessage", offered_qos_profiles=[LATCHED_QOS])
        c_depth = conn("gt_depth", "sensor_msgs/msg/Image")
        c_pose = conn("gt_pose", "geometry_msgs/msg/PoseStamped")
        TFMessage = _T["tf2_msgs/msg/TFMessage"]
        put(c_tfs, stamps[0], TFMessage(transforms=[
            transform_msg(stamps[0], F["base"], F["camera_link"], traj.T_base_camlink),
            transform_msg(stamps[0], F["camera_link"], F["optical"], T_CAMLINK_OPTICAL)]))
        T_world_cam = traj.T_world_cam
        for i, ns in enumerate(stamps):
            if lens_renderer is None:
                frame = renderer.render(T_world_cam[i])
                rgb, depth = frame.rgb, frame.depth
            else:  # the image through the lens, the ground-truth depth pinhole (module docstring)
                rgb, depth = lens_renderer.render(T_world_cam[i]).rgb, renderer.render_depth(T_world_cam[i])
            if c_img is not None:
                img = rgb if cfg.encoding == "rgb8" else rgb[:, :, ::-1]
                put(c_img, ns, image_msg(ns, F["optical"], img, cfg.encoding))
            if c_cmp is not None:
                put(c_cmp, ns, compressed_msg(ns, F["optical"], rgb, cfg.jpeg_quality))
            put(c_info, ns, camera_info_msg(ns, F["optical"], camera.K, cfg.width, cfg.height,
                                            cfg.distortion_model, info_D))
            put(c_tf, ns, TFMessage(transforms=[transform_msg(ns, F["odom"], F["base"], odom[i])]))
            put(c_depth, ns, image_msg(ns, F["optical"], depth, "32FC1"))
            put(c_pose, ns, pose_msg(ns, F["world"], T_world_cam[i]))
            bar.update(1)
    bar.close()
    scene.write_ply(out / "scene.ply")
    meta["counts"] = counts
    (out / "scene.json").write_text(json.dumps(meta, indent=1))
    return meta


def sim_lens(cfg: SimConfig, camera: CameraModel) -> LensModel:
    """The LensModel (mapping/undistort.py) of a sim camera: K, the configured distortion, P = [K | 0].
    ValueError for an unknown model or a wrong number of coefficients."""
    if cfg.distortion_model not in DISTORTION_MODELS:
        raise ValueError(f"unknown distortion model {cfg.distortion_model!r}; supported: "
                         f"{', '.join(DISTORTION_MODELS)}")
    P = np.zeros((3, 4))
    P[:, :3] = camera.K
    return LensModel.create(camera.K, cfg.distortion_model, cfg.distortion_coeffs, camera.width, camera.height, P)


def sim_metadata(cfg: SimConfig, scene, traj: Trajectory, camera: CameraModel, stamps: np.ndarray) -> dict:
    return {"config": asdict(cfg), "scene": scene.to_dict(), "trajectory": traj.to_dict(),
            "camera": {**camera.to_dict(), "K": camera.K.tolist(), "hfov_deg": cfg.hfov_deg,
                       "distortion_model": cfg.distortion_model, "D": list(cfg.distortion_coeffs),
                       "depth_geometry": "pinhole K"},
            "topics": TOPICS, "frames": FRAMES, "stamps": {"first_ns": int(stamps[0]), "last_ns": int(stamps[-1]),
                                                           "count": len(stamps)},
            "files": {"mesh": "scene.ply"}, "odom_equals_world": True}


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="frame")

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


# ---------------------------------------------------------------------------------------------------- reading
def iter_messages(path: str | Path, topics) -> Iterator[tuple[str, int, object]]:
    """(topic, bag time ns, deserialized message) for the given topics of any rosbag2 (mcap or sqlite3)."""
    with AnyReader([Path(path)], default_typestore=TYPESTORE) as reader:
        conns = [c for c in reader.connections if c.topic in set(topics)]
        for c, t, raw in reader.messages(connections=conns):
            yield c.topic, t, reader.deserialize(raw, c.msgtype)


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """{topic: (msgtype, message count)}."""
    with AnyReader([Path(path)], default_typestore=TYPESTORE) as reader:
        out: dict[str, tuple[str, int]] = {}
        for c in reader.connections:
            prev = out.get(c.topic, (c.msgtype, 0))[1]
            out[c.topic] = (c.msgtype, prev + c.msgcount)
        return out


@dataclass
class GroundTruth:
    """Ground truth of a sim bag, sorted by stamp."""

    stamps: np.ndarray  # (N,) int64 ns
    T_world_cam: np.ndarray  # (N, 4, 4) camera optical frame in world
    K: np.ndarray  # (3, 3)
    width: int
    height: int
    depths: np.ndarray | None = None  # (N, H, W) float32, NaN = no hit
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 RGB
    mesh_path: Path | None = None
    meta: dict | None = None
    distortion_model: str = "plumb_bob"  # of the images; depths are pinhole (K) whatever the lens
    D: np.ndarray | None = None

    def index_of(self, stamp: int) -> int:
        i = int(np.searchsorted(self.stamps, stamp))
        if i >= len(self.stamps) or self.stamps[i] != stamp:
            raise KeyError(f"no ground truth at stamp {stamp}")
        return i


def read_ground_truth(path: str | Path, with_depth: bool = True, with_images: bool = False) -> GroundTruth:
    """Read /ground_truth/pose, /ground_truth/depth, /camera/camera_info (and images) of a sim bag."""
    path = Path(path)
    want = [TOPICS["gt_pose"], TOPICS["camera_info"]]
    if with_depth:
        want.append(TOPICS["gt_depth"])
    if with_images:
        want += [TOPICS["image"], TOPICS["compressed"]]
    poses, depths, images, info = {}, {}, {}, None
    for topic, _, msg in iter_messages(path, want):
        ns = stamp_ns(msg.header.stamp)
        if topic == TOPICS["gt_pose"]:
            poses[ns] = pose_to_matrix(msg)
        elif topic == TOPICS["gt_depth"]:
            depths[ns] = image_to_numpy(msg)
        elif topic == TOPICS["camera_info"]:
            info = info or msg
        elif topic == TOPICS["image"]:
            images[ns] = image_to_rgb(msg)
        elif ns not in images:  # compressed, only when there is no raw image
            images[ns] = compressed_to_rgb(msg)
    if not poses or info is None:
        raise ValueError(f"{path}: not a sim bag (needs {TOPICS['gt_pose']} and {TOPICS['camera_info']})")
    stamps = np.array(sorted(poses), np.int64)
    K, width, height = camera_info_to_k(info)
    meta_path, mesh_path = path / "scene.json", path / "scene.ply"
    return GroundTruth(
        stamps=stamps, T_world_cam=np.stack([poses[s] for s in stamps]),
        K=K, width=width, height=height,
        depths=np.stack([depths[s] for s in stamps]) if with_depth else None,
        images=np.stack([images[s] for s in stamps]) if with_images and images else None,
        mesh_path=mesh_path if mesh_path.exists() else None,
        meta=json.loads(meta_path.read_text()) if meta_path.exists() else None,
        distortion_model=str(info.distortion_model), D=np.asarray(info.d, np.float64))
