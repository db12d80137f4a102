"""The one table of stream4d_node's topics: inputs (relative names a user remaps) and outputs (private names).

ROS-free on purpose: the output assembler (ros/), offline processing, the demo and evaluation all read names from
here, so a topic is renamed in one place.

Inputs are relative names, resolved in the node's namespace and remapped the usual way
(``image:=/camera/color/image_raw``). With ``num_cameras`` > 1 camera N's inputs are ``camN/image`` and
``camN/camera_info``. Compressed input subscribes to the *resolved* image name + ``/compressed``.

Outputs are private names (``~/x`` = ``<namespace>/<node name>/x``). Depth follows REP-118 and nvblox's naming:
``~/depth/image`` (32FC1, metres) is published only while a scale source holds a valid scale; without one the
same image in model units goes to ``~/depth_relative/image``. Each image has its CameraInfo beside it
(``.../camera_info``) with the identical header.

Migration from 0.1: ``~/depth`` -> ``~/depth/image`` (metres) or ``~/depth_relative/image`` (model units);
``~/confidence`` -> ``~/confidence/image``; ``image_topics``/``camera_info_topics``/``depth_topic`` parameters ->
the remappable inputs ``image``, ``camera_info``, ``depth/image``.
"""

from __future__ import annotations

NODE_NAME = "stream4d"

# input key -> (relative name, message type)
INPUTS = {
    "image": ("image", "sensor_msgs/msg/Image"),
    "camera_info": ("camera_info", "sensor_msgs/msg/CameraInfo"),
    "sensor_depth": ("depth/image", "sensor_msgs/msg/Image"),
}

# output key -> (name relative to the node: ~/..., or absolute; message type)
OUTPUTS = {
    "cloud": ("~/cloud", "sensor_msgs/msg/PointCloud2"),
    "map": ("~/map", "sensor_msgs/msg/PointCloud2"),
    "mesh": ("~/mesh", "visualization_msgs/msg/Marker"),
    "occupancy": ("~/occupancy", "nav_msgs/msg/OccupancyGrid"),
    "depth": ("~/depth/image", "sensor_msgs/msg/Image"),
    "depth_info": ("~/depth/camera_info", "sensor_msgs/msg/CameraInfo"),
    "depth_relative": ("~/depth_relative/image", "sensor_msgs/msg/Image"),
    "depth_relative_info": ("~/depth_relative/camera_info", "sensor_msgs/msg/CameraInfo"),
    "confidence": ("~/confidence/image", "sensor_msgs/msg/Image"),
    "confidence_info": ("~/confidence/camera_info", "sensor_msgs/msg/CameraInfo"),
    "camera_pose": ("~/camera_pose", "geometry_msgs/msg/PoseStamped"),
    "odometry": ("~/odometry", "nav_msgs/msg/Odometry"),
    "path": ("~/path", "nav_msgs/msg/Path"),
    "tf": ("/tf", "tf2_msgs/msg/TFMessage"),
    "diagnostics": ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
}
LATCHED_OUTPUTS = ("map", "mesh", "occupancy")  # reliable + transient_local


def camera_input(key: str, camera: int, num_cameras: int) -> str:
    """The relative input name of camera `camera` (``image`` for one camera, ``cam1/image`` for several)."""
    name = INPUTS[key][0]
    return name if num_cameras == 1 else f"cam{camera}/{name}"


def resolve(name: str, namespace: str = "/", node_name: str = NODE_NAME, remaps: dict[str, str] | None = None
            ) -> str:
    """A topic name as rclpy resolves it: ``~/x`` -> ``<ns>/<node>/x``, ``x`` -> ``<ns>/x``, then remapped.

    Remap rules match either the name as written or its resolved form (like ``--ros-args -r``)."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    remaps = remaps or {}
    if name in remaps:
        name = remaps[name]
    if name.startswith("~"):
        full = f"{ns}/{node_name}{name[1:]}"
    elif name.startswith("/"):
        full = name
    else:
        full = f"{ns}/{name}"
    return remaps.get(full, full)


def output_topic(key: str, namespace: str = "/", node_name: str = NODE_NAME) -> str:
    return resolve(OUTPUTS[key][0], namespace, node_name)
