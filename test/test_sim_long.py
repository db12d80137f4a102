"""Long synthetic runs: the office scene (rooms, corridors, doors, twin rooms) and the ground-robot routes loop,
figure_eight and out_and_back (closed, collision-free, crossing, returning)."""

import subprocess
import sys

import numpy as np
import pytest

from ros2_stream4d.sim.render import CameraModel, Renderer
from ros2_stream4d.sim.scenes import build_scene
from ros2_stream4d.sim.trajectories import R_CAMLINK_OPTICAL, body_rotation, make_trajectory, make_transform

FPS = 10.0


@pytest.fixture(scope="module")
def office():
    return build_scene("office", 0)


@pytest.fixture(scope="module")
def routes(office):
    return {kind: make_trajectory(office, kind, 1300, fps=FPS, seed=0)
            for kind in ("loop", "figure_eight", "out_and_back")}


def period_frames(traj) -> int:
    return int(round(traj.params["period_s"] * FPS))


def test_loop_returns_to_its_start_after_more_than_500_frames(routes):
    t = routes["loop"]
    n = period_frames(t)
    assert 500 <= n <= 1200  # `stream4d sim --scene office --trajectory loop --frames 1200` revisits its start
    cam = t.T_world_cam[:, :3, 3]
    assert np.linalg.norm(cam[n] - cam[0]) < 0.3
    away = np.linalg.norm(cam[50:n - 50] - cam[0], axis=1)
    assert away.min() > 1.0  # no earlier revisit of the start
    assert t.params["route_length"] > 25.0
    yaw = np.arctan2(t.T_world_base[:, 1, 0], t.T_world_base[:, 0, 0])
    assert abs(np.angle(np.exp(1j * (yaw[n] - yaw[0])))) < np.radians(5)  # same heading again


def test_routes_are_collision_free_ground_robot_paths(office, routes):
    for kind, t in routes.items():
        cam = t.T_world_cam[:, :3, 3]
        assert office.camera_ok(cam, 0.2).all(), kind
        B = t.T_world_base
        assert np.all(B[:, 2, 3] == 0.0) and np.allclose(B[:, :3, 2], [0, 0, 1])  # on the floor, upright
        assert not office.in_obstacle(np.c_[B[:, :2, 3], np.full(len(B), 0.1)], margin=0.25).any(), kind
        assert np.allclose(t.T_base_cam[:3, 3], [0.1, 0.0, 0.3])  # the static base -> camera extrinsic
        # a differential drive: it moves along its x axis (or turns on the spot)
        v = np.diff(B[:, :2, 3], axis=0)
        moving = np.linalg.norm(v, axis=1) > 1e-4
        v = v[moving] / np.linalg.norm(v[moving], axis=1, keepdims=True)
        assert np.all(np.einsum("ij,ij->i", v, B[:-1][moving, :2, 0]) > 0.95), kind
        step = np.linalg.norm(np.diff(cam, axis=0), axis=1)
        assert step.max() < 0.1
        R = t.T_world_cam[:, :3, :3]
        turn = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", R[:-1], R[1:]) - 1) / 2, -1, 1)))
        assert turn.max() < 6.0, kind


def test_figure_eight_crosses_itself(routes):
    t = routes["figure_eight"]
    n = period_frames(t)
    xy = t.T_world_base[:n, :2, 3]
    head = t.T_world_base[:n, :2, 0]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    i, j = np.nonzero((d < 0.05) & (np.abs(np.subtract.outer(np.arange(n), np.arange(n))) > 100))
    assert len(i) > 0
    cos = np.abs(np.einsum("ij,ij->i", head[i], head[j]))
    assert cos.min() < 0.2  # the two passes cross at (about) right angles
    assert np.linalg.norm(t.T_world_cam[n, :3, 3] - t.T_world_cam[0, :3, 3]) < 0.3


def test_out_and_back_returns_on_its_own_path(routes):
    t = routes["out_and_back"]
    n = period_frames(t)
    xy = t.T_world_base[:, :2, 3]
    far = np.linalg.norm(xy[:n] - xy[0], axis=1)
    k = int(far.argmax())
    assert far[k] > 10.0 and 0.4 * n < k < 0.6 * n  # out to the far end half-way through
    assert np.linalg.norm(xy[n] - xy[0]) < 0.3  # and back
    out, back = xy[:k], xy[k:n]
    gap = np.min(np.linalg.norm(back[:, None] - out[None], axis=2), axis=1)
    assert gap.max() < 0.1  # the way back is the way out


def test_office_has_twin_rooms_that_look_identical(office):
    rooms, offset = office.params["rooms"], np.array(office.params["twins"]["offset"])
    assert office.params["twins"]["parts"] == ["room_sw", "room_nw"] and np.linalg.norm(offset) > 4.0
    sw = [p for p in office.parts if p.name.startswith("room_sw")]
    nw = [p for p in office.parts if p.name.startswith("room_nw")]
    assert len(sw) == len(nw) > 10
    for p, q in zip(sw, nw):
        assert np.allclose(q.vertices, p.vertices + offset)
        tp, tq = office.textures[p.texture], office.textures[q.texture]
        assert tp.to_dict() | {"origin": None} == tq.to_dict() | {"origin": None}
    # the same view in both rooms (towards a wall without a door) renders the same image; another room differs
    x0, x1, y0, y1 = rooms["room_sw"]["box"]
    side = next(s for s in ("south", "east", "north", "west") if s not in rooms["room_sw"]["doors"])
    yaw = {"south": -np.pi / 2, "east": 0.0, "north": np.pi / 2, "west": np.pi}[side]
    T = make_transform(body_rotation(yaw, -0.1, 0.0) @ R_CAMLINK_OPTICAL, [(x0 + x1) / 2, (y0 + y1) / 2, 1.3])
    r = Renderer(office, CameraModel.from_hfov(80, 60, 60.0))
    a = r.render(T)
    T2 = T.copy()
    T2[:3, 3] += offset
    b = r.render(T2)
    assert np.allclose(a.depth, b.depth, atol=1e-4)
    diff = np.abs(a.rgb.astype(int) - b.rgb.astype(int))
    assert np.mean(diff > 2) < 0.01
    T3 = T.copy()
    T3[0, 3] += rooms["room_se"]["box"][0] - x0
    c = r.render(T3)
    assert np.abs(a.rgb.astype(int) - c.rgb.astype(int)).mean() > 5


def test_office_renders_with_valid_depth_along_the_loop(office, routes):
    r = Renderer(office, CameraModel.from_hfov(64, 48, 60.0))
    for i in (0, 400):
        f = r.render(routes["loop"].T_world_cam[i])
        assert np.isfinite(f.depth).all() and f.depth.min() > 0.05 and f.depth.max() < 30.0
        assert f.rgb.std() > 5  # textured


def test_route_kinds_work_in_the_other_scenes():
    t = make_trajectory(build_scene("room", 1), "figure_eight", 1200, fps=FPS, seed=0)
    xy = t.T_world_base[:, :2, 3]
    n = period_frames(t)
    assert n < 1200
    assert np.linalg.norm(xy[n] - xy[0]) < 0.05
    with pytest.raises(TypeError):
        make_trajectory(build_scene("room", 1), "loop", 10, fps=FPS, seed=0, radius=3)


def test_sim_cli_lists_the_office_and_the_routes():
    out = subprocess.run([sys.executable, "-m", "ros2_stream4d.cli", "sim", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name in ("office", "loop", "figure_eight", "out_and_back"):
        assert name in text
