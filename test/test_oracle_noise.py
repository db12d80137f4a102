"""The oracle's front-end error model (sim/oracle_noise.py): exact when off, realistic depth error, outliers with low
confidence, drift growing with distance, seeded, YAML overrides, and the loader's description."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from ros2_stream4d.mapping.backend.drift import DriftModel
from ros2_stream4d.mapping.backend.sim3 import umeyama
from ros2_stream4d.mapping.conventions import extrinsic_to_pose
from ros2_stream4d.sim.oracle import OracleSession
from ros2_stream4d.sim.oracle_noise import REALISTIC, NoisyOracleSession, OracleNoise, load_noise, noisy_session

ROOT = Path(__file__).resolve().parents[1]
H, W = 60, 80


def stationary_oracle(n=6):
    """An oracle whose camera does not move (no drift), looking at a ramp of depths 0.5-8 m."""
    K = np.array([[70.0, 0, W / 2], [0, 70.0, H / 2], [0, 0, 1]])
    ramp = np.linspace(0.5, 8.0, W, dtype=np.float32)
    depths = np.tile(ramp, (n, H, 1))
    return OracleSession(np.arange(n) * 100_000_000, np.tile(np.eye(4), (n, 1, 1)), K, depths)


def arc_poses(n, step, radius=6.0):
    """Camera positions on a horizontal arc (optical world: y down), `step` m apart; orientation fixed."""
    a = np.arange(n) * step / radius
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, 0, 3], T[:, 2, 3] = radius * np.sin(a), radius * (1 - np.cos(a))
    return T


def moving_oracle(n=200, step=0.05):
    """An oracle moving along an arc at `step` m per frame, constant depth 3 m."""
    K = np.array([[70.0, 0, W / 2], [0, 70.0, H / 2], [0, 0, 1]])
    return OracleSession(np.arange(n) * 100_000_000, arc_poses(n, step), K, np.full((n, H, W), 3.0, np.float32))


def frames(session, n):
    return [{k: v[0].numpy() for k, v in session.step().items()} for _ in range(n)]


def test_none_is_the_exact_oracle():
    exact = frames(stationary_oracle(), 3)
    s, text = noisy_session(stationary_oracle(), "none", seed=3)
    assert isinstance(s, OracleSession) and text == "exact"
    for a, b in zip(exact, frames(s, 3)):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert load_noise("none") is None
    # all-zero magnitudes (with no confidence spread) change nothing either
    zero = OracleNoise(conf_noise=0.0)
    out = frames(NoisyOracleSession(stationary_oracle(), zero, seed=1), 3)
    for a, b in zip(exact, out):
        assert np.allclose(a["depth"], b["depth"]) and np.allclose(a["depth_conf"], b["depth_conf"])
        assert np.allclose(a["extrinsic"], b["extrinsic"], atol=1e-6)


def test_realistic_depth_error_grows_with_depth_and_outliers_have_low_confidence():
    s = NoisyOracleSession(stationary_oracle(8), REALISTIC, seed=0)
    z = np.tile(np.linspace(0.5, 8.0, W), (H, 1))
    rel, conf, outl = [], [], []
    for _ in range(8):
        out = s.step()
        d = out["depth"][0, ..., 0].numpy()
        assert out["depth"].shape == (1, H, W, 1) and out["depth_conf"].shape == (1, H, W)
        assert out["world_points"].shape == (1, H, W, 3) and out["pose_enc"].shape == (1, 9)
        assert np.all(d > 0)
        rel.append(np.abs(d / z - 1))
        conf.append(out["depth_conf"][0].numpy())
        outl.append(s.last_outliers)
    rel, conf, outl = np.stack(rel), np.stack(conf), np.stack(outl)
    abs_rel = rel.mean()
    assert 0.04 < abs_rel < 0.10, abs_rel  # published streaming models: ~0.05-0.15 on indoor sets
    near, far = rel[..., z[0] < 2.0], rel[..., z[0] > 6.0]
    good = ~outl
    assert np.median(far[good[..., z[0] > 6.0]]) > 1.5 * np.median(near[good[..., z[0] < 2.0]])
    assert abs(outl.mean() - REALISTIC.outlier_fraction) < 0.004
    assert conf[outl].mean() < 0.5 * conf[good].mean()
    assert conf.min() >= 1.0 and conf.max() <= 100.0 * np.exp(5 * REALISTIC.conf_noise)
    # the world points are the noisy depth unprojected (first frame = world)
    assert np.allclose(out["world_points"][0, ..., 2].numpy(), d, rtol=1e-3, atol=0.02)


def test_drift_grows_with_distance_and_per_frame_pose_error_is_moderate():
    n, step = 400, 0.05  # 20 m
    s = NoisyOracleSession(moving_oracle(n, step), REALISTIC, seed=4)
    est = np.stack([extrinsic_to_pose(s.step()["extrinsic"][0].double().numpy()) for _ in range(n)])
    true = arc_poses(n, step)
    err = np.linalg.norm(est[:, :3, 3] - true[:, :3, 3], axis=1)
    assert err[0] < 1e-6  # the first frame is the world
    assert err[380:].mean() > 3 * err[80:100].mean()  # drift grows with the distance travelled
    # relative pose error between consecutive frames (translation): of the order of a centimetre
    d_est = np.linalg.norm(np.diff(est[:, :3, 3], axis=0), axis=1)
    rpe = np.abs(d_est - step)
    assert 0.003 < np.median(rpe) < 0.03
    # after a Sim(3) alignment the trajectory error of 20 m stays below a metre but is not zero
    S = umeyama(est[:, :3, 3], true[:, :3, 3])
    ate = np.sqrt(np.mean(np.sum((est[:, :3, 3] @ S[:3, :3].T + S[:3, 3] - true[:, :3, 3]) ** 2, axis=1)))
    assert 0.005 < ate < 1.0, ate


def test_drift_model_new_terms_are_seeded_and_off_by_default():
    T = np.tile(np.eye(4), (50, 1, 1))
    T[:, 0, 3] = np.linspace(0, 5, 50)
    base = DriftModel(seed=2).run(T)
    assert np.array_equal(base[0], DriftModel(seed=2, tilt_walk_deg=0, trans_walk=0, jitter_m=0).run(T)[0])
    noisy = DriftModel(seed=2, tilt_walk_deg=0.5, trans_walk=0.01, jitter_m=0.01, jitter_deg=0.2)
    a, b = noisy.run(T)[0], DriftModel(seed=2, tilt_walk_deg=0.5, trans_walk=0.01, jitter_m=0.01,
                                       jitter_deg=0.2).run(T)[0]
    assert np.array_equal(a, b) and not np.allclose(a, base[0])
    tilt = np.degrees(np.arccos(np.clip(a[-1, 2, 2], -1, 1)))  # up (z) tilted away from z
    assert 0 < tilt < 10


def test_seeds_are_reproducible_and_differ():
    def run(seed):
        s = NoisyOracleSession(moving_oracle(30), REALISTIC, seed=seed)
        out = frames(s, 30)
        s.reset()
        return out + frames(s, 0)

    a, b, c = run(5), run(5), run(6)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not np.array_equal(a[-1]["depth"], c[-1]["depth"])
    assert not np.allclose(a[-1]["extrinsic"], c[-1]["extrinsic"])


def test_realistic_yaml_in_config_equals_the_code():
    data = yaml.safe_load((ROOT / "config" / "oracle_noise_realistic.yaml").read_text())
    assert OracleNoise(**data) == REALISTIC
    assert load_noise(str(ROOT / "config" / "oracle_noise_realistic.yaml")) == REALISTIC


def test_yaml_overrides_and_refuses_unknown_keys(tmp_path):
    f = tmp_path / "noise.yaml"
    f.write_text("outlier_fraction: 0.1\njitter_m: 0\n")
    noise = load_noise(str(f))
    assert noise.outlier_fraction == 0.1 and noise.jitter_m == 0.0
    assert noise.depth_rel_sigma == REALISTIC.depth_rel_sigma  # the rest stays realistic
    s = NoisyOracleSession(stationary_oracle(), noise, seed=0)
    s.step()
    assert abs(s.last_outliers.mean() - 0.1) < 0.03
    bad = tmp_path / "bad.yaml"
    bad.write_text("outlier_fraction: 0.1\ndepth_sigma: 0.2\n")
    with pytest.raises(ValueError, match="depth_sigma"):
        load_noise(str(bad))
    neg = tmp_path / "neg.yaml"
    neg.write_text("outlier_fraction: 1.5\n")
    with pytest.raises(ValueError, match="outlier_fraction"):
        load_noise(str(neg))
    with pytest.raises(FileNotFoundError):
        load_noise(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError):
        dataclasses.replace(REALISTIC, outlier_min_factor=0.5)


def test_loader_describes_the_noise_and_seed(tmp_path):
    from ros2_stream4d.loader import ModelOptions, load_pipeline
    from ros2_stream4d.mapping.pipeline import PipelineConfig
    from ros2_stream4d.sim.bag import SimConfig, write_sim_bag

    bag = tmp_path / "bag"
    write_sim_bag(bag, SimConfig(scene="room", trajectory="ground_robot", frames=3, width=32, height=24, seed=1),
                  progress=False)
    noisy = load_pipeline(ModelOptions(model="oracle", oracle_bag=str(bag), oracle_noise="realistic",
                                       oracle_seed=7, device="cpu"), PipelineConfig())
    assert "noise realistic" in noisy.describe() and "seed 7" in noisy.describe()
    session = noisy.reconstructor.session
    assert isinstance(session, NoisyOracleSession) and session.seed == 7
    exact = load_pipeline(ModelOptions(model="oracle", oracle_bag=str(bag), device="cpu"), PipelineConfig())
    assert exact.describe() == f"oracle ({bag})" and isinstance(exact.reconstructor.session, OracleSession)
