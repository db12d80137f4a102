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
Output: docs/soak/soak_<route>.json and .png (override with --out).
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
    """VmRSS / VmHWM in KiB, thread and fd counts of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


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
    return out


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    x = [v["frame"] for v in s]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
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
    for ax in axes[1]:
        ax.set_xlabel("frame")
    c = result["config"]
    extra = (" " + " ".join(c["set"])) if c.get("set") else ""
    fig.suptitle(f"stream4d soak ({result['route']}): {c['frames']} frames, random-small, input {c['input_width']} px, "
                 f"window {c['window']}{extra}; {result['machine']['cpu']} x{result['machine']['cores']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--route", choices=("inprocess", "dds"), default="inprocess")
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--input-width", type=int, default=56)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--image-width", type=int, default=112)
    ap.add_argument("--image-height", type=int, default=84)
    ap.add_argument("--map-max-points", type=int, default=50_000)
    ap.add_argument("--voxel", type=float, default=0.01)
    ap.add_argument("--map-every", type=int, default=30,
                    help="inprocess: the node's 1 Hz timers (map, path) as every N frames: build+serialize them")
    ap.add_argument("--sample-every", type=int, default=100)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="any other node parameter, e.g. --set publish_path=false")
    ap.add_argument("--name", default="", help="suffix of the output files (soak_<route><name>.json)")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "soak")
    args = ap.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    info = machine()
    t0 = time.perf_counter()
    result = (run_inprocess if args.route == "inprocess" else run_dds)(args)
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
