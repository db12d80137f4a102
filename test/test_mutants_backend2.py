"""The back-end (mapping/backend/: loops, segments, posegraph, service) on small exact inputs, second batch: the
sampled survivors docs/mutation.md lists for these four modules (verify's result fields and failure reasons,
anchor_overlap's boundaries, the segmented session's outputs and fall-back, the service's shutdown)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.conventions import rotation_from_vector

pytest.importorskip("gtsam")
pytest.importorskip("open3d")

DETAIL_KEYS = {"ransac_rmse", "icp_rmse", "pnp_rotation_deg", "pnp_inliers", "S_ransac"}


# ---------------------------------------------------------------------------------------------------- loops: verify
@pytest.fixture(scope="module")
def room():
    """Rendered keyframes of the sim room (true depth, true poses): a revisit 4 cm apart (0 and 32 of the 40
    keyframes of test_loops.py), one 26 cm apart (0 and 33) and a different place (0 and 12)."""
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("room", 1)
    T = make_trajectory(scene, "ground_robot", n_frames=400, fps=10, seed=1).T_world_cam
    cam = CameraModel.from_hfov(320, 240, 70)
    r = Renderer(scene, cam)
    out = {}
    for k in (0, 12, 32, 33):
        f = r.render(T[10 * k])
        out[k] = (f.rgb, f.depth.astype(np.float64), cam.K.copy(), T[10 * k].copy())
    return out


def _kv(room, k):
    from ros2_stream4d.mapping.backend.loops import KeyframeView

    rgb, depth, K, T = room[k]
    return KeyframeView(k, rgb, depth.copy(), K, T)


def _compacted(det, room, k):
    c = det.config
    return _kv(room, k).compact(det._orb, c.icp_points, c.depth_max)


def _hamming_matches(a, b, ratio):
    """Lowe's ratio test on the Hamming distances, computed by brute force here (query b, train a)."""
    bits = np.unpackbits(b.orb[:, None, :] ^ a.orb[None, :, :], axis=-1).sum(-1)  # (nb, na)
    order = np.argsort(bits, axis=1, kind="stable")
    best, second = order[:, 0], order[:, 1]
    rows = np.arange(len(bits))
    keep = bits[rows, best] < ratio * bits[rows, second]
    return best[keep], rows[keep]


def test_verify_accepts_a_revisit_with_every_field_of_the_result(room):
    from scipy.spatial import cKDTree

    from ros2_stream4d.mapping.backend.loops import LoopDetector

    det = LoopDetector()
    a, b = _compacted(det, room, 0), _compacted(det, room, 32)
    r = det.verify(a, b)
    true = S3.inverse(room[0][3]) @ room[32][3]
    assert (r.i, r.j, r.accepted, r.reason) == (0, 32, True, "ok")
    dt, dr, ds = S3.sim3_distance(r.S_i_j, true)
    assert dt < 0.01 and dr < 0.5 and ds < 0.01
    assert set(r.details) == DETAIL_KEYS
    d = r.details
    dt, dr, ds = S3.sim3_distance(d["S_ransac"], true)
    assert dt < 0.03 and dr < 1.0 and ds < 0.02
    assert not np.array_equal(d["S_ransac"], r.S_i_j), "ICP refined the RANSAC estimate"
    # the RANSAC inliers: matches (Hamming ratio test) with depth in both, within 5 cm under S_ransac
    ia, ib = _hamming_matches(a, b, det.config.ratio)
    pa, pb = a.xyz[ia].astype(np.float64), b.xyz[ib].astype(np.float64)
    ok = np.isfinite(pa).all(1) & np.isfinite(pb).all(1)
    res = np.linalg.norm(S3.apply(d["S_ransac"], pb[ok]) - pa[ok], axis=1)
    assert isinstance(r.inliers, int) and det.config.min_inliers <= r.inliers <= ok.sum()
    assert abs(r.inliers - int((res < det.config.ransac_threshold).sum())) <= 2
    assert 0.0 < d["ransac_rmse"] < det.config.ransac_threshold
    assert d["ransac_rmse"] == pytest.approx(float(np.sqrt((res[res < 0.05] ** 2).mean())), rel=0.05)
    assert isinstance(d["pnp_inliers"], int) and det.config.min_inliers <= d["pnp_inliers"] <= ok.sum()
    assert 0.0 <= d["pnp_rotation_deg"] < det.config.max_pnp_rotation_deg
    # ICP: fitness = share of b's cloud within icp_distance of a's cloud under S_i_j; rmse over those
    dist, _ = cKDTree(a.cloud.astype(np.float64)).query(S3.apply(r.S_i_j, b.cloud.astype(np.float64)))
    near = dist < det.config.icp_distance
    assert isinstance(r.fitness, float) and r.fitness == pytest.approx(near.mean(), abs=2e-3)
    assert det.config.min_fitness < r.fitness <= 1.0
    assert d["icp_rmse"] == pytest.approx(float(np.sqrt((dist[near] ** 2).mean())), rel=0.02)


def test_verify_rejects_another_place_with_a_ransac_reason_and_empty_fields(room):
    from ros2_stream4d.mapping.backend.loops import LoopDetector

    det = LoopDetector()
    r = det.verify(_kv(room, 0), _kv(room, 12))
    assert (r.i, r.j, r.accepted, r.S_i_j) == (0, 12, False, None)
    assert r.inliers == 0 and r.fitness == 0.0 and r.details == {}
    assert re.fullmatch(r"\d+ (inliers \(0\.\d\d\)|matches|matches with depth)", r.reason), r.reason


def test_verify_failure_reasons_name_the_failing_stage(room):
    from ros2_stream4d.mapping.backend.loops import KeyframeView, LoopConfig, LoopDetector

    flat = np.full((48, 64, 3), 128, np.uint8)
    K = np.array([[30.0, 0, 32], [0, 30.0, 24], [0, 0, 1]])
    det = LoopDetector()
    r = det.verify(KeyframeView(0, flat, np.full((48, 64), 2.0), K, np.eye(4)),
                   KeyframeView(1, flat.copy(), np.full((48, 64), 2.0), K, np.eye(4)))
    assert (r.accepted, r.reason, r.inliers, r.fitness, r.details) == (False, "too few features", 0, 0.0, {})
    # exactly min_inliers features in the newer keyframe are enough to go on (to the matching)
    probe = LoopDetector()
    nb = len(_compacted(probe, room, 0).orb)
    assert len(_compacted(probe, room, 32).orb) > nb
    det = LoopDetector(LoopConfig(min_inliers=nb))
    r = det.verify(_compacted(det, room, 32), _compacted(det, room, 0))
    assert not r.accepted and r.reason != "too few features"
    assert re.fullmatch(r"\d+ matches", r.reason), r.reason
    n = int(r.reason.split()[0])
    assert 0 < n < nb


def _tampered(room, **config):
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    det = LoopDetector(LoopConfig(**config))
    return det, _compacted(det, room, 0), _compacted(det, room, 32)


def test_verify_reports_a_failed_pnp_with_the_ransac_inliers(room):
    det, a, b = _tampered(room)
    ref = det.verify(copy.deepcopy(a), copy.deepcopy(b))
    assert ref.accepted
    b.uv = np.random.default_rng(0).uniform([0, 0], [320, 240], b.uv.shape)  # pixels that fit no camera
    r = det.verify(a, b)
    assert (r.accepted, r.reason, r.S_i_j) == (False, "PnP failed", None)
    assert r.inliers == ref.inliers and r.fitness == 0.0 and r.details == {}


def test_verify_reports_a_pnp_rotation_disagreement_in_degrees(room):
    det, a, b = _tampered(room)
    ref = det.verify(copy.deepcopy(a), copy.deepcopy(b))
    # the newer keyframe's pixels as a camera turned 10 degrees about its optical axis would see them: PnP then
    # finds that rotation, the 3D-3D fit (on the unchanged points) does not
    K = b.K
    H = K @ rotation_from_vector([0.0, 0.0, np.radians(10.0)]) @ np.linalg.inv(K)
    h = np.c_[b.uv, np.ones(len(b.uv))] @ H.T
    b.uv = h[:, :2] / h[:, 2:]
    r = det.verify(a, b)
    assert not r.accepted and r.S_i_j is None and r.details == {}
    m = re.fullmatch(r"PnP disagrees by (\d+\.\d) deg", r.reason)
    assert m, r.reason
    assert float(m.group(1)) == pytest.approx(10.0, abs=0.6)
    assert r.inliers == ref.inliers and r.fitness == 0.0


def test_verify_reports_a_poor_icp_fitness(room):
    det, a, b = _tampered(room)
    ref = det.verify(copy.deepcopy(a), copy.deepcopy(b))
    rng = np.random.default_rng(1)
    b.cloud = b.cloud[rng.permutation(len(b.cloud))].copy()
    b.cloud[: int(0.8 * len(b.cloud))] += rng.uniform(-2.0, 2.0, (int(0.8 * len(b.cloud)), 3)).astype(np.float32)
    r = det.verify(a, b)
    assert not r.accepted and r.S_i_j is None and r.details == {}
    m = re.fullmatch(r"ICP fitness (0\.\d\d)", r.reason)
    assert m, r.reason
    assert r.fitness < det.config.min_fitness and float(m.group(1)) == pytest.approx(r.fitness, abs=0.006)
    assert 0.1 < r.fitness and r.inliers == ref.inliers


def test_verify_icp_change_limit_is_strict_and_measured_from_the_ransac_translation(room):
    # the 26 cm revisit: the RANSAC and ICP translations are both ~0.26 m long, their difference is small
    det, _, _ = _tampered(room)
    ref = det.verify(_compacted(det, room, 0), _compacted(det, room, 33))
    assert ref.accepted and ref.reason == "ok"
    change = float(np.linalg.norm(ref.S_i_j[:3, 3] - ref.details["S_ransac"][:3, 3]))
    assert 0.0 < change < 0.05 and np.linalg.norm(ref.S_i_j[:3, 3]) > 0.15
    det_below, _, _ = _tampered(room, max_icp_change_m=0.5 * change)
    r = det_below.verify(_compacted(det_below, room, 0), _compacted(det_below, room, 33))
    assert not r.accepted and r.S_i_j is None and r.details == {}
    assert r.reason == f"ICP moved {change:.2f} m"
    assert r.inliers == ref.inliers and r.fitness == pytest.approx(ref.fitness)
    # an ICP that finds no correspondence (the newer cloud 50 m away) leaves the RANSAC estimate exactly: a change
    # of 0 is within a limit of 0, and a fitness of 0 reaches a min_fitness of 0
    det0, a, b = _tampered(room, max_icp_change_m=0.0, min_fitness=0.0)
    b.cloud = b.cloud + np.float32(50.0)
    r = det0.verify(a, b)
    assert (r.accepted, r.reason, r.fitness) == (True, "ok", 0.0)
    np.testing.assert_array_equal(r.S_i_j, r.details["S_ransac"])


def test_verify_ignores_keypoints_without_depth_in_either_keyframe(room):
    from ros2_stream4d.mapping.backend.loops import LoopDetector

    det = LoopDetector()
    a, b = _kv(room, 0), _kv(room, 32)
    a.depth[:, :60] = np.nan  # the left of the older keyframe, and the right of the newer, have no depth
    b.depth[:, 260:] = np.nan
    r = det.verify(a, b)
    assert r.accepted, r.reason
    dt, dr, ds = S3.sim3_distance(r.S_i_j, S3.inverse(room[0][3]) @ room[32][3])
    assert dt < 0.02 and dr < 0.5 and ds < 0.02
