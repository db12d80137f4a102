"""Prediction bags: read what the stream4d node recorded (and write such bags from arrays, for tests and tools).

Topics (defaults; every reader takes others):
    /stream4d/camera_pose   geometry_msgs/PoseStamped  camera optical frame pose in the model/map frame,
                                                       stamp = the input image's stamp (nav_msgs/Odometry of
                                                       the optical frame is read too)
    /stream4d/depth         sensor_msgs/Image 32FC1    NaN = invalid, same stamps
    /stream4d/depth/camera_info (or /stream4d/camera_info)  optional: intrinsics of the depth image
    /stream4d/map           sensor_msgs/PointCloud2    x, y, z float32 (+ rgb, confidence); the last message is
                                                       taken as the final map, in the pose topic's frame
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer

from ros2_stream4d.codec import camera_info_to_k, image_to_numpy, pointcloud2_to_arrays, pose_to_matrix, stamp_ns
from ros2_stream4d.codec import pointcloud2_msg as _pointcloud2_msg
from ros2_stream4d.mapping.conventions import rotation_from_vector
from ros2_stream4d.sim.bag import (
    MSG,
    STORAGES,
    TYPESTORE,
    bag_topics,
    camera_info_msg,
    image_msg,
    iter_messages,
    pose_msg,
    prepare_out_dir,
)
from ros2_stream4d.topics import output_topic

from .metrics import Sim3, observed_surface

PRED_TOPICS = {key: output_topic(name) for key, name in
               (("pose", "camera_pose"), ("depth", "depth"), ("depth_relative", "depth_relative"), ("map", "map"))}


@dataclass
class Prediction:
    stamps: np.ndarray  # (N,) int64 ns of the poses, sorted
    T_map_cam: np.ndarray  # (N, 4, 4)
    pose_frame: str
    depth_stamps: np.ndarray  # (M,) int64
    depths: np.ndarray | None  # (M, h, w) float32
    depth_K: np.ndarray | None  # (3, 3) intrinsics of the depth images, when recorded
    map_points: np.ndarray | None  # (P, 3) float32
    map_rgb: np.ndarray | None  # (P, 3) uint8
    map_conf: np.ndarray | None  # (P,) float32
    map_frame: str | None
    depth_topic: str = ""  # the topic the depths were read from


def pointcloud2_msg(ns: int, frame_id: str, xyz: np.ndarray, rgb: np.ndarray | None = None,
                    confidence: np.ndarray | None = None):
    """rosbags PointCloud2 with x, y, z float32 (+ rgb packed 0x00RRGGBB as float32, + confidence float32)."""
    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    rgb = None if rgb is None else np.asarray(rgb).reshape(-1, 3).astype(np.uint8)
    return _pointcloud2_msg(MSG, xyz, rgb, None if confidence is None else np.asarray(confidence).reshape(-1),
                            ns, frame_id)


def read_prediction(path: str | Path, pose_topic: str = PRED_TOPICS["pose"], depth_topic: str | None = None,
                    map_topic: str = PRED_TOPICS["map"], with_depth: bool = True, with_map: bool = True) -> Prediction:
    """The node's outputs in a bag. depth_topic None: the metric ~/depth/image when the bag has it, else the
    relative ~/depth_relative/image (Prediction.depth_topic says which was read)."""
    topics = bag_topics(path)
    if pose_topic not in topics:
        raise ValueError(f"{path}: no {pose_topic} (topics: {sorted(topics)})")
    if depth_topic is None:
        depth_topic = PRED_TOPICS["depth"] if PRED_TOPICS["depth"] in topics else PRED_TOPICS["depth_relative"]
    info_topics = [t for t in (depth_topic.rsplit("/", 1)[0] + "/camera_info", f"{depth_topic}/camera_info")
                   if topics.get(t, ("",))[0] == "sensor_msgs/msg/CameraInfo"]
    want = [pose_topic] + ([depth_topic] if with_depth else []) + ([map_topic] if with_map else []) + info_topics[:1]
    poses, depths, K, last_map, pose_frame = {}, {}, None, None, ""
    for topic, _, msg in iter_messages(path, want):
        if topic == pose_topic:  # PoseStamped (or Odometry: pose.pose)
            poses[stamp_ns(msg.header.stamp)] = pose_to_matrix(msg)
            pose_frame = msg.header.frame_id
        elif topic == depth_topic:
            depths[stamp_ns(msg.header.stamp)] = image_to_numpy(msg).astype(np.float32)
        elif topic == map_topic:
            last_map = msg
        elif K is None:
            K = camera_info_to_k(msg)[0]
    stamps = np.array(sorted(poses), np.int64)
    dstamps = np.array(sorted(depths), np.int64)
    cloud = pointcloud2_to_arrays(last_map) if last_map is not None else None
    return Prediction(
        stamps=stamps, T_map_cam=np.stack([poses[s] for s in stamps]) if len(stamps) else np.zeros((0, 4, 4)),
        pose_frame=pose_frame, depth_stamps=dstamps,
        depths=np.stack([depths[s] for s in dstamps]) if len(dstamps) else None, depth_K=K,
        map_points=None if cloud is None else cloud["xyz"], map_rgb=None if cloud is None else cloud.get("rgb"),
        map_conf=None if cloud is None else cloud.get("confidence"),
        map_frame=None if last_map is None else last_map.header.frame_id, depth_topic=depth_topic)


def write_prediction_bag(path: str | Path, stamps, T_map_cam, depths=None, depth_K=None, map_points=None,
                         map_rgb=None, map_conf=None, frame_id: str = "map",
                         depth_frame_id: str = "camera_optical_frame", storage: str = "mcap",
                         overwrite: bool = False) -> Path:
    """A bag shaped like the node's output (see the module docstring); the map is written once, at the last stamp."""
    path = prepare_out_dir(path, overwrite)
    stamps = [int(s) for s in stamps]
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as w:
        c_pose = w.add_connection(PRED_TOPICS["pose"], "geometry_msgs/msg/PoseStamped", typestore=TYPESTORE)
        c_depth = c_info = c_map = None
        if depths is not None:
            c_depth = w.add_connection(PRED_TOPICS["depth"], "sensor_msgs/msg/Image", typestore=TYPESTORE)
            if depth_K is not None:
                c_info = w.add_connection(PRED_TOPICS["depth"].rsplit("/", 1)[0] + "/camera_info",
                                          "sensor_msgs/msg/CameraInfo",
                                          typestore=TYPESTORE)
        if map_points is not None:
            c_map = w.add_connection(PRED_TOPICS["map"], "sensor_msgs/msg/PointCloud2", typestore=TYPESTORE)

        def put(c, ns, msg):
            w.write(c, ns, TYPESTORE.serialize_cdr(msg, msg.__msgtype__))

        for i, ns in enumerate(stamps):
            put(c_pose, ns, pose_msg(ns, frame_id, np.asarray(T_map_cam[i])))
            if c_depth is not None:
                d = np.asarray(depths[i], np.float32)
                put(c_depth, ns, image_msg(ns, depth_frame_id, d, "32FC1"))
                if c_info is not None:
                    put(c_info, ns, camera_info_msg(ns, depth_frame_id, depth_K, d.shape[1], d.shape[0]))
        if c_map is not None:
            put(c_map, stamps[-1], pointcloud2_msg(stamps[-1], frame_id, map_points, map_rgb, map_conf))
    return path


def resample_depth(pred: np.ndarray, K_pred: np.ndarray | None, K_gt: np.ndarray, gt_hw) -> np.ndarray:
    """Nearest-neighbour resample of a depth map taken with K_pred (same camera centre and orientation) onto the
    ground-truth pixel grid; NaN where the prediction does not cover. K_pred None: a plain resize of the whole
    image (pixel centres at integer coordinates, edges onto edges)."""
    h, w = pred.shape
    H, W = int(gt_hw[0]), int(gt_hw[1])
    if (h, w) == (H, W) and (K_pred is None or np.allclose(K_pred, K_gt)):
        return pred.astype(np.float32)
    if K_pred is None:
        sx, sy = w / W, h / H
        A = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])
        K_pred = A @ np.asarray(K_gt, np.float64)
    M = np.asarray(K_pred, np.float64) @ np.linalg.inv(np.asarray(K_gt, np.float64))
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    up = M[0, 0] * u + M[0, 1] * v + M[0, 2]
    vp = M[1, 0] * u + M[1, 1] * v + M[1, 2]
    iu, iv = np.floor(up + 0.5).astype(np.int64), np.floor(vp + 0.5).astype(np.int64)
    inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    out = np.full((H, W), np.nan, np.float32)
    out[inside] = pred[iv[inside], iu[inside]]
    return out


def write_perturbed_prediction(gt_bag: str | Path, out: str | Path, scale: float = 0.37,
                               rotvec=(0.4, -1.1, 0.7), offset=(2.0, -1.0, 0.5), pose_noise: float = 0.01,
                               depth_noise: float = 0.02, map_noise: float = 0.005, half_res_depth: bool = False,
                               seed: int = 1, overwrite: bool = False):
    """A prediction bag made from a sim bag's ground truth with a KNOWN perturbation, for tests and demos.

    The prediction lives in a frame related to the world by the similarity ``world = scale R pred + offset``
    (R = exp(rotvec)), as an up-to-scale model would; poses get Gaussian position noise of ``pose_noise`` metres
    per axis (world units), depths are the ground truth / scale times (1 + N(0, depth_noise)), the map is the observed
    surface (voxel 2 cm) with ``map_noise`` metres of noise. half_res_depth: depth at half resolution with its
    camera_info. Returns (bag path, the Sim3 that eval should find)."""
    from ros2_stream4d.sim.bag import read_ground_truth

    gt = read_ground_truth(gt_bag)
    sim = Sim3(float(scale), rotation_from_vector(np.asarray(rotvec, np.float64)), np.asarray(offset, np.float64))
    rng = np.random.default_rng(seed)
    P = gt.T_world_cam.copy()
    P[:, :3, :3] = sim.R.T @ P[:, :3, :3]
    P[:, :3, 3] = (P[:, :3, 3] - sim.t) @ sim.R / sim.s + rng.normal(0, pose_noise / sim.s, (len(P), 3))
    depths = (gt.depths / sim.s * (1 + rng.normal(0, depth_noise, gt.depths.shape))).astype(np.float32)
    K = None
    if half_res_depth:
        depths = depths[:, ::2, ::2]
        K = np.array([[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1]]) @ gt.K  # pixel centres: u' = (u + 0.5) / 2 - 0.5
    surf = observed_surface(gt.depths, gt.K, gt.T_world_cam, voxel=0.02)
    pts = ((surf - sim.t) @ sim.R) / sim.s + rng.normal(0, map_noise / sim.s, surf.shape)
    path = write_prediction_bag(out, gt.stamps, P, depths=depths, depth_K=K, map_points=pts,
                                map_rgb=np.full((len(pts), 3), 128, np.uint8),
                                map_conf=np.ones(len(pts), np.float32), overwrite=overwrite)
    return path, sim
