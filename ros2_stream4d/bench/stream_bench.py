"""Per-frame latency and memory against the frame index: unlimited cache, rolling windows, recompute-from-scratch.

Modes, all stepped over the same frames in ONE process and interleaved frame by frame (the order rotates every
frame), so that load changes on a shared machine hit every mode alike:

- ``unlimited``: ``model.stream(window=None)``, the official StreamVGGT behaviour (the cache keeps every frame).
- ``rolling W=w``: ``model.stream(window=w, anchors=A)``: A anchor frames + the w most recent (current included).
- ``recompute W=w``: the offline way: every frame, a frame-causal forward of the aggregator over the last w frames
  from scratch, the camera head over those w frames, and the dense heads on the newest frame only (the cheapest
  honest offline variant: nothing is cached between frames).

Per frame and mode: wall time of the step, exact K/V cache storage bytes (``StreamCache.storage_nbytes()``, distinct
tensor storages), bytes of state held between frames (the cache, or the recompute mode's frame buffer), process RSS
and peak RSS, and on CUDA ``torch.cuda.max_memory_allocated`` of the step. RSS is per process, so in the interleaved
run it is shared by all modes; ``isolated_memory=True`` additionally steps each mode alone in a fresh child process
(same frames) to get per-mode RSS / peak RSS (its times are not interleaved and are recorded only for reference).
"""

from __future__ import annotations

import collections
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ros2_stream4d.model import ModelConfig, StreamVGGT

from .env import PRESETS, count_parameters, environment, load_sample, peak_rss_bytes, preset_config, rss_bytes, sync

SCHEMA = "stream4d.bench.stream/1"
SERIES = ("time_s", "cpu_s", "cache_bytes", "cache_used_bytes", "state_bytes", "rss_bytes", "peak_rss_bytes")


@dataclass
class StreamBenchConfig:
    preset: str = "small"
    frames: int = 300
    windows: tuple[int, ...] = (4, 8, 16)
    recompute_windows: tuple[int, ...] = (16,)
    unlimited: bool = True
    anchors: int = 1
    height: int | None = None  # None = the preset's default
    width: int | None = None
    device: str = "cpu"
    threads: int = 0  # 0 = torch default
    backend: str = "sdpa"
    seed: int = 0
    distinct_frames: int = 16  # random frames cycled through (content does not change the cost)
    warmup_frames: int = 2  # untimed steps of a throw-away session first (allocator, kernels)
    neighbourhood: int = 5  # de-noising: medians over frames [k, k + 2 * neighbourhood]
    isolated_memory: bool = False
    probe: bool = True  # time a constant-work step (frame 1 of a fresh stream) every round, as a load gauge
    label: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def hw(self) -> tuple[int, int]:
        h, w = PRESETS[self.preset][1] if self.preset in PRESETS else (56, 70)
        return (self.height or h, self.width or w)


@dataclass
class Mode:
    name: str
    kind: str  # "stream" | "recompute"
    window: int | None


def modes_of(cfg: StreamBenchConfig) -> list[Mode]:
    modes = [Mode("unlimited", "stream", None)] if cfg.unlimited else []
    modes += [Mode(f"rolling W={w}", "stream", int(w)) for w in cfg.windows]
    modes += [Mode(f"recompute W={w}", "recompute", int(w)) for w in cfg.recompute_windows]
    if not modes:
        raise ValueError("nothing to measure: no unlimited, rolling or recompute mode")
    if cfg.probe:
        modes.append(Mode(PROBE, "probe", None))
    return modes


PROBE = "probe (frame 1 of a fresh stream)"


class Probe:
    """Constant work every round: reset a stream and step its first frame. Its time tracks the machine's load at
    that moment, so mode time / probe time of the same round cancels most of the load drift over a long run."""

    def __init__(self, model: StreamVGGT):
        self.session = model.stream(window=1, anchors=1)
        self.cache = self.session.cache

    def step(self, image: torch.Tensor):
        self.session.reset()
        return self.session.step(image)


def build_model(cfg: StreamBenchConfig) -> tuple[StreamVGGT, ModelConfig]:
    mcfg = preset_config(cfg.preset)
    if cfg.model_overrides:
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), **cfg.model_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = StreamVGGT(mcfg)
    model = model.set_attention_backend(cfg.backend).to(cfg.device).eval()
    return model, mcfg


def make_frames(cfg: StreamBenchConfig) -> torch.Tensor:
    h, w = cfg.hw()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.rand(max(1, cfg.distinct_frames), 1, 3, h, w, generator=g)


class Recompute:
    """The offline baseline: recompute a causal forward over the last W frames from scratch every frame."""

    def __init__(self, model: StreamVGGT, window: int):
        self.model, self.window = model, window
        self.frames: collections.deque[torch.Tensor] = collections.deque(maxlen=window)

    def state_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.frames)

    @torch.inference_mode()
    def step(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        self.frames.append(image)
        images = torch.stack(list(self.frames), dim=1)  # [B, S, 3, H, W]
        dev = images.device
        with m._autocast(dev):
            tokens, psi = m.aggregator(images, causal=True, keep_layers=m._keep_layers())
        out: dict[str, torch.Tensor] = {}
        with m._no_autocast(dev):
            if m.camera_head is not None:
                dt = m._head_dtype(m.camera_head)
                pose = m.camera_head([tokens[-1].to(dt)], num_iterations=m.cfg.camera_num_iterations)
                out["pose_enc"] = pose[-1][:, -1]
            last = [t[:, -1:] if t is not None else None for t in tokens]
            img_last = images[:, -1:]
            for key, head in (("depth", m.depth_head), ("world_points", m.point_head)):
                if head is not None:
                    pred, conf = head(last, img_last.to(m._head_dtype(head)), psi)
                    out[key], out[key + "_conf"] = pred[:, 0], conf[:, 0]
        return out


def _step_record(runner, mode: Mode, image: torch.Tensor, device: torch.device) -> dict[str, float]:
    cuda = device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    runner.step(image)
    sync(device)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if mode.kind in ("stream", "probe"):
        cache = runner.cache.storage_nbytes()
        used = sum(c.used_bytes for c in runner.cache.all_caches())
        state = cache
    else:
        cache, used, state = 0, 0, runner.state_bytes()
    rec = {"time_s": dt, "cpu_s": cpu, "cache_bytes": cache, "cache_used_bytes": used, "state_bytes": state, "rss_bytes": rss_bytes(),
           "peak_rss_bytes": peak_rss_bytes()}
    if cuda:
        rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["cuda_step_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
        rec["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
    return rec


def _new_runner(model: StreamVGGT, mode: Mode, anchors: int):
    if mode.kind == "stream":
        return model.stream(window=mode.window, anchors=anchors)
    if mode.kind == "probe":
        return Probe(model)
    return Recompute(model, mode.window)


def _interleaved(model, modes: list[Mode], frames: torch.Tensor, cfg: StreamBenchConfig, device, progress=None):
    runners = [_new_runner(model, m, cfg.anchors) for m in modes]
    series = [{k: [] for k in SERIES} for _ in modes]
    loads = []
    n = len(modes)
    for i in range(cfg.frames):
        image = frames[i % frames.shape[0]].to(device)
        order = [(i + j) % n for j in range(n)]  # rotate who goes first: no mode always runs on a cold cache
        for j in order:
            rec = _step_record(runners[j], modes[j], image, device)
            for k, v in rec.items():
                series[j].setdefault(k, []).append(v)
        if i % 25 == 0 or i == cfg.frames - 1:
            loads.append({"frame": i + 1, **load_sample()})
        if progress:
            progress(i + 1, cfg.frames, {modes[j].name: series[j]["time_s"][-1] for j in range(n)})
    return series, loads


def _isolated_child(cfg_dict: dict, mode_dict: dict, queue) -> None:
    """Child process: step one mode alone over the same frames; send its memory (and time) series back."""
    try:
        cfg = StreamBenchConfig(**cfg_dict)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        mode = Mode(**mode_dict)
        model, _ = build_model(cfg)
        device = torch.device(cfg.device)
        frames = make_frames(cfg)
        baseline = rss_bytes()
        runner = _new_runner(model, mode, cfg.anchors)
        series: dict[str, list] = {k: [] for k in SERIES}
        for i in range(cfg.frames):
            rec = _step_record(runner, mode, frames[i % frames.shape[0]].to(device), device)
            for k, v in rec.items():
                series.setdefault(k, []).append(v)
        queue.put({"ok": True, "rss_after_model_build_bytes": baseline, **series})
    except Exception as exc:  # report, do not hang the parent
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _isolated(cfg: StreamBenchConfig, modes: list[Mode]) -> dict[str, dict]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for mode in modes:
        if mode.kind == "probe":
            continue
        q = ctx.Queue()
        p = ctx.Process(target=_isolated_child, args=(asdict(cfg), asdict(mode), q))
        p.start()
        res = q.get()
        p.join()
        out[mode.name] = res
    return out


def _median_range(xs: list[float], first: int, last: int) -> float | None:
    """Median of xs over 1-based frames [first, last] (clipped); None when empty."""
    lo, hi = max(1, first), min(len(xs), last)
    if hi < lo:
        return None
    return statistics.median(xs[lo - 1 : hi])


def _min_range(xs: list[float], first: int, last: int) -> float | None:
    lo, hi = max(1, first), min(len(xs), last)
    return min(xs[lo - 1 : hi]) if hi >= lo else None


def summarise(result: dict) -> dict:
    """Per-mode figures and the issue's done-when checks, from the recorded series."""
    cfg = result["config"]
    n_frames = cfg["frames"]
    k = cfg["neighbourhood"]
    anchors = cfg["anchors"]
    windows = [m["window"] for m in result["modes"] if m["kind"] == "stream" and m["window"] is not None]
    ref_w = max(windows) if windows else 16
    summary: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    end_lo = n_frames - 2 * k
    probe = next((m for m in result["modes"] if m["kind"] == "probe"), None)
    for m in result["modes"]:
        t = m["time_s"]
        name = m["name"]
        s: dict[str, Any] = {"kind": m["kind"], "window": m["window"],
                             "median_time_s": statistics.median(t) if t else None,
                             "first_frame_time_s": t[0] if t else None}
        # reference frame: W + anchors (the first frame with a full cache); unlimited/recompute: the largest W
        w = m["window"] if m["window"] is not None else ref_w
        ref = w + anchors if m["kind"] == "stream" else w
        s["ref_frame"] = ref
        s["time_ref_median_s"] = _median_range(t, ref, ref + 2 * k)
        s["time_end_median_s"] = _median_range(t, end_lo, n_frames)
        s["end_frames"] = [max(1, end_lo), n_frames]
        if s["time_ref_median_s"] and s["time_end_median_s"]:
            s["time_end_over_ref"] = s["time_end_median_s"] / s["time_ref_median_s"]
        # robust companions on a loaded machine: the lower envelope (min) of wall time, and process CPU time
        # (user + sys of all threads: time taken by other processes is not in it)
        s["time_ref_min_s"] = _min_range(t, ref, ref + 2 * k)
        s["time_end_min_s"] = _min_range(t, end_lo, n_frames)
        if s["time_ref_min_s"] and s["time_end_min_s"]:
            s["time_min_end_over_ref"] = s["time_end_min_s"] / s["time_ref_min_s"]
        if probe is not None and m is not probe:
            rel = [a / b for a, b in zip(t, probe["time_s"])]
            s["rel_ref_median"] = _median_range(rel, ref, ref + 2 * k)
            s["rel_end_median"] = _median_range(rel, end_lo, n_frames)
            if s["rel_ref_median"] and s["rel_end_median"]:
                s["rel_end_over_ref"] = s["rel_end_median"] / s["rel_ref_median"]
        cpu = m.get("cpu_s")
        if cpu:
            s["cpu_ref_median_s"] = _median_range(cpu, ref, ref + 2 * k)
            s["cpu_end_median_s"] = _median_range(cpu, end_lo, n_frames)
            if s["cpu_ref_median_s"] and s["cpu_end_median_s"]:
                s["cpu_end_over_ref"] = s["cpu_end_median_s"] / s["cpu_ref_median_s"]
        cb = m["cache_bytes"]
        s["cache_bytes_at_ref"] = cb[min(ref, len(cb)) - 1] if cb else None
        s["cache_bytes_at_end"] = cb[-1] if cb else None
        sb = m["state_bytes"]
        s["state_bytes_at_ref"] = sb[min(ref, len(sb)) - 1] if sb else None
        s["state_bytes_at_end"] = sb[-1] if sb else None
        s["cache_bytes_distinct_after_ref"] = len(set(cb[ref - 1 :])) if len(cb) >= ref else None
        rss = m.get("isolated", {}).get("rss_bytes") if m.get("isolated", {}).get("ok") else None
        if rss:
            s["isolated_rss_at_ref_bytes"] = rss[min(ref, len(rss)) - 1]
            s["isolated_rss_at_end_bytes"] = rss[-1]
            s["isolated_peak_rss_bytes"] = m["isolated"]["peak_rss_bytes"][-1]
        summary[name] = s
        enough = n_frames >= ref + 4 * k + 10  # a verdict needs frames well past the reference
        if m["kind"] == "stream" and m["window"] is not None:
            ratio = s.get("time_end_over_ref")
            flat_cache = s["cache_bytes_distinct_after_ref"] == 1
            c = {"time_end_over_ref": ratio, "time_within_15pct": None if ratio is None else abs(ratio - 1) <= 0.15,
                 "cache_bytes_constant_after_ref": flat_cache, "enough_frames": enough}
            for key in ("rel_end_over_ref", "cpu_end_over_ref", "time_min_end_over_ref"):
                if s.get(key) is not None:
                    c[key] = s[key]
                    c[key.replace("_end_over_ref", "") + "_within_15pct"] = abs(s[key] - 1) <= 0.15
            if rss:
                growth = s["isolated_rss_at_end_bytes"] - s["isolated_rss_at_ref_bytes"]
                c["isolated_rss_growth_bytes"] = growth
                c["isolated_rss_growth_frac"] = growth / s["isolated_rss_at_ref_bytes"]
            c["met"] = bool(enough and c["time_within_15pct"] and flat_cache)
            if "rel_within_15pct" in c:  # the same check on load-normalised time (mode time / probe time)
                c["met_load_normalised"] = bool(enough and c["rel_within_15pct"] and flat_cache)
            checks[name] = c
        elif m["kind"] == "stream":
            ratio = s.get("time_end_over_ref")
            grows_mem = bool(cb and cb[-1] > (s["cache_bytes_at_ref"] or 0))
            c = {"time_end_over_ref": ratio, "time_grows": None if ratio is None else ratio > 1.15,
                 "cache_bytes_grow": grows_mem, "enough_frames": enough}
            for key in ("rel_end_over_ref", "cpu_end_over_ref", "time_min_end_over_ref"):
                if s.get(key) is not None:
                    c[key] = s[key]
                    c[key.replace("_end_over_ref", "") + "_grows"] = s[key] > 1.15
            if rss:
                c["isolated_rss_growth_bytes"] = s["isolated_rss_at_end_bytes"] - s["isolated_rss_at_ref_bytes"]
            c["met"] = bool(enough and c["time_grows"] and grows_mem)
            if "rel_grows" in c:
                c["met_load_normalised"] = bool(enough and c["rel_grows"] and grows_mem)
            checks[name] = c
    return {"modes": summary, "done_when": checks}


def run_stream_bench(cfg: StreamBenchConfig, out: str | Path | None = None, progress=None, log=print) -> dict:
    """Run the benchmark; write JSON to ``out`` (a .json path) when given; return the result dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    h, w = cfg.hw()
    env = environment(device)
    model, mcfg = build_model(cfg)
    p = mcfg.patch_size
    if h % p or w % p:
        raise ValueError(f"--height/--width must be multiples of {p}, got {h}x{w}")
    tokens = mcfg.patch_start_idx + (h // p) * (w // p)
    modes = modes_of(cfg)
    frames = make_frames(cfg)
    log(f"stream bench: preset {cfg.preset} ({count_parameters(model):,} parameters), {h}x{w} ({tokens} tokens/frame),"
        f" {cfg.frames} frames, modes {[m.name for m in modes]}, device {device}, torch threads "
        f"{torch.get_num_threads()}, load {env['load_at_start']['loadavg_1m']}")
    if device.type == "cpu":
        log("CPU run: fp32 everywhere (bf16 autocast, SDPA vs flash-attn and the FPS figure need CUDA)")

    # warm-up on throw-away runners (first-call allocations, lazy imports)
    for m in modes:
        r = _new_runner(model, m, cfg.anchors)
        for i in range(cfg.warmup_frames):
            r.step(frames[i % frames.shape[0]].to(device))
        del r
    rss_after_warmup = rss_bytes()
    t_start = time.perf_counter()
    series, loads = _interleaved(model, modes, frames, cfg, device, progress)
    wall = time.perf_counter() - t_start

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "label": cfg.label,
        "environment": env,
        "config": {**asdict(cfg), "height": h, "width": w, "tokens_per_frame": tokens,
                   "preset_description": PRESETS.get(cfg.preset, ("", None))[0],
                   "model_config": mcfg.to_dict(), "parameters": count_parameters(model),
                   "dtype": "bfloat16 autocast (aggregator), fp32 heads" if device.type == "cuda"
                   and mcfg.cuda_autocast_dtype else "float32",
                   "aggregator_kv_bytes_per_frame": 2 * mcfg.depth * tokens * mcfg.embed_dim
                   * (2 if device.type == "cuda" and mcfg.cuda_autocast_dtype else 4)},
        "frame_index": list(range(1, cfg.frames + 1)),
        "modes": [{**asdict(m), **s} for m, s in zip(modes, series)],
        "load_during_run": loads,
        "load_at_end": load_sample(),
        "rss_after_warmup_bytes": rss_after_warmup,
        "wall_s": wall,
        "notes": [
            "Modes are interleaved frame by frame in one process (the order rotates every frame).",
            "rss_bytes / peak_rss_bytes of the interleaved run are per PROCESS (all modes together); per-mode RSS is "
            "under modes[*].isolated when isolated_memory ran.",
            "cache_bytes = exact tensor storage bytes of every K/V cache (aggregator global blocks + camera trunk); "
            "the unlimited cache grows its storage by 1.5x when full (steps), cache_used_bytes = bytes of the frames "
            "actually held (grows every frame).",
            "probe: a constant-work step (reset + first frame of a stream) timed every round; time/probe of the "
            "same round cancels most load drift between frame W+1 and frame 300 (rel_* in the summary).",
            "recompute mode: aggregator causal forward over the last W frames + camera head over them + dense heads "
            "on the newest frame, from scratch every frame; its state_bytes is the buffer of W input frames.",
        ],
    }
    if cfg.isolated_memory:
        if out is not None:  # keep the interleaved figures even if the (long) isolated runs are interrupted
            result["summary"] = summarise(result)
            write_json(result, out)
        log("isolated memory runs: each mode alone in a child process ...")
        iso = _isolated(cfg, modes)
        for m in result["modes"]:
            m["isolated"] = iso.get(m["name"], {})
    result["summary"] = summarise(result)
    if out is not None:
        write_json(result, out)
    return result


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(result), indent=1) + "\n")
    return path


def format_summary(result: dict) -> str:
    """Plain-text table of the summary (also used for the markdown in docs/benchmarks.md)."""
    return markdown_table(result)


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _ms(t) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}"


def markdown_table(result: dict) -> str:
    s = result["summary"]["modes"]
    k = result["config"]["neighbourhood"]
    iso = any("isolated_rss_at_end_bytes" in v for v in s.values())
    cpu = any("cpu_end_over_ref" in v for v in s.values())
    rel = any("rel_end_over_ref" in v for v in s.values())
    head = (f"| mode | ref frame r | time, median frames r..r+{2 * k} [ms] | time, median last {2 * k + 1} frames [ms] | end/ref | "
            "state at r [MiB] | state at end [MiB] |")
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    head += " min wall end/ref |"
    sep += "---:|"
    if rel:
        head += " time/probe end/ref |"
        sep += "---:|"
    if cpu:
        head += " CPU time r / end [ms] | CPU end/ref |"
        sep += "---:|---:|"
    if iso:
        head += " RSS alone at r / end [MiB] | peak RSS alone [MiB] |"
        sep += "---:|---:|"
    rows = [head, sep]
    for name, v in s.items():
        ratio = v.get("time_end_over_ref")
        row = (f"| {name} | {v['ref_frame']} | {_ms(v['time_ref_median_s'])} | {_ms(v['time_end_median_s'])} | "
               f"{'-' if ratio is None else f'{ratio:.2f}'} | {_mib(v['state_bytes_at_ref'])} | "
               f"{_mib(v['state_bytes_at_end'])} |")
        mr = v.get("time_min_end_over_ref")
        row += f" {'-' if mr is None else f'{mr:.2f}'} |"
        if rel:
            rr = v.get("rel_end_over_ref")
            row += f" {'-' if rr is None else f'{rr:.2f}'} |"
        if cpu:
            cr = v.get("cpu_end_over_ref")
            row += (f" {_ms(v.get('cpu_ref_median_s'))} / {_ms(v.get('cpu_end_median_s'))} | "
                    f"{'-' if cr is None else f'{cr:.2f}'} |")
        if iso:
            row += (f" {_mib(v.get('isolated_rss_at_ref_bytes'))} / {_mib(v.get('isolated_rss_at_end_bytes'))} | "
                    f"{_mib(v.get('isolated_peak_rss_bytes'))} |")
        rows.append(row)
    return "\n".join(rows)
