"""The long-run bench's loop accounting (bench/longrun_bench.py): each verified loop against the ground truth, and
whether an accepted one is in the graph's final solve (what tells a false loop that bent the map from one the graph
switched off)."""

import numpy as np
import pytest

from ros2_stream4d.bench.longrun_bench import final_loop_edges, loop_truth
from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.conventions import rot_z

pytest.importorskip("gtsam")


def test_loops_are_judged_against_the_ground_truth_and_the_final_graph():
    gt = {10: S3.sim3(t=[0.0, 0.0, 0.0]), 20: S3.sim3(t=[0.3, 0.0, 0.0]), 30: S3.sim3(rot_z(0.2), [2.0, 0.0, 0.0])}
    stamp = {0: 10, 5: 20, 9: 30}  # keyframe id -> stamp
    true_05 = np.linalg.inv(gt[10]) @ gt[20]
    history = [(0, 5, True, true_05, "ok"),  # the same place, measured right
               (0, 5, True, true_05 @ S3.sim3(t=[0.5, 0, 0]), "ok"),  # the same place, measured 0.5 m off
               (0, 9, True, np.eye(4), "ok"),  # a look-alike: 2 m apart in truth
               (5, 9, False, np.eye(4), "held: disagrees with the map by 1.70 m"),
               (0, 9, False, None, "12 matches")]
    out = loop_truth(history, stamp, gt.__getitem__, {(0, 5): True, (0, 9): False})
    assert [x["same_place"] for x in out] == [True, True, False, False, False]
    assert [x.get("accurate") for x in out] == [True, False, False, None, None]
    assert [x.get("in_final_graph") for x in out] == [True, True, False, None, None]
    assert abs(out[2]["gt_distance_m"] - 2.0) < 1e-12
    assert "in_final_graph" not in loop_truth(history[:1], stamp, gt.__getitem__)[0]  # no graph given: not judged


def test_a_loops_error_is_split_along_and_across_the_view():
    """A loop measured 0.4 m too far along keyframe i's view (its camera's z) and 0.1 m across it: the error's parts
    per loop, and over the true loops the median and the RMS of each part (what tells a depth error from a lateral
    one)."""
    from ros2_stream4d.bench.longrun_bench import loop_error_split

    gt = {10: S3.sim3(rot_z(0.3), [1.0, 2.0, 0.0]), 20: S3.sim3(rot_z(0.4), [1.2, 2.0, 0.0])}
    stamp = {0: 10, 5: 20}
    true_05 = np.linalg.inv(gt[10]) @ gt[20]
    off = S3.sim3(true_05[:3, :3], true_05[:3, 3] + [0.1, 0.0, 0.4])  # the error in i's axes
    out = loop_truth([(0, 5, True, true_05, "ok"), (0, 5, True, off, "ok")], stamp, gt.__getitem__)
    assert out[0]["trans_error_m"] < 1e-12 and out[0]["rot_error_deg"] < 1e-6
    assert out[1]["trans_error_along_view_m"] == pytest.approx(0.4)
    assert out[1]["trans_error_across_view_m"] == pytest.approx(0.1)
    assert out[1]["trans_error_m"] == pytest.approx(np.hypot(0.1, 0.4))
    split = loop_error_split(out)
    assert split["trans_error_along_view_rms_m"] == pytest.approx(np.sqrt(0.4**2 / 2))
    assert split["trans_error_across_view_rms_m"] == pytest.approx(np.sqrt(0.1**2 / 2))
    assert split["trans_error_median_m"] == pytest.approx(np.hypot(0.1, 0.4) / 2)
    assert loop_error_split([])["trans_error_median_m"] is None


def test_final_loop_edges_says_which_loops_the_final_solve_holds():
    from ros2_stream4d.mapping.backend.posegraph import LOOP, PoseGraph

    g = PoseGraph()
    for k in range(4):
        g.add_keyframe(k, S3.sim3(t=[0.5 * k, 0.0, 0.0]))
    a = g.add_edge(0, 3, np.eye(4), LOOP)
    b = g.add_edge(1, 3, np.eye(4), LOOP)
    c = g.add_edge(0, 2, np.eye(4), LOOP)
    b.inlier, c.active = False, False
    assert final_loop_edges(g) == {(0, 3): True, (1, 3): False, (0, 2): False}
    assert a.inlier and len(g.edges) == 6  # 3 odometry edges are not loops


def test_memory_sample_splits_resident_memory_and_names_the_maps_sizes():
    """The 10,000-frame memory run records, beside RSS, what malloc holds for objects (its arenas in use plus large
    blocks) and what it keeps freed, and the keyframe map's sizes: a map that grows tells apart from an allocator that
    keeps what was freed. A 64 MiB array shows up as allocated and goes when freed; the map's figures are its own."""
    from types import SimpleNamespace

    from map_helpers import small_config

    from ros2_stream4d.bench.longrun_bench import heap_mib, memory_sample
    from ros2_stream4d.mapping.keyframe_map import KeyframeMap, MapFrame

    before = heap_mib()
    assert before is not None, "glibc (Debian 12) has malloc_info"
    big = np.ones(2**23)  # 64 MiB
    during = heap_mib()
    allocated = (during["in_use"] + during["mmapped"]) - (before["in_use"] + before["mmapped"])
    assert 63.0 < allocated < 70.0
    del big
    after = heap_mib()
    assert (after["in_use"] + after["mmapped"]) < (during["in_use"] + during["mmapped"]) - 60.0
    m = KeyframeMap(small_config(tsdf=False, occupancy=False, keyframe_max_frames=1, background_rebuild=False))
    K = np.array([[5.0, 0, 4.0], [0, 6.0, 3.0], [0, 0, 1]])
    for i in range(3):
        T = S3.sim3(t=[2.0 * i, 0.0, 0.0])
        m.integrate(MapFrame(1000 + i, T, np.full((6, 8), 2.0 + i, np.float32), np.full((6, 8, 3), 9, np.uint8), K,
                             None))
    s = memory_sample(7, SimpleNamespace(map=m))
    assert s["frame"] == 7 and s["rss"] > 0 and s["heap"]["arenas"] >= 1
    assert s["map_points"] == len(m) > 0 and s["keyframes"] == 3 and s["tsdf_blocks"] == 0
    assert s["keyframes_in_memory"] == 3 and s["keyframe_mib"] == pytest.approx(m.memory_bytes() / 2**20)


def test_memory_runs_take_the_maps_cap_and_the_score_runs_refuse_it(monkeypatch):
    """`stream4d bench longrun --memory-only --map-max-points N` measures memory with the map cloud capped at N (the
    node's default 1 M; the bench's 8 M serves the F-score); the F-score runs refuse the option (their figures would
    not compare)."""
    from ros2_stream4d.bench import longrun_bench
    from ros2_stream4d.cli import build_parser

    seen = {}
    monkeypatch.setattr(longrun_bench, "run_memory", lambda *a, **k: seen.update(k))
    args = build_parser().parse_args(["bench", "longrun", "--memory-only", "--map-max-points", "1000000"])
    assert args.func(args) == 0 and seen == {"map_max_points": 1_000_000}
    args = build_parser().parse_args(["bench", "longrun", "--memory-only"])
    assert args.func(args) == 0 and seen == {"map_max_points": longrun_bench.MAP_MAX_POINTS}
    args = build_parser().parse_args(["bench", "longrun", "--map-max-points", "5"])
    with pytest.raises(SystemExit, match="is for --memory-only"):
        args.func(args)
