"""Segments: re-anchoring policy, re-feeding K frames, Sim(3) alignment of consecutive segments; with the exact
oracle nothing changes, with a drifting front-end segments bound the drift."""

import numpy as np
import pytest

from ros2_stream4d.mapping.backend import sim3 as S3
from ros2_stream4d.mapping.backend.drift import DriftedSession
from ros2_stream4d.mapping.backend.segments import ReanchorPolicy, SegmentedSession, anchor_overlap
from ros2_stream4d.mapping.conventions import extrinsic_to_pose, inverse

N = 240


@pytest.fixture(scope="module")
def room():
    from ros2_stream4d.sim.render import CameraModel
    from ros2_stream4d.sim.scenes import build_scene
    from ros2_stream4d.sim.trajectories import make_trajectory

    scene = build_scene("room", 2)
    traj = make_trajectory(scene, "ground_robot", n_frames=N, fps=10, seed=2)
    mesh = scene.mesh()
    cam = CameraModel.from_hfov(96, 72, 70)
    return traj.T_world_cam, cam, (np.asarray(mesh.vertices), np.asarray(mesh.triangles))


def oracle(room):
    from ros2_stream4d.sim.oracle import OracleSession

    T, cam, mesh = room
    return OracleSession(np.arange(N) * 100_000_000, T, cam.K, source_hw=(cam.height, cam.width), mesh=mesh)


def poses(session, n=N):
    out = []
    for i in range(n):
        o = session.step(None, stamp_ns=i * 100_000_000)
        out.append(extrinsic_to_pose(o["extrinsic"][0].double().numpy()))
    return np.stack(out)


def gt(room, n=N):
    T = room[0]
    return np.stack([inverse(T[0]) @ T[i] for i in range(n)])


def ate(P, G):
    A = S3.umeyama(P[:, :3, 3], G[:, :3, 3])
    return float(np.sqrt(((S3.apply(A, P[:, :3, 3]) - G[:, :3, 3]) ** 2).sum(1).mean()))


def test_a_new_segment_is_aligned_by_the_chosen_method(monkeypatch, room):
    calls = []
    for name in ("align_from_poses", "align_point_maps"):
        real = getattr(S3, name)
        monkeypatch.setattr(S3, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for alignment, expected in (("poses", "align_from_poses"), ("points", "align_point_maps")):
        calls.clear()
        seg = SegmentedSession(oracle(room), ReanchorPolicy(max_segment_frames=30, min_segment_frames=12,
                                                            overlap_frames=6, alignment=alignment))
        poses(seg, 70)
        assert calls == [expected] * 2 and len(seg.segment_stats.events) == 2
    with pytest.raises(ValueError, match="alignment"):
        ReanchorPolicy(alignment="icp")


def test_policy_reasons():
    p = ReanchorPolicy(min_anchor_overlap=0.3, max_segment_frames=50, min_segment_frames=10, overlap_frames=4)
    assert p.reason(5, 0.0) is None  # too young
    assert p.reason(20, 0.1) == "anchor_overlap"
    assert p.reason(20, 0.8) is None
    assert p.reason(50, 0.9) == "max_segment_frames"
    with pytest.raises(ValueError):
        ReanchorPolicy(overlap_frames=10, min_segment_frames=5)


def test_anchor_overlap_of_a_plane():
    K = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    d = np.full((48, 64), 2.0)
    assert anchor_overlap(d, K, np.eye(4), d, K, np.eye(4)) == pytest.approx(1.0)
    T = np.eye(4)
    T[0, 3] = 1.0  # half the view slides out of the anchor's image
    assert 0.3 < anchor_overlap(d, K, np.eye(4), d, K, T) < 0.7
    T[0, 3] = 10.0
    assert anchor_overlap(d, K, np.eye(4), d, K, T) == 0.0


@pytest.mark.parametrize("alignment", ["poses", "points"])
def test_exact_oracle_segments_change_nothing(room, alignment):
    seg = SegmentedSession(oracle(room), ReanchorPolicy(max_segment_frames=40, min_segment_frames=12,
                                                        overlap_frames=6, min_anchor_overlap=0.2,
                                                        alignment=alignment))
    P = poses(seg)
    G = gt(room)
    assert seg.segment_stats.segments >= 5 and seg.segment_stats.failed_alignments == 0
    assert all(ev.ok for ev in seg.segment_stats.events)
    assert np.abs(P[:, :3, 3] - G[:, :3, 3]).max() < 1e-3
    assert max(S3.rotation_angle_deg(P[i, :3, :3].T @ G[i, :3, :3]) for i in range(N)) < 0.05
    # and the frames seen count the stream, not the re-fed frames
    assert seg.frames_seen == N and seg.segment_stats.refed_frames == 6 * len(seg.segment_stats.events)


def test_overlap_policy_triggers_on_its_own(room):
    seg = SegmentedSession(oracle(room), ReanchorPolicy(max_segment_frames=10_000, min_segment_frames=12,
                                                        overlap_frames=6, min_anchor_overlap=0.3))
    poses(seg)
    assert seg.segment_stats.events and all(ev.reason == "anchor_overlap" for ev in seg.segment_stats.events)


@pytest.mark.parametrize("alignment", ["poses", "points"])
def test_segments_bound_a_front_end_drift_that_grows_with_distance_from_the_anchor(room, alignment):
    drift = dict(scale_per_m=0.0, scale_per_m2=0.02, yaw_deg_per_m=0.0, yaw_deg_per_m2=2.0, scale_walk=0.0,
                 yaw_walk_deg=0.0)
    plain = poses(DriftedSession(oracle(room), seed=0, **drift))
    seg = SegmentedSession(DriftedSession(oracle(room), seed=0, **drift),
                           ReanchorPolicy(max_segment_frames=40, min_segment_frames=12, overlap_frames=6,
                                          alignment=alignment))
    segmented = poses(seg)
    G = gt(room)
    assert ate(plain, G) > 0.1
    assert ate(segmented, G) < 0.5 * ate(plain, G)
    # scale is carried across segments: the segmented depth of the last frame is near metric again
    assert all(ev.ok for ev in seg.segment_stats.events)
