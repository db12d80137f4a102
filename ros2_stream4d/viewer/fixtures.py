"""Runs without a node, for tests and the viewer benchmark: the mapping pipeline on a sim bag with the oracle, and
an output bag shaped like the node's (the topics `stream4d view` reads), written with rosbags (no ROS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Writer

from ros2_stream4d.eval.bagio import pointcloud2_msg
from ros2_stream4d.sim.bag import STORAGES, TYPESTORE, camera_info_msg, image_msg, pose_msg, prepare_out_dir


def oracle_results(sim_bag: str | Path, input_width: int = 0, conf_percentile: float = 30.0, frames: int = 0):
    """(FrameResults, map (xyz, rgb), source images (N, H, W, 3), K) of the mapping pipeline with the oracle
    session over a sim bag. input_width (a multiple of the patch size, 14) 0: the one nearest the images' width."""
    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig
    from ros2_stream4d.sim.bag import read_ground_truth
    from ros2_stream4d.sim.oracle import OracleSession

    gt = read_ground_truth(sim_bag, with_depth=True, with_images=True)
    n = len(gt.stamps) if frames <= 0 else min(frames, len(gt.stamps))
    session = OracleSession(gt.stamps, gt.T_world_cam, gt.K, gt.depths)
    cfg = PipelineConfig(input_width=input_width or max(14, 14 * round(gt.width / 14)), conf_percentile=conf_percentile)
    pipeline = MappingPipeline(cfg, session)
    results = []
    for i in range(n):
        outcome = pipeline.process(gt.images[i], int(gt.stamps[i]), K_src=gt.K)
        result = getattr(outcome, "result", outcome)
        if result is not None:
            results.append(result)
    xyz, rgb, _ = pipeline.map_points()
    return results, (xyz, rgb), gt.images[:n], gt.K


def write_output_bag(path: str | Path, results, map_cloud=None, ns: str = "/stream4d", map_frame: str = "map",
                     camera_frame: str = "camera_optical_frame", storage: str = "mcap",
                     overwrite: bool = False, cloud_in_camera: bool = False, legacy_names: bool = False) -> Path:
    """The node's per-frame outputs (camera_pose, depth + camera_info, confidence, cloud in the map frame, or the
    camera frame with cloud_in_camera) for each FrameResult (clouds in the map frame), and the map (xyz, rgb) once
    at the last stamp. Topic names as ros2_stream4d/topics.py has them (depth in model units: the oracle pipeline
    has no scale source), or 0.1's (~/depth, ~/confidence) with legacy_names."""
    from ros2_stream4d.mapping.conventions import inverse, transform_points

    path = prepare_out_dir(path, overwrite)
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as w:
        def conn(topic, msgtype):
            return w.add_connection(f"{ns}/{topic}", msgtype, typestore=TYPESTORE)

        if legacy_names:
            depth, info, conf = "depth", "depth/camera_info", "confidence"
        else:
            depth, info, conf = "depth_relative/image", "depth_relative/camera_info", "confidence/image"
        c = {"pose": conn("camera_pose", "geometry_msgs/msg/PoseStamped"),
             "depth": conn(depth, "sensor_msgs/msg/Image"),
             "info": conn(info, "sensor_msgs/msg/CameraInfo"),
             "conf": conn(conf, "sensor_msgs/msg/Image"),
             "cloud": conn("cloud", "sensor_msgs/msg/PointCloud2"),
             "map": conn("map", "sensor_msgs/msg/PointCloud2")}

        def put(key, ns_, msg):
            w.write(c[key], ns_, TYPESTORE.serialize_cdr(msg, msg.__msgtype__))

        for r in results:
            s = int(r.stamp_ns)
            put("pose", s, pose_msg(s, map_frame, np.asarray(r.T_map_cam)))
            h, wd = r.depth.shape
            put("depth", s, image_msg(s, camera_frame, np.ascontiguousarray(r.depth, np.float32), "32FC1"))
            put("info", s, camera_info_msg(s, camera_frame, r.K, wd, h))
            put("conf", s, image_msg(s, camera_frame, np.ascontiguousarray(r.confidence, np.float32), "32FC1"))
            if cloud_in_camera:
                xyz = transform_points(inverse(r.T_map_cam), r.cloud_xyz).astype(np.float32)
                put("cloud", s, pointcloud2_msg(s, camera_frame, xyz, r.cloud_rgb, r.cloud_conf))
            else:
                put("cloud", s, pointcloud2_msg(s, map_frame, r.cloud_xyz, r.cloud_rgb, r.cloud_conf))
        if map_cloud is not None and results:
            s = int(results[-1].stamp_ns)
            put("map", s, pointcloud2_msg(s, map_frame, map_cloud[0], map_cloud[1]))
    return path
