"""Sim(3) helpers, confidence-weighted Umeyama with outlier rejection, and ICP refinement (Open3D).

A Sim(3) is a 4x4 ``[[s R, t], [0, 1]]`` (see the package docstring). ``umeyama`` is the closed form of
Umeyama (1991) with per-point weights; ``robust_sim3`` wraps it in RANSAC over minimal 3-point samples followed by
iteratively re-selected inliers; ``align_point_maps`` aligns two segments from the point maps (and camera centres)
of the frames they share, the step of VGGT-Long's chunk alignment; ``icp_refine`` refines a Sim(3) on keyframe
geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros2_stream4d.mapping.conventions import rotation_angle_deg


def sim3(R=None, t=None, s: float = 1.0) -> np.ndarray:
    S = np.eye(4)
    if R is not None:
        S[:3, :3] = float(s) * np.asarray(R, np.float64)
    else:
        S[:3, :3] *= float(s)
    if t is not None:
        S[:3, 3] = np.asarray(t, np.float64)
    return S


def decompose(S) -> tuple[np.ndarray, np.ndarray, float]:
    """(R, t, s) of a Sim(3) matrix."""
    S = np.asarray(S, np.float64)
    s = float(np.cbrt(np.linalg.det(S[:3, :3])))
    return S[:3, :3] / s, S[:3, 3].copy(), s


def inverse(S) -> np.ndarray:
    R, t, s = decompose(S)
    Ri = R.T / s
    out = np.eye(4)
    out[:3, :3] = Ri
    out[:3, 3] = -Ri @ t
    return out


def scale_of(S) -> float:
    return decompose(S)[2]


def to_se3(S) -> np.ndarray:
    """The rigid part (R, t) of a Sim(3): the pose of a frame whose own geometry is rescaled by s."""
    R, t, _ = decompose(S)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def apply(S, xyz) -> np.ndarray:
    S = np.asarray(S, np.float64)
    return np.asarray(xyz, np.float64) @ S[:3, :3].T + S[:3, 3]


SCALES = ("least_squares", "symmetric")


def umeyama(src, dst, w=None, with_scale: bool = True, scale: str = "least_squares") -> np.ndarray:
    """The Sim(3) S with dst ~ S src (src, dst (N, 3), N >= 3 not collinear): the rotation and centroids minimise
    sum_i w_i |dst_i - S src_i|^2 (Umeyama 1991); the scale is per ``scale``.

    scale "least_squares" is Umeyama's (the minimiser of that sum: cross-covariance over the source's variance):
    when the source points are noisy too, its denominator holds their noise and the scale comes out low (regression
    dilution: about the noise variance over the spread, 0.8 % per segment switch on the realistic oracle,
    docs/longrun/README.md).
    "symmetric" (Horn 1987) is the ratio of the two spreads, sqrt(var(dst) / var(src)): unbiased when both sides
    carry noise of the same relative size (two predictions of the same frames, two keyframes' depth); the rotation
    and the centroids are Umeyama's. Exact correspondences give both the same scale."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    w = np.ones(len(src)) if w is None else np.asarray(w, np.float64)
    W = w.sum()
    if len(src) < 3 or not W > 0:
        raise ValueError("umeyama needs >= 3 points with positive total weight")
    mu_s, mu_d = (w @ src) / W, (w @ dst) / W
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs / W
    U, D, Vt = np.linalg.svd(cov)
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1.0
    R = U @ E @ Vt
    var_s = (w * (xs ** 2).sum(1)).sum() / W
    if not with_scale:
        s = 1.0
    elif scale == "symmetric":
        s = float(np.sqrt((w * (xd ** 2).sum(1)).sum() / W / var_s))
    else:
        s = float(np.trace(np.diag(D) @ E) / var_s)
    if not np.isfinite(s) or s <= 0:
        raise ValueError("degenerate point set for umeyama")
    return sim3(R, mu_d - s * R @ mu_s, s)


@dataclass
class Sim3Fit:
    S: np.ndarray  # dst <- src
    inliers: np.ndarray  # (N,) bool
    rmse: float  # weighted RMS residual of the inliers (dst units)

    @property
    def inlier_ratio(self) -> float:
        return float(self.inliers.mean()) if len(self.inliers) else 0.0


def robust_sim3(src, dst, w=None, threshold: float | np.ndarray | None = None, iterations: int = 200,
                refine_rounds: int = 5, seed: int = 0, with_scale: bool = True, scale: str = "least_squares"
                ) -> Sim3Fit:
    """Sim(3) dst <- src with outliers rejected: RANSAC over 3-point samples (inliers: residual < threshold, one
    value or one per correspondence), then
    weighted Umeyama on the inliers, re-selected ``refine_rounds`` times. threshold None = 3 x the median residual
    of a first all-points fit (at least 1 % of the point cloud's spread). ``scale``: umeyama's estimator, in every
    fit."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n = len(src)
    w = np.ones(n) if w is None else np.clip(np.asarray(w, np.float64), 0.0, None)
    if n < 3:
        raise ValueError("robust_sim3 needs >= 3 correspondences")
    weighted = np.count_nonzero(w)
    if weighted < 3:  # a Sim(3) from 2 weighted points leaves a rotation about their line free
        raise ValueError(f"robust_sim3 needs >= 3 correspondences with a positive weight ({weighted})")
    spread = float(np.sqrt(((dst - dst.mean(0)) ** 2).sum(1).mean()))
    if threshold is None:
        r0 = np.linalg.norm(apply(umeyama(src, dst, w, with_scale, scale), src) - dst, axis=1)
        threshold = max(3.0 * float(np.median(r0)), 0.01 * spread)
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    p = w / w.sum()
    for _ in range(iterations):
        idx = rng.choice(n, 3, replace=False, p=p)
        a = src[idx]
        if np.linalg.norm(np.cross(a[1] - a[0], a[2] - a[0])) < 1e-9:
            continue
        try:
            S = umeyama(a, dst[idx], with_scale=with_scale, scale=scale)
        except ValueError:
            continue
        inl = np.linalg.norm(apply(S, src) - dst, axis=1) < threshold
        score = float(w[inl].sum())
        if score > best_score:
            best, best_score = inl, score
    if best is None or np.count_nonzero(w[best]) < 3:
        raise ValueError("no Sim(3) consensus")
    inl = best
    S = umeyama(src[inl], dst[inl], w[inl], with_scale, scale)
    for _ in range(refine_rounds):
        new = np.linalg.norm(apply(S, src) - dst, axis=1) < threshold
        if np.count_nonzero(w[new]) < 3:
            break
        S = umeyama(src[new], dst[new], w[new], with_scale, scale)
        if np.array_equal(new, inl):
            break
        inl = new
    r = np.linalg.norm(apply(S, src) - dst, axis=1)
    rmse = float(np.sqrt((w[inl] * r[inl] ** 2).sum() / max(w[inl].sum(), 1e-12)))
    return Sim3Fit(S, inl, rmse)


def align_point_maps(points_dst, points_src, conf_dst=None, conf_src=None, centres_dst=None, centres_src=None,
                     max_points: int = 20000, threshold: float | None = None, seed: int = 0) -> Sim3Fit:
    """Sim(3) of segment ``src`` into segment ``dst`` from the frames both segments hold.

    points_*: (F, H, W, 3) (or (F, N, 3)) the shared frames' point maps in each segment's world (same pixels;
    non-finite or zero = invalid); conf_*: (F, H, W) confidences (weight = sqrt(conf_dst conf_src)); centres_*:
    (F, 3) the frames' camera centres in each world (added with the median weight). A regular subsample of at
    most max_points pixel correspondences is used (deterministic). Both point maps are predictions with noise: the
    scale is umeyama's "symmetric" one (the least-squares one shrank every segment by the noise)."""
    a = np.asarray(points_dst, np.float64).reshape(-1, 3)
    b = np.asarray(points_src, np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"point maps differ in shape: {a.shape} vs {b.shape}")
    ca = np.ones(len(a)) if conf_dst is None else np.asarray(conf_dst, np.float64).reshape(-1)
    cb = np.ones(len(b)) if conf_src is None else np.asarray(conf_src, np.float64).reshape(-1)
    valid = np.isfinite(a).all(1) & np.isfinite(b).all(1) & (np.abs(a).sum(1) > 0) & (np.abs(b).sum(1) > 0) \
        & np.isfinite(ca) & np.isfinite(cb) & (ca > 0) & (cb > 0)
    idx = np.flatnonzero(valid)
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    src, dst, w = b[idx], a[idx], np.sqrt(ca[idx] * cb[idx])
    if centres_dst is not None and centres_src is not None:
        wc = float(np.median(w)) if len(w) else 1.0
        src = np.vstack([src, np.asarray(centres_src, np.float64)])
        dst = np.vstack([dst, np.asarray(centres_dst, np.float64)])
        w = np.r_[w, np.full(len(np.asarray(centres_src).reshape(-1, 3)), wc)]
    return robust_sim3(src, dst, w, threshold=threshold, seed=seed, scale="symmetric")


def rotation_mean(rotations) -> np.ndarray:
    """The chordal L2 mean of rotations (N, 3, 3): the rotation nearest their sum."""
    U, _, Vt = np.linalg.svd(np.sum(np.asarray(rotations, np.float64), axis=0))
    return U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt


def weighted_median(values, weights) -> float:
    """The value at half the total weight of the sorted values (weights > 0)."""
    v, w = np.asarray(values, np.float64).ravel(), np.asarray(weights, np.float64).ravel()
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    return float(v[order][min(np.searchsorted(cw, 0.5 * cw[-1]), len(v) - 1)])


def align_from_poses(T_dst, T_src, depth_dst, depth_src, K_dst, K_src, conf_dst=None, conf_src=None,
                     max_points: int = 20000, threshold: float | None = None) -> Sim3Fit:
    """Sim(3) of segment ``src`` into segment ``dst`` from the frames both hold, taking the motion from the frames'
    camera poses and the scale from their depth: rotation = the chordal mean of R_dst_i R_src_i^T, scale = the
    confidence-weighted median of depth_dst / depth_src over the pixels valid in both, translation = the mean of the
    camera centres' c_dst_i - s R c_src_i. (align_point_maps fits all of it to the point maps instead: a smooth depth
    error tilts and shifts that fit, not this one.)

    T_*: (F, 4, 4) camera poses in each segment's world; depth_*: (F, H, W) z-depth (non-finite or <= 0 = invalid);
    K_*: (F, 3, 3) or (3, 3) intrinsics; conf_*: (F, H, W) (weight = sqrt(conf_dst conf_src)). The fit's inliers and RMSE are
    those of the pixels' points after the fit (threshold None: 3 x their median residual, at least 1 % of the
    spread), for the same quality checks as align_point_maps."""
    from ros2_stream4d.mapping.conventions import unproject_depth

    Td, Ts = np.asarray(T_dst, np.float64), np.asarray(T_src, np.float64)
    dd, ds = np.asarray(depth_dst, np.float64), np.asarray(depth_src, np.float64)
    if Td.shape != Ts.shape or Td.ndim != 3 or dd.shape != ds.shape or len(dd) != len(Td):
        raise ValueError(f"poses {Td.shape} / {Ts.shape} and depths {dd.shape} / {ds.shape} do not match")
    cd = np.ones_like(dd) if conf_dst is None else np.asarray(conf_dst, np.float64)
    cs = np.ones_like(ds) if conf_src is None else np.asarray(conf_src, np.float64)
    valid = np.isfinite(dd) & np.isfinite(ds) & (dd > 0) & (ds > 0) & np.isfinite(cd) & np.isfinite(cs) \
        & (cd > 0) & (cs > 0)
    if valid.sum() < 3:
        raise ValueError("align_from_poses: fewer than 3 pixels with depth in both segments")
    w = np.sqrt(cd * cs)
    R = rotation_mean(Td[:, :3, :3] @ np.transpose(Ts[:, :3, :3], (0, 2, 1)))
    s = weighted_median(dd[valid] / ds[valid], w[valid])
    t = np.mean(Td[:, :3, 3] - s * Ts[:, :3, 3] @ R.T, axis=0)
    S = sim3(R, t, s)
    Kd = np.broadcast_to(np.asarray(K_dst, np.float64), (len(Td), 3, 3))
    Ks = np.broadcast_to(np.asarray(K_src, np.float64), (len(Td), 3, 3))
    idx = np.flatnonzero(valid)
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    f, rest = np.unravel_index(idx, (len(dd), dd[0].size))
    a = np.concatenate([unproject_depth(dd[i], Kd[i], Td[i]).reshape(-1, 3)[rest[f == i]] for i in range(len(dd))])
    b = np.concatenate([unproject_depth(ds[i], Ks[i], Ts[i]).reshape(-1, 3)[rest[f == i]] for i in range(len(dd))])
    r = np.linalg.norm(apply(S, b) - a, axis=1)
    if threshold is None:
        spread = float(np.sqrt(((a - a.mean(0)) ** 2).sum(1).mean()))
        threshold = max(3.0 * float(np.median(r)), 0.01 * spread)
    inl = r < threshold
    ww = w.reshape(len(dd), -1)[f, rest]
    rmse = float(np.sqrt((ww[inl] * r[inl] ** 2).sum() / max(ww[inl].sum(), 1e-12)))
    return Sim3Fit(S, inl, rmse)


def icp_refine(src_xyz, dst_xyz, S_init, max_distance: float, iterations: int = 30, with_scale: bool = True,
               point_to_plane: bool = False) -> tuple[np.ndarray, float, float]:
    """Refine S (dst <- src) by ICP (Open3D): (S, fitness, inlier RMSE); fitness = fraction of source points with a
    neighbour within max_distance. Point-to-point estimates the scale too when with_scale; point-to-plane keeps the
    scale of S_init and refines the rigid part (more accurate on sampled surfaces: it does not pull sample points
    onto each other)."""
    import open3d as o3d

    reg = o3d.pipelines.registration

    def cloud(x):
        pc = o3d.geometry.PointCloud()
        pc.points = o3d.utility.Vector3dVector(np.asarray(x, np.float64))
        return pc

    crit = reg.ICPConvergenceCriteria(max_iteration=iterations)
    S_init = np.asarray(S_init, np.float64)
    if not point_to_plane:
        est = reg.TransformationEstimationPointToPoint(with_scaling=with_scale)
        res = reg.registration_icp(cloud(src_xyz), cloud(dst_xyz), float(max_distance), S_init, est, crit)
        return np.asarray(res.transformation).copy(), float(res.fitness), float(res.inlier_rmse)
    R, t, s = decompose(S_init)
    dst = cloud(dst_xyz)
    dst.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=3.0 * max_distance, max_nn=30))
    T0 = np.eye(4)
    T0[:3, :3], T0[:3, 3] = R, t
    res = reg.registration_icp(cloud(s * np.asarray(src_xyz, np.float64)), dst, float(max_distance), T0,
                               reg.TransformationEstimationPointToPlane(), crit)
    S = np.asarray(res.transformation) @ sim3(s=s)
    return S, float(res.fitness), float(res.inlier_rmse)


def sim3_distance(Sa, Sb) -> tuple[float, float, float]:
    """(translation difference, rotation angle in degrees, |log scale ratio|) between two Sim(3)."""
    Ra, ta, sa = decompose(Sa)
    Rb, tb, sb = decompose(Sb)
    return float(np.linalg.norm(ta - tb)), rotation_angle_deg(Ra.T @ Rb), float(abs(np.log(sa / sb)))
