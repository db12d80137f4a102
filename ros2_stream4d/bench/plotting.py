"""PNG plots of benchmark results (matplotlib, Agg backend; imported lazily by the CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rolling_median(x, k: int) -> np.ndarray:
    """Centred running median over 2k+1 samples (shorter at the ends)."""
    x = np.asarray(x, dtype=float)
    if k <= 0 or x.size == 0:
        return x
    return np.array([np.median(x[max(0, i - k) : i + k + 1]) for i in range(x.size)])


def _subtitle(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    la = env["load_at_start"]["loadavg_1m"]
    la_end = result.get("load_at_end", {}).get("loadavg_1m")
    dev = env.get("gpu") or env["cpu"]
    return (f"{cfg['preset']} ({cfg['parameters'] / 1e6:.1f}M params), {cfg['height']}x{cfg['width']}, "
            f"{cfg['dtype']}, {env['device']} [{dev}], torch {env['torch']}, {env['torch_threads']} threads, "
            f"load {la}->{la_end}")


def plot_stream(result: dict, path: str | Path) -> Path:
    """Time and memory against the frame index, one line per mode."""
    plt = _plt()
    frames = np.asarray(result["frame_index"])
    k = result["config"]["neighbourhood"]
    modes = result["modes"]
    iso = any(m.get("isolated", {}).get("ok") for m in modes)
    probe = next((m for m in modes if m["kind"] == "probe"), None)
    ncols = 2 + int(iso) + int(probe is not None)
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if probe is not None:
        ax_rel = axes[2]
        pt = np.asarray(probe["time_s"])
        for i, m in enumerate(modes):
            if m is probe:
                continue
            rel = np.asarray(m["time_s"]) / pt
            ax_rel.plot(frames, rolling_median(rel, k), "-", color=colours[i % len(colours)], label=m["name"])
        ax_rel.set_title("load-normalised: time / probe time of the same round")
        ax_rel.set_xlabel("frame index")
        ax_rel.set_ylabel("ratio (running median)")
        ax_rel.set_yscale("log")
    for i, m in enumerate(modes):
        c = colours[i % len(colours)]
        t = np.asarray(m["time_s"]) * 1e3
        axes[0].plot(frames, t, ".", color=c, alpha=0.18, ms=2)
        axes[0].plot(frames, rolling_median(t, k), "-", color=c, label=m["name"], lw=1.6)
        state = np.asarray(m["state_bytes"]) / 2**20
        axes[1].plot(frames, state, "-", color=c, label=m["name"], lw=1.6)
        if m["window"] is None and m["kind"] == "stream" and "cache_used_bytes" in m:
            axes[1].plot(frames, np.asarray(m["cache_used_bytes"]) / 2**20, ":", color=c, lw=1.2,
                         label=m["name"] + " (bytes of frames held)")
        if iso and m.get("isolated", {}).get("ok"):
            axes[-1].plot(frames, np.asarray(m["isolated"]["rss_bytes"]) / 2**20, "-", color=c, label=m["name"])
    axes[0].set_title(f"per-frame time (dots: raw; line: running median of {2 * k + 1})")
    axes[0].set_xlabel("frame index")
    axes[0].set_ylabel("ms per frame")
    axes[0].set_yscale("log")
    axes[1].set_title("state kept between frames (exact tensor storage)")
    axes[1].set_yscale("symlog", linthresh=0.1)
    axes[1].set_xlabel("frame index")
    axes[1].set_ylabel("MiB (K/V cache; recompute: input frame buffer)")
    if iso:
        axes[-1].set_title("process RSS, each mode alone in its own process")
        axes[-1].set_xlabel("frame index")
        axes[-1].set_ylabel("MiB resident")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("stream4d bench stream: " + _subtitle(result), fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_stages(result: dict, path: str | Path) -> Path:
    """Horizontal stacked bar per configuration: median ms per stage of one frame."""
    plt = _plt()
    configs = result["configs"]
    stages = []
    for c in configs:
        for s in c["stage_order"]:
            if s not in stages:
                stages.append(s)
    fig, axes = plt.subplots(len(configs), 1, figsize=(11, 1.2 + 1.6 * len(configs)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, c in zip(axes[:, 0], configs):
        left = 0.0
        med = c["median_ms"]
        for j, s in enumerate(stages):
            v = med.get(s)
            if not v or s not in c["stage_order"]:
                continue
            ax.barh([0], [v], left=left, color=cmap(j % 20), label=s)
            if v / max(1e-9, c["frame_total_ms"]) > 0.04:
                ax.text(left + v / 2, 0, f"{s}\n{v:.0f}", ha="center", va="center", fontsize=7)
            left += v
        ax.set_yticks([])
        ax.set_xlabel("ms per frame (median)")
        ax.set_title(f"{c['preset']} ({c['parameters'] / 1e6:.1f}M params), input {c['input_hw'][1]}x"
                     f"{c['input_hw'][0]} -> model {c['model_hw'][1]}x{c['model_hw'][0]}: "
                     f"{c['frame_total_ms']:.0f} ms/frame", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[1:, 0]:
        h, lab = ax.get_legend_handles_labels()
        seen.update(dict(zip(lab, h)))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=6, fontsize=7)
    env = result["environment"]
    fig.suptitle(f"stream4d bench stages: {env['device']} [{env.get('gpu') or env['cpu']}], torch {env['torch']}, "
                 f"{env['torch_threads']} threads, load {env['load_at_start']['loadavg_1m']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return _save(plt, fig, path)


def plot_roofline(result: dict, path: str | Path) -> Path:
    """FLOPs per frame (stacked by term) and the implied frame-rate limits against W."""
    plt = _plt()
    rows = result["by_window"]
    W = np.array([r["window"] for r in rows])
    terms = list(rows[0]["flops"].keys())
    terms = [t for t in terms if t != "total"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6))
    bottom = np.zeros(len(W))
    for t in terms:
        v = np.array([r["flops"][t] for r in rows]) / 1e12
        axes[0].fill_between(W, bottom, bottom + v, label=t, alpha=0.8, step=None)
        bottom += v
    axes[0].set_xlabel("window W (cached frames besides the anchors)")
    axes[0].set_ylabel("TFLOP per frame")
    axes[0].set_title(f"FLOPs per frame, full model, {result['width']}x{result['height']} (WxH)")
    axes[0].legend(fontsize=7)
    hw = result["hardware"]
    axes[1].plot(W, [r["fps_compute_bound"] for r in rows], label=f"compute bound ({hw['peak_bf16_dense_tflops']:.0f} "
                 "TFLOP/s)")
    axes[1].plot(W, [r["fps_memory_bound"] for r in rows], label=f"memory bound ({hw['hbm_tb_s']:.2f} TB/s)")
    axes[1].plot(W, [r["fps_roofline"] for r in rows], "k--", label="roofline (min)")
    axes[1].plot(W, [r["fps_at_assumed_mfu"] for r in rows], label=f"at {hw['assumed_mfu']:.0%} of peak compute")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("window W")
    axes[1].set_ylabel("frames per second (upper bound)")
    axes[1].set_title(f"frame-rate limit on {hw['name']}")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
