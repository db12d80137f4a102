"""Roofline of one streaming step: analytic FLOPs and bytes per frame, and the frame-rate limit they imply.

FLOPs count matrix multiplications and convolutions only (2 FLOPs per multiply-add), the same convention as
``torch.utils.flop_counter.FlopCounterMode`` (test/test_bench.py checks the two agree on a small configuration).
Norms, softmax, GELU, RoPE and interpolation are left out: they are memory-bound and small next to the matmuls.

One streaming step of frame t with ``K = min(t, anchors + W)`` frames held in the cache (the current one included),
``P = 1 + R + (H/p)(W/p)`` tokens per frame, width C, MLP ratio r:

- patch embed: the 14x14 conv, and for DINOv2 its ViT blocks over ``1 + R + n_patch`` tokens;
- frame attention (per block): linear layers (8 + 4r) P C^2 and attention 4 P^2 C;
- global attention (per block): the same linear layers and attention 4 P (K P) C: the only term that depends on W;
- camera head: 1 token per frame, ``iterations x trunk`` blocks of width 2C attending to K cached tokens;
- DPT heads (depth, point): 1x1 projections, resampling convs, RefineNet fusion and output convs at full resolution.

Bytes per frame (the memory side of the roofline): aggregator weights in bf16 (2 B/param), head weights in fp32,
and the K/V cache read by every global block: ``2 * depth * K * P * C`` values in bf16 (the cache dtype under CUDA
autocast). Activations are left out (a lower bound on traffic).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ros2_stream4d.model import ModelConfig

_DINO = {"dinov2_vitl14_reg": (1024, 24), "dinov2_vits14_reg": (384, 12), "dinov2_vitb14_reg": (768, 12),
         "dinov2_vitg14_reg": (1536, 40)}


@dataclass
class Hardware:
    """Peak figures assumed for the GPU (defaults: NVIDIA H100 SXM5 80 GB, dense, no sparsity)."""

    name: str = "H100 SXM5 (dense)"
    peak_bf16_dense_tflops: float = 989.0  # bf16 tensor cores, dense
    peak_tf32_dense_tflops: float = 494.0  # TF32 tensor cores (cuDNN convolutions of the fp32 heads by default)
    peak_fp32_tflops: float = 67.0  # plain fp32 (fp32 matmuls: torch leaves TF32 matmul off by default)
    hbm_tb_s: float = 3.35
    assumed_mfu: float = 0.4  # fraction of peak a good implementation reaches end to end


def tokens_per_frame(cfg: ModelConfig, height: int, width: int) -> int:
    return cfg.patch_start_idx + (height // cfg.patch_size) * (width // cfg.patch_size)


def _block_linear(n: int, c: int, r: float) -> float:
    hidden = int(c * r)
    return 2.0 * n * c * (3 * c) + 2.0 * n * c * c + 2.0 * n * c * hidden * 2


def _attn(n_q: int, n_kv: int, c: int) -> float:
    return 4.0 * n_q * n_kv * c


def _conv(out_h: int, out_w: int, c_in: int, c_out: int, k: int) -> float:
    return 2.0 * out_h * out_w * c_in * c_out * k * k


def dpt_flops(cfg: ModelConfig, height: int, width: int, output_dim: int) -> float:
    """One frame through one DPT head (matching heads/dpt_head.py)."""
    p = cfg.patch_size
    gh, gw = height // p, width // p
    c0, c1, c2, c3 = cfg.dpt_out_channels
    F = cfg.dpt_features
    dim_in = 2 * cfg.embed_dim
    f = sum(_conv(gh, gw, dim_in, oc, 1) for oc in (c0, c1, c2, c3))  # projects
    f += 2.0 * gh * gw * c0 * c0 * 16 + 2.0 * gh * gw * c1 * c1 * 4  # ConvTranspose 4x4/4 and 2x2/2
    h4, w4 = (gh - 1) // 2 + 1, (gw - 1) // 2 + 1
    f += _conv(h4, w4, c3, c3, 3)  # 3x3 stride-2 conv
    sizes = [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), (h4, w4)]
    f += sum(_conv(h, w, oc, F, 3) for (h, w), oc in zip(sizes, (c0, c1, c2, c3)))  # layer*_rn
    rcu = lambda h, w: 2 * _conv(h, w, F, F, 3)  # noqa: E731 - one residual conv unit
    (h1, w1), (h2, w2), (h3, w3) = sizes[:3]
    h0, w0 = 8 * gh, 8 * gw
    f += rcu(h4, w4) + _conv(h3, w3, F, F, 1)  # refinenet4 (no residual unit 1), up to level 3
    f += 2 * rcu(h3, w3) + _conv(h2, w2, F, F, 1)  # refinenet3
    f += 2 * rcu(h2, w2) + _conv(h1, w1, F, F, 1)  # refinenet2
    f += 2 * rcu(h1, w1) + _conv(h0, w0, F, F, 1)  # refinenet1 (x2 upsample)
    f += _conv(h0, w0, F, F // 2, 3)  # output_conv1
    f += _conv(gh * p, gw * p, F // 2, 32, 3) + _conv(gh * p, gw * p, 32, output_dim, 1)  # output_conv2
    return f


def flops_per_frame(cfg: ModelConfig, height: int, width: int, frames_held: int) -> dict[str, float]:
    """FLOPs of one streaming step with ``frames_held`` frames in the cache (current frame included)."""
    p, C, r = cfg.patch_size, cfg.embed_dim, cfg.mlp_ratio
    n_patch = (height // p) * (width // p)
    P = cfg.patch_start_idx + n_patch
    K = frames_held
    out: dict[str, float] = {}
    pe = 2.0 * n_patch * 3 * p * p * C
    if cfg.patch_embed in _DINO:
        c_pe, d_pe = _DINO[cfg.patch_embed]
        d_pe = cfg.patch_embed_depth if cfg.patch_embed_depth is not None else d_pe
        n_pe = 1 + 4 + n_patch
        pe_conv = 2.0 * n_patch * 3 * p * p * c_pe
        out["patch_embed"] = pe_conv + d_pe * (_block_linear(n_pe, c_pe, 4.0) + _attn(n_pe, n_pe, c_pe))
    else:
        out["patch_embed"] = pe
    out["frame_attention"] = cfg.depth * _attn(P, P, C)
    out["global_attention"] = cfg.depth * _attn(P, K * P, C)
    out["frame_mlp_linear"] = cfg.depth * _block_linear(P, C, r)
    out["global_mlp_linear"] = cfg.depth * _block_linear(P, C, r)
    if cfg.camera_head:
        D = 2 * C
        per_it = 2.0 * 9 * D + 2.0 * D * 3 * D  # embed_pose, adaLN modulation
        per_it += cfg.camera_trunk_depth * (_block_linear(1, D, r) + _attn(1, K, D))
        per_it += 2.0 * D * (D // 2) + 2.0 * (D // 2) * 9  # pose branch MLP
        out["camera_head"] = cfg.camera_num_iterations * per_it
    else:
        out["camera_head"] = 0.0
    out["depth_head"] = dpt_flops(cfg, height, width, 2) if cfg.depth_head else 0.0
    out["point_head"] = dpt_flops(cfg, height, width, 4) if cfg.point_head else 0.0
    out["total"] = sum(out.values())
    return out


def parameter_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, from a model built on the meta device (no memory, no init)."""
    import torch

    from ros2_stream4d.model import StreamVGGT

    with torch.device("meta"):
        m = StreamVGGT(ModelConfig.from_dict({**cfg.to_dict(), "track_head": False}))
    counts: dict[str, int] = {}
    for name, prm in m.named_parameters():
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + prm.numel()
    return counts


def bytes_per_frame(cfg: ModelConfig, height: int, width: int, frames_held: int, params: dict[str, int],
                    kv_bytes_per_value: int = 2) -> dict[str, float]:
    P = tokens_per_frame(cfg, height, width)
    agg = params.get("aggregator", 0)
    heads = sum(v for k, v in params.items() if k != "aggregator")
    kv_read = 2.0 * cfg.depth * frames_held * P * cfg.embed_dim * kv_bytes_per_value
    cam_kv = 2.0 * cfg.camera_num_iterations * cfg.camera_trunk_depth * frames_held * 2 * cfg.embed_dim * 4
    w = 2.0 * agg + 4.0 * heads
    return {"weights_bytes": w, "kv_cache_read_bytes": kv_read + cam_kv, "total_bytes": w + kv_read + cam_kv}


def roofline_row(cfg: ModelConfig, height: int, width: int, window: int, anchors: int, hw: Hardware,
                 params: dict[str, int]) -> dict[str, Any]:
    K = anchors + window
    fl = flops_per_frame(cfg, height, width, K)
    by = bytes_per_frame(cfg, height, width, K, params)
    bf16 = sum(fl[k] for k in ("patch_embed", "frame_attention", "global_attention", "frame_mlp_linear",
                               "global_mlp_linear"))
    # time at peak: bf16 aggregator on tensor cores, DPT convs TF32 (cuDNN default), camera head plain fp32
    t_compute = (bf16 / (hw.peak_bf16_dense_tflops * 1e12) + (fl["depth_head"] + fl["point_head"])
                 / (hw.peak_tf32_dense_tflops * 1e12) + fl["camera_head"] / (hw.peak_fp32_tflops * 1e12))
    t_mem = by["total_bytes"] / (hw.hbm_tb_s * 1e12)
    return {"window": window, "frames_held": K, "flops": fl, "bytes": by,
            "arithmetic_intensity_flop_per_byte": fl["total"] / by["total_bytes"],
            "t_compute_peak_s": t_compute, "t_memory_peak_s": t_mem,
            "fps_compute_bound": 1.0 / t_compute, "fps_memory_bound": 1.0 / t_mem,
            "fps_roofline": 1.0 / max(t_compute, t_mem),
            "fps_at_assumed_mfu": hw.assumed_mfu / max(t_compute, t_mem)}


def roofline_table(height: int = 392, width: int = 518, windows=(1, 2, 4, 8, 16, 32, 64, 128), anchors: int = 1,
                   hardware: Hardware | None = None, cfg: ModelConfig | None = None) -> dict[str, Any]:
    hw = hardware or Hardware()
    cfg = cfg or ModelConfig(track_head=False)
    params = parameter_bytes(cfg)
    rows = [roofline_row(cfg, height, width, int(w), anchors, hw, params) for w in windows]
    P = tokens_per_frame(cfg, height, width)
    # the W at which the global-attention term equals everything else
    r16 = next((r for r in rows if r["window"] == 16), rows[-1])
    rest = r16["flops"]["total"] - r16["flops"]["global_attention"]
    per_frame_held = cfg.depth * _attn(P, P, cfg.embed_dim)
    return {
        "schema": "stream4d.bench.roofline/1",
        "height": height, "width": width, "anchors": anchors, "tokens_per_frame": P,
        "model": "full StreamVGGT (ModelConfig defaults; track head excluded: it does not run when streaming)",
        "parameters": params, "parameters_total": int(sum(params.values())),
        "hardware": asdict(hw),
        "global_attention_flops_per_held_frame": per_frame_held,
        "kv_cache_bytes_per_frame_bf16": 2 * cfg.depth * P * cfg.embed_dim * 2,
        "kv_cache_bytes_per_frame_fp32": 2 * cfg.depth * P * cfg.embed_dim * 4,
        "window_where_global_attention_equals_rest": math.ceil(rest / per_frame_held) - anchors,
        "by_window": rows,
        "notes": [
            "FLOPs = 2 x multiply-adds of matmuls and convolutions (FlopCounterMode convention).",
            "Compute time at peak: aggregator on bf16 tensor cores, DPT convolutions in TF32 (cuDNN allows TF32 "
            "by default), camera head in plain fp32 (TF32 matmul is off by default in torch).",
            "Bytes: aggregator weights bf16, head weights fp32, K/V cache of the held frames (bf16) read once per "
            "frame; activations not included.",
        ],
    }


def _t(x: float) -> str:
    return f"{x / 1e12:.3f}"


def markdown_report(res: dict) -> str:
    hw = res["hardware"]
    lines = [
        f"Full model at {res['width']}x{res['height']} ({res['tokens_per_frame']} tokens per frame), "
        f"{res['parameters_total'] / 1e9:.3f} B parameters without the track head, anchors = {res['anchors']}. "
        f"Hardware assumed: {hw['name']}, {hw['peak_bf16_dense_tflops']:.0f} TFLOP/s bf16 dense, "
        f"{hw['peak_tf32_dense_tflops']:.0f} TF32, {hw['peak_fp32_tflops']:.0f} fp32, "
        f"{hw['hbm_tb_s']:.2f} TB/s HBM.",
        "",
        "| W | held frames | patch embed | frame attn | global attn | MLPs+proj (frame+global) | camera head | "
        "DPT heads | total TFLOP | KV read [GB] | weights [GB] | FPS compute-bound | FPS memory-bound | "
        f"FPS at {hw['assumed_mfu']:.0%} MFU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["by_window"]:
        f, b = r["flops"], r["bytes"]
        lines.append(
            f"| {r['window']} | {r['frames_held']} | {_t(f['patch_embed'])} | {_t(f['frame_attention'])} | "
            f"{_t(f['global_attention'])} | {_t(f['frame_mlp_linear'] + f['global_mlp_linear'])} | "
            f"{_t(f['camera_head'])} | {_t(f['depth_head'] + f['point_head'])} | {_t(f['total'])} | "
            f"{b['kv_cache_read_bytes'] / 1e9:.2f} | {b['weights_bytes'] / 1e9:.2f} | "
            f"{r['fps_compute_bound']:.0f} | {r['fps_memory_bound']:.0f} | {r['fps_at_assumed_mfu']:.0f} |")
    lines += ["", f"Global attention costs {res['global_attention_flops_per_held_frame'] / 1e12:.3f} TFLOP per "
              f"held frame; it equals all the other terms together at W = "
              f"{res['window_where_global_attention_equals_rest']}. K/V cache: "
              f"{res['kv_cache_bytes_per_frame_bf16'] / 2**20:.0f} MiB per frame in bf16 "
              f"({res['kv_cache_bytes_per_frame_fp32'] / 2**20:.0f} MiB in fp32)."]
    return "\n".join(lines)
