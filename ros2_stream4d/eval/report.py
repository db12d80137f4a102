"""Writing an evaluation (an ``EvalResult`` from evaluate.py): report.md, metrics.json and PNG plots.

    result = evaluate_bags("pred_bag", "gt_bag")    # or evaluate_arrays(...), eval/evaluate.py
    write_report(result, "report_dir")

Figures are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .evaluate import EvalResult
from .metrics import depth_frame_metrics

PLOTS = {
    "topview": "trajectory_topview.png",
    "errors": "trajectory_errors.png",
    "depth_examples": "depth_examples.png",
    "depth_over_time": "depth_metrics.png",
    "map": "map_errors.png",
    "grid": "occupancy.png",
}


def write_report(result: EvalResult, out_dir: str | Path, title: str = "stream4d evaluation") -> dict[str, Path]:
    """Write report.md, metrics.json and the PNG plots into out_dir; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"topview": _plot_topview(result, out / PLOTS["topview"]),
             "errors": _plot_errors(result, out / PLOTS["errors"])}
    if result.depth is not None:
        files["depth_examples"] = _plot_depth_examples(result, out / PLOTS["depth_examples"])
        files["depth_over_time"] = _plot_depth_over_time(result, out / PLOTS["depth_over_time"])
    if result.map is not None:
        files["map"] = _plot_map(result, out / PLOTS["map"])
    if result.grid is not None or result.mesh_world is not None:
        files["grid"] = _plot_grid(result, out / PLOTS["grid"])
    files["metrics"] = out / "metrics.json"
    files["metrics"].write_text(json.dumps(_jsonable(result.metrics), indent=1))
    files["report"] = out / "report.md"
    files["report"].write_text(_markdown(result, title, {k: v.name for k, v in files.items()}))
    return files


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def _markdown(r: EvalResult, title: str, names: dict) -> str:
    m = r.metrics
    lines = [f"# {title}", ""]
    if r.inputs:
        lines += [f"- prediction: `{r.inputs['pred']}`", f"- ground truth: `{r.inputs['gt']}`"]
        lines += [f"- matched poses: {m.get('matched_poses')} (prediction {m.get('pred_poses')}, ground truth "
                  f"{m.get('gt_frames')}), matched depth maps: {m.get('matched_depths')}", ""]
    lines += ["## Trajectory", "",
              f"Alignment: **{m['align']}** (scale {_fmt(m['scale'])}); ATE on camera positions after alignment, "
              f"RPE over {m['rpe_delta']} frame(s) with the prediction scaled by the alignment scale.", "",
              "| metric | value |", "|---|---|"]
    rows = [("ATE RMSE (m)", m["ate_rmse"]), ("ATE mean (m)", m["ate_mean"]), ("ATE median (m)", m["ate_median"]),
            ("ATE max (m)", m["ate_max"]), ("rotation error RMSE (deg)", m["ate_rot_rmse"]),
            ("RPE translation RMSE (m)", m["rpe_trans_rmse"]), ("RPE translation mean (m)", m["rpe_trans_mean"]),
            ("RPE rotation RMSE (deg)", m["rpe_rot_rmse"]), ("RPE rotation mean (deg)", m["rpe_rot_mean"]),
            ("alignment scale", m["scale"]), ("frames", m["frames"])]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    lines += ["", f"![top view]({names['topview']})", "", f"![errors over time]({names['errors']})", ""]
    if r.depth is not None:
        lines += ["## Depth", "", f"Per-frame scale alignment: **{m['depth_align']}**; means over "
                  f"{m['depth_frames']} frames.", "", "| metric | value |", "|---|---|",
                  f"| AbsRel | {_fmt(m['depth_abs_rel'])} |", f"| RMSE (m) | {_fmt(m['depth_rmse'])} |",
                  f"| delta < 1.25 | {_fmt(m['depth_delta1'])} |",
                  f"| median per-frame scale | {_fmt(m['depth_scale_median'])} |", "",
                  f"![depth examples]({names['depth_examples']})", "", f"![depth metrics]({names['depth_over_time']})",
                  ""]
    if r.map is not None:
        lines += ["## Map", "", f"Map points moved into the world with the trajectory alignment; threshold "
                  f"{_fmt(m['map_threshold'])} m; completeness against the {m['completeness_reference']} "
                  f"({m['surface_samples']} samples).", "", "| metric | value |", "|---|---|",
                  f"| points | {m['map_points']} |", f"| accuracy mean (m) | {_fmt(m['map_accuracy_mean'])} |",
                  f"| accuracy median (m) | {_fmt(m['map_accuracy_median'])} |",
                  f"| completeness mean (m) | {_fmt(m['map_completeness_mean'])} |",
                  f"| completeness median (m) | {_fmt(m['map_completeness_median'])} |",
                  f"| precision | {_fmt(m['map_precision'])} |", f"| recall | {_fmt(m['map_recall'])} |",
                  f"| F-score | {_fmt(m['map_fscore'])} |", "", f"![map errors]({names['map']})", ""]
    if r.mesh is not None:
        lines += ["## Mesh (TSDF)", "", f"Points sampled uniformly on the predicted mesh (accuracy) and the observed "
                  f"ground-truth surface (completeness, distance to the mesh's triangles); threshold "
                  f"{_fmt(m['mesh_threshold'])} m.", "", "| metric | value |", "|---|---|",
                  f"| vertices / triangles | {m['mesh_vertices']} / {m['mesh_triangles']} |",
                  f"| accuracy mean (m) | {_fmt(m['mesh_accuracy_mean'])} |",
                  f"| accuracy median (m) | {_fmt(m['mesh_accuracy_median'])} |",
                  f"| completeness median (m) | {_fmt(m['mesh_completeness_median'])} |",
                  f"| precision | {_fmt(m['mesh_precision'])} |", f"| recall | {_fmt(m['mesh_recall'])} |",
                  f"| F-score | {_fmt(m['mesh_fscore'])} |", ""]
    if r.grid is not None:
        lines += ["## Occupancy grid", "", "Reference: cells where the scene mesh has surface in the grid's height "
                  "band; counted over the cells where the ground-truth depth saw what the reference says (an obstacle "
                  "surface in the band, or free space / floor; eval/metrics.py occupancy_iou). Predicted unknown "
                  "cells count as misses for both classes.", "", "| metric | value |",
                  "|---|---|", f"| IoU (mean of occupied and free) | {_fmt(m['occupancy_iou'])} |",
                  f"| IoU occupied | {_fmt(m['occupancy_iou_occupied'])} |",
                  f"| IoU free | {_fmt(m['occupancy_iou_free'])} |",
                  f"| IoU strict (unseen obstacles over seen floor counted) | {_fmt(m['occupancy_iou_strict'])} |",
                  f"| observed cells | {m['occupancy_observed_cells']} |",
                  f"| known fraction of observed | {_fmt(m['occupancy_known'])} |", ""]
    if "grid" in names:
        lines += [f"![mesh and occupancy grid]({names['grid']})", ""]
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    lines += [f"Metrics as JSON: [{names['metrics']}]({names['metrics']})", ""]
    return "\n".join(lines)


def _figure(w=8.0, h=5.0, dpi=100):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=dpi, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    return path


def _plot_topview(r: EvalResult, path: Path) -> Path:
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    g, p = r.gt_T[:, :3, 3], r.pred_T_aligned[:, :3, 3]
    ax.plot(g[:, 0], g[:, 1], "-", color="k", lw=2, label="ground truth")
    ax.plot(p[:, 0], p[:, 1], "-", color="tab:red", lw=1.2, label=f"prediction ({r.metrics['align']} aligned)")
    ax.plot(g[0, 0], g[0, 1], "o", color="k", ms=7, label="start")
    for i in np.linspace(0, len(g) - 1, min(len(g), 25)).round().astype(int):
        ax.plot([g[i, 0], p[i, 0]], [g[i, 1], p[i, 1]], color="tab:orange", lw=0.7)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(f"Top view  ATE RMSE {r.metrics['ate_rmse']:.4f} m")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _plot_errors(r: EvalResult, path: Path) -> Path:
    fig = _figure(8.0, 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    t = r.times
    ax1.plot(t, r.ate["trans_errors"], color="tab:blue", label="ATE translation")
    if len(r.rpe["trans_errors"]):
        ax1.plot(t[r.rpe["rpe_delta"]:], r.rpe["trans_errors"], color="tab:green", lw=0.8, label="RPE translation")
    ax1.set_ylabel("error (m)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(t, r.ate["rot_errors_deg"], color="tab:blue", label="absolute rotation")
    if len(r.rpe["rot_errors_deg"]):
        ax2.plot(t[r.rpe["rpe_delta"]:], r.rpe["rot_errors_deg"], color="tab:green", lw=0.8, label="RPE rotation")
    ax2.set_ylabel("error (deg)")
    ax2.set_xlabel("time (s)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("Trajectory errors over time")
    return _save(fig, path)


def _plot_depth_examples(r: EvalResult, path: Path) -> Path:
    n = len(r.depth_examples)
    fig = _figure(11.0, 3.0 * n + 0.5)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, (t, g, p) in zip(axes, r.depth_examples):
        vmax = float(np.nanpercentile(g, 98)) if np.isfinite(g).any() else 1.0
        err = np.abs(p - g) / g
        m = depth_frame_metrics(p, g, align="none")
        for ax, img, name, cmap, lim in ((row[0], g, f"ground truth t={t:.1f}s", "viridis", (0, vmax)),
                                         (row[1], p, "prediction (scaled)", "viridis", (0, vmax)),
                                         (row[2], err, f"AbsRel error (mean {m['abs_rel']:.3f})", "magma", (0, 0.3))):
            im = ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Depth examples (metres; NaN = white)")
    return _save(fig, path)


def _plot_depth_over_time(r: EvalResult, path: Path) -> Path:
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    t, d = r.depth_times, r.depth
    ax.plot(t, d["per_frame_abs_rel"], color="tab:red", label="AbsRel")
    ax.plot(t, d["per_frame_delta1"], color="tab:blue", label="delta < 1.25")
    ax.set_xlabel("time (s)")
    top = float(np.nanmax(d["per_frame_abs_rel"])) if np.isfinite(d["per_frame_abs_rel"]).any() else 1.0
    ax.set_ylim(0, 1.05 * max(1.0, top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Depth metrics per frame")
    return _save(fig, path)


def _plot_grid(r: EvalResult, path: Path) -> Path:
    """Mesh top view (vertex colours), the predicted grid and the ground-truth grid side by side."""
    panels = (r.mesh_world is not None) + 2 * (r.grid is not None)
    fig = _figure(5.0 * panels, 4.8)
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if r.mesh_world is not None:
        ax = axes.pop(0)
        v, _, c = r.mesh_world
        sel = np.random.default_rng(0).choice(len(v), min(len(v), 60_000), replace=False) if len(v) else []
        ax.scatter(v[sel, 0], v[sel, 1], c=None if c is None else c[sel] / 255.0, s=0.3)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title("TSDF mesh vertices (top view, world)")
    if r.grid is not None:
        g = r.grid
        H, W = g["pred"].shape
        x0, y0 = g["origin"]
        ext = (x0, x0 + W * g["resolution"], y0, y0 + H * g["resolution"])
        ref = np.where(g["observed"], np.where(g["reference"], 100, 0), -1)
        for ax, img, title in ((axes[0], g["pred"], f"predicted grid (IoU {g['occupancy_iou']:.3f})"),
                               (axes[1], ref, "ground truth (observed area)")):
            shown = np.full(img.shape, 0.6)
            shown[img == 0], shown[img == 100] = 1.0, 0.0
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1, origin="lower", extent=ext, interpolation="nearest")
            ax.set_title(title + " in map", fontsize=9)
            ax.set_xlabel("x (m)")
    return _save(fig, path)


def _plot_map(r: EvalResult, path: Path) -> Path:
    fig = _figure(11.0, 4.5)
    ax1, ax2 = fig.subplots(1, 2)
    m, thr = r.map, r.metrics["map_threshold"]
    hi = max(3 * thr, float(np.percentile(np.r_[m["accuracy_errors"], m["completeness_errors"]], 99))
             if len(m["accuracy_errors"]) else 3 * thr)
    bins = np.linspace(0, hi, 60)
    ax1.hist(np.clip(m["accuracy_errors"], 0, hi), bins=bins, alpha=0.6, label="accuracy (map -> mesh)")
    ax1.hist(np.clip(m["completeness_errors"], 0, hi), bins=bins, alpha=0.6, label="completeness (surface -> map)")
    ax1.axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr} m")
    ax1.set_xlabel("distance (m)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title(f"F-score {m['map_fscore']:.3f}")
    pts = r.map_points_world
    if len(pts):
        sel = np.random.default_rng(0).choice(len(pts), min(len(pts), 50_000), replace=False)
        sc = ax2.scatter(pts[sel, 0], pts[sel, 1], c=np.clip(m["accuracy_errors"][sel], 0, 3 * thr), s=0.5,
                         cmap="turbo", vmin=0, vmax=3 * thr)
        fig.colorbar(sc, ax=ax2, label="distance to mesh (m)")
    g = r.gt_T[:, :3, 3]
    ax2.plot(g[:, 0], g[:, 1], "k-", lw=1)
    ax2.set_aspect("equal", adjustable="datalim")
    ax2.set_title("Map (top view), coloured by accuracy")
    ax2.set_xlabel("x (m)")
    ax2.set_ylabel("y (m)")
    return _save(fig, path)
