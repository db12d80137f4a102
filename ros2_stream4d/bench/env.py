"""What a benchmark figure was taken on: machine, torch, threads, load, memory readings, model presets.

Every results file records ``environment()`` at the start and ``load_sample()`` during the run, because the figures
of a shared machine mean little without the load they were taken under.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ros2_stream4d.model import ModelConfig

# The node's default model ("stream4d-tiny", trained by ros2_stream4d.train): kept in step with
# ros2_stream4d.train.trainer.TINY_MODEL, imported from there when that module is present.
_STREAM4D_TINY = dict(
    img_size=70, patch_size=14, embed_dim=128, depth=3, num_heads=4, num_register_tokens=4, patch_embed="conv",
    init_values=0.1, camera_num_heads=4, camera_trunk_depth=1, camera_num_iterations=2, dpt_layers=(0, 1, 2, 2),
    dpt_features=32, dpt_out_channels=(32, 48, 64, 64), track_head=False, point_head=False,
)


def _node_default_model() -> dict[str, Any]:
    try:
        from ros2_stream4d.train.trainer import TINY_MODEL

        return dict(TINY_MODEL)
    except Exception:  # the training module is optional for benchmarks
        return dict(_STREAM4D_TINY)


# name -> (description, default (height, width) for `bench stream`)
PRESETS: dict[str, tuple[str, tuple[int, int]]] = {
    "tiny": ("ModelConfig.small(): width 64, 2+2 blocks, conv patch embed (tests only)", (56, 70)),
    "small": ("the node's default model stream4d-tiny: width 128, 3+3 blocks, conv patch embed, camera + depth "
              "heads", (112, 154)),
    "medium": ("width 384, 12 frame + 12 global blocks, DINOv2 ViT-S/14 patch embed (12 blocks), official-width "
               "heads (DPT 256 features)", (112, 154)),
    "full": ("official StreamVGGT / VGGT-1B: width 1024, 24+24 blocks, DINOv2 ViT-L/14 patch embed, camera + depth "
             "+ point heads (track head not built: it never runs in streaming)", (294, 518)),
}


def preset_config(name: str) -> ModelConfig:
    """ModelConfig of a benchmark preset (random weights are used: time and memory do not depend on them)."""
    if name == "tiny":
        return ModelConfig.small()
    if name == "small":
        return ModelConfig.from_dict(_node_default_model())
    if name == "medium":
        return ModelConfig(embed_dim=384, depth=12, num_heads=6, patch_embed="dinov2_vits14_reg",
                           camera_num_heads=16, track_head=False)
    if name == "full":
        return ModelConfig(track_head=False)
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def load_sample() -> dict[str, Any]:
    """1/5/15-minute load averages and the time they were read."""
    la = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "loadavg_15m": round(la[2], 2)}


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    env: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
        "load_at_start": load_sample(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import flash_attn  # noqa: F401

            env["flash_attn"] = getattr(flash_attn, "__version__", "present")
        except ImportError:
            env["flash_attn"] = None
    return env


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
