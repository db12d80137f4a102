"""Preprocessor and PixelMapping: geometry of crop/pad, pixel and intrinsics round trips, resampling, bad input."""

import cv2
import numpy as np
import pytest
import torch

from ros2_stream4d.mapping.preprocess import PixelMapping, Preprocessor

SIZES = [(480, 640), (720, 1280), (333, 517), (1000, 300), (17, 29), (1, 1), (392, 518)]


def gaussian_blob(h, w, u0, v0, sigma):
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    g = np.exp(-((u - u0) ** 2 + (v - v0) ** 2) / (2 * sigma**2))
    return np.repeat((g * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def centroid(img):
    g = img if img.ndim == 2 else img.mean(axis=0)
    g = g - np.median(g)
    g = np.clip(g, 0, None)
    v, u = np.mgrid[0 : g.shape[0], 0 : g.shape[1]]
    return (g * u).sum() / g.sum(), (g * v).sum() / g.sum()


def test_official_crop_recipe_sizes():
    pre = Preprocessor(518, "crop")
    for (h, w), expect in [((480, 640), (392, 518)), ((1080, 1920), (294, 518)), ((640, 480), (518, 518)),
                           ((350, 518), (350, 518))]:
        t, m = pre.prepare(np.zeros((h, w, 3), np.uint8))
        assert tuple(t.shape) == (3, *expect) and m.model_hw == expect
        assert t.dtype == torch.float32
    # 640 wide, 480 tall: resized to 518 x 392 (392 = round(480 * 518 / 640 / 14) * 14), no crop
    m = pre.plan((480, 640))[1]
    assert m.scale_x == pytest.approx(518 / 640) and m.scale_y == pytest.approx(392 / 480) and m.offset_y == 0
    # portrait: resized to 518 x 686, centre crop of (686 - 518) // 2 = 84 rows
    (rh, rw), m = pre.plan((640, 480))
    assert (rh, rw) == (686, 518) and m.offset_y == -84


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("hw", SIZES)
def test_output_is_multiple_of_patch_and_in_unit_range(mode, hw):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    t, m = Preprocessor(518, mode).prepare(img)
    assert t.shape[1] % 14 == 0 and t.shape[2] % 14 == 0 and t.shape[2] == 518
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert m.source_hw == hw and m.model_hw == tuple(t.shape[1:])


@pytest.mark.parametrize("mode,height", [("crop", None), ("pad", None), ("crop", 392), ("pad", 392)])
@pytest.mark.parametrize("hw", [(480, 640), (333, 517), (700, 400), (100, 60)])
def test_known_pixel_lands_where_the_mapping_says(mode, height, hw):
    pre = Preprocessor(518, mode, height=height)
    # A blob in the source placed so that it stays visible after a crop.
    u_s, v_s = hw[1] * 0.46 + 0.3, hw[0] * 0.54 - 0.2
    t, m = pre.prepare(gaussian_blob(*hw, u_s, v_s, sigma=max(1.5, min(hw) / 60)))
    u_m, v_m = m.source_to_model_pixels(u_s, v_s)
    img = t.numpy()
    if mode == "pad":  # the white padding would bias the centroid: look at the content only
        img = np.where(m.valid_model_mask()[None], img, 0)
    cu, cv = centroid(img)
    assert abs(cu - u_m) < 0.06 and abs(cv - v_m) < 0.06


def test_checker_colours_match_through_the_mapping():
    h, w, cell = 300, 420, 30
    v, u = np.mgrid[0:h, 0:w]
    checker = (((u // cell) + (v // cell)) % 2 * 255).astype(np.uint8)
    t, m = Preprocessor(518, "pad").prepare(checker)
    uu, vv = np.meshgrid(np.arange(518), np.arange(t.shape[1]))
    us, vs = m.model_to_source_pixels(uu, vv)
    inside = m.valid_model_mask()
    # far from cell edges (2 source px) the model colour must equal the checker colour at the mapped position
    fu, fv = np.mod(us + 0.5, cell), np.mod(vs + 0.5, cell)
    safe = inside & (fu > 2) & (fu < cell - 2) & (fv > 2) & (fv < cell - 2)
    expect = (((np.floor(us + 0.5) // cell) + (np.floor(vs + 0.5) // cell)) % 2).astype(np.float32)
    assert safe.sum() > 1000
    assert np.abs(t.numpy()[0][safe] - expect[safe]).max() < 0.05
    assert np.all(t.numpy()[:, ~inside] == 1.0)  # padding value of the official pad mode


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("hw", SIZES)
def test_pixel_and_K_round_trips(mode, hw):
    m = Preprocessor(518, mode).plan(hw)[1]
    rng = np.random.default_rng(1)
    u, v = rng.uniform(-0.5, hw[1] - 0.5, 50), rng.uniform(-0.5, hw[0] - 0.5, 50)
    u2, v2 = m.model_to_source_pixels(*m.source_to_model_pixels(u, v))
    np.testing.assert_allclose(u2, u, atol=1e-9)
    np.testing.assert_allclose(v2, v, atol=1e-9)
    K = np.array([[500.0, 0, hw[1] / 2 - 0.3], [0, 510.0, hw[0] / 2 + 0.7], [0, 0, 1]])
    np.testing.assert_allclose(m.model_to_source_K(m.source_to_model_K(K)), K, atol=1e-9)
    # a 3-D point projects consistently: project with K_src then map == project with K_model
    X = np.array([0.3, -0.2, 2.0])
    p_src = K @ X
    p_mod = m.source_to_model_K(K) @ X
    um, vm = m.source_to_model_pixels(p_src[0] / p_src[2], p_src[1] / p_src[2])
    np.testing.assert_allclose([um, vm], p_mod[:2] / p_mod[2], atol=1e-9)


def test_image_corners_map_to_edges():
    m = Preprocessor(518, "crop").plan((480, 640))[1]
    u, v = m.source_to_model_pixels([-0.5, 639.5], [-0.5, 479.5])
    np.testing.assert_allclose(u, [-0.5, 517.5])
    np.testing.assert_allclose(v, [-0.5, 391.5])


def test_resample_round_trip_crop_mode_and_nan_outside():
    hw = (640, 480)  # portrait: rows get cropped
    m = Preprocessor(518, "crop").plan(hw)[1]
    depth_src = np.fromfunction(lambda r, c: 1.0 + r * 0.01 + c * 0.001, hw, dtype=np.float32)
    depth_model = m.resample_to_model(depth_src)
    assert depth_model.shape == m.model_hw and np.isfinite(depth_model).all()
    back = m.resample_to_source(depth_model)
    valid = m.valid_source_mask()
    x0, y0, x1, y1 = m.valid_source_region()
    assert (x0, x1) == (0, 480) and 0 < y0 < y1 < 640
    assert valid[y0:y1, x0:x1].all() and valid.sum() == (y1 - y0) * (x1 - x0)
    assert np.isnan(back[~valid]).all() and np.isfinite(back[valid]).all()
    # nearest sampling: values are copies of source values; error below one source-pixel gradient step
    assert np.abs(back[valid] - depth_src[valid]).max() <= 0.011 + 1e-6
    assert np.isin(depth_model, depth_src).all()


def test_resample_pad_mode_marks_padding_nan_and_keeps_channels():
    m = Preprocessor(518, "pad").plan((200, 518))[1]
    assert m.model_hw == (210, 518) and m.offset_y == 5
    rgb = np.full((200, 518, 3), 7, np.uint8)
    out = m.resample_to_model(rgb, fill=255)
    assert out.shape == (210, 518, 3) and (out[:5] == 255).all() and (out[5:205] == 7).all()
    d = m.resample_to_model(np.ones((200, 518), np.float32))
    assert np.isnan(d[:5]).all() and np.isnan(d[205:]).all()
    assert np.isfinite(m.resample_to_source(d)).all()  # the whole camera image is seen in pad mode
    with pytest.raises(TypeError, match="fill"):
        m.resample_to_model(rgb)
    with pytest.raises(ValueError, match="shape"):
        m.resample_to_source(np.ones((10, 10)))


def test_fixed_height_modes():
    for mode in ("crop", "pad"):
        t, m = Preprocessor(518, mode, height=392).prepare(np.zeros((720, 1280, 3), np.uint8))
        assert tuple(t.shape) == (3, 392, 518)
        assert m.scale_x == pytest.approx(m.scale_y, rel=5e-3)


def test_grey_input_is_replicated():
    t, _ = Preprocessor().prepare(np.full((100, 100), 128, np.uint8))
    assert torch.allclose(t[0], t[1]) and torch.allclose(t[1], t[2])


def test_bad_input_raises_clear_errors():
    pre = Preprocessor()
    with pytest.raises(TypeError, match="uint8"):
        pre.prepare(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        pre.prepare(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="at least 1x1"):
        pre.prepare(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="too wide"):
        pre.prepare(np.zeros((1, 1000, 3), np.uint8))
    with pytest.raises(ValueError, match="too tall"):
        pre.prepare(np.zeros((100000, 10, 3), np.uint8))
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))  # no memory behind it
    with pytest.raises(ValueError, match="pixel limit"):
        pre.prepare(huge)
    with pytest.raises(ValueError, match="multiple"):
        Preprocessor(width=500)
    with pytest.raises(ValueError, match="mode"):
        Preprocessor(mode="stretch")
    with pytest.raises(ValueError, match="3x3"):
        pre.plan((10, 10))[1].source_to_model_K(np.eye(4))


def test_mapping_is_a_plain_dataclass():
    m = PixelMapping((10, 20), (14, 28), 1.4, 1.4, 0.0, 0.0)
    assert m.scale == pytest.approx(1.4)
    u, v = m.source_to_model_pixels(np.array([0.0]), np.array([0.0]))
    assert u[0] == pytest.approx(0.5 * 1.4 - 0.5)


# -- exact oracles: the module docstring's formulas evaluated pixel by pixel, and OpenCV's own resize ---------------
PLANS = [("crop", None, (640, 480)), ("crop", None, (480, 640)), ("pad", None, (200, 518)), ("pad", None, (90, 40)),
         ("crop", None, (12, 84)), ("crop", None, (14, 84)), ("crop", None, (20, 70)),
         ("crop", 56, (50, 100)), ("pad", 56, (50, 100)), ("crop", 70, (33, 21)), ("pad", 70, (33, 21))]


def _seen(coord: np.ndarray, n: int) -> np.ndarray:
    """A pixel centre at coord lands on pixel i when coord is in [i - 0.5, i + 0.5): inside when in [-0.5, n-0.5)."""
    return (coord >= -0.5) & (coord < n - 0.5)


@pytest.mark.parametrize("mode,height,hw", PLANS)
def test_masks_and_region_match_the_pixel_convention(mode, height, hw):
    check_masks_against_the_convention(Preprocessor(56 if height else 70, mode, height=height).plan(hw)[1])


@pytest.mark.parametrize("mapping", [PixelMapping((5, 7), (10, 9), 0.3, 0.294, 0.9, 0.919),
                                     PixelMapping((6, 6), (4, 5), 0.45, 0.7, -0.8, 0.35),
                                     PixelMapping((4, 9), (12, 12), 2.5, 1.3, 1.6, -2.2)])
def test_masks_of_fractional_mappings(mapping):
    """Mappings no plan makes (fractional offsets, strong shrinking): a source pixel can land on a model pixel whose
    own centre is off the source; such a pixel is not seen."""
    check_masks_against_the_convention(mapping)


def check_masks_against_the_convention(m):
    (h, w), (mh, mw) = m.source_hw, m.model_hw
    # model pixels showing the image: their centres map back inside the source
    us, _ = m.model_to_source_pixels(np.arange(mw), np.zeros(mw))
    _, vs = m.model_to_source_pixels(np.zeros(mh), np.arange(mh))
    np.testing.assert_array_equal(m.valid_model_mask(), _seen(vs, h)[:, None] & _seen(us, w)[None, :])
    # source pixels the model sees: their centres land on a model pixel that shows the image
    um, _ = m.source_to_model_pixels(np.arange(w), np.zeros(w))
    _, vm = m.source_to_model_pixels(np.zeros(h), np.arange(h))
    col_ok = _seen(um, mw) & _seen(us, w)[np.clip(np.floor(um + 0.5).astype(int), 0, mw - 1)]
    row_ok = _seen(vm, mh) & _seen(vs, h)[np.clip(np.floor(vm + 0.5).astype(int), 0, mh - 1)]
    expected = row_ok[:, None] & col_ok[None, :]
    np.testing.assert_array_equal(m.valid_source_mask(), expected)
    rows, cols = np.flatnonzero(row_ok), np.flatnonzero(col_ok)
    if len(rows) and len(cols):
        assert m.valid_source_region() == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    back = m.resample_to_source(np.zeros((mh, mw)), fill=-5.0)
    np.testing.assert_array_equal(back == -5.0, ~expected)  # the fill marks exactly the unseen pixels


@pytest.mark.parametrize("mode,height,hw", PLANS)
def test_nearest_resampling_picks_the_pixel_under_each_centre(mode, height, hw):
    m = Preprocessor(56 if height else 70, mode, height=height).plan(hw)[1]
    (h, w), (mh, mw) = m.source_hw, m.model_hw
    src = np.random.default_rng(0).random((h, w, 2)).astype(np.float32)
    out = m.resample_to_model(src, fill=-1.0)
    assert out.shape == (mh, mw, 2) and out.dtype == np.float32
    for v in range(mh):
        for u in range(mw):
            us, vs = m.model_to_source_pixels(u, v)
            if _seen(us, w) and _seen(vs, h):
                np.testing.assert_array_equal(out[v, u], src[int(np.floor(vs + 0.5)), int(np.floor(us + 0.5))])
            else:
                assert (out[v, u] == -1.0).all()
    model = np.random.default_rng(1).random((mh, mw)).astype(np.float64)
    back = m.resample_to_source(model)
    seen = m.valid_source_mask()
    for v in range(h):
        for u in range(w):
            um, vm = m.source_to_model_pixels(u, v)
            if seen[v, u]:
                assert back[v, u] == model[int(np.floor(vm + 0.5)), int(np.floor(um + 0.5))]
            else:
                assert np.isnan(back[v, u])


@pytest.mark.parametrize("mode,height,hw", PLANS)
def test_prepared_image_is_opencvs_resize_cropped_or_padded(mode, height, hw):
    """INTER_AREA when both sides shrink, INTER_CUBIC otherwise; then the centre crop (crop) or white padding
    around the resized image at the mapping's offset (pad)."""
    pre = Preprocessor(56 if height else 70, mode, height=height)
    img = np.random.default_rng(2).integers(0, 256, (*hw, 3), dtype=np.uint8)
    (rh, rw), m = pre.plan(hw)
    arr, m2 = pre.prepare_array(img)
    assert m2 == m and arr.shape == (3, *m.model_hw) and arr.dtype == np.float32 and arr.flags.c_contiguous
    interp = cv2.INTER_AREA if (rh < hw[0] and rw < hw[1]) else cv2.INTER_CUBIC
    resized = cv2.resize(img, (rw, rh), interpolation=interp).astype(np.float32) / 255.0
    mh, mw = m.model_hw
    if mode == "crop":
        y0, x0 = int(-m.offset_y), int(-m.offset_x)
        assert y0 >= 0 and x0 >= 0
        expected = resized[y0:y0 + mh, x0:x0 + mw]
    else:
        y0, x0 = int(m.offset_y), int(m.offset_x)
        expected = np.ones((mh, mw, 3), np.float32)
        expected[y0:y0 + rh, x0:x0 + rw] = resized
    np.testing.assert_array_equal(arr, expected.transpose(2, 0, 1))
    t, _ = pre.prepare(img)
    assert torch.equal(t, torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_shrinking_uses_area_averaging():
    """Shrinking by 8 averages each 8x8 block: one bright pixel per block gives the same image wherever it sits in
    the block (cubic or linear sampling would see the dots near the sampling points only)."""
    corner, centre = np.zeros((400, 560), np.uint8), np.zeros((400, 560), np.uint8)
    corner[::8, ::8] = 255
    centre[3::8, 4::8] = 255
    pre = Preprocessor(70, "pad")
    a, m = pre.prepare_array(corner)
    b, _ = pre.prepare_array(centre)
    assert m.model_hw == (56, 70) and (m.scale_x, m.scale_y) == (1 / 8, 1 / 8)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a[:, m.valid_model_mask()], round(255 / 64) / 255, atol=1e-6)  # uint8 resize rounds


def test_plan_branches_exactly():
    # crop, free height: width to W, height rounded to patches, centre crop when taller than W
    (rh, rw), m = Preprocessor(70, "crop").plan((100, 50))
    assert (rh, rw) == (140, 70) and m.model_hw == (70, 70) and (m.offset_x, m.offset_y) == (0.0, -35.0)
    assert (m.scale_x, m.scale_y) == (70 / 50, 140 / 100)
    (rh, rw), m = Preprocessor(70, "crop").plan((33, 70))
    assert (rh, rw) == (28, 70) and m.model_hw == (28, 70) and m.offset_y == 0.0  # round(33 / 14) * 14 = 28
    # crop, fixed height: a uniform scale covering W x H, then a centre crop of both axes
    (rh, rw), m = Preprocessor(56, "crop", height=28).plan((40, 40))
    assert (rh, rw) == (56, 56) and m.model_hw == (28, 56) and (m.offset_x, m.offset_y) == (0.0, -14.0)
    (rh, rw), m = Preprocessor(28, "crop", height=56).plan((40, 40))
    assert (rh, rw) == (56, 56) and m.model_hw == (56, 28) and (m.offset_x, m.offset_y) == (-14.0, 0.0)
    # pad, free height: aspect kept, height padded up to a multiple of the patch, centred
    (rh, rw), m = Preprocessor(70, "pad").plan((45, 70))
    assert (rh, rw) == (45, 70) and m.model_hw == (56, 70) and (m.offset_x, m.offset_y) == (0.0, 5.0)
    # pad, fixed height: fit inside W x H, pad both axes
    (rh, rw), m = Preprocessor(56, "pad", height=28).plan((40, 40))
    assert (rh, rw) == (28, 28) and m.model_hw == (28, 56) and (m.offset_x, m.offset_y) == (14.0, 0.0)
    (rh, rw), m = Preprocessor(28, "pad", height=56).plan((40, 41))
    assert (rh, rw) == (27, 28) and m.model_hw == (56, 28) and (m.offset_x, m.offset_y) == (0.0, 14.0)
    assert Preprocessor(14, "pad").plan((1, 1))[1].model_hw == (14, 14)  # the smallest image


def test_plan_limits_and_constructor_checks():
    Preprocessor(14, "crop").plan((10_000, 10_000))  # exactly the source pixel limit is allowed
    with pytest.raises(ValueError, match="exceeds the 100000000 pixel limit"):
        Preprocessor(14, "crop").plan((10_000, 10_001))
    with pytest.raises(ValueError, match="at least 1x1"):
        Preprocessor().plan((5, 0))
    with pytest.raises(ValueError, match="too wide for mode 'pad'"):
        Preprocessor(14, "pad").plan((1, 29))  # 14 wide, resized height 0
    assert Preprocessor(width=1, patch_size=1, height=1).plan((3, 5))[1].model_hw == (1, 1)  # the smallest sizes
    # pad into a fixed box: a very wide image that would shrink to 0 rows is refused, one that keeps 1 column is not
    with pytest.raises(ValueError, match="too wide for mode 'pad': it would be resized to 0x14"):
        Preprocessor(14, "pad", height=14).plan((1, 1000))
    assert Preprocessor(14, "pad", height=14).plan((1000, 50))[0] == (14, 1)
    # exactly the resized-pixel limit (2000 x 20000 = 40,000,000) is allowed
    assert Preprocessor(2000, "crop", patch_size=2).plan((20_000, 2000))[0] == (20_000, 2000)
    for kwargs, match in ((dict(patch_size=0), "patch_size must be >= 1"), (dict(width=0), "width must be"),
                          (dict(width=-14), "width must be"), (dict(width=518.5), "width must be"),
                          (dict(height=500), "height must be a positive multiple of patch_size=14"),
                          (dict(height=0), "height must be"), (dict(mode="stretch"), "mode must be one of")):
        with pytest.raises(ValueError, match=match):
            Preprocessor(**kwargs)
    pre = Preprocessor(28, "pad", patch_size=7, height=21)
    assert (pre.width, pre.height, pre.mode, pre.patch_size) == (28, 21, "pad", 7)
    assert pre.plan((30, 40))[1].model_hw == (21, 28)


def test_pixel_maps_are_float64_and_the_matrix_is_the_pixel_map():
    m = PixelMapping((40, 60), (30, 50), 0.8, 0.75, 2.0, -3.0)
    u, v = np.array([0, 7, 59], np.float32), np.array([0, 13, 39], np.float32)
    um, vm = m.source_to_model_pixels(u, v)
    assert um.dtype == vm.dtype == np.float64
    np.testing.assert_allclose(m.source_to_model_matrix() @ np.stack([u, v, np.ones(3)]), [um, vm, np.ones(3)])
    us, vs = m.model_to_source_pixels(um.astype(np.float32), vm.astype(np.float32))
    assert us.dtype == vs.dtype == np.float64
    np.testing.assert_allclose([us, vs], [u, v], atol=1e-5)


def test_pixel_mapping_helpers_and_checks():
    m = PixelMapping((10, 20), (30, 20), 1.0, 3.0, 0.0, 0.0)
    assert m.scale == 2.0  # the mean of the two axes
    u, v = m.source_to_model_pixels(2.0, 1.0)
    assert (u, v) == (2.0, 4.0)  # (1 + 0.5) * 3 - 0.5
    A = m.source_to_model_matrix()
    np.testing.assert_array_equal(A, [[1.0, 0, 0], [0, 3.0, 1.0], [0, 0, 1]])
    K = np.array([[10.0, 0, 9.5], [0, 10.0, 4.5], [0, 0, 1]])
    np.testing.assert_allclose(m.source_to_model_K(K), A @ K)
    np.testing.assert_allclose(m.model_to_source_K(A @ K), K)
    with pytest.raises(ValueError, match="intrinsics must be a finite 3x3 matrix"):
        m.model_to_source_K(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"expected an array of shape \(10, 20\)"):
        m.resample_to_model(np.ones(20))
    with pytest.raises(TypeError, match="cannot fill a uint8 array with NaN"):
        m.resample_to_model(np.ones((10, 20), np.uint8))
    out = m.resample_to_model(np.full((10, 20), 9, np.uint8), fill=0)  # every model pixel is on the image
    assert out.dtype == np.uint8 and (out == 9).all()
    assert m.resample_to_model(np.ones((10, 20), np.int32), fill=-1).dtype == np.int32


def test_image_checks():
    pre = Preprocessor(70)
    with pytest.raises(TypeError, match=r"^Preprocessor.prepare takes a numpy uint8 \(h, w, 3\) RGB image, not a"):
        pre.prepare(torch.zeros(10, 10, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="image must be uint8, got float32"):
        pre.prepare_array(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"image must be \(h, w, 3\) RGB or \(h, w\) grey"):
        pre.prepare_array(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="image must be"):
        pre.prepare_array(np.zeros(10, np.uint8))
    grey = np.random.default_rng(3).integers(0, 256, (30, 40), dtype=np.uint8)
    a, _ = pre.prepare_array(grey[:, :, None])  # (h, w, 1) is grey
    b, _ = pre.prepare_array(np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(a, b)
