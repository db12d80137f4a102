"""Frames per second of the streaming model on CUDA: bf16 (aggregator autocast, fp32 heads), SDPA vs flash-attn.

Default: the full 1.2B configuration at 518x392 with a rolling window of W=16 (+1 anchor). The window is filled
first (untimed), then ``frames`` steps are timed with CUDA synchronisation around each. On a machine without CUDA it
returns ``{"skipped": "CPU run ..."}`` (``allow_cpu=True`` runs it anyway, fp32, for tests of this code path).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .env import count_parameters, environment, load_sample, preset_config, sync


def _flash_available() -> str | None:
    try:
        import flash_attn

        return getattr(flash_attn, "__version__", "present")
    except ImportError:
        return None


def run_gpu_fps(device: str = "cuda", preset: str = "full", hw: tuple[int, int] = (392, 518), window: int = 16,
                frames: int = 60, backends: tuple[str, ...] = ("sdpa", "flash"), anchors: int = 1,
                allow_cpu: bool = False, seed: int = 0) -> dict[str, Any]:
    dev = torch.device(device)
    if dev.type != "cuda" and not allow_cpu:
        return {"skipped": "CPU run: no CUDA device; bf16 SDPA / flash-attn FPS not measured",
                "environment": environment(dev)}
    env = environment(dev)
    cfg = preset_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        from ros2_stream4d.model import StreamVGGT

        model = StreamVGGT(cfg).to(dev).eval()
    h, w = hw
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(8, 1, 3, h, w, generator=g).to(dev)
    results: dict[str, Any] = {}
    for backend in backends:
        if backend == "flash" and (dev.type != "cuda" or _flash_available() is None):
            results[backend] = {"skipped": "flash-attn not installed" if dev.type == "cuda" else "needs CUDA"}
            continue
        model.set_attention_backend(backend)
        session = model.stream(window=window, anchors=anchors)
        try:
            for i in range(window + anchors + 3):  # fill the window (and warm the kernels), untimed
                session.step(images[i % 8])
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            t_all = time.perf_counter()
            for i in range(frames):
                sync(dev)
                t0 = time.perf_counter()
                session.step(images[i % 8])
                sync(dev)
                times.append(time.perf_counter() - t0)
            total = time.perf_counter() - t_all
            r = {"fps": frames / total, "median_ms": 1e3 * statistics.median(times),
                 "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))], "frames": frames,
                 "cache_bytes": session.cache.storage_nbytes()}
            if dev.type == "cuda":
                r["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            results[backend] = r
        except Exception as exc:  # report and continue with the next backend
            results[backend] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            session.reset()
    model.set_attention_backend("sdpa")
    return {
        "schema": "stream4d.bench.gpu_fps/1",
        "environment": env,
        "config": {"preset": preset, "parameters": count_parameters(model), "height": h, "width": w,
                   "window": window, "anchors": anchors,
                   "dtype": f"{cfg.cuda_autocast_dtype} autocast aggregator, fp32 heads" if dev.type == "cuda"
                   else "float32"},
        "results": results,
        "load_at_end": load_sample(),
    }
