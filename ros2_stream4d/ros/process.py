"""`stream4d run` (the node, like `ros2 run`) and `stream4d process IN_BAG OUT_BAG` (offline: every frame through
the node's own per-frame code, no DDS, all outputs written as a rosbag2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ros2_stream4d.ros.params import BY_NAME, PARAMS


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="start stream4d_node (the `ros2 run ros2_stream4d stream4d_node` here)",
                                description="Start the node; extra arguments after -- go to ROS (--ros-args ...).")
    run.add_argument("--params-file", help="parameters YAML (default: the package's config/stream4d.yaml)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE", help="override a parameter")
    run.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                     help="remap a name, e.g. image:=/camera/color/image_raw")
    run.add_argument("--namespace", default="", help="the node's namespace (like __ns)")
    run.add_argument("--sim-time", action="store_true", help="use_sim_time:=true (follow /clock)")
    run.add_argument("ros_args", nargs=argparse.REMAINDER, help="more ROS arguments")
    run.set_defaults(func=_run)

    proc = subparsers.add_parser("process", help="run a rosbag2 through the mapping pipeline offline into a new bag",
                                 description="Read IN_BAG (mcap/sqlite3), process every image with the node's code, "
                                             "write every output topic (clouds, depth, TF, odometry, map) to OUT_BAG. "
                                             "Inputs are the node's relative names (image, camera_info, depth/image; "
                                             "camN/... for several cameras) resolved in --namespace and remapped "
                                             "with -r, exactly as the live node resolves them.")
    proc.add_argument("in_bag")
    proc.add_argument("out_bag")
    proc.add_argument("--params-file", help="parameters YAML (node section 'stream4d', '/**/stream4d' or '/**')")
    proc.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE", help="override a parameter")
    proc.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                      help="remap an input, e.g. image:=/camera/image_raw (default: the sim bag's /camera/* topics)")
    proc.add_argument("--namespace", default="/", help="the node's namespace (output topics move with it)")
    proc.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    proc.add_argument("--max-frames", type=int, default=0, help="stop after N images (0 = all)")
    proc.add_argument("--map-every", type=int, default=0, help="also write ~/map every N frames (0 = only at the end)")
    proc.add_argument("--save-map", help="also save the final map here (.ply or .pcd)")
    proc.add_argument("--overwrite", action="store_true", help="replace OUT_BAG if it exists")
    proc.add_argument("--quiet", action="store_true")
    proc.set_defaults(func=_process)


SIM_REMAPS = ("image:=/camera/image_raw", "camera_info:=/camera/camera_info", "depth/image:=/camera/depth")


def parse_remaps(items) -> dict[str, str]:
    out = {}
    for item in items:
        src, sep, dst = item.partition(":=")
        if not sep or not src or not dst:
            raise ValueError(f"remap {item!r} is not FROM:=TO")
        out[src] = dst
    return out


def _default_params_file() -> Path:
    return Path(__file__).resolve().parents[2] / "config" / "stream4d.yaml"


def _run(args: argparse.Namespace) -> int:
    from ros2_stream4d.ros.node import main

    argv = ["stream4d_node", "--ros-args", "--params-file", args.params_file or str(_default_params_file())]
    for p in args.param:
        argv += ["-p", p]
    for r in args.remap:
        argv += ["-r", r]
    if args.namespace:
        argv += ["-r", f"__ns:={args.namespace}"]
    if args.sim_time:
        argv += ["-p", "use_sim_time:=true"]
    extra = [a for a in args.ros_args if a != "--"]
    if extra:
        argv += extra if extra[0] != "--ros-args" else extra[1:]
    return main(argv)


def load_params(params_file: str | None, overrides: list[str], namespace: str = "/") -> dict:
    """Defaults, then the YAML file's sections that apply to the node (as rcl matches them: '/**',
    '/**/stream4d', '<namespace>/stream4d', 'stream4d'), then NAME:=VALUE overrides (YAML-typed)."""
    import yaml

    params = {p.name: p.default for p in PARAMS}
    if params_file:
        with open(params_file, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
        keys = ("/**", "/**/stream4d", f"{ns}/stream4d", "stream4d" if not ns else f"{ns.lstrip('/')}/stream4d")
        sections = [doc[k]["ros__parameters"] for k in keys if isinstance(doc.get(k), dict)
                    and "ros__parameters" in doc[k]]
        if not sections:
            raise ValueError(f"{params_file}: no section for the node ({', '.join(keys)}) with ros__parameters")
        for section in sections:
            params.update(section)
    for item in overrides:
        name, sep, value = item.partition(":=")
        if not sep:
            raise ValueError(f"parameter override {item!r} is not NAME:=VALUE")
        params[name] = yaml.safe_load(value)
    unknown = sorted(set(params) - set(BY_NAME) - {"use_sim_time"})
    if unknown:
        raise ValueError(f"unknown parameters: {unknown}")
    return params


def _process(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params_file, args.param, args.namespace)
        remaps = parse_remaps(list(SIM_REMAPS) + args.remap)
        stats = process_bag(args.in_bag, args.out_bag, params, remaps=remaps, namespace=args.namespace,
                            storage=args.storage, max_frames=args.max_frames,
                            map_every=args.map_every, save_map_path=args.save_map, overwrite=args.overwrite,
                            progress=not args.quiet)
    except (OSError, ValueError) as exc:  # ParameterError is a ValueError
        print(f"stream4d process: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"stream4d process: {stats['frames']} frames -> {args.out_bag} "
          f"({', '.join(f'{k}: {v}' for k, v in sorted(stats['written'].items()))})")
    print("stream4d process: mean time per frame [ms]: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in stats["mean_stage_s"].items()))
    return 0


class _Logger:
    def warning(self, msg: str) -> None:
        print(f"[stream4d process] {msg}", file=sys.stderr)

    info = error = warning


def process_bag(in_bag, out_bag, params: dict, remaps: dict[str, str] | None = None, namespace: str = "/",
                storage: str = "mcap", max_frames: int = 0, map_every: int = 0, save_map_path: str | None = None,
                overwrite: bool = False, progress: bool = True) -> dict:
    """Every image of in_bag through the node's FrameProcessor; outputs to out_bag under the node's resolved
    output names. Inputs: the node's relative names resolved in `namespace` and `remaps` (default: the sim bag's
    /camera/* topics). Returns counts and mean stage times."""
    import shutil
    import time

    from rclpy.serialization import deserialize_message, serialize_message
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore
    from tqdm import tqdm

    from ros2_stream4d import topics
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.ros import conversions as conv
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.config import as_dict, make_config
    from ros2_stream4d.ros.conversions import message_class
    from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings

    remaps = parse_remaps(SIM_REMAPS) if remaps is None else remaps
    cfg = make_config({**params, "oracle_bag": params.get("oracle_bag") or str(in_bag)})
    out_path = Path(out_bag)
    if out_path.exists():
        if not overwrite:
            raise FileExistsError(f"{out_path} exists (use --overwrite)")
        shutil.rmtree(out_path)
    logger = _Logger()
    n = cfg.num_cameras

    def resolved(key: str, cam: int) -> str:
        return topics.resolve(topics.camera_input(key, cam, n), namespace, remaps=remaps)

    image_topics = [resolved("image", c) + ("/compressed" if cfg.image_transport == "compressed" else "")
                    for c in range(n)]
    info_topics = [resolved("camera_info", c) for c in range(n)]
    depth_topic = (topics.resolve(topics.INPUTS["sensor_depth"][0], namespace, remaps=remaps)
                   if cfg.scale_source == "depth" else "")
    tf = TfBuffer(history=10**7)  # offline, the whole bag's TF is known before the first image (read below)
    pipeline = load_pipeline(ModelOptions.from_config(cfg), PipelineConfig.from_params(as_dict(cfg)))
    processor = FrameProcessor(cfg, pipeline, tf, RateLimitedWarnings(logger), logger, num_cameras=n)
    assembler = processor.assembler

    typestore = get_typestore(Stores.ROS2_KILTED)
    written: dict[str, int] = {}
    stage_totals: dict[str, float] = {}
    frames = 0
    latched = Qos(history=QosHistory.KEEP_LAST, depth=1, reliability=QosReliability.RELIABLE,
                  durability=QosDurability.TRANSIENT_LOCAL, deadline=QosTime(0, 0), lifespan=QosTime(0, 0),
                  liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=QosTime(0, 0),
                  avoid_ros_namespace_conventions=False)
    with Reader(in_bag) as reader, Writer(out_path, version=9, storage_plugin={
            "mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]) as writer:
        connections = {}

        def write(key: str, msg, stamp_ns: int) -> None:
            topic = topics.output_topic(key, namespace)
            if topic not in connections:
                kw = {"offered_qos_profiles": [latched]} if key in topics.LATCHED_OUTPUTS else {}
                connections[topic] = writer.add_connection(topic, topics.OUTPUTS[key][1], typestore=typestore, **kw)
            writer.write(connections[topic], stamp_ns, serialize_message(msg))
            written[topic] = written.get(topic, 0) + 1

        def write_map(stamp_ns: int) -> None:
            if pipeline.map_size():
                xyz, rgb, conf = pipeline.map_points()
                write("map", assembler.map_message(xyz, rgb, conf, conv.ns_to_time(stamp_ns)), stamp_ns)

        wanted = set(image_topics) | set(info_topics) | {"/tf", "/tf_static"} | ({depth_topic} - {""})
        conns = [c for c in reader.connections if c.topic in wanted]
        missing = [t for t in image_topics if t not in {c.topic for c in conns}]
        if missing:
            raise ValueError(f"{in_bag} has no image topic {missing} (topics: "
                             f"{sorted(c.topic for c in reader.connections)}); remap the input with -r image:=TOPIC")
        classes = {c.topic: message_class(c.msgtype) for c in conns}
        total = sum(c.msgcount for c in conns if c.topic in image_topics)
        if max_frames:
            total = min(total, max_frames)
        tf_conns = [c for c in conns if c.topic in ("/tf", "/tf_static")]
        for conn, _t, raw in reader.messages(connections=tf_conns):  # like a tf2 buffer holding the whole bag
            tf.set_transforms(deserialize_message(bytes(raw), classes[conn.topic]), static=conn.topic == "/tf_static")
        bar = tqdm(total=total, unit="frame", desc="stream4d process", disable=not progress)
        last_stamp = 0
        for conn, _t, raw in reader.messages(connections=[c for c in conns if c not in tf_conns]):
            msg = deserialize_message(bytes(raw), classes[conn.topic])
            if conn.topic in info_topics:
                processor.camera_info[info_topics.index(conn.topic)] = msg
            elif conn.topic == depth_topic:
                processor.set_sensor_depth(msg)
            elif conn.topic in image_topics:
                rgb = processor.decode(msg)
                if rgb is not None:
                    stamp = conv.time_to_ns(msg.header.stamp)
                    out = processor.process(image_topics.index(conn.topic), stamp, msg.header.frame_id, rgb)
                    for key, out_msg in out.messages:
                        write(key, out_msg, stamp)
                    for k, v in pipeline.timings.items():
                        stage_totals[k] = stage_totals.get(k, 0.0) + v
                    last_stamp = stamp
                frames += 1
                bar.update(1)
                if map_every and frames % map_every == 0:
                    write_map(last_stamp)
                if max_frames and frames >= max_frames:
                    break
        bar.close()
        if not pipeline.settle_backend(timeout=600.0):
            logger.warning("back-end still busy after 600 s: the map is saved with the corrections applied so far")
        t0 = time.perf_counter()
        write_map(last_stamp)
        stage_totals["map_message"] = time.perf_counter() - t0
    if save_map_path:
        pipeline.save_map(save_map_path)
    backend = pipeline.backend.diagnostics() if pipeline.backend is not None else {}
    pipeline.close()
    done = max(1, processor.frames_done)
    return {"frames": frames, "processed": processor.frames_done, "written": written,
            "mean_stage_s": {k: v / done for k, v in stage_totals.items() if k != "map_message"},
            "warnings": dict(processor.warnings.counts),
            "tf": processor.decision.edges(cfg) if processor.decision else [],
            "tf_conflict": processor.decision.conflict if processor.decision else "", "backend": backend}
