"""The back-end modules (mapping/backend/: sim3, drift, segments, loops, posegraph, service) on small exact inputs:
the tests that answer the mutants docs/mutation.md lists for them (fast, in-process)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.backend.drift import DriftModel
from ros2_stream4d.mapping.conventions import rotation_from_vector


def _poses_along_x(steps):
    """Level camera poses whose positions move along x by the given step lengths (a fixed, non-trivial rotation)."""
    R = rotation_from_vector([0.1, -0.2, 0.3])
    out, x = [], 0.0
    for s in [0.0] + list(steps):
        x += s
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, [x, 0.5, -0.25]
        out.append(T)
    return np.stack(out)


# ---------------------------------------------------------------------------------------------------- drift
def test_drift_follows_its_formulas_exactly_without_random_walks():
    """Per step: distance d += step; log s += (a + b d) step; yaw += (c + e d) step degrees about up; the odometry
    position advances by s R_err (true step); its rotation is R_err R_true."""
    a, b, c, e = 0.01, 0.002, 0.5, 0.1
    steps = [1.0, 2.0, 0.5]
    T = _poses_along_x(steps)
    m = DriftModel(scale_per_m=a, yaw_deg_per_m=c, scale_per_m2=b, yaw_deg_per_m2=e, scale_walk=0.0,
                   yaw_walk_deg=0.0)
    odo, scales = m.run(T)
    np.testing.assert_array_equal(odo[0], T[0])
    assert scales[0] == 1.0
    d = log_s = yaw = 0.0
    p = T[0][:3, 3].copy()
    for k, st in enumerate(steps, start=1):
        d += st
        log_s += (a + b * d) * st
        yaw += np.radians((c + e * d) * st)
        R_err = rotation_from_vector(np.array([0.0, 0.0, 1.0]) * yaw)
        p = p + np.exp(log_s) * (R_err @ (T[k][:3, 3] - T[k - 1][:3, 3]))
        np.testing.assert_allclose(odo[k][:3, :3], R_err @ T[k][:3, :3], atol=1e-12)
        np.testing.assert_allclose(odo[k][:3, 3], p, atol=1e-12)
        assert scales[k] == pytest.approx(np.exp(log_s), rel=1e-12)
        np.testing.assert_array_equal(odo[k][3], [0, 0, 0, 1])
    assert m.distance == pytest.approx(3.5) and m.scale == pytest.approx(np.exp(log_s))


def test_drift_reset_restarts_the_rate_but_keeps_the_error():
    m = DriftModel(scale_per_m=0.0, scale_per_m2=0.01, yaw_deg_per_m=0.0, scale_walk=0.0, yaw_walk_deg=0.0)
    T = _poses_along_x([1.0, 1.0])
    m.step(T[0])
    m.step(T[1])
    log1 = m.log_scale
    assert log1 == pytest.approx(0.01)
    m.reset()
    assert m.distance == 0.0 and m.log_scale == log1
    m.step(T[2])
    assert m.log_scale == pytest.approx(0.02), "d restarted at 0: the second metre adds 0.01 again, not 0.02"


def test_drift_turns_about_the_given_up_axis():
    T = _poses_along_x([1.0])
    m = DriftModel(scale_per_m=0.0, yaw_deg_per_m=10.0, scale_walk=0.0, yaw_walk_deg=0.0, up=(0.0, -2.0, 0.0))
    odo, _ = m.run(T)
    R_err = rotation_from_vector(np.array([0.0, -1.0, 0.0]) * np.radians(10.0))
    np.testing.assert_allclose(odo[1][:3, :3], R_err @ T[1][:3, :3], atol=1e-12)
    up, h1, h2 = m._axes
    np.testing.assert_allclose(up, [0, -1, 0])
    for h in (h1, h2):
        assert abs(np.dot(h, up)) < 1e-12 and np.linalg.norm(h) == pytest.approx(1.0)
    x_up = DriftModel(up=(1.0, 0.0, 0.0))  # up along x: the horizontal axes are built from y instead
    assert all(abs(np.dot(h, [1.0, 0, 0])) < 1e-12 and np.linalg.norm(h) == pytest.approx(1.0) for h in x_up._axes[1:])


def test_random_walks_are_seeded_and_scaled_by_the_square_root_of_the_step():
    T = _poses_along_x([4.0])
    base = dict(scale_per_m=0.0, yaw_deg_per_m=0.0, seed=3)
    m = DriftModel(scale_walk=0.01, yaw_walk_deg=0.0, **base)
    m.run(T)
    g = np.random.default_rng(3).standard_normal(2)
    assert m.log_scale == pytest.approx(0.01 * 2.0 * g[0], rel=1e-12)
    m = DriftModel(scale_walk=0.0, yaw_walk_deg=1.0, **base)
    m.run(T)
    assert m.yaw == pytest.approx(np.radians(1.0 * 2.0 * g[1]), rel=1e-12)
    m = DriftModel(scale_walk=0.0, yaw_walk_deg=0.0, tilt_walk_deg=1.0, **base)
    m.run(T)
    g = np.random.default_rng(3).standard_normal(4)
    np.testing.assert_allclose(m.tilt, np.radians(1.0) * 2.0 * g[2:4], rtol=1e-12)


def test_position_walk_accumulates_but_jitter_does_not():
    T = _poses_along_x([1.0] * 6)
    quiet = dict(scale_per_m=0.0, yaw_deg_per_m=0.0, scale_walk=0.0, yaw_walk_deg=0.0, seed=1)
    plain, _ = DriftModel(**quiet).run(T)
    np.testing.assert_allclose(plain, T, atol=1e-12)
    jit, _ = DriftModel(jitter_m=0.01, **quiet).run(T)
    dev = np.linalg.norm(jit[:, :3, 3] - T[:, :3, 3], axis=1)
    assert dev[0] == 0.0 and np.all(dev[1:] > 0) and np.all(dev[1:] < 0.06)
    np.testing.assert_allclose(jit[:, :3, :3], T[:, :3, :3], atol=1e-12)
    jr, _ = DriftModel(jitter_deg=1.0, **quiet).run(T)
    ang = [np.degrees(np.arccos(np.clip((np.trace(a[:3, :3].T @ b[:3, :3]) - 1) / 2, -1, 1))) for a, b in zip(jr, T)]
    assert ang[0] < 1e-4 and all(0.01 < x < 6.0 for x in ang[1:]), "per-frame rotation jitter of ~1 degree per axis"
    np.testing.assert_allclose(jr[:, :3, 3], T[:, :3, 3], atol=1e-12)
    walk, _ = DriftModel(trans_walk=0.01, **quiet).run(T)
    rng = np.random.default_rng(1)
    acc = np.zeros(3)
    for k in range(1, len(T)):
        rng.standard_normal(2)  # scale and yaw walks (0 here)
        acc += 0.01 * rng.standard_normal(3)
        np.testing.assert_allclose(walk[k][:3, 3], T[k][:3, 3] + acc, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- sim3
def test_sim3_construction_decomposition_and_inverse():
    R = rotation_from_vector([0.3, -0.1, 0.2])
    S = S3.sim3(R, [1.0, -2.0, 0.5], 2.5)
    np.testing.assert_allclose(S[:3, :3], 2.5 * R)
    np.testing.assert_array_equal(S[3], [0, 0, 0, 1])
    np.testing.assert_allclose(S3.sim3(s=3.0)[:3, :3], 3.0 * np.eye(3))
    np.testing.assert_array_equal(S3.sim3(), np.eye(4))
    Rd, td, sd = S3.decompose(S)
    np.testing.assert_allclose(Rd, R, atol=1e-12)
    np.testing.assert_allclose(td, [1.0, -2.0, 0.5])
    assert sd == pytest.approx(2.5) and S3.scale_of(S) == pytest.approx(2.5)
    np.testing.assert_allclose(S3.inverse(S) @ S, np.eye(4), atol=1e-12)
    assert S3.to_se3(S).shape == (4, 4)
    np.testing.assert_array_equal(S3.to_se3(S)[3], [0, 0, 0, 1])
    np.testing.assert_allclose(S3.to_se3(S)[:3, :3], R, atol=1e-12)
    np.testing.assert_allclose(S3.to_se3(S)[:3, 3], [1.0, -2.0, 0.5])
    np.testing.assert_allclose(S3.apply(S, [[1.0, 0, 0]]), [2.5 * R[:, 0] + [1.0, -2.0, 0.5]])
    dt, dr, ds = S3.sim3_distance(S, S3.sim3(R, [1.0, -2.0, 1.5], 5.0))
    assert dt == pytest.approx(1.0) and dr == pytest.approx(0.0, abs=1e-6) and ds == pytest.approx(np.log(2.0))


def test_umeyama_refuses_too_few_or_weightless_or_degenerate_points():
    pts = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="^umeyama needs >= 3 points with positive total weight$"):
        S3.umeyama(pts[:2], pts[:2])
    with pytest.raises(ValueError, match="^umeyama needs >= 3 points with positive total weight$"):
        S3.umeyama(pts, pts, w=np.zeros(4))
    with pytest.raises(ValueError, match="^degenerate point set for umeyama$"), np.errstate(invalid="ignore"):
        S3.umeyama(np.ones((4, 3)), pts)
    np.testing.assert_allclose(S3.umeyama(pts[:3], pts[:3]), np.eye(4), atol=1e-12)
    S = S3.umeyama(pts, 2.0 * pts + 1.0, with_scale=False)
    assert S3.scale_of(S) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- DriftedSession
class _FakeSession:
    """A session (model/session.py protocol) that sees the true poses: a camera moving along its optical x."""

    window, anchors = 7, 2

    def __init__(self, h=4, w=5):
        self.h, self.w = h, w
        self.frames_seen = 0
        self.images, self.resets, self.calls = [], 0, []
        self.K = np.array([[4.0, 0, 2.0], [0, 4.0, 1.5], [0, 0, 1]])

    def reset(self):
        self.resets += 1

    def stats(self):
        return {"fake": True}

    def step(self, image=None, stamp_ns=None, mapping=None):
        import torch

        from ros2_stream4d.mapping.conventions import inverse

        self.images.append(image)
        self.calls.append((stamp_ns, mapping))
        T = np.eye(4)
        T[:3, :3] = rotation_from_vector([0.0, 0.1 * self.frames_seen, 0.0])
        T[:3, 3] = [0.5 * self.frames_seen, 0.0, 0.1]
        self.frames_seen += 1
        depth = np.full((self.h, self.w), 2.0)
        depth[0, 0] = 0.0  # an invalid pixel
        return {"extrinsic": torch.as_tensor(inverse(T)[:3, :], dtype=torch.float32)[None],
                "intrinsic": torch.as_tensor(self.K, dtype=torch.float32)[None],
                "depth": torch.as_tensor(depth, dtype=torch.float32)[None, ..., None],
                "depth_conf": torch.full((1, self.h, self.w), 3.0), "T_true": T}


def test_drifted_session_forwards_the_protocol_and_seeds_each_segment():
    from ros2_stream4d.mapping.backend.drift import DriftedSession

    inner = _FakeSession()
    s = DriftedSession(inner, scale_per_m=0.2)
    assert (s.window, s.anchors, s.seed, s.resets) == (7, 2, 0, 0)
    assert s.stats() == {"fake": True} and s.shrunk(3) is None and s.perturb(np.ones((2, 2)), np.ones((2, 2))) is None
    np.testing.assert_allclose(s.model._axes[0], [0.0, -1.0, 0.0])  # a camera world's up is -y
    Ts = [inner.step()["T_true"] for _ in range(4)]
    inner.frames_seen = 0
    assert s.frames_seen == 0
    ref = DriftModel(seed=0, up=(0.0, -1.0, 0.0), scale_per_m=0.2).run(np.stack(Ts))
    mine = [s.model.step(T) for T in Ts]
    np.testing.assert_array_equal(np.stack([m[0] for m in mine]), ref[0])
    s.reset()
    s.reset()
    assert inner.resets == 2 and s.resets == 2
    assert s.model.seed == 2000 and s.model.scale_per_m == 0.2 and s.model.up == (0.0, -1.0, 0.0)
    s7 = DriftedSession(_FakeSession(), seed=7, up=(0.0, 0.0, 1.0))
    assert s7.model.seed == 7 and s7.model.up == (0.0, 0.0, 1.0)
    s7.reset()
    assert s7.model.seed == 1007


def test_drifted_session_step_scales_depth_and_points_and_drifts_the_pose():
    import torch

    from ros2_stream4d.mapping.backend.drift import DriftedSession
    from ros2_stream4d.mapping.conventions import extrinsic_to_pose, unproject_depth

    inner = _FakeSession()
    s = DriftedSession(inner, scale_per_m=0.3, yaw_deg_per_m=5.0, scale_walk=0.0, yaw_walk_deg=0.0)
    ref = DriftModel(scale_per_m=0.3, yaw_deg_per_m=5.0, scale_walk=0.0, yaw_walk_deg=0.0, up=(0.0, -1.0, 0.0))
    for i in range(3):
        out = s.step(image=f"img{i}", stamp_ns=i)
        T_ref, sc = ref.step(out["T_true"])
        assert inner.images[-1] == f"img{i}" and inner.calls[-1] == (i, None)
        assert out["extrinsic"].shape == (1, 3, 4) and out["extrinsic"].dtype == torch.float32
        assert out["world_points"].dtype == torch.float32 and out["world_points"].shape == (1, 4, 5, 3)
        T = extrinsic_to_pose(out["extrinsic"][0].double().numpy())
        np.testing.assert_allclose(T, T_ref, atol=1e-5)
        depth = out["depth"][0, ..., 0].double().numpy()
        np.testing.assert_allclose(depth[1:, 1:], 2.0 * sc, rtol=1e-6)
        pts = out["world_points"][0].double().numpy()
        np.testing.assert_array_equal(pts[0, 0], [0.0, 0.0, 0.0])  # invalid depth: a zero point
        np.testing.assert_allclose(pts[1:, 1:], unproject_depth(depth, inner.K, T_ref)[1:, 1:], atol=1e-5)
        np.testing.assert_allclose(out["depth_conf"][0].numpy(), 3.0)
        np.testing.assert_allclose(out["intrinsic"][0].numpy(), inner.K)
        assert out["pose_enc"].shape[0] == 1
    assert sc != 1.0, "the scale drifted"


def test_a_perturbing_subclass_replaces_depth_and_confidence():
    import torch

    from ros2_stream4d.mapping.backend.drift import DriftedSession
    from ros2_stream4d.mapping.conventions import extrinsic_to_pose, unproject_depth

    seen = []

    class Noisy(DriftedSession):
        def perturb(self, depth, conf):
            seen.append((depth.copy(), conf.copy(), depth.dtype, conf.dtype))
            d = np.full_like(depth, 0.8)
            d[1, 1] = 0.0
            return d, conf * 2.0

    inner = _FakeSession()
    s = Noisy(inner, scale_per_m=0.3, scale_walk=0.0, yaw_walk_deg=0.0)
    s.step(stamp_ns=1, mapping="m")
    assert inner.calls[-1] == (1, "m")
    out = s.step()
    d_in, c_in, d_dtype, c_dtype = seen[-1]
    assert d_dtype == np.float64 and c_dtype == np.float64
    np.testing.assert_allclose(d_in[1:, 1:], 2.0 * s.model.scale, rtol=1e-6)
    np.testing.assert_array_equal(c_in, 3.0)
    depth = out["depth"][0, ..., 0].numpy()
    assert out["depth"].dtype == torch.float32 and out["depth"].shape == (1, 4, 5, 1)
    assert depth[1, 1] == 0.0 and depth[2, 2] == pytest.approx(0.8)
    for key in ("depth_conf", "world_points_conf"):
        np.testing.assert_allclose(out[key][0].numpy(), 6.0)
    T = extrinsic_to_pose(out["extrinsic"][0].double().numpy())
    pts = out["world_points"][0].double().numpy()
    np.testing.assert_array_equal(pts[1, 1], [0.0, 0.0, 0.0])
    expect = unproject_depth(depth.astype(np.float64), inner.K, T)
    np.testing.assert_allclose(pts[2, 2], expect[2, 2], atol=1e-5)  # depth 0.8 < 1 is a valid depth


def _noisy_pair(n=40, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    S = S3.sim3(rotation_from_vector([0.2, -0.4, 0.1]), [0.5, -1.0, 2.0], 1.7)
    src = rng.uniform(-2, 2, (n, 3))
    dst = S3.apply(S, src) + noise * rng.standard_normal((n, 3))
    return S, src, dst


def test_robust_sim3_uses_the_weights_and_clips_negative_ones():
    _, src, dst = _noisy_pair()
    w = np.ones(len(src))
    w[:10] = 50.0  # a few heavy points pull the fit towards them
    fit = S3.robust_sim3(src, dst, w, threshold=10.0)
    assert fit.inliers.all() and fit.inlier_ratio == 1.0
    np.testing.assert_allclose(fit.S, S3.umeyama(src, dst, w), atol=1e-12)
    assert not np.allclose(fit.S, S3.umeyama(src, dst), atol=1e-6)
    r = np.linalg.norm(S3.apply(fit.S, src) - dst, axis=1)
    assert fit.rmse == pytest.approx(np.sqrt((w * r ** 2).sum() / w.sum()), rel=1e-12)
    neg = w.copy()
    neg[10:15] = -3.0  # negative weights count as 0
    zero = w.copy()
    zero[10:15] = 0.0
    a, b = S3.robust_sim3(src, dst, neg, threshold=10.0), S3.robust_sim3(src, dst, zero, threshold=10.0)
    np.testing.assert_array_equal(a.S, b.S)
    assert a.rmse == b.rmse
    assert S3.Sim3Fit(np.eye(4), np.zeros(0, bool), 0.0).inlier_ratio == 0.0


def _expected_alignment(points_dst, points_src, conf_dst, conf_src, centres_dst, centres_src, max_points, threshold):
    """align_point_maps as its docstring states it, written out."""
    a, b = np.asarray(points_dst, np.float64).reshape(-1, 3), np.asarray(points_src, np.float64).reshape(-1, 3)
    ca = np.ones(len(a)) if conf_dst is None else np.asarray(conf_dst, np.float64).reshape(-1)
    cb = np.ones(len(b)) if conf_src is None else np.asarray(conf_src, np.float64).reshape(-1)
    ok = [bool(np.isfinite(a[i]).all() and np.isfinite(b[i]).all() and np.any(a[i] != 0) and np.any(b[i] != 0)
               and np.isfinite(ca[i]) and np.isfinite(cb[i]) and ca[i] > 0 and cb[i] > 0) for i in range(len(a))]
    idx = np.flatnonzero(ok)
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    src, dst, w = b[idx], a[idx], np.sqrt(ca[idx] * cb[idx])
    if centres_dst is not None and centres_src is not None:
        wc = float(np.median(w)) if len(w) else 1.0
        src, dst = np.vstack([src, centres_src]), np.vstack([dst, centres_dst])
        w = np.r_[w, np.full(len(centres_src), wc)]
    return S3.robust_sim3(src, dst, w, threshold=threshold, seed=0, scale="symmetric"), len(idx)


def test_align_point_maps_selects_weights_and_subsamples_as_documented():
    S, src, dst = _noisy_pair(n=40, seed=1, noise=0.02)
    src, dst = src.reshape(2, 4, 5, 3).copy(), dst.reshape(2, 4, 5, 3).copy()
    rng = np.random.default_rng(2)
    conf_src = rng.uniform(0.2, 3.0, (2, 4, 5))  # some below 1: still valid
    conf_dst = rng.uniform(0.2, 3.0, (2, 4, 5))
    dst[0, 0, 0] = np.nan  # invalid point in dst
    src[0, 0, 1] = 0.0  # a zero point (no depth) in src
    dst[0, 0, 2] = 0.0
    src[0, 0, 3, 0] = np.inf
    conf_dst[0, 1, 0] = 0.0
    conf_src[0, 1, 1] = np.nan
    conf_src[0, 1, 2] = -1.0
    conf_dst[0, 1, 3] = np.inf
    conf_src[0, 1, 4] = 0.0
    src[1, 0, 0] = [0.1, -0.1, 0.05]  # small but valid coordinates (|x| + |y| + |z| < 1)
    dst[1, 0, 0] = S3.apply(S, src[1, 0, 0][None])[0]
    centres_src = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    centres_dst = S3.apply(S, centres_src)
    for cd, cs, ctd, cts, mp in ((conf_dst, conf_src, centres_dst, centres_src, 20000),
                                 (None, conf_src, None, None, 20000), (conf_dst, None, centres_dst, None, 20000),
                                 (conf_dst, conf_src, centres_dst, centres_src, 7), (None, None, None, centres_src, 9)):
        fit = S3.align_point_maps(dst, src, cd, cs, ctd, cts, max_points=mp, threshold=0.5)
        expect, used = _expected_alignment(dst, src, cd, cs, ctd, cts, mp, 0.5)
        assert len(fit.inliers) == len(expect.inliers)
        np.testing.assert_array_equal(fit.inliers, expect.inliers)
        np.testing.assert_allclose(fit.S, expect.S, atol=1e-12)
        assert fit.rmse == pytest.approx(expect.rmse, rel=1e-9)
    assert used == 9
    tight = S3.align_point_maps(dst, src, conf_dst, conf_src, threshold=0.02)
    expect, _ = _expected_alignment(dst, src, conf_dst, conf_src, None, None, 20000, 0.02)
    default, _ = _expected_alignment(dst, src, conf_dst, conf_src, None, None, 20000, None)
    np.testing.assert_array_equal(tight.inliers, expect.inliers)
    assert tight.inliers.sum() != default.inliers.sum(), "the threshold given is the one used"
    # no valid pixel at all: the centres alone, weighted 1
    fit = S3.align_point_maps(np.full((1, 2, 3), np.nan), np.ones((1, 2, 3)), centres_dst=centres_dst,
                              centres_src=centres_src, threshold=0.5)
    assert len(fit.inliers) == 3
    np.testing.assert_allclose(fit.S, S, atol=1e-9)
    with pytest.raises(ValueError, match=r"^point maps differ in shape: \(6, 3\) vs \(3, 3\)$"):
        S3.align_point_maps(np.ones((2, 3, 3)), np.ones((1, 3, 3)))


def test_robust_sim3_needs_three_points_and_can_keep_the_scale_fixed():
    _, src, dst = _noisy_pair(n=3, noise=0.0)
    with pytest.raises(ValueError, match="^robust_sim3 needs >= 3 correspondences$"):
        S3.robust_sim3(src[:2], dst[:2])
    fit = S3.robust_sim3(src, dst, threshold=1e-6)
    assert fit.inliers.tolist() == [True, True, True] and S3.scale_of(fit.S) == pytest.approx(1.7)
    R = rotation_from_vector([0.3, 0.2, -0.1])
    _, src, _ = _noisy_pair(n=30, seed=4)
    dst = 1.7 * src @ R.T + [1.0, 2.0, 3.0]
    dst[:5] += 30.0  # outliers
    rigid = S3.robust_sim3(src, dst, threshold=8.0, with_scale=False)
    assert S3.scale_of(rigid.S) == pytest.approx(1.0, abs=1e-12)
    assert rigid.inliers.tolist() == [False] * 5 + [True] * 25
    np.testing.assert_allclose(S3.decompose(rigid.S)[0], R, atol=1e-9)
    np.testing.assert_allclose(rigid.S, S3.umeyama(src[5:], dst[5:], with_scale=False), atol=1e-12)
    # with the default threshold: first fit and consensus are rigid as well
    assert S3.scale_of(S3.robust_sim3(src, dst, with_scale=False).S) == pytest.approx(1.0, abs=1e-12)


def test_robust_sim3_default_threshold_is_three_median_residuals_at_least_one_percent_of_the_spread():
    S, src, dst = _noisy_pair(n=40, seed=5, noise=0.0)
    dst = dst + [20.0, -10.0, 5.0]  # far from the origin: the spread is about the centroid
    spread = float(np.sqrt(((dst - dst.mean(0)) ** 2).sum(1).mean()))
    probe = dst.copy()
    probe[0, 0] += 0.5 * 0.01 * spread  # inside the 1 % floor
    probe[1, 0] += 1.5 * 0.01 * spread  # outside it
    fit = S3.robust_sim3(src, probe)
    assert fit.inliers[0] and not fit.inliers[1] and fit.inliers[2:].all()
    # noisy: the threshold is 3 x the median residual of a first (weighted) all-points fit
    _, src, dst = _noisy_pair(n=60, seed=6, noise=0.05)
    dst[:6] += [1.0, -1.0, 0.5]  # outliers
    dst[6:14, 0] += np.linspace(0.1, 0.4, 8)  # moderate errors, around 3 median residuals
    w = np.linspace(0.5, 2.0, 60)
    r0 = np.linalg.norm(S3.apply(S3.umeyama(src, dst, w), src) - dst, axis=1)
    thr = max(3.0 * float(np.median(r0)), 0.01 * float(np.sqrt(((dst - dst.mean(0)) ** 2).sum(1).mean())))
    fit = S3.robust_sim3(src, dst, w)
    r = np.linalg.norm(S3.apply(fit.S, src) - dst, axis=1)
    np.testing.assert_array_equal(fit.inliers, r < thr)
    assert not fit.inliers[:6].any()
    assert np.any((r >= thr) & (r < 4.0 / 3.0 * thr)), "the data tells 3 from 4 median residuals"


def test_umeyama_never_returns_a_reflection_or_a_zero_scale():
    rng = np.random.default_rng(8)
    src = rng.uniform(-1, 1, (20, 3))
    mirrored = src * [1.0, 1.0, -1.0]  # no rotation maps src onto its mirror image
    S = S3.umeyama(src, mirrored)
    R, _, s = S3.decompose(S)
    assert np.linalg.det(R) == pytest.approx(1.0) and np.allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert 0 < s < 1.0, "a proper rotation explains the mirror image only in part"
    with pytest.raises(ValueError, match="^degenerate point set for umeyama$"):
        S3.umeyama(src, np.ones((20, 3)))  # every point onto one: scale 0
    small = S3.umeyama(src[:4], 2.0 * src[:4], w=np.full(4, 0.1))  # a total weight below 1 is fine
    assert S3.scale_of(small) == pytest.approx(2.0)


def _corner(n=300, seed=9):
    """Points on three perpendicular planes (a room corner): ICP is well constrained on them."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 2, (n, 2))
    z = np.zeros((n, 1))
    return np.vstack([np.hstack([u, z]), np.hstack([u[:, :1], z, u[:, 1:]]), np.hstack([z, u])])


def test_icp_refine_point_to_point_estimates_the_scale_and_point_to_plane_keeps_it():
    dst = _corner()
    S_true = S3.sim3(rotation_from_vector([0.02, -0.01, 0.03]), [0.05, -0.03, 0.02], 1.05)
    src = S3.apply(S3.inverse(S_true), dst)
    S_init = S3.sim3(S3.decompose(S_true)[0], [0.07, -0.02, 0.0], 1.03)
    S, fitness, rmse = S3.icp_refine(src, dst, S_init, max_distance=0.2)
    assert S3.scale_of(S) == pytest.approx(1.05, abs=1e-4), "point-to-point with scale by default"
    np.testing.assert_allclose(S, S_true, atol=1e-3)
    assert fitness == pytest.approx(1.0) and rmse < 1e-3
    rigid, _, _ = S3.icp_refine(src, dst, S_init, max_distance=0.2, with_scale=False)
    assert S3.scale_of(rigid) == pytest.approx(1.03, abs=1e-9)
    plane, fit_p, _ = S3.icp_refine(src, dst, S_init, max_distance=0.2, point_to_plane=True)
    assert S3.scale_of(plane) == pytest.approx(1.03, abs=1e-9), "point-to-plane keeps S_init's scale"
    assert fit_p > 0.9
    one, _, _ = S3.icp_refine(src, dst, S_init, max_distance=0.2, iterations=1)
    assert np.abs(one - S).max() > 1e-4, "one iteration stops short of the converged fit"


def test_tilt_walk_turns_about_the_two_horizontal_axes_and_accumulates():
    steps = [1.0, 4.0]
    T = _poses_along_x(steps)
    up = (0.6, 0.0, 0.8)
    m = DriftModel(scale_per_m=0.0, yaw_deg_per_m=0.0, scale_walk=0.0, yaw_walk_deg=0.0, tilt_walk_deg=2.0, seed=4,
                   up=up)
    up_, h1, h2 = m._axes
    for h in (h1, h2):
        assert np.linalg.norm(h) == pytest.approx(1.0) and abs(np.dot(h, up_)) < 1e-12
    odo, _ = m.run(T)
    rng = np.random.default_rng(4)
    tilt = np.zeros(2)
    for k, st in enumerate(steps, start=1):
        rng.standard_normal(2)  # scale and yaw walks (0 here)
        tilt = tilt + np.radians(2.0) * np.sqrt(st) * rng.standard_normal(2)
        R_err = rotation_from_vector(h1 * tilt[0] + h2 * tilt[1])
        np.testing.assert_allclose(odo[k][:3, :3], R_err @ T[k][:3, :3], atol=1e-12)
    np.testing.assert_allclose(m.tilt, tilt, rtol=1e-12)


def test_position_walk_and_jitter_follow_the_seeded_draws():
    steps = [4.0, 1.0, 9.0]
    T = _poses_along_x(steps)
    quiet = dict(scale_per_m=0.0, yaw_deg_per_m=0.0, scale_walk=0.0, yaw_walk_deg=0.0, seed=2)
    walk, _ = DriftModel(trans_walk=0.01, **quiet).run(T)
    jit, _ = DriftModel(jitter_m=0.02, **quiet).run(T)
    rw, rj = np.random.default_rng(2), np.random.default_rng(2)
    acc = np.zeros(3)
    for k, st in enumerate(steps, start=1):
        rw.standard_normal(2)
        acc = acc + 0.01 * np.sqrt(st) * rw.standard_normal(3)
        np.testing.assert_allclose(walk[k][:3, 3], T[k][:3, 3] + acc, atol=1e-12)
        rj.standard_normal(2)
        np.testing.assert_allclose(jit[k][:3, 3], T[k][:3, 3] + 0.02 * rj.standard_normal(3), atol=1e-12)


def test_robust_sim3_with_small_or_few_weights_and_tiny_coordinates():
    S, src, dst = _noisy_pair(n=30, seed=10, noise=0.0)
    dst[:3] += 5.0  # outliers at the first three indices
    small = np.full(30, 0.01)  # every consensus weighs less than 1
    fit = S3.robust_sim3(src, dst, small, threshold=1e-3)
    np.testing.assert_allclose(fit.S, S, atol=1e-9)
    assert fit.inliers.tolist() == [False] * 3 + [True] * 27
    noisy = dst + 0.01 * np.random.default_rng(1).standard_normal(dst.shape)
    fit = S3.robust_sim3(src, noisy, small, threshold=0.1)
    r = np.linalg.norm(S3.apply(fit.S, src) - noisy, axis=1)[fit.inliers]
    assert fit.rmse == pytest.approx(np.sqrt((0.01 * r ** 2).sum() / (0.01 * len(r))), rel=1e-12)
    tiny = S3.robust_sim3(src * 1e-2, S3.apply(S, src * 1e-2), threshold=1e-6)  # sample triangles far below 1
    assert tiny.inliers.all()


def test_robust_sim3_without_consensus_and_without_refinement():
    line = np.outer(np.arange(10.0), [1.0, 2.0, 3.0])  # every sample is collinear
    with pytest.raises(ValueError, match=r"^no Sim\(3\) consensus$"):
        S3.robust_sim3(line, line + 1.0, threshold=0.1)
    _, src, _ = _noisy_pair(n=40, seed=11)
    rng = np.random.default_rng(12)
    dst = src @ rotation_from_vector([0.1, 0.2, 0.3]).T + [1.0, 0.0, -1.0] + 0.02 * rng.standard_normal((40, 3))
    w = np.linspace(0.5, 3.0, 40)
    fit = S3.robust_sim3(src, dst, w, threshold=0.03, refine_rounds=0, with_scale=False)
    np.testing.assert_allclose(fit.S, S3.umeyama(src[fit.inliers], dst[fit.inliers], w[fit.inliers],
                                                 with_scale=False), atol=1e-12)
    refined = S3.robust_sim3(src, dst, w, threshold=0.03)
    assert refined.inliers.dtype == bool and refined.inliers.shape == (40,)
    r = np.linalg.norm(S3.apply(refined.S, src) - dst, axis=1)
    np.testing.assert_array_equal(refined.inliers, r < 0.03)



def test_robust_sim3_refuses_fewer_than_three_positive_weights_and_samples_by_weight():
    S, src, dst = _noisy_pair(n=100, seed=13, noise=0.0)
    for k in (0, 1, 2):  # two weighted points leave a rotation about their line free: refused, not guessed
        w = np.zeros(100)
        w[:k] = 1.0
        with pytest.raises(ValueError, match=rf"^robust_sim3 needs >= 3 correspondences with a positive weight \({k}\)$"):
            S3.robust_sim3(src, dst, w, threshold=0.01)
    # three weighted inliers among 97 unweighted outliers: only sampling by weight draws them (uniform draws almost
    # never do in 200 tries); their fit is exact
    bad = dst.copy()
    bad[3:] += np.random.default_rng(14).uniform(2.0, 4.0, (97, 3))
    w = np.r_[np.full(3, 0.1), np.zeros(97)]
    fit = S3.robust_sim3(src, bad, w, threshold=0.01)
    np.testing.assert_allclose(fit.S, S, atol=1e-9)
    assert fit.inliers[:3].all() and fit.rmse == pytest.approx(0.0, abs=1e-9)
    # a refinement round that would keep fewer than 3 weighted points stops, and the fit of the round before stands
    src3 = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    dst3 = np.array([[0.0, 0.0, 0.0], [1.3, 0.0, 0.0], [0.0, 0.8, 0.0]])
    fit = S3.robust_sim3(src3, dst3, [1.0, 100.0, 100.0], threshold=0.18)
    assert isinstance(fit, S3.Sim3Fit) and fit.inliers.sum() == 3
    np.testing.assert_allclose(fit.S, S3.umeyama(src3, dst3, [1.0, 100.0, 100.0]), atol=1e-12)

# ---------------------------------------------------------------------------------------------------- service
def _keyframe_map(n, start=0):
    from map_helpers import small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    m = KeyframeMap(small_config(tsdf=False, occupancy=False, keyframe_max_frames=1))
    _add_frames(m, n, start)
    return m


def _add_frames(m, n, start=0):
    from ros2_stream4d.mapping.keyframe_map import MapFrame

    h, w = 6, 8
    K = np.array([[5.0, 0, 4.0], [0, 6.0, 3.0], [0, 0, 1]])
    for i in range(start, start + n):
        T = S3.sim3(rotation_from_vector([0.0, 0.0, 0.3 * i]), [2.0 * i, 0.5 * i, 0.1 * i])
        depth = np.full((h, w), 2.0 + i, np.float32)
        depth[0, 0] = 1.5
        rgb = np.full((h, w, 3), 10 * i + 5, np.uint8)
        rgb[0, 1] = (1, 2, 3)
        m.integrate(MapFrame(1000 + i, T, depth, rgb, K, None))


class _Pipeline:
    def __init__(self, kmap, last=None):
        self.map, self.last, self.updates = kmap, last, []
        self.map_correction = self.map_integration = None

    def update_keyframe_poses(self, poses):
        self.updates.append(poses)


def _stopped_backend(**kw):
    from ros2_stream4d.mapping.backend.service import BackendConfig, LongRunBackend

    b = LongRunBackend(BackendConfig(**kw))
    b.close()  # the worker has stopped: the queue keeps what observe() hands it
    return b


def test_backend_observe_hands_each_new_keyframe_once_in_odometry():
    b = _stopped_backend()
    p = _Pipeline(_keyframe_map(3))
    assert b.observe(p) == 3 and b.observe(p) == 0
    items = [b._queue.get_nowait() for _ in range(3)]
    assert b._queue.empty()
    for (view, seg), kf in zip(items, p.map.keyframes):
        frames = p.map.frames_of(kf)
        assert view.id == kf.id and seg == kf.segment == 0
        np.testing.assert_array_equal(view.rgb, frames.rgb[0])
        assert view.rgb is not frames.rgb[0] and view.depth.dtype == np.float32
        np.testing.assert_array_equal(view.depth, frames.depth[0].astype(np.float32))
        np.testing.assert_array_equal(view.K, frames.K[0])
        np.testing.assert_allclose(view.S_odom_kf, kf.T_map_kf, atol=1e-12)  # no correction yet
    assert [v.id for v, _ in items] == [0, 1, 2]
    # under a correction M (Sim(3)) the keyframe goes to the graph in odometry: M^-1 T_map_kf; M is remembered per
    # keyframe
    M = S3.sim3(rotation_from_vector([0.0, 0.2, 0.0]), [1.0, -2.0, 0.5], s=1.2)
    M[0, 1] += 1e-6  # rounding (float32 poses): the odometry handed back must still be exact, or it feeds back
    b._M = M.copy()
    _add_frames(p.map, 1, start=3)
    assert b.observe(p) == 1
    view, _ = b._queue.get_nowait()
    kf = p.map.keyframes[-1]
    np.testing.assert_allclose(view.S_odom_kf, np.linalg.inv(M) @ kf.T_map_kf, atol=1e-12)
    np.testing.assert_array_equal(b._M_at[kf.id], M)
    b._M[0, 3] = 99.0
    assert b._M_at[kf.id][0, 3] == 1.0, "a copy of the correction in force"
    np.testing.assert_array_equal(b._M_at[0], np.eye(4))


def test_backend_queue_drops_the_oldest_keyframe_when_full():
    b = _stopped_backend(max_queue=2)
    p = _Pipeline(_keyframe_map(3))
    assert b.observe(p) == 3
    assert b.stats["dropped_keyframes"] == 1 and b._queue.qsize() == 2
    assert [b._queue.get_nowait()[0].id for _ in range(2)] == [1, 2]
    assert not b._idle.is_set()


class _Graph:
    def __init__(self, C, solution=None, order=(0,)):
        self.C, self.solution, self.order = C, solution or {}, list(order)

    def odom_correction(self):
        return self.C


def test_backend_apply_writes_the_solution_and_moves_the_other_keyframes():
    b = _stopped_backend()
    kmap = _keyframe_map(3)
    T_cam = S3.sim3(rotation_from_vector([0.1, 0.4, 0.0]), [3.0, 1.0, -1.0])

    class Last:
        T_map_cam = T_cam

    p = _Pipeline(kmap, Last())
    assert b.apply(p) is False and p.updates == [] and p.map_correction is None and p.map_integration is None
    C = S3.sim3(rotation_from_vector([0.0, 0.0, 0.5]), [0.3, -0.7, 0.2], s=1.3)
    S0 = S3.sim3(rotation_from_vector([0.2, 0.0, 0.0]), [9.0, 8.0, 7.0], s=0.9)
    b.graph = _Graph(C, {0: S0})
    Ma = S3.sim3(rotation_from_vector([0.0, 0.3, 0.0]), [0.5, 0.5, 0.0])
    b._M_at = {1: Ma.copy()}
    b._result = object()
    assert b.apply(p) is True
    M_new = S3.to_se3(C @ T_cam) @ np.linalg.inv(T_cam)
    (poses,) = p.updates
    assert set(poses) == {0, 1}  # keyframe 2 was never observed: it is left alone
    np.testing.assert_allclose(poses[0], S0)
    # a keyframe not in the graph yet moves with the Sim(3) correction (scale included), as frames now enter the map
    np.testing.assert_allclose(poses[1], C @ np.linalg.inv(Ma) @ kmap.keyframes[1].T_map_kf, atol=1e-12)
    np.testing.assert_allclose(b._M_at[1], C)
    np.testing.assert_allclose(p.map_integration, C)
    # map -> odom is rigid: it puts the last camera where the correction does
    np.testing.assert_allclose(p.map_correction, M_new, atol=1e-12)
    np.testing.assert_allclose(p.map_correction @ T_cam, S3.to_se3(C @ T_cam), atol=1e-12)
    np.testing.assert_allclose(b._M, C)
    assert b.stats["corrections_applied"] == 1 and b._result is None
    assert b.apply(p) is False and b.stats["corrections_applied"] == 1
    # without a last frame map -> odom is the correction's rigid part (the camera at odom's origin)
    q = _Pipeline(_keyframe_map(1))
    b._result = object()
    assert b.apply(q) is True
    np.testing.assert_allclose(q.map_correction, S3.to_se3(C), atol=1e-12)
    np.testing.assert_allclose(q.map_integration, C)


def test_backend_map_from_odom_is_the_rigid_correction_at_the_camera():
    b = _stopped_backend()
    T = S3.sim3(rotation_from_vector([0.3, 0.1, -0.2]), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(b.map_from_odom(T), np.eye(4), atol=1e-12)  # no graph yet
    np.testing.assert_allclose(b.odom_correction(), np.eye(4))
    C = S3.sim3(rotation_from_vector([0.0, 0.0, 0.7]), [0.5, -1.0, 0.25], s=2.0)
    b.graph = _Graph(C)
    M = b.map_from_odom(T.tolist())
    np.testing.assert_allclose(M @ T, S3.to_se3(C @ T), atol=1e-12)
    np.testing.assert_allclose(M[:3, :3] @ M[:3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(b.odom_correction(), C)


def test_backend_diagnostics_report_the_correction_and_the_times():
    b = _stopped_backend()
    d = b.diagnostics()
    assert d["correction translation [m]"] == 0.0 and d["correction rotation [deg]"] == pytest.approx(0.0)
    assert d["correction scale"] == pytest.approx(1.0) and d["time per keyframe [ms] median"] == 0
    assert d["time per optimisation [ms] median"] == 0 and d["keyframes"] == 0 and d["queue"] == 0
    b.graph = _Graph(S3.sim3(rotation_from_vector([0.0, 0.0, np.deg2rad(30.0)]), [3.0, 4.0, 0.0], s=1.5))
    b.keyframe_s = [0.001, 0.004, 0.002]
    b.optimisation_s = [0.5, 0.25]
    b.detector.stats.update(candidates=7, accepted=3, rejected=2)
    b.stats["keyframes"] = 11
    b._queue.put(None)
    d = b.diagnostics()
    assert d["correction translation [m]"] == pytest.approx(5.0)
    assert d["correction rotation [deg]"] == pytest.approx(30.0) and d["correction scale"] == pytest.approx(1.5)
    assert d["time per keyframe [ms] median"] == pytest.approx(2.0)
    assert d["time per optimisation [ms] median"] == pytest.approx(375.0)
    assert (d["loop candidates"], d["loops accepted"], d["loops rejected"]) == (7, 3, 2)
    assert d["keyframes"] == 11 and d["queue"] == 1 and d["corrections_applied"] == 0
    b.graph.order = []
    assert b.diagnostics()["correction translation [m]"] == 0.0


def test_a_dead_optimiser_process_is_a_dropped_optimisation():
    b = _stopped_backend()
    b._pool = object()
    res = b._pool_died(RuntimeError("killed by signal 9"))
    assert b._pool is None and res.ok is False
    assert "the optimiser process died (killed by signal 9)" in res.reason and "new one" in res.reason


def test_backend_keyframes_join_by_odometry_within_and_by_a_weak_segment_edge_across_segments():
    from types import SimpleNamespace

    from ros2_stream4d.mapping.backend.loops import KeyframeView
    from ros2_stream4d.mapping.backend.posegraph import LOOP, ODOMETRY, SEGMENT

    b = _stopped_backend(segment_sigma_rot=0.11, segment_sigma_trans=0.22, segment_sigma_scale=0.33)
    loop = S3.sim3(rotation_from_vector([0.0, 0.1, 0.0]), [0.2, 0.0, 0.1])

    class Detector:
        def __init__(self):
            self.added, self.results = [], []

        def add(self, view):
            self.added.append(view.id)

        def detect(self, gate=None, near=()):
            out, self.results = self.results, []
            return out

    b.detector = Detector()
    S = {k: S3.sim3(rotation_from_vector([0.0, 0.0, 0.2 * k]), [1.0 * k, 0.3 * k, 0.0], s=1.0 + 0.1 * k)
         for k in range(4)}
    view = {k: KeyframeView(k, np.zeros((2, 2, 3), np.uint8), np.ones((2, 2)), np.eye(3), S[k]) for k in range(4)}
    b._keyframe(view[0], 0)
    b._keyframe(view[1], 0)
    assert b._pending is False
    b.detector.results = [SimpleNamespace(i=0, j=2, S_i_j=loop, accepted=True, held=False),
                          SimpleNamespace(i=1, j=2, S_i_j=np.eye(4), accepted=False, held=False)]
    b._keyframe(view[2], 1)  # a new stream: a segment edge, not an odometry one
    assert b._pending is True and b._last_segment == 1
    b._keyframe(view[3], 1)
    edges = {(e.i, e.j, e.kind): e for e in b.graph.edges}
    assert set(edges) == {(0, 1, ODOMETRY), (1, 2, SEGMENT), (0, 2, LOOP), (2, 3, ODOMETRY)}
    seg = edges[(1, 2, SEGMENT)]
    np.testing.assert_allclose(seg.S_i_j, S3.inverse(S[1]) @ S[2], atol=1e-12)
    assert (seg.sigma_rot, seg.sigma_trans, seg.sigma_scale, seg.robust) == (0.11, 0.22, 0.33, False)
    np.testing.assert_allclose(edges[(0, 2, LOOP)].S_i_j, loop)
    assert edges[(0, 2, LOOP)].robust is True
    assert b.detector.added == [0, 1, 2, 3] and b.stats["keyframes"] == 4
    assert len(b.keyframe_s) == 4 and all(0 <= t < 5.0 for t in b.keyframe_s)


def test_a_broken_optimiser_pool_drops_that_optimisation_and_says_why():
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    b = _stopped_backend()
    f = Future()
    f.set_exception(BrokenProcessPool("child gone"))
    b._future, b._pool = f, object()
    b._optimise_step()
    assert b._future is None and b._pool is None
    assert b.stats["optimisations_dropped"] == 1 and b.stats["optimisations_ok"] == 0
    assert "the optimiser process died (child gone)" in b.stats["last_drop_reason"]


class _StaticSession:
    """Sees a fronto-parallel wall from a camera that does not move (exact outputs); records every call."""

    window, anchors = None, 1

    def __init__(self):
        self.calls, self.resets, self.frames_seen = [], 0, 0

    def reset(self):
        self.resets += 1

    def stats(self):
        return None

    def shrunk(self, window):
        return _StaticSession() if window > 1 else None

    def step(self, image, stamp_ns=None, mapping=None):
        import torch

        self.calls.append((float(image.flatten()[0]), stamp_ns, mapping))
        h, w = 12, 16
        K = np.array([[10.0, 0, 8.0], [0, 10.0, 6.0], [0, 0, 1]])
        return {"depth": torch.full((1, h, w, 1), 2.0), "depth_conf": torch.full((1, h, w), 3.0),
                "extrinsic": torch.tensor(np.eye(4)[:3])[None], "intrinsic": torch.tensor(K)[None],
                "world_points": torch.tensor(np.zeros((h, w, 3)), dtype=torch.float32)[None]}


def test_segmented_session_refeeds_the_recent_frames_with_their_stamps_and_mappings():
    import torch

    from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession

    inner = _StaticSession()
    events = []
    s = SegmentedSession(inner, ReanchorPolicy(max_segment_frames=3, min_segment_frames=3, overlap_frames=2),
                         on_segment=events.append)
    assert s.last_overlap == 1.0 and s.segment == 0
    maps = [object() for _ in range(3)]
    for i in range(3):
        s.step(torch.full((1, 3, 12, 16), float(i)), stamp_ns=100 + i, mapping=maps[i])
    assert inner.resets == 1 and s.segment == 1 and len(events) == 1
    assert inner.calls == [(0.0, 100, maps[0]), (1.0, 101, maps[1]), (2.0, 102, maps[2]),
                           (1.0, 101, maps[1]), (2.0, 102, maps[2])]  # the last two frames again, as they were
    s.reset()
    assert s.last_overlap == 1.0 and s.segment == 0 and inner.resets == 2
    small = s.shrunk(4)
    assert isinstance(small, SegmentedSession) and small.inner is not inner
    assert small.on_segment == events.append
    assert small.policy is s.policy
    assert s.shrunk(1) is None


def test_an_in_process_optimisation_is_taken_in_and_its_outcome_counted():
    from ros2_stream4d.mapping.backend.posegraph import LOOP, OptimisationResult

    class Logger:
        def __init__(self):
            self.lines = []

        def warning(self, msg):
            self.lines.append(msg)

    b = _stopped_backend(optimise_in_subprocess=False)
    b.logger = Logger()
    S = {k: S3.sim3(rotation_from_vector([0.0, 0.1 * k, 0.0]), [1.0 * k, 0.0, 0.2 * k]) for k in range(3)}
    for k in range(3):
        b.graph.add_keyframe(k, S[k], 0)
    b.graph.add_edge(0, 2, S3.inverse(S[0]) @ S[2], LOOP)  # a loop that agrees with the odometry exactly
    b._pending = True
    b._optimise_step()
    assert b._pending is False and b._future is None and b._pool is None
    assert len(b.optimisation_s) == 1 and b.stats["optimisations_dropped"] == 1 and b.stats["optimisations_ok"] == 0
    reason = b.stats["last_drop_reason"]
    assert "agree" in reason and b.logger.lines == [f"back-end: optimisation dropped: {reason}"]
    assert b._result is None
    b._optimise_step()  # nothing pending: nothing runs
    assert len(b.optimisation_s) == 1
    # accepted results: counted, their rejected edges summed, the newest kept for apply()
    poses = {k: v.copy() for k, v in S.items()}
    r1 = OptimisationResult(True, poses=poses, rejected_edges=[(0, 2, LOOP)], seconds=0.25)
    r2 = OptimisationResult(True, poses=poses, rejected_edges=[(0, 2, LOOP)], seconds=0.5)
    b._finish(r1)
    b._finish(r2)
    assert b.stats["optimisations_ok"] == 2 and b.stats["edges_rejected_by_graph"] == 2 and b._result is r2
    assert b.optimisation_s[1:] == [0.25, 0.5]
    assert len(b.logger.lines) == 1


# ---------------------------------------------------------------------------------------------------- loops
def test_classical_descriptor_layout_thumbnail_then_gridded_orientations():
    from ros2_stream4d.mapping.backend.loops import classical_descriptor

    g = np.full((48, 64), 40, np.uint8)
    g[38:46, 52:60] = 220  # a bright square inside the bottom-right cell of the 4 x 4 grid
    d = classical_descriptor(g)
    assert d.dtype == np.float32 and d.shape == (16 * 12 + 4 * 4 * 8,)
    assert abs(float(np.linalg.norm(d)) - 1.0) < 1e-5
    tiny = d[:192].reshape(12, 16)
    r, c = np.unravel_index(np.argmax(tiny), tiny.shape)
    assert r >= 9 and c >= 12 and abs(float(tiny.sum())) < 1e-5  # zero-mean thumbnail, bright where the square is
    hist = d[192:].reshape(4, 4, 8)
    energy = (hist ** 2).sum(-1)
    assert energy[3, 3] > 0 and energy.sum() == pytest.approx(energy[3, 3])
    assert np.count_nonzero(hist[3, 3]) >= 2  # horizontal and vertical edges: two orientation bins at least
    rgb = np.repeat(g[..., None], 3, axis=-1)
    np.testing.assert_allclose(classical_descriptor(rgb), d, atol=1e-6)


def _view(k, t, rgb):
    from ros2_stream4d.mapping.backend.loops import KeyframeView

    return KeyframeView(k, rgb, np.full(rgb.shape[:2], 2.0), np.array([[30.0, 0, 32], [0, 30.0, 24], [0, 0, 1]]),
                        S3.sim3(t=t))


def test_loop_candidates_need_separation_similarity_and_the_drift_widened_radius():
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    rgb = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    det = LoopDetector(LoopConfig(min_separation=1, search_radius_m=1.0, search_drift_fraction=0.5))
    det.add(_view(0, [0.0, 0.0, 0.0], rgb))
    assert det.views[0].descriptor.dtype == np.float32
    det.add(_view(1, [5.0, 0.0, 0.0], rgb))  # path 5 m: radius 1 + 0.5 * 5 = 3.5 m < 5 m
    assert det.candidates() == []
    det.add(_view(2, [0.0, 3.0, 0.0], rgb))  # 3 m from keyframe 0 after a 10.8 m path: radius 6.4 m; keyframe 1
    cands = det.candidates()  # is 5.8 m away after 5.8 m: radius 3.9 m
    assert [c.i for c in cands] == [0] and cands[0].j == 2 and cands[0].similarity > 0.99
    tight = LoopDetector(LoopConfig(min_separation=2, search_radius_m=10.0))
    tight.add(_view(0, [0.0, 0.0, 0.0], rgb))
    tight.add(_view(1, [0.1, 0.0, 0.0], rgb))
    assert tight.candidates() == []  # keyframe 0 is 1 keyframe back, min_separation 2
    tight.add(_view(2, [0.2, 0.0, 0.0], rgb))
    assert [c.i for c in tight.candidates()] == [0]  # exactly one old enough


def test_detect_counts_each_candidate_once_and_keeps_no_pose_for_a_failed_verification():
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    flat = np.full((48, 64, 3), 128, np.uint8)  # no features: verification fails ("too few features")
    det = LoopDetector(LoopConfig(min_separation=1, min_similarity=-1.0))
    det.add(_view(0, [0.0, 0.0, 0.0], flat))
    det.add(_view(1, [0.1, 0.0, 0.0], flat))
    (r,) = det.detect()
    assert not r.accepted and r.S_i_j is None
    assert det.stats == {"candidates": 1, "accepted": 0, "rejected": 1, "held": 0, "released": 0,
                         "keyframes without a model descriptor": 0}
    (h,) = det.history
    assert h[:3] == (0, 1, False) and h[3] is None and h[4] == r.reason


def test_backend_starts_a_named_daemon_worker_that_survives_a_failing_keyframe():
    from ros2_stream4d.mapping.backend.loops import KeyframeView, classical_descriptor
    from ros2_stream4d.mapping.backend.service import LongRunBackend

    class Logger:
        def __init__(self):
            self.lines = []

        def warning(self, msg):
            self.lines.append(msg)

    class Failing:
        config = None

        def add(self, view):
            raise RuntimeError(f"no features in keyframe {view.id}")

    b = LongRunBackend(logger=Logger())
    try:
        assert b.stats == {"keyframes": 0, "dropped_keyframes": 0, "optimisations_ok": 0,
                           "optimisations_dropped": 0, "last_drop_reason": "", "edges_rejected_by_graph": 0,
                           "drift calibrations": 0, "rotation drift calibrated [deg/m]": 0.0,
                           "corrections_applied": 0, "corrections_withdrawn": 0}
        assert b.detector.descriptor_fn is classical_descriptor and b.detector.config is b.config.loops
        assert b._thread.is_alive() and b._thread.daemon and b._thread.name == "stream4d-backend"
        b.detector = Failing()
        view = KeyframeView(7, np.zeros((2, 2, 3), np.uint8), np.ones((2, 2)), np.eye(3), np.eye(4))
        b._put((view, 0))
        assert b.wait_idle(10.0)
        assert b.stats["last_drop_reason"] == "RuntimeError: no features in keyframe 7"
        assert b.logger.lines == ["back-end: keyframe failed: no features in keyframe 7"]
        assert b._thread.is_alive(), "the worker goes on"
    finally:
        b.close()
    assert not b._thread.is_alive()


# ---------------------------------------------------------------------------------------------------- posegraph
def _drifted_square(config, drift=0.4, loop=True):
    from ros2_stream4d.mapping.backend.posegraph import LOOP, PoseGraph

    g = PoseGraph(config)
    xs, ys = [0, 1, 1, 0, 0], [0, 0, 1, 1, 0]
    true = [S3.sim3(rotation_from_vector([0.0, 0.0, np.pi / 2 * k]), [xs[k], ys[k], 0.0]) for k in range(5)]
    for k in range(5):
        odo = true[k].copy()
        odo[:3, 3] += [drift * k / 4, 0.3 * drift * k / 4, 0.0]  # the odometry drifts 0.4 m round a 4 m square
        g.add_keyframe(k, odo, 0)
    if loop:
        g.add_edge(0, 4, S3.inverse(true[0]) @ true[4], LOOP)  # the loop says where keyframe 4 really is
    return g


def test_optimise_snapshot_corrects_a_drifted_square_within_its_plausibility_limits():
    import dataclasses

    from ros2_stream4d.mapping.backend.posegraph import PoseGraphConfig, optimise_snapshot

    cfg = PoseGraphConfig(max_correction_m=0.0, max_correction_fraction=0.5)  # limit 0.5 x the 4 m path = 2 m
    g = _drifted_square(cfg)
    snap = g.snapshot()
    res = optimise_snapshot(snap, cfg)
    assert res.ok and res.rejected_edges == [] and res.iterations > 0 and 0 < res.seconds < 60
    initial = snap[3]
    moves = [np.linalg.norm(res.poses[k][:3, 3] - initial[k][:3, 3]) for k in range(5)]
    assert res.max_move_m == pytest.approx(max(moves)) and 0.2 < res.max_move_m < 0.6
    np.testing.assert_allclose(res.poses[4][:3, 3], [0.0, 0.0, 0.0], atol=0.05)  # keyframe 4 back at the start
    assert res.final_error <= res.initial_error
    tight = dataclasses.replace(cfg, max_correction_fraction=0.05)  # limit 0.2 m
    drop = optimise_snapshot(_drifted_square(tight).snapshot(), tight)
    assert not drop.ok and drop.reason.startswith("implausible correction: a keyframe moved 0.")
    assert "(limit 0.20 m)" in drop.reason and drop.max_move_m == pytest.approx(res.max_move_m, rel=1e-3)
    assert 0 < drop.seconds < 60
    small = dataclasses.replace(cfg, min_correction_m=10.0)
    drop = optimise_snapshot(_drifted_square(small).snapshot(), small)
    assert drop.ok is False and drop.reason == "correction below noise: no keyframe moved 10.0 m"
    assert drop.max_move_m == pytest.approx(res.max_move_m, rel=1e-3) and 0 < drop.seconds < 60
    none = optimise_snapshot(_drifted_square(cfg, loop=False).snapshot(), cfg)
    assert not none.ok and none.reason == "nothing to optimise (no segment or loop edge)"


def test_segment_frames_from_exact_outputs_or_a_pose_encoding_agree():
    import torch

    from ros2_stream4d.mapping.backend.segments import SegmentedSession, _frame_of
    from ros2_stream4d.mapping.conventions import inverse, make_transform
    from ros2_stream4d.mapping.reconstructor import nominal_K
    from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding

    h, w = 12, 16
    K = np.array([[14.0, 0, 8.0], [0, 15.0, 6.0], [0, 0, 1]])
    T = make_transform(rotation_from_vector([0.05, 0.2, 0.0]), [0.3, -0.1, 0.2])
    E = inverse(T)[:3]
    depth = np.full((1, h, w, 1), 2.0, np.float32)
    depth[0, 1, 2, 0], depth[0, 2, 3, 0], depth[0, 3, 4, 0] = 0.0, -1.0, np.nan
    out = {"depth": torch.tensor(depth), "depth_conf": torch.full((1, h, w), 3.0),
           "extrinsic": torch.tensor(E)[None], "intrinsic": torch.tensor(K)[None]}
    img = torch.zeros(1, 3, h, w)
    f = _frame_of(out, img, 5, "m")
    assert f.image is img and f.stamp_ns == 5 and f.mapping == "m"
    assert f.depth.dtype == np.float32 and f.conf.dtype == np.float32 and f.K.dtype == np.float64
    bad = np.isnan(f.depth)
    assert bad.sum() == 3 and bad[1, 2] and bad[2, 3] and bad[3, 4]
    np.testing.assert_allclose(f.T_seg_cam, T, atol=1e-6)
    enc = extri_intri_to_pose_encoding(torch.tensor(E, dtype=torch.float32)[None, None],
                                       torch.tensor(K, dtype=torch.float32)[None, None], (h, w))
    g = _frame_of({"depth": torch.tensor(depth)[..., 0], "depth_conf": out["depth_conf"], "pose_enc": enc[0],
                   "extrinsic": out["extrinsic"]}, img, 5, "m")  # an extrinsic alone is not enough
    np.testing.assert_allclose(g.T_seg_cam, T, atol=1e-4)
    np.testing.assert_allclose(g.K[:2, :2], K[:2, :2], rtol=1e-4)
    zero = _frame_of(dict(out, intrinsic=torch.zeros(1, 3, 3, dtype=torch.float64)), img, 5, "m")
    np.testing.assert_allclose(zero.K, nominal_K((h, w)))  # an unusable K: the reconstructor's stand-in
    # the segment events say which segment, at which frame, why, and how well it was aligned
    events = []
    s = SegmentedSession(_StaticSession(), None, on_segment=events.append)
    s.policy.max_segment_frames, s.policy.min_segment_frames, s.policy.overlap_frames = 3, 3, 2
    s._reset_state()
    for i in range(4):
        s.step(torch.full((1, 3, 12, 16), float(i)), stamp_ns=i)
    ev = events[0]  # the third frame ends the first segment
    assert (ev.segment, ev.frame, ev.reason, ev.ok) == (1, 2, "max_segment_frames", True)
    assert ev.inlier_ratio == pytest.approx(1.0) and ev.rmse < 1e-6
    np.testing.assert_allclose(ev.S_prev_new, np.eye(4), atol=1e-6)
    assert s.segment_stats.segments == 1 + len(events) and s.segment_stats.refed_frames == 2 * len(events)
    assert s.last_overlap == pytest.approx(1.0)


def test_backend_apply_drops_a_correction_the_map_refuses():
    """A solution the keyframe map refuses (not a Sim(3)) is dropped with its reason: no pose moves, the correction
    in force stays, the frame thread goes on."""
    b = _stopped_backend()
    kmap = _keyframe_map(3)

    class Forwarding(_Pipeline):
        def update_keyframe_poses(self, poses):
            self.map.update_poses(poses)

    class Last:
        T_map_cam = np.eye(4)

    p = Forwarding(kmap, Last())
    before = kmap.keyframe_poses()
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    C = S3.sim3(rotation_from_vector([0.0, 0.0, 0.5]), [0.3, -0.7, 0.2], s=1.3)
    b.graph = _Graph(C, {0: C @ before[0], 1: sheared})
    b._M_at = {2: np.eye(4)}
    b._result = object()
    assert b.apply(p) is False
    assert b.stats["optimisations_dropped"] == 1 and b.stats["corrections_applied"] == 0
    assert "refused" in b.stats["last_drop_reason"] and "keyframe 1" in b.stats["last_drop_reason"]
    for kid, T in kmap.keyframe_poses().items():
        np.testing.assert_array_equal(T, before[kid])
    assert p.map_integration is None and p.map_correction is None
    np.testing.assert_array_equal(b._M, np.eye(4))
    np.testing.assert_array_equal(b._M_at[2], np.eye(4))
