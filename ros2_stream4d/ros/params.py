"""Every parameter of stream4d_node: name, default, unit and meaning, in one place.

config/stream4d.yaml documents the same list (a test keeps them in step); the node declares exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    """One parameter. ``live``: may change at run time through set_parameters (applied by the node's on-set
    callback); otherwise it is declared read-only (it needs a restart: the model, the device, topics...).
    ``low``/``high``: inclusive numeric range checked at start-up and on every change."""

    name: str
    default: Any
    unit: str
    help: str
    choices: tuple = ()
    live: bool = False
    low: float | None = None
    high: float | None = None


PARAMS: tuple[Param, ...] = (
    # --- model -------------------------------------------------------------------------------------------------
    Param("model", "streamvggt", "",
          "model card name in the package's model/ folder (streamvggt, vggt-1b, stream3r: official weights, placed "
          "in the Hugging Face cache or fetched with allow_download), a checkpoint path (.safetensors/.pth/.pt), "
          "'random-small' (random weights, for plumbing tests) or 'oracle' (ground truth from oracle_bag)"),
    Param("oracle_bag", "", "path", "sim bag whose /ground_truth topics the 'oracle' model replays (tests, demos)"),
    Param("oracle_noise", "none", "",
          "errors the 'oracle' model adds to its exact output: none, realistic (a streaming model's drift, depth "
          "noise, outliers and confidence; docs/longrun/README.md cites the magnitudes) or a YAML file of magnitudes"),
    Param("oracle_seed", 0, "", "seed of the oracle's errors (oracle_noise)", low=0, high=2**31 - 1),
    Param("allow_download", False, "", "let a model card fetch its weights from the Hugging Face hub"),
    Param("device", "auto", "", "torch device: auto (cuda when available), cpu, cuda, cuda:N"),
    Param("dtype", "auto", "", "compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16",
          ("auto", "float32", "bfloat16")),
    Param("attention_backend", "sdpa", "", "attention kernel: sdpa (torch), flash (flash-attn, CUDA), eager",
          ("sdpa", "flash", "eager")),
    Param("torch_threads", 0, "threads",
          "CPU threads torch uses (0 = torch's default); 1 is fastest on a loaded 2-core CPU (docs/training)",
          low=0, high=256),
    Param("window", 16, "frames", "rolling KV cache: most recent frames kept besides the anchors; 0 = unlimited", low=0, high=100000),
    Param("anchors", 1, "frames", "frames kept forever at the start of the stream (the first defines the world)", low=1, high=64),
    # --- input -------------------------------------------------------------------------------------------------
    Param("num_cameras", 1, "cameras",
          "cameras fed to one stream: 1 subscribes the relative names image + camera_info (remap them); N > 1 "
          "subscribes cam0/image, cam0/camera_info, ... cam<N-1>/..., grouped by stamp (sync_slop)", low=1, high=8),
    Param("sync_slop", 0.02, "s",
          "several cameras: frames whose stamps lie within this of each other form one instant (one step each)",
          live=True, low=0.0, high=1.0),
    Param("image_transport", "raw", "", "raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage)",
          ("raw", "compressed")),
    Param("input_width", 518, "px", "model input width (multiple of 14); height follows the aspect ratio", low=14, high=4088),
    Param("input_mode", "crop", "", "crop (official recipe) or pad (keeps the whole image)", ("crop", "pad")),
    Param("intrinsics_source", "model", "",
          "model (predicted field of view) or camera_info (the camera's calibration)", ("model", "camera_info")),
    Param("points_source", "depth", "", "world points from depth + pose (depth) or the point head (point_head)",
          ("depth", "point_head")),
    Param("process_every_frame", False, "",
          "false: one-slot queue per camera, a slow model drops old frames; true: process every frame (bags)"),
    Param("input_qos", "sensor_data", "",
          "sensor_data (best effort, drops under load: live cameras) or reliable (bag replay, process_every_frame)",
          ("sensor_data", "reliable")),
    Param("gate_threshold", 0.0, "grey levels",
          "skip frames whose mean absolute difference to the last processed one is below this (0 = off)", live=True, low=0.0, high=255.0),
    Param("gate_max_skip", 30, "frames", "process at least every N-th frame even when the gate would skip it", live=True, low=1, high=100000),
    Param("max_image_side", 8192, "px",
          "images larger than this on either side are rejected (compressed ones from their header, before decoding)", low=14, high=65535),
    Param("min_image_side", 14, "px", "images smaller than this on either side are rejected (14 = one model patch)", low=1, high=65535),
    Param("no_image_warn_s", 2.0, "s", "diagnostics warn when no image arrived for this long", live=True, low=0.01, high=3600.0),
    # --- outputs -----------------------------------------------------------------------------------------------
    Param("publish_cloud", True, "", "per-frame PointCloud2 (~/cloud)", live=True),
    Param("cloud_frame", "map", "", "frame of ~/cloud: map or camera", ("map", "camera"), live=True),
    Param("cloud_max_points", 200000, "points", "per-frame cloud cap (random subsample above it)", live=True, low=1, high=100000000),
    Param("conf_threshold", 0.0, "", "drop points whose confidence is below this (model confidence units)", live=True, low=0.0, high=1e9),
    Param("conf_percentile", 20.0, "%", "also drop this lowest fraction of each frame's points (0 = off)", live=True, low=0.0, high=99.9),
    Param("publish_map", True, "", "accumulated map PointCloud2 (~/map, reliable + transient_local)", live=True),
    Param("map_voxel_size", 0.02, "m (model units without scale)", "voxel edge of the accumulated map", low=1e-4, high=100.0),
    Param("map_max_points", 1000000, "points", "accumulated map bound; oldest voxels are evicted beyond it", low=1, high=1000000000),
    Param("map_publish_rate", 1.0, "Hz", "how often ~/map is published (0 = never)", live=True, low=0.0, high=100.0),
    Param("publish_depth", True, "", "depth Image 32FC1 (NaN = invalid) + CameraInfo (~/depth, ~/depth/camera_info)", live=True),
    Param("publish_confidence", True, "", "confidence Image 32FC1 + CameraInfo (~/confidence)", live=True),
    Param("depth_geometry", "camera", "",
          "camera: depth resampled to the input image's pixels; model: the model's resolution", ("camera", "model"), live=True),
    Param("publish_camera_pose", True, "", "~/camera_pose PoseStamped: the camera optical frame in map_frame", live=True),
    Param("publish_odometry", True, "", "nav_msgs/Odometry (~/odometry)", live=True),
    Param("publish_path", True, "", "nav_msgs/Path (~/path)", live=True),
    Param("path_max_length", 10000, "poses", "path length bound", live=True, low=1, high=10000000),
    Param("path_publish_rate", 1.0, "Hz",
          "0 = ~/path with every frame; > 0 = at this rate when it changed. The path holds up to path_max_length "
          "poses and costs ~3 ms per 1000 poses to serialise: use e.g. 1.0 for long live runs", live=True, low=0.0, high=100.0),
    Param("publish_tf", True, "", "publish the TF of REP-105 (see tf_mode)", live=True),
    Param("tf_mode", "auto", "",
          "auto: map->odom when odom->base_link has another publisher, else odom->base_link (robot) or "
          "map->camera (camera only); or force map_to_camera | odom_to_base | map_to_odom",
          ("auto", "map_to_camera", "odom_to_base", "map_to_odom")),
    Param("tf_timeout", 0.1, "s", "how long a frame waits for odom->base_link at its stamp before using the latest", live=True, low=0.0, high=10.0),
    # --- keyframe map and its products (mapping/keyframe_map.py) ------------------------------------------------
    Param("map_keyframe_distance", 0.3, "m", "a new keyframe when the camera moved this far from the last one",
          low=0.0, high=100.0),
    Param("map_keyframe_angle", 15.0, "deg", "... or turned this much", low=0.0, high=180.0),
    Param("map_keyframe_max_frames", 10, "frames", "frames stored per keyframe at most", low=1, high=1000),
    Param("map_stride", 2, "px", "pixel stride of the depth and colour a keyframe stores (model resolution)",
          low=1, high=64),
    Param("map_cloud_stride", 2, "px", "extra stride of the points fused into ~/map and the grid", low=1, high=64),
    Param("map_depth_max", 5.0, "m", "depth fused into the TSDF mesh and the grid", low=0.01, high=1000.0),
    Param("map_cloud_depth_max", 0.0, "m", "depth fused into the ~/map cloud (0 = no limit)", low=0.0, high=1000.0),
    Param("map_conf_percentile", 50.0, "%",
          "the map's cloud, mesh and grid fuse each frame's pixels at or above this percentile of its confidence "
          "(0 = all the node's cloud keeps; the keyframes store those for the back-end)", low=0.0, high=99.9),
    Param("map_cloud_surface_voxels", 2.0, "voxels",
          "~/map leaves out the points the TSDF surface contradicts: in fused space, farther than this many TSDF "
          "voxels from the surface (0 = keep all; needs mesh_enabled)", low=0.0, high=100.0),
    Param("map_cloud_surface_pull", 0.75, "fraction",
          "... and moves the points it keeps this fraction of their distance to the surface's local plane (0 = where "
          "they were fused, 1 = onto the TSDF surface; acts with that filter only)", low=0.0, high=1.0),
    Param("map_max_keyframes_in_memory", 50, "keyframes", "older keyframes are spilled to map_spill_dir",
          low=1, high=1000000),
    Param("map_spill_dir", "", "path", "where spilled keyframes go; empty = a private temporary directory"),
    Param("map_load_path", "", "path",
          "a saved map directory to continue from (at start-up, and by ~/load_map); the body starts at "
          "map_start_pose", live=True),
    Param("map_start_pose", [0.0, 0.0, 0.0, 0.0], "m, m, m, rad",
          "x, y, z, yaw of the body frame (base_frame, or the camera's body axes) in map at a loaded map's first "
          "frame", live=True),
    Param("mesh_enabled", True, "", "TSDF integration (Open3D VoxelBlockGrid) and ~/mesh"),
    Param("tsdf_voxel_size", 0.05, "m", "edge of a TSDF voxel (the mesh resolution)", low=0.001, high=10.0),
    Param("tsdf_trunc_voxels", 6.0, "voxels", "TSDF truncation distance (floors seen at grazing angles need > 4)",
          low=1.0, high=100.0),
    Param("tsdf_device", "CPU:0", "", "Open3D device of the TSDF: CPU:0, or CUDA:0 with Open3D's CUDA build"),
    Param("mesh_publish_rate", 0.2, "Hz", "how often ~/mesh is extracted and published (0 = never)", live=True,
          low=0.0, high=10.0),
    Param("occupancy_enabled", True, "", "2D occupancy grid for Nav2 (~/occupancy)"),
    Param("occupancy_resolution", 0.05, "m", "edge of an occupancy grid cell", low=0.005, high=10.0),
    Param("occupancy_floor_z", 0.0, "m", "floor height in map", low=-1000.0, high=1000.0),
    Param("occupancy_min_height", 0.1, "m", "obstacles start this high above the floor (exclusive)",
          low=-100.0, high=100.0),
    Param("occupancy_max_height", 1.5, "m", "obstacles end this high above the floor", low=-100.0, high=100.0),
    Param("occupancy_max_range", 5.0, "m", "horizontal range of a frame's votes", low=0.1, high=1000.0),
    Param("occupancy_slab_height", 0.2, "m", "height resolution of the grid's evidence inside the band",
          low=0.01, high=100.0),
    Param("occupancy_publish_rate", 0.5, "Hz", "how often ~/occupancy is published (0 = never)", live=True,
          low=0.0, high=10.0),
    # --- long runs: segments, loop closure, Sim(3) pose graph (mapping/backend, docs/longrun/README.md) -----------
    Param("backend", False, "",
          "long-run back-end: re-anchored stream segments, loop closure and a Sim(3) pose graph; corrections go to "
          "map -> odom and the keyframe map (camera poses are then published as odometry in odom_frame)"),
    Param("segment_min_anchor_overlap", 0.3, "", "backend: a new segment when this share of the view or less is "
          "seen by the segment's anchor frame", low=0.0, high=1.0),
    Param("segment_max_frames", 120, "frames", "backend: a new segment after this many frames at most",
          low=2, high=1000000),
    Param("segment_min_frames", 24, "frames", "backend: a segment lasts at least this many frames", low=2, high=1000000),
    Param("segment_overlap_frames", 8, "frames",
          "backend: recent frames re-fed into a new segment (its overlap with the last; < segment_min_frames)",
          low=1, high=1000),
    Param("segment_alignment", "poses", "",
          "backend: how a new segment is aligned to the last on the re-fed frames: poses (rotation and translation "
          "from their camera poses, scale from their depth ratio) or points (a Sim(3) fit to their point maps)",
          ("points", "poses")),
    Param("loop_min_similarity", 0.8, "", "backend: global-descriptor cosine similarity of a loop candidate",
          live=True, low=0.0, high=1.0),
    Param("loop_min_inliers", 20, "matches", "backend: geometric inliers a loop needs", live=True, low=3, high=100000),
    Param("loop_search_radius", 1.0, "m", "backend: loop candidates within this distance of the odometry pose ...",
          live=True, low=0.0, high=1000.0),
    Param("loop_search_drift_fraction", 0.15, "", "backend: ... plus this fraction of the path travelled since",
          live=True, low=0.0, high=10.0),
    Param("loop_gate_distance", 0.5, "m",
          "backend: once loops corrected the map, a new loop must agree with it within this (+ 0.1 m per metre of "
          "odometry from the loops the map rests on) or it is held back", low=0.0, high=1000.0),
    Param("loop_release_after", 3, "loops",
          "backend: held loops join the graph once this many of them agree with each other (0 = no gate)",
          low=0, high=1000),
    Param("loop_release_wait", 8, "keyframes",
          "backend: held loops are weighed (agreeing, more than the loops around them) this many keyframes after "
          "their newer end, once the revisit's loops there have come (0 = at once)", low=0, high=100000),
    Param("backend_drift_calibration", True, "",
          "backend: once loops span 10 m of odometry, estimate the front-end's rotation drift per metre, take it out "
          "of the odometry edges and solve again trusting their rotation (the rate is in the diagnostics)"),
    Param("backend_max_correction", 2.0, "m",
          "backend: an optimisation moving a keyframe further than this (+ a fraction of the path) is dropped",
          low=0.0, high=100000.0),
    Param("backend_apply_rate", 1.0, "Hz", "backend: how often an accepted correction is written into the map",
          live=True, low=0.01, high=100.0),
    # --- live viewer (ros2_stream4d/viewer, docs/viewer.md) ------------------------------------------------------
    Param("viewer", "", "", "live 3D view of the run: '' (off) or rerun (Rerun, off the worker's hot path)",
          ("", "rerun")),
    Param("viewer_mode", "serve", "",
          "serve (web viewer on 127.0.0.1:viewer_web_port), spawn (a native viewer), connect (to viewer_url), "
          "save (a .rrd at viewer_path)", ("serve", "spawn", "connect", "save")),
    Param("viewer_web_port", 9090, "port", "web viewer port (serve, 127.0.0.1 only)", low=1, high=65535),
    Param("viewer_grpc_port", 9876, "port", "Rerun data port (serve/spawn)", low=1, high=65535),
    Param("viewer_url", "", "", "connect mode: the viewer's rerun+http:// URL ('' = Rerun's default)"),
    Param("viewer_path", "", "path", "save mode: the .rrd file to write"),
    Param("viewer_memory_limit", "512MiB", "", "memory the served viewer keeps before dropping old data"),
    # --- frames ------------------------------------------------------------------------------------------------
    Param("map_frame", "map", "", "fixed frame of the map, clouds and path"),
    Param("odom_frame", "odom", "", "odometry frame (REP-105)"),
    Param("base_frame", "", "", "robot base frame (e.g. base_link); empty = camera-only set-up"),
    Param("camera_frame", "", "", "camera optical frame; empty = the image header's frame_id"),
    # --- scale -------------------------------------------------------------------------------------------------
    Param("scale_source", "none", "",
          "none (model units), fixed, depth (sensor depth topic, robust median ratio), odometry "
          "(translation ratio against odom->base_link)", ("none", "fixed", "depth", "odometry")),
    Param("fixed_scale", 1.0, "m per model unit", "scale for scale_source=fixed", low=1e-9, high=1e9),
    # --- services, diagnostics, lifecycle ------------------------------------------------------------------------
    Param("map_save_path", "", "path",
          "where ~/save_map writes: a .ply or .pcd path = the ~/map cloud alone; any other path = the whole map as "
          "a directory (keyframes and poses, TSDF mesh PLY, the grid as nav2 PGM + YAML, metadata); written "
          "atomically (temporary + rename); the parent directory must exist; empty = ~/.ros/stream4d_map/", live=True),
    Param("save_map_on_shutdown", False, "", "write the map to map_save_path on SIGINT/SIGTERM", live=True),
    Param("reset_on_time_jump", True, "", "a stamp going backwards (a bag looping) starts a new stream and map", live=True),
    Param("diagnostics_rate", 1.0, "Hz", "rate of /diagnostics", low=0.01, high=100.0),
    Param("autostart", True, "",
          "managed (lifecycle) node: configure and activate itself at start-up; false waits for "
          "`ros2 lifecycle set` (configure loads the model, activate subscribes, deactivate keeps the map)"),
    # --- odometry covariance -------------------------------------------------------------------------------------
    Param("pose_sigma_per_m", 0.02, "m per m of scene depth",
          "~/odometry position standard deviation per metre of the frame's median depth, before the confidence "
          "factor (see README: covariances)", live=True, low=1e-6, high=10.0),
    Param("rotation_sigma", 0.01, "rad", "~/odometry orientation standard deviation before the confidence factor",
          live=True, low=1e-6, high=3.2),
    Param("unscaled_sigma_factor", 1000.0, "",
          "multiplies the position standard deviation while no valid metric scale exists (model units)",
          live=True, low=1.0, high=1e9),
)

BY_NAME = {p.name: p for p in PARAMS}


def _yaml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return repr(value)


def describe(p: Param) -> str:
    """The one-line description a ParameterDescriptor and the YAML carry: meaning, unit, range or choices, and
    whether it can change at run time."""
    unit = f" [{p.unit}]" if p.unit else ""
    choices = f" (one of: {', '.join(p.choices)})" if p.choices else ""
    bounds = ""
    if p.low is not None or p.high is not None:
        bounds = f" (range {p.low if p.low is not None else '-inf'} .. {p.high if p.high is not None else 'inf'})"
    when = "; settable at run time" if p.live else "; read-only after start-up"
    return f"{p.help}{unit}{choices}{bounds}{when}"


def render_yaml(node_name: str = "stream4d") -> str:
    """config/stream4d.yaml: every parameter with its default, unit and meaning (regenerate with
    `python -m ros2_stream4d.ros.params > config/stream4d.yaml`). Keyed ``/**/<node>`` so it applies to the node
    under any namespace."""
    lines = [
        "# stream4d_node parameters: every one with its default, unit and meaning.",
        "# Generated from ros2_stream4d/ros/params.py (python -m ros2_stream4d.ros.params > config/stream4d.yaml).",
        f"/**/{node_name}:",
        "  ros__parameters:",
    ]
    for p in PARAMS:
        lines.append(f"    # {describe(p)}")
        lines.append(f"    {p.name}: {_yaml_value(p.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_yaml(), end="")
