"""Trajectory, depth and map metrics (numpy; no ROS).

Poses are camera-to-world 4x4 matrices (the camera's pose in its world/map frame). Conventions:

ATE   absolute trajectory error: positions of the prediction aligned to the ground truth by a similarity
      (``sim3``: scale, rotation, translation, Umeyama 1991), a rigid motion (``se3``), or not at all (``none``);
      per-frame error = |p_gt - (s R p_pred + t)|. Rotation error per frame = angle of R_gt^T (R R_pred).
RPE   relative pose error over ``delta`` frames: E = (T_gt,i^-1 T_gt,i+d)^-1 (T_pred,i^-1 T_pred,i+d), with the
      prediction's translations multiplied by the alignment scale; translation error |t_E| (metres), rotation
      error angle(R_E) (degrees). Independent of the rigid part of the alignment.
Depth per frame, on pixels where both are finite and positive (and gt within [min_depth, max_depth]):
      prediction scaled by s = median(gt) / median(pred) ("median"), or by a given factor, or not at all;
      AbsRel = mean |s d - g| / g, RMSE = sqrt(mean (s d - g)^2), delta<1.25 = mean(max(s d / g, g / (s d)) < 1.25).
      Dataset figures are means over frames.
Map   accuracy = distance of each map point (aligned to the world) to the ground-truth mesh; completeness =
      distance of each ground-truth surface sample to the nearest map point. precision / recall = fraction of
      those distances below ``threshold``; F-score = 2 P R / (P + R).
Mesh  the same with the predicted mesh: accuracy from points sampled uniformly on it, completeness as the
      distance from ground-truth surface samples to its triangles (``mesh_metrics``).
Grid  a 2D occupancy grid against occupied cells derived from the scene mesh (surface within the height band),
      counted over the cells the cameras observed; per-class IoU of occupied and free, and their mean
      (``reference_occupancy``, ``observed_cells``, ``occupancy_iou``; unknown predictions count as misses).

The Umeyama implementation is checked against evo's (evo.core.geometry.umeyama_alignment) in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from ros2_stream4d.mapping.conventions import inverse as inv_se3
from ros2_stream4d.mapping.conventions import rotation_angle
from ros2_stream4d.sim.render import mesh_raycasting_scene

ALIGN_MODES = ("sim3", "se3", "scale", "none")


# ---------------------------------------------------------------------------------------------------- alignment
@dataclass(frozen=True)
class Sim3:
    """x_world = s R x_pred + t."""

    s: float = 1.0
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply_points(self, p: np.ndarray) -> np.ndarray:
        return self.s * np.asarray(p) @ self.R.T + self.t

    def apply_poses(self, T: np.ndarray) -> np.ndarray:
        """Camera-to-world poses (N, 4, 4) moved into the target frame (translations scaled, rotations rotated)."""
        T = np.asarray(T, np.float64)
        out = T.copy()
        out[..., :3, :3] = self.R @ T[..., :3, :3]
        out[..., :3, 3] = self.apply_points(T[..., :3, 3])
        return out

    def matrix(self) -> np.ndarray:
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = self.s * self.R, self.t
        return M

    def to_dict(self) -> dict:
        return {"scale": float(self.s), "rotation": self.R.tolist(), "translation": self.t.tolist()}


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> Sim3:
    """Least-squares similarity (or rigid motion) with dst ~ s R src + t, for point sets (N, 3), N >= 3
    (Umeyama, PAMI 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 2:
        raise ValueError(f"need two (N, 3) point sets with N >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / var_s) if with_scale and var_s > 0 else 1.0
    t = mu_d - s * R @ mu_s
    return Sim3(s, R, t)


def align_trajectory(pred_T: np.ndarray, gt_T: np.ndarray, mode: str = "sim3") -> Sim3:
    """The alignment taking predicted camera positions onto the ground truth.

    sim3 / se3: Umeyama on positions (needs >= 3 non-collinear positions for a unique rotation; with fewer or
    degenerate motion it falls back to aligning the first poses). scale: s only, from the path lengths about the
    centroids, rotation and translation from the first frame. none: identity."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")
    pred_T, gt_T = np.asarray(pred_T, np.float64), np.asarray(gt_T, np.float64)
    if mode == "none":
        return Sim3()
    pp, pg = pred_T[:, :3, 3], gt_T[:, :3, 3]
    spread_p = np.linalg.norm(pp - pp.mean(0), axis=1)
    spread_g = np.linalg.norm(pg - pg.mean(0), axis=1)
    if mode in ("sim3", "se3") and len(pp) >= 3 and _rank(pg - pg.mean(0)) >= 2 and _rank(pp - pp.mean(0)) >= 2:
        return umeyama(pp, pg, with_scale=(mode == "sim3"))
    # degenerate (a still or straight-line camera): align the first poses, scale from the spreads
    s = float(spread_g.sum() / spread_p.sum()) if mode in ("sim3", "scale") and spread_p.sum() > 0 else 1.0
    R = gt_T[0, :3, :3] @ pred_T[0, :3, :3].T
    return Sim3(s, R, pg[0] - s * R @ pp[0])


def _rank(x: np.ndarray, tol: float = 1e-9) -> int:
    sv = np.linalg.svd(x, compute_uv=False)
    return int((sv > tol * max(sv[0], 1e-300)).sum()) if len(sv) else 0


# ---------------------------------------------------------------------------------------------------- trajectory
def _stats(e: np.ndarray, prefix: str) -> dict:
    if len(e) == 0:
        return {f"{prefix}_{k}": float("nan") for k in ("rmse", "mean", "median", "std", "max")}
    return {f"{prefix}_rmse": float(np.sqrt(np.mean(e**2))), f"{prefix}_mean": float(np.mean(e)),
            f"{prefix}_median": float(np.median(e)), f"{prefix}_std": float(np.std(e)),
            f"{prefix}_max": float(np.max(e))}


def ate(pred_T: np.ndarray, gt_T: np.ndarray, align: str = "sim3", alignment: Sim3 | None = None) -> dict:
    """Absolute trajectory error (see the module docstring). Returns scalars (ate_rmse ... in metres,
    ate_rot_* in degrees, scale) and per-frame arrays 'trans_errors', 'rot_errors_deg', plus 'alignment'."""
    pred_T, gt_T = np.asarray(pred_T, np.float64), np.asarray(gt_T, np.float64)
    if pred_T.shape != gt_T.shape:
        raise ValueError(f"trajectories differ in shape: {pred_T.shape} vs {gt_T.shape}")
    al = alignment or align_trajectory(pred_T, gt_T, align)
    aligned = al.apply_poses(pred_T)
    te = np.linalg.norm(aligned[:, :3, 3] - gt_T[:, :3, 3], axis=1)
    re = np.degrees(rotation_angle(np.swapaxes(gt_T[:, :3, :3], 1, 2) @ aligned[:, :3, :3]))
    out = {**_stats(te, "ate"), **_stats(re, "ate_rot"), "scale": float(al.s), "align": align}
    out.update(trans_errors=te, rot_errors_deg=re, alignment=al, aligned=aligned)
    return out


def rpe(pred_T: np.ndarray, gt_T: np.ndarray, delta: int = 1, scale: float = 1.0) -> dict:
    """Relative pose error over ``delta`` frames (see the module docstring); pred translations times scale."""
    pred_T, gt_T = np.asarray(pred_T, np.float64).copy(), np.asarray(gt_T, np.float64)
    pred_T[:, :3, 3] *= scale
    if len(gt_T) <= delta:
        te = re = np.zeros(0)
    else:
        rel_gt = inv_se3(gt_T[:-delta]) @ gt_T[delta:]
        rel_pred = inv_se3(pred_T[:-delta]) @ pred_T[delta:]
        E = inv_se3(rel_gt) @ rel_pred
        te = np.linalg.norm(E[:, :3, 3], axis=1)
        re = np.degrees(rotation_angle(E[:, :3, :3]))
    return {**_stats(te, "rpe_trans"), **_stats(re, "rpe_rot"), "rpe_delta": int(delta),
            "trans_errors": te, "rot_errors_deg": re}


# ---------------------------------------------------------------------------------------------------- depth
def depth_frame_metrics(pred: np.ndarray, gt: np.ndarray, align="median", min_depth: float = 1e-3,
                        max_depth: float | None = None) -> dict:
    """Metrics of one depth map (see the module docstring). align: "median", "none" or a scale factor."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"depth shapes differ: {pred.shape} vs {gt.shape}")
    valid = np.isfinite(pred) & np.isfinite(gt) & (pred > 0) & (gt > min_depth)
    if max_depth is not None:
        valid &= gt <= max_depth
    n = int(valid.sum())
    if n == 0:
        return {"abs_rel": np.nan, "rmse": np.nan, "delta1": np.nan, "scale": np.nan, "valid": 0}
    p, g = pred[valid], gt[valid]
    if align == "median":
        s = float(np.median(g) / np.median(p))
    elif align == "none":
        s = 1.0
    else:
        s = float(align)
    p = p * s
    ratio = np.maximum(p / g, g / p)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)), "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
            "delta1": float(np.mean(ratio < 1.25)), "scale": s, "valid": n}


def depth_metrics(preds, gts, align="median", min_depth: float = 1e-3, max_depth: float | None = None) -> dict:
    """Per-frame metrics of depth sequences (N, H, W) and their means over frames with valid pixels.
    align may also be a sequence of per-frame scale factors."""
    per = []
    for i, (p, g) in enumerate(zip(preds, gts)):
        a = align[i] if isinstance(align, (list, tuple, np.ndarray)) else align
        per.append(depth_frame_metrics(p, g, a, min_depth, max_depth))
    out = {}
    for k in ("abs_rel", "rmse", "delta1", "scale"):
        vals = np.array([m[k] for m in per], np.float64)
        out[f"depth_{k}" if k != "scale" else "depth_scale_median"] = (
            float(np.nanmedian(vals) if k == "scale" else np.nanmean(vals)) if np.isfinite(vals).any()
            else float("nan"))
        out[f"per_frame_{k}"] = vals
    out["depth_frames"] = int(sum(m["valid"] > 0 for m in per))
    return out


# ---------------------------------------------------------------------------------------------------- map
def sample_mesh(vertices: np.ndarray, triangles: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n points uniformly distributed over the mesh surface (area-weighted), reproducible."""
    v, f = np.asarray(vertices, np.float64), np.asarray(triangles, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    rng = np.random.default_rng(seed)
    tri = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s1 = np.sqrt(r1)
    return (1 - s1)[:, None] * a[tri] + (s1 * (1 - r2))[:, None] * b[tri] + (s1 * r2)[:, None] * c[tri]


def voxel_downsample(points: np.ndarray, voxel: float) -> np.ndarray:
    """One point (the first) per occupied voxel: a uniform-density subset."""
    p = np.asarray(points, np.float64)
    keys = np.floor(p / voxel).astype(np.int64)
    _, idx = np.unique(keys, axis=0, return_index=True)
    return p[np.sort(idx)]


def map_metrics(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, threshold: float = 0.05,
                surface_samples: np.ndarray | None = None, n_samples: int = 200_000, seed: int = 0) -> dict:
    """Accuracy / completeness of a point map (N, 3) already in the mesh's frame (see the module docstring).
    surface_samples: the ground-truth surface to complete (e.g. the observed part, from ground-truth depth);
    default: n_samples uniform samples of the whole mesh."""
    pts = np.asarray(points, np.float64)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if surface_samples is None:
        surface_samples = sample_mesh(vertices, triangles, n_samples, seed)
    out = {"map_points": int(len(pts)), "map_threshold": float(threshold), "surface_samples": int(len(surface_samples))}
    if len(pts) == 0:
        out.update(map_accuracy_mean=np.nan, map_accuracy_median=np.nan, map_completeness_mean=np.nan,
                   map_completeness_median=np.nan, map_precision=0.0, map_recall=0.0, map_fscore=0.0,
                   accuracy_errors=np.zeros(0), completeness_errors=np.zeros(0))
        return out
    rc = mesh_raycasting_scene(vertices, triangles)
    acc = rc.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy().astype(np.float64)
    comp, _ = cKDTree(pts).query(np.asarray(surface_samples, np.float64), k=1)
    p, r = float(np.mean(acc < threshold)), float(np.mean(comp < threshold))
    out.update(map_accuracy_mean=float(acc.mean()), map_accuracy_median=float(np.median(acc)),
               map_accuracy_rmse=float(np.sqrt(np.mean(acc**2))), map_completeness_mean=float(comp.mean()),
               map_completeness_median=float(np.median(comp)), map_precision=p, map_recall=r,
               map_fscore=float(2 * p * r / (p + r)) if p + r > 0 else 0.0,
               accuracy_errors=acc, completeness_errors=comp)
    return out


# ---------------------------------------------------------------------------------------------------- mesh
def mesh_metrics(vertices: np.ndarray, triangles: np.ndarray, gt_vertices: np.ndarray, gt_triangles: np.ndarray,
                 threshold: float = 0.05, surface_samples: np.ndarray | None = None, n_samples: int = 200_000,
                 seed: int = 0) -> dict:
    """Accuracy / completeness of a predicted triangle mesh already in the ground truth's frame.

    accuracy: ``n_samples`` points drawn uniformly (by area) on the predicted mesh, distance of each to the ground
    truth mesh; completeness: distance of each ground-truth surface sample (default: uniform samples of the whole
    ground-truth mesh; pass the observed surface to score only what was seen) to the predicted mesh (point-to-
    triangle, not to vertices). precision / recall / F-score as for point maps (module docstring)."""
    v, f = np.asarray(vertices, np.float64), np.asarray(triangles, np.int64)
    if surface_samples is None:
        surface_samples = sample_mesh(gt_vertices, gt_triangles, n_samples, seed + 1)
    out = {"mesh_vertices": int(len(v)), "mesh_triangles": int(len(f)), "mesh_threshold": float(threshold)}
    if len(f) == 0:
        out.update(mesh_accuracy_mean=np.nan, mesh_accuracy_median=np.nan, mesh_completeness_mean=np.nan,
                   mesh_completeness_median=np.nan, mesh_precision=0.0, mesh_recall=0.0, mesh_fscore=0.0)
        return out
    samples = sample_mesh(v, f, n_samples, seed)
    acc = mesh_raycasting_scene(gt_vertices, gt_triangles).compute_distance(
        o3d.core.Tensor(samples.astype(np.float32))).numpy().astype(np.float64)
    comp = mesh_raycasting_scene(v, f).compute_distance(
        o3d.core.Tensor(np.asarray(surface_samples, np.float32))).numpy().astype(np.float64)
    p, r = float(np.mean(acc < threshold)), float(np.mean(comp < threshold))
    out.update(mesh_accuracy_mean=float(acc.mean()), mesh_accuracy_median=float(np.median(acc)),
               mesh_completeness_mean=float(comp.mean()), mesh_completeness_median=float(np.median(comp)),
               mesh_precision=p, mesh_recall=r, mesh_fscore=float(2 * p * r / (p + r)) if p + r > 0 else 0.0)
    return out


# ---------------------------------------------------------------------------------------------------- occupancy
def reference_occupancy(gt_vertices: np.ndarray, gt_triangles: np.ndarray, lo_cell, shape, resolution: float,
                        floor_z: float = 0.0, min_height: float = 0.1, max_height: float = 1.5,
                        seed: int = 0) -> np.ndarray:
    """Ground-truth occupied cells (bool (H, W), row = y) on the lattice whose element [0, 0] is cell ``lo_cell``
    (i, j) of size ``resolution``: a cell is occupied when the scene mesh has surface in it with height above the
    floor in (min_height, max_height] (the same band as the map's grid). The surface is sampled densely (about 16
    samples per cell area of surface), so thin walls and table tops count."""
    v, f = np.asarray(gt_vertices, np.float64), np.asarray(gt_triangles, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = float((0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)).sum())
    n = int(min(20_000_000, max(100_000, 16 * area / resolution**2)))
    pts = sample_mesh(v, f, n, seed)
    h = pts[:, 2] - floor_z
    pts = pts[(h > min_height) & (h <= max_height)]
    ij = np.floor(pts[:, :2] / resolution).astype(np.int64) - np.asarray(lo_cell, np.int64)
    H, W = shape
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < W) & (ij[:, 1] >= 0) & (ij[:, 1] < H)
    occ = np.zeros((H, W), bool)
    occ[ij[ok, 1], ij[ok, 0]] = True
    return occ


def occupancy_iou(pred: np.ndarray, ref_occupied: np.ndarray, observed: np.ndarray,
                  observed_occupied: np.ndarray | None = None) -> dict:
    """IoU of a predicted grid (int8 -1 / 0 / 100) against the ground-truth occupied cells, over the observed area.

    Counting: ground truth occupied = ``ref_occupied``, ground truth free = every other cell; predicted occupied =
    100, predicted free = 0, predicted unknown (-1) is neither, so it lowers both IoUs (a miss, never a hit).
    occupied IoU = |P_occ & R_occ| / |P_occ | R_occ|, free IoU likewise, within the evaluated area; the mean of the
    two is the score (two-class mIoU).
    Areas (``observed_cells`` computes both masks from ground-truth depth): ``occupancy_iou`` is evaluated over the
    cells where the ground truth saw what it says: ground-truth occupied cells whose obstacle surface (in the band)
    was seen by some camera, and ground-truth free cells that were seen (``observed & ~ref_occupied``). An obstacle
    whose surface no camera ever saw (a table top above a low camera: only the floor under it is visible) cannot
    be mapped by any camera, and is not counted there. ``occupancy_iou_strict`` counts every observed cell (any
    ground-truth vote), such obstacles included. ``occupancy_known`` = fraction of the evaluated cells the
    prediction knows."""
    pred, R, obs = np.asarray(pred), np.asarray(ref_occupied, bool), np.asarray(observed, bool)
    if not (pred.shape == R.shape == obs.shape):
        raise ValueError(f"grids differ in shape: {pred.shape}, {R.shape}, {obs.shape}")

    def iou(a, b):
        u = int((a | b).sum())
        return float((a & b).sum() / u) if u else float("nan")

    def score(area):
        io = iou((pred == 100) & area, R & area)
        if_ = iou((pred == 0) & area, ~R & area)
        return float(np.nanmean([io, if_])), io, if_

    strict = score(obs)
    area = obs if observed_occupied is None else (np.asarray(observed_occupied, bool) & R) | (obs & ~R)
    main = score(area)
    return {"occupancy_iou": main[0], "occupancy_iou_occupied": main[1], "occupancy_iou_free": main[2],
            "occupancy_iou_strict": strict[0], "occupancy_iou_occupied_strict": strict[1],
            "occupancy_evaluated_cells": int(area.sum()), "occupancy_observed_cells": int(obs.sum()),
            "occupancy_known": float(((pred != -1) & area).sum() / max(1, area.sum())),
            "occupancy_ref_occupied_cells": int((R & area).sum()),
            "occupancy_pred_occupied_cells": int(((pred == 100) & area).sum())}


def observed_cells(depths, K, T_map_cam, lo_cell, shape, options, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(observed, observed_occupied), bool (H, W) on the lattice of ``reference_occupancy``, from ground-truth depth
    maps through the map's own vote rule (mapping/occupancy.py frame_votes, same band and range): observed = cells
    with any vote (what a perfect map could know), observed_occupied = cells where a surface in the band was seen."""
    from ros2_stream4d.mapping.conventions import unproject_depth
    from ros2_stream4d.mapping.occupancy import frame_votes

    H, W = shape
    lo = np.asarray(lo_cell, np.int64)
    seen, seen_occ = np.zeros((H, W), bool), np.zeros((H, W), bool)
    Ks = np.asarray(K, np.float64).copy()
    Ks[:2] /= stride
    for d, T in zip(depths, T_map_cam):
        pts = unproject_depth(np.asarray(d, np.float32)[::stride, ::stride], Ks, T).reshape(-1, 3)
        votes = frame_votes(pts, np.asarray(T)[:3, 3], options)
        for which, mask in (("any", seen), ("occ", seen_occ)):
            ij = votes.cells(which) - lo
            ok = (ij[:, 0] >= 0) & (ij[:, 0] < W) & (ij[:, 1] >= 0) & (ij[:, 1] < H)
            mask[ij[ok, 1], ij[ok, 0]] = True
    return seen, seen_occ


def depth_points(depth, K, T_world_cam, stride: int = 1) -> np.ndarray:
    """(P, 3) finite world points of a z-depth map (every stride-th pixel each way; NaN = no hit)."""
    from ros2_stream4d.sim.render import unproject

    p = unproject(np.asarray(depth)[::stride, ::stride], stride_intrinsics(K, stride), T_world_cam).reshape(-1, 3)
    return p[np.isfinite(p).all(axis=1)]


def observed_surface(gt_depths, K, gt_T, voxel: float = 0.025, stride: int = 2, max_points: int = 400_000):
    """Ground-truth surface points seen by the camera (unprojected ground-truth depth), voxel-thinned to a uniform
    density: the reference for map completeness (a map cannot be asked to cover what was never seen)."""
    pts = voxel_downsample(np.concatenate([depth_points(d, K, T, stride) for d, T in zip(gt_depths, gt_T)]), voxel)
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    return pts


def stride_intrinsics(K, stride: int) -> np.ndarray:
    """Intrinsics of depth[::stride, ::stride] (pixel i of the strided image is pixel stride*i of the full one)."""
    K = np.asarray(K, np.float64).copy()
    K[0, :] /= stride
    K[1, :] /= stride
    return K
