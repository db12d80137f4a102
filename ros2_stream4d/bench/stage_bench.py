"""Where the time goes per frame in the node: decode -> pipeline -> messages -> serialisation.

For each model configuration, a 640x480 ``sensor_msgs/Image`` (bgr8) goes through exactly what the node runs per
frame: ``conversions.to_rgb`` (decode), ``MappingPipeline.process`` (preprocess, model, postprocess, scale and
frames, cloud, map fusion; its own ``timings``), ``OutputAssembler.messages`` (publish-message building) and
``rclpy.serialization.serialize_message`` of every message (what a publisher does before handing bytes to DDS).
The model time is split from outside the model, without editing it: forward hooks on the patch embed, every frame
and global block and each head, and a timing wrapper around ``aggregator.step``. Publishing itself (DDS write) is
not measured.

Also measured: a standalone PointCloud2 of ``cloud_points`` points (xyz + rgb + confidence) built and serialised,
and the accumulated-map message (``VoxelMap.points()`` + PointCloud2 + serialisation) the node sends at 1 Hz.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .env import PRESETS, count_parameters, environment, load_sample, preset_config, sync

SCHEMA = "stream4d.bench.stages/1"
MODEL_PARTS = ("patch_embed", "frame_blocks", "global_blocks", "aggregator_other", "camera_head", "depth_head",
               "point_head", "model_other")
STAGES = ("decode", "gate", "preprocess", *MODEL_PARTS, "postprocess", "scale_and_frames", "cloud", "map_fusion",
          "messages_build", "serialize")


@dataclass
class StageBenchConfig:
    configs: tuple[str, ...] = ("small", "medium")
    frames: int = 5
    warmup: int = 1
    input_hw: tuple[int, int] = (480, 640)
    model_width: int = 518
    window: int = 16
    cloud_points: int = 300_000
    device: str = "cpu"
    threads: int = 0
    seed: int = 0


class ModelTimers:
    """Forward hooks (and an aggregator.step wrapper) that add up wall time per model part, per frame."""

    def __init__(self, model, device: torch.device):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self._handles = []
        agg = model.aggregator
        self._attach(agg.patch_embed, "patch_embed")
        for b in agg.frame_blocks:
            self._attach(b, "frame_blocks")
        for b in agg.global_blocks:
            self._attach(b, "global_blocks")
        for name in ("camera_head", "depth_head", "point_head"):
            head = getattr(model, name, None)
            if head is not None:
                self._attach(head, name)
        original = agg.step

        def timed_step(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            sync(self.device)
            self.acc["aggregator"] += time.perf_counter() - t0
            return out

        agg.step = timed_step  # instance attribute: the class (and other models) are untouched
        self._agg, self._orig_step = agg, original

    def _attach(self, module, name: str) -> None:
        def pre(mod, args):
            sync(self.device)
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            sync(self.device)
            self.acc[name] += time.perf_counter() - self._start.pop(id(mod))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def take(self) -> dict[str, float]:
        out = dict(self.acc)
        self.acc.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if "step" in self._agg.__dict__:
            del self._agg.step


def _node_params() -> dict[str, Any]:
    from ros2_stream4d.ros.params import PARAMS

    return {p.name: p.default for p in PARAMS}


def _synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth textured colour image (content does not change the model's cost)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 37.0 + k) * np.cos(y / 23.0 - k) for k in range(3)], axis=-1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _times_ms(fn, repeat: int) -> list[float]:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return ts


def _median_ms(fn, repeat: int) -> float:
    return statistics.median(_times_ms(fn, repeat))


def cloud_check(n: int, repeat: int = 10, seed: int = 0) -> dict[str, Any]:
    """A PointCloud2 of n points (xyz + rgb + confidence): build and serialise times (vectorised path)."""
    from rclpy.serialization import serialize_message

    from ros2_stream4d.ros import conversions as conv

    rng = np.random.default_rng(seed)
    xyz = rng.standard_normal((n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    cf = rng.random(n).astype(np.float32)
    msg = conv.numpy_to_pointcloud2(xyz, rgb, cf, frame_id="map")
    build = _times_ms(lambda: conv.numpy_to_pointcloud2(xyz, rgb, cf, frame_id="map"), repeat)
    ser = _times_ms(lambda: serialize_message(msg), repeat)
    return {"points": n, "bytes": len(msg.data), "repeat": repeat,
            "build_ms": statistics.median(build), "build_min_ms": min(build),
            "serialize_ms": statistics.median(ser), "serialize_min_ms": min(ser), "load": load_sample()}


def bench_config(preset: str, cfg: StageBenchConfig, log=print) -> dict[str, Any]:
    from rclpy.serialization import serialize_message

    from ros2_stream4d.mapping.pipeline import MappingPipeline, PipelineConfig
    from ros2_stream4d.model import StreamVGGT
    from ros2_stream4d.ros import conversions as conv
    from ros2_stream4d.ros.assembler import OutputAssembler
    from ros2_stream4d.ros.compat.tf_buffer import TfBuffer
    from ros2_stream4d.ros.config import make_config
    from ros2_stream4d.ros.tf_policy import decide

    device = torch.device(cfg.device)
    mcfg = preset_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = StreamVGGT(mcfg).to(device).eval()
    session = model.stream(window=cfg.window, anchors=1)
    params = _node_params()
    params.update(device=str(device), input_width=cfg.model_width)
    pcfg = PipelineConfig.from_params(params)
    pcfg.device, pcfg.input_width = str(device), cfg.model_width
    pipeline = MappingPipeline(pcfg, session)
    timers = ModelTimers(model, device)
    node_cfg = make_config({**params, "device": "cpu" if str(device) == "cpu" else "cuda"})
    tf = TfBuffer()
    assembler = OutputAssembler(node_cfg, tf)
    h, w = cfg.input_hw
    camera_frame = "camera_optical_frame"
    decision = decide(node_cfg, tf, camera_frame, False, set())
    images = [_synthetic_image(h, w, cfg.seed + i) for i in range(2)]
    per_frame: list[dict[str, float]] = []
    sizes: dict[str, int] = {}
    extra: dict[str, list[float]] = defaultdict(list)
    n_total = cfg.warmup + cfg.frames
    log(f"  {preset}: {count_parameters(model):,} parameters, {n_total} frames ({cfg.warmup} warm-up)")
    for i in range(n_total):
        bgr = images[i % 2][..., ::-1].copy()
        stamp_ns = 1_000_000_000 + i * 100_000_000
        msg = conv.numpy_to_image(bgr, "bgr8", stamp=conv.ns_to_time(stamp_ns), frame_id=camera_frame)
        timers.take()
        t0 = time.perf_counter()
        rgb = conv.to_rgb(msg, max_side=params["max_image_side"])
        t_dec = time.perf_counter()
        outcome = pipeline.process(rgb, stamp_ns)  # the gate is off: always Processed
        result = outcome.result
        t_pipe = time.perf_counter()
        msgs = assembler.messages(outcome, decision, camera_frame)
        t_msg = time.perf_counter()
        wire = [(k, serialize_message(m)) for k, m in msgs]
        t_ser = time.perf_counter()
        parts = timers.take()
        pt = pipeline.timings
        rec = {"decode": t_dec - t0, "preprocess": pt["preprocess"], "postprocess": pt["postprocess"],
               "scale_and_frames": pt["scale_and_frames"], "cloud": pt["cloud"], "map_fusion": pt["map_fusion"],
               "messages_build": t_msg - t_pipe, "serialize": t_ser - t_msg}
        named = sum(pt[k] for k in ("preprocess", "model", "postprocess", "scale_and_frames", "cloud", "map_fusion"))
        rec["gate"] = max(0.0, pt["pipeline_total"] - named)
        agg = parts.get("aggregator", 0.0)
        for k in ("patch_embed", "frame_blocks", "global_blocks", "camera_head", "depth_head", "point_head"):
            rec[k] = parts.get(k, 0.0)
        rec["aggregator_other"] = max(0.0, agg - rec["patch_embed"] - rec["frame_blocks"] - rec["global_blocks"])
        heads = rec["camera_head"] + rec["depth_head"] + rec["point_head"]
        rec["model_other"] = max(0.0, pt["model"] - agg - heads)
        rec["model_total"] = pt["model"]
        rec["frame_total"] = t_ser - t0
        if i >= cfg.warmup:
            per_frame.append(rec)
            # the two big messages again, alone (already inside messages_build)
            t = time.perf_counter()
            conv.numpy_to_pointcloud2(result.cloud_xyz, result.cloud_rgb, result.cloud_conf, frame_id="map")
            extra["cloud_msg_build"].append(time.perf_counter() - t)
            t = time.perf_counter()
            conv.numpy_to_image(result.depth, "32FC1", frame_id=camera_frame)
            extra["depth_msg_build"].append(time.perf_counter() - t)
        sizes = {k: len(b) for k, b in wire}
        sizes["cloud_points"] = int(result.cloud_xyz.shape[0])
    # the 1 Hz map message
    t = time.perf_counter()
    mx, mc, mf = pipeline.map_points()
    map_msg = conv.numpy_to_pointcloud2(mx, mc, mf, frame_id=params["map_frame"])
    t_build = time.perf_counter()
    serialize_message(map_msg)
    t_ser = time.perf_counter()
    timers.remove()
    stage_order = [s for s in STAGES if any(r.get(s, 0.0) > 0 for r in per_frame) or s in ("decode", "serialize")]
    med = {k: 1e3 * statistics.median(r[k] for r in per_frame) for k in per_frame[0]}
    result_cfg = {
        "preset": preset, "preset_description": PRESETS[preset][0], "parameters": count_parameters(model),
        "model_config": mcfg.to_dict(), "input_hw": [h, w], "model_hw": list(pipeline.reconstructor._model_hw),
        "window": cfg.window, "frames_timed": len(per_frame), "stage_order": stage_order,
        "median_ms": med, "frame_total_ms": med["frame_total"],
        "per_frame_s": per_frame,
        "message_bytes": sizes,
        "cloud_msg_build_ms": 1e3 * statistics.median(extra["cloud_msg_build"]),
        "depth_msg_build_ms": 1e3 * statistics.median(extra["depth_msg_build"]),
        "map_message": {"points": int(len(mx)), "points_and_build_ms": 1e3 * (t_build - t),
                        "serialize_ms": 1e3 * (t_ser - t_build)},
        "load_after": load_sample(),
    }
    del pipeline, session, model
    return result_cfg


def run_stage_bench(cfg: StageBenchConfig, out: str | Path | None = None, log=print) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    env = environment(device)
    log(f"stage bench: configs {list(cfg.configs)}, input {cfg.input_hw[1]}x{cfg.input_hw[0]}, device {device}, "
        f"torch threads {torch.get_num_threads()}, load {env['load_at_start']['loadavg_1m']}")
    if device.type == "cpu":
        log("CPU run: fp32 everywhere")
    res: dict[str, Any] = {"schema": SCHEMA, "environment": env, "config": asdict(cfg),
                           "cloud_check": cloud_check(cfg.cloud_points), "configs": []}
    for preset in cfg.configs:
        res["configs"].append(bench_config(preset, cfg, log))
    res["load_at_end"] = load_sample()
    res["notes"] = [
        "Times are medians over the timed frames; model parts come from forward hooks (sum of all blocks of a "
        "kind), aggregator_other = aggregator.step minus its hooked parts (token set-up, concatenations), "
        "model_other = session.step minus aggregator and heads (cache bookkeeping, output slicing).",
        "gate = pipeline_total minus its named stages (keyframe gate check; off by default).",
        "serialize = rclpy.serialization.serialize_message of every message of the frame; the DDS write is not "
        "measured.",
    ]
    if out is not None:
        from .stream_bench import write_json

        write_json(res, out)
    return res


def markdown_table(res: dict[str, Any]) -> str:
    cfgs = res["configs"]
    head = "| stage | " + " | ".join(f"{c['preset']} [ms]" for c in cfgs) + " |"
    rows = [head, "|---|" + "---:|" * len(cfgs)]
    stages = [s for s in STAGES if any(s in c["stage_order"] for c in cfgs)]
    for s in stages:
        rows.append(f"| {s} | " + " | ".join(f"{c['median_ms'].get(s, 0.0):.1f}" for c in cfgs) + " |")
    rows.append("| **frame total** | " + " | ".join(f"**{c['frame_total_ms']:.0f}**" for c in cfgs) + " |")
    rows.append("| (model, all parts) | " + " | ".join(f"{c['median_ms']['model_total']:.0f}" for c in cfgs) + " |")
    rows.append("| (cloud PointCloud2 alone, points) | " + " | ".join(
        f"{c['cloud_msg_build_ms']:.1f} ({c['message_bytes'].get('cloud_points', 0):,})" for c in cfgs) + " |")
    rows.append("| (depth Image alone) | " + " | ".join(f"{c['depth_msg_build_ms']:.2f}" for c in cfgs) + " |")
    rows.append("| (1 Hz map message: points + build / serialise, points) | " + " | ".join(
        f"{c['map_message']['points_and_build_ms']:.1f} / {c['map_message']['serialize_ms']:.1f} "
        f"({c['map_message']['points']:,})" for c in cfgs) + " |")
    return "\n".join(rows)
