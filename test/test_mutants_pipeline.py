"""Fast in-process tests of mapping/reconstructor.py and mapping/pipeline.py (no DDS, no model training).

They answer the mutation run over these two modules (docs/mutation.md): every test uses a fake session with exact,
asymmetric geometry (a depth ramp that differs along both image axes, a confidence ramp, a pose that turns and
moves along all three axes) on a 42 x 56 image, so the model geometry equals the source geometry and values can be
compared pixel for pixel.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from ros2_stream4d.mapping import conventions as cv
from ros2_stream4d.mapping import pipeline as pl
from ros2_stream4d.mapping import reconstructor as rc
from ros2_stream4d.mapping.preprocess import Preprocessor

H, W = 42, 56  # source = model geometry (Preprocessor(56) keeps it)
IMG = np.random.default_rng(7).integers(0, 256, (H, W, 3), dtype=np.uint8)


def rot(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def pose(i):
    return cv.make_transform(rot([0.3, 1, 0.2], 0.07 * i), [0.15 * i, -0.04 * i, 0.06 * i])


def K_of(h, w, fx=40.0, fy=46.0):
    return np.array([[fx, 0, 0.47 * w], [0, fy, 0.53 * h], [0, 0, 1]])


class Session:
    """The StreamingSession protocol with exact outputs; ``K`` / ``extrinsic`` can be overridden per test."""

    window, anchors = 8, 1

    def __init__(self, exact=True, K=None, extrinsic=None, delay=0.0, window=8, cache=None, can_shrink=True):
        self.exact, self.K, self.extrinsic, self.delay = exact, K, extrinsic, delay
        self.window, self.cache, self.can_shrink = window, cache, can_shrink
        self.i, self.calls, self.resets = 0, [], 0

    @property
    def frames_seen(self):
        return self.i

    def stats(self):
        return self.cache

    def shrunk(self, window):
        return Session(window=window) if self.can_shrink else None

    def reset(self):
        self.i, self.resets = 0, self.resets + 1

    def step(self, image, stamp_ns=None, mapping=None):
        self.calls.append((tuple(image.shape), image.dtype, stamp_ns, type(stamp_ns), mapping))
        if self.delay:
            time.sleep(self.delay)
        _, _, h, w = image.shape
        depth = 2.0 + np.linspace(0, 1.5, w)[None, :] + np.linspace(0, 0.4, h)[:, None]
        K = K_of(h, w) if self.K is None else self.K
        T = pose(self.i)
        self.i += 1
        world = cv.unproject_depth(depth, K_of(h, w), T)
        E = cv.inverse(T)[:3] if self.extrinsic is None else self.extrinsic
        conf = 1.0 + np.arange(h * w, dtype=np.float32).reshape(h, w) / (h * w)  # a ramp in [1, 2)
        out = {
            "depth": torch.tensor(depth, dtype=torch.float32)[None, :, :, None],
            "depth_conf": torch.tensor(conf)[None],
            "world_points": torch.tensor(world, dtype=torch.float32)[None],
            "world_points_conf": torch.tensor(5.0 - conf)[None],
        }
        if self.exact:
            out["extrinsic"], out["intrinsic"] = torch.tensor(E)[None], torch.tensor(K)[None]
        return out


def recon(session=None, **kw):
    return rc.StreamingReconstructor(session or Session(), Preprocessor(W), **kw)


# ------------------------------------------------------------------------------------------------ reconstructor
def test_prediction_masks_depth_and_points_and_returns_source_geometry():
    pred = recon().step(IMG, 0)
    assert pred.model_hw == (H, W) and pred.valid_mask().all()
    depth, pts = pred.depth.copy(), pred.points_world.copy()
    depth[1, 2], depth[2, 3], depth[3, 4] = 0.0, -1.0, np.nan
    depth[5, 6] = 0.5  # any positive depth is valid
    pts[4, 5, 1] = np.inf
    bad = dataclasses.replace(pred, depth=depth, points_world=pts)
    expect = np.ones((H, W), bool)
    expect[1, 2] = expect[2, 3] = expect[3, 4] = expect[4, 5] = False
    np.testing.assert_array_equal(bad.valid_mask(), expect)
    d, c = bad.depth_source(), bad.depth_conf_source()
    assert d.dtype == np.float32 and c.dtype == np.float32 and d.shape == (H, W)
    np.testing.assert_array_equal(np.isnan(d), ~expect)
    np.testing.assert_array_equal(np.isnan(c), ~expect)
    np.testing.assert_allclose(d[expect], depth[expect])
    np.testing.assert_allclose(c[expect], pred.depth_conf[expect])


def test_prediction_camera_points_intrinsics_and_scaling():
    r = recon()
    for i in range(3):
        pred = r.step(IMG, i)
    np.testing.assert_allclose(pred.T_cam_world, cv.inverse(pose(2)), atol=1e-9)
    cam = pred.points_camera()
    np.testing.assert_allclose(cam[..., 2], pred.depth, rtol=1e-5)  # camera-frame points: z is the depth
    np.testing.assert_allclose(pred.K_source, K_of(H, W), atol=1e-9)
    T0 = pred.T_world_cam.copy()
    s = pred.scaled(2.0).scaled(1.5)
    assert s.scale == pytest.approx(3.0) and pred.scale == 1.0
    np.testing.assert_array_equal(pred.T_world_cam, T0)  # the original is not modified
    np.testing.assert_allclose(s.T_world_cam[:3, 3], 3.0 * T0[:3, 3])
    np.testing.assert_allclose(s.T_world_cam[:3, :3], T0[:3, :3])
    np.testing.assert_allclose(s.depth, 3.0 * pred.depth, rtol=1e-6)
    np.testing.assert_allclose(s.points_world, 3.0 * pred.points_world, rtol=1e-6)
    assert s.depth.dtype == np.float32 and s.points_world.dtype == np.float32
    np.testing.assert_array_equal(s.K_model, pred.K_model)
    np.testing.assert_allclose(pred.scaled(0.5).depth, 0.5 * pred.depth, rtol=1e-6)  # shrinking is a scale too
    for bad in (0.0, -2.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="finite and positive"):
            pred.scaled(bad)


def test_stats_mean_and_timing_record():
    stats = rc.ReconstructorStats()
    stats.total_s["model"] = 3.0
    assert stats.mean_s() == {"preprocess": 0.0, "model": 3.0, "postprocess": 0.0}  # no frame: divided by 1
    r = recon(Session(delay=0.03))
    totals = {"preprocess": 0.0, "model": 0.0, "postprocess": 0.0}
    for i in range(2):
        r.step(IMG, i)
        for k in totals:
            totals[k] += r.stats.last_s[k]
    assert r.stats.frames == 2
    assert r.stats.last_s["model"] >= 0.03 > r.stats.last_s["preprocess"]  # the session's time is "model"
    assert 0 < r.stats.last_s["postprocess"] < 0.03 and r.stats.last_s["model"] < 10
    for k in totals:
        assert r.stats.total_s[k] == pytest.approx(totals[k])
        assert r.stats.mean_s()[k] == pytest.approx(totals[k] / 2)


def test_parse_dtype():
    assert rc.parse_dtype(torch.float16) is torch.float16
    assert rc.parse_dtype("BF16") is torch.bfloat16 and rc.parse_dtype("float32") is torch.float32
    assert rc.parse_dtype("Fp16") is torch.float16 and rc.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; expected one of \['bf16'"):
        rc.parse_dtype("int8")


def test_reconstructor_arguments_and_the_batch_it_sends():
    with pytest.raises(TypeError, match=r"object does not implement the StreamingSession protocol \(model/session.py: "
                                         r"window, anchors, frames_seen, step, reset, stats, shrunk\)"):
        rc.StreamingReconstructor(object())
    with pytest.raises(ValueError, match=r"intrinsics must be one of \('model', 'camera_info'\), got 'exif'"):
        recon(intrinsics="exif")
    with pytest.raises(ValueError, match=r"points_source must be one of \('depth', 'point_head'\), got 'lidar'"):
        recon(points_source="lidar")
    default = rc.StreamingReconstructor(Session())
    assert default.preprocessor.width == 518 and default.device == torch.device("cpu")
    assert default.dtype is torch.float32 and default.intrinsics == "model" and default.points_source == "depth"
    s = Session()
    r = recon(s, dtype="bf16")
    pred = r.step(IMG, np.int64(7))
    shape, dtype, stamp, stamp_type, mapping = s.calls[0]
    assert shape == (1, 3, H, W) and dtype is torch.bfloat16 and stamp == 7 and stamp_type is int
    assert mapping is pred.mapping and pred.stamp_ns == 7 and type(pred.stamp_ns) is int
    np.testing.assert_array_equal(pred.rgb_model, IMG)  # the image the model saw, back to the same bytes


def test_reset_forgets_the_stream_and_the_geometry():
    s = Session()
    r = recon(s)
    r.step(IMG, 0)
    r.step(IMG, 1)
    with pytest.raises(ValueError, match=r"from \(42, 56\) to \(56, 56\) mid-stream \(camera resolution changed\?\); "
                                         r"call reset\(\) first, or fix the size with Preprocessor\(height=\.\.\.\)"):
        r.step(np.zeros((56, 56, 3), np.uint8), 2)
    r.reset()
    assert s.resets == 1 and r.stats.frames == 0 and r.stats.total_s["model"] == 0.0
    assert r.step(np.zeros((56, 56, 3), np.uint8), 3).model_hw == (56, 56)


def test_intrinsics_sources_and_fallbacks():
    K_src = K_of(H, W, 33.0, 35.0)
    r = recon(intrinsics="camera_info")
    p = r.step(IMG, 0, K_src=K_src)
    assert p.intrinsics_source == "camera_info" and r.stats.fallback_intrinsics == 0
    np.testing.assert_allclose(p.K_model, K_src, atol=1e-9)
    p = recon(intrinsics="model").step(IMG, 0, K_src=K_src)  # the model's own, CameraInfo is ignored
    assert p.intrinsics_source == "session"
    np.testing.assert_allclose(p.K_model, K_of(H, W), atol=1e-9)
    assert p.K_model.dtype == np.float64
    # unusable model intrinsics: CameraInfo when there is one, else the nominal 60 deg
    zero = K_of(H, W, 0.0, 0.0)
    r = recon(Session(K=zero))
    p = r.step(IMG, 0, K_src=K_src)
    assert p.intrinsics_source == "camera_info" and r.stats.fallback_intrinsics == 1
    np.testing.assert_allclose(p.K_model, K_src, atol=1e-9)
    p = r.step(IMG, 1)
    assert p.intrinsics_source == "fallback" and r.stats.fallback_intrinsics == 2
    np.testing.assert_allclose(p.K_model, rc.nominal_K((H, W)))
    # the depth points are unprojected with the intrinsics in use
    np.testing.assert_allclose(p.points_camera(), cv.unproject_depth(p.depth, p.K_model, np.eye(4)), atol=1e-4)


def test_bad_session_outputs():
    class Out(Session):
        def __init__(self, edit, **kw):
            super().__init__(**kw)
            self.edit = edit

        def step(self, image, stamp_ns=None, mapping=None):
            return self.edit(super().step(image, stamp_ns, mapping))

    with pytest.raises(TypeError, match="must return a dict, got list"):
        recon(Out(lambda o: list(o))).step(IMG, 0)
    with pytest.raises(KeyError, match="^\"session output has neither 'pose_enc' nor 'extrinsic'/'intrinsic'\"$"):
        recon(Out(lambda o: o, exact=False)).step(IMG, 0)
    with pytest.raises(KeyError, match="neither 'pose_enc'"):  # both exact outputs are needed
        recon(Out(lambda o: {k: v for k, v in o.items() if k != "intrinsic"})).step(IMG, 0)
    E = cv.inverse(pose(1))[:3].copy()
    E[1, 3] = np.nan
    with pytest.raises(RuntimeError, match="non-finite pose for the frame at 5 ns"):
        recon(Session(extrinsic=E)).step(IMG, 5)


def test_point_head_source_takes_the_heads_points_and_confidence():
    r = recon(points_source="point_head")
    r.step(IMG, 0)
    p = r.step(IMG, 1)
    d = recon()
    d.step(IMG, 0)
    q = d.step(IMG, 1)
    np.testing.assert_allclose(p.points_world, q.points_world, atol=1e-4)
    np.testing.assert_allclose(p.points_conf, 5.0 - q.depth_conf, atol=1e-6)
    np.testing.assert_array_equal(q.points_conf, q.depth_conf)
    assert p.points_world.dtype == np.float32 and p.points_conf.dtype == np.float32


def test_nominal_and_usable_intrinsics():
    K = rc.nominal_K((40, 100))
    f = 50.0 / np.tan(np.deg2rad(30.0))
    np.testing.assert_allclose(K, [[f, 0, 50.0], [0, f, 20.0], [0, 0, 1]])
    assert rc.nominal_K((40, 100), 90.0)[0, 0] == pytest.approx(50.0)
    good = K_of(4, 6)
    assert rc.usable_K(good) is True
    assert rc.usable_K(K_of(4, 6, 0.5, 0.5)) is True  # small focal lengths (det 0.25) are usable
    for i, j, v in ((0, 0, 0.0), (1, 1, 0.0), (0, 0, -3.0), (1, 1, -3.0), (0, 2, np.nan), (2, 2, 0.0)):
        K = good.copy()
        K[i, j] = v
        assert rc.usable_K(K) is False, (i, j, v)


def test_numpy_and_frame_helpers():
    t = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=False) * 1.5
    a = rc._numpy(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and (a == 1.5).all()
    g = rc._numpy(torch.ones(2, requires_grad=True))
    assert g.dtype == np.float32
    np.testing.assert_array_equal(rc._numpy([1, 2]), [1, 2])
    f64 = rc._frame({"x": np.ones((1, 3, 4))}, "x", (3, 4))
    assert f64.dtype == np.float32
    batch = torch.stack([torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)])  # [B=2, h, w]
    f = rc._frame({"x": batch}, "x", (3, 4))
    assert f.dtype == np.float32 and f.flags.c_contiguous and (f == 1.0).all()  # the first of the batch
    assert (rc._frame({"x": torch.full((3, 4), 4.0)}, "x", (3, 4)) == 4.0).all()  # unbatched
    d = rc._frame({"d": torch.full((1, 3, 4, 1), 3.0)}, "d", (3, 4), trailing=(1,), squeeze_last=True)
    assert d.shape == (3, 4) and (d == 3.0).all()
    d = rc._frame({"d": torch.full((3, 4, 1), 3.0)}, "d", (3, 4), trailing=(1,), squeeze_last=True)
    assert d.shape == (3, 4)  # unbatched with the trailing axis
    with pytest.raises(ValueError, match=r"'d' has shape \(2, 3, 5, 1\), expected \[B, 3, 4, 1\]"):
        rc._frame({"d": torch.zeros(2, 3, 5, 1)}, "d", (3, 4), trailing=(1,), squeeze_last=True)
    with pytest.raises(ValueError, match=r"expected \[B, 3, 4, 3\]"):
        rc._frame({"p": torch.zeros(1, 3, 5, 3)}, "p", (3, 4), trailing=(3,))
    with pytest.raises(KeyError, match=r"lacks 'y' \(has \['a', 'x'\]\)"):
        rc._frame({"x": batch, "a": batch}, "y", (3, 4))


# ------------------------------------------------------------------------------------------------ model specs
def test_model_spec_resolution_and_card_lookup(tmp_path):
    assert rc.resolve_model_spec("  random-small ") == ("random", None)
    dirs = rc.model_card_dirs()
    assert dirs and dirs[0] == rc.Path(rc.__file__).resolve().parents[2] / "model"
    assert all(d.is_dir() for d in dirs)
    for name in ("stream4d-small", "stream4d-small.yaml"):
        kind, path = rc.resolve_model_spec(name)
        assert kind == "card" and path == dirs[0] / "stream4d-small.yaml"
    upper = tmp_path / "c.YML"
    upper.write_text("name: c\n")
    assert rc.resolve_model_spec(str(upper)) == ("card", upper)
    yml = tmp_path / "named"
    yml.mkdir()
    (yml / "tiny.yml").write_text("name: t\n")
    assert rc.resolve_model_spec(str(yml / "tiny.yml")) == ("card", yml / "tiny.yml")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert rc.resolve_model_spec(str(weights)) == ("checkpoint", weights)
    with pytest.raises(FileNotFoundError, match=rf"'nothing' is neither 'random-small', .* model card in {dirs[0]}"):
        rc.resolve_model_spec("nothing")
    missing_yaml = tmp_path / "gone.yaml"
    with pytest.raises(FileNotFoundError):
        rc.resolve_model_spec(str(missing_yaml))


def test_model_cards_input_width_and_config(tmp_path):
    card = tmp_path / "w224.yaml"
    card.write_text("name: w\ninput_width: 224\nconfig: {preset: small}\n")
    assert rc.model_input_width(str(card)) == 224
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: p\ndescription: d\nlicense: x\nsource: s\ntraining: {}\nmetrics: {}\nseed: 1\n"
                     "config: {preset: small}\n")
    assert rc.model_input_width(str(plain), default=300) == 300
    assert rc.model_input_width("random-small", default=301) == 301
    assert rc.model_input_width("no-such-card", default=302) == 302
    assert rc.model_input_width("random-small") == 518
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"x")
    assert rc.model_input_width(str(ckpt), default=303) == 303
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping, got list"):
        rc._read_card(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: t\nweigths: x\nconfg: {}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['confg', 'weigths'\]"):
        rc._read_card(typo)
    from ros2_stream4d.model.config import ModelConfig

    d = {"preset": "small", "depth": 3}
    assert rc._model_config(d) == ModelConfig.small(depth=3) and d == {"preset": "small", "depth": 3}
    assert rc._model_config({"embed_dim": 32, "num_heads": 4}) == ModelConfig.from_dict({"embed_dim": 32, "num_heads": 4})
    with pytest.raises(ValueError, match="unknown model config preset 'large'"):
        rc._model_config({"preset": "large"})


def test_backend_factory_settings_and_cards(tmp_path):
    d = rc.ModelBackendFactory()
    assert (d.window, d.anchors, d.backend, d.dtype) == (16, 1, "sdpa", torch.float32)
    f = rc.ModelBackendFactory(dtype="bf16", window=5, anchors=2.0, backend="math")
    assert f.device == torch.device("cpu") and f.dtype is torch.bfloat16 and f.window == 5
    assert f.anchors == 2 and type(f.anchors) is int and f.backend == "math" and f.allow_download is False
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: nothing\n")
    with pytest.raises(ValueError, match="has neither weights nor config"):
        f.load_model(str(empty))
    card = tmp_path / "tiny.yaml"
    card.write_text("name: tiny\nconfig: {preset: small, depth: 1, img_size: 28}\nseed: 3\n")
    state = torch.random.get_rng_state()
    m3 = rc.ModelBackendFactory().load_model(str(card))
    assert torch.equal(torch.random.get_rng_state(), state), "the seeded init leaves the global RNG alone"
    again = rc.ModelBackendFactory().load_model(str(card))
    card.write_text("name: tiny\nconfig: {preset: small, depth: 1, img_size: 28}\nseed: 4\n")
    m4 = rc.ModelBackendFactory().load_model(str(card))
    p3, pa, p4 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m3, again, m4))
    assert torch.equal(p3, pa) and not torch.equal(p3, p4)
    assert not m3.training
    session = rc.ModelBackendFactory(window=3, anchors=2).build_session(str(card))
    assert session.window == 3 and session.anchors == 2
    s = rc.build_session(str(card))
    assert (s.window, s.anchors) == (16, 1)
    assert rc.build_session(str(card), window=5).window == 5
    from ros2_stream4d.model.config import ModelConfig
    from ros2_stream4d.model.hub import CheckpointNotAvailable

    assert rc.ModelBackendFactory().load_model("random-small").cfg == ModelConfig.small()
    weighted = tmp_path / "weighted.yaml"
    weighted.write_text("name: w\nconfig: {preset: small, depth: 1}\nweights: no-such-weights\n")
    with pytest.raises(CheckpointNotAvailable, match="checkpoint 'no-such-weights' is not a file and not a known name"):
        f.load_model(str(weighted))  # weights named: neither beside the card nor a known checkpoint


# ------------------------------------------------------------------------------------------------ pipeline
def cfg(**kw):
    base = dict(input_width=W, mesh_enabled=False, occupancy_enabled=False, conf_percentile=0.0,
                map_voxel_size=0.05, map_stride=1, map_cloud_stride=1)
    base.update(kw)
    return pl.PipelineConfig(**base)


def pipe(session=None, **kw):
    p = pl.MappingPipeline(cfg(**kw), session or Session())
    frames = []
    integrate = p.map.integrate

    def recording(frame):
        frames.append(frame)
        return integrate(frame)

    p.map.integrate = recording
    p.map_frames = frames
    return p


def test_config_from_params():
    c = pl.PipelineConfig.from_params({"input_width": 224, "not_a_field": 1, "gate_threshold": 3.0,
                                       "map_start_pose": [1, 2, 3, 0.5]})
    assert c.input_width == 224 and c.gate_threshold == 3.0 and c.map_start_pose == ()
    c = pl.PipelineConfig.from_params({"map_start_pose": [1, 2, 3, 0.5], "map_load_path": "/m"})
    assert c.map_start_pose == (1, 2, 3, 0.5) and c.map_load_path == "/m"
    assert pl.PipelineConfig.from_params({}) == pl.PipelineConfig()


def test_camera_only_frames_depth_geometry_and_cloud():
    p = pipe()
    assert p.describe() == "Session" and p.reconstructor.points_source == "depth"
    assert pipe(points_source="point_head").reconstructor.points_source == "point_head"
    assert pipe(conf_percentile=0.5).cloud_options.conf_percentile == 0.5
    for i in range(3):
        out = p.process(IMG, 100 + i, camera=2)
    assert isinstance(out, pl.Processed)
    r = out.result
    assert r.stamp_ns == 102 and r.camera == 2 and r.T_map_base is None and r.T_map_odom is None
    np.testing.assert_allclose(r.T_map_cam, cv.T_MAP_WORLD @ pose(2), atol=1e-9)
    assert r.scale == 1.0 and type(r.scale) is float and r.scale_valid is False and r.odom_correction is None
    np.testing.assert_allclose(r.depth, r.prediction.depth, rtol=1e-6)  # camera geometry = model geometry here
    np.testing.assert_allclose(r.confidence, r.prediction.depth_conf, rtol=1e-6)
    np.testing.assert_allclose(r.K, K_of(H, W), atol=1e-9)
    assert r.depth.dtype == np.float32 and r.confidence.dtype == np.float32
    # the cloud in map: every valid pixel, map = T_MAP_WORLD . world
    assert r.cloud_xyz.shape == (H * W, 3) and r.cloud_rgb.shape == (H * W, 3) and r.cloud_conf.shape == (H * W,)
    np.testing.assert_allclose(r.cloud_xyz, cv.transform_points(cv.T_MAP_WORLD, r.prediction.points_world.reshape(-1, 3)),
                               atol=1e-4)
    # the map got the frame in map, at its stamp, with the model's depth, colour and K
    f = p.map_frames[-1]
    assert f.stamp_ns == 102
    np.testing.assert_allclose(f.T_map_cam, r.T_map_cam)
    np.testing.assert_allclose(f.depth, r.prediction.depth)
    np.testing.assert_array_equal(f.rgb, IMG)
    np.testing.assert_allclose(f.K, K_of(H, W))
    assert set(r.timings) == {"preprocess", "model", "postprocess", "scale_and_frames", "cloud", "map_fusion",
                              "pipeline_total"}
    assert r.timings["pipeline_total"] >= r.timings["map_fusion"] and r.timings["model"] == p.reconstructor.stats.last_s["model"]
    assert r.timings is not p.timings
    stats = p.stats()
    assert stats["frames"] == 3 and stats["scale"] == "1.0000" and stats["scale valid"] is False
    assert stats["scale source"] == "none" and stats["frames with nominal 60 deg intrinsics"] == 0
    assert "time pipeline_total [ms]" in stats and "cache frames held" not in stats


def test_model_depth_geometry_and_camera_cloud_frame():
    tall = np.ascontiguousarray(np.concatenate([IMG, IMG[:28]], axis=0))  # 70 x 56: cropped to 56 x 56
    p = pipe(depth_geometry="model", cloud_frame="camera")
    p.process(tall, 0)
    r = p.process(tall, 1).result
    assert r.depth.shape == (56, 56) and r.confidence.shape == (56, 56)
    np.testing.assert_allclose(r.K, r.prediction.K_model)
    np.testing.assert_allclose(r.depth, r.prediction.depth, rtol=1e-6)
    np.testing.assert_allclose(r.confidence, r.prediction.depth_conf, rtol=1e-6)
    cam = r.prediction.points_camera().reshape(-1, 3)
    np.testing.assert_allclose(r.cloud_xyz, cam, atol=1e-4)  # the cloud stays in the camera frame
    # ... but the map gets map coordinates
    np.testing.assert_allclose(p.map_frames[-1].T_map_cam, cv.T_MAP_WORLD @ pose(1), atol=1e-9)
    q = pipe(depth_geometry="camera")
    rq = q.process(tall, 0).result
    assert rq.depth.shape == (70, 56) and np.isnan(rq.depth[:7]).all() and np.isnan(rq.depth[63:]).all()
    assert np.isfinite(rq.depth[7:63]).all() and rq.confidence.shape == (70, 56)
    np.testing.assert_allclose(rq.K, rq.prediction.K_source)


def test_robot_base_odom_and_start_pose():
    T_base_cam = cv.make_transform(rot([1, 0.2, 0], 1.4), [0.2, -0.05, 0.4])
    T_odom_base = cv.make_transform(rot([0, 0, 1], 0.3), [1.0, 2.0, 0.0])
    p = pipe()
    p.process(IMG, 0, T_base_cam=T_base_cam, T_odom_base=T_odom_base)
    r = p.process(IMG, 1, T_base_cam=T_base_cam, T_odom_base=T_odom_base).result
    np.testing.assert_allclose(r.T_map_cam, T_base_cam @ pose(1), atol=1e-9)
    np.testing.assert_allclose(r.T_map_base, r.T_map_cam @ cv.inverse(T_base_cam), atol=1e-9)
    np.testing.assert_allclose(r.T_map_odom, cv.map_to_odom(r.T_map_base, T_odom_base), atol=1e-9)
    r = p.process(IMG, 2, T_base_cam=T_base_cam).result  # no odometry: no map -> odom
    assert r.T_map_base is not None and r.T_map_odom is None
    start = (1.0, -2.0, 0.5, 0.7)
    p = pipe(map_start_pose=start)  # a start pose without a map to load still applies when given directly
    r = p.process(IMG, 0, T_base_cam=T_base_cam).result
    np.testing.assert_allclose(r.T_map_cam, pl.start_pose_matrix(start) @ T_base_cam, atol=1e-9)
    r = p.process(IMG, 1, T_base_cam=T_base_cam).result
    np.testing.assert_allclose(r.T_map_cam, pl.start_pose_matrix(start) @ T_base_cam @ pose(1), atol=1e-9)


def test_start_pose_matrix():
    assert pl.start_pose_matrix(None) is None and pl.start_pose_matrix(()) is None
    T = pl.start_pose_matrix((1.0, -2.0, 0.5, 0.3))
    c, s = np.cos(0.3), np.sin(0.3)
    np.testing.assert_allclose(T, [[c, -s, 0, 1.0], [s, c, 0, -2.0], [0, 0, 1, 0.5], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match=r"map_start_pose must be \[x, y, z, yaw\], got \[1.0, 2.0, 3.0\]"):
        pl.start_pose_matrix((1.0, 2.0, 3.0))
    with pytest.raises(ValueError):
        pl.start_pose_matrix((1.0, 2.0, 3.0, 4.0, 5.0))


def test_gate_republishes_the_last_result_restamped():
    p = pipe(gate_threshold=5.0, gate_max_skip=3)
    assert p.gate.enabled and p.gate.threshold == pytest.approx(5.0 / 255.0) and p.gate.max_skip == 3
    first = p.process(IMG, 10, camera=0).result
    out = p.process(IMG, 20, camera=1)
    assert isinstance(out, pl.Gated) and out.result.stamp_ns == 20 and out.result.camera == 1
    np.testing.assert_array_equal(out.result.T_map_cam, first.T_map_cam)
    assert p.last is first and first.stamp_ns == 10 and len(p.map_frames) == 1
    other = 255 - IMG
    assert isinstance(p.process(other, 30), pl.Processed)
    q = pipe(gate_threshold=5.0)
    q.gate.check(IMG)  # the gate has seen this image, no frame has been processed
    out = q.process(IMG, 5)
    assert isinstance(out, pl.Gated) and out.result is None
    off = pipe(gate_threshold=0.0)
    assert not off.gate.enabled
    assert all(isinstance(off.process(IMG, i), pl.Processed) for i in range(3))


def test_update_config_applies_the_live_settings():
    p = pipe()
    p.update_config(cfg(gate_threshold=51.0, gate_max_skip=7, conf_threshold=1.5, conf_percentile=30.0,
                        cloud_max_points=100, cloud_frame="camera"))
    assert p.gate.enabled and p.gate.threshold == pytest.approx(0.2) and p.gate.max_skip == 7
    o = p.cloud_options
    assert o.conf_threshold == 1.5 and o.conf_percentile == 30.0 and o.max_points == 100 and o.frame == "camera"
    assert p.cfg.gate_max_skip == 7
    p.update_config(cfg(conf_threshold=0.0, conf_percentile=0.0, cloud_frame="map"))
    o = p.cloud_options
    assert not p.gate.enabled and o.conf_threshold is None and o.conf_percentile is None and o.frame == "world"
    r = p.process(IMG, 0).result
    assert len(r.cloud_xyz) == H * W


def test_cloud_and_map_confidence_filters():
    p = pipe(conf_threshold=1.25, conf_percentile=0.0, cloud_max_points=10_000_000)
    r = p.process(IMG, 0).result
    conf = r.prediction.depth_conf
    keep = conf >= 1.25
    assert 0 < keep.sum() < H * W
    assert len(r.cloud_xyz) == keep.sum() and (r.cloud_conf >= 1.25 - 1e-6).all()
    f = p.map_frames[-1]
    np.testing.assert_array_equal(np.isfinite(f.depth), keep)
    np.testing.assert_allclose(f.depth[keep], r.prediction.depth[keep])
    np.testing.assert_array_equal(f.conf, conf)
    assert f.depth.dtype == np.float32
    # the map's percentile cut: of a regular 4-pixel subsample of the valid pixels, the most confident kept
    q = pipe(conf_percentile=60.0)
    q.process(IMG, 0)
    conf = q.last.prediction.depth_conf
    cut = np.percentile(conf[::4, ::4], 60.0)
    kept = np.isfinite(q.map_frames[-1].depth)
    np.testing.assert_array_equal(kept, conf >= cut)
    assert 0.3 * H * W < kept.sum() < 0.5 * H * W
    assert len(q.last.cloud_xyz) == pytest.approx(0.4 * H * W, abs=2)


def test_map_percentile_uses_the_valid_pixels_of_the_subsample():
    p = pipe(conf_percentile=50.0)
    pred = pred0 = p.reconstructor.step(IMG, 0)
    depth = pred.depth.copy()
    depth[:, : W // 2] = np.nan  # the low-confidence half ... no: invalid columns on the left
    conf = pred.depth_conf.copy()
    conf[:, : W // 2] = 100.0  # invalid pixels with a huge confidence must not move the cut
    pred = dataclasses.replace(pred, depth=depth, depth_conf=conf)
    f = p._map_frame(pred, np.eye(4), 3)
    right = conf[:, W // 2:]
    cut = np.percentile(conf[::4, ::4][np.isfinite(depth[::4, ::4])], 50.0)
    np.testing.assert_array_equal(np.isfinite(f.depth[:, W // 2:]), right >= cut)
    assert not np.isfinite(f.depth[:, : W // 2]).any()
    assert f.stamp_ns == 3
    # a subsample with no valid pixel falls back to every valid pixel
    depth2 = np.full_like(depth, np.nan)
    depth2[1:3, 1:4] = 2.0  # no pixel on the 4-grid
    conf2 = pred.depth_conf.copy()
    conf2[1:3, 1:4] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    f = p._map_frame(dataclasses.replace(pred, depth=depth2, depth_conf=conf2), np.eye(4), 4)
    np.testing.assert_array_equal(np.isfinite(f.depth[1:3, 1:4]), conf2[1:3, 1:4] >= 3.5)
    # a non-finite confidence drops the pixel
    conf3 = pred0.depth_conf.copy()
    conf3[5, 6] = np.nan
    q = pipe()
    f = q._map_frame(dataclasses.replace(pred0, depth_conf=conf3), np.eye(4), 5)
    assert np.isnan(f.depth[5, 6]) and np.isfinite(f.depth).sum() == H * W - 1


def test_scale_sources_through_the_pipeline():
    assert isinstance(pipe(scale_source="fixed", fixed_scale=2.5).scale_source, pl.FixedScale)
    assert isinstance(pipe(scale_source="depth").scale_source, pl.DepthSensorScale)
    assert isinstance(pipe(scale_source="odometry").scale_source, pl.OdometryScale)
    none = pipe(scale_source="none", fixed_scale=3.0)
    assert isinstance(none.scale_source, pl.FixedScale) and none.scale_source.scale == 1.0
    p = pipe(scale_source="fixed", fixed_scale=2.5)
    raw = recon().step(IMG, 0)
    r = p.process(IMG, 0).result
    assert r.scale == 2.5 and r.scale_valid is True and r.prediction.scale == 2.5
    np.testing.assert_allclose(r.prediction.depth, 2.5 * raw.depth, rtol=1e-6)
    np.testing.assert_allclose(r.depth, 2.5 * raw.depth, rtol=1e-6)
    assert p.stats()["scale"] == "2.5000" and p.stats()["scale source"] == "fixed"
    # a metric depth sensor three times the model's depth
    d = pipe(scale_source="depth")
    for i in range(3):
        r = d.process(IMG, i, sensor_depth=3.0 * recon().step(IMG, 0).depth).result
    assert r.scale == pytest.approx(3.0, rel=1e-4) and r.scale_valid
    w = pipe(scale_source="depth")
    r = w.process(IMG, 0, sensor_depth=np.ones((H + 1, W), np.float32)).result  # another geometry: ignored
    assert w.scale_source.samples == 0 and r.scale == 1.0 and r.scale_valid is False
    r = w.process(IMG, 1)  # no sensor depth
    assert w.scale_source.samples == 0


def test_odometry_scale_through_the_pipeline():
    T_base_cam = cv.make_transform(rot([1, 0, 0], -np.pi / 2), [0.1, 0.0, 0.3])
    p = pipe(scale_source="odometry")
    results = []
    for i in range(6):
        T_odom_cam = cv.make_transform(pose(i)[:3, :3], 2.0 * pose(i)[:3, 3])  # metres = 2 x model units
        T_odom_base = T_odom_cam @ cv.inverse(T_base_cam)
        results.append(p.process(IMG, i, T_base_cam=T_base_cam, T_odom_base=T_odom_base).result)
    np.testing.assert_array_equal(p.scale_source.T_base_cam, T_base_cam)
    assert results[-1].scale_valid and results[-1].scale == pytest.approx(2.0, rel=1e-3)
    q = pipe(scale_source="odometry")
    q.process(IMG, 0, T_odom_base=np.eye(4))  # odometry without the camera extrinsic
    assert q.scale_source.T_base_cam is None


def test_reset_continues_the_map_where_the_last_stream_ended():
    s = Session()
    p = pipe(s, gate_threshold=1.0)
    p.reset()  # nothing processed yet: the next stream starts at the map origin
    r = p.process(IMG, 0).result
    np.testing.assert_allclose(r.T_map_cam, cv.T_MAP_WORLD, atol=1e-12)
    r = p.process(255 - IMG, 1).result
    last = r.T_map_cam.copy()
    p.reset()
    assert s.resets == 2 and p.last is None and p.T_map_world is None and p.reconstructor.stats.frames == 0
    assert isinstance(p.process(255 - IMG, 2), pl.Processed), "the gate was reset"
    r2 = p.last
    np.testing.assert_allclose(r2.T_map_cam, last, atol=1e-9)
    r3 = p.process(IMG, 3).result
    np.testing.assert_allclose(r3.T_map_cam, last @ pose(1), atol=1e-9)
    assert p._next_T_map_world is None


def test_map_integration_moves_the_frames_entering_the_map():
    p = pipe()
    # the rigid map -> odom a back-end publishes does not place frames in the map ...
    p.map_correction = cv.make_transform(rot([1, 0, 0], 0.4), [2.0, 0.0, 0.0])
    r = p.process(IMG, 0).result
    np.testing.assert_allclose(p.map_frames[-1].T_map_cam, r.T_map_cam, atol=1e-12)
    np.testing.assert_allclose(r.T_map_cam, cv.T_MAP_WORLD, atol=1e-12)  # the published pose stays odometry
    # ... its Sim(3) correction does, scale included
    C = cv.make_transform(rot([0, 0, 1], 0.2), [0.5, -0.3, 0.1])
    C[:3, :3] *= 1.1
    p.map_integration = C
    r = p.process(IMG, 1).result
    np.testing.assert_allclose(p.map_frames[-1].T_map_cam, C @ r.T_map_cam, atol=1e-12)
    assert r.odom_correction is None  # no back-end


def test_pipeline_with_backend_reports_its_correction():
    p = pipe(backend=True, segment_max_frames=50, loop_min_similarity=0.5, backend_apply_rate=1000.0)
    try:
        assert "back-end on" in p.describe() and p.backend is not None
        assert isinstance(p.reconstructor.session, pl.SegmentedSession)
        r = p.process(IMG, 0).result
        np.testing.assert_array_equal(r.odom_correction, np.eye(4))
        assert "backend" in r.timings and r.timings["pipeline_total"] >= r.timings["backend"]
        assert p.backend.detector.config.min_similarity == 0.5
        p.update_config(cfg(backend=True, loop_min_similarity=0.9, loop_min_inliers=33, loop_search_radius=2.5,
                            loop_search_drift_fraction=0.2))
        lc = p.backend.detector.config
        assert (lc.min_similarity, lc.min_inliers, lc.search_radius_m, lc.search_drift_fraction) == (0.9, 33, 2.5, 0.2)
        C = cv.make_transform(rot([0, 0, 1], 0.3), [1.0, 2.0, 0.0])
        p.map_correction = C
        r = p.process(IMG, 1).result
        np.testing.assert_allclose(r.odom_correction, C)
        assert r.odom_correction is not p.map_correction
        np.testing.assert_allclose(r.cloud_xyz, cv.transform_points(C @ cv.T_MAP_WORLD,
                                                                    r.prediction.points_world.reshape(-1, 3)),
                                   atol=1e-4)
        assert r.cloud_xyz.dtype == np.float32
        stats = p.stats()
        assert stats["backend segments"] == 1 and stats["backend segment alignments failed"] == 0
        assert "backend keyframes" in stats
        assert p.settle_backend(10.0)
        old = p.backend
        p.erase_map()
        assert p.backend is not old and p.map_correction is None and p.map_size() == 0
        assert p.backend.detector.config.min_similarity == 0.9  # the new back-end takes the settings in force
    finally:
        p.close()
    assert p.backend is None
    q = pipe()
    assert q.settle_backend(0.1) is True


def test_backend_settings_reach_the_segments_loops_and_graph():
    c = cfg(segment_min_anchor_overlap=0.42, segment_max_frames=77, segment_min_frames=11,
            segment_overlap_frames=5, loop_min_similarity=0.61, loop_min_inliers=17, loop_search_radius=1.7,
            loop_search_drift_fraction=0.07, backend_max_correction=3.3, loop_gate_distance=0.9, loop_release_after=5,
            loop_release_wait=13, backend_drift_calibration=False)
    rp = pl.reanchor_policy(c)
    assert (rp.min_anchor_overlap, rp.max_segment_frames, rp.min_segment_frames, rp.overlap_frames) == (0.42, 77, 11, 5)
    bc = pl.backend_config(c)
    lc = bc.loops
    assert (lc.min_similarity, lc.min_inliers, lc.search_radius_m, lc.search_drift_fraction) == (0.61, 17, 1.7, 0.07)
    assert bc.graph.max_correction_m == 3.3
    assert bc.graph.drift_calibration is False and pl.backend_config(cfg()).graph.drift_calibration is True
    assert (bc.graph.gate_trans_m, bc.release_after, bc.release_wait) == (0.9, 5, 13)


def test_map_config_takes_every_map_setting():
    c = pl.PipelineConfig(map_voxel_size=0.07, map_max_points=1234, mesh_enabled=False, tsdf_voxel_size=0.09,
                          tsdf_trunc_voxels=5.5, map_depth_max=4.4, map_cloud_depth_max=3.3, tsdf_device="CPU:1",
                          occupancy_enabled=False, occupancy_resolution=0.11, occupancy_floor_z=-0.2,
                          occupancy_min_height=0.15, occupancy_max_height=1.7, occupancy_max_range=6.6,
                          occupancy_slab_height=0.3, map_keyframe_distance=0.45, map_keyframe_angle=12.0,
                          map_keyframe_max_frames=7, map_stride=3, map_cloud_stride=4, map_max_keyframes_in_memory=9,
                          map_spill_dir="/tmp/spill-x", backend=True, map_cloud_surface_voxels=1.5,
                          map_cloud_surface_pull=0.4, map_conf_percentile=40.0)
    m = pl.map_config(c)
    assert m.to_dict() == dict(
        m.to_dict(), cloud_voxel_size=0.07, cloud_max_points=1234, tsdf=False, tsdf_voxel_size=0.09,
        tsdf_trunc_voxels=5.5, depth_max=4.4, cloud_depth_max=3.3, tsdf_device="CPU:1", occupancy=False,
        occupancy_resolution=0.11, occupancy_floor_z=-0.2, occupancy_min_height=0.15, occupancy_max_height=1.7,
        occupancy_max_range=6.6, occupancy_slab_height=0.3, keyframe_distance=0.45, keyframe_angle_deg=12.0,
        keyframe_max_frames=7, stride=3, cloud_stride=4, max_keyframes_in_memory=9, spill_dir="/tmp/spill-x",
        background_rebuild=True, cloud_surface_voxels=1.5, cloud_surface_pull=0.4, conf_percentile=40.0)
    assert pl.map_config(pl.PipelineConfig()).background_rebuild is False


def test_window_shrink_and_cache_stats():
    from ros2_stream4d.model.kv_cache import CacheStats

    p = pipe(Session(window=8))
    p.process(IMG, 0)
    assert p.window() == 8
    assert p.shrink_window() == 4
    assert p.window() == 4 and p.last is None and p.reconstructor.session.i == 0
    assert isinstance(p.process(IMG, 1), pl.Processed)
    assert p.shrink_window() == 2 and p.shrink_window() == 1 and p.shrink_window() is None
    assert pipe(Session(window=8, can_shrink=False)).shrink_window() is None
    s = Session(window=None)
    u = pipe(s)
    for i in range(7):
        u.process(IMG, i)
    new = u.shrink_window()
    assert new == 3 and type(new) is int  # an unlimited window: half of the frames held, (7 - 1) // 2
    s = Session(window=None)
    u = pipe(s)
    u.process(IMG, 0)
    u.process(IMG, 1)
    assert u.shrink_window() is None  # (2 - 1) // 2 = 0
    names = [f.name for f in dataclasses.fields(CacheStats)]
    values = {n: 0 for n in names}
    values.update(frames_held=5, capacity_frames=None, aggregator_bytes=1000, camera_bytes=24)
    c = pipe(Session(cache=CacheStats(**values)))
    stats = c.stats()
    assert stats["cache frames held"] == 5 and stats["cache capacity"] == "unlimited" and stats["cache bytes"] == 1024
    values.update(capacity_frames=9)
    assert pipe(Session(cache=CacheStats(**values))).stats()["cache capacity"] == 9


def test_save_and_load_a_map(tmp_path):
    p = pipe(scale_source="fixed", fixed_scale=2.0, map_keyframe_max_frames=1)
    for i in range(3):
        p.process(IMG, i)
    ply = p.save_map(tmp_path / "cloud.PLY")
    assert ply == str(tmp_path / "cloud.PLY") and (tmp_path / "cloud.PLY").stat().st_size > 0
    assert not (tmp_path / "cloud.PLY").is_dir()
    out = p.save_map(tmp_path / "mapdir")
    assert out == str(tmp_path / "mapdir") and (tmp_path / "mapdir" / "metadata.json").is_file()
    import json

    meta = json.loads((tmp_path / "mapdir" / "metadata.json").read_text())
    assert meta["scale"] == 2.0 and meta["scale_valid"] is True
    empty = pipe()
    empty.save_map(tmp_path / "empty")
    meta = json.loads((tmp_path / "empty" / "metadata.json").read_text())
    assert meta["scale"] is None and meta["scale_valid"] is False
    # load it with a start pose: the next stream's body frame starts there
    s = Session()
    q = pipe(s)
    q.process(IMG, 0)
    start = pl.start_pose_matrix((0.5, 0.25, 0.0, 0.4))
    meta = q.load_map(tmp_path / "mapdir", start)
    assert meta["keyframes"] == len(q.keyframe_poses()) == 3 and s.resets == 1
    assert q.last is None and q.T_map_world is None
    r = q.process(IMG, 1).result
    np.testing.assert_allclose(r.T_map_cam, start @ cv.T_MAP_WORLD, atol=1e-9)
    q.load_map(tmp_path / "mapdir")
    r = q.process(IMG, 2).result
    np.testing.assert_allclose(r.T_map_cam, cv.T_MAP_WORLD, atol=1e-9)
    # keyframe pose updates go through to the map
    kf = q.keyframe_poses()
    moved = {k: cv.make_transform(t=[0.0, 0.0, 1.0]) @ v for k, v in kf.items()}
    q.update_keyframe_poses({str(k): v.tolist() for k, v in moved.items()})
    for k, v in q.keyframe_poses().items():
        np.testing.assert_allclose(v, moved[k])
    q.update_keyframe_pose(np.int64(0), kf[0])
    np.testing.assert_allclose(q.keyframe_poses()[0], kf[0])
    assert q.map_size() == len(q.map_points()[0]) > 0
    # a map to load at construction, with its start pose
    c = pl.MappingPipeline(cfg(map_load_path=str(tmp_path / "mapdir"), map_start_pose=(1.0, 0.0, 0.0, 0.0)),
                           Session())
    assert len(c.keyframe_poses()) == 3
    r = c.process(IMG, 0).result
    np.testing.assert_allclose(r.T_map_cam[:3, 3], [1.0, 0.0, 0.0], atol=1e-9)


def test_products_of_the_map():
    p = pipe(mesh_enabled=True, occupancy_enabled=True, occupancy_floor_z=-5.0, occupancy_max_height=10.0,
             tsdf_voxel_size=0.2)
    for i in range(2):
        p.process(IMG, i)
    xyz, rgb, conf = p.map_points()
    assert 0 < len(xyz) <= p.map_size() and rgb.dtype == np.uint8  # ~/map leaves out what the TSDF contradicts
    v, t, c = p.mesh()
    assert len(v) > 0 and len(t) > 0
    data, origin, res = p.occupancy()
    assert res == pytest.approx(0.05) and (data != -1).any()


def test_out_of_memory_errors():
    assert pl.is_out_of_memory(torch.OutOfMemoryError("x")) is True
    assert pl.is_out_of_memory(RuntimeError("CUDA Out Of Memory: tried to allocate")) is True
    assert pl.is_out_of_memory(MemoryError()) is True
    assert pl.is_out_of_memory(RuntimeError("shape mismatch")) is False
    assert pl.is_out_of_memory(ValueError("out of memory")) is False
    pl._free_device_memory()  # callable without a GPU


def test_backend_corrections_are_applied_at_most_at_the_apply_rate(monkeypatch):
    from types import SimpleNamespace

    class Backend:
        def __init__(self):
            self.observed = self.applied = 0
            self.seen = []

        def observe(self, pipeline):
            self.observed += 1
            self.seen.append(pipeline)

        def apply(self, pipeline):
            self.applied += 1
            self.seen.append(pipeline)

    p = pipe(backend_apply_rate=2.0)  # at most every 0.5 s
    p.backend = Backend()
    now = [100.0]
    monkeypatch.setattr(pl, "time", SimpleNamespace(monotonic=lambda: now[0], perf_counter=time.perf_counter))
    for t in (100.0, 100.3, 100.45, 100.6, 100.9, 101.2):
        now[0] = t
        np.testing.assert_array_equal(p._run_backend(), np.eye(4))
    assert p.backend.observed == 6 and p.backend.applied == 3  # at 100.0, 100.6 and 101.2
    assert all(x is p for x in p.backend.seen)
    p.map_correction = C = np.diag([1.0, 1.0, 1.0, 1.0])
    C[0, 3] = 2.0
    out = p._run_backend()
    np.testing.assert_array_equal(out, C)
    assert out is not C
    p.backend = None


def test_pipeline_passes_its_settings_to_the_reconstructor_gate_cloud_and_back_end():
    class Logger:
        def warning(self, msg):
            pass

    log = Logger()
    p = pl.MappingPipeline(cfg(intrinsics_source="camera_info", input_mode="pad", gate_threshold=0.5,
                               conf_threshold=0.5, cloud_max_points=1234), Session(), logger=log)
    r = p.reconstructor
    assert r.intrinsics == "camera_info" and r.preprocessor.mode == "pad" and p.logger is log
    assert p.gate.enabled and p.cloud_options.conf_threshold == 0.5 and p.cloud_options.max_points == 1234
    assert pipe(conf_threshold=0.0).cloud_options.conf_threshold is None
    K = K_of(H, W, 31.0, 37.0)
    res = p.process(IMG, 0, K_src=K).result
    np.testing.assert_allclose(res.prediction.K_model, K, atol=1e-9)
    p.update_config(cfg(gate_threshold=0.5, conf_threshold=0.5, conf_percentile=0.5))
    assert p.gate.enabled and p.cloud_options.conf_threshold == 0.5 and p.cloud_options.conf_percentile == 0.5
    b = pl.MappingPipeline(cfg(backend=True, segment_max_frames=50), Session(), logger=log, describe="cam0")
    try:
        assert b.describe() == "cam0, back-end on (segments, loop closure, Sim(3) pose graph)"
        assert b.reconstructor.session.policy.max_segment_frames == 50 and b.backend.logger is log
        b.erase_map()
        assert b.backend.logger is log
    finally:
        b.close()


def test_process_scale_timings_and_a_camera_cloud_under_a_correction():
    p = pipe(scale_source="fixed", fixed_scale=2.0)
    raw = recon().step(IMG, 0)
    t0 = time.perf_counter()
    r = p.process(IMG, 0, sensor_depth=np.ones((H, W), np.float32)).result  # a sensor depth the source ignores
    wall = time.perf_counter() - t0
    np.testing.assert_allclose(r.prediction.depth, 2.0 * raw.depth, rtol=1e-6)
    assert r.scale == 2.0
    for key, value in r.timings.items():
        assert 0.0 <= value <= wall, key
    q = pipe(backend=True, cloud_frame="camera")
    try:
        q.map_correction = cv.make_transform(rot([0, 0, 1], 0.4), [3.0, 0.0, 0.0])
        r = q.process(IMG, 0).result
        np.testing.assert_allclose(r.cloud_xyz, r.prediction.points_camera().reshape(-1, 3), atol=1e-4)
        assert 0.0 <= r.timings["pipeline_total"] <= 60 and r.timings["backend"] <= r.timings["pipeline_total"]
    finally:
        q.close()
    s = pipe(Session(window=8))
    new = s.shrink_window()
    assert new == 4 and type(new) is int


def test_a_loaded_map_takes_the_pipelines_map_settings(tmp_path):
    p = pipe(map_voxel_size=0.05, map_keyframe_max_frames=1)
    for i in range(2):
        p.process(IMG, i)
    path = p.save_map(tmp_path / "m")
    q = pipe(map_voxel_size=0.08)
    q.load_map(path)
    assert q.map.config.cloud_voxel_size == 0.08 and len(q.keyframe_poses()) == 2


def test_stats_before_any_frame_and_times_in_milliseconds():
    p = pipe()
    s = p.stats()
    assert s["scale"] == "nan" and s["scale valid"] is False and s["frames"] == 0
    p.timings = {"cloud": 0.0123}
    assert p.stats()["time cloud [ms]"] == "12.3"


def test_cards_without_a_seed_use_seed_zero_like_random_small(tmp_path):
    card = tmp_path / "noseed.yaml"
    card.write_text("name: n\nconfig: {preset: small}\n")
    flat = [torch.cat([q.flatten() for q in m.parameters()])
            for m in (rc.ModelBackendFactory().load_model(str(card)), rc.ModelBackendFactory().load_model("random-small"))]
    seeded = tmp_path / "seed0.yaml"
    seeded.write_text("name: n\nconfig: {preset: small}\nseed: 0\n")
    zero = torch.cat([q.flatten() for q in rc.ModelBackendFactory().load_model(str(seeded)).parameters()])
    assert torch.equal(flat[0], zero) and torch.equal(flat[1], zero)
