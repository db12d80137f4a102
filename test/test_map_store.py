"""Map directories: save, load, continue gives the same map; nav2 map_server files; an interrupted save leaves the
old or the new map; corrupt, truncated and foreign directories are refused with one clear error."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import open3d as o3d
import pytest
import yaml
from map_helpers import assert_same_products, room, small_config

from ros2_stream4d.mapping import map_store
from ros2_stream4d.mapping.keyframe_map import KeyframeMap
from ros2_stream4d.mapping.map_store import MapDirectoryError, load_map_dir, read_pgm, save_map_dir


def build(frames, **kw) -> KeyframeMap:
    m = KeyframeMap(small_config(**kw))
    for f in frames:
        m.integrate(f)
    return m


@pytest.fixture
def saved(tmp_path):
    frames, _ = room()
    m = build(frames[:12])
    return m, save_map_dir(m, tmp_path / "map", scale=1.0, scale_valid=True)


def test_save_load_continue_gives_the_same_map(tmp_path):
    frames, _ = room()
    a = build(frames[:12], max_keyframes_in_memory=2, spill_dir=str(tmp_path / "spill_a"))
    a.update_poses({a.keyframes[1].id: a.keyframes[1].T_map_kf})  # a corrected map saves its corrected poses
    path = save_map_dir(a, tmp_path / "map")
    b, meta = load_map_dir(path, small_config(max_keyframes_in_memory=2, spill_dir=str(tmp_path / "spill_b")))
    assert meta["keyframes"] == len(a.keyframes) == len(b.keyframes)
    assert [kf.id for kf in b.keyframes] == [kf.id for kf in a.keyframes]
    for ka, kb in zip(a.keyframes, b.keyframes):
        np.testing.assert_array_equal(ka.T_map_kf, kb.T_map_kf)
    assert_same_products(a, b)
    # continue both with the same frames: a loaded map continues in a new segment, so do the same on a
    a.new_segment()
    for f in frames[12:]:
        a.integrate(f)
        b.integrate(f)
    assert_same_products(a, b)
    assert b.keyframes[-1].segment == a.keyframes[-1].segment == 1


def test_files_as_nav2_map_server_and_open3d_read_them(saved):
    m, path = saved
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"metadata.json", "keyframes.npz", "cloud.ply", "mesh.ply", "occupancy.pgm", "occupancy.yaml"} <= names
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["format"] == "ros2_stream4d.map" and meta["version"] == 1 and meta["frames"]["map"] == "map"
    assert meta["voxel_sizes"] == {"cloud": 0.05, "tsdf": 0.1, "occupancy": 0.1} and meta["scale"] == 1.0
    # the YAML nav2's map_server reads, and its trinary interpretation of the PGM gives back our grid
    y = yaml.safe_load((path / "occupancy.yaml").read_text())
    assert set(y) == {"image", "mode", "resolution", "origin", "negate", "occupied_thresh", "free_thresh"}
    assert y["mode"] == "trinary" and y["negate"] == 0 and (path / y["image"]).is_file()
    data, origin, res = m.occupancy()
    assert y["resolution"] == res and y["origin"] == pytest.approx([origin[0], origin[1], 0.0])
    img = read_pgm(path / y["image"]).astype(np.float64)
    occ = (255.0 - img) / 255.0  # map_server: negate 0
    loaded = np.where(occ > y["occupied_thresh"], 100, np.where(occ < y["free_thresh"], 0, -1))
    np.testing.assert_array_equal(np.flipud(loaded), data)  # image row 0 is the top (highest y)
    mesh = o3d.io.read_triangle_mesh(str(path / "mesh.ply"))
    v, f, c = m.mesh()
    np.testing.assert_allclose(np.asarray(mesh.vertices), v, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mesh.triangles), f)
    np.testing.assert_allclose(np.asarray(mesh.vertex_colors), c / 255.0, atol=1e-6)
    cloud = o3d.io.read_point_cloud(str(path / "cloud.ply"))
    assert len(cloud.points) == len(m)
    with np.load(path / "keyframes.npz", allow_pickle=False) as z:  # no pickled objects anywhere
        assert z["T_map_kf"].shape == (len(m.keyframes), 4, 4)


@pytest.mark.parametrize("stage", ["keyframe", "products", "exchange"])
def test_failed_save_leaves_the_old_map(saved, monkeypatch, stage):
    old, path = saved
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    frames, _ = room()
    new = build(frames)

    def fail(name):
        if name == stage:
            raise OSError(f"disk full at {name}")

    monkeypatch.setattr(map_store, "_stage_hook", fail)
    with pytest.raises(OSError, match="disk full"):
        save_map_dir(new, path)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["map"], "the temporary directory is removed"
    assert len(load_map_dir(path, small_config())[0].keyframes) == len(old.keyframes)


@pytest.mark.parametrize("stage", ["products", "exchange", "done"])
def test_a_crash_during_save_leaves_the_old_or_the_new_map(saved, tmp_path, stage):
    """A process killed (os._exit, no clean-up) in the middle of a save: the target is a complete old or new map."""
    old, path = saved
    frames_new = 24
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from map_helpers import room, small_config
        from ros2_stream4d.mapping import map_store
        from ros2_stream4d.mapping.keyframe_map import KeyframeMap
        m = KeyframeMap(small_config())
        for f in room()[0][:{frames_new}]:
            m.integrate(f)
        def crash(name):
            if name == {stage!r}:
                os._exit(3)
        map_store._stage_hook = crash
        map_store.save_map_dir(m, {str(path)!r})
        os._exit(0 if {stage!r} == "done" else 4)
    """)
    rc = subprocess.run([sys.executable, "-c", script], timeout=300).returncode
    assert rc == (0 if stage == "done" else 3)
    loaded, meta = load_map_dir(path, small_config())
    expected = build(room()[0][:frames_new]) if stage == "done" else old
    assert len(loaded.keyframes) == len(expected.keyframes)
    assert_same_products(loaded, expected)


def corrupt_cases():
    def truncate(path):
        kf = sorted((path / "keyframes").iterdir())[1]
        kf.write_bytes(kf.read_bytes()[:-100])
        return "truncated"

    def flip(path):
        kf = sorted((path / "keyframes").iterdir())[0]
        data = bytearray(kf.read_bytes())
        data[len(data) // 2] ^= 0xFF
        kf.write_bytes(bytes(data))
        return "corrupt"

    def missing(path):
        sorted((path / "keyframes").iterdir())[0].unlink()
        return "missing file keyframes/kf_"

    def foreign(path):
        meta = json.loads((path / "metadata.json").read_text())
        meta["format"] = "rtabmap.db"
        (path / "metadata.json").write_text(json.dumps(meta))
        return "foreign map"

    def version(path):
        meta = json.loads((path / "metadata.json").read_text())
        meta["version"] = 99
        (path / "metadata.json").write_text(json.dumps(meta))
        return "unsupported map format version 99"

    def no_metadata(path):
        (path / "metadata.json").unlink()
        return "no metadata.json"

    def bad_json(path):
        (path / "metadata.json").write_text("{not json")
        return "not valid JSON"

    return [truncate, flip, missing, foreign, version, no_metadata, bad_json]


@pytest.mark.parametrize("damage", corrupt_cases(), ids=lambda f: f.__name__)
def test_damaged_or_foreign_directories_are_refused(saved, damage):
    _, path = saved
    what = damage(path)
    with pytest.raises(MapDirectoryError) as err:
        load_map_dir(path, small_config())
    msg = str(err.value)
    assert what in msg and str(path) in msg and msg.count("\n") == 0


def test_refusals_for_non_map_paths(tmp_path):
    with pytest.raises(MapDirectoryError, match="no such directory"):
        load_map_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MapDirectoryError, match="not a directory"):
        load_map_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        save_map_dir(KeyframeMap(small_config()), tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a saved map"):
        save_map_dir(KeyframeMap(small_config()), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_an_empty_map_round_trips(tmp_path):
    path = save_map_dir(KeyframeMap(small_config()), tmp_path / "empty")
    m, meta = load_map_dir(path, small_config())
    assert meta["keyframes"] == 0 and len(m) == 0 and m.occupancy()[0].size == 0


def test_stream4d_eval_scores_the_saved_map_directory(tmp_path):
    """The report scores the map a run ends with (a saved directory: cloud, mesh and grid), not the bag's snapshot."""
    from ros2_stream4d.eval.bagio import read_prediction, write_perturbed_prediction
    from ros2_stream4d.eval.evaluate import evaluate_bags
    from ros2_stream4d.eval.report import write_report
    from ros2_stream4d.mapping.keyframe_map import MapFrame
    from ros2_stream4d.sim.bag import SimConfig, read_ground_truth, write_sim_bag

    gt_bag = tmp_path / "gt"
    write_sim_bag(gt_bag, SimConfig(scene="room", trajectory="ground_robot", frames=16, width=96, height=72, seed=2),
                  progress=False)
    pred_bag, sim = write_perturbed_prediction(gt_bag, tmp_path / "pred", scale=1.0, rotvec=(0, 0, np.pi / 2),
                                               offset=(1.0, -2.0, 0.0), pose_noise=0.0, depth_noise=0.0)
    gt = read_ground_truth(gt_bag)
    pred = read_prediction(pred_bag)
    m = KeyframeMap(small_config(tsdf_voxel_size=0.05, occupancy_resolution=0.05))
    for i, d in enumerate(gt.depths):  # the map in the prediction's frame (world rotated about z and shifted)
        m.integrate(MapFrame(int(gt.stamps[i]), pred.T_map_cam[i], d, np.full((*d.shape, 3), 128, np.uint8), gt.K))
    path = save_map_dir(m, tmp_path / "map")
    result = evaluate_bags(pred_bag, gt_bag, map_file=path)
    mt = result.metrics
    assert mt["map_points"] == len(m) and any(str(path) in n and "ended with" in n for n in mt["notes"])
    assert mt["mesh_fscore"] > 0.9 and mt["mesh_accuracy_median"] < 0.02
    # 16 low-resolution frames: furniture seen from below keeps the occupied IoU modest; the free space matches
    assert mt["occupancy_iou_free"] > 0.85 and mt["occupancy_iou_occupied"] > 0.4 and mt["occupancy_known"] > 0.95
    files = write_report(result, tmp_path / "report")
    text = files["report"].read_text()
    assert "## Mesh (TSDF)" in text and "## Occupancy grid" in text and files["grid"].is_file()
    # without the saved map the note says the bag's snapshot was scored
    plain = evaluate_bags(pred_bag, gt_bag)
    assert any("snapshot" in n for n in plain.metrics["notes"])
