"""Tests written to kill deliberate breaks (mutants) of the core that the rest of the suite let through.

Each test is asymmetric on purpose: a plausible wrong implementation (keep the least confident points, take the
latest scale sample, strip one checkpoint prefix only) gives a different answer here, not merely a different count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ros2_stream4d.mapping import conventions as cv
from ros2_stream4d.mapping.cloud import CloudOptions, frame_cloud
from ros2_stream4d.mapping.gating import KeyframeGate
from ros2_stream4d.mapping.preprocess import PixelMapping
from ros2_stream4d.mapping.reconstructor import FramePrediction
from ros2_stream4d.mapping.scale import DepthSensorScale, FixedScale, OdometryScale, make_scale_source
from ros2_stream4d.model.checkpoint import normalize_state_dict
from ros2_stream4d.model.kv_cache import CacheStats, RollingKVCache, StreamCache

H, W = 10, 10


def ramp_prediction(seed: int = 0, invalid_rows: int = 0) -> FramePrediction:
    """A 10x10 prediction whose points confidences are a shuffled ramp 1..100 (each value once), so a pixel is
    identified by its confidence. The last ``invalid_rows`` rows have NaN depth. Each pixel's colour encodes its
    confidence (red = conf) so the test can check that xyz, rgb and conf stay aligned."""
    conf = np.random.default_rng(seed).permutation(np.arange(1, H * W + 1)).astype(np.float32).reshape(H, W)
    depth = np.full((H, W), 2.0, np.float32)
    if invalid_rows:
        depth[-invalid_rows:] = np.nan
    K = np.array([[10.0, 0, W / 2], [0, 10.0, H / 2], [0, 0, 1]])
    T = cv.make_transform(t=[0.5, -0.25, 1.0])
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = conf.astype(np.uint8)
    rgb[..., 1] = 7
    mapping = PixelMapping((H, W), (H, W), 1.0, 1.0, 0.0, 0.0)
    return FramePrediction(1, depth, conf.copy(), cv.unproject_depth(depth, K, T), conf, T, K, mapping, rgb)


# ------------------------------------------------------------------------------------------ confidence percentile
@pytest.mark.parametrize("percentile,kept", [(75, range(76, 101)), (20, range(21, 101)), (95, range(96, 101))])
def test_confidence_percentile_keeps_the_most_confident_points(percentile, kept):
    """np.percentile of 1..100 at p is 1 + 0.99 p: keeping conf >= it keeps exactly the top values. A filter that
    kept the least confident points instead would keep 1..(p+1) here: a different set AND a different count."""
    pred = ramp_prediction()
    xyz, rgb, conf = frame_cloud(pred, conf_percentile=percentile)
    assert sorted(conf.tolist()) == list(kept)
    # the points, colours and confidences of one pixel stay together
    np.testing.assert_array_equal(rgb[:, 0], conf.astype(np.uint8))
    by_conf = {float(c): p for c, p in zip(pred.points_conf.ravel(), pred.points_world.reshape(-1, 3))}
    np.testing.assert_array_equal(xyz, np.stack([by_conf[float(c)] for c in conf]))


def test_confidence_percentile_is_taken_over_valid_pixels_only():
    """Rows 8-9 (20 pixels) have no depth. The 90th percentile must be taken over the 80 valid pixels' confidences,
    so the top 10 % of THOSE survive; taken over all 100 pixels it would keep only 9-10 points of the valid ones
    whose values depend on where the invalid pixels fall."""
    pred = ramp_prediction(seed=3, invalid_rows=2)
    valid_conf = np.sort(pred.points_conf[:-2].ravel())
    threshold = np.percentile(valid_conf, 90)
    _, _, conf = frame_cloud(pred, conf_percentile=90)
    assert sorted(conf.tolist()) == [c for c in valid_conf.tolist() if c >= threshold]
    assert len(conf) == 8  # 80 values, linear interpolation: the top 8 are >= the 90th percentile
    all_conf_threshold = np.percentile(pred.points_conf, 90)
    assert sorted(conf.tolist()) != [c for c in valid_conf.tolist() if c >= all_conf_threshold]  # the test can tell


def test_confidence_threshold_and_percentile_combine():
    """An absolute threshold is applied first; the percentile is then taken among the survivors."""
    pred = ramp_prediction(seed=1)
    _, _, conf = frame_cloud(pred, conf_threshold=51, conf_percentile=50)  # 51..100 survive, then their median
    assert sorted(conf.tolist()) == list(range(76, 101))
    _, _, conf = frame_cloud(pred, conf_threshold=50.5)
    assert sorted(conf.tolist()) == list(range(51, 101))  # keep conf >= threshold, never the ones below


def test_confidence_percentile_extremes_and_options_object():
    pred = ramp_prediction(seed=2)
    assert sorted(frame_cloud(pred, conf_percentile=0)[2].tolist()) == list(range(1, 101))  # keeps everything
    assert frame_cloud(pred, conf_percentile=100)[2].tolist() == [100.0]  # keeps the maximum only
    opts = CloudOptions(conf_percentile=75)
    assert sorted(frame_cloud(pred, opts)[2].tolist()) == list(range(76, 101))


def test_cloud_filters_never_bring_back_invalid_pixels():
    """Each filter narrows the valid set: a NaN-depth pixel stays out whatever threshold, depth limit or percentile
    is set (a filter that replaced the mask instead of narrowing it would let rows 8-9 back in)."""
    pred = ramp_prediction(seed=4, invalid_rows=2)
    assert len(frame_cloud(pred)[0]) == 80
    assert len(frame_cloud(pred, conf_threshold=1)[0]) == 80
    assert len(frame_cloud(pred, max_depth=10.0)[0]) == 80
    assert len(frame_cloud(pred, max_depth=2.0)[0]) == 80  # a point exactly at the limit is kept
    assert len(frame_cloud(pred, max_depth=1.99)[0]) == 0
    nan_conf = FramePrediction(**{**pred.__dict__, "points_conf": np.where(pred.points_conf > 60, np.nan,
                                                                            pred.points_conf).astype(np.float32)})
    assert len(frame_cloud(nan_conf, max_depth=5.0)[2]) == len(frame_cloud(nan_conf)[2]) == int(
        (pred.points_conf[:-2] <= 60).sum())
    _, _, conf = frame_cloud(pred, conf_threshold=50, max_depth=5.0)
    assert sorted(conf.tolist()) == sorted(c for c in pred.points_conf[:-2].ravel().tolist() if c >= 50)


def test_cloud_subsample_is_without_replacement_and_outputs_are_cast():
    pred = ramp_prediction(seed=5)
    _, _, conf = frame_cloud(pred, max_points=90)
    assert len(conf) == 90 and len(set(conf.tolist())) == 90  # 90 distinct pixels out of 100
    assert conf.tolist() == [c for c in pred.points_conf.ravel().tolist() if c in set(conf.tolist())]  # in order
    assert len(frame_cloud(pred, max_points=100)[2]) == 100 and len(frame_cloud(pred, max_points=0)[2]) == 0
    assert frame_cloud(pred, max_points=5, seed=1)[2].tolist() != frame_cloud(pred, max_points=5, seed=2)[2].tolist()
    wide = FramePrediction(**{**pred.__dict__, "points_world": pred.points_world.astype(np.float64),
                              "rgb_model": pred.rgb_model.astype(np.int64),
                              "points_conf": pred.points_conf.astype(np.float64)})
    for frame in ("world", "camera"):
        xyz, rgb, conf = frame_cloud(wide, frame=frame)
        assert (xyz.dtype, rgb.dtype, conf.dtype) == (np.float32, np.uint8, np.float32)
        assert xyz.flags.c_contiguous and rgb.flags.c_contiguous


def test_cloud_options_are_checked():
    CloudOptions(conf_percentile=0)
    CloudOptions(conf_percentile=100, max_points=0, stride=1)
    for kwargs, match in ((dict(conf_percentile=100.5), r"^conf_percentile must be in \[0, 100\], got 100.5"),
                          (dict(conf_percentile=-1), "^conf_percentile must be in"),
                          (dict(max_points=-1), "^max_points must be >= 0, got -1"),
                          (dict(frame="map"), "^frame must be one of .*got 'map'"),
                          (dict(stride=0), "^stride must be >= 1, got 0")):
        with pytest.raises(ValueError, match=match):
            CloudOptions(**kwargs)
    with pytest.raises(TypeError, match="^pass either options or keyword overrides, not both"):
        frame_cloud(ramp_prediction(), CloudOptions(), stride=2)


# ------------------------------------------------------------------------------------------------ windowed median
def test_depth_scale_median_ignores_a_wild_last_frame():
    """Three good frames, then a wild one LAST: the windowed median stays at the good value; an estimate that
    took the latest sample would jump to 100x, and a mean would move by ~25x."""
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.5, 3, (30, 40))
    s = DepthSensorScale(window=5, min_pixels=100, max_depth=1000)
    for ratio in (1.7, 1.7, 1.7):
        assert s.update(pred * ratio, pred) == pytest.approx(ratio)
    assert s.update(pred * 170, pred) == pytest.approx(170)  # the per-frame ratio is reported as measured...
    assert s.samples == 4
    assert s.scale == pytest.approx(1.7)  # ...but the estimate is the median of the window


def test_depth_scale_window_forgets_old_samples():
    """window=3: once three wild frames have pushed the good ones out, the median follows them (the window is a
    window, not the whole history)."""
    pred = np.full((20, 20), 2.0)
    s = DepthSensorScale(window=3, min_pixels=10, max_depth=1000)
    for ratio in (1.0, 1.0, 1.0, 3.0, 3.0):
        s.update(pred * ratio, pred)
    assert s.samples == 3
    assert s.scale == pytest.approx(3.0)  # window [1, 3, 3]; over all five samples it would be 1.0
    s.update(pred * 5.0, pred)
    assert s.scale == pytest.approx(3.0)  # window [3, 3, 5]: the median, not the latest (5) nor the mean


def test_depth_scale_median_of_even_window_and_pixel_median():
    """An even window: numpy's median averages the two middle samples. Within one frame, the ratio is the median
    over pixels: 40 % of pixels with a wild ratio cannot move it."""
    pred = np.full((10, 10), 2.0)
    sensor = pred * 2.0
    sensor[:4] = pred[:4] * 50.0
    s = DepthSensorScale(window=4, min_pixels=10, max_depth=1000)
    assert s.update(sensor, pred) == pytest.approx(2.0)
    s.update(pred * 4.0, pred)
    assert s.scale == pytest.approx(3.0)


def test_odometry_scale_median_ignores_a_wild_last_motion():
    s = OdometryScale(min_motion=0.1, window=5)
    s.update(np.eye(4), np.eye(4))
    odom_x, pred_x = 0.0, 0.0
    for step_pred in (2.0, 2.0, 2.0, 0.01):  # model units per 1 m of odometry; the last motion is wild
        odom_x, pred_x = odom_x + 1.0, pred_x + step_pred
        s.update(cv.make_transform(t=[odom_x, 0, 0]), cv.make_transform(t=[pred_x, 0, 0]))
    assert s.samples == 4
    assert s.scale == pytest.approx(0.5)  # metres per model unit from the three good motions; latest would be 100


# ------------------------------------------------------------------------------------------- checkpoint prefixes
def _sd(prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: torch.zeros(1) for k in ("aggregator.patch_embed.w", "camera_head.b", "depth_head.c")}


@pytest.mark.parametrize("prefix", ["module.net.", "net.module.", "_orig_mod.module.net.", "model.module.",
                                    "module.module."])
def test_nested_prefixes_are_all_stripped(prefix):
    """DDP around a STream3R wrapper saves `module.net.`; torch.compile adds `_orig_mod.`. Stripping must repeat
    until no shared prefix is left, whatever the order of the prefixes."""
    out, stripped = normalize_state_dict(_sd(prefix))
    assert sorted(out) == sorted(_sd(""))
    assert stripped == prefix


def test_a_prefix_not_shared_by_every_key_is_kept():
    sd = {**_sd("module."), "net.extra": torch.zeros(1)}
    out, stripped = normalize_state_dict(sd)
    assert out.keys() == sd.keys() and stripped is None
    # after stripping the shared outer prefix, an inner one that only some keys have stays
    sd = {"module.net.a": torch.zeros(1), "module.b": torch.zeros(1)}
    out, stripped = normalize_state_dict(sd)
    assert sorted(out) == ["b", "net.a"] and stripped == "module."
    assert normalize_state_dict({}) == ({}, None)


# ------------------------------------------------------------------------------------------------ rolling KV cache
B, HEADS, N, D = 1, 2, 3, 4
FRAME_BYTES = 2 * B * HEADS * N * D * 4  # keys + values of one float32 frame


def kv(i: float, b: int = B, heads: int = HEADS, n: int = N, d: int = D):
    """Keys filled with i, values with -i - 0.5: every slot's content names its frame, and k differs from v."""
    return torch.full((b, heads, n, d), float(i)), torch.full((b, heads, n, d), -float(i) - 0.5)


def slot_contents(cache: RollingKVCache) -> list[int]:
    k, v = cache.held()
    per_slot = k.reshape(B, HEADS, cache.frames_held, N, D)
    frames = [int(per_slot[0, 0, s, 0, 0]) for s in range(cache.frames_held)]
    torch.testing.assert_close(v, -k - 0.5)
    return frames


def test_rolling_cache_overwrites_the_oldest_window_frame_and_keeps_the_anchors():
    c = RollingKVCache(window=3, anchors=2)
    assert c.capacity_frames == 5 and c.allocated_frames == 0 and c.nbytes == 0 and c.used_bytes == 0
    slots = [c.write(*kv(i)) for i in range(10)]
    # frames 0-4 fill slots 0-4; then the ring over the window slots 2, 3, 4 (the oldest non-anchor goes first)
    assert slots == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3]
    assert c.slot_frame == [0, 1, 8, 9, 7] and slot_contents(c) == [0, 1, 8, 9, 7]
    assert (c.frames_seen, c.frames_held, c.allocated_frames) == (10, 5, 5)
    assert c.nbytes == 5 * FRAME_BYTES == c.used_bytes
    assert c.held()[0].shape == (B, HEADS, 5 * N, D)


def test_rolling_cache_without_anchors_is_a_sliding_window():
    c = RollingKVCache(window=2, anchors=0)
    assert [c.write(*kv(i)) for i in range(5)] == [0, 1, 0, 1, 0]
    assert slot_contents(c) == [4, 3]


def test_rolling_cache_window_one_holds_the_anchor_and_the_current_frame():
    c = RollingKVCache(window=1, anchors=1)
    for i in range(4):
        k, _ = c.update(*kv(i))
        assert k.shape[2] == N * min(i + 1, 2)
    assert slot_contents(c) == [0, 3]


def test_unlimited_cache_grows_by_half_and_keeps_every_frame():
    c = RollingKVCache(window=None, initial_frames=2)
    assert c.capacity_frames is None
    allocated = []
    for i in range(7):
        k, v = c.update(*kv(i))
        allocated.append(c.allocated_frames)
        assert k.shape[2] == (i + 1) * N
    assert allocated == [2, 2, 3, 4, 6, 6, 9]  # 1.5x, at least one frame more
    assert slot_contents(c) == list(range(7))  # growing copies what was held
    assert c.nbytes == 9 * FRAME_BYTES and c.used_bytes == 7 * FRAME_BYTES
    c8 = RollingKVCache(window=None)  # by default an unlimited cache starts with room for 8 frames
    c8.write(*kv(0))
    assert c8.allocated_frames == 8 and c8.nbytes == 8 * FRAME_BYTES
    c0 = RollingKVCache(window=None, initial_frames=0)  # at least one frame is allocated
    c0.write(*kv(0))
    assert c0.allocated_frames == 1
    c0.write(*kv(1))
    assert c0.allocated_frames == 2 and slot_contents(c0) == [0, 1]


def test_rolling_cache_storage_is_allocated_once_in_its_own_dtype():
    c = RollingKVCache(window=2, anchors=1, dtype=torch.float16)
    c.write(*kv(0))
    k_ptr, v_ptr = c.k.data_ptr(), c.v.data_ptr()
    for i in range(1, 6):
        c.write(*kv(i))
    assert (c.k.data_ptr(), c.v.data_ptr()) == (k_ptr, v_ptr)
    assert c.k.dtype == c.v.dtype == torch.float16 and c.held()[0].dtype == torch.float16
    assert c.nbytes == 3 * FRAME_BYTES // 2
    assert RollingKVCache(window=2).update(*kv(1))[0].dtype == torch.float32  # no dtype: the input's
    meta = RollingKVCache(window=2)  # storage on the frames' device
    meta.write(torch.empty(B, HEADS, N, D, device="meta"), torch.empty(B, HEADS, N, D, device="meta"))
    assert meta.k.device.type == meta.v.device.type == "meta"


def test_flash_buffers_return_the_whole_storage_and_the_valid_token_count():
    c = RollingKVCache(window=3, anchors=1)
    k_store, v_store, valid = c.flash_buffers(*kv(0))
    assert k_store is c.k and v_store is c.v and k_store.shape[2] == 4 * N and valid == N
    for i in range(1, 7):
        _, _, valid = c.flash_buffers(*kv(i))
    assert valid == 4 * N


def test_rolling_cache_rejects_bad_frames_and_arguments():
    with pytest.raises(ValueError, match=r"^window must be >= 1 \(the current frame is part of the window\) or None$"):
        RollingKVCache(window=0)
    with pytest.raises(ValueError, match="^anchors must be >= 0$"):
        RollingKVCache(anchors=-1)
    RollingKVCache(window=1, anchors=0)  # the smallest legal cache
    c = RollingKVCache(window=2)
    with pytest.raises(AssertionError, match="^empty cache$"):
        c.held()
    k, v = kv(0)
    with pytest.raises(ValueError, match=r"^k and v must both be \[B, heads, tokens, head_dim\], got"):
        c.write(k, v[:, :, :2])  # k and v differ
    with pytest.raises(ValueError, match=r"^k and v must both be \[B, heads, tokens, head_dim\], got"):
        c.write(k[0], v[0])  # 3-D
    c.write(k, v)
    with pytest.raises(ValueError, match="^a frame must have 3 tokens, got 4 "):
        c.write(*kv(1, n=N + 1))
    for changed in (dict(b=2), dict(heads=3), dict(d=D + 1)):
        with pytest.raises(ValueError, match="^batch size / heads / head dim changed in a running stream; reset the"):
            c.write(*kv(1, **changed))
    assert c.frames_seen == 1  # nothing was written by the refused frames
    c.reset()
    assert (c.k, c.v, c.tokens_per_frame, c.frames_seen, c.frames_held, c.slot_frame) == (None, None, None, 0, 0, [])
    assert c.nbytes == 0 and c.allocated_frames == 0
    c.write(*kv(5, n=N + 1, d=D + 1))  # after a reset, a new frame size is fine
    assert c.tokens_per_frame == N + 1
    assert repr(c) == f"RollingKVCache(window=2, anchors=1, held=1, seen=1, bytes={c.nbytes})"


def test_stream_cache_bundles_and_reports_its_caches():
    sc = StreamCache(num_global_blocks=2, camera_iterations=3, camera_trunk_depth=2, window=4, anchors=1)
    caches = sc.all_caches()
    assert len(caches) == 8 and len({id(c) for c in caches}) == 8
    assert caches[:2] == sc.aggregator and len(sc.camera) == 3 and all(len(row) == 2 for row in sc.camera)
    assert all((c.window, c.anchors) == (4, 1) for c in caches) and (sc.window, sc.anchors) == (4, 1)
    for i in range(7):
        for c in caches:
            c.write(*kv(i))
    stats = sc.stats()
    assert (stats.frames_seen, stats.frames_held, stats.capacity_frames, sc.frames_seen) == (7, 5, 5, 7)
    assert stats.aggregator_bytes == 2 * 5 * FRAME_BYTES and stats.camera_bytes == 6 * 5 * FRAME_BYTES
    assert stats.as_dict() == {"frames_seen": 7, "frames_held": 5, "capacity_frames": 5,
                               "aggregator_bytes": 10 * FRAME_BYTES, "camera_bytes": 30 * FRAME_BYTES,
                               "nbytes": 40 * FRAME_BYTES}
    assert sc.storage_nbytes() == 40 * FRAME_BYTES
    sc.camera[0][0].k, sc.camera[0][0].v = sc.aggregator[0].k, sc.aggregator[0].v  # shared storage: counted once
    assert sc.storage_nbytes() == 35 * FRAME_BYTES  # one cache (5 frames) fewer
    sc.reset()
    assert all(c.frames_seen == 0 and c.k is None for c in caches)
    assert sc.stats().as_dict()["nbytes"] == 0 and sc.storage_nbytes() == 0
    half = StreamCache(1, camera_iterations=2, camera_trunk_depth=1, dtype=torch.float16, window=None, anchors=0)
    assert all(c.dtype == torch.float16 and c.window is None and c.anchors == 0 for c in half.all_caches())
    assert len(half.all_caches()) == 3
    plain = StreamCache(2, camera_iterations=2)  # defaults: no trunk blocks, one anchor, unlimited window
    assert plain.camera == [[], []] and len(plain.all_caches()) == 2
    assert (plain.window, plain.anchors, plain.aggregator[0].anchors, plain.aggregator[0].window) == (None, 1, 1, None)
    one = StreamCache(1, window=2)
    one.aggregator[0].write(*kv(0))
    assert one.stats().frames_seen == 1 and one.stats().capacity_frames == 3
    empty = StreamCache(0)
    assert empty.frames_seen == 0 and empty.stats() == CacheStats(0, 0, None, 0, 0)


# ------------------------------------------------------------------------------------------- scale sources, more
def test_scale_sources_refuse_bad_arguments_with_named_messages():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^scale must be finite and positive"):
            FixedScale(bad)
    with pytest.raises(ValueError, match="^window must be >= 1"):
        DepthSensorScale(window=0)
    DepthSensorScale(window=1, min_depth=0.0, max_depth=1e-3)  # the smallest legal values
    for lo, hi in ((-0.1, 1.0), (2.0, 2.0), (3.0, 2.0)):
        with pytest.raises(ValueError, match="^need 0 <= min_depth < max_depth, got"):
            DepthSensorScale(min_depth=lo, max_depth=hi)
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match="^min_motion must be > 0"):
            OdometryScale(min_motion=bad)
    with pytest.raises(ValueError, match="^T_base_cam must be a finite 4x4"):
        OdometryScale(T_base_cam=np.eye(3))
    s = OdometryScale()
    with pytest.raises(ValueError, match="^T_odom_base must be a finite 4x4"):
        s.update(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="^T_world_cam must be a finite 4x4"):
        s.update(np.eye(4), np.full((4, 4), np.inf))
    with pytest.raises(ValueError, match=r"^scale source must be one of \['depth', 'fixed', 'none', 'odometry'\]"):
        make_scale_source("gps")


def test_make_scale_source_builds_each_kind_with_its_arguments():
    assert FixedScale().scale == 1.0 and make_scale_source("fixed").scale == 1.0  # the default is model units
    fixed = make_scale_source("fixed", scale=2.5)
    assert isinstance(fixed, FixedScale) and fixed.scale == 2.5 and fixed.valid
    none = make_scale_source("none")
    assert isinstance(none, FixedScale) and none.scale == 1.0
    depth = make_scale_source("depth", window=2, min_pixels=7, min_depth=0.5, max_depth=9.0)
    assert isinstance(depth, DepthSensorScale)
    assert (depth.min_pixels, depth.min_depth, depth.max_depth) == (7, 0.5, 9.0)
    odom = make_scale_source("odometry", min_motion=0.3, window=4, min_predicted=0.01)
    assert isinstance(odom, OdometryScale) and (odom.min_motion, odom.min_predicted) == (0.3, 0.01)
    fixed.reset()
    assert fixed.scale == 2.5  # a fixed scale has nothing to forget


def test_scale_source_defaults_as_documented():
    """Defaults: depth window 15 frames, >= 100 pixels, sensor range [0.05, 20] m; odometry 0.1 m motions,
    window 20, prediction motions >= 1e-6."""
    d = DepthSensorScale()
    pred = np.full((10, 10), 1.0)
    assert d.update(pred * 2, pred) == pytest.approx(2.0)  # exactly 100 usable pixels is enough
    assert d.update(pred[:9] * 2, pred[:9]) is None  # 90 is not
    sensor = np.full((20, 20), 0.05)
    sensor[:8] = 20.0
    assert d.update(sensor, np.ones((20, 20))) == pytest.approx(0.05)  # 60 % at the lower end: counted
    sensor = np.full((20, 20), 20.0)
    sensor[:8] = 0.05
    assert d.update(sensor, np.ones((20, 20))) == pytest.approx(20.0)  # 60 % at the upper end: counted
    assert d.update(np.full((20, 20), 0.049), np.ones((20, 20))) is None
    assert d.update(np.full((20, 20), 20.01), np.ones((20, 20))) is None
    for i in range(20):
        d.update(pred * (3 + i), pred)
    assert d.samples == 15
    o = OdometryScale()
    o.update(np.eye(4), np.eye(4))
    assert o.update(cv.make_transform(t=[0.0999, 0, 0]), cv.make_transform(t=[1, 0, 0])) is None
    assert o.update(cv.make_transform(t=[0.1, 0, 0]), cv.make_transform(t=[1, 0, 0])) == pytest.approx(0.1)
    for i in range(2, 30):
        o.update(cv.make_transform(t=[0.1 * i, 0, 0]), cv.make_transform(t=[float(i), 0, 0]))
    assert o.samples == 20
    o.reset()
    assert o.samples == 0 and not o.valid and o.scale == 1.0
    assert o.update(cv.make_transform(t=[5.0, 0, 0]), np.eye(4)) is None  # after a reset: a new reference first
    assert o.update(cv.make_transform(t=[6.0, 0, 0]), cv.make_transform(t=[2e-6, 0, 0])) == pytest.approx(5e5)
    o2 = OdometryScale()
    o2.update(np.eye(4), np.eye(4))
    assert o2.update(cv.make_transform(t=[1.0, 0, 0]), cv.make_transform(t=[9e-7, 0, 0])) is None
    o3 = OdometryScale(min_predicted=0.5)
    o3.update(np.eye(4), np.eye(4))
    assert o3.update(cv.make_transform(t=[1.0, 0, 0]), cv.make_transform(t=[0.5, 0, 0])) == pytest.approx(2.0)


def test_depth_scale_masks_and_ignores_non_positive_predictions():
    pred = np.full((20, 20), 2.0)
    sensor = pred * 3.0
    sensor[:10] = pred[:10] * 50.0  # the masked-out half would win the median if the mask were ignored
    mask = np.zeros((20, 20), bool)
    mask[10:] = True
    mask[10, :5] = False
    s = DepthSensorScale(window=3, min_pixels=196, max_depth=1000)
    assert s.update(sensor, pred, mask=mask) is None  # 196 pixels needed, 200 - 5 left
    s.min_pixels = 195  # exactly enough
    assert s.update(sensor, pred, mask=mask) == pytest.approx(3.0)
    # the mask narrows the usable pixels, it does not replace them: NaN inside the mask stays out; a 0/1 mask works
    sensor[15:] = np.nan
    s.min_pixels = 10
    assert s.update(sensor, pred, mask=mask.astype(np.uint8)) == pytest.approx(3.0)
    zero = DepthSensorScale(min_depth=0.0, min_pixels=10)  # a zero ratio is no scale
    sensor0 = np.zeros((20, 20))
    sensor0[:8] = 1.0
    assert zero.update(sensor0, np.ones((20, 20))) is None and not zero.valid
    # Each kind of unusable pixel, on 60 % of the frame (so that counting it would move the median): excluded.
    for bad_pred, bad_sensor in ((-1.0, 8.0), (0.0, 8.0), (np.inf, 8.0), (np.nan, 8.0), (2.0, np.nan),
                                 (2.0, np.inf), (2.0, 500.0), (2.0, 0.01)):
        p, sensor = np.full((20, 20), 2.0), np.full((20, 20), 8.0)
        p[:, :12], sensor[:, :12] = bad_pred, bad_sensor
        s2 = DepthSensorScale(window=3, min_pixels=10, min_depth=0.05, max_depth=100)
        assert s2.update(sensor, p) == pytest.approx(4.0), (bad_pred, bad_sensor)


def test_odometry_scale_uses_the_camera_motion_and_the_last_accepted_reference():
    """Rotating in place moves an offset camera: with T_base_cam the camera's own path counts; without it the base
    did not move. The reference moves only when a motion is accepted."""
    T_base_cam = cv.make_transform(t=[1.0, 0.0, 0.0])
    s = OdometryScale(min_motion=0.5, T_base_cam=T_base_cam)
    s.update(np.eye(4), np.eye(4))
    turned = cv.make_transform(cv.matrix_from_quaternion([0, 0, 1, 0]))  # half a turn about z
    ratio = s.update(turned, cv.make_transform(t=[1.0, 0, 0]))  # the camera moved 2 m: (1,0,0) -> (-1,0,0)
    assert ratio == pytest.approx(2.0)
    plain = OdometryScale(min_motion=0.5)
    plain.update(np.eye(4), np.eye(4))
    assert plain.update(turned, cv.make_transform(t=[1.0, 0, 0])) is None  # the base did not move
    s = OdometryScale(min_motion=1.0)
    s.update(np.eye(4), np.eye(4))
    assert s.update(cv.make_transform(t=[0.6, 0, 0]), cv.make_transform(t=[1.0, 0, 0])) is None
    # measured from the first pose, not from the refused one: 1.2 m over 2 model units
    assert s.update(cv.make_transform(t=[1.2, 0, 0]), cv.make_transform(t=[2.0, 0, 0])) == pytest.approx(0.6)
    # now the reference is the accepted pose: 1.5 m more over 1 unit more
    assert s.update(cv.make_transform(t=[2.7, 0, 0]), cv.make_transform(t=[3.0, 0, 0])) == pytest.approx(1.5)
    assert s.update(cv.make_transform(t=[2.7, 0.5, 0]), cv.make_transform(t=[3.0, 2.0, 0])) is None  # < 1 m


# ------------------------------------------------------------------------------------------------ keyframe gate
def grey(value: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def test_gate_difference_is_the_mean_absolute_grey_difference():
    g = KeyframeGate(threshold=0.5)
    first = g.check(grey(100))
    assert (first.keep, first.reason, first.skipped) == (True, "first", 0) and np.isnan(first.difference)
    d = g.check(grey(151))
    assert d.difference == pytest.approx(51 / 255, abs=1e-6) and (d.keep, d.reason) == (False, "duplicate")
    d = g.check(grey(49))  # darker by the same amount: the difference is absolute
    assert d.difference == pytest.approx(51 / 255, abs=1e-6)
    # a colour image is compared through the mean of its channels: pure red 255 is grey 85
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = 255
    g2 = KeyframeGate(threshold=0.001)
    g2.check(red)
    d = g2.check(np.repeat(grey(85)[:, :, None], 3, axis=2))
    assert d.difference == pytest.approx(0.0, abs=1e-6) and d.reason == "duplicate"
    g3 = KeyframeGate()
    g3.check(grey(100)[:, :, None])  # (h, w, 1) is accepted
    assert g3.check(grey(100)[:, :, None]).reason == "duplicate"


def test_gate_compares_area_averaged_thumbnails():
    """A one-pixel checkerboard and its inverse average to the same grey: a duplicate for the gate (sampling
    instead of averaging would see black against white)."""
    board = ((np.indices((480, 640)).sum(axis=0) % 2) * 255).astype(np.uint8)
    g = KeyframeGate(threshold=0.01)
    g.check(board)
    d = g.check(255 - board)
    assert d.reason == "duplicate" and d.difference < 0.01
    # one bright pixel per 10x10 block, at a block corner or near its centre: the same mean, so the same thumbnail
    # (bilinear or nearest sampling at the block centres would see the centred dots only)
    corner, centre = np.zeros((480, 640), np.uint8), np.zeros((480, 640), np.uint8)
    corner[::10, ::10] = 255
    centre[4::10, 4::10] = 255
    g = KeyframeGate(threshold=0.01)
    g.check(corner)
    d = g.check(centre)
    assert d.reason == "duplicate" and d.difference < 1e-6
    assert g._thumb(board).shape == (48, 64)  # (width, height) = (64, 48) by default
    assert KeyframeGate(size=(8, 6))._thumb(board).shape == (6, 8)


def test_gate_threshold_boundaries_and_defaults():
    g = KeyframeGate(threshold=0.0)  # zero: every frame, even an identical one, is a keyframe
    g.check(grey(10))
    d = g.check(grey(10))
    assert (d.keep, d.reason, d.difference) == (True, "changed", 0.0)
    g = KeyframeGate()  # default threshold 0.01 of full scale: 2 grey levels are a duplicate, 3 are a change
    g.check(grey(100))
    assert g.check(grey(102)).reason == "duplicate"
    assert g.check(grey(103)).reason == "changed"
    g = KeyframeGate()  # default max_skip 30
    g.check(grey(100))
    reasons = [g.check(grey(100)).reason for _ in range(31)]
    assert reasons == ["duplicate"] * 30 + ["max_skip"]
    g = KeyframeGate(max_skip=0)  # every duplicate is kept
    g.check(grey(100))
    d = g.check(grey(100))
    assert (d.keep, d.reason, d.skipped) == (True, "max_skip", 0)


def test_gate_counts_skips_and_resets():
    g = KeyframeGate(threshold=0.1, max_skip=3)
    g.check(grey(0))
    assert [g.check(grey(1)).skipped for _ in range(3)] == [1, 2, 3]
    kept = g.check(grey(1))
    assert (kept.keep, kept.reason, kept.skipped) == (True, "max_skip", 3)
    assert kept.difference == pytest.approx(1 / 255, abs=1e-6)  # a kept duplicate still reports its difference
    assert g.check(grey(2)).skipped == 1  # the count starts again after a kept frame
    changed = g.check(grey(200))
    assert (changed.reason, changed.skipped) == ("changed", 1)
    assert g.check(grey(200)).reason == "duplicate"  # the kept frame is the new reference
    g.reset()
    assert g.check(grey(200)).reason == "first"
    # the shape includes the channels: the same picture as grey after colour is a new size
    g.check(np.repeat(grey(200)[:, :, None], 3, axis=2))
    d = g.check(grey(200))
    assert (d.keep, d.reason, d.skipped) == (True, "size_changed", 0) and np.isnan(d.difference)
    assert g.check(grey(200)).reason == "duplicate"  # the new size is the reference now


def test_disabled_gate_keeps_everything_and_bad_arguments_are_refused():
    g = KeyframeGate(enabled=False)
    for _ in range(3):
        d = g.check(grey(5))
        assert (d.keep, d.reason, d.skipped) == (True, "disabled", 0) and np.isnan(d.difference)
    assert g.check(np.zeros((2, 2), np.float32)).reason == "disabled"  # not even looked at
    for kwargs, match in ((dict(threshold=-0.01), r"^threshold must be in \[0, 1\], got -0.01"),
                          (dict(threshold=1.01), "^threshold must be in"), (dict(max_skip=-1), "^max_skip must be >= 0"),
                          (dict(size=(0, 5)), r"^size must be positive \(width, height\), got \(0, 5\)"),
                          (dict(size=(5, 0)), "^size must be positive")):
        with pytest.raises(ValueError, match=match):
            KeyframeGate(**kwargs)
    KeyframeGate(threshold=1.0, max_skip=0, size=(1, 1))  # the extremes are legal
    g = KeyframeGate()
    for bad in (np.zeros((4, 4), np.float32), np.zeros(4, np.uint8), np.zeros((4, 4, 2), np.uint8),
                np.zeros((4, 4, 4), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"^gate expects a uint8 \(h, w\) or \(h, w, 3\) image, got"):
            g.check(bad)


# ------------------------------------------------------------------------------------------------- conventions
def axis_rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def test_make_transform_and_its_checks():
    np.testing.assert_array_equal(cv.make_transform(), np.eye(4))
    R = axis_rotation(2, 0.3)
    T = cv.make_transform(R, [1, 2, 3])
    np.testing.assert_array_equal(T[:3, :3], R)
    np.testing.assert_array_equal(T[:3, 3], [1, 2, 3])
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(cv.make_transform(t=[1, 2, 3])[:3, :3], np.eye(3))
    np.testing.assert_array_equal(cv.make_transform(R)[:3, 3], 0)
    with pytest.raises(ValueError, match=r"^R must have shape \(3, 3\), got \(4, 4\)"):
        cv.make_transform(np.eye(4))
    with pytest.raises(ValueError, match="^t contains NaN or Inf"):
        cv.make_transform(t=[0, np.inf, 0])
    with pytest.raises(ValueError, match="^R contains NaN or Inf"):
        cv.make_transform(np.full((3, 3), np.nan))


def test_inverse_of_stacks_is_exact_and_checked():
    rng = np.random.default_rng(7)
    Ts = np.stack([cv.make_transform(axis_rotation(k % 3, rng.uniform(-3, 3)), rng.normal(size=3))
                   for k in range(6)]).reshape(2, 3, 4, 4)
    inv = cv.inverse(Ts)
    assert inv.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(inv, np.linalg.inv(Ts), atol=1e-12)
    np.testing.assert_array_equal(inv[..., 3, :], np.broadcast_to([0, 0, 0, 1], (2, 3, 4)))
    with pytest.raises(ValueError, match=r"^expected \[\.\.\., 4, 4\] transforms"):
        cv.inverse(np.eye(3))


def test_transform_points_dtypes_and_checks():
    T = cv.make_transform(axis_rotation(0, np.pi / 2), [1.0, 0.0, 0.0])
    p = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
    out = cv.transform_points(T, p)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1, 0, 1], [1, -2, 0]], atol=1e-6)
    out = cv.transform_points(T, np.array([[0, 1, 0]]))  # integers come back as float64
    assert out.dtype == np.float64 and np.allclose(out, [[1, 0, 1]])
    with pytest.raises(ValueError, match="^points must have a trailing dimension of 3, got"):
        cv.transform_points(T, np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"^T must have shape \(4, 4\)"):
        cv.transform_points(np.eye(3), p)


def test_extrinsic_camera_only_and_map_to_odom():
    T = cv.make_transform(axis_rotation(1, 0.7), [0.5, -1.0, 2.0])
    E = cv.inverse(T)
    np.testing.assert_allclose(cv.extrinsic_to_pose(E[:3]), T, atol=1e-12)
    np.testing.assert_allclose(cv.extrinsic_to_pose(E), T, atol=1e-12)
    with pytest.raises(ValueError, match="^extrinsic must be 3x4 or 4x4, got"):
        cv.extrinsic_to_pose(np.eye(3))
    np.testing.assert_allclose(cv.camera_only_map_cam(T), cv.T_MAP_WORLD @ T)
    with pytest.raises(ValueError, match="^T_world_cam must have shape"):
        cv.camera_only_map_cam(np.eye(3))
    T_odom_base = cv.make_transform(axis_rotation(2, 0.4), [3.0, 1.0, 0.0])
    T_map_odom = cv.map_to_odom(T, T_odom_base)
    np.testing.assert_allclose(T_map_odom @ T_odom_base, T, atol=1e-12)
    with pytest.raises(ValueError, match="^T_odom_base must have shape"):
        cv.map_to_odom(T, np.eye(3))
    with pytest.raises(ValueError, match="^T_base_cam must have shape"):
        cv.robot_map_base(T, np.eye(3))
    with pytest.raises(ValueError, match="^T_world_cam must have shape"):
        cv.robot_map_base(np.eye(3), T)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("angle", [0.0, 0.4, 2.0, 3.0, np.pi, -2.5])
def test_quaternion_every_branch_round_trips(axis, angle):
    """Half turns and large angles about x, y and z pick each pivot of Shepperd's method (w, x, y, z)."""
    R = axis_rotation(axis, angle)
    q = cv.quaternion_from_matrix(R)
    expected = np.zeros(4)
    expected[axis], expected[3] = np.sin(angle / 2), np.cos(angle / 2)
    if expected[3] < 0 or (expected[3] == 0 and expected[axis] < 0):
        expected = -expected
    np.testing.assert_allclose(q, expected, atol=1e-12)
    np.testing.assert_allclose(cv.matrix_from_quaternion(q), R, atol=1e-12)
    np.testing.assert_allclose(cv.quaternion_from_matrix(cv.make_transform(R, [1, 2, 3])), q)  # 4x4 works too


def test_quaternion_of_general_rotations_near_each_pivot():
    rng = np.random.default_rng(11)
    for pivot in range(4):
        for _ in range(5):
            q = rng.normal(size=4) * 0.2
            q[pivot] = 1.0 if pivot < 3 else 1.0  # the largest component is the pivot
            q /= np.linalg.norm(q)
            R = cv.matrix_from_quaternion(q)
            out = cv.quaternion_from_matrix(R)
            np.testing.assert_allclose(out, q if q[3] >= 0 else -q, atol=1e-12)
            assert out[3] >= 0
    with pytest.raises(ValueError):
        cv.quaternion_from_matrix(np.eye(2))


def test_matrix_from_quaternion_values():
    s = np.sqrt(0.5)
    np.testing.assert_allclose(cv.matrix_from_quaternion([0, 0, s, s]), [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                               atol=1e-12)
    np.testing.assert_allclose(cv.matrix_from_quaternion([3 * s, 0, 0, 3 * s]),  # not normalised: same rotation
                               [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)
    x, y, z, w = np.array([0.1, -0.5, 0.3, 0.8]) / np.linalg.norm([0.1, -0.5, 0.3, 0.8])
    v = np.array([x, y, z])
    Kx = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    rodrigues = np.eye(3) + 2 * w * Kx + 2 * Kx @ Kx  # the rotation of a unit quaternion
    np.testing.assert_allclose(cv.matrix_from_quaternion([x, y, z, w]), rodrigues, atol=1e-12)
    assert np.linalg.norm(v) < 1
    with pytest.raises(ValueError, match="^quaternion has zero norm$"):
        cv.matrix_from_quaternion([0, 0, 0, 1e-13])
    with pytest.raises(ValueError):
        cv.matrix_from_quaternion([0, 0, 1])


def test_pixel_rays_and_unprojection_on_a_non_square_image():
    K = np.array([[50.0, 0, 20.0], [0, 40.0, 5.0], [0, 0, 1]])
    rays = cv.pixel_rays((7, 30), K)
    assert rays.shape == (7, 30, 3)
    v, u = 6, 29
    np.testing.assert_allclose(rays[v, u], [(u - 20.0) / 50.0, (v - 5.0) / 40.0, 1.0])
    np.testing.assert_allclose(cv.pixel_rays((7, 30), 2 * K), rays)  # a K scaled as a whole: normalised back
    depth = np.full((7, 30), 2.0)
    depth[0, 0] = np.nan
    pts = cv.unproject_depth(depth, K)
    assert pts.dtype == np.float32 and pts.shape == (7, 30, 3)
    np.testing.assert_allclose(pts[v, u], 2.0 * rays[v, u], rtol=1e-6)
    assert np.isnan(pts[0, 0]).all()
    T = cv.make_transform(axis_rotation(2, 0.5), [1, 2, 3])
    np.testing.assert_allclose(cv.unproject_depth(depth, K, T)[v, u], cv.transform_points(T, pts[v, u]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"^depth must be \(h, w\)"):
        cv.unproject_depth(np.ones((2, 2, 1)), K)
    with pytest.raises(ValueError, match=r"^K must have shape \(3, 3\)"):
        cv.pixel_rays((2, 2), np.eye(4))


def test_rotation_helpers_work_in_float64_and_name_their_arguments():
    """The rotation maths is float64 whatever the input (float32 angles, integer quaternions)."""
    a32 = np.float32(0.3)
    for rot, axis in ((cv.rot_x, 0), (cv.rot_y, 1), (cv.rot_z, 2)):
        R = rot(a32)
        assert R.dtype == np.float64 and R.shape == (3, 3)
        np.testing.assert_allclose(R, axis_rotation(axis, float(a32)), atol=1e-15)
        assert rot(np.array([0.1, 0.2], np.float32)).shape == (2, 3, 3)
    R32 = axis_rotation(1, 0.7).astype(np.float32)
    angle = cv.rotation_angle(R32)
    assert angle.dtype == np.float64 and angle == pytest.approx(0.7, abs=1e-6)
    assert cv.rotation_angle(axis_rotation(2, 2.5)) == pytest.approx(2.5, abs=1e-12)  # a single 3x3
    np.testing.assert_allclose(cv.rotation_angle(np.stack([axis_rotation(0, 0.2), axis_rotation(2, 3.0)])),
                               [0.2, 3.0], atol=1e-12)
    same = cv.slerp([0, 0, 0, 1], [0, 0, 0, 1], 0.3)  # integer quaternions: still a float64 result
    assert same.dtype == np.float64 and same.tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"^T_map_base must have shape \(4, 4\)"):
        cv.map_to_odom(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="^T0 must have shape"):
        cv.interpolate_transform(np.eye(3), np.eye(4), 0.5)
    with pytest.raises(ValueError, match="^T1 contains NaN or Inf"):
        cv.interpolate_transform(np.eye(4), np.full((4, 4), np.nan), 0.5)


def test_interpolated_transform_moves_linearly_from_the_first_pose():
    T0 = cv.make_transform(axis_rotation(2, 0.2), [4.0, 0.0, 1.0])
    T1 = cv.make_transform(axis_rotation(2, 1.0), [0.0, 8.0, 1.0])
    T = cv.interpolate_transform(T0, T1, 0.25)
    np.testing.assert_allclose(T[:3, 3], [3.0, 2.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(T[:3, :3], axis_rotation(2, 0.4), atol=1e-12)
    np.testing.assert_allclose(cv.interpolate_transform(T0, T1, 0.0), T0, atol=1e-12)
    np.testing.assert_allclose(cv.interpolate_transform(T0, T1, 1.0), T1, atol=1e-12)


def test_conventions_compute_in_float64_from_float32_inputs():
    T = cv.make_transform(axis_rotation(1, 0.4), [1.0, -2.0, 0.5])
    assert cv.inverse(T.astype(np.float32)).dtype == np.float64
    assert cv.extrinsic_to_pose(cv.inverse(T)[:3].astype(np.float32)).dtype == np.float64
    q = cv.quaternion_from_matrix(T[:3, :3].astype(np.float32))
    assert q.dtype == np.float64
    assert cv.matrix_from_quaternion(q.astype(np.float32)).dtype == np.float64
    assert cv.rotation_from_vector(np.array([0.1, 0.2, 0.3], np.float32)).dtype == np.float64


def test_rotation_vector_checks_and_small_angle_series():
    """Rodrigues R = I + a [v]x + b [v]x^2; below 1e-4 rad a and b come from their series. The coefficients are read
    back from R: a from the skew part, b from the symmetric part, and compared with the stable closed forms."""
    with pytest.raises(ValueError, match="^rotation vectors must have a trailing dimension of 3"):
        cv.rotation_from_vector([0.1, 0.2])
    with pytest.raises(ValueError, match="^q must have a trailing dimension of 4"):
        cv.matrix_from_quaternion([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="^q contains NaN or Inf"):
        cv.matrix_from_quaternion([0.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(cv.rotation_from_vector([0.0, 0.0, 0.0]), np.eye(3))  # exactly, no 0/0
    for t in (9e-5, 3e-5, 0.3):
        v = t * np.array([0.6, 0.0, 0.8])
        R = cv.rotation_from_vector(v)
        a = (R[1, 0] - R[0, 1]) / 2 / v[2]
        b = ((R[0, 2] + R[2, 0]) / 2) / (v[0] * v[2])
        assert a == pytest.approx(np.sin(t) / t, rel=1e-12)
        assert b == pytest.approx(2 * np.sin(t / 2) ** 2 / t**2, rel=1e-9)
