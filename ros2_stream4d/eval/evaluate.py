"""Evaluation runs: a prediction (arrays, or the node's output bag) against ground truth (arrays, or a sim bag)
-> metrics in an ``EvalResult``; report.py writes it (markdown, PNG plots, metrics.json).

Python API (no bags needed):
    result = evaluate_arrays(pred_T, gt_T, pred_depths=..., gt_depths=..., map_points=..., mesh=(V, F))
Bags:
    result = evaluate_bags("pred_bag", "gt_bag")
then ``report.write_report(result, "report_dir")``.

The trajectory alignment (Sim(3) by default) found for the camera positions also maps the predicted point map into
the ground-truth world before map metrics, since the map is expressed in the same frame as the predicted poses.
Imports point one way: metrics <- bagio <- evaluate <- report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bagio import read_prediction, resample_depth
from .metrics import (
    Sim3,
    ate,
    depth_metrics,
    map_metrics,
    mesh_metrics,
    observed_cells,
    observed_surface,
    occupancy_iou,
    reference_occupancy,
    rpe,
)


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
    from ros2_stream4d.mapping.occupancy import OccupancyOptions

    data, res = np.asarray(g["data"]), float(g["resolution"])
    lo = np.round(np.asarray(g["origin"], np.float64)[:2] / res).astype(np.int64)

    def to_map(p):
        return (np.asarray(p, np.float64) - al.t) @ al.R / al.s

    opt = OccupancyOptions(res, g["floor_z"], g["min_height"], g["max_height"], g["max_range"])
    ref = reference_occupancy(to_map(mesh[0]), mesh[1], lo, data.shape, res, opt.floor_z, opt.min_height,
                              opt.max_height)
    # the cameras in the map frame: p_map = R^T (p_world - t) / s, so rotation R^T R_wc, depth / s
    T_map_cam = np.array(gt_T, np.float64)
    T_map_cam[:, :3, :3] = al.R.T @ T_map_cam[:, :3, :3]
    T_map_cam[:, :3, 3] = to_map(T_map_cam[:, :3, 3])
    seen, seen_occ = observed_cells([np.asarray(d, np.float64) / al.s for d in gt_depths], K, T_map_cam, lo,
                                    data.shape, opt, stride)
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
