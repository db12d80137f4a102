"""FrameResult -> the messages of one frame. Shared by the live node and the offline bag processor, so a bag
processed offline carries exactly what the node would have published."""

from __future__ import annotations

from typing import Any

from nav_msgs.msg import Path
from sensor_msgs.msg import CameraInfo
from tf2_msgs.msg import TFMessage

from ros2_stream4d.mapping.pipeline import FrameResult
from ros2_stream4d.ros import conversions as conv

# output key -> topic relative to the node (~/...) or absolute, and the message type name
TOPICS = {
    "cloud": ("~/cloud", "sensor_msgs/msg/PointCloud2"),
    "map": ("~/map", "sensor_msgs/msg/PointCloud2"),
    "depth": ("~/depth", "sensor_msgs/msg/Image"),
    "depth_info": ("~/depth/camera_info", "sensor_msgs/msg/CameraInfo"),
    "confidence": ("~/confidence", "sensor_msgs/msg/Image"),
    "confidence_info": ("~/confidence/camera_info", "sensor_msgs/msg/CameraInfo"),
    "camera_pose": ("~/camera_pose", "geometry_msgs/msg/PoseStamped"),
    "odometry": ("~/odometry", "nav_msgs/msg/Odometry"),
    "path": ("~/path", "nav_msgs/msg/Path"),
    "tf": ("/tf", "tf2_msgs/msg/TFMessage"),
}


def tf_edges(r: FrameResult, p: dict[str, Any], camera_frame: str) -> list[tuple[str, str, Any]]:
    """REP-105 edges to publish: (parent, child, parent_from_child). One parent per frame."""
    mode = p["tf_mode"]
    base = p["base_frame"]
    if mode == "auto":
        if not base or r.T_map_base is None:
            mode = "map_to_camera"
        else:
            mode = "map_to_odom" if r.T_map_odom is not None else "odom_to_base"
    if mode == "map_to_camera":
        return [(p["map_frame"], camera_frame, r.T_map_cam)]
    if r.T_map_base is None:
        raise ValueError(f"tf_mode {mode} needs base_frame and the base->camera transform on /tf_static")
    if mode == "odom_to_base":  # nothing else estimates odometry: our map origin is the odom origin
        return [(p["odom_frame"], base, r.T_map_base)]
    if r.T_map_odom is None:
        raise ValueError("tf_mode map_to_odom needs another node publishing odom->base_link")
    return [(p["map_frame"], p["odom_frame"], r.T_map_odom)]


def frame_messages(r: FrameResult, p: dict[str, Any], camera_frame: str, info: CameraInfo | None,
                   path: Path | None) -> list[tuple[str, Any]]:
    """[(output key, message)] for one processed frame, each stamped with the input image's stamp."""
    stamp = conv.ns_to_time(r.stamp_ns)
    out: list[tuple[str, Any]] = []
    robot = bool(p["base_frame"]) and r.T_map_base is not None
    if p["publish_cloud"]:
        frame = p["map_frame"] if p["cloud_frame"] == "map" else camera_frame
        out.append(("cloud", conv.numpy_to_pointcloud2(r.cloud_xyz, r.cloud_rgb, r.cloud_conf, stamp=stamp,
                                                       frame_id=frame)))
    if p["publish_depth"] or p["publish_confidence"]:
        header = conv.make_header(stamp, camera_frame)  # REP-118: image and CameraInfo share one header
        h, w = r.depth.shape
        reuse_info = (info is not None and p["intrinsics_source"] == "camera_info"
                      and p["depth_geometry"] == "camera" and (info.width, info.height) == (w, h))
        if reuse_info:
            cam_info = CameraInfo(header=header, width=w, height=h, distortion_model=info.distortion_model,
                                  d=list(info.d), k=list(info.k), r=list(info.r), p=list(info.p))
        else:
            cam_info = conv.make_camera_info(r.K, w, h, header=header)
        if p["publish_depth"]:
            out.append(("depth", conv.numpy_to_image(r.depth, "32FC1", header=header)))
            out.append(("depth_info", cam_info))
        if p["publish_confidence"]:
            out.append(("confidence", conv.numpy_to_image(r.confidence, "32FC1", header=header)))
            out.append(("confidence_info", cam_info))
    if p["publish_camera_pose"]:
        out.append(("camera_pose", conv.matrix_to_pose_stamped(r.T_map_cam, stamp, p["map_frame"])))
    body_pose = r.T_map_base if robot else r.T_map_cam
    body_frame = p["base_frame"] if robot else camera_frame
    if p["publish_odometry"]:
        out.append(("odometry", conv.matrix_to_odometry(body_pose, stamp, p["map_frame"], body_frame)))
    if p["publish_path"] and path is not None:
        path.header = conv.make_header(stamp, p["map_frame"])
        path.poses.append(conv.matrix_to_pose_stamped(body_pose, stamp, p["map_frame"]))
        if len(path.poses) > p["path_max_length"]:
            del path.poses[: len(path.poses) - p["path_max_length"]]
        out.append(("path", path))
    if p["publish_tf"]:
        transforms = [conv.matrix_to_transform_stamped(T, stamp, parent, child)
                      for parent, child, T in tf_edges(r, p, camera_frame)]
        out.append(("tf", TFMessage(transforms=transforms)))
    return out
