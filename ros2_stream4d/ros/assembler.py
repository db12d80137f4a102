"""Frame outcomes -> ROS messages: the one place that builds what the node publishes.

Used by the live node and by offline processing (``stream4d process``), so a bag processed offline carries exactly
what the node would have published. It owns the path, the motion estimate behind ~/odometry's twist and
covariances, and the map message; the topic names come from ros2_stream4d.topics.
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from nav_msgs.msg import OccupancyGrid, Path
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker

from ros2_stream4d.mapping.motion import MotionEstimator
from ros2_stream4d.mapping.occupancy import grid_msg_fields
from ros2_stream4d.mapping.pipeline import FrameResult, Gated, Processed, Skipped
from ros2_stream4d.mapping.products import mesh_marker_fields
from ros2_stream4d.ros import conversions as conv
from ros2_stream4d.ros.tf_policy import TfDecision, TfView, body_pose, edge_transforms

POSE_KEYS = ("camera_pose", "odometry", "tf")  # what a gated frame republishes


class OutputAssembler:
    def __init__(self, cfg: Any, tf: TfView):
        self.cfg = cfg
        self.tf = tf
        self.path = Path()
        self.path.header.frame_id = cfg.map_frame
        self.motion = self._motion(cfg)
        self.own_edges: set[tuple[str, str]] = set()  # every (parent, child) this node has published

    @staticmethod
    def _motion(cfg: Any) -> MotionEstimator:
        return MotionEstimator(cfg.pose_sigma_per_m, cfg.rotation_sigma, cfg.unscaled_sigma_factor)

    def set_config(self, cfg: Any) -> None:
        """Live parameter changes (publish flags, path length, covariance settings)."""
        self.cfg = cfg
        self.motion.pose_sigma_per_m = cfg.pose_sigma_per_m
        self.motion.rotation_sigma = cfg.rotation_sigma
        self.motion.unscaled_sigma_factor = cfg.unscaled_sigma_factor
        if len(self.path.poses) > cfg.path_max_length:
            del self.path.poses[: len(self.path.poses) - cfg.path_max_length]

    def reset(self) -> None:
        self.path.poses.clear()
        self.motion.reset()

    # ------------------------------------------------------------------ per frame
    def messages(self, outcome: Skipped | Gated | Processed, decision: TfDecision, camera_frame: str
                 ) -> list[tuple[str, Any]]:
        """[(output key, message)] for one frame outcome, every message stamped with the input image's stamp."""
        if isinstance(outcome, Skipped):
            return []
        if isinstance(outcome, Gated):
            if outcome.result is None:
                return []
            return [(k, m) for k, m in self._frame(outcome.result, decision, camera_frame, gated=True)
                    if k in POSE_KEYS]
        return self._frame(outcome.result, decision, camera_frame, gated=False)

    def _frame(self, r: FrameResult, decision: TfDecision, camera_frame: str, gated: bool) -> list[tuple[str, Any]]:
        c = self.cfg
        stamp = conv.ns_to_time(r.stamp_ns)
        out: list[tuple[str, Any]] = []
        if c.publish_cloud and not gated:
            frame = c.map_frame if c.cloud_frame == "map" else camera_frame
            out.append(("cloud", conv.numpy_to_pointcloud2(r.cloud_xyz, r.cloud_rgb, r.cloud_conf, stamp=stamp,
                                                           frame_id=frame)))
        if (c.publish_depth or c.publish_confidence) and not gated:
            header = conv.make_header(stamp, camera_frame)  # REP-118: image and CameraInfo share one header
            h, w = r.depth.shape
            # the depth geometry is pinhole (undistorted input, or the model's own): no distortion
            info = conv.make_camera_info(r.K, w, h, header=header)
            if c.publish_depth:
                key = "depth" if r.scale_valid else "depth_relative"
                out.append((key, conv.numpy_to_image(r.depth, "32FC1", header=header)))
                out.append((key + "_info", info))
            if c.publish_confidence:
                out.append(("confidence", conv.numpy_to_image(r.confidence, "32FC1", header=header)))
                out.append(("confidence_info", info))
        C = r.odom_correction  # a back-end's map <- odom (the result's poses are odometry then)
        if c.publish_camera_pose:
            T_map_cam = r.T_map_cam if C is None else C @ r.T_map_cam
            out.append(("camera_pose", conv.matrix_to_pose_stamped(T_map_cam, stamp, c.map_frame)))
        body = body_pose(decision, r, self.tf, camera_frame)
        odom_frame = decision.parent or c.map_frame
        # the body in map: the odometry pose moved by the back-end's correction when its header frame is odom
        T_map_body = C @ body if C is not None and odom_frame != c.map_frame else body
        if c.publish_odometry:
            finite = r.depth[np.isfinite(r.depth)]
            conf = r.confidence[np.isfinite(r.confidence)]
            motion = self.motion.update(body, r.stamp_ns, float(np.median(finite)) if finite.size else np.nan,
                                        float(np.median(conf)) if conf.size else np.nan, r.scale_valid)
            out.append(("odometry", conv.matrix_to_odometry(
                body, stamp, odom_frame, decision.moving_frame, pose_covariance=motion.pose_covariance,
                linear=motion.linear, angular=motion.angular, twist_covariance=motion.twist_covariance)))
        if c.publish_path and not gated:
            self.path.header = conv.make_header(stamp, c.map_frame)
            self.path.poses.append(conv.matrix_to_pose_stamped(T_map_body, stamp, c.map_frame))
            if len(self.path.poses) > c.path_max_length:
                del self.path.poses[: len(self.path.poses) - c.path_max_length]
            out.append(("path", self.path))
        if c.publish_tf:
            edges = edge_transforms(decision, c, r, body)
            if edges:
                self.own_edges.update((parent, child) for parent, child, _ in edges)
                out.append(("tf", TFMessage(transforms=[conv.matrix_to_transform_stamped(T, stamp, parent, child)
                                                        for parent, child, T in edges])))
        return out

    def map_message(self, xyz: np.ndarray, rgb: np.ndarray, conf: np.ndarray, stamp: Any):
        return conv.numpy_to_pointcloud2(xyz, rgb, conf, frame_id=self.cfg.map_frame, stamp=stamp)

    def mesh_messages(self, vertices: np.ndarray, triangles: np.ndarray, colours: np.ndarray, stamp: Any
                      ) -> list[bytes]:
        """The TSDF mesh as visualization_msgs/Marker TRIANGLE_LISTs in map with one colour per corner (split into
        several markers above 500k triangles; layout from mapping/products.py), serialised (a publisher and a bag
        take the bytes; conversions.serialized_marker). frame_locked: it follows map."""
        out = []
        for f in mesh_marker_fields(vertices, triangles, colours, frame_id=self.cfg.map_frame, ns="stream4d_mesh"):
            m = Marker()
            m.header = conv.make_header(stamp, f["header"]["frame_id"])
            m.ns, m.id, m.type, m.action = f["ns"], f["id"], f["type"], f["action"]
            m.pose.orientation.w = 1.0
            m.scale.x, m.scale.y, m.scale.z = f["scale"]
            m.color.r, m.color.g, m.color.b, m.color.a = f["color"]
            m.frame_locked = True
            out.append(conv.serialized_marker(m, f["points"], f["colors"]))
        return out

    def occupancy_message(self, data: np.ndarray, origin: Any, resolution: float, stamp: Any) -> OccupancyGrid:
        """nav_msgs/OccupancyGrid in map (layout from mapping/occupancy.py: row-major from the origin cell, -1
        unknown, 0 free, 100 occupied), at the floor height."""
        f = grid_msg_fields(data, origin, resolution, frame_id=self.cfg.map_frame)
        grid = OccupancyGrid()
        grid.header = conv.make_header(stamp, f["header"]["frame_id"])
        grid.info.map_load_time = grid.header.stamp
        grid.info.resolution = f["info"]["resolution"]
        grid.info.width, grid.info.height = f["info"]["width"], f["info"]["height"]
        grid.info.origin.position.x = f["info"]["origin"]["position"]["x"]
        grid.info.origin.position.y = f["info"]["origin"]["position"]["y"]
        grid.info.origin.position.z = float(self.cfg.occupancy_floor_z)
        grid.info.origin.orientation.w = 1.0
        grid.data = array.array("b", f["data"].tobytes())
        return grid

    def path_snapshot(self) -> Path:
        """A copy of the path for a timer to publish (the worker keeps appending to the original)."""
        return Path(header=self.path.header, poses=list(self.path.poses))
