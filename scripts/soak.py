#!/usr/bin/env python3
"""Soak run: thousands of frames through stream4d_node's per-frame code; resident memory, per-frame time, map size,
threads and open file descriptors sampled at intervals. Prints a summary and writes JSON + a PNG plot.

Two routes:
  inprocess  what the node's worker thread runs for every frame, without DDS: Image message -> FrameProcessor.decode
             -> FrameProcessor.process (pipeline step, cloud, map fusion, output messages) -> serialize every output
             message (the publish cost short of the wire); the map and path messages every `--map-every` frames as the
             node's map timer does. Memory, threads and fds are this process's own.
  dds        the node as its own process (python -m ros2_stream4d.ros.node), fed over real DDS on loopback, one
             frame at a time (publish, wait for its pose: a closed loop, no queue can grow); RSS/threads/fds are the
             node process's (/proc/<pid>/...), per-frame time is the round trip publish -> ~/camera_pose.

    . .venv/bin/activate && . scripts/ros_env.sh
    python scripts/soak.py --route inprocess --frames 5000 --input-width 56 --window 8     # ~5 min on one core
    python scripts/soak.py --route dds --frames 500 --input-width 56 --window 8
    python scripts/soak.py --model oracle --frames 5000 --image-width 160 --image-height 120 --input-width 112 \
        --torch-threads 1 --name _products

--model oracle (in-process route): the random model's map barely grows, so this replays a sim bag of a ground robot
driving loops (--scene room, rendered once under /tmp, or --bag) with the oracle model in the demo's robot set-up
(base_link, wheel odometry on /tf): the keyframe map grows and spills keyframes to disk, the TSDF and the occupancy
grid are integrated, and ~/map, ~/path, ~/mesh and ~/occupancy are built and serialised as the node's timers do
(node.py _publish_*: pipeline.map_points/mesh/occupancy, then the assembler's messages), at their publish rates in
the bag's time. Samples add keyframes (in memory / spilled, disk), TSDF blocks, grid cells and the timers' times.
Output: docs/soak/soak_<route><name>.json and .png (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ probes

def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (RssAnon / RssFile: its anonymous and file-backed parts) in KiB, thread and fd counts of a
    process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(rest.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def malloc_stats() -> dict[str, float]:
    """glibc's heap (mallinfo2), MiB: in use by live allocations (heap + mmapped chunks) and free but kept by the
    allocator (RSS that no live object holds: fragmentation, not a leak). Empty where mallinfo2 is missing."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"malloc_in_use_mib": round((m.uordblks + m.hblkhd) / 2**20, 1),
            "malloc_free_held_mib": round(m.fordblks / 2**20, 1)}


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg()}


def frame_image(i: int, w: int, h: int, stamp_ns: int):
    """A textured image that moves a little every frame (so no gate or duplicate check could skip it)."""
    from ros2_stream4d.ros.conversions import ns_to_time, numpy_to_image

    yy, xx = np.mgrid[0:h, 0:w]
    shift = i % 97
    rgb = np.stack([((xx + shift) * 5) % 256, ((yy + 2 * shift) * 3) % 256, ((xx * yy + shift) // 7) % 256],
                   axis=-1).astype(np.uint8)
    return numpy_to_image(rgb, "rgb8", stamp=ns_to_time(stamp_ns), frame_id="camera_optical_frame")


def node_params(args) -> dict:
    from ros2_stream4d.ros.params import PARAMS

    p = {q.name: q.default for q in PARAMS}
    p.update({"model": "random-small", "device": "cpu", "input_width": args.input_width, "window": args.window,
              "process_every_frame": True, "map_max_points": args.map_max_points,
              "map_voxel_size": args.voxel})
    p.update(_overrides(args, p))
    return p


def _overrides(args, defaults: dict) -> dict:
    """--set name=value pairs, parsed to the parameter's type."""
    out = {}
    for item in args.set:
        name, _, text = item.partition("=")
        if name not in defaults:
            raise SystemExit(f"--set {item}: unknown parameter {name!r}")
        default = defaults[name]
        if isinstance(default, bool):
            out[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[name] = type(default)(text)
        else:
            out[name] = text
    return out


class _Logger:
    def __init__(self):
        self.lines: list[str] = []

    def _log(self, level, msg):
        self.lines.append(f"[{level}] {msg}")
        if len(self.lines) > 1000:
            del self.lines[:500]

    def info(self, msg):
        self._log("info", msg)

    def warning(self, msg):
        self._log("warn", msg)

    def error(self, msg):
        self._log("error", msg)


# ------------------------------------------------------------------------------------------------ routes

def run_inprocess(args) -> dict:
    from rclpy.serialization import serialize_message

    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.ros import conversions as conv
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.config import as_dict, make_config
    from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings

    params = node_params(args)
    cfg = make_config(params)
    pipeline = load_pipeline(ModelOptions.from_config(cfg), PipelineConfig.from_params(as_dict(cfg)))
    logger = _Logger()
    processor = FrameProcessor(cfg, pipeline, TfBuffer(), RateLimitedWarnings(logger), logger)
    samples, times, cpu_times, published = [], [], [], 0
    t_start = time.perf_counter()
    for i in range(args.frames):
        stamp = 1_000_000_000 + i * 33_333_333
        msg = frame_image(i, args.image_width, args.image_height, stamp)
        t0, c0 = time.perf_counter(), time.thread_time()
        rgb = processor.decode(msg)
        if rgb is None:
            raise RuntimeError(f"frame {i} refused: {logger.lines[-3:]}")
        out = processor.process(0, stamp, msg.header.frame_id, rgb)
        timer_tick = args.map_every and (i + 1) % args.map_every == 0  # the node's 1 Hz timers, at ~30 frames/s
        for key, m in out.messages:
            if key == "path" and params["path_publish_rate"] > 0 and not timer_tick:
                continue  # the node publishes the path from a timer (path_publish_rate), not with every frame
            serialize_message(m)
            published += 1
        if timer_tick and pipeline.map_size():
            xyz, col, conf = pipeline.map_points()
            serialize_message(conv.numpy_to_pointcloud2(xyz, col, conf, frame_id="map", stamp=msg.header.stamp))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)  # this thread's CPU time: robust to other processes' load
        if (i + 1) % args.sample_every == 0 or i == 0:
            samples.append(_sample(i + 1, times, proc_status(), pipeline.map_size(), t_start,
                                   cache=pipeline.stats().get("cache frames held"), cpu_times=cpu_times))
            _print_sample(samples[-1])
    return {"samples": samples, "frames_processed": processor.frames_done, "messages_serialized": published,
            "node_params": {k: v for k, v in params.items() if not isinstance(v, list)},
            "warnings": dict(processor.warnings.counts), "resets": processor.resets}


TIMER_PRODUCTS = ("map", "path", "mesh", "occupancy")  # the node's timers, in the order their rates are read


def oracle_bag(args) -> pathlib.Path:
    """The sim bag the oracle replays (written once, reused): a ground robot driving loops in the scene."""
    from ros2_stream4d.sim.bag import SimConfig, bag_topics, write_sim_bag

    path = pathlib.Path(args.bag or f"/tmp/stream4d_soak_{args.scene}_{args.frames}f_{args.image_width}x"
                                     f"{args.image_height}_s{args.seed}")
    if path.exists() and (path / "metadata.yaml").exists():
        n = bag_topics(path).get("/camera/image_raw", ("", 0))[1]
        if n < args.frames:
            raise SystemExit(f"--bag {path} has {n} images, fewer than --frames {args.frames}")
        return path
    print(f"[soak] rendering {args.frames} frames ({args.scene}, ground_robot, {args.image_width}x"
          f"{args.image_height}, seed {args.seed}) to {path}", flush=True)
    write_sim_bag(path, SimConfig(scene=args.scene, trajectory="ground_robot", frames=args.frames,
                                  width=args.image_width, height=args.image_height, seed=args.seed), progress=False)
    return path


def oracle_params(args, bag: pathlib.Path) -> dict:
    """The demo's robot set-up with the oracle (ros2_stream4d/demo.py), every map product on."""
    from ros2_stream4d.ros.params import PARAMS

    p = {q.name: q.default for q in PARAMS}
    p.update({"model": "oracle", "oracle_bag": str(bag), "scale_source": "fixed", "fixed_scale": 1.0,
              "base_frame": "base_link", "tf_timeout": 1.0, "conf_percentile": 30.0, "device": "cpu",
              "input_width": args.input_width, "window": args.window, "process_every_frame": True,
              "publish_map": True, "mesh_enabled": True, "occupancy_enabled": True})
    if args.map_max_points:
        p["map_max_points"] = args.map_max_points
    if args.voxel:
        p["map_voxel_size"] = args.voxel
    p.update(_overrides(args, p))
    return p


def _bag_frames(bag: pathlib.Path, frames: int):
    """(kind, message): ("tf"/"tf_static", TFMessage), ("info", CameraInfo), ("image", rclpy Image). Images are
    converted to rclpy messages here (what the node's subscription hands it) and handed out after the odometry of
    their instant: the sim bag writes /tf just after the image, and the node's worker waits for it (tf_timeout)."""
    from ros2_stream4d.codec import image_to_rgb
    from ros2_stream4d.ros.conversions import ns_to_time, numpy_to_image, time_to_ns
    from ros2_stream4d.sim.bag import iter_messages

    images, held = 0, []
    kinds = {"/tf": "tf", "/tf_static": "tf_static", "/camera/camera_info": "info", "/camera/image_raw": "image"}
    for topic, _, m in iter_messages(bag, list(kinds)):
        kind = kinds[topic]
        if kind == "image":
            yield from held  # no odometry came for the previous image: it goes without
            held = []
            if images == frames:
                return
            images += 1
            m = numpy_to_image(image_to_rgb(m), "rgb8", stamp=ns_to_time(time_to_ns(m.header.stamp)),
                               frame_id=m.header.frame_id)
        if kind in ("image", "info"):
            held.append((kind, m))
            continue
        yield kind, m
        if kind == "tf":
            yield from sorted(held, key=lambda km: km[0] != "info")  # CameraInfo first, as a driver sends it
            held = []
    yield from held


def run_oracle(args) -> dict:
    """The in-process route with the oracle model on a sim bag: the keyframe map grows, spills, and every map
    product is built and serialised at its publish rate (rates in the bag's time: the node's timers on a robot
    that streams at the bag's frame rate)."""
    from rclpy.serialization import serialize_message

    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.config import as_dict, make_config
    from ros2_stream4d.ros.conversions import ns_to_time, time_to_ns
    from ros2_stream4d.ros.frame_processor import FrameProcessor, RateLimitedWarnings

    bag = oracle_bag(args)
    params = oracle_params(args, bag)
    cfg = make_config(params)
    pipeline = load_pipeline(ModelOptions.from_config(cfg), PipelineConfig.from_params(as_dict(cfg)))
    logger = _Logger()
    tf = TfBuffer()
    processor = FrameProcessor(cfg, pipeline, tf, RateLimitedWarnings(logger), logger)
    assembler = processor.assembler
    periods = {k: (1e9 / params[f"{k}_publish_rate"] if params[f"{k}_publish_rate"] > 0 else None)
               for k in TIMER_PRODUCTS}
    due: dict[str, float] = {}
    path_dirty = False
    samples, times, cpu_times, proc_times, published = [], [], [], [], 0
    builds: dict[str, list[tuple[float, float, int]]] = {k: [] for k in TIMER_PRODUCTS}  # (build s, msg s, size)
    sizes: dict[str, int] = {}
    t_start = time.perf_counter()
    frame = 0

    def timer(key: str, stamp_ns: int) -> None:
        """What the node's timer callback for `key` does (node.py _publish_<key>), serialised instead of sent."""
        nonlocal path_dirty
        t0 = time.perf_counter()
        stamp = ns_to_time(stamp_ns)
        if key == "path":
            if not path_dirty:
                return
            path_dirty = False
            t1 = time.perf_counter()
            msgs = [assembler.path_snapshot()]
        elif pipeline.map_size() == 0:
            return
        elif key == "map":
            xyz, rgb, conf = pipeline.map_points()
            t1 = time.perf_counter()
            msgs = [assembler.map_message(xyz, rgb, conf, stamp)]
        elif key == "mesh":
            vertices, triangles, colours = pipeline.mesh()
            t1 = time.perf_counter()
            msgs = assembler.mesh_messages(vertices, triangles, colours, stamp) if len(triangles) else []
            sizes["mesh triangles"] = int(len(triangles))
        else:
            data, origin, resolution = pipeline.occupancy()
            t1 = time.perf_counter()
            msgs = [assembler.occupancy_message(data, origin, resolution, stamp)] if data.size else []
            sizes["grid cells"] = int(data.size)
        nbytes = sum(len(m) if isinstance(m, bytes) else len(serialize_message(m)) for m in msgs)  # mesh: bytes
        builds[key].append((t1 - t0, time.perf_counter() - t1, nbytes))

    for kind, msg in _bag_frames(bag, args.frames):
        if kind in ("tf", "tf_static"):
            tf.set_transforms(msg, static=kind == "tf_static")  # what the node's TF listener does
            continue
        if kind == "info":
            processor.camera_info[0] = msg
            continue
        stamp = time_to_ns(msg.header.stamp)
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        rgb = processor.decode(msg)
        if rgb is None:
            raise RuntimeError(f"frame {frame} refused: {logger.lines[-3:]}")
        out = processor.process(0, stamp, msg.header.frame_id, rgb)
        for key, m in out.messages:
            if key == "path" and params["path_publish_rate"] > 0:
                path_dirty = True  # the node sends the path from its timer
                continue
            serialize_message(m)
            published += 1
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        proc_times.append(time.process_time() - p0)
        for key in TIMER_PRODUCTS:  # the node's timers, in stream time
            if periods[key] is None:
                continue
            if key not in due:
                due[key] = stamp + periods[key]
            elif stamp >= due[key]:
                while stamp >= due[key]:
                    due[key] += periods[key]
                timer(key, stamp)
        frame += 1
        if frame % args.sample_every == 0 or frame == 1:
            st = pipeline.map.stats()
            s = _sample(frame, times, proc_status(), st["map points"], t_start,
                        cache=pipeline.stats().get("cache frames held"), cpu_times=cpu_times)
            s["frame_process_cpu_ms_mean"] = round(float(np.mean(proc_times[-100:])) * 1e3, 2)
            s.update({"keyframes": st["keyframes"], "keyframes_in_memory": st["keyframes in memory"],
                      "keyframes_spilled": st["keyframes"] - st["keyframes in memory"],
                      "keyframe_mib_in_memory": round(st["keyframe bytes in memory"] / 2**20, 2),
                      "map_frames": st["map frames"], "tsdf_blocks": st["tsdf blocks"],
                      "grid_cells": int(pipeline.map.grid.occ[0].size) if pipeline.map.grid is not None else 0,
                      "published_grid_cells": sizes.get("grid cells"), "mesh_triangles": sizes.get("mesh triangles"),
                      "spill_mib_on_disk": round(_dir_bytes(pipeline.map) / 2**20, 1),
                      "cloud_mib": round(sum(a.nbytes for a in vars(pipeline.map.cloud).values()
                                             if isinstance(a, np.ndarray)) / 2**20, 1),
                      "path_poses": len(assembler.path.poses), **malloc_stats()})
            for key in TIMER_PRODUCTS:
                recent = builds[key][-5:]
                if recent:
                    s[f"{key}_build_ms"] = round(float(np.mean([b for b, _, _ in recent])) * 1e3, 2)
                    s[f"{key}_msg_ms"] = round(float(np.mean([m for _, m, _ in recent])) * 1e3, 2)
                    s[f"{key}_msg_kib"] = round(recent[-1][2] / 1024, 1)
            samples.append(s)
            _print_sample(s)
            print(f"[soak]   keyframes {s['keyframes']} (in memory {s['keyframes_in_memory']}, spilled "
                  f"{s['keyframes_spilled']}), tsdf blocks {s['tsdf_blocks']}, grid cells {s['grid_cells']}, "
                  f"mesh {s.get('mesh_build_ms')} ms, grid {s.get('occupancy_build_ms')} ms", flush=True)
    if frame < args.frames:
        raise RuntimeError(f"the bag {bag} ran out after {frame} images")
    pipeline.map.close()
    return {"samples": samples, "frames_processed": processor.frames_done, "frames_gated": processor.frames_gated,
            "messages_serialized": published, "bag": str(bag),
            "timer_builds": {k: len(v) for k, v in builds.items()},
            "node_params": {k: v for k, v in params.items() if not isinstance(v, list)},
            "warnings": dict(processor.warnings.counts), "resets": processor.resets,
            "log": logger.lines[-20:]}


def _dir_bytes(kf_map) -> int:
    root = kf_map._spill_root
    if root is None or not root.exists():
        return 0
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file())


def run_dds(args) -> dict:
    sys.path.insert(0, str(ROOT / "test"))
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from ros_harness import (
        MessageCollector,
        RosProcess,
        configure_process_environment,
        python_command,
        wait_for_subscribers,
        wait_until,
    )
    from sensor_msgs.msg import Image

    from ros2_stream4d.ros.conversions import time_to_ns

    domain = configure_process_environment()
    node_params_used = None
    print(f"[soak] ROS_DOMAIN_ID={domain} (loopback only)")
    params = {"model": "random-small", "device": "cpu", "input_width": args.input_width, "window": args.window,
              "process_every_frame": "true", "input_qos": "reliable", "map_max_points": args.map_max_points,
              "map_voxel_size": args.voxel, "map_publish_rate": 1.0, "diagnostics_rate": 1.0}
    for item in args.set:
        name, _, text = item.partition("=")
        params[name] = text
    node_params_used = dict(params)
    ros_args = [a for k, v in params.items() for a in ("-p", f"{k}:={v}")]
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None  # the node's torch threads
    ros_args += ["-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"]
    node = RosProcess(python_command("-m", "ros2_stream4d.ros.node", "--ros-args", *ros_args), name="soak_node",
                      env=env)
    context = rclpy.Context()
    rclpy.init(context=context)
    me = rclpy.create_node("soak_feeder", context=context)
    samples, times = [], []
    try:
        node.wait_for_output("model ready", timeout=120)
        pose = MessageCollector(me, PoseStamped, "/stream4d/camera_pose")
        diag: dict[str, str] = {}

        def on_diag(msg):
            for status in msg.status:
                diag.update({kv.key: kv.value for kv in status.values})
        me.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
        pub = me.create_publisher(Image, "/camera/image_raw", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        wait_for_subscribers(me, pub, timeout=60)
        wait_until(lambda: pose.subscription.get_publisher_count() > 0, 60, me, "node's pose publisher")
        t_start = time.perf_counter()
        for i in range(args.frames):
            stamp = 1_000_000_000 + i * 33_333_333
            msg = frame_image(i, args.image_width, args.image_height, stamp)
            t0 = time.perf_counter()
            deadline = t0 + 120
            while True:  # resend until answered: the first frames can be lost while discovery completes
                pub.publish(msg)
                try:
                    wait_until(lambda s=stamp: pose.messages and time_to_ns(pose.messages[-1].header.stamp) == s,
                               5.0, me, f"pose of frame {i}")
                    break
                except TimeoutError:
                    if time.perf_counter() > deadline or node.poll() is not None:
                        raise
            times.append(time.perf_counter() - t0)
            pose.messages.clear()
            if (i + 1) % args.sample_every == 0 or i == 0:
                map_points = int(diag["map points"]) if "map points" in diag else None  # from /diagnostics (1 Hz)
                cache = int(diag["cache frames held"]) if diag.get("cache frames held", "").isdigit() else None
                samples.append(_sample(i + 1, times, proc_status(node.pid), map_points, t_start, cache=cache))
                _print_sample(samples[-1])
        alive = node.poll() is None
        final_diagnostics = dict(diag)
    finally:
        me.destroy_node()
        context.try_shutdown()
        rc = node.stop(timeout=60)
        log = node.output()
        node.close()
    warnings = [line for line in log.splitlines() if "WARN" in line or "ERROR" in line]
    return {"samples": samples, "node_alive_at_end": alive, "node_exit_code": rc, "node_warnings": warnings[-20:],
            "final_diagnostics": final_diagnostics, "node_params": node_params_used}


def _sample(frame: int, times: list[float], st: dict, map_points, t_start: float, cache=None,
            cpu_times=None) -> dict:
    recent = np.asarray(times[-100:]) * 1e3
    cpu = {"frame_cpu_ms_mean": round(float(np.mean(cpu_times[-100:])) * 1e3, 2)} if cpu_times else {}
    return {**cpu, "frame": frame, "elapsed_s": round(time.perf_counter() - t_start, 2),
            "rss_mib": round(st["VmRSS"] / 1024, 1), "rss_peak_mib": round(st["VmHWM"] / 1024, 1),
            **{f"rss_{k[3:].lower()}_mib": round(st[k] / 1024, 1) for k in ("RssAnon", "RssFile") if k in st},
            "threads": st["Threads"], "fds": st["fds"], "map_points": map_points, "cache_frames": cache,
            "frame_ms_mean": round(float(recent.mean()), 2), "frame_ms_p95": round(float(np.percentile(recent, 95)), 2),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def _print_sample(s: dict) -> None:
    cpu = f" cpu {s['frame_cpu_ms_mean']:.2f} ms" if "frame_cpu_ms_mean" in s else ""
    print(f"[soak] frame {s['frame']:5d}  rss {s['rss_mib']:7.1f} MiB  {s['frame_ms_mean']:7.2f} ms/frame{cpu} "
          f"(p95 {s['frame_ms_p95']:.2f})  map {s['map_points']}  threads {s['threads']}  fds {s['fds']}  "
          f"load {s['loadavg_1min']}", flush=True)


def summarize(samples: list[dict], warmup_frac: float = 0.1) -> dict:
    """Growth after the warm-up: first sample at or after warmup_frac of the run vs the last sample."""
    last = samples[-1]
    first = next(s for s in samples if s["frame"] >= warmup_frac * last["frame"])
    out = {"after_warmup_from_frame": first["frame"], "to_frame": last["frame"],
           "rss_mib": [first["rss_mib"], last["rss_mib"]], "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
           "threads": [first["threads"], last["threads"]], "fds": [first["fds"], last["fds"]],
           "frame_ms_mean": [first["frame_ms_mean"], last["frame_ms_mean"]],
           "max_map_points": max((s["map_points"] or 0) for s in samples)}
    n = len(samples)
    quarter = max(1, n // 4)
    out["frame_ms_first_quarter"] = round(float(np.mean([s["frame_ms_mean"] for s in samples[1:1 + quarter]] or [0])), 2)
    out["frame_ms_last_quarter"] = round(float(np.mean([s["frame_ms_mean"] for s in samples[-quarter:]])), 2)
    if "frame_cpu_ms_mean" in last:
        out["frame_cpu_ms_first_quarter"] = round(float(np.mean([s["frame_cpu_ms_mean"]
                                                                 for s in samples[1:1 + quarter]] or [0])), 2)
        out["frame_cpu_ms_last_quarter"] = round(float(np.mean([s["frame_cpu_ms_mean"] for s in samples[-quarter:]])), 2)
    out["loadavg_1min_range"] = [min(s["loadavg_1min"] for s in samples), max(s["loadavg_1min"] for s in samples)]
    if "keyframes" in last:
        out.update(_summarize_products(samples))
    return out


def _quarter(samples: list[dict], q: int) -> list[dict]:
    """Samples whose frame lies in quarter q (1..4) of the run."""
    n = samples[-1]["frame"]
    return [s for s in samples if (q - 1) * n / 4 < s["frame"] <= q * n / 4]


def _summarize_products(samples: list[dict]) -> dict:
    """The map products' run (--model oracle): memory and map sizes between the second and the last quarter (the
    first quarter is the first pass through the scene), per-frame and timer times per quarter."""
    q2, q4, last = _quarter(samples, 2), _quarter(samples, 4), samples[-1]
    half = q2[-1]

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(float(np.mean(vals)), 2) if vals else None

    out = {"rss_mib_second_quarter_mean": mean(q2, "rss_mib"), "rss_mib_last_quarter_mean": mean(q4, "rss_mib"),
           "rss_mib_second_quarter_max": max(r["rss_mib"] for r in q2),
           "rss_mib_last_quarter_max": max(r["rss_mib"] for r in q4)}
    out["rss_growth_q2_to_q4_mib"] = round(out["rss_mib_last_quarter_mean"] - out["rss_mib_second_quarter_mean"], 1)
    out["max_keyframes_in_memory"] = max(r["keyframes_in_memory"] for r in samples)
    out["max_keyframe_mib_in_memory"] = max(r["keyframe_mib_in_memory"] for r in samples)
    for key in ("keyframes", "keyframes_spilled", "map_frames", "tsdf_blocks", "grid_cells", "map_points",
                "mesh_triangles", "spill_mib_on_disk", "cloud_mib", "path_poses", "rss_anon_mib", "rss_file_mib",
                "malloc_in_use_mib",
                "malloc_free_held_mib"):
        out[f"{key}_half_end"] = [half.get(key), last.get(key)]
    for key in ("frame_ms_mean", "frame_cpu_ms_mean", "frame_process_cpu_ms_mean", "map_build_ms", "mesh_build_ms",
                "mesh_msg_ms", "occupancy_build_ms", "occupancy_msg_ms", "path_msg_ms"):
        out[f"{key}_quarters"] = [mean(_quarter(samples, q), key) for q in (1, 2, 3, 4)]
    return out


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    x = [v["frame"] for v in s]
    products = "keyframes" in s[-1]
    fig, axes = plt.subplots(3 if products else 2, 2, figsize=(11, 10.5 if products else 7), sharex=True)
    axes[0, 0].plot(x, [v["rss_mib"] for v in s])
    axes[0, 0].set_ylabel("resident memory [MiB]")
    axes[0, 1].plot(x, [v["frame_ms_mean"] for v in s], label="mean of last 100")
    axes[0, 1].plot(x, [v["frame_ms_p95"] for v in s], label="p95 of last 100", alpha=0.6)
    if "frame_cpu_ms_mean" in s[-1]:
        axes[0, 1].plot(x, [v["frame_cpu_ms_mean"] for v in s], label="CPU time of the thread, mean")
    axes[0, 1].set_ylabel("per-frame time [ms]")
    axes[0, 1].legend(loc="upper left", fontsize=8)
    load_ax = axes[0, 1].twinx()
    load_ax.plot(x, [v["loadavg_1min"] for v in s], color="grey", ls=":", label="machine load (1 min)")
    load_ax.set_ylabel("load average", color="grey")
    load_ax.legend(loc="upper right", fontsize=8)
    if any(v["map_points"] is not None for v in s):
        axes[1, 0].plot(x, [v["map_points"] or 0 for v in s])
        axes[1, 0].axhline(result["config"]["map_max_points"], color="r", ls="--", label="map_max_points")
        axes[1, 0].legend()
    axes[1, 0].set_ylabel("map points")
    axes[1, 1].plot(x, [v["threads"] for v in s], label="threads")
    axes[1, 1].plot(x, [v["fds"] for v in s], label="open fds")
    axes[1, 1].set_ylabel("count")
    axes[1, 1].legend()
    if products:
        _plot_products(axes, x, s)
    for ax in axes[-1]:
        ax.set_xlabel("frame")
    c = result["config"]
    extra = (" " + " ".join(c["set"])) if c.get("set") else ""
    model = c.get("model", "random-small")
    if model == "oracle":
        model = f"oracle on a {c['scene']} ground-robot bag {c['image_width']}x{c['image_height']}, all map products"
    fig.suptitle(f"stream4d soak ({result['route']}): {c['frames']} frames, {model}, input {c['input_width']} px, "
                 f"window {c['window']}{extra}; {result['machine']['cpu']} x{result['machine']['cores']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_products(axes, x, s) -> None:
    """Map sizes (1,0 and 2,0) and the timers' build times (2,1) of an oracle run."""
    ax = axes[1, 0]
    ax.cla()
    ax.plot(x, [v["map_points"] or 0 for v in s], label="cloud points")
    ax.plot(x, [v["tsdf_blocks"] for v in s], label="TSDF blocks")
    ax.plot(x, [v["grid_cells"] for v in s], label="grid cells")
    ax.set_ylabel("map size")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[2, 0]
    ax.plot(x, [v["keyframes"] for v in s], label="keyframes")
    ax.plot(x, [v["keyframes_in_memory"] for v in s], label="keyframes in memory")
    ax.plot(x, [v["keyframes_spilled"] for v in s], label="keyframes spilled to disk")
    ax.set_ylabel("keyframes")
    ax.legend(fontsize=8)
    ax = axes[2, 1]
    for key, label in (("mesh_build_ms", "mesh extraction"), ("mesh_msg_ms", "mesh message + serialise"),
                       ("occupancy_build_ms", "grid"), ("occupancy_msg_ms", "grid message + serialise"),
                       ("map_build_ms", "cloud"), ("map_msg_ms", "cloud message + serialise")):
        ax.plot(x, [v.get(key, np.nan) for v in s], label=label)
    ax.set_ylabel("timer product [ms] (mean of last 5)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if len(s) > 2:  # the first frame (model and raycaster warm-up) would squash the per-frame time axis
        top = max(max(v["frame_ms_p95"], v["frame_ms_mean"]) for v in s[1:])
        axes[0, 1].set_ylim(0, 1.1 * top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--route", choices=("inprocess", "dds"), default="inprocess")
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--input-width", type=int, default=56)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--image-width", type=int, default=112)
    ap.add_argument("--image-height", type=int, default=84)
    ap.add_argument("--model", choices=("random-small", "oracle"), default="random-small",
                    help="oracle: replay a sim bag of a ground robot (--scene) with the oracle model, every map "
                         "product on (keyframe map with spilling, TSDF mesh, occupancy grid); inprocess route only")
    ap.add_argument("--scene", default="room", help="oracle: sim scene of the bag (room, corridor, ...)")
    ap.add_argument("--seed", type=int, default=0, help="oracle: sim seed")
    ap.add_argument("--bag", default="", help="oracle: the sim bag (default: rendered once under /tmp and reused)")
    ap.add_argument("--map-max-points", type=int, default=None,
                    help="default 50000 with random-small, the node's default with the oracle")
    ap.add_argument("--voxel", type=float, default=None,
                    help="map_voxel_size; default 0.01 with random-small, the node's default with the oracle")
    ap.add_argument("--map-every", type=int, default=30,
                    help="inprocess: the node's 1 Hz timers (map, path) as every N frames: build+serialize them")
    ap.add_argument("--sample-every", type=int, default=100)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any other node parameter, e.g. --set publish_path=false")
    ap.add_argument("--name", default="", help="suffix of the output files (soak_<route><name>.json)")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "soak")
    args = ap.parse_args(argv)
    if args.model == "oracle" and args.route != "inprocess":
        ap.error("--model oracle runs on the inprocess route only")
    if args.model == "random-small":
        args.map_max_points = args.map_max_points or 50_000
        args.voxel = args.voxel or 0.01
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    info = machine()
    t0 = time.perf_counter()
    run = run_dds if args.route == "dds" else run_oracle if args.model == "oracle" else run_inprocess
    result = run(args)
    if args.model == "oracle":
        args.map_max_points, args.voxel = result["node_params"]["map_max_points"], result["node_params"]["map_voxel_size"]
    result.update({"route": args.route, "machine": {**info, "loadavg_end": os.getloadavg()},
                   "wall_s": round(time.perf_counter() - t0, 1),
                   "config": {k: v for k, v in vars(args).items() if k != "out"},
                   "summary": summarize(result["samples"]),
                   "command": "python scripts/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    result["config"]["out"] = str(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"soak_{args.route}{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, stem.with_suffix(".png"))
    print("[soak] summary:", json.dumps(result["summary"]))
    print(f"[soak] wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
