"""Evaluation: metrics with known answers, cross-checked against evo; bag reading; the `stream4d eval` report."""

import json

import numpy as np
import pytest

from ros2_stream4d.cli import main
from ros2_stream4d.eval.bagio import (
    pointcloud2_msg,
    pointcloud2_to_arrays,
    read_prediction,
    resample_depth,
    write_perturbed_prediction,
    write_prediction_bag,
)
from ros2_stream4d.eval.evaluate import evaluate_arrays, match_stamps
from ros2_stream4d.eval.metrics import (
    Sim3,
    align_trajectory,
    ate,
    depth_frame_metrics,
    depth_metrics,
    map_metrics,
    rpe,
    sample_mesh,
    umeyama,
)
from ros2_stream4d.eval.report import PLOTS, write_report
from ros2_stream4d.mapping.conventions import inverse as inv_se3
from ros2_stream4d.mapping.conventions import rotation_from_vector as so3_exp
from ros2_stream4d.sim.bag import SimConfig, read_ground_truth, write_sim_bag


def random_trajectory(n=50, seed=0):
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = so3_exp(np.cumsum(rng.normal(0, 0.05, (n, 3)), axis=0))
    T[:, :3, 3] = np.cumsum(rng.normal(0, 0.1, (n, 3)), axis=0)
    return T


KNOWN_ROTVEC = (0.4, -1.1, 0.7)
KNOWN = Sim3(0.37, so3_exp(KNOWN_ROTVEC), np.array([2.0, -1.0, 0.5]))


def to_pred_frame(T_world, sim: Sim3 = KNOWN):
    """The same camera poses expressed in a frame where world = s R pred + t (an up-to-scale prediction)."""
    P = np.asarray(T_world, np.float64).copy()
    P[:, :3, :3] = sim.R.T @ P[:, :3, :3]
    P[:, :3, 3] = (P[:, :3, 3] - sim.t) @ sim.R / sim.s
    return P


# ---------------------------------------------------------------------------------------------------- trajectory
def test_umeyama_recovers_a_known_similarity_and_matches_evo():
    from evo.core.geometry import umeyama_alignment

    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3))
    dst = KNOWN.apply_points(src)
    est = umeyama(src, dst)
    assert est.s == pytest.approx(KNOWN.s, rel=1e-12)
    assert np.allclose(est.R, KNOWN.R, atol=1e-12) and np.allclose(est.t, KNOWN.t, atol=1e-12)
    noisy = dst + rng.normal(0, 0.05, dst.shape)
    for with_scale in (True, False):
        mine = umeyama(src, noisy, with_scale)
        r, t, c = umeyama_alignment(src.T, noisy.T, with_scale)
        assert np.allclose(mine.R, r, atol=1e-10) and np.allclose(mine.t, t, atol=1e-10)
        assert mine.s == pytest.approx(c, rel=1e-10)
    # a reflection is never returned
    assert np.linalg.det(umeyama(src, src * [1, 1, -1]).R) == pytest.approx(1.0)


@pytest.mark.parametrize("align", ["sim3", "se3", "scale", "none"])
def test_identical_trajectories_give_zero_errors(align):
    T = random_trajectory()
    a = ate(T, T, align=align)
    r = rpe(T, T, delta=1)
    assert a["ate_rmse"] < 1e-12 and a["ate_rot_rmse"] < 1e-6 and a["scale"] == pytest.approx(1.0)
    assert r["rpe_trans_rmse"] < 1e-12 and r["rpe_rot_rmse"] < 1e-6


def test_a_known_scale_rotation_and_offset_are_found():
    T = random_trajectory(seed=1)
    P = to_pred_frame(T)
    al = align_trajectory(P, T, "sim3")
    assert al.s == pytest.approx(KNOWN.s, rel=1e-9)
    assert np.allclose(al.R, KNOWN.R, atol=1e-9) and np.allclose(al.t, KNOWN.t, atol=1e-9)
    a = ate(P, T, align="sim3")
    assert a["ate_rmse"] < 1e-9 and a["ate_rot_max"] < 1e-5
    assert rpe(P, T, scale=a["scale"])["rpe_trans_rmse"] < 1e-9
    # a rigid alignment cannot undo the scale; no alignment is far off
    assert ate(P, T, align="se3")["ate_rmse"] > 0.05
    assert ate(P, T, align="none")["ate_rmse"] > 1.0
    # se3 alone recovers a rigid offset exactly
    rigid = Sim3(1.0, KNOWN.R, KNOWN.t)
    assert ate(to_pred_frame(T, rigid), T, align="se3")["ate_rmse"] < 1e-9


def test_ate_and_rpe_match_evo():
    from evo.core import metrics as evo_metrics
    from evo.core.trajectory import PoseTrajectory3D

    T = random_trajectory(60, seed=2)
    rng = np.random.default_rng(3)
    P = to_pred_frame(T)
    P[:, :3, 3] += rng.normal(0, 0.02, (60, 3))
    P[:, :3, :3] = so3_exp(rng.normal(0, 0.01, (60, 3))) @ P[:, :3, :3]
    stamps = np.arange(60, dtype=float)
    ref = PoseTrajectory3D(poses_se3=list(T), timestamps=stamps)
    est = PoseTrajectory3D(poses_se3=list(P), timestamps=stamps)
    est.align(ref, correct_scale=True)
    ape = evo_metrics.APE(evo_metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    mine = ate(P, T, align="sim3")
    assert mine["ate_rmse"] == pytest.approx(ape.get_statistic(evo_metrics.StatisticsType.rmse), rel=1e-9)
    assert np.allclose(mine["trans_errors"], ape.error, atol=1e-10)
    r = rpe(P, T, delta=2, scale=mine["scale"])
    for relation, key in ((evo_metrics.PoseRelation.translation_part, "trans_errors"),
                          (evo_metrics.PoseRelation.rotation_angle_deg, "rot_errors_deg")):
        e = evo_metrics.RPE(relation, delta=2, delta_unit=evo_metrics.Unit.frames, all_pairs=True)
        e.process_data((ref, est))
        assert np.allclose(r[key], e.error, atol=1e-8)


def test_rpe_on_a_constructed_case():
    T = np.tile(np.eye(4), (5, 1, 1))
    T[:, 0, 3] = np.arange(5.0)  # 1 m steps along x
    P = T.copy()
    P[2, 1, 3] = 0.3  # one frame displaced 0.3 m sideways
    r = rpe(P, T, delta=1)
    assert np.allclose(r["trans_errors"], [0, 0.3, 0.3, 0])
    assert r["rpe_trans_rmse"] == pytest.approx(np.sqrt(2 * 0.09 / 4))
    Q = T.copy()
    Q[3:, :3, :3] = so3_exp([0, 0, np.radians(10)])  # the camera turns 10 deg between frames 2 and 3
    assert np.allclose(rpe(Q, T)["rot_errors_deg"], [0, 0, 10, 0])


def test_alignment_of_degenerate_motion_falls_back_to_the_first_pose():
    T = np.tile(np.eye(4), (4, 1, 1))
    T[:, 0, 3] = np.arange(4.0)  # a straight line: rotation about it is unobservable
    P = to_pred_frame(T)
    a = ate(P, T, align="sim3")
    assert a["ate_rmse"] < 1e-9 and a["scale"] == pytest.approx(KNOWN.s)


# ---------------------------------------------------------------------------------------------------- depth
def test_depth_metrics_on_constructed_cases():
    gt = np.ones((10, 10))
    pred = np.ones((10, 10))
    pred[:5] = 1.1
    m = depth_frame_metrics(pred, gt, align="none")
    assert m["abs_rel"] == pytest.approx(0.05) and m["rmse"] == pytest.approx(np.sqrt(0.005))
    assert m["delta1"] == 1.0 and m["valid"] == 100
    # a scaled prediction is exact after median alignment, and far off without
    g = np.random.default_rng(0).uniform(1, 5, (20, 30))
    m = depth_frame_metrics(0.25 * g, g, align="median")
    assert m["abs_rel"] < 1e-12 and m["rmse"] < 1e-12 and m["delta1"] == 1.0 and m["scale"] == pytest.approx(4.0)
    m = depth_frame_metrics(0.25 * g, g, align="none")
    assert m["abs_rel"] == pytest.approx(0.75) and m["delta1"] == 0.0
    assert depth_frame_metrics(0.25 * g, g, align=4.0)["abs_rel"] < 1e-12
    # half the pixels at twice the depth: delta1 = 0.5
    p = g.copy()
    p[:10] *= 2
    m = depth_frame_metrics(p, g, align="none")
    assert m["delta1"] == 0.5 and m["abs_rel"] == pytest.approx(0.5)
    # NaN, zero and non-positive pixels are ignored
    p = g.copy()
    p[0, :5] = np.nan
    p[1, :5] = 0.0
    q = g.copy()
    q[2, :5] = np.nan
    m = depth_frame_metrics(p, q, align="none")
    assert m["valid"] == 600 - 15 and m["abs_rel"] == 0.0
    seq = depth_metrics([0.5 * g, 2.0 * g], [g, g])
    assert seq["depth_abs_rel"] < 1e-12 and np.allclose(seq["per_frame_scale"], [2.0, 0.5])
    assert depth_frame_metrics(np.full((2, 2), np.nan), g[:2, :2])["valid"] == 0


# ---------------------------------------------------------------------------------------------------- map
def test_map_accuracy_and_completeness_on_a_plane():
    V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    F = np.array([[0, 1, 2], [0, 2, 3]])
    surface = sample_mesh(V, F, 20000, seed=1)
    assert np.allclose(surface[:, 2], 0) and surface[:, :2].min() >= 0 and surface[:, :2].max() <= 1
    pts = surface[:5000] + [0, 0, 0.01]
    m = map_metrics(pts, V, F, threshold=0.05, surface_samples=surface)
    assert m["map_accuracy_mean"] == pytest.approx(0.01, abs=1e-6)
    assert m["map_precision"] == 1.0 and m["map_recall"] > 0.99 and m["map_fscore"] > 0.99
    # a map of only half the plane: completeness suffers, accuracy does not
    half = pts[pts[:, 0] < 0.5]
    m = map_metrics(half, V, F, threshold=0.05, surface_samples=surface)
    assert m["map_recall"] == pytest.approx(0.55, abs=0.03) and m["map_accuracy_mean"] == pytest.approx(0.01, abs=1e-6)
    assert m["map_completeness_mean"] > 0.1
    # points far from the plane are inaccurate
    m = map_metrics(surface[:100] + [0, 0, 0.2], V, F, threshold=0.05, surface_samples=surface)
    assert m["map_precision"] == 0.0 and m["map_accuracy_mean"] == pytest.approx(0.2, abs=1e-6)


def test_pointcloud2_round_trip():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(100, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (100, 3)).astype(np.uint8)
    conf = rng.random(100).astype(np.float32)
    a = pointcloud2_to_arrays(pointcloud2_msg(5, "map", xyz, rgb, conf))
    assert np.array_equal(a["xyz"], xyz) and np.array_equal(a["rgb"], rgb) and np.array_equal(a["confidence"], conf)


def test_stamp_matching_and_depth_resampling():
    ia, ib = match_stamps(np.array([10, 20, 31, 50]), np.array([10, 20, 30, 40]), tolerance_ns=0)
    assert ia.tolist() == [0, 1] and ib.tolist() == [0, 1]
    ia, ib = match_stamps(np.array([10, 20, 31, 50]), np.array([10, 20, 30, 40]), tolerance_ns=2)
    assert ia.tolist() == [0, 1, 2] and ib.tolist() == [0, 1, 2]
    K = np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]])
    d = np.random.default_rng(0).uniform(1, 2, (48, 64)).astype(np.float32)
    assert np.array_equal(resample_depth(d, None, K, (48, 64)), d)
    # a half-resolution prediction (plain resize) maps each 2x2 block to one predicted pixel
    small = d[::2, ::2]
    up = resample_depth(small, None, K, (48, 64))
    assert np.array_equal(up[::2, ::2], small) and np.isfinite(up).all()
    # a centre crop described by its camera_info: covered pixels agree, the rest is NaN
    Kc = K.copy()
    Kc[0, 2] -= 8
    crop = d[:, 8:56]
    back = resample_depth(crop, Kc, K, (48, 64))
    assert np.array_equal(back[:, 8:56], crop) and np.isnan(back[:, :8]).all()


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def gt_bag(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "gt"
    write_sim_bag(out, SimConfig(scene="room", trajectory="handheld", frames=30, width=96, height=72, seed=5),
                  progress=False)
    return out


def perturbed_prediction(gt_bag, out, **kwargs):
    path, sim = write_perturbed_prediction(gt_bag, out, scale=KNOWN.s, rotvec=KNOWN_ROTVEC, offset=KNOWN.t,
                                           **kwargs)
    assert np.allclose(sim.R, KNOWN.R)
    return path


def test_prediction_bag_round_trip(gt_bag, tmp_path):
    gt = read_ground_truth(gt_bag)
    path = perturbed_prediction(gt_bag, tmp_path / "pred", half_res_depth=True)
    pred = read_prediction(path)
    assert np.array_equal(pred.stamps, gt.stamps) and pred.pose_frame == "map"
    assert pred.depths.shape == (30, 36, 48) and pred.depth_K is not None
    assert pred.map_points.shape[1] == 3 and pred.map_rgb.shape == pred.map_points.shape
    assert pred.map_conf.shape == (len(pred.map_points),) and pred.map_frame == "map"


def test_stream4d_eval_on_a_perturbed_prediction(gt_bag, tmp_path, capsys):
    gt = read_ground_truth(gt_bag)
    pred = perturbed_prediction(gt_bag, tmp_path / "pred")
    out = tmp_path / "report"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt_bag), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ATE RMSE" in printed and "report.md" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["matched_poses"] == 30 and m["matched_depths"] == 30
    assert m["scale"] == pytest.approx(KNOWN.s, rel=0.02)  # the known scale is found
    assert np.allclose(np.asarray(m["alignment"]["translation"]), KNOWN.t, atol=0.05)
    assert 0.005 < m["ate_rmse"] < 0.03  # the 1 cm noise per axis, not more
    assert m["depth_abs_rel"] == pytest.approx(0.016, abs=0.004)  # mean |N(0, 0.02)|
    assert m["depth_delta1"] == 1.0 and m["depth_scale_median"] == pytest.approx(KNOWN.s, rel=0.01)
    assert m["map_accuracy_mean"] < 0.02 and m["map_fscore"] > 0.95
    report = (out / "report.md").read_text()
    for key, name in PLOTS.items():
        if key == "grid":  # the mesh / occupancy figure needs a map file (--map-file): not drawn without one
            assert not (out / name).exists() and f"]({name})" not in report
            continue
        assert (out / name).stat().st_size > 5000
        assert f"]({name})" in report
    # a perfect prediction gives zeros
    exact = write_prediction_bag(tmp_path / "exact", gt.stamps, to_pred_frame(gt.T_world_cam), depths=gt.depths)
    assert main(["eval", "--pred", str(exact), "--gt", str(gt_bag), "--out", str(tmp_path / "r2")]) == 0
    m = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m["ate_rmse"] < 1e-6 and m["rpe_rot_rmse"] < 1e-4 and m["depth_abs_rel"] < 1e-6


def test_eval_resamples_lower_resolution_depth(gt_bag, tmp_path):
    from ros2_stream4d.eval.evaluate import evaluate_bags

    pred = perturbed_prediction(gt_bag, tmp_path / "pred", depth_noise=0.0, half_res_depth=True)
    r = evaluate_bags(pred, gt_bag)
    assert any("resampled" in n for n in r.notes)
    assert r.metrics["depth_delta1"] > 0.97 and r.metrics["depth_abs_rel"] < 0.03  # only edge pixels differ


def test_python_api_without_bags(tmp_path):
    T = random_trajectory(20, seed=4)
    g = np.random.default_rng(0).uniform(1, 4, (20, 12, 16)).astype(np.float32)
    r = evaluate_arrays(to_pred_frame(T), T, pred_depths=3 * g, gt_depths=g)
    assert r.metrics["ate_rmse"] < 1e-9 and r.metrics["depth_abs_rel"] < 1e-6
    files = write_report(r, tmp_path / "api")
    assert files["report"].exists() and files["metrics"].exists() and files["depth_examples"].exists()
    assert "map" not in files  # no map given
    assert json.loads(files["metrics"].read_text())["frames"] == 20
    with pytest.raises(ValueError):
        evaluate_arrays(T[:5], T)


def test_inverse_helpers_agree():
    T = random_trajectory(5)
    assert np.allclose(inv_se3(T), np.linalg.inv(T))
