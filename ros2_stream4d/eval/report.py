"""Evaluation runs: arrays or bags in, metrics + a markdown report with PNG plots + metrics.json out.

Python API (no bags needed):
    result = evaluate_arrays(pred_T, gt_T, pred_depths=..., gt_depths=..., map_points=..., mesh=(V, F))
    write_report(result, "report_dir")
Bags:
    result = evaluate_bags("pred_bag", "gt_bag"); write_report(result, "report_dir")

The trajectory alignment (Sim(3) by default) found for the camera positions also maps the predicted point map into
the ground-truth world before map metrics, since the map is expressed in the same frame as the predicted poses.
Figures are drawn with matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import (
    Sim3,
    ate,
    depth_frame_metrics,
    depth_metrics,
    map_metrics,
    mesh_metrics,
    occupancy_iou,
    reference_occupancy,
    rpe,
    voxel_downsample,
)

PLOTS = {
    "topview": "trajectory_topview.png",
    "errors": "trajectory_errors.png",
    "depth_examples": "depth_examples.png",
    "depth_over_time": "depth_metrics.png",
    "map": "map_errors.png",
    "grid": "occupancy.png",
}


@dataclass
class EvalResult:
    metrics: dict  # JSON-able scalars
    times: np.ndarray  # (N,) seconds from the first matched pose
    gt_T: np.ndarray  # (N, 4, 4)
    pred_T_aligned: np.ndarray  # (N, 4, 4) prediction moved into the ground-truth world
    ate: dict
    rpe: dict
    depth: dict | None = None
    depth_times: np.ndarray | None = None
    depth_examples: list = field(default_factory=list)  # (time s, gt (H, W), pred scaled (H, W))
    map: dict | None = None
    map_points_world: np.ndarray | None = None
    mesh: dict | None = None
    mesh_world: tuple | None = None  # (vertices (V, 3) in the ground-truth world, triangles, colours)
    grid: dict | None = None  # metrics + "pred", "reference", "observed" (H, W) arrays, "origin", "resolution"
    notes: list[str] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)


def evaluate_arrays(pred_T, gt_T, *, times=None, pred_depths=None, gt_depths=None, depth_times=None,
                    map_points=None, mesh=None, surface_samples=None, gt_K=None, pred_mesh=None, pred_grid=None,
                    grid_depths=None, align: str = "sim3",
                    depth_align="median", rpe_delta: int = 1, map_threshold: float = 0.05,
                    max_map_points: int = 300_000, n_examples: int = 3, seed: int = 0) -> EvalResult:
    """Metrics for matched arrays.

    pred_T, gt_T: (N, 4, 4) camera-to-world poses of the same N frames (prediction in its own frame).
    pred_depths, gt_depths: (M, H, W) matched depth maps (NaN/0 = invalid), same geometry.
    map_points: (P, 3) predicted map in the prediction's frame; mesh: (vertices, triangles) ground truth.
    surface_samples: ground-truth surface points to complete; default: from gt_depths (with gt_K and gt_T, when
    the depths match the poses one to one), else uniform mesh samples.
    pred_mesh: (vertices, triangles[, colours]) of the predicted TSDF mesh in the prediction's frame (scored like
    the map, after the same alignment). pred_grid: dict(data (H, W) int8 -1/0/100, origin (x, y), resolution,
    floor_z, min_height, max_height, max_range) in the prediction's map frame; scored against the cells the scene
    mesh occupies in that band, over the cells the ground-truth depth observes (needs gt_depths, gt_K and poses
    matching the depths one to one; metrics.occupancy_iou says how cells are counted). grid_depths: ground-truth
    depths matching pred_T / gt_T one to one for the observed area (default gt_depths).
    """
    pred_T, gt_T = np.asarray(pred_T, np.float64), np.asarray(gt_T, np.float64)
    if len(pred_T) != len(gt_T) or len(gt_T) == 0:
        raise ValueError(f"need the same non-zero number of poses, got {len(pred_T)} and {len(gt_T)}")
    times = np.arange(len(gt_T), dtype=np.float64) if times is None else np.asarray(times, np.float64)
    notes = []
    if len(gt_T) < 3 and align in ("sim3", "se3"):
        notes.append(f"only {len(gt_T)} poses: the {align} alignment is underdetermined (first-pose fallback)")
    a = ate(pred_T, gt_T, align=align)
    al: Sim3 = a["alignment"]
    r = rpe(pred_T, gt_T, delta=rpe_delta, scale=al.s)
    metrics = {"frames": int(len(gt_T)), "align": align, "scale": al.s,
               **{k: v for k, v in a.items() if k.startswith("ate")},
               **{k: v for k, v in r.items() if k.startswith("rpe")},
               "alignment": al.to_dict()}
    result = EvalResult(metrics, times, gt_T, a["aligned"], a, r, notes=notes)

    if pred_depths is not None and gt_depths is not None and len(gt_depths):
        d = depth_metrics(pred_depths, gt_depths, align=depth_align)
        result.depth = d
        result.depth_times = (np.arange(len(gt_depths), dtype=np.float64) if depth_times is None
                              else np.asarray(depth_times, np.float64))
        metrics.update({k: v for k, v in d.items() if not k.startswith("per_frame")})
        metrics["depth_align"] = depth_align if isinstance(depth_align, str) else "given"
        pick = np.unique(np.linspace(0, len(gt_depths) - 1, min(n_examples, len(gt_depths))).round().astype(int))
        for i in pick:
            s = d["per_frame_scale"][i]
            s = 1.0 if not np.isfinite(s) else s
            result.depth_examples.append((float(result.depth_times[i]), np.asarray(gt_depths[i], np.float32),
                                          np.asarray(pred_depths[i], np.float32) * np.float32(s)))

    if map_points is not None and mesh is not None:
        pts = np.asarray(map_points, np.float64).reshape(-1, 3)
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) > max_map_points:
            notes.append(f"map subsampled from {len(pts)} to {max_map_points} points")
            pts = pts[np.random.default_rng(seed).choice(len(pts), max_map_points, replace=False)]
        world = al.apply_points(pts)
        if surface_samples is None and gt_depths is not None and gt_K is not None and len(gt_depths) == len(gt_T):
            surface_samples = observed_surface(gt_depths, gt_K, gt_T, voxel=map_threshold / 2)
        m = map_metrics(world, mesh[0], mesh[1], threshold=map_threshold, surface_samples=surface_samples, seed=seed)
        m["completeness_reference"] = "observed surface" if surface_samples is not None else "whole mesh"
        result.map, result.map_points_world = m, world
        metrics.update({k: v for k, v in m.items() if not k.endswith("_errors")})
    if pred_mesh is not None and mesh is not None and len(pred_mesh[1]):
        mv = al.apply_points(np.asarray(pred_mesh[0], np.float64))
        if surface_samples is None and gt_depths is not None and gt_K is not None and len(gt_depths) == len(gt_T):
            surface_samples = observed_surface(gt_depths, gt_K, gt_T, voxel=map_threshold / 2)
        mm = mesh_metrics(mv, pred_mesh[1], mesh[0], mesh[1], threshold=map_threshold,
                          surface_samples=surface_samples, seed=seed)
        result.mesh = mm
        result.mesh_world = (mv, np.asarray(pred_mesh[1]), pred_mesh[2] if len(pred_mesh) > 2 else None)
        metrics.update(mm)
    if pred_grid is not None and mesh is not None:
        obs_depths = gt_depths if grid_depths is None else grid_depths
        if obs_depths is None or gt_K is None or len(obs_depths) != len(gt_T):
            notes.append("occupancy not scored: it needs ground-truth depth matching the poses one to one")
        else:
            result.grid = _score_grid(pred_grid, al, mesh, obs_depths, gt_K, gt_T)
            metrics.update({k: v for k, v in result.grid.items() if k.startswith("occupancy")})
    metrics["notes"] = notes
    return result


def _score_grid(g: dict, al: Sim3, mesh, gt_depths, K, gt_T, stride: int = 4) -> dict:
    """Occupancy IoU in the prediction's map frame: the ground truth (mesh, depths, poses) is moved into it by the
    inverse of the trajectory alignment, so the predicted lattice is used as it is."""
    from ros2_stream4d.mapping.occupancy import OccupancyOptions, frame_votes
    from ros2_stream4d.sim.render import unproject

    data, res = np.asarray(g["data"]), float(g["resolution"])
    lo = np.round(np.asarray(g["origin"], np.float64)[:2] / res).astype(np.int64)

    def to_map(p):
        return (np.asarray(p, np.float64) - al.t) @ al.R / al.s

    opt = OccupancyOptions(res, g["floor_z"], g["min_height"], g["max_height"], g["max_range"])
    ref = reference_occupancy(to_map(mesh[0]), mesh[1], lo, data.shape, res, opt.floor_z, opt.min_height,
                              opt.max_height)
    H, W = data.shape
    seen, seen_occ = np.zeros((H, W), bool), np.zeros((H, W), bool)
    for d, T in zip(gt_depths, gt_T):
        p = unproject(np.asarray(d)[::stride, ::stride], _stride_K(K, stride), T).reshape(-1, 3)
        votes = frame_votes(to_map(p[np.isfinite(p).all(axis=1)]), to_map(T[:3, 3]), opt)
        for which, mask in (("any", seen), ("occ", seen_occ)):
            ij = votes.cells(which) - lo
            ok = (ij[:, 0] >= 0) & (ij[:, 0] < W) & (ij[:, 1] >= 0) & (ij[:, 1] < H)
            mask[ij[ok, 1], ij[ok, 0]] = True
    out = occupancy_iou(data, ref, seen, seen_occ)
    out.update(pred=data, reference=ref, observed=seen, origin=np.asarray(g["origin"], np.float64)[:2],
               resolution=res)
    return out


def load_map_products(path) -> dict:
    """What a saved map holds, for scoring: {"points", "mesh" (V, F, colours) or None, "grid" dict or None,
    "source"}. path: a .ply / .pcd cloud, or a map directory written by ~/save_map (mapping/map_store.py; checked
    with its checksums)."""
    import open3d as o3d
    import yaml

    p = Path(path)
    if p.is_dir():
        from ros2_stream4d.mapping.map_store import read_metadata, read_pgm

        meta = read_metadata(p)
        pc = o3d.io.read_point_cloud(str(p / "cloud.ply"))
        out = {"points": np.asarray(pc.points), "mesh": None, "grid": None, "source": str(p)}
        if (p / "mesh.ply").is_file():
            m = o3d.io.read_triangle_mesh(str(p / "mesh.ply"))
            out["mesh"] = (np.asarray(m.vertices), np.asarray(m.triangles),
                           np.clip(np.rint(np.asarray(m.vertex_colors) * 255), 0, 255).astype(np.uint8))
        if (p / "occupancy.yaml").is_file():
            y = yaml.safe_load((p / "occupancy.yaml").read_text())
            occ = (255.0 - read_pgm(p / y["image"]).astype(np.float64)) / 255.0  # map_server, trinary, negate 0
            data = np.flipud(np.where(occ > y["occupied_thresh"], 100, np.where(occ < y["free_thresh"], 0, -1)))
            c = meta.get("config", {})
            out["grid"] = {"data": data.astype(np.int8), "origin": y["origin"][:2], "resolution": y["resolution"],
                           "floor_z": c.get("occupancy_floor_z", 0.0), "min_height": c.get("occupancy_min_height", 0.1),
                           "max_height": c.get("occupancy_max_height", 1.5),
                           "max_range": c.get("occupancy_max_range", 5.0)}
        return out
    pc = o3d.io.read_point_cloud(str(p))
    if not p.is_file() or len(pc.points) == 0 and p.stat().st_size == 0:
        raise FileNotFoundError(f"no map at {p}")
    return {"points": np.asarray(pc.points), "mesh": None, "grid": None, "source": str(p)}


def observed_surface(gt_depths, K, gt_T, voxel: float = 0.025, stride: int = 2, max_points: int = 400_000):
    """Ground-truth surface points seen by the camera (unprojected ground-truth depth), voxel-thinned to a uniform
    density: the reference for map completeness (a map cannot be asked to cover what was never seen)."""
    from ros2_stream4d.sim.render import unproject

    pts = []
    for d, T in zip(gt_depths, gt_T):
        p = unproject(np.asarray(d)[::stride, ::stride], _stride_K(K, stride), T).reshape(-1, 3)
        pts.append(p[np.isfinite(p).all(axis=1)])
    pts = voxel_downsample(np.concatenate(pts), voxel)
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    return pts


def _stride_K(K, stride: int) -> np.ndarray:
    """Intrinsics of depth[::stride, ::stride] (pixel i of the strided image is pixel stride*i of the full one)."""
    K = np.asarray(K, np.float64).copy()
    K[0, :] /= stride
    K[1, :] /= stride
    return K


def evaluate_bags(pred_path: str | Path, gt_path: str | Path, *, pose_topic: str = "/stream4d/camera_pose",
                  depth_topic: str | None = None, map_topic: str = "/stream4d/map", align: str = "sim3",
                  depth_align="median", rpe_delta: int = 1, map_threshold: float = 0.05,
                  stamp_tolerance_ns: int = 0, map_file=None, **kwargs) -> EvalResult:
    """Match the prediction bag's poses and depths to the sim bag's ground truth by stamp, then evaluate_arrays.

    map_file: the map the run ended with (the file or directory ~/save_map wrote at the end): scored instead of the
    bag's last ~/map message, which is a snapshot from up to one publishing period before the end (and the mesh
    and occupancy grid of a map directory are scored too)."""
    from ros2_stream4d.sim.bag import read_ground_truth
    from ros2_stream4d.sim.scenes import load_mesh

    from .bagio import read_prediction, resample_depth

    gt = read_ground_truth(gt_path, with_depth=True)
    pred = read_prediction(pred_path, pose_topic, depth_topic, map_topic)
    notes = []
    products = None
    if map_file is not None:
        products = load_map_products(map_file)
        bag_n = None if pred.map_points is None else len(pred.map_points)
        notes.append(f"map scored from {products['source']} ({len(products['points'])} points), the map the run "
                     f"ended with" + ("" if bag_n is None else f"; the last {map_topic} message had {bag_n} points"))
        pred.map_points = products["points"]
        pred.map_frame = pred.map_frame or pred.pose_frame
    elif pred.map_points is not None:
        notes.append(f"map scored from the last {map_topic} message in the bag: a snapshot that may predate the end "
                     "of the run (pass the saved map to score the final one)")
    pi, gi = match_stamps(pred.stamps, gt.stamps, stamp_tolerance_ns)
    if len(pi) == 0:
        raise ValueError(f"no prediction stamp of {pred_path} matches a ground-truth stamp of {gt_path}")
    pred_depths = gt_depths = depth_times = None
    if pred.depths is not None:
        dpi, dgi = match_stamps(pred.depth_stamps, gt.stamps, stamp_tolerance_ns)
        if len(dpi):
            if pred.depths.shape[1:] != (gt.height, gt.width):
                notes.append(f"predicted depth {pred.depths.shape[1:]} resampled to {(gt.height, gt.width)} with "
                             + ("its camera_info" if pred.depth_K is not None else "a plain resize (no camera_info)"))
            pred_depths = np.stack([resample_depth(pred.depths[i], pred.depth_K, gt.K, (gt.height, gt.width))
                                    for i in dpi])
            gt_depths = gt.depths[dgi]
            depth_times = (gt.stamps[dgi] - gt.stamps[gi[0]]) * 1e-9
    mesh = load_mesh(gt.mesh_path) if (pred.map_points is not None and gt.mesh_path is not None) else None
    if pred.map_points is not None and mesh is None:
        notes.append("the ground-truth bag has no scene.ply: map metrics skipped")
    if pred.map_points is not None and pred.map_frame and pred.pose_frame and pred.map_frame != pred.pose_frame:
        notes.append(f"map frame {pred.map_frame!r} differs from the pose frame {pred.pose_frame!r}: the map is "
                     "assumed to be in the pose frame")
    surface = None
    if mesh is not None:
        surface = observed_surface(gt.depths[gi], gt.K, gt.T_world_cam[gi], voxel=map_threshold / 2)
    result = evaluate_arrays(pred.T_map_cam[pi], gt.T_world_cam[gi], times=(gt.stamps[gi] - gt.stamps[gi[0]]) * 1e-9,
                             pred_depths=pred_depths, gt_depths=gt_depths, depth_times=depth_times,
                             map_points=pred.map_points, mesh=mesh, surface_samples=surface, align=align,
                             gt_K=gt.K if products is not None else None,
                             pred_mesh=products["mesh"] if products else None,
                             pred_grid=products["grid"] if products else None,
                             grid_depths=gt.depths[gi] if products and products["grid"] else None,
                             depth_align=depth_align, rpe_delta=rpe_delta, map_threshold=map_threshold, **kwargs)
    result.notes[:0] = notes
    result.metrics["notes"] = result.notes
    result.metrics.update(pred_poses=int(len(pred.stamps)), gt_frames=int(len(gt.stamps)), matched_poses=int(len(pi)),
                          matched_depths=0 if gt_depths is None else int(len(gt_depths)))
    result.inputs = {"pred": str(pred_path), "gt": str(gt_path), "pose_topic": pose_topic,
                     "depth_topic": pred.depth_topic, "map_topic": map_topic}
    return result


def match_stamps(a: np.ndarray, b: np.ndarray, tolerance_ns: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of stamps of a matching stamps of b (nearest within tolerance), a and b sorted."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    j = np.clip(np.searchsorted(b, a), 1, len(b) - 1) if len(b) > 1 else np.zeros(len(a), int)
    if len(b) > 1:
        j = np.where(np.abs(b[j - 1] - a) <= np.abs(b[j] - a), j - 1, j)
    ok = np.abs(b[j] - a) <= tolerance_ns
    return np.flatnonzero(ok), j[ok]


# ---------------------------------------------------------------------------------------------------- report
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
