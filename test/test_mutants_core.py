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
from ros2_stream4d.mapping.preprocess import PixelMapping
from ros2_stream4d.mapping.reconstructor import FramePrediction
from ros2_stream4d.mapping.scale import DepthSensorScale, OdometryScale
from ros2_stream4d.model.checkpoint import normalize_state_dict

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
