"""The mapping modules measured second (frame_sync, motion, products, undistort, map_io, map_store, fusion,
reconstructor, pipeline): small exact inputs that answer the mutants docs/mutation.md lists for them (fast,
in-process)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ros2_stream4d.mapping.frame_sync import ApproximateSync

MS = 1_000_000


# ---------------------------------------------------------------------------------------------------- frame_sync
def test_sync_needs_a_camera_and_keeps_its_count():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"^num_cameras must be >= 1, got {bad}$"):
            ApproximateSync(bad, slop_s=0.01)
    assert ApproximateSync(3, slop_s=0.01).num_cameras == 3


def test_slop_is_exact_in_nanoseconds_and_inclusive():
    """Two frames exactly one slop apart group; one nanosecond more does not (1 s slop: 1e9 ns, not 1e9 + 1)."""
    sync = ApproximateSync(2, slop_s=1.0)
    assert sync.slop_ns == 1_000_000_000
    assert sync.add(0, 0, "a0") is None
    assert sync.add(1, 1_000_000_001, "b") is None, "1 ns beyond the slop"
    sync = ApproximateSync(2, slop_s=1.0)
    sync.add(0, 0, "a0")
    assert sync.add(1, 1_000_000_000, "b") == ["a0", "b"], "exactly at the slop"
    sync.set_slop(0.0105)
    assert sync.slop_ns == 10_500_000
    sync.set_slop(1.0)
    assert sync.slop_ns == 1_000_000_000
    sync.add(0, 0, "c")
    assert sync.add(1, 1_000_000_001, "d") is None, "set_slop(1.0): 1e9 ns too"


def test_set_slop_changes_which_frames_match():
    sync = ApproximateSync(2, slop_s=0.001)
    sync.add(0, 100 * MS, "a")
    assert sync.add(1, 105 * MS, "b") is None, "5 ms apart, 1 ms slop"
    sync.clear()
    sync.set_slop(0.005)
    sync.add(0, 100 * MS, "a")
    assert sync.add(1, 105 * MS, "b") == ["a", "b"], "5 ms apart, 5 ms slop"


def test_full_queues_count_each_dropped_frame_once():
    sync = ApproximateSync(2, slop_s=0.001)  # default queue: 8 frames per camera
    for i in range(8):
        assert sync.add(0, i * 100 * MS, i) is None
    assert sync.dropped == 0, "8 frames fit"
    for i in range(8, 11):
        sync.add(0, i * 100 * MS, i)
    assert sync.dropped == 3
    small = ApproximateSync(2, slop_s=0.001, queue_size=2)
    for i in range(5):
        small.add(0, i * 100 * MS, i)
    assert small.dropped == 3
    # the queue kept the newest two: camera 1 at frame 3's stamp matches it
    assert small.add(1, 300 * MS, "b") == [3, "b"]
    assert small.dropped == 3, "the queue was full before; the match itself drops nothing older than frame 3"


def test_one_camera_passes_frames_through_without_queueing():
    sync = ApproximateSync(1, slop_s=0.0, queue_size=2)
    assert [sync.add(0, i, i) for i in range(20)] == [[i] for i in range(20)]
    assert sync.dropped == 0


def test_unmatched_older_frames_are_dropped_when_a_group_forms():
    sync = ApproximateSync(2, slop_s=0.010)
    for t in (100, 133, 166):
        sync.add(0, t * MS, f"a{t}")
    sync.dropped = 5  # counts add up
    assert sync.add(1, 168 * MS, "b168") == ["a166", "b168"]
    assert sync.dropped == 7, "a100 and a133 were never matched"


def test_frames_that_can_never_match_are_dropped_but_each_camera_keeps_its_newest():
    sync = ApproximateSync(2, slop_s=0.010)
    sync.add(0, 100 * MS, "a100")
    sync.add(0, 150 * MS, "a150")
    sync.dropped = 4
    # camera 1's first frame at 200: camera 0 has nothing near it; a100 can never match (older than 200 - slop)
    assert sync.add(1, 200 * MS, "b200") is None
    assert sync.dropped == 5, "a100 dropped; a150 is camera 0's last frame and stays"
    assert sync.add(0, 195 * MS, "a195") == ["a195", "b200"]
    assert sync.dropped == 6, "a150 unmatched"


def test_a_frame_exactly_one_slop_before_the_pivot_is_kept():
    sync = ApproximateSync(3, slop_s=0.010)
    assert sync.add(0, 200 * MS, "a200") is None
    assert sync.add(1, 190 * MS, "b190") is None
    assert sync.add(1, 195 * MS, "b195") is None
    # camera 2's only frame is far from the pivot (200): frames older than 190 ms could never match
    assert sync.add(2, 150 * MS, "c150") is None
    assert sync.dropped == 0, "b190 sits exactly at pivot - slop; c150 is camera 2's last frame"
    assert sync.add(2, 200 * MS, "c200") == ["a200", "b195", "c200"]
    assert sync.dropped == 2, "b190 and c150, unmatched"


def test_drop_uses_the_slop_below_the_pivot_not_above():
    sync = ApproximateSync(2, slop_s=0.010)
    sync.add(1, 300 * MS, "b300")
    sync.add(1, 305 * MS, "b305")
    sync.add(1, 312 * MS, "b312")
    # camera 0's frame at 250 sets no pivot near camera 1's frames: the pivot is 300 and 250 is far from it
    assert sync.add(0, 250 * MS, "a250") is None
    # frames older than 290 can never match; 300, 305, 312 (younger than 310 and beyond) must all stay
    assert sync.dropped == 0
    assert sync.add(0, 301 * MS, "a301") == ["a301", "b300"]
    assert sync.dropped == 1, "a250"
    assert sync.add(0, 306 * MS, "a306") == ["a306", "b305"]


def test_clear_forgets_queued_frames():
    sync = ApproximateSync(2, slop_s=0.010)
    sync.add(0, 100 * MS, "a")
    sync.clear()
    assert sync.add(1, 100 * MS, "b") is None
    assert sync.add(0, 101 * MS, "a2") == ["a2", "b"]


def test_groups_are_in_camera_order_whatever_the_arrival():
    sync = ApproximateSync(3, slop_s=0.010)
    sync.add(2, 100 * MS, "c")
    sync.add(0, 101 * MS, "a")
    assert sync.add(1, 99 * MS, "b") == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------------- products
def test_mesh_marker_defaults_and_no_colours():
    from ros2_stream4d.mapping.products import mesh_marker_fields

    v = [[0, 0, 0], [1, 0, 0], [0, 2, 0]]  # integers: the points are float64 all the same
    f = np.array([[0, 1, 2]], np.float64)  # a float array of indices (e.g. from a float buffer)
    (m,) = mesh_marker_fields(v, f)
    assert m["ns"] == "mesh" and m["id"] == 0 and m["header"] == {"frame_id": "map"}
    assert m["points"].dtype == np.float64 and m["points"].shape == (3, 3)
    np.testing.assert_array_equal(m["points"], np.asarray(v, np.float64))
    assert m["colors"].shape == (0, 4) and m["colors"].dtype == np.float32 and m["color"] == (1.0, 1.0, 1.0, 1.0)


def test_mesh_markers_split_at_half_a_million_triangles_by_default():
    from ros2_stream4d.mapping.products import mesh_marker_fields

    n = 500_001
    f = np.zeros((n, 3), np.int64)
    f[-1] = (1, 2, 0)
    out = mesh_marker_fields(np.eye(3), f, marker_id=7)
    assert [m["id"] for m in out] == [7, 8]
    assert [len(m["points"]) for m in out] == [3 * 500_000, 3]
    np.testing.assert_array_equal(out[1]["points"], np.eye(3)[[1, 2, 0]])


# ---------------------------------------------------------------------------------------------------- undistort
def test_output_K_of_a_pinhole_lens_is_its_K():
    from ros2_stream4d.mapping.undistort import LensModel, Undistorter

    K = np.array([[50.0, 0, 31.5], [0, 52.0, 23.5], [0, 0, 1]])
    lens = LensModel.create(K, "plumb_bob", [0.0] * 5, 64, 48)
    und = Undistorter()
    assert und.maps(lens) is None
    np.testing.assert_array_equal(und.output_K(lens), K)


# ---------------------------------------------------------------------------------------------------- map_io
def test_pcd_header_is_pcl_v07_exactly():
    from ros2_stream4d.mapping.map_io import pcd_bytes

    xyz = np.zeros((5, 3), np.float32)
    rgb = np.zeros((5, 3), np.uint8)
    header, data = pcd_bytes(xyz, rgb)
    assert header.decode("ascii").splitlines() == [
        "# .PCD v0.7 - Point Cloud Data file format", "VERSION 0.7", "FIELDS x y z rgb", "SIZE 4 4 4 4",
        "TYPE F F F F", "COUNT 1 1 1 1", "WIDTH 5", "HEIGHT 1", "VIEWPOINT 0 0 0 1 0 0 0", "POINTS 5", "DATA binary"]
    header, _ = pcd_bytes(xyz, rgb, np.ones(5, np.float32))
    assert b"FIELDS x y z rgb confidence\nSIZE 4 4 4 4 4\nTYPE F F F F F\nCOUNT 1 1 1 1 1\n" in header


def test_a_map_directory_path_that_is_a_file_is_refused_by_name(tmp_path):
    from ros2_stream4d.mapping.map_io import validate_map_dir_path

    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        validate_map_dir_path(tmp_path / "f")


# ---------------------------------------------------------------------------------------------------- fusion
def test_unsigned_voxel_keys_unpack_to_negative_coordinates():
    from ros2_stream4d.mapping.fusion import pack_voxel_keys, unpack_voxel_keys

    ijk = np.array([[-3, 7, -1_000_000], [0, -1, 5]], np.int64)
    keys = pack_voxel_keys(ijk)
    np.testing.assert_array_equal(unpack_voxel_keys(keys.astype(np.uint64)), ijk)
    np.testing.assert_array_equal(unpack_voxel_keys(keys.tolist()), ijk)


# ---------------------------------------------------------------------------------------------------- map_store
def test_exchange_swaps_two_directories_and_reports_missing_paths(tmp_path):
    from ros2_stream4d.mapping.map_store import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    assert _exchange(a, b) is True
    assert (a / "y").read_text() == "from b" and (b / "x").read_text() == "from a"
    assert not (a / "x").exists() and not (b / "y").exists()
    with pytest.raises(OSError, match="RENAME_EXCHANGE") as err:
        _exchange(a, tmp_path / "missing")
    assert err.value.errno == errno.ENOENT
    assert (a / "y").read_text() == "from b"


@pytest.mark.parametrize("atomic", [True, False])
def test_saving_over_a_saved_map_replaces_it(tmp_path, monkeypatch, atomic):
    from map_helpers import room, small_config

    from ros2_stream4d.mapping import map_store
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    frames, _ = room(n=8, hw=(30, 40))
    old, new = KeyframeMap(small_config()), KeyframeMap(small_config())
    for f in frames[:2]:
        old.integrate(f)
    for f in frames:
        new.integrate(f)
    assert len(new.keyframes) > len(old.keyframes)
    path = map_store.save_map_dir(old, tmp_path / "map")
    if not atomic:  # a filesystem without renameat2's exchange: old map aside, new one in, old one removed
        monkeypatch.setattr(map_store, "_exchange", lambda a, b: False)
    assert map_store.save_map_dir(new, path) == path
    loaded, meta = map_store.load_map_dir(path, small_config())
    assert meta["keyframes"] == len(loaded.keyframes) == len(new.keyframes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map"], "no temporary or old directory is left"


def _pincushion_lens():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    return LensModel.create(K, "plumb_bob", [0.3, 0.0, 0.0, 0.0, 0.0], 64, 48)


def test_undistorted_depth_is_float32_nearest_and_nan_outside_the_view():
    from ros2_stream4d.mapping.undistort import Undistorter

    depth = np.full((48, 64), 1.0)  # float64 input
    depth[:, 20:] = 3.0  # a sharp depth edge off the centre: nearest neighbour never blends the two sides
    out, K_new = Undistorter().undistort_depth(depth, _pincushion_lens())
    assert out.dtype == np.float32 and out.shape == (48, 64)
    assert np.isnan(out[0, 0]) and np.isnan(out[-1, -1]), "corners of the undistorted view see nothing"
    seen = out[np.isfinite(out)]
    assert seen.size > 0.5 * out.size
    assert set(np.unique(seen).tolist()) == {1.0, 3.0}
    # the colour path blends (linear by default): the same edge gets values in between
    img, _ = Undistorter().undistort(depth.astype(np.float32), _pincushion_lens())
    assert np.any((img > 1.01) & (img < 2.99))


# ---------------------------------------------------------------------------------------------------- map_io colours
def _ply_vertices(path, n):
    data = path.read_bytes()
    body = data[data.index(b"end_header\n") + len(b"end_header\n"):]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    return np.frombuffer(body, dtype=fields, count=n)


def test_float_colours_in_0_1_are_scaled_and_rounded(tmp_path):
    from ros2_stream4d.mapping.map_io import save_map

    xyz = np.arange(9, dtype=np.float64).reshape(3, 3)
    for dtype in (np.float64, np.float32):
        rgb = np.array([[0.0, 0.6, 1.0], [0.2, 0.0, 0.5], [1.0, 1.0, 0.004]], dtype)
        path = save_map(tmp_path / f"c_{np.dtype(dtype).name}.ply", xyz, rgb)
        v = _ply_vertices(path, 3)
        got = np.stack([v["red"], v["green"], v["blue"]], axis=1)
        np.testing.assert_array_equal(got, [[0, 153, 255], [51, 0, 128], [255, 255, 1]])
        np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], axis=1), xyz)


def test_integer_colours_are_taken_as_0_255(tmp_path):
    from ros2_stream4d.mapping.map_io import save_map

    xyz = np.zeros((2, 3))
    path = save_map(tmp_path / "i.ply", xyz, np.array([[0, 1, 2], [255, 254, 100]], np.int64))
    v = _ply_vertices(path, 2)
    np.testing.assert_array_equal(np.stack([v["red"], v["green"], v["blue"]], axis=1), [[0, 1, 2], [255, 254, 100]])


def test_float_colours_outside_0_1_are_refused_and_an_empty_float_cloud_is_fine(tmp_path):
    from ros2_stream4d.mapping.map_io import save_map

    for bad, dtype in ((1.5, np.float64), (-0.1, np.float64), (1.0001, np.float64), (1.5, np.float32)):
        rgb = np.full((2, 3), 0.5, dtype)
        rgb[1, 2] = bad
        with pytest.raises(ValueError, match=r"^float colours must be in \[0, 1\] \(or pass uint8\)$"):
            save_map(tmp_path / "bad.ply", np.zeros((2, 3)), rgb)
    assert not (tmp_path / "bad.ply").exists()
    path = save_map(tmp_path / "empty.pcd", np.zeros((0, 3)), np.zeros((0, 3), np.float64))
    assert b"POINTS 0\n" in path.read_bytes()


def test_save_map_writes_relative_paths_inside_root(tmp_path):
    from ros2_stream4d.mapping.map_io import save_map

    root = tmp_path / "maps"
    root.mkdir()
    assert save_map("a.ply", np.zeros((1, 3)), np.zeros((1, 3), np.uint8), root=root) == root / "a.ply"
    assert (root / "a.ply").is_file()
    with pytest.raises(PermissionError):
        save_map("../b.ply", np.zeros((1, 3)), np.zeros((1, 3), np.uint8), root=root)
    assert not (tmp_path / "b.ply").exists()


def test_the_partial_file_is_hidden_next_to_the_target_and_removed_on_failure(tmp_path, monkeypatch):
    """While a map is written, the partial file sits in the target's directory (so the rename is atomic), hidden and
    not named like a map (a reader globbing *.ply never picks it up)."""
    from ros2_stream4d.mapping import map_io

    seen = []

    def failing_write(f, header, data):
        seen.extend(p.name for p in tmp_path.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(map_io, "_write_payload", failing_write)
    with pytest.raises(OSError, match="disk full"):
        map_io.save_map(tmp_path / "m.ply", np.zeros((1, 3)), np.zeros((1, 3), np.uint8))
    assert len(seen) == 1 and seen[0].startswith(".m.ply.") and seen[0].endswith(".tmp"), seen
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- lens model
def test_pinhole_unproject_uses_each_intrinsic_once():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.array([[50.0, 0, 31.5], [0, 52.0, 23.5], [0, 0, 1]])
    lens = LensModel.create(K, "", [], 64, 48)
    x, y = lens.unproject([81.5, 31.5, 6.5], [23.5, 75.5, -2.5])
    np.testing.assert_allclose(x, [1.0, 0.0, -0.5], atol=1e-12)
    np.testing.assert_allclose(y, [0.0, 1.0, -0.5], atol=1e-12)


def test_fisheye_unproject_is_exact_at_the_corners_from_integer_pixels():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.array([[30.0, 0, 31.5], [0, 30.0, 23.5], [0, 0, 1]])
    lens = LensModel.create(K, "equidistant", [0.3, -0.1, 0.05, -0.01], 64, 48)
    u = np.array([[0, 63], [10, 31]])  # integer pixels, a (2, 2) grid
    v = np.array([[0, 47], [40, 23]])
    x, y = lens.unproject(u, v)
    assert x.shape == y.shape == (2, 2)
    pu, pv = lens.project(x, y)
    assert np.hypot(pu - u, pv - v).max() < 1e-6


def test_a_folding_lens_names_the_first_pixel_without_a_ray():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    lens = LensModel.create(K, "plumb_bob", [-0.5, 0, 0, 0, 0], 64, 48)  # r_d peaks at ~22 px from the centre
    with pytest.raises(ValueError, match=r"^plumb_bob \[-0\.5, 0\.0, 0\.0, 0\.0, 0\.0\] cannot be inverted at pixel "
                                         r"\(61\.5, 23\.5\) \(error .* px\): the lens model folds the image there$"):
        lens.unproject([31.5, 41.5, 61.5, 71.5], [23.5, 23.5, 23.5, 23.5])


def test_rectify_maps_mark_the_output_pixels_whose_taps_are_inside_the_image():
    """``valid``: K_new half a pixel right and down of K (a near-identity lens): output column / row 0 samples at -0.5
    (outside), the last column / row at W - 1.5 / H - 1.5 (inside)."""
    from ros2_stream4d.mapping.undistort import LensModel, Undistorter

    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    P = [40.0, 0, 32.0, 0, 0, 40.0, 24.0, 0, 0, 0, 1, 0]
    lens = LensModel.create(K, "plumb_bob", [1e-9, 0, 0, 0, 0], 64, 48, P=P)
    maps = Undistorter().maps(lens)
    assert maps.lens == lens
    assert not maps.valid[:, 0].any() and not maps.valid[0, :].any()
    assert maps.valid[1:, 1:].all()


def test_the_lru_cache_drops_the_least_recently_used_lens():
    from ros2_stream4d.mapping.undistort import LensModel, Undistorter

    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    a, b, c = (LensModel.create(K, "plumb_bob", [k, 0, 0, 0, 0], 64, 48) for k in (0.1, 0.2, 0.3))
    und = Undistorter(cache_size=2)
    und.maps(a)
    und.maps(b)
    und.maps(a)  # a is the most recent now
    und.maps(c)  # drops b
    assert und.builds == 3
    und.maps(a)
    assert und.builds == 3, "a was kept"
    und.maps(b)
    assert und.builds == 4, "b was dropped"


def test_an_image_of_the_wrong_size_is_refused_with_both_sizes():
    from ros2_stream4d.mapping.undistort import Undistorter

    with pytest.raises(ValueError, match=r"^image 30x20 does not match the camera model 64x48"):
        Undistorter().undistort(np.zeros((20, 30, 3), np.uint8), _pincushion_lens())


def test_an_explicit_interpolation_and_border_value_are_used():
    from ros2_stream4d.mapping.undistort import Undistorter

    img = np.zeros((48, 64), np.float32)
    img[:, 32:] = 100.0
    und = Undistorter()  # linear by default
    out, _ = und.undistort(img, _pincushion_lens(), interpolation=0, border_value=7.0)  # 0: cv2.INTER_NEAREST
    assert out[0, 0] == 7.0 and out[-1, -1] == 7.0
    assert set(np.unique(out).tolist()) == {0.0, 7.0, 100.0}
    out, _ = und.undistort(img, _pincushion_lens())
    assert out[0, 0] == 0.0, "border 0 by default"


# ---------------------------------------------------------------------------------------------------- map_store PGM
def test_read_pgm_reads_any_byte_and_refuses_foreign_or_short_files(tmp_path):
    from ros2_stream4d.mapping.map_store import read_pgm

    body = bytes([10, 0, 255, 13, 10, 32, 9, 10, 200, 1, 2, 10])  # newline bytes in the pixels
    (tmp_path / "a.pgm").write_bytes(b"P5\n4 3\n255\n" + body)
    np.testing.assert_array_equal(read_pgm(tmp_path / "a.pgm"), np.frombuffer(body, np.uint8).reshape(3, 4))
    (tmp_path / "p6.pgm").write_bytes(b"P6\n4 3\n255\n" + body)
    with pytest.raises(ValueError, match="p6.pgm is not a binary PGM$"):
        read_pgm(tmp_path / "p6.pgm")
    (tmp_path / "short.pgm").write_bytes(b"P5\n4 3\n255\n" + body[:-1])
    with pytest.raises(ValueError, match="short.pgm: 11 pixel bytes, expected 12$"):
        read_pgm(tmp_path / "short.pgm")


def test_map_paths_with_a_nul_or_naming_a_directory_are_refused_by_name(tmp_path):
    from ros2_stream4d.mapping.map_io import validate_map_path

    with pytest.raises(ValueError, match="^invalid map path 'a\\\\x00.ply'$"):
        validate_map_path("a\x00.ply")
    (tmp_path / "d.ply").mkdir()
    with pytest.raises(IsADirectoryError, match="d.ply is a directory$"):
        validate_map_path(tmp_path / "d.ply")


# ---------------------------------------------------------------------------------------------------- motion
def test_confidence_factor_limits():
    from ros2_stream4d.mapping.motion import MAX_CONF_FACTOR, confidence_factor

    assert confidence_factor(1.0) == MAX_CONF_FACTOR == 100.0, "c = 1: no information (not a division by zero)"
    assert confidence_factor(1.001) == 100.0, "1 / (1 - 1 / 1.001) = 1001, clipped"
    assert confidence_factor(1e6) == pytest.approx(1.000001, rel=1e-9), "a confident frame: ~1, not clipped up"
    assert confidence_factor(2.0) == pytest.approx(2.0)


def test_motion_defaults_and_the_depth_used_for_the_position_sigma():
    from ros2_stream4d.mapping.motion import MotionEstimator, confidence_factor

    c = confidence_factor(5.0)
    for depth, used in ((0.5, 0.5), (3.0, 3.0), (0.0, 1.0), (-2.0, 1.0), (np.inf, 1.0), (np.nan, 1.0)):
        m = MotionEstimator().update(np.eye(4), 0, median_depth=depth, median_confidence=5.0, scale_valid=True)
        assert m.pose_covariance[0, 0] == pytest.approx((0.02 * used * c) ** 2), depth
        assert m.pose_covariance[5, 5] == pytest.approx((0.01 * c) ** 2)
        np.testing.assert_array_equal(m.angular, np.zeros(3))
        np.testing.assert_array_equal(m.linear, np.zeros(3))
    m = MotionEstimator().update(np.eye(4), 0, median_depth=2.0, median_confidence=5.0, scale_valid=False)
    assert m.pose_covariance[2, 2] == pytest.approx((0.02 * 2.0 * c * 1000.0) ** 2)


def test_twist_covariance_divides_by_the_squared_interval():
    from ros2_stream4d.mapping.motion import MotionEstimator

    est = MotionEstimator(pose_sigma_per_m=0.1, rotation_sigma=0.2)
    est.update(np.eye(4), 0, median_depth=1.0, median_confidence=1e12, scale_valid=True)
    T = np.eye(4)
    T[0, 3] = 0.5
    m = est.update(T, 250_000_000, median_depth=1.0, median_confidence=1e12, scale_valid=True)  # dt = 0.25 s
    assert m.twist_covariance[0, 0] == pytest.approx(2 * 0.1 ** 2 / 0.0625)
    assert m.twist_covariance[4, 4] == pytest.approx(2 * 0.2 ** 2 / 0.0625)
    np.testing.assert_allclose(m.linear, [2.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------------- fusion
def test_voxel_map_options_are_validated_by_name():
    from ros2_stream4d.mapping.fusion import VoxelMap

    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"^voxel_size must be finite and > 0, got {bad}$"):
            VoxelMap(bad, 10)
    with pytest.raises(ValueError, match="^max_points must be >= 1, got 0$"):
        VoxelMap(0.1, 0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"^max_range must be > 0 or None, got {bad}$"):
            VoxelMap(0.1, 10, max_range=bad)
    with pytest.raises(ValueError, match=r"^eviction must be one of \('oldest', 'lowest_confidence'\), got 'newest'$"):
        VoxelMap(0.1, 10, eviction="newest")
    m = VoxelMap(0.5, 1, max_range=1e-3, eviction="lowest_confidence")
    assert (m.voxel_size, m.max_points, m.max_range, m.eviction) == (0.5, 1, 1e-3, "lowest_confidence")
    with pytest.raises(ValueError, match="^conf must be 'max' or 'mean', got 'median'$"):
        m.points(conf="median")


def test_voxel_map_range_key_space_and_counts():
    from ros2_stream4d.mapping.fusion import VoxelMap

    m = VoxelMap(1.0, 100, max_range=2.0)
    xyz = np.array([[2.0, 0, 0], [0, 2.0000001, 0], [0, 0, 0.5]])  # exactly at the range is kept
    assert m.integrate(xyz, np.zeros((3, 3), np.uint8)) == 2 and m.dropped == 1
    big = VoxelMap(1.0, 100)
    edge = 2.0 ** 20
    xyz = np.array([[-edge, 0, 0], [edge - 0.5, 0, 0], [edge, 0, 0], [0, -edge - 0.5, 0]])
    assert big.integrate(xyz, np.zeros((4, 3), np.uint8)) == 2 and big.dropped == 2
    np.testing.assert_array_equal(np.sort(big.voxel_indices()[:, 0]), [-(2 ** 20), 2 ** 20 - 1])
    np.testing.assert_array_equal(np.sort(big.points()[0][:, 0]), [-edge, edge - 0.5])
    r3 = VoxelMap(1.0, 100, max_range=3.0)  # r^2 = 9, not 2 r = 6
    assert r3.integrate(np.array([[2.9, 0, 0], [0, 3.1, 0]]), np.zeros((2, 3), np.uint8)) == 1 and r3.dropped == 1
    for limit in (None, 10.0):  # a point with a non-finite confidence is dropped, with or without a range
        m = VoxelMap(1.0, 100, max_range=limit)
        xyz = np.array([[0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0]])
        assert m.integrate(xyz, np.zeros((3, 3), np.uint8), np.array([1.0, np.nan, np.inf])) == 1 and m.dropped == 2
    few = VoxelMap(1.0, 2)
    few.integrate(np.array([[0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0], [3.5, 0, 0], [0.6, 0, 0]]), np.zeros((5, 3), np.uint8))
    assert len(few) == 2 and few.evicted == 2 and few.frames == 1
    xyz, rgb, conf = few.points()
    assert conf.dtype == np.float32 and np.all(conf == 1.0), "no confidence: 1"


def test_voxel_points_min_count_and_rounded_mean_colours():
    from ros2_stream4d.mapping.fusion import VoxelMap

    m = VoxelMap(1.0, 100)
    xyz = np.array([[0.2, 0.2, 0.2], [0.4, 0.4, 0.4], [5.5, 0.5, 0.5]])
    rgb = np.array([[100, 0, 255], [103, 1, 254], [7, 8, 9]], np.uint8)
    m.integrate(xyz, rgb, np.array([2.0, 4.0, 1.0]))
    pts, cols, conf = m.points(min_count=2)
    assert pts.dtype == np.float32 and cols.dtype == np.uint8 and conf.dtype == np.float32
    np.testing.assert_allclose(pts, [[0.3, 0.3, 0.3]], atol=1e-7)
    np.testing.assert_array_equal(cols, [[102, 0, 254]])  # rint of 101.5, 0.5, 254.5 (half to even)
    assert conf.tolist() == [4.0]
    assert m.points(conf="mean", min_count=2)[2].tolist() == [3.0]
    assert len(m.points(min_count=1)[0]) == 2 and len(m.points(min_count=3)[0]) == 0


def test_mesh_marker_message_fields_and_colours():
    from ros2_stream4d.mapping.products import ADD, TRIANGLE_LIST, mesh_marker_fields

    v = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [51, 102, 153]], np.uint8)
    out = mesh_marker_fields(v, f, c, frame_id="odom", ns="m", marker_id=3, max_triangles=1)
    assert len(out) == 2
    for k, m in enumerate(out):
        assert m["header"] == {"frame_id": "odom"} and m["ns"] == "m" and m["id"] == 3 + k
        assert m["type"] == TRIANGLE_LIST == 11 and m["action"] == ADD == 0
        assert m["pose"] == {"position": (0.0, 0.0, 0.0), "orientation": (0.0, 0.0, 0.0, 1.0)}
        assert m["scale"] == (1.0, 1.0, 1.0)
        assert m["colors"].dtype == np.float32 and m["colors"].shape == (3, 4)
        np.testing.assert_array_equal(m["colors"][:, 3], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(out[1]["colors"][:, :3], c[[0, 2, 3]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out[1]["points"], v[[0, 2, 3]])
    (one,) = mesh_marker_fields(v, f[:1], max_triangles=1)
    assert len(one["points"]) == 3
    (empty,) = mesh_marker_fields(np.zeros((0, 3)), np.zeros((0, 3), np.int64), max_triangles=1)
    assert empty["points"].shape == (0, 3) and empty["colors"].shape == (0, 4)


def test_lens_model_create_validates_and_normalises():
    from ros2_stream4d.mapping.undistort import LensModel, is_distorted

    K = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    assert LensModel.create(K, "", None, 1, 1).D == ()
    assert not LensModel.create(K, "plumb_bob", None, 64, 48).distorted, "no coefficients at all: pinhole"
    for w, h in ((0, 48), (64, 0)):
        with pytest.raises(ValueError, match=f"^image size must be positive, got {w}x{h}$"):
            LensModel.create(K, "", [], w, h)
    # coefficients given as a (1, 5) row (e.g. a numpy CameraInfo field) are flattened
    assert LensModel.create(K, "plumb_bob", [[0.1, 0, 0, 0, 0]], 64, 48).D == (0.1, 0.0, 0.0, 0.0, 0.0)
    assert LensModel.create(K, "plumb_bob", [0.1, 0, 0, 0], 64, 48).D == (0.1, 0.0, 0.0, 0.0, 0.0), "padded to 5"
    # a pinhole camera keeps a known model's name, an unknown one's is dropped
    assert LensModel.create(K, "plumb_bob", [0.0] * 5, 64, 48).distortion_model == "plumb_bob"
    assert LensModel.create(K, "weird", [0.0] * 3, 64, 48).distortion_model == ""
    for bad in ((0, 0, 40.0, 1.0), (0, 40.0, 0, 1.0), (0, 40.0, 40.0, 2.0), (0, -1.0, -1.0, 1.0)):
        Kb = K.copy()
        Kb[0, 0], Kb[1, 1], Kb[2, 2] = bad[1], bad[2], bad[3]
        with pytest.raises(ValueError, match="^cannot undistort with an uncalibrated or invalid K"):
            LensModel.create(Kb, "plumb_bob", [0.1, 0, 0, 0, 0], 64, 48)
    small = K.copy()
    small[0, 0] = small[1, 1] = 0.5  # a tiny but valid focal length
    assert LensModel.create(small, "plumb_bob", [0.1, 0, 0, 0, 0], 64, 48).distorted
    with pytest.raises(ValueError, match=r"^unknown distortion model 'weird' \(with non-zero coefficients\); "
                                         r"supported: plumb_bob, rational_polynomial, equidistant$"):
        is_distorted("weird", [0.1])
    with pytest.raises(ValueError, match=r"^distortion model 'plumb_bob' takes 5 or 4 coefficients, got 3$"):
        is_distorted("plumb_bob", [0.1, 0, 0])


def test_lens_model_keeps_only_a_usable_projection_matrix():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.eye(3)
    K[0, 0] = K[1, 1] = 40.0

    def P_of(fx=40.0, fy=40.0, one=1.0, cy=24.0):
        return [fx, 0, 32.0, 0, 0, fy, cy, 0, 0, 0, one, 0]

    assert LensModel.create(K, "", [], 64, 48, P=np.array(P_of()).reshape(3, 4)).P == tuple(P_of())
    assert LensModel.create(K, "", [], 64, 48, P=P_of(fx=0.5, fy=0.5)).P is not None
    for unusable in (P_of(fx=0.0), P_of(fy=0.0), P_of(one=0.0), P_of(fx=0.0, fy=0.0), [0.0] * 12):
        assert LensModel.create(K, "", [], 64, 48, P=unusable).P is None, unusable
    for bad in (P_of()[:11], P_of(cy=float("nan"))):
        with pytest.raises(ValueError, match="^P must be 12 finite values, got"):
            LensModel.create(K, "", [], 64, 48, P=bad)


def test_project_keeps_the_shape_and_uses_each_intrinsic():
    from ros2_stream4d.mapping.undistort import LensModel

    K = np.array([[50.0, 0, 31.5], [0, 52.0, 23.5], [0, 0, 1]])
    u, v = LensModel.create(K, "", [], 64, 48).project([1.0, 0.0, -0.5], [0.0, 1.0, -0.5])
    np.testing.assert_allclose(u, [81.5, 31.5, 6.5])
    np.testing.assert_allclose(v, [23.5, 75.5, -2.5])
    lens = LensModel.create(K, "plumb_bob", [0.1, 0, 0, 0, 0], 64, 48)
    x = np.array([[0, 1], [0, -1]])  # integers, a (2, 2) grid
    u, v = lens.project(x, x.T)
    assert u.shape == v.shape == (2, 2)
    assert u[0, 0] == pytest.approx(31.5) and v[0, 0] == pytest.approx(23.5)
    assert u[0, 1] == pytest.approx(31.5 + 50.0 * 1.0 * (1 + 0.1 * 1.0))


def test_undistorter_cache_size_one_is_allowed_and_zero_refused():
    from ros2_stream4d.mapping.undistort import Undistorter

    with pytest.raises(ValueError, match="^cache_size must be >= 1, got 0$"):
        Undistorter(cache_size=0)
    und = Undistorter(cache_size=1)
    und.maps(_pincushion_lens())
    und.maps(_pincushion_lens())
    assert len(und) == 1 and und.builds == 1


def test_a_pickled_keyframe_index_is_never_unpickled(tmp_path):
    """keyframes.npz holding an object array (a pickle: loading it could run code) is refused as unreadable, even
    when metadata.json vouches for it, and the error names the map."""
    import hashlib
    import json

    from map_helpers import small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap
    from ros2_stream4d.mapping.map_store import MapDirectoryError, load_map_dir, save_map_dir

    path = save_map_dir(KeyframeMap(small_config()), tmp_path / "map")
    np.savez(path / "keyframes.npz", ids=np.array([object()], dtype=object), segments=np.zeros(1, np.int64),
             T_map_kf=np.eye(4)[None])
    meta = json.loads((path / "metadata.json").read_text())
    data = (path / "keyframes.npz").read_bytes()
    meta["files"]["keyframes.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MapDirectoryError, match=f"^cannot load map {path}: keyframes.npz is unreadable "
                                                r"\(ValueError: .*allow_pickle"):
        load_map_dir(path, small_config())


def test_drop_looks_at_each_queue_s_oldest_frame():
    sync = ApproximateSync(3, slop_s=0.010)
    sync.add(0, 180 * MS, "a180")
    sync.add(0, 195 * MS, "a195")
    sync.add(1, 200 * MS, "b200")
    # camera 2 is far from the pivot (200): a180 (older than 190) can never match, a195 can
    assert sync.add(2, 150 * MS, "c150") is None
    assert sync.dropped == 1
    assert sync.add(2, 199 * MS, "c199") == ["a195", "b200", "c199"]
    assert sync.dropped == 2, "c150"


def test_a_new_map_file_is_0644_and_a_replaced_one_keeps_its_mode(tmp_path):
    import os
    import stat

    from ros2_stream4d.mapping.map_io import save_map

    path = save_map(tmp_path / "m.ply", np.zeros((1, 3)), np.zeros((1, 3), np.uint8))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    save_map(path, np.ones((2, 3)), np.zeros((2, 3), np.uint8))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_voxel_map_counts_drops_over_frames_and_an_empty_frame_adds_nothing():
    from ros2_stream4d.mapping.fusion import VoxelMap

    m = VoxelMap(1.0, 100)
    rgb = np.zeros((2, 3), np.uint8)
    assert m.integrate(np.array([[0.5, 0, 0], [np.nan, 0, 0]]), rgb) == 1
    assert m.integrate(np.array([[np.inf, 0, 0], [np.nan, 0, 0]]), rgb) == 0, "nothing valid: no new voxel"
    assert m.integrate(np.array([[1.5, 0, 0], [0, np.nan, 0]]), rgb) == 1
    assert m.dropped == 4 and m.frames == 3 and len(m) == 2


def test_eviction_policies_differ_and_evictions_add_up():
    from ros2_stream4d.mapping.fusion import VoxelMap

    rgb1, rgb2 = np.zeros((1, 3), np.uint8), np.zeros((2, 3), np.uint8)
    kept = {}
    for policy in ("oldest", "lowest_confidence"):
        m = VoxelMap(1.0, max_points=2, eviction=policy)
        m.integrate(np.array([[0.5, 0, 0]]), rgb1, np.array([9.0]))  # frame 1: old but confident
        m.integrate(np.array([[1.5, 0, 0], [2.5, 0, 0]]), rgb2, np.array([1.0, 5.0]))  # frame 2
        kept[policy] = sorted(m.voxel_indices()[:, 0].tolist())
        assert m.evicted == 1
    assert kept == {"oldest": [1, 2], "lowest_confidence": [0, 2]}
    m = VoxelMap(1.0, max_points=3, eviction="lowest_confidence")
    confs = np.array([7.0, 1.0, 6.0, 2.0, 8.0, 3.0, 5.0, 4.0])
    m.integrate(np.c_[np.arange(8) + 0.5, np.zeros((8, 2))], np.zeros((8, 3), np.uint8), confs)
    assert len(m) == 3 and m.evicted == 5, "k = 5 evicted at once"
    assert sorted(m.voxel_indices()[:, 0].tolist()) == [0, 2, 4], "the three most confident stay"
    m.integrate(np.array([[20.5, 0, 0]]), rgb1, np.array([9.0]))
    assert m.evicted == 6 and len(m) == 3


def test_neighbouring_voxels_keep_apart_across_frames():
    """Keys of voxels one step apart in z differ by 1 near 2^62: they must stay exact int64 (float64 would merge them)."""
    from ros2_stream4d.mapping.fusion import VoxelMap

    m = VoxelMap(1.0, 100)
    rgb = np.zeros((1, 3), np.uint8)
    assert m.integrate(np.array([[0.5, 0.5, 0.5]]), rgb) == 1
    assert m.integrate(np.array([[0.5, 0.5, 1.5]]), rgb) == 1
    assert m.integrate(np.array([[0.5, 0.5, 0.7]]), rgb) == 0
    assert m.keys.dtype == np.int64
    np.testing.assert_array_equal(m.voxel_indices(), [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(m.points()[0], [[0.5, 0.5, 0.6], [0.5, 0.5, 1.5]], atol=1e-6)


def test_exchange_takes_relative_paths_and_declines_what_the_system_cannot_swap(tmp_path, monkeypatch):
    from pathlib import Path

    from ros2_stream4d.mapping.map_store import _exchange

    monkeypatch.chdir(tmp_path)
    Path("a").mkdir()
    Path("b").mkdir()
    (tmp_path / "a" / "x").write_text("x")
    assert _exchange(Path("a"), Path("b")) is True, "relative to the working directory (AT_FDCWD)"
    assert (tmp_path / "b" / "x").is_file()
    (tmp_path / "b" / "sub").mkdir()
    # a directory cannot be swapped with its own subdirectory: EINVAL, "cannot exchange", not an error
    assert _exchange(tmp_path / "b", tmp_path / "b" / "sub") is False
    assert (tmp_path / "b" / "x").is_file() and (tmp_path / "b" / "sub").is_dir()


def test_mesh_ply_header_and_layout(tmp_path):
    import open3d as o3d

    from ros2_stream4d.mapping.map_store import mesh_ply_bytes

    v = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    data = mesh_ply_bytes(v, np.array([[0, 1, 2]]), np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]]))
    header = data[:data.index(b"end_header\n") + len(b"end_header\n")].decode("ascii")
    assert header.splitlines() == [
        "ply", "format binary_little_endian 1.0", "comment ros2_stream4d TSDF mesh (map frame)", "element vertex 3",
        "property float x", "property float y", "property float z", "property uchar red", "property uchar green",
        "property uchar blue", "element face 1", "property list uchar int vertex_indices", "end_header"]
    assert len(data) == len(header) + 3 * 15 + 13
    (tmp_path / "m.ply").write_bytes(data)
    mesh = o3d.io.read_triangle_mesh(str(tmp_path / "m.ply"))
    np.testing.assert_allclose(np.asarray(mesh.vertices), v)
    np.testing.assert_array_equal(np.asarray(mesh.triangles), [[0, 1, 2]])


def test_map_directory_errors_say_what_is_wrong(tmp_path):
    import json

    from map_helpers import small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap
    from ros2_stream4d.mapping.map_store import MapDirectoryError, read_metadata, save_map_dir

    def refused(path, what):
        with pytest.raises(MapDirectoryError, match=f"^cannot load map {path}: {what}"):
            read_metadata(path)

    refused(tmp_path / "none", "no such directory$")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "not a directory$")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"no metadata.json \(not a ros2_stream4d map directory\)$")
    path = save_map_dir(KeyframeMap(small_config()), tmp_path / "map")
    good = json.loads((path / "metadata.json").read_text())

    def with_meta(meta, what):
        (path / "metadata.json").write_text(json.dumps(meta))
        refused(path, what)

    with_meta({**good, "format": "other"}, "foreign map: format 'other', expected 'ros2_stream4d.map'$")
    with_meta([1, 2], "foreign map: format None, expected 'ros2_stream4d.map'$")
    with_meta({k: v for k, v in good.items() if k != "files"}, r"metadata.json lists no files \(incomplete save\)$")
    with_meta({**good, "files": {"other": {}}}, r"metadata.json lists no files \(incomplete save\)$")
    for bad in ("../x", "/etc/passwd"):
        with_meta({**good, "files": {**good["files"], bad: {}}}, f"metadata.json lists a file outside the map: '{bad}'$")
    info = good["files"]["keyframes.npz"]
    with_meta({**good, "files": {**good["files"], "keyframes.npz": {**info, "bytes": info["bytes"] + 1}}},
              rf"file keyframes.npz is truncated or altered \({info['bytes']} bytes, metadata says {info['bytes'] + 1}\)$")


# ---------------------------------------------------------------------------------------------------- map_store save / load
def _small_map(cloud_voxel_size=0.05):
    from map_helpers import small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, MapFrame

    m = KeyframeMap(small_config(tsdf=False, occupancy=False, keyframe_max_frames=1,
                                 cloud_voxel_size=cloud_voxel_size))
    K = np.array([[5.0, 0, 4.0], [0, 6.0, 3.0], [0, 0, 1]])
    for i in range(3):
        if i == 2:
            m.new_segment()
        T = np.eye(4)
        T[:3, 3] = [0.5 * i, 0.1 * i, 0.0]
        m.integrate(MapFrame(1000 + i, T, np.full((6, 8), 2.0 + i, np.float32),
                             np.full((6, 8, 3), 30 * i, np.uint8), K, None))
    return m


def _rewrite(path, rel, data: bytes, meta_edit=None):
    """Replace one file of a saved map and keep metadata.json's size and checksum right (only the content is wrong)."""
    import hashlib
    import json

    (path / rel).write_bytes(data)
    meta = json.loads((path / "metadata.json").read_text())
    meta["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if meta_edit:
        meta_edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_save_map_dir_metadata_defaults_extra_and_the_directory_mode(tmp_path):
    import json
    import os

    from ros2_stream4d.mapping import map_store

    m = _small_map()
    path = map_store.save_map_dir(m, tmp_path / "a", scale=2.0)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["scale"] == 2.0 and meta["scale_valid"] is False and meta["extra"] == {}
    assert meta["segments"] == 2 and meta["keyframes"] == 3
    assert os.stat(path).st_mode & 0o777 == 0o755
    path = map_store.save_map_dir(m, tmp_path / "b", scale_valid=True, extra={"robot": "r1"})
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["scale"] is None and meta["scale_valid"] is True and meta["extra"] == {"robot": "r1"}
    with np.load(path / "keyframes.npz") as z:
        assert z["ids"].dtype == np.int64 and z["segments"].dtype == np.int64
        np.testing.assert_array_equal(z["segments"], [0, 0, 1])
    from map_helpers import small_config

    from ros2_stream4d.mapping.keyframe_map import KeyframeMap

    empty = map_store.save_map_dir(KeyframeMap(small_config(tsdf=False, occupancy=False)), tmp_path / "empty")
    with np.load(empty / "keyframes.npz") as z:  # the format's dtypes hold for an empty map too
        assert z["ids"].dtype == np.int64 and z["segments"].dtype == np.int64 and z["T_map_kf"].shape == (0, 4, 4)


def test_save_map_dir_writes_its_temporary_directory_hidden_beside_the_target(tmp_path, monkeypatch):
    from ros2_stream4d.mapping import map_store

    seen = []

    def hook(name):
        if name == "cloud":
            seen.extend(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr(map_store, "_stage_hook", hook)
    map_store.save_map_dir(_small_map(), tmp_path / "mymap")
    assert len(seen) == 1 and seen[0].startswith(".mymap.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mymap"]


def test_save_map_dir_refusals_name_the_path(tmp_path):
    from ros2_stream4d.mapping import map_store

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"map path {tmp_path / 'file'} exists and is not a directory"):
        map_store.save_map_dir(_small_map(), tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=f"directory {tmp_path / 'nope'} does not exist"):
        map_store.save_map_dir(_small_map(), tmp_path / "nope" / "map")


def test_load_map_dir_takes_the_saved_config_when_none_is_given(tmp_path):
    import json

    from ros2_stream4d.mapping import map_store

    path = map_store.save_map_dir(_small_map(cloud_voxel_size=0.07), tmp_path / "m")
    kmap, _ = map_store.load_map_dir(path)
    assert kmap.config.cloud_voxel_size == 0.07 and kmap.config.keyframe_max_frames == 1
    assert kmap.config.tsdf is False and len(kmap.keyframes) == 3
    meta = json.loads((path / "metadata.json").read_text())
    meta["config"]["a_setting_of_a_newer_version"] = 1  # unknown settings are left out
    (path / "metadata.json").write_text(json.dumps(meta))
    assert map_store.load_map_dir(path)[0].config.cloud_voxel_size == 0.07
    del meta["config"]
    (path / "metadata.json").write_text(json.dumps(meta))
    kmap, _ = map_store.load_map_dir(path)  # no config at all: the defaults
    assert kmap.config.cloud_voxel_size == map_store.KeyframeMapConfig().cloud_voxel_size


@pytest.mark.parametrize("what", ["ids", "segments", "poses", "nan"])
def test_load_map_dir_refuses_each_inconsistency_of_keyframes_npz_alone(tmp_path, what):
    from ros2_stream4d.mapping import map_store

    path = map_store.save_map_dir(_small_map(), tmp_path / "m")
    with np.load(path / "keyframes.npz") as z:
        a = {k: z[k] for k in z.files}
    if what == "ids":
        a["ids"] = a["ids"].astype(np.int32)
    elif what == "segments":
        a["segments"] = np.append(a["segments"], 1)
    elif what == "poses":
        a["T_map_kf"] = a["T_map_kf"][:2]
    else:
        a["T_map_kf"][1, 0, 3] = np.nan
    _rewrite(path, "keyframes.npz", _npz(**a))
    with pytest.raises(map_store.MapDirectoryError,
                       match=r"cannot load map .*: keyframes.npz has inconsistent ids, segments or poses$"):
        map_store.load_map_dir(path)


def test_load_map_dir_refuses_duplicate_ids_and_keyframe_files_that_do_not_match(tmp_path):
    from ros2_stream4d.mapping import map_store

    path = map_store.save_map_dir(_small_map(), tmp_path / "m")
    with np.load(path / "keyframes.npz") as z:
        a = {k: z[k] for k in z.files}
    good = _npz(**a)
    _rewrite(path, "keyframes.npz", _npz(**dict(a, ids=np.array([0, 1, 1], np.int64))))
    with pytest.raises(map_store.MapDirectoryError, match=r": keyframes.npz has duplicate keyframe ids$"):
        map_store.load_map_dir(path)
    _rewrite(path, "keyframes.npz", _npz(**dict(a, segments=np.array([0, 5, 1], np.int64))))
    with pytest.raises(map_store.MapDirectoryError,
                       match=r": keyframe 1: segment 0 in its file, 5 in keyframes.npz$"):
        map_store.load_map_dir(path)
    _rewrite(path, "keyframes.npz", good)
    kf1 = "keyframes/kf_0000001.npz"
    _rewrite(path, kf1, (path / "keyframes/kf_0000000.npz").read_bytes())  # keyframe 0's file under 1's name
    with pytest.raises(map_store.MapDirectoryError,
                       match=r": keyframe file kf_0000001.npz holds keyframe 0, expected 1$"):
        map_store.load_map_dir(path)
    _rewrite(path, kf1, (path / "keyframes/kf_0000000.npz").read_bytes(),
             meta_edit=lambda meta: meta["files"].pop(kf1))
    with pytest.raises(map_store.MapDirectoryError, match=r": keyframe 1 has no file in metadata.json$"):
        map_store.load_map_dir(path)
