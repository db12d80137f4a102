"""A run's bags -> a Rerun recording (.rrd) people open and share: `stream4d view`, the demo's demo.rrd.

Inputs: the node's output bag (camera pose, depth, confidence, per-frame cloud, map) and, when given, the sim bag
the run was fed with (camera images, CameraInfo, ground-truth poses). Bags are told apart by their topics, so
`stream4d view out/demo/output_bag out/demo/input_bag` and the reverse order do the same.

Why explicit logging and not Rerun's own MCAP import (`rerun mcap convert`, rerun.chunk.McapReader): measured on a
40-frame demo output bag (320x240, rerun-sdk 0.41), the import took 2.7 s and gave 186 MB: every per-frame cloud in
full (320 MB before compression), float32 depth, the confidence as a *depth* image, poses as InstancePoses3D (no
trajectory), odometry and path undecoded, each topic at its own frame_id with no ground truth. Everything a person
needs to look at therefore is logged here, downsampled and encoded (see entities.py and docs/viewer.md); the one
thing the import does that we reuse is its timeline name (header stamps: "ros2_timestamp").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rerun as rr

from . import entities as E
from .entities import RunLogger, ViewOptions, spread_indices


@dataclass
class Topics:
    """Where the node's outputs and the camera input are (the demo's defaults). Depth is read from every one of
    ~/depth/image (metres), ~/depth_relative/image (model units: no valid scale yet) and 0.1's ~/depth that the
    bag has (ros2_stream4d/topics.py), confidence from ~/confidence/image or 0.1's ~/confidence."""

    ns: str = "/stream4d"
    image: str = "/camera/image_raw"
    camera_info: str = "/camera/camera_info"
    gt_pose: str = "/ground_truth/pose"

    @property
    def pose(self) -> str:
        return f"{self.ns}/camera_pose"

    @property
    def depths(self) -> tuple[str, ...]:
        return f"{self.ns}/depth/image", f"{self.ns}/depth_relative/image", f"{self.ns}/depth"

    @property
    def confidences(self) -> tuple[str, ...]:
        return f"{self.ns}/confidence/image", f"{self.ns}/confidence"

    @property
    def cloud(self) -> str:
        return f"{self.ns}/cloud"

    @property
    def map(self) -> str:
        return f"{self.ns}/map"


@dataclass
class RecordingSummary:
    path: Path | None
    output_bags: list[Path]
    sim_bags: list[Path]
    frames: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    size_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.frames} frames, {sum(self.counts.values())} rows in {self.seconds:.1f} s"
                 + (f", {self.size_bytes / 1e6:.1f} MB" if self.size_bytes else "")]
        lines += [f"  {k:<32} {v}" for k, v in sorted(self.counts.items())]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def classify_bags(bags, topics: Topics | None = None) -> tuple[list[Path], list[Path]]:
    """(output bags, sim bags): a bag with the node's camera pose is an output bag, one with ground-truth poses or
    camera images a sim (input) bag; a bag can be both. Raises ValueError for a bag that is neither."""
    from ros2_stream4d.sim.bag import bag_topics

    topics = topics or Topics()
    outputs, sims = [], []
    for bag in bags:
        bag = Path(bag)
        have = bag_topics(bag)
        is_out = topics.pose in have
        is_sim = topics.gt_pose in have or topics.image in have or f"{topics.image}/compressed" in have
        if not (is_out or is_sim):
            raise ValueError(f"{bag}: neither a stream4d output bag ({topics.pose}) nor a camera/sim bag "
                             f"({topics.image}, {topics.gt_pose}); topics: {sorted(have)}")
        if is_out:
            outputs.append(bag)
        if is_sim:
            sims.append(bag)
    return outputs, sims


def new_recording(application_id: str = E.APPLICATION_ID, recording_id: str | None = None) -> rr.RecordingStream:
    """A recording stream of its own (never the global one) with only the stamp timeline."""
    rec = rr.RecordingStream(application_id, recording_id=recording_id)
    rec.set_log_time_enabled(False)
    rec.set_log_tick_enabled(False)
    return rec


def log_bags(rec: rr.RecordingStream, bags, options: ViewOptions | None = None, topics: Topics | None = None,
             mesh: str | Path | None = None, gt_scene: bool = False,
             mcap_topics: list[str] | None = None) -> RecordingSummary:
    """Log every entity of the given bags into `rec` (whatever its sinks). Returns what was logged.

    mcap_topics: regular expressions (RE2) of further topics to add as Rerun's own MCAP importer decodes them
    (e.g. "^/tf$", "^/diagnostics$"), from every MCAP bag given, under their topic names; they bring the importer's
    timelines (ros2_timestamp, shared with ours, and message_log_time / message_publish_time)."""
    from ros2_stream4d.sim.bag import bag_topics

    t0 = time.perf_counter()
    topics = topics or Topics()
    outputs, sims = classify_bags(bags, topics)
    summary = RecordingSummary(path=None, output_bags=outputs, sim_bags=sims)
    if len(outputs) > 1:
        summary.notes.append(f"{len(outputs)} output bags: only {outputs[0]} is shown")
    log = RunLogger(rec, options)
    log.setup(blueprint=False)  # the sink carries the blueprint (save / connect_grpc default_blueprint)
    pred_stamps, pred_T = np.zeros(0, np.int64), np.zeros((0, 4, 4))
    if outputs:
        pred_stamps, pred_T = _log_output_bag(log, outputs[0], topics, bag_topics(outputs[0]), summary)
    for sim in sims:  # also an output bag that recorded the camera too
        _log_sim_bag(log, sim, topics, pred_stamps, pred_T, gt_scene, summary)
    if mesh is not None:
        from ros2_stream4d.sim.scenes import load_mesh

        vertices, triangles = load_mesh(mesh)
        log.mesh(vertices, triangles, albedo=(200, 200, 200, 255))
    if mcap_topics:
        _import_mcap_topics(rec, [Path(b) for b in bags], mcap_topics, summary)
    summary.frames = int(len(pred_stamps))
    summary.counts = dict(log.counts)
    summary.seconds = time.perf_counter() - t0
    return summary


def _log_output_bag(log: RunLogger, bag: Path, topics: Topics, have: dict, summary: RecordingSummary):
    from ros2_stream4d.eval.bagio import pointcloud2_to_arrays
    from ros2_stream4d.sim.bag import image_to_numpy, iter_messages, pose_to_matrix, stamp_ns

    n_maps = have.get(topics.map, ("", 0))[1]
    keep_maps = spread_indices(n_maps, log.opt.map_updates)
    keep_maps = set(range(n_maps)) if keep_maps is None else set(keep_maps.tolist()) | {n_maps - 1}
    depths = [t for t in topics.depths if have.get(t, ("",))[0] == "sensor_msgs/msg/Image"]
    confidences = [t for t in topics.confidences if have.get(t, ("",))[0] == "sensor_msgs/msg/Image"][:1]
    want = [t for t in (topics.pose, topics.cloud, topics.map) if t in have] + depths + confidences
    n_poses = have.get(topics.pose, ("", 0))[1]
    path_every = max(1, -(-n_poses // max(1, log.opt.path_updates)))
    stride = max(1, log.opt.frame_stride)
    seen: dict[str, int] = {}  # per topic: messages so far (one per frame: the stride keeps the same frames)
    stamps, poses, map_frame, i_map = [], [], "", -1
    for topic, _, msg in iter_messages(bag, want):
        ns = stamp_ns(msg.header.stamp)
        i = seen[topic] = seen.get(topic, -1) + 1
        if topic == topics.pose:
            T = pose_to_matrix(getattr(msg.pose, "pose", msg.pose))
            map_frame = map_frame or msg.header.frame_id
            stamps.append(ns)
            poses.append(T)
            log.camera_pose(ns, T, log_path=(i + 1) % path_every == 0 or i == n_poses - 1)
        elif topic != topics.map and i % stride:
            continue  # a frame the stride leaves out
        elif topic in depths:
            log.depth(ns, image_to_numpy(msg))
        elif topic in confidences:
            log.confidence(ns, image_to_numpy(msg))
        elif topic == topics.cloud:
            c = pointcloud2_to_arrays(msg)
            in_camera = bool(map_frame) and msg.header.frame_id not in ("", map_frame)
            log.cloud(ns, c["xyz"], c.get("rgb"), in_camera=in_camera)
        elif topic == topics.map:
            i_map += 1
            if i_map in keep_maps:
                c = pointcloud2_to_arrays(msg)
                log.map(ns, c["xyz"], c.get("rgb"))
    if n_maps > len(keep_maps):
        summary.notes.append(f"{len(keep_maps)} of {n_maps} map messages logged (map_updates)")
    order = np.argsort(np.asarray(stamps, np.int64), kind="stable")
    return (np.asarray(stamps, np.int64)[order],
            np.stack(poses)[order] if poses else np.zeros((0, 4, 4)))


def _log_sim_bag(log: RunLogger, bag: Path, topics: Topics, pred_stamps, pred_T, gt_scene: bool,
                 summary: RecordingSummary) -> None:
    import cv2

    from ros2_stream4d.codec import image_to_rgb as rgb_from_image_msg
    from ros2_stream4d.sim.bag import bag_topics, iter_messages, pose_to_matrix, stamp_ns

    have = bag_topics(bag)
    compressed = f"{topics.image}/compressed"
    image_topic = topics.image if topics.image in have else compressed if compressed in have else None
    K, size = None, None
    if topics.camera_info in have:
        for _, _, info in iter_messages(bag, [topics.camera_info]):
            K, size = np.asarray(info.k, np.float64).reshape(3, 3), (int(info.width), int(info.height))
            break
    if image_topic is None:
        summary.notes.append(f"{bag}: no camera images ({topics.image})")
    else:
        for i, (_, _, msg) in enumerate(iter_messages(bag, [image_topic])):
            if i % max(1, log.opt.frame_stride):
                continue
            ns = stamp_ns(msg.header.stamp)
            if image_topic == compressed and "jpeg" in msg.format.lower() and size is not None \
                    and not log.opt.image_width:
                log.image(ns, K, jpeg=bytes(msg.data), size=size)  # already JPEG: kept as recorded
            elif image_topic == compressed:
                bgr = cv2.imdecode(np.asarray(msg.data, np.uint8), cv2.IMREAD_COLOR)
                log.image(ns, K, rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            else:
                log.image(ns, K, rgb=rgb_from_image_msg(msg))

    if topics.gt_pose not in have:
        return
    gt = {stamp_ns(m.header.stamp): pose_to_matrix(m.pose) for _, _, m in iter_messages(bag, [topics.gt_pose])}
    gt_stamps = np.array(sorted(gt), np.int64)
    gt_T = np.stack([gt[s] for s in gt_stamps])
    to_map = _ground_truth_to_map(pred_stamps, pred_T, gt_stamps, gt_T, summary)
    if to_map is None:
        return
    positions = to_map.apply_points(gt_T[:, :3, 3])
    path_every = max(1, -(-len(positions) // max(1, log.opt.path_updates)))
    for i, (s, p) in enumerate(zip(gt_stamps, positions)):
        log.ground_truth_pose(int(s), p, log_path=(i + 1) % path_every == 0 or i == len(positions) - 1)
    scene = bag / "scene.ply"
    if gt_scene and scene.exists():
        from ros2_stream4d.sim.scenes import load_mesh

        vertices, triangles = load_mesh(scene)
        log.mesh(to_map.apply_points(vertices), triangles, entity=E.GT_SCENE, albedo=(120, 200, 140, 255))


def _import_mcap_topics(rec: rr.RecordingStream, bags: list[Path], patterns: list[str],
                        summary: RecordingSummary) -> None:
    from rerun.chunk import McapReader

    files = [f for b in bags for f in (sorted(b.glob("*.mcap")) if b.is_dir() else [b] if b.suffix == ".mcap" else [])]
    if not files:
        summary.notes.append("--mcap-topics: no MCAP file among the bags (sqlite3 bags are not imported)")
    for f in files:
        rr.send_chunks(McapReader(f, include_topic_regex=list(patterns)).stream(), recording=rec)
        summary.notes.append(f"Rerun's MCAP importer added {', '.join(patterns)} from {f.name}")


def _ground_truth_to_map(pred_stamps, pred_T, gt_stamps, gt_T, summary: RecordingSummary):
    """The Sim(3) taking world (ground truth) coordinates into the prediction's map frame, from the poses both
    have (the inverse of what eval aligns); None without enough common stamps."""
    from ros2_stream4d.eval.evaluate import match_stamps
    from ros2_stream4d.eval.metrics import Sim3, align_trajectory

    pi, gi = match_stamps(pred_stamps, gt_stamps)
    if len(pi) < 2:
        summary.notes.append("ground truth not shown: fewer than 2 of its stamps match the output bag's poses")
        return None
    S = align_trajectory(pred_T[pi], gt_T[gi], "sim3")  # world = s R map + t
    inv = Sim3(1.0 / S.s, S.R.T, -(S.R.T @ S.t) / S.s)
    summary.notes.append(f"ground truth Sim(3)-aligned to the map on {len(pi)} poses (scale {S.s:.4f})")
    return inv


def save_recording(bags, path: str | Path, options: ViewOptions | None = None, topics: Topics | None = None,
                   mesh: str | Path | None = None, gt_scene: bool = False,
                   mcap_topics: list[str] | None = None) -> RecordingSummary:
    """Write the bags' recording to an .rrd file (replaced). Returns what was logged, with the file's size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    rec = new_recording()
    rec.save(path, default_blueprint=E.default_blueprint())
    try:
        summary = log_bags(rec, bags, options, topics, mesh=mesh, gt_scene=gt_scene, mcap_topics=mcap_topics)
    finally:
        rec.flush()
        rec.disconnect()
    summary.path = path
    summary.size_bytes = path.stat().st_size
    return summary


def write_demo_recording(out_dir: str | Path, name: str = "demo.rrd") -> Path:
    """The demo's recording: <out_dir>/output_bag + <out_dir>/input_bag -> <out_dir>/demo.rrd. Returns its path;
    `stream4d view <path> --serve` opens it in a browser, `rerun <path>` in a window."""
    out_dir = Path(out_dir)
    summary = save_recording([out_dir / "output_bag", out_dir / "input_bag"], out_dir / name)
    return summary.path
