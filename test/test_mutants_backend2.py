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
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    det = LoopDetector()
    a, b = _kv(room, 0), _kv(room, 32)
    a.depth[:, :60] = np.nan  # the left of the older keyframe, and the right of the newer, have no depth
    b.depth[:, 260:] = np.nan
    r = det.verify(a, b)
    assert r.accepted, r.reason
    dt, dr, ds = S3.sim3_distance(r.S_i_j, S3.inverse(room[0][3]) @ room[32][3])
    assert dt < 0.02 and dr < 0.5 and ds < 0.02
    # the inlier ratio counts only the matches with depth in both: the left 200 columns of the newer keyframe
    # without depth do not dilute it below a strict 0.6
    det = LoopDetector(LoopConfig(min_inlier_ratio=0.6))
    a, b = _kv(room, 0), _kv(room, 32)
    b.depth[:, :200] = np.nan
    r = det.verify(a, b)
    assert r.accepted and r.reason == "ok"
    assert np.isfinite(b.xyz[:, 2]).sum() < 0.5 * len(b.xyz)


def _noisy_pair(room, noise, **config):
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    rng = np.random.default_rng(0)
    a, b = _kv(room, 0), _kv(room, 32)
    a.depth *= 1 + noise * rng.standard_normal(a.depth.shape)
    b.depth *= 1 + noise * rng.standard_normal(b.depth.shape)
    return LoopDetector(LoopConfig(**config)).verify(a, b)


def test_verify_widens_the_ransac_threshold_with_the_depth(room):
    """3 % depth noise at ~2.5 m: a fixed 5 mm threshold finds no consensus; 5 mm + 5 % of the depth (~13 cm) does;
    5 mm + 2 % (~5.5 cm) is still too tight: the added part grows with the depth, it is not divided by it."""
    r = _noisy_pair(room, 0.03, ransac_threshold=0.005, ransac_threshold_rel=0.0)
    assert (r.accepted, r.reason, r.inliers) == (False, "no Sim(3) consensus", 0)
    r = _noisy_pair(room, 0.03, ransac_threshold=0.005, ransac_threshold_rel=0.02)
    assert not r.accepted
    m = re.fullmatch(r"(\d+) inliers \((0\.\d\d)\)", r.reason)
    assert m and float(m.group(2)) < 0.3 and r.inliers == 0, r.reason
    r = _noisy_pair(room, 0.03, ransac_threshold=0.005, ransac_threshold_rel=0.05)
    assert r.accepted and r.reason == "ok"
    dt, dr, _ = S3.sim3_distance(r.S_i_j, S3.inverse(room[0][3]) @ room[32][3])
    assert dt < 0.1 and dr < 2.0


# ---------------------------------------------------------------------------------------------------- loops: the rest
def test_classical_descriptor_splits_the_orientation_grid_at_its_cells_and_keeps_angles_near_pi_in_the_last_bin():
    from ros2_stream4d.mapping.backend.loops import classical_descriptor

    g = np.full((48, 64), 50, np.uint8)
    g[:, 16:] = 200  # a vertical step between columns 15 and 16: the border of the grid's first two columns of cells
    d = classical_descriptor(g)
    tiny = d[:192].reshape(12, 16)
    assert np.ptp(tiny[:, :4]) == 0 and np.ptp(tiny[:, 4:]) == 0 and tiny[0, 0] < 0 < tiny[0, 4]
    hist = d[192:].reshape(4, 4, 8)
    # the Sobel response is the same on both sides of the step: one bin (angle 0) in both cells of every row
    np.testing.assert_allclose(hist[:, 0, 0], hist[:, 1, 0], rtol=1e-6)
    assert hist[0, 0, 0] > 0
    rest = hist.copy()
    rest[:, :2, 0] = 0.0
    assert not rest.any()
    # a horizontal ramp tilted by a hair: float32 rounds its orientation (just below pi) up to pi, which is the last
    # bin's (an angle mod pi is the same orientation), not one past it
    y, x = np.mgrid[0:48, 0:64].astype(np.float64)
    d = classical_descriptor(0.5 * x - 1e-7 * y)
    hist = d[192:].reshape(4, 4, 8)
    assert np.isfinite(d).all() and hist[..., 7].any()
    energy = hist**2
    assert energy[..., [0, 7]].sum() > 0.99 * energy.sum()  # horizontal gradients: angle 0 or (just below) pi


def test_detector_uses_its_config_keeps_float32_geometry_and_a_bounded_history(monkeypatch, room):
    from ros2_stream4d.mapping.backend import loops
    from ros2_stream4d.mapping.backend.loops import LoopConfig, LoopDetector

    det = LoopDetector(LoopConfig(n_features=100), descriptor_fn=lambda img: [0.6, 0.8])
    v = _kv(room, 0)
    det.add(v)
    assert 0 < len(v.uv) <= 100 and v.orb.shape == (len(v.uv), 32)  # ORB's own default is 500
    assert len(_compacted(LoopDetector(), room, 0).uv) > 500
    assert v.descriptor.dtype == np.float32 and v.descriptor.shape == (2,)
    assert v.cloud.dtype == np.float32 and v.xyz.dtype == np.float32 and v.cloud.shape[1] == 3
    # the verification history keeps the newest HISTORY outcomes
    from ros2_stream4d.mapping.backend.loops import KeyframeView

    monkeypatch.setattr(loops, "HISTORY", 2)
    det = LoopDetector(LoopConfig(min_separation=1, min_similarity=-1.0, max_candidates=1))
    flat = np.full((48, 64, 3), 128, np.uint8)
    K = np.array([[30.0, 0, 32], [0, 30.0, 24], [0, 0, 1]])
    for k in range(4):
        det.add(KeyframeView(k, flat, np.full((48, 64), 2.0), K, S3.sim3(t=[0.1 * k, 0.0, 0.0])))
        det.detect()
    assert det.history.maxlen == 2 and [h[1] for h in det.history] == [2, 3]
    assert det.stats["candidates"] == 3


def test_lift_clamps_keypoints_to_the_image_and_keeps_depth_below_one():
    from ros2_stream4d.mapping.backend.loops import _lift

    depth = np.array([[0.5, 2.0, 3.0, 4.0],
                      [1.5, np.nan, 2.5, 9.0],
                      [0.0, 6.0, 7.0, 7.5]])
    K = np.array([[2.0, 0, 1.5], [0, 4.0, 1.0], [0, 0, 1]])
    uv = np.array([[-0.6, 0.2],  # rounds to column -1: clamped to column 0, row 0 (depth 0.5)
                   [3.7, 2.6],  # rounds to (4, 3): clamped to the last column and row (7.5)
                   [1.0, 1.0],  # no depth
                   [3.0, 1.0],  # beyond depth_max
                   [0.0, 2.0],  # zero depth
                   [2.2, 0.4]])  # (2, 0): 3.0
    xyz, ok = _lift(uv, depth, K, depth_max=8.0)
    assert ok.tolist() == [True, True, False, False, False, True]
    z = np.array([0.5, 7.5, 3.0])
    u, v = uv[ok][:, 0], uv[ok][:, 1]
    np.testing.assert_allclose(xyz[ok], np.c_[(u - 1.5) / 2.0 * z, (v - 1.0) / 4.0 * z, z], rtol=1e-12)


def test_cloud_subsamples_the_valid_pixels_regularly_from_the_first():
    from ros2_stream4d.mapping.backend.loops import _cloud

    v, u = np.mgrid[0:4, 0:5]
    depth = 1.0 + 0.1 * (5 * v + u)
    depth[0, 1], depth[2, 2] = np.nan, 9.0  # 18 valid pixels left (depth_max 8)
    K = np.array([[2.0, 0, 2.0], [0, 3.0, 1.5], [0, 0, 1]])
    pts = _cloud(depth, K, 3, 8.0)
    # valid pixels in row-major order, indices 0, 8, 17 of 18: (0, 0), (1, 4), (3, 4)
    expect = []
    for r, c in ((0, 0), (1, 4), (3, 4)):
        z = 1.0 + 0.1 * (5 * r + c)
        expect.append([(c - 2.0) / 2.0 * z, (r - 1.5) / 3.0 * z, z])
    np.testing.assert_allclose(pts, expect, rtol=1e-12)
    assert len(_cloud(depth, K, 50, 8.0)) == 18


# ---------------------------------------------------------------------------------------------------- segments
_K = np.array([[10.0, 0, 8.0], [0, 10.0, 6.0], [0, 0, 1]])


def _overlap(depth, anchor_depth, **kw):
    from ros2_stream4d.mapping.backend.segments import anchor_overlap

    args = dict(anchor_K=_K, T_world_anchor=np.eye(4), K=_K, T_world_cam=np.eye(4))
    args.update(kw)
    return anchor_overlap(anchor_depth, args["anchor_K"], args["T_world_anchor"], depth, args["K"],
                          args["T_world_cam"], **{k: v for k, v in kw.items() if k in ("samples", "tolerance")})


def test_anchor_overlap_tolerance_is_relative_to_the_depth_and_defaults_to_a_tenth():
    """The anchor and the frame are the same camera; four bands of columns: depth equal (seen), 7 % off at 2.15 m
    (seen: 0.15 <= 0.1 x 2.15), 20 % off at 2.5 m (not seen: 0.5 > 0.25), equal at 0.5 m (seen)."""
    anchor = np.full((12, 16), 2.0)
    anchor[:, 12:] = 0.5
    depth = np.empty((12, 16))
    depth[:, :4], depth[:, 4:8], depth[:, 8:12], depth[:, 12:] = 2.0, 2.15, 2.5, 0.5
    assert _overlap(depth, anchor) == pytest.approx(0.75)
    assert _overlap(depth, anchor, tolerance=0.25) == pytest.approx(1.0)
    assert _overlap(depth, anchor, tolerance=0.05) == pytest.approx(0.5)  # 2.15 is 7 % off: not within 5 %


def test_anchor_overlap_of_a_frame_without_valid_depth_is_zero():
    depth = np.full((12, 16), np.nan)
    depth[0, :4], depth[1, :4] = 0.0, -1.0
    assert _overlap(depth, np.full((12, 16), 2.0)) == 0.0


def test_anchor_overlap_counts_only_points_inside_the_anchor_image_with_anchor_depth():
    """The anchor camera's principal point is 1.6 rows lower: frame row r lands on anchor row r + 2 (rounded), so
    rows 10 and 11 land on rows 12 and 13, outside its 12 rows; the anchor has no depth on its row 2 (frame row 0)."""
    anchor = np.full((12, 16), 2.0)
    anchor[2] = np.nan
    K_anchor = _K.copy()
    K_anchor[1, 2] += 1.6
    assert _overlap(np.full((12, 16), 2.0), anchor, anchor_K=K_anchor) == pytest.approx(9 / 12)
    # and a depth that disagrees with the anchor's is not seen even inside its image
    anchor = np.full((12, 16), 2.0)
    anchor[:6] = 3.0
    assert _overlap(np.full((12, 16), 2.0), anchor) == pytest.approx(0.5)


def test_anchor_overlap_needs_points_strictly_in_front_of_the_anchor():
    """One point on the anchor's optical axis exactly 1e-6 in front of it (the anchor 1e-6 behind the point): not
    in front; a point 2e-6 in front is."""
    zw = float(np.float32(2e-6))
    depth = np.full((12, 16), np.nan)
    depth[6, 8] = zw  # the principal point: x = y = 0
    anchor = np.full((12, 16), 1e-6)
    T_anchor = np.eye(4)
    T_anchor[2, 3] = zw - 1e-6
    assert (zw - T_anchor[2, 3]) == 1e-6
    assert _overlap(depth, anchor, T_world_anchor=T_anchor) == 0.0
    anchor[6, 8] = zw
    assert _overlap(depth, anchor) == 1.0
