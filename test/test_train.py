"""Training package: data targets, losses on known cases, overfitting, resumable checkpoints, distillation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ros2_stream4d.model import ModelConfig, StreamVGGT
from ros2_stream4d.model.geometry import extri_intri_to_pose_encoding, quat_to_mat
from ros2_stream4d.train.data import Stage, make_clip, render_pool, render_sequence
from ros2_stream4d.train.losses import (
    camera_loss,
    depth_loss,
    gt_pose_encoding,
    point_loss,
    relative_consecutive,
    total_loss,
)
from ros2_stream4d.train.trainer import (
    TrainConfig,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
    teacher_targets,
    to_torch,
    train_step,
)

HW = (28, 42)
MICRO = dict(
    img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_register_tokens=1, patch_embed="conv",
    init_values=0.1, camera_num_heads=2, camera_trunk_depth=1, camera_num_iterations=2, dpt_layers=(0, 1, 1, 1),
    dpt_features=8, dpt_out_channels=(8, 8, 16, 16), track_head=False, point_head=True,
)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(7, "ground", 12, HW)


@pytest.fixture(scope="module")
def batch(seq):
    clips = [make_clip(seq, np.arange(0, 3)), make_clip(seq, np.arange(4, 10, 2))]
    return to_torch({k: np.stack([c[k] for c in clips]) for k in clips[0]})


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model=dict(MICRO), hw=HW, batch=2, lr=2e-3, warmup=1, steps=100, **kw)


def _model(seed: int = 0, **over) -> StreamVGGT:
    torch.manual_seed(seed)
    return StreamVGGT(ModelConfig.from_dict({**MICRO, **over}))


# ---------------------------------------------------------------------------------------------------------- data
def test_clip_targets_are_in_the_first_camera_and_normalised(seq):
    c = make_clip(seq, np.arange(0, 6))
    np.testing.assert_allclose(c["extrinsics"][0], np.eye(4)[:3], atol=1e-6)
    assert c["depth"][0][c["valid"][0]].mean() == pytest.approx(1.0, rel=1e-5)
    # a frame's world points, moved into its own camera by its extrinsic, have z = its depth
    E = c["extrinsics"][3].astype(np.float64)
    cam = c["world_points"][3].reshape(-1, 3) @ E[:, :3].T + E[:, 3]
    np.testing.assert_allclose(cam[:, 2], c["depth"][3].reshape(-1), rtol=1e-4, atol=1e-4)
    # metric consistency: normalised translations times the scale are the true camera motion
    T = seq.T_wc.astype(np.float64)
    true_step = np.linalg.norm(T[1, :3, 3] - T[0, :3, 3])
    E1 = c["extrinsics"][1].astype(np.float64)
    c1 = -E1[:, :3].T @ E1[:, 3]
    assert np.linalg.norm(c1) * float(c["scale"]) == pytest.approx(true_step, rel=1e-4, abs=1e-6)


def test_pool_sampling_respects_the_stage(tmp_path):
    from ros2_stream4d.train.data import Pool

    render_pool(tmp_path, 4, 10, HW, per_shard=2, log=lambda s: None)
    pool = Pool(tmp_path)
    assert len(pool) == 4 and len(pool.seqs["ground"]) == 2
    b = pool.sample_batch(np.random.default_rng(0), 3, Stage("x", 1.0, ("ground",), (3, 3), (2,)))
    assert b["images"].shape == (3, 3, 3, *HW)
    assert b["images"].min() >= 0 and b["images"].max() <= 1


# -------------------------------------------------------------------------------------------------------- losses
def test_losses_are_zero_at_a_perfect_prediction(batch):
    gt_pe = gt_pose_encoding(batch, HW)
    cam = camera_loss([gt_pe, gt_pe], gt_pe)
    for k in ("loss_T", "loss_R", "loss_fov", "loss_relT", "loss_relR", "loss_camera"):
        assert float(cam[k]) == pytest.approx(0.0, abs=1e-5), k
    ones = torch.ones_like(batch["depth"])
    d = depth_loss(batch["depth"][..., None], ones, batch["depth"], batch["valid"])
    assert float(d["loss_depth"]) == pytest.approx(0.0, abs=1e-6)
    p = point_loss(batch["world_points"], ones, batch["world_points"], batch["valid"])
    assert float(p["loss_points"]) == pytest.approx(0.0, abs=1e-6)


def test_losses_grow_with_the_error(batch):
    gt_pe = gt_pose_encoding(batch, HW)
    ones = torch.ones_like(batch["depth"])
    small = depth_loss(batch["depth"][..., None] * 1.05, ones, batch["depth"], batch["valid"])["loss_depth"]
    big = depth_loss(batch["depth"][..., None] * 1.5, ones, batch["depth"], batch["valid"])["loss_depth"]
    assert 0 < float(small) < float(big)
    noisy = gt_pe.clone()
    noisy[..., 1:, :3] += 0.01
    assert float(camera_loss(noisy, gt_pe)["loss_relT"]) > 0


def test_relative_consecutive_on_a_known_motion():
    yaw = math.radians(10)
    R1 = torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    R = torch.stack([torch.eye(3), R1])
    t = torch.tensor([[0.0, 0, 0], [0.1, 0, 0]])
    Rr, tr = relative_consecutive(R, t)
    torch.testing.assert_close(Rr[0], R1)
    torch.testing.assert_close(tr[0], torch.tensor([0.1, 0, 0]))


def test_gradients_reach_every_trained_part(batch):
    model = _model()
    model.train()
    out = total_loss(model(batch["images"]), batch)
    out["loss"].backward()
    for prefix in ("aggregator.patch_embed", "aggregator.global_blocks", "camera_head.trunk", "depth_head",
                   "point_head"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert any(float(g.abs().sum()) > 0 for g in grads), prefix


def test_pose_encoding_targets_roundtrip(batch):
    pe = gt_pose_encoding(batch, HW)
    torch.testing.assert_close(quat_to_mat(pe[..., 3:7]), batch["extrinsics"][..., :3, :3], atol=1e-5, rtol=0)
    assert torch.allclose(pe, extri_intri_to_pose_encoding(batch["extrinsics"], batch["K"], HW))


# ------------------------------------------------------------------------------------------------------ training
def test_overfits_one_small_batch(batch):
    cfg = _cfg()
    torch.manual_seed(0)
    model = _model()
    opt = make_optimizer(model, cfg)
    one = {k: v[:1] for k, v in batch.items()}  # one 3-frame clip: a few seconds on one core
    losses = [train_step(model, opt, one, cfg, lr=cfg.lr)["loss"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < 0.5 * losses[0]


def test_lr_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, warmup=10, steps=100, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) < lr_at(50, cfg) < lr_at(10, cfg)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_resume_gives_the_identical_next_step(tmp_path, batch):
    cfg = _cfg()
    model = _model()
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(3)
    for _ in range(3):
        train_step(model, opt, batch, cfg, lr=1e-3)
    save_checkpoint(tmp_path / "ck.pt", model, opt, 3, rng)
    draw_a = rng.random()
    torch.manual_seed(123)
    ref = train_step(model, opt, batch, cfg, lr=1e-3)
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = _model(seed=99)  # different init: everything must come from the checkpoint
    opt2 = make_optimizer(model2, cfg)
    step, rng2, _ = load_checkpoint(tmp_path / "ck.pt", model2, opt2)
    assert step == 3
    assert rng2.random() == draw_a
    torch.manual_seed(123)
    again = train_step(model2, opt2, batch, cfg, lr=1e-3)
    assert again["loss"] == ref["loss"]
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, ref_params[k], rtol=0, atol=0)


def test_checkpoint_loads_with_weights_only(tmp_path):
    cfg = _cfg()
    model = _model()
    save_checkpoint(tmp_path / "ck.pt", model, make_optimizer(model, cfg), 0, np.random.default_rng(0))
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert int(ck["step"]) == 0 and any(k.startswith("model.") for k in ck)


# -------------------------------------------------------------------------------------------------- distillation
def test_distillation_uses_teacher_outputs_as_targets(batch):
    cfg = _cfg()
    teacher = _model(seed=5, embed_dim=64, num_heads=4, camera_num_heads=4)
    student = _model(seed=6)
    tgt = teacher_targets(teacher, batch["images"])
    B, S = batch["images"].shape[:2]
    assert tgt["depth"].shape == (B, S, *HW) and tgt["extrinsics"].shape == (B, S, 3, 4)
    assert tgt["world_points"].shape == (B, S, *HW, 3) and tgt["valid"].dtype == torch.bool
    # normalised by the teacher's frame-0 mean depth, like ground-truth targets
    v0 = tgt["valid"][:, 0]
    m0 = (tgt["depth"][:, 0] * v0).sum((-1, -2)) / v0.sum((-1, -2))
    torch.testing.assert_close(m0, torch.ones(B), atol=1e-4, rtol=0)
    opt = make_optimizer(student, cfg)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tparams = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = [train_step(student, opt, batch, cfg, lr=2e-3, teacher=teacher)["loss"] for _ in range(15)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    for k, v in teacher.state_dict().items():  # the teacher is never updated
        assert torch.equal(tparams[k], v)


def test_train_cli_is_registered():
    from ros2_stream4d.cli import build_parser

    args = build_parser().parse_args(["train", "--run", "runs/x", "--steps", "5"])
    assert args.command == "train" and args.steps == 5 and callable(args.func)


# ------------------------------------------------------------------------------------- shipped model regression
SHIPPED = Path(__file__).resolve().parents[1] / "model" / "stream4d-tiny.safetensors"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped stream4d-tiny weights")
def test_shipped_tiny_model_beats_the_baselines_on_a_short_held_out_sequence():
    import yaml

    from ros2_stream4d.train.evaluate import evaluate_sequence, stream_model
    from ros2_stream4d.train.trainer import load_model_file

    card = yaml.safe_load(SHIPPED.with_suffix(".yaml").read_text())
    model = load_model_file(SHIPPED, card["config"])
    hw = (card["source"]["input"]["height"], card["source"]["input"]["width"])
    seq = render_sequence(812_345, "ground", 40, hw)
    T, d, _ = stream_model(model, seq, window=16)
    flat = np.full(hw, float(np.mean(seq.depth)), np.float32)
    res = evaluate_sequence(T, d, seq, flat)
    th = card["source"]["regression_thresholds"]
    assert res["model"]["depth_abs_rel"] < th["depth_abs_rel"]
    assert res["model"]["rpe_rot_deg"] < th["rpe_rot_deg"]


# ---------------------------------------------------------------------------------------------------- evaluation
def test_evaluation_scores_a_perfect_prediction_as_perfect(seq):
    from ros2_stream4d.train.evaluate import bar_check, evaluate_sequence, gt_relative_poses

    T = gt_relative_poses(seq)
    flat = np.full(seq.depth.shape[1:], float(seq.depth.mean()), np.float32)
    res = evaluate_sequence(T.copy(), seq.depth.astype(np.float32) * 3.0, seq, flat)  # depth only up to scale
    m, b = res["model"], res["baseline"]
    assert m["ate_rmse_m"] < 1e-6 and m["rpe_rot_deg"] < 1e-4 and m["rpe_trans_m"] < 1e-6
    assert m["depth_abs_rel"] < 1e-6 and m["depth_delta1"] == 1.0
    assert b["rpe_rot_deg"] > 0 and b["depth_abs_rel"] > 0
    bar = bar_check({"ground": res})
    assert bar["passed"]
    # the constant-pose baseline itself never passes
    assert not bar_check({"ground": {"model": b, "baseline": b}})["passed"]


def test_quick_eval_and_curves_run(tmp_path, batch):
    import json as _json

    from ros2_stream4d.train.trainer import plot_curves, quick_eval

    r = quick_eval(_model(), [batch])
    assert set(r) >= {"eval_depth_abs_rel", "eval_rot_err_deg", "eval_rel_rot_err_deg"}
    rows = [{"step": i, "loss": 1.0 / (i + 1), "loss_T": 0.1, "lr": 1e-3, **(r if i == 2 else {})} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(_json.dumps(x) for x in rows))
    plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
