"""Lens undistortion: exact geometry of plumb_bob / rational_polynomial / equidistant against formulas written out
here, map caching, no-op and error cases, and sim frames (and bags) rendered through a lens and undistorted back."""

import json

import numpy as np
import pytest

from ros2_stream4d.mapping.undistort import LensModel, Undistorter, is_distorted

W, H = 320, 240
F = (W / 2) / np.tan(np.radians(35.0))  # a 70 degree horizontal field of view
K = np.array([[F, 0.0, W / 2 - 0.7], [0.0, F * 1.01, H / 2 + 0.4], [0.0, 0.0, 1.0]])
P = np.hstack([K, np.zeros((3, 1))])
LENSES = {
    "plumb_bob": [-0.25, 0.08, 0.0012, -0.0008, -0.015],  # barrel, a little tangential
    "rational_polynomial": [-0.2, 0.05, 0.001, -0.001, 0.0, 0.05, 0.0, 0.0],
    "equidistant": [0.05, -0.02, 0.005, -0.001],
}


def lens(model="plumb_bob", D=None, K_=K, P_=P, size=(W, H)):
    return LensModel.create(K_, model, LENSES[model] if D is None else D, *size, P=P_)


def distort_normalized(model, D, x, y):
    """The lens models as documented by ROS / OpenCV, written out: rays (x, y, 1) -> distorted normalized coords."""
    r2 = x * x + y * y
    if model == "equidistant":
        r = np.sqrt(r2)
        th = np.arctan(r)
        k1, k2, k3, k4 = D
        th_d = th * (1 + k1 * th**2 + k2 * th**4 + k3 * th**6 + k4 * th**8)
        s = np.where(r > 0, th_d / np.where(r > 0, r, 1), 1.0)
        return x * s, y * s
    k1, k2, p1, p2, k3 = D[:5]
    k4, k5, k6 = D[5:8] if len(D) == 8 else (0.0, 0.0, 0.0)
    radial = (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def pixel_grid(w=W, h=H):
    return np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))


def pinhole_pixels_of(lens_model):
    """For every pixel of the lens's (distorted) image: where its ray lands in the pinhole image of K."""
    x, y = lens_model.unproject(*pixel_grid(lens_model.width, lens_model.height))
    return K[0, 0] * x + K[0, 2], K[1, 1] * y + K[1, 2]


BLOBS = [(u, v) for u in np.arange(30.0, W - 20, 37.3) for v in np.arange(25.0, H - 20, 35.1)]
SIGMA = 2.2


def blob_image(u, v):
    """Gaussian blobs at BLOBS, in pinhole pixel coordinates (u, v) given per output pixel."""
    img = np.zeros(u.shape)
    for bu, bv in BLOBS:
        img += np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * SIGMA**2))
    return np.round(np.clip(img, 0, 1) * 250).astype(np.uint8)


def blob_errors(img, valid):
    """Distance (px) of each blob's intensity centroid from where the pinhole camera puts it (blobs whose
    window is fully valid)."""
    g = img.astype(np.float64)
    out = []
    r = int(4 * SIGMA)
    for bu, bv in BLOBS:
        u0, v0 = int(round(bu)), int(round(bv))
        win = (slice(v0 - r, v0 + r + 1), slice(u0 - r, u0 + r + 1))
        if not valid[win].all():
            continue
        vv, uu = np.mgrid[win]
        w = g[win]
        if w.sum() == 0:  # the blob left its window altogether
            out.append(np.inf)
            continue
        out.append(np.hypot((w * uu).sum() / w.sum() - bu, (w * vv).sum() / w.sum() - bv))
    return np.array(out)


LINES = np.arange(25.0, W - 10, 30.0)  # vertical lines u = c in the pinhole image


def line_image(u, v, lines=LINES):
    d = np.min(np.abs(u[..., None] - np.asarray(lines)), axis=-1)
    return np.round(np.exp(-(d**2) / (2 * 1.5**2)) * 250).astype(np.uint8)


def line_fit(img, valid, lines=LINES, half=6):
    """For each line: per-row intensity centroids in a window of +-half px around u = c; returns the max residual
    of a straight-line fit u = a + b v and the max offset from u = c (both px)."""
    g = img.astype(np.float64)
    resid, offset = [], []
    for c in lines:
        u0 = int(round(c))
        cols = np.arange(u0 - half, u0 + half + 1)
        if cols[0] < 0 or cols[-1] >= W:
            continue
        rows = [r for r in range(H) if valid[r, cols].all()]
        if len(rows) < H // 2:
            continue
        w = g[rows][:, cols]
        uc = (w * cols).sum(1) / w.sum(1)
        fit = np.polyval(np.polyfit(rows, uc, 1), rows)
        resid.append(np.abs(uc - fit).max())
        offset.append(np.abs(uc - c).max())
    return max(resid), max(offset)


# ---------------------------------------------------------------------------------------------- the lens models
@pytest.mark.parametrize("model", sorted(LENSES))
def test_projection_is_the_written_model_and_unprojection_inverts_it(model):
    L = lens(model)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 0.5, 200), rng.uniform(-0.4, 0.4, 200)
    xd, yd = distort_normalized(model, LENSES[model], x, y)
    u, v = L.project(x, y)
    np.testing.assert_allclose(u, K[0, 0] * xd + K[0, 2], atol=1e-6)
    np.testing.assert_allclose(v, K[1, 1] * yd + K[1, 2], atol=1e-6)
    x2, y2 = L.unproject(u, v)
    np.testing.assert_allclose(x2, x, atol=1e-7)
    np.testing.assert_allclose(y2, y, atol=1e-7)
    # shapes are kept; integer pixel centres are pixels (preprocess.py's convention, same as OpenCV's)
    xg, yg = L.unproject(*pixel_grid(8, 5))
    assert xg.shape == (5, 8)


# ------------------------------------------------------------------------------------------- image geometry
@pytest.mark.parametrize("model", sorted(LENSES))
def test_undistorted_blobs_land_where_the_pinhole_camera_puts_them(model):
    L = lens(model)
    distorted = blob_image(*pinhole_pixels_of(L))
    und = Undistorter()
    out, K_new = und.undistort(distorted, L)
    np.testing.assert_array_equal(K_new, K)  # new_K "P" and P = [K | 0]
    valid = und.maps(L).valid
    assert valid.mean() > 0.9
    ideal = blob_image(*pixel_grid())
    err = blob_errors(out, valid)
    assert len(err) >= 30 and err.max() < 0.15, err.max()
    assert np.abs(out.astype(int) - ideal)[valid].mean() < 1.0
    # the test sees the lens: skipping the undistortion, or undoing the opposite lens, moves the blobs by pixels
    assert blob_errors(distorted, valid).max() > 3
    flipped, _ = Undistorter().undistort(distorted, lens(model, D=-np.array(LENSES[model])))
    assert blob_errors(flipped, valid).max() > 1.5


@pytest.mark.parametrize("model", sorted(LENSES))
def test_straight_lines_become_straight(model):
    L = lens(model)
    distorted = line_image(*pinhole_pixels_of(L))
    und = Undistorter()
    out, _ = und.undistort(distorted, L)
    valid = und.maps(L).valid
    resid, offset = line_fit(out, valid)
    assert resid < 0.2 and offset < 0.25, (resid, offset)
    # the lens bends them: one line near the left edge, found anywhere within 40 px
    one = line_image(*pinhole_pixels_of(L), lines=[40.0])
    resid_raw, _ = line_fit(one, np.ones_like(valid), lines=[40.0], half=39)
    assert resid_raw > 2.0


def test_rgb_and_grey_images_keep_shape_and_dtype():
    L = lens()
    u, v = pinhole_pixels_of(L)
    grey = blob_image(u, v)
    rgb = np.stack([grey, line_image(u, v), 255 - grey], -1)
    und = Undistorter()
    out_rgb, _ = und.undistort(rgb, L)
    out_grey, _ = und.undistort(grey, L)
    assert out_rgb.shape == (H, W, 3) and out_rgb.dtype == np.uint8 and out_grey.shape == (H, W)
    np.testing.assert_array_equal(out_rgb[..., 0], out_grey)  # channels are remapped alike
    with pytest.raises(ValueError, match="does not match"):
        und.undistort(rgb[:-1], L)


# -------------------------------------------------------------------------------------------------- K_new
def test_new_K_choices():
    pincushion = lens(D=[0.2, 0.05, 0.0, 0.0, 0.0])
    P2 = P.copy()
    P2[0, 0] *= 0.9
    P2[1, 1] *= 0.9
    assert np.array_equal(Undistorter("P").output_K(lens(P_=P2)), P2[:, :3])
    assert np.array_equal(Undistorter("P").output_K(lens(P_=None)), K)  # no P: keep K
    assert np.array_equal(Undistorter("P").output_K(lens(P_=np.zeros((3, 4)))), K)  # drivers leaving P zero
    assert np.array_equal(Undistorter("K").output_K(lens(P_=P2)), K)
    keep = Undistorter("K")
    assert keep.maps(pincushion).valid.mean() < 0.97  # pincushion + keep K: black corners
    out, _ = keep.undistort(np.full((H, W), 200, np.uint8), pincushion)
    assert out[0, 0] == 0 and out[H // 2, W // 2] == 200
    valid = keep.maps(pincushion).valid  # exactly the pixels that see only the camera image
    assert (out[valid] == 200).all() and (out[~valid] < 200).mean() > 0.95
    for L in (pincushion, lens("plumb_bob"), lens("equidistant")):
        optimal = Undistorter("optimal").maps(L)
        assert optimal.valid[2:-2, 2:-2].all()  # alpha 0: no black border (up to the last pixel's taps)
        assert not np.allclose(optimal.K_new, K)
    with pytest.raises(ValueError, match="new_K"):
        Undistorter("rectified")


# -------------------------------------------------------------------------------------------------- caching
def test_maps_are_cached_per_lens_values_and_bounded():
    und = Undistorter(cache_size=2)
    a = und.maps(lens())
    assert und.maps(lens()) is a and und.builds == 1  # an equal lens built again is a cache hit
    info = type("Info", (), dict(width=W, height=H, k=K.reshape(-1).tolist(), d=LENSES["plumb_bob"],
                                 p=P.reshape(-1).tolist(), distortion_model="plumb_bob"))()
    assert und.maps(LensModel.from_camera_info(info)) is a
    other = lens(D=[-0.2, 0.08, 0.0012, -0.0008, -0.015])
    b = und.maps(other)
    assert b is not a and und.builds == 2
    assert not np.array_equal(a.map1, b.map1)
    assert und.maps(lens()) is a  # a is now the most recently used
    und.maps(lens("equidistant"))  # evicts b (least recently used) at cache_size 2
    assert len(und) == 2 and und.builds == 3
    assert und.maps(lens()) is a
    assert und.maps(other) is not b and und.builds == 4  # rebuilt
    with pytest.raises(ValueError):
        a.map1[0, 0] = 0  # cached maps are read-only


# ---------------------------------------------------------------------------------------- no-op and errors
@pytest.mark.parametrize("model,D", [("plumb_bob", [0.0] * 5), ("plumb_bob", []), ("", [0.1, 0.2]),
                                     ("equidistant", [0.0] * 4), ("rational_polynomial", [0.0] * 8),
                                     ("some_future_model", [0, 0, 0])])
def test_a_pinhole_lens_is_a_no_op(model, D):
    assert not is_distorted(model, D)
    L = LensModel.create(K, model, D, W, H, P)
    assert not L.distorted and L.D == ()
    und = Undistorter()
    img = np.zeros((H, W, 3), np.uint8)
    out, K_out = und.undistort(img, L)
    assert out is img and np.array_equal(K_out, K)
    assert und.maps(L) is None and und.builds == 0 and len(und) == 0


def test_bad_lenses_raise_clear_errors():
    assert is_distorted("plumb_bob", [-0.1, 0, 0, 0, 0]) and is_distorted("equidistant", (0, 0, 0, 0.01))
    with pytest.raises(ValueError, match="'kannala_brandt'"):
        is_distorted("kannala_brandt", [0.1, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="'fisheye'"):
        LensModel.create(K, "fisheye", [0.1, 0, 0, 0], W, H)
    with pytest.raises(ValueError, match="equidistant.*4"):
        LensModel.create(K, "equidistant", [0.1, 0.0, 0.0, 0.0, 0.0], W, H)
    with pytest.raises(ValueError, match="rational_polynomial.*8"):
        LensModel.create(K, "rational_polynomial", [0.1, 0.0, 0.0, 0.0, 0.0], W, H)
    with pytest.raises(ValueError, match="finite"):
        LensModel.create(K, "plumb_bob", [np.nan, 0.1, 0, 0, 0], W, H)
    with pytest.raises(ValueError, match="uncalibrated"):
        LensModel.create(np.zeros((3, 3)), "plumb_bob", LENSES["plumb_bob"], W, H)
    with pytest.raises(ValueError, match="K must be"):
        LensModel.create(np.eye(4), "plumb_bob", LENSES["plumb_bob"], W, H)
    with pytest.raises(ValueError, match="size"):
        LensModel.create(K, "plumb_bob", LENSES["plumb_bob"], 0, H)
    assert LensModel.create(K, "plumb_bob", [-0.1, 0.01, 0, 0], W, H).D == (-0.1, 0.01, 0.0, 0.0, 0.0)  # k3 = 0
    folding = LensModel.create(K, "plumb_bob", [0.0, -2.0, 0.0, 0.0, 0.0], W, H)  # r(1 - 2 r^4) folds back
    with pytest.raises(ValueError, match="folds"):
        folding.unproject(*pixel_grid())


# ------------------------------------------------------------------------------------------------------ sim
@pytest.fixture(scope="module")
def room():
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("room", 3)
    camera = CameraModel.from_hfov(W, H, 70.0)
    T = make_trajectory(scene, "handheld", 5, seed=3).T_world_cam[2]
    return scene, camera, T, Renderer(scene, camera).render(T)


@pytest.mark.parametrize("model", ["plumb_bob", "equidistant"])
def test_a_sim_frame_through_a_lens_undistorts_to_the_pinhole_render(room, model):
    from ros2_stream4d.sim.render import Renderer

    scene, camera, T, pinhole = room
    P_cam = np.hstack([camera.K, np.zeros((3, 1))])
    L = LensModel.create(camera.K, model, LENSES[model], W, H, P_cam)
    seen = Renderer(scene, camera, lens=L).render(T)
    und = Undistorter()
    out, K_new = und.undistort(seen.rgb, L)
    np.testing.assert_array_equal(K_new, camera.K)
    valid = und.maps(L).valid

    def mad(img):
        return np.abs(img.astype(float) - pinhole.rgb)[valid].mean()

    assert mad(out) < 3.0
    assert mad(seen.rgb) > 6.0  # skipped
    flipped = LensModel.create(camera.K, model, -np.array(LENSES[model]), W, H, P_cam)
    assert mad(Undistorter().undistort(seen.rgb, flipped)[0]) > 4.0
    # depth of the lens render (z-depth of the lens's rays) undistorts to the pinhole depth
    depth, _ = und.undistort_depth(seen.depth, L)
    close = np.abs(depth - pinhole.depth) < 0.01 * pinhole.depth
    assert close[valid].mean() > 0.97
    K_other = camera.K.copy()
    K_other[0, 0] *= 1.1
    with pytest.raises(ValueError, match="does not match"):
        Renderer(scene, camera, lens=LensModel.create(K_other, model, LENSES[model], W, H))


def test_a_distorted_sim_bag_keeps_pinhole_ground_truth(tmp_path):
    from ros2_stream4d.cli import main
    from ros2_stream4d.sim.bag import TOPICS, iter_messages, read_ground_truth
    from ros2_stream4d.sim.render import CameraModel, Renderer
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    out = tmp_path / "lens"
    D = LENSES["plumb_bob"]
    assert main(["sim", "--scene", "room", "--frames", "3", "--width", str(W), "--height", str(H), "--seed", "5",
                 "--out", str(out), "--quiet", "--distortion", "plumb_bob:" + ",".join(map(str, D))]) == 0
    gt = read_ground_truth(out, with_images=True)
    assert gt.distortion_model == "plumb_bob" and np.allclose(gt.D, D)
    assert json.loads((out / "scene.json").read_text())["config"]["distortion_coeffs"] == D
    scene = build_scene("room", 5)
    camera = CameraModel.from_hfov(W, H, 60.0)
    pinhole = Renderer(scene, camera).render(make_trajectory(scene, "handheld", 3, seed=5).T_world_cam[1])
    assert np.array_equal(gt.depths[1], pinhole.depth, equal_nan=True)  # ground truth stays pinhole (K)
    assert not np.array_equal(gt.images[1], pinhole.rgb)  # the image went through the lens
    info = next(m for _, _, m in iter_messages(out, [TOPICS["camera_info"]]))
    L = LensModel.from_camera_info(info)
    assert L.distorted and L.D == tuple(D)
    und = Undistorter()
    rgb, K_new = und.undistort(gt.images[1], L)
    np.testing.assert_array_equal(K_new, gt.K)  # the undistorted image pairs with the ground truth's K
    valid = und.maps(L).valid
    diff = np.abs(rgb.astype(float) - pinhole.rgb)[valid]
    raw = np.abs(gt.images[1].astype(float) - pinhole.rgb)[valid]
    assert diff.mean() < 4.5 and np.median(diff) <= 1 and (diff > 20).mean() < 0.05  # interpolation at edges
    assert raw.mean() > 10 and (raw > 20).mean() > 0.15
    # bad --distortion specs stop with a message, before anything is written
    with pytest.raises(SystemExit, match="unknown distortion model 'fisheye'"):
        main(["sim", "--frames", "1", "--out", str(tmp_path / "x"), "--quiet", "--distortion", "fisheye:0.1,0,0,0"])
    with pytest.raises(SystemExit, match="equidistant.*4"):
        main(["sim", "--frames", "1", "--out", str(tmp_path / "x"), "--quiet", "--distortion", "equidistant:0.1,0"])
    with pytest.raises(SystemExit, match="numbers"):
        main(["sim", "--frames", "1", "--out", str(tmp_path / "x"), "--quiet", "--distortion", "plumb_bob:a,b"])
    assert not (tmp_path / "x").exists()
