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
    # (at OpenCV's FAST threshold: the two views' feature counts then leave matches between 0 and nb)
    probe = LoopDetector(LoopConfig(orb_fast_threshold=20))
    nb = len(_compacted(probe, room, 0).orb)
    assert len(_compacted(probe, room, 32).orb) > nb
    det = LoopDetector(LoopConfig(min_inliers=nb, orb_fast_threshold=20))
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
    # (with OpenCV's FAST threshold: with the default's ~10x more matches, 3 chance agreements make a "consensus")
    r = _noisy_pair(room, 0.03, ransac_threshold=0.005, ransac_threshold_rel=0.0, orb_fast_threshold=20)
    assert (r.accepted, r.reason, r.inliers) == (False, "no Sim(3) consensus", 0)
    r = _noisy_pair(room, 0.03, ransac_threshold=0.005, ransac_threshold_rel=0.0)
    assert not r.accepted and re.fullmatch(r"\d+ inliers \(0\.0\d\)", r.reason), r.reason
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


class _WallSession:
    """A camera stepping dx along x per frame (the frame's image holds its index i) in front of a wall 2 m away;
    the session's world is the camera of its first frame after a reset (as a model's segment world is). conf(i, n)
    gives frame i's confidence at the n-th step since the reset, depth(i, n) its depth."""

    window, anchors = 5, 2

    def __init__(self, dx=0.1, conf=None, depth=None):
        self.dx, self.conf, self.depth = dx, conf, depth
        self.calls, self.resets, self.shrunk_with = [], 0, []
        self.origin, self.n = None, 0

    def reset(self):
        self.resets += 1
        self.origin, self.n = None, 0

    def stats(self):
        return "inner stats"

    def shrunk(self, window):
        self.shrunk_with.append(window)
        return _WallSession(self.dx, self.conf, self.depth) if window > 1 else None

    def step(self, image, stamp_ns=None, mapping=None):
        import torch

        from ros2_stream4d.mapping.conventions import inverse

        i = int(float(image.flatten()[0]))
        self.calls.append((i, stamp_ns, mapping))
        self.origin = i if self.origin is None else self.origin
        T = np.eye(4)
        T[0, 3] = self.dx * (i - self.origin)
        depth = np.full((12, 16), 2.0) if self.depth is None else self.depth(i, self.n)
        conf = np.full((12, 16), 3.0) if self.conf is None else self.conf(i, self.n)
        self.n += 1
        return {"depth": torch.as_tensor(depth, dtype=torch.float32)[None, ..., None],
                "depth_conf": torch.as_tensor(conf, dtype=torch.float32)[None],
                "extrinsic": torch.as_tensor(inverse(T)[:3])[None], "intrinsic": torch.as_tensor(_K)[None]}


def _frame(i):
    import torch

    return torch.full((1, 3, 12, 16), float(i))


def _pose_of(res):
    from ros2_stream4d.mapping.conventions import extrinsic_to_pose

    return extrinsic_to_pose(res["extrinsic"][0].numpy().astype(np.float64))


def _run_segments(inner, n=5, **policy):
    """The tests below exercise the point-map alignment (its fallback, weights and camera centres): "points" unless
    a test says otherwise (the default became "poses")."""
    from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession

    policy.setdefault("alignment", "points")
    events = []
    s = SegmentedSession(inner, ReanchorPolicy(**policy), on_segment=events.append)
    outs = [s.step(_frame(i), stamp_ns=100 + i, mapping=f"m{i}") for i in range(n)]
    return s, events, outs


def test_a_failed_alignment_falls_back_on_the_newest_camera_and_reports_no_inliers():
    """No confident pixel: the point-map alignment has nothing to fit (the two camera centres alone are too few), so
    the new segment is placed by the newest re-fed frame: its pose in the old segment times the inverse of its pose
    in the new one. The 4th frame (index 3) ends the first segment; frames 2 and 3 are re-fed, the new world is
    frame 2's camera (0.2 m along x in the old world)."""
    inner = _WallSession(conf=lambda i, n: np.zeros((12, 16)))
    s, events, outs = _run_segments(inner, max_segment_frames=4, min_segment_frames=4, overlap_frames=2)
    assert [c for c in inner.calls] == [(0, 100, "m0"), (1, 101, "m1"), (2, 102, "m2"), (3, 103, "m3"),
                                        (2, 102, "m2"), (3, 103, "m3"), (4, 104, "m4")]
    (ev,) = events
    assert (ev.segment, ev.frame, ev.reason, ev.ok) == (1, 3, "max_segment_frames", False)
    assert ev.inlier_ratio == 0.0 and np.isnan(ev.rmse)
    expect = np.eye(4)
    expect[0, 3] = 0.2
    np.testing.assert_allclose(ev.S_prev_new, expect, atol=1e-7)
    np.testing.assert_allclose(ev.S_odom_new, expect, atol=1e-7)
    assert s.segment == 1 and s.segment_stats.failed_alignments == 1 and s.segment_stats.refed_frames == 2
    for i, res in enumerate(outs):  # the outputs stay in the first segment's world: the camera at 0.1 i
        np.testing.assert_allclose(_pose_of(res)[:3, 3], [0.1 * i, 0.0, 0.0], atol=1e-6)


def test_segment_alignment_uses_the_camera_centres_of_both_segments():
    """One confident pixel per frame (a different one in each): two points are too few for a Sim(3); with the two
    re-fed frames' camera centres there are four, and the fit is exact: inlier ratio 1.0, which a minimum of 1.0
    accepts."""

    def conf(i, n):
        c = np.zeros((12, 16))
        c[2 + 2 * (i % 2), 3 + 6 * (i % 2)] = 3.0
        return c

    inner = _WallSession(conf=conf)
    s, events, outs = _run_segments(inner, max_segment_frames=4, min_segment_frames=4, overlap_frames=2,
                                    min_inlier_ratio=1.0)
    (ev,) = events
    assert ev.ok and ev.inlier_ratio == 1.0 and ev.rmse < 1e-6 and s.segment_stats.failed_alignments == 0
    expect = np.eye(4)
    expect[0, 3] = 0.2
    np.testing.assert_allclose(ev.S_prev_new, expect, atol=1e-6)
    np.testing.assert_allclose(_pose_of(outs[4])[:3, 3], [0.4, 0.0, 0.0], atol=1e-5)


def test_segment_alignment_ignores_pixels_the_new_segment_is_not_confident_about():
    """The first frame after a reset has a wrong depth (5 m) with confidence 0 in its top half: those pixels are
    left out of the fit (weight sqrt(conf_old conf_new) = 0), which stays exact."""

    def conf(i, n):
        c = np.full((12, 16), 3.0)
        if n == 0 and i > 0:
            c[:6] = 0.0
        return c

    def depth(i, n):
        d = np.full((12, 16), 2.0)
        if n == 0 and i > 0:
            d[:6] = 5.0
        return d

    inner = _WallSession(conf=conf, depth=depth)
    s, events, _ = _run_segments(inner, max_segment_frames=4, min_segment_frames=4, overlap_frames=2,
                                 min_inlier_ratio=1.0)
    (ev,) = events
    assert ev.ok and ev.inlier_ratio == 1.0 and ev.rmse < 1e-6
    np.testing.assert_allclose(ev.S_prev_new[:3, 3], [0.2, 0.0, 0.0], atol=1e-6)


def test_segmented_session_forwards_the_protocol_and_its_depth_tolerance():
    from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession

    inner = _WallSession(dx=0.0, depth=lambda i, n: np.full((12, 16), 2.0 + 0.4 * i))
    events = []
    s = SegmentedSession(inner, ReanchorPolicy(depth_tolerance=0.3), on_segment=events.append)
    assert (s.window, s.anchors, s.segment, s.last_overlap, s.frames_seen) == (5, 2, 0, 1.0, 0)
    assert s.stats() == "inner stats"
    s.step(_frame(0), stamp_ns=7, mapping="a")
    s.step(_frame(1), stamp_ns=8, mapping="b")
    assert inner.calls == [(0, 7, "a"), (1, 8, "b")]
    assert s.last_overlap == 1.0  # 2.4 m against the anchor's 2.0: within 0.3 x 2.4
    tight = SegmentedSession(_WallSession(dx=0.0, depth=lambda i, n: np.full((12, 16), 2.0 + 0.4 * i)))
    tight.step(_frame(0))
    tight.step(_frame(1))
    assert tight.last_overlap == 0.0  # the default 0.1 x 2.4 is not enough
    small = s.shrunk(3)
    assert inner.shrunk_with == [3] and isinstance(small, SegmentedSession)
    assert small.inner is not inner and isinstance(small.inner, _WallSession)
    assert small.policy is s.policy and small.on_segment == events.append and small.segment == 0
    assert s.shrunk(1) is None and inner.shrunk_with == [3, 1]


def test_reanchor_policy_allows_a_single_overlap_frame_and_says_what_it_needs():
    from ros2_stream4d.mapping.backend.segments import ReanchorPolicy

    p = ReanchorPolicy(overlap_frames=1, min_segment_frames=2, max_segment_frames=2)
    assert p.overlap_frames == 1
    with pytest.raises(ValueError, match=r"^need 1 <= overlap_frames < min_segment_frames <= max_segment_frames$"):
        ReanchorPolicy(overlap_frames=0)


def test_np_detaches_tensors_to_float32_and_passes_arrays_through():
    import torch

    from ros2_stream4d.mapping.backend.segments import _np

    t = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    a = _np(t)
    assert a.dtype == np.float32 and a.tolist() == [1.5, -2.0]
    x = np.array([1.0, 2.0], np.float64)
    assert _np(x).dtype == np.float64 and _np(x).tolist() == [1.0, 2.0]
    assert _np([3, 4]).tolist() == [3, 4]


def test_transform_outputs_maps_every_output_into_the_continuous_frame():
    import torch

    from ros2_stream4d.mapping.backend.segments import _Frame, _transform_outputs
    from ros2_stream4d.mapping.conventions import inverse, make_transform
    from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri

    h, w = 12, 16
    K = np.array([[14.0, 0, 8.0], [0, 15.0, 6.0], [0, 0, 1]])
    T_seg = make_transform(rotation_from_vector([0.05, 0.2, -0.1]), [0.3, -0.1, 0.2])
    R_s, t_s, s = rotation_from_vector([0.0, 0.3, 0.1]), np.array([1.0, 2.0, -0.5]), 2.0
    S = S3.sim3(R_s, t_s, s)
    depth = np.full((h, w), 2.0, np.float32)
    depth[0, 0] = 3.0
    f = _Frame(None, None, None, T_seg, depth, np.full((h, w), 3.0, np.float32), K)
    wp = np.random.default_rng(0).normal(size=(1, h, w, 3)).astype(np.float32)
    old_ext = torch.as_tensor(inverse(T_seg)[:3], dtype=torch.float32)[None]
    enc = extri_intri_to_pose_encoding(old_ext[None], torch.as_tensor(K, dtype=torch.float32)[None, None], (h, w))[0]
    out = {"depth": torch.as_tensor(depth)[None, ..., None], "depth_conf": torch.full((1, h, w), 3.0),
           "world_points": torch.as_tensor(wp), "extrinsic": old_ext,
           "intrinsic": torch.zeros(1, 3, 3), "pose_enc": enc}
    res = _transform_outputs(out, f, S)
    assert set(res) == set(out) and res["depth_conf"] is out["depth_conf"]
    np.testing.assert_allclose(res["depth"].numpy(), 2.0 * out["depth"].numpy())
    np.testing.assert_allclose(res["world_points"][0].numpy(), s * wp[0] @ R_s.T + t_s, atol=1e-5)
    # the camera: rotation R_s R_seg, centre s R_s c_seg + t_s
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R_s @ T_seg[:3, :3], s * R_s @ T_seg[:3, 3] + t_s
    for key in ("extrinsic", "intrinsic", "world_points"):
        assert res[key].dtype == torch.float32 and res[key].shape[0] == 1
    np.testing.assert_allclose(res["extrinsic"][0].numpy(), inverse(T)[:3], atol=1e-6)
    np.testing.assert_allclose(res["intrinsic"][0].numpy(), K, atol=1e-6)
    e, k = pose_encoding_to_extri_intri(res["pose_enc"][None], (h, w))
    np.testing.assert_allclose(e.reshape(3, 4).numpy(), inverse(T)[:3], atol=1e-4)
    np.testing.assert_allclose(k.reshape(3, 3).numpy()[:2, :2], K[:2, :2], rtol=1e-4)
    bare = _transform_outputs({"depth": out["depth"], "depth_conf": out["depth_conf"]}, f, S)
    assert set(bare) == {"depth", "depth_conf", "extrinsic", "intrinsic"}


# ---------------------------------------------------------------------------------------------------- posegraph
def _square(config=None):
    from test_mutants_backend import _drifted_square

    from ros2_stream4d.mapping.backend.posegraph import PoseGraphConfig

    return _drifted_square(config or PoseGraphConfig())


def test_pose_graph_default_segment_and_edge_checks():
    from ros2_stream4d.mapping.backend.posegraph import LOOP, ODOMETRY, BackendWorker, PoseGraph

    g = PoseGraph()
    g.add_keyframe(0, np.eye(4))  # the default segment is 0: the next keyframe of segment 0 joins it by odometry
    g.add_keyframe(1, S3.sim3(t=[1.0, 0.0, 0.0]), 0)
    assert g.segment_of == {0: 0, 1: 0} and [(e.i, e.j, e.kind) for e in g.edges] == [(0, 1, ODOMETRY)]
    with pytest.raises(KeyError, match="edge 0-7: unknown keyframe"):
        g.add_edge(0, 7, np.eye(4))
    with pytest.raises(KeyError, match="edge 7-1: unknown keyframe"):
        g.add_edge(7, 1, np.eye(4))
    assert len(g.edges) == 1
    Z = np.eye(4, dtype=int)
    e = g.add_edge(0, 1, Z, LOOP)
    assert e.S_i_j.dtype == np.float64 and e.S_i_j is not Z
    w = BackendWorker()
    try:
        w.add_keyframe(0, np.eye(4))
        w.add_keyframe(1, S3.sim3(t=[1.0, 0.0, 0.0]), 0)
        assert w.graph.segment_of == {0: 0, 1: 0} and [e.kind for e in w.graph.edges] == [ODOMETRY]
    finally:
        w.close()


def test_accept_carries_keyframes_added_during_an_optimisation_by_the_newest_correction():
    from ros2_stream4d.mapping.backend.posegraph import OptimisationResult, PoseGraph

    g = PoseGraph()
    odo = {k: S3.sim3(rotation_from_vector([0.0, 0.0, 0.3 * k]), [1.0 * k, 0.2 * k, 0.0]) for k in range(3)}
    for k in range(3):
        g.add_keyframe(k, odo[k])
    C = S3.sim3(rotation_from_vector([0.0, 0.0, 0.1]), [0.5, -0.2, 0.0], 1.1)
    C1 = S3.sim3(rotation_from_vector([0.0, 0.0, -0.05]), [0.1, 0.3, 0.0])
    res = OptimisationResult(True, poses={0: C @ odo[0], 1: C1 @ odo[1]})  # solved before keyframe 2 came
    g.accept(res)
    np.testing.assert_allclose(g.solution[0], C @ odo[0], atol=1e-12)
    np.testing.assert_allclose(g.solution[1], C1 @ odo[1], atol=1e-12)
    np.testing.assert_allclose(g.solution[2], C1 @ odo[2], atol=1e-12)  # the correction at keyframe 1, not C


def test_noise_models_robust_only_for_robust_edges_when_asked():
    import gtsam

    from ros2_stream4d.mapping.backend.posegraph import LOOP, ODOMETRY, Edge, PoseGraphConfig, _noise

    cfg = PoseGraphConfig()
    odo = Edge(0, 1, np.eye(4), ODOMETRY, 0.01, 0.02, 0.03, robust=False)
    loop = Edge(0, 1, np.eye(4), LOOP, 0.01, 0.02, 0.03, robust=True)
    for model in (_noise(odo, cfg), _noise(odo, cfg, False), _noise(loop, cfg, False)):
        assert not isinstance(model, gtsam.noiseModel.Robust)
        np.testing.assert_allclose(model.sigmas(), [0.01] * 3 + [0.02] * 3 + [0.03])
    assert isinstance(_noise(loop, cfg), gtsam.noiseModel.Robust)


def _loops_on_a_line(wrong):
    """Ten keyframes 1 m apart along x (exact odometry) and loops (i, j) that agree with it, but those in `wrong`,
    which are 1 m off."""
    from ros2_stream4d.mapping.backend.posegraph import LOOP, Edge

    odo = {k: S3.sim3(t=[1.0 * k, 0.0, 0.0]) for k in range(10)}
    edges = []
    for i, j in ((0, 8), (1, 9), (2, 7)):
        Z = S3.inverse(odo[i]) @ odo[j]
        if (i, j) in wrong:
            Z = Z @ S3.sim3(t=[0.0, 1.0, 0.0])
        edges.append(Edge(i, j, Z, LOOP, 0.02, 0.05, 0.02))
    return edges, list(range(10)), odo


def test_pairwise_consistency_needs_a_majority_against_a_loop_and_enough_neighbours():
    from ros2_stream4d.mapping.backend.posegraph import PoseGraphConfig, inconsistent_loops

    cfg = PoseGraphConfig()
    edges, order, odo = _loops_on_a_line({(2, 7)})
    # (0, 8) and (1, 9) agree with each other and not with (2, 7): each has one vote of two for it, a tie, kept;
    # (2, 7) has none of two
    assert [(e.i, e.j) for e in inconsistent_loops(edges, order, odo, cfg)] == [(2, 7)]
    # two loops that disagree: one neighbour each, fewer than pcm_min_neighbours (2): neither is judged
    two = [e for e in edges if (e.i, e.j) != (1, 9)]
    assert inconsistent_loops(two, order, odo, cfg) == []


def test_optimise_snapshot_keeps_the_first_keyframe_and_obeys_the_iteration_limit():
    import dataclasses

    from ros2_stream4d.mapping.backend.posegraph import PoseGraphConfig, optimise_snapshot

    cfg = PoseGraphConfig()
    g = _square(cfg)
    snap = g.snapshot()
    res = optimise_snapshot(snap, cfg)
    assert res.ok and res.iterations > 1 and res.final_error < res.initial_error
    np.testing.assert_allclose(res.poses[0], snap[3][0], atol=1e-9)  # the prior holds the first keyframe
    one = dataclasses.replace(cfg, max_iterations=1)
    res1 = optimise_snapshot(_square(one).snapshot(), one)
    assert res1.ok and res1.iterations == 1 and res1.final_error > res.final_error


def test_optimise_snapshot_outlier_threshold_is_strict_and_a_lone_outlier_leaves_nothing_to_correct():
    import dataclasses

    from ros2_stream4d.mapping.backend.posegraph import LOOP, PoseGraphConfig, _whitened, optimise_snapshot

    cfg = PoseGraphConfig()
    g = _square(cfg)
    res = optimise_snapshot(g.snapshot(), cfg)
    (loop,) = [e for e in g.edges if e.kind == LOOP]
    w = _whitened(loop, res.poses)
    assert 0.1 < w < cfg.outlier_chi
    at = dataclasses.replace(cfg, outlier_chi=w)  # the loop's residual at the solution equals the threshold: kept
    res_at = optimise_snapshot(_square(at).snapshot(), at)
    assert res_at.ok and res_at.rejected_edges == []
    below = dataclasses.replace(cfg, outlier_chi=0.9 * w)  # above it: switched off, and then no loop is left
    drop = optimise_snapshot(_square(below).snapshot(), below)
    assert drop.ok is False and drop.rejected_edges == [(0, 4, LOOP)] and drop.poses == {}
    assert drop.reason == "every loop (1) rejected as an outlier: nothing to correct"


@pytest.mark.parametrize("gnc", [True, False])
def test_optimise_snapshot_reports_a_gtsam_failure(gnc):
    from ros2_stream4d.mapping.backend.posegraph import ODOMETRY, Edge, PoseGraphConfig, optimise_snapshot

    cfg = PoseGraphConfig(gnc=gnc)
    order, odometry, edges, initial, path = _square(cfg).snapshot()
    edges.append(Edge(3, 9, np.eye(4), ODOMETRY, 0.01, 0.01, 0.01, robust=False))  # keyframe 9 has no value
    res = optimise_snapshot((order, odometry, edges, initial, path), cfg)
    assert res.ok is False and res.poses == {}
    assert res.reason.startswith("optimisation failed: ") and '"9"' in res.reason
    assert isinstance(res.seconds, float) and res.seconds > 0.0


# ---------------------------------------------------------------------------------------------------- service
def test_closing_the_backend_abandons_the_queued_keyframes():
    import threading

    from ros2_stream4d.mapping.backend.loops import KeyframeView
    from ros2_stream4d.mapping.backend.service import LongRunBackend

    started, go, closing = threading.Event(), threading.Event(), threading.Event()
    seen = []

    class Blocking:
        config = None

        def add(self, view):
            seen.append(view.id)
            if view.id == 0:
                started.set()
                go.wait(10.0)

        def detect(self, gate=None, near=()):
            return []

    b = LongRunBackend()
    b.detector = Blocking()
    put = b._queue.put

    def put_and_tell(item, *args, **kwargs):
        put(item, *args, **kwargs)
        if item is None:
            closing.set()

    b._queue.put = put_and_tell
    for k in range(3):
        b._put((KeyframeView(k, np.zeros((2, 2, 3), np.uint8), np.ones((2, 2)), np.eye(3), S3.sim3(t=[k, 0, 0])), 0))
    assert started.wait(10.0)
    closer = threading.Thread(target=b.close)
    closer.start()
    assert closing.wait(10.0)  # close() has asked the worker to stop while keyframe 0 is still being processed
    go.set()
    closer.join(20.0)
    assert not closer.is_alive() and not b._thread.is_alive()
    assert seen == [0] and b.stats["keyframes"] == 1  # keyframes 1 and 2 were queued, never processed


def test_gnc_alone_switches_off_a_wrong_loop_in_whitened_units():
    """The drifted square with its true loop (0, 4) and a wrong one (0, 2) 1 m off, the rounds' outlier test off
    (outlier_chi 1e6): GNC (truncated least squares on the edges' own sigmas, no robust kernel) switches the wrong
    loop off; the true one stays and brings keyframe 4 back to the start."""
    from ros2_stream4d.mapping.backend.posegraph import LOOP, PoseGraphConfig, optimise_snapshot

    cfg = PoseGraphConfig(outlier_chi=1e6)
    g = _square(cfg)
    Z = S3.inverse(g.odometry[0]) @ g.odometry[2] @ S3.sim3(t=[0.0, 1.0, 0.0])
    g.add_edge(0, 2, Z, LOOP)
    res = optimise_snapshot(g.snapshot(), cfg)
    assert res.ok and res.rejected_edges == [(0, 2, LOOP)]
    np.testing.assert_allclose(res.poses[4][:3, 3], [0.0, 0.0, 0.0], atol=0.05)


def test_backend_observe_stops_at_a_keyframe_without_frames_and_counts_those_handed_on():
    import threading
    from types import SimpleNamespace

    from test_mutants_backend import _stopped_backend

    class Frames:
        def __init__(self, n):
            self.n = n
            self.depth, self.rgb = np.ones((1, 2, 2)), np.zeros((1, 2, 2, 3), np.uint8)
            self.K = np.eye(3)[None]

        def __len__(self):
            return self.n

    kfs = [SimpleNamespace(id=k, T_map_kf=S3.sim3(t=[k, 0.0, 0.0]), segment=0, descriptor=None) for k in range(3)]
    counts = {0: 1, 1: 0, 2: 1}  # keyframe 1 has no frame (yet)
    m = SimpleNamespace(_lock=threading.Lock(), keyframes=kfs, frames_of=lambda kf: Frames(counts[kf.id]))
    pipeline = SimpleNamespace(map=m)
    b = _stopped_backend()
    assert b.observe(pipeline) == 1 and b._observed == 1
    counts[1] = 2
    assert b.observe(pipeline) == 2 and b._observed == 3
    assert [b._queue.get_nowait()[0].id for _ in range(b._queue.qsize())] == [0, 1, 2]


def test_verify_counts_keypoints_5_px_off_as_pnp_outliers(room):
    """Half of the newer keyframe's keypoints moved 5 px (their 3D points unchanged): PnP, at its 3 px reprojection
    error, keeps (the right matches of) the other half only; the loop is still accepted."""
    det, a, b = _tampered(room)
    rng = np.random.default_rng(2)
    moved = rng.random(len(b.uv)) < 0.5
    phi = rng.uniform(0.0, 2 * np.pi, moved.sum())
    b.uv = b.uv.copy()
    b.uv[moved] += 5.0 * np.c_[np.cos(phi), np.sin(phi)]
    ia, ib = _hamming_matches(a, b, det.config.ratio)
    ok = np.isfinite(a.xyz[ia]).all(1) & np.isfinite(b.xyz[ib]).all(1)
    n_moved, n_kept = int(moved[ib[ok]].sum()), int((~moved[ib[ok]]).sum())
    assert n_moved > 50 and n_kept > 50
    r = det.verify(a, b)
    assert r.accepted, r.reason
    # (about 70 % of the matches are right: 196 PnP inliers of 281 unmoved, 101 of the 145 left here)
    assert 0.5 * n_kept <= r.details["pnp_inliers"] <= n_kept + 0.1 * n_moved


# ------------------------------------------------------------------- third batch (sampled at 9058ca4, seed 17)
def test_anchor_overlap_with_the_anchor_and_the_frame_away_from_the_world_origin():
    """The anchor and the frame are one camera, turned and 1.2 m away from the world origin: every point is seen
    (the world -> anchor transform applies the anchor's inverse translation as well as its rotation); the same frame
    0.8 m further along its optical axis sees nothing the anchor saw at that depth."""
    T = np.eye(4)
    T[:3, :3] = rotation_from_vector(np.array([0.2, -0.5, 0.1]))
    T[:3, 3] = [0.7, -0.4, 0.9]
    wall = np.full((12, 16), 2.0)
    assert _overlap(wall, wall, T_world_anchor=T, T_world_cam=T) == pytest.approx(1.0)
    ahead = T.copy()
    ahead[:3, 3] += 0.8 * T[:3, 2]
    assert _overlap(wall, wall, T_world_anchor=T, T_world_cam=ahead) == 0.0


def test_segments_are_numbered_one_after_the_other():
    """Several segment switches: the events and the session count segments 1, 2, 3, ... (not stuck at 1)."""
    inner = _WallSession()
    s, events, _ = _run_segments(inner, max_segment_frames=4, min_segment_frames=4, overlap_frames=2, n=12)
    n = len(events)
    assert n >= 3 and [e.segment for e in events] == list(range(1, n + 1))
    assert s.segment == n and s.segment_stats.segments == n + 1


def test_backend_diagnostics_say_which_descriptor_the_loops_use():
    """Before any keyframe: "loop descriptor" is "none yet"; keyframes without a model descriptor are counted
    under their own key."""
    from test_mutants_backend import _stopped_backend

    d = _stopped_backend().diagnostics()
    assert d["loop descriptor"] == "none yet"
    assert d["keyframes without a model descriptor"] == 0


def test_verify_needs_enough_features_in_each_keyframe_not_just_in_one(room):
    """A textureless older keyframe against a textured newer one: "too few features" (the newer one alone has
    plenty)."""
    from ros2_stream4d.mapping.backend.loops import KeyframeView, LoopDetector

    det = LoopDetector()
    rgb, depth, K, T = room[32]
    flat = KeyframeView(0, np.full_like(rgb, 128), depth.copy(), K, T)
    r = det.verify(flat, _kv(room, 32))
    assert (r.accepted, r.reason) == (False, "too few features")
    r = det.verify(_kv(room, 32), KeyframeView(1, np.full_like(rgb, 128), depth.copy(), K, T))
    assert (r.accepted, r.reason) == (False, "too few features")


def test_verify_reports_matches_without_depth_by_count(room):
    """The newer keyframe has no depth at all: its matches cannot be lifted, and the reason says how many matches
    had depth in both (0)."""
    from ros2_stream4d.mapping.backend.loops import LoopDetector

    det = LoopDetector()
    a, b = _kv(room, 0), _kv(room, 32)
    b.depth[:] = np.nan
    r = det.verify(a, b)
    assert (r.accepted, r.reason) == (False, "0 matches with depth")


# ------------------------------------------------------------------------------ sim3.align_from_poses (at 9058ca4)
def _pose_pair_segments():
    """Two frames of one scene in two segment worlds related by a known Sim(3) S (dst <- src): poses and depths
    exact (depth_src = depth_dst / s), depths between 0.4 and 2.9 m, a few invalid pixels of every kind. Pixel
    (0, 0) of frame 0 is the first valid pixel and an outlier (its src depth 1.5x too far)."""
    H, W = 6, 8
    K = np.array([[10.0, 0, 4.0], [0, 10.0, 3.0], [0, 0, 1]])
    S = S3.sim3(rotation_from_vector(np.array([0.1, -0.3, 0.2])), np.array([0.4, -0.2, 0.3]), 1.25)
    R, t, s = S3.decompose(S)
    Td = np.stack([np.eye(4), np.eye(4)])
    Td[1, :3, :3] = rotation_from_vector(np.array([0.0, 0.15, 0.0]))
    Td[1, :3, 3] = [0.3, 0.0, 0.1]
    Ts = np.stack([np.eye(4), np.eye(4)])
    for i in range(2):  # the same cameras in the src world: S^-1 of the dst pose, rigid
        Ts[i, :3, :3] = R.T @ Td[i, :3, :3]
        Ts[i, :3, 3] = R.T @ (Td[i, :3, 3] - t) / s
    dd = np.tile(np.linspace(0.4, 2.9, H * W).reshape(H, W), (2, 1, 1))
    ds = dd / s
    ds[0, 0, 0] *= 1.5  # the outlier
    dd[0, 0, 1], ds[0, 0, 2], dd[0, 0, 3], ds[1, 5, 7] = 0.0, -1.0, np.nan, np.inf  # invalid
    cd, cs = np.ones_like(dd), np.ones_like(dd)
    cd[1, 0, 0], cs[1, 0, 1] = 0.0, 0.0  # no confidence: invalid
    return S, Td, Ts, dd, ds, K, cd, cs


def test_align_from_poses_counts_valid_pixels_and_rejects_the_outlier_exactly():
    S, Td, Ts, dd, ds, K, cd, cs = _pose_pair_segments()
    fit = S3.align_from_poses(Td, Ts, dd, ds, K, K, cd, cs)
    dt, dr, dsc = S3.sim3_distance(fit.S, S)
    assert dt < 1e-9 and dr < 1e-7 and dsc < 1e-9
    n_valid = 2 * 6 * 8 - 6  # 4 invalid depths, 2 without confidence
    assert len(fit.inliers) == n_valid and fit.inliers.sum() == n_valid - 1 and not fit.inliers[0]
    assert fit.rmse < 1e-5  # float32 unprojection
    # a regular subsample of the valid pixels, from the first to the last: 5 of them, the outlier first
    sub = S3.align_from_poses(Td, Ts, dd, ds, K, K, cd, cs, max_points=5)
    assert sub.inliers.tolist() == [False, True, True, True, True]
    # an explicit threshold above the outlier's residual keeps it (and the RMSE is its weighted share)
    # frame 0's camera is the dst world's origin, so S maps its src point to 1.5 x its dst point (0.4 m deep)
    r0 = 0.5 * 0.4 * float(np.linalg.norm([(0 - 4.0) / 10, (0 - 3.0) / 10, 1.0]))
    big = S3.align_from_poses(Td, Ts, dd, ds, K, K, cd, cs, threshold=r0 * 1.01)
    assert big.inliers.all() and big.rmse == pytest.approx(r0 / np.sqrt(n_valid), rel=1e-3)
    small = S3.align_from_poses(Td, Ts, dd, ds, K, K, cd, cs, threshold=r0 * 0.99)
    assert small.inliers.sum() == n_valid - 1


def test_align_from_poses_refuses_mismatched_inputs_each_alone_and_needs_three_pixels():
    S, Td, Ts, dd, ds, K, cd, cs = _pose_pair_segments()
    for args in ((Td, Ts[:1], dd, ds), (Td[0], Ts[0], dd, ds), (Td, Ts, dd, ds[:, :5]), (Td[:1], Ts[:1], dd, ds)):
        with pytest.raises(ValueError, match="do not match$"):
            S3.align_from_poses(*args, K, K)
    three = np.full_like(dd, np.nan)
    three[1, 2, 3:6] = dd[1, 2, 3:6]
    fit = S3.align_from_poses(Td, Ts, three, ds, K, K)  # exactly three pixels with depth in both: enough
    assert len(fit.inliers) == 3 and abs(S3.scale_of(fit.S) - 1.25) < 1e-9
    three[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match="^align_from_poses: fewer than 3 pixels with depth in both segments$"):
        S3.align_from_poses(Td, Ts, three, ds, K, K)
