"""The README's main job, end to end on a short sequence: sim bag -> DDS replay -> node -> recorded outputs,
saved map, evaluation report. Uses the oracle model so the figures it prints are checkable (exact geometry)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ros


def test_demo_writes_every_artefact_with_exact_oracle_geometry(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "ros2_stream4d.cli", "demo", "--model", "oracle", "--frames", "15",
                             "--width", "160", "--height", "120", "--rate", "2.0", "--input-width", "112",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("map/cloud.ply", "map/mesh.ply", "map/occupancy.pgm", "map/occupancy.yaml",
                 "output_bag/metadata.yaml", "report/report.md", "report/metrics.json",
                 "report/trajectory_topview.png", "report/depth_examples.png", "demo.rrd"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["matched_poses"] == 15
    assert metrics["ate_rmse"] < 1e-3
    assert metrics["depth_abs_rel"] < 0.02
    import open3d as o3d

    assert len(o3d.io.read_point_cloud(str(out / "map" / "cloud.ply")).points) > 1000
    assert str(out / "map") in result.stdout and f"stream4d view {out / 'demo.rrd'} --serve" in result.stdout
    # the robot set-up over DDS: one parent per TF frame in everything recorded (input static tree, the bag's
    # odom -> base_link, the node's map -> odom)
    from rosbags.highlevel import AnyReader

    from ros2_stream4d.ros.tf_policy import check_one_parent

    edges = []
    with AnyReader([out / "output_bag"]) as reader:
        conns = [c for c in reader.connections if c.topic in ("/tf", "/tf_static")]
        for conn, _t, raw in reader.messages(connections=conns):
            edges += [(t.header.frame_id, t.child_frame_id) for t in reader.deserialize(raw, conn.msgtype).transforms]
    assert ("map", "odom") in edges and ("odom", "base_link") in edges
    assert check_one_parent(edges) == []
