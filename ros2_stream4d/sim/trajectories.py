"""Camera trajectories through a scene: hand-held (smooth 6-DoF), ground robot (planar), orbit, and long
ground-robot routes: loop, figure_eight, out_and_back.

Conventions
- World: z up, floor at z = 0 (see scenes.py).
- Every pose is a 4x4 transform ``T_a_b`` mapping points in frame b to frame a (b's pose in a).
- Robot body frames (base_link, camera_link) follow REP-103: x forward, y left, z up.
- The camera optical frame follows OpenCV / REP-103 "optical": z forward, x right, y down.
  ``T_CAMLINK_OPTICAL`` is the fixed rotation camera_link -> optical frame (quaternion xyzw -0.5, 0.5, -0.5, 0.5).
- Every trajectory has the same frame structure: world -> base_link (moving) -> camera_link (static, default
  (0.1, 0, 0.3) m) -> camera_optical_frame (static). A ground robot's base_link drives on the floor (z = 0, roll and
  pitch 0, heading along its path); for hand-held and orbit, base_link is simply rigidly attached below the camera.

Route kinds (``ROUTE_KINDS``) drive a ground robot along a polyline of waypoints: the scene's own route of that
name (the office's follow its corridor centrelines: ``loop`` returns to its start after one lap, ``figure_eight``
crosses itself at the central junction, ``out_and_back`` drives out and returns on the same path), else one built
from the scene's path rectangle shrunk by a random 0.5-0.8 (a rectangle, a bow tie whose diagonals cross, a
straight line along the longer side; "around" scenes: a circle on the ring, the other two in a rectangle beside the objects). Corners are rounded
arcs of ``turn_radius`` (driven at a speed whose turn rate stays <= ``turn_rate_deg``) where the two segments leave
room and the turn is <= 120 degrees; sharper ones (a route's ends) turn on the spot. Routes repeat: a closed route
starts over, out_and_back turns around at both ends. The seed picks the direction (which end first).

A trajectory is a function of time only (t = i / fps), so the first n frames of a longer trajectory equal a shorter
one with the same seed. All random draws come from ``default_rng([seed, kind])``; the result is bit-for-bit
reproducible. A drawn trajectory is checked against the scene (clearance from every surface, outside obstacles) and
redrawn when it collides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ros2_stream4d.mapping.conventions import rot_x, rot_y, rot_z

from . import TRAJECTORY_KINDS
from .scenes import Scene

ROUTE_KINDS = ("loop", "figure_eight", "out_and_back")
GROUND_KINDS = ("ground_robot",) + ROUTE_KINDS

# camera_link (x fwd, y left, z up) -> optical (z fwd, x right, y down): columns = optical axes in camera_link
R_CAMLINK_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
T_CAMLINK_OPTICAL = np.eye(4)
T_CAMLINK_OPTICAL[:3, :3] = R_CAMLINK_OPTICAL


@dataclass
class Trajectory:
    kind: str
    fps: float
    times: np.ndarray  # (N,) seconds since the first frame
    T_world_base: np.ndarray  # (N, 4, 4) base_link in world
    T_base_camlink: np.ndarray  # (4, 4) static extrinsic base_link -> camera_link
    params: dict = field(default_factory=dict)

    @property
    def T_base_cam(self) -> np.ndarray:
        """(4, 4) base_link -> camera optical frame."""
        return self.T_base_camlink @ T_CAMLINK_OPTICAL

    @property
    def T_world_cam(self) -> np.ndarray:
        """(N, 4, 4) camera-to-world poses, OpenCV optical convention."""
        return self.T_world_base @ self.T_base_cam

    def __len__(self) -> int:
        return len(self.times)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fps": self.fps, "n_frames": len(self), "params": self.params,
                "T_base_camlink": self.T_base_camlink.tolist(), "T_camlink_optical": T_CAMLINK_OPTICAL.tolist()}


def body_rotation(yaw, pitch, roll) -> np.ndarray:
    """(..., 3, 3) rotation of a body frame (x fwd, y left, z up) in world: yaw about z, then pitch (positive =
    looking up), then roll about the forward axis."""
    return rot_z(yaw) @ rot_y(-np.asarray(pitch)) @ rot_x(roll)


def make_transform(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    R, t = np.asarray(R), np.asarray(t)
    T = np.zeros(R.shape[:-2] + (4, 4))
    T[..., :3, :3], T[..., :3, 3], T[..., 3, 3] = R, t, 1.0
    return T


def make_trajectory(scene: Scene, kind: str = "handheld", n_frames: int = 100, fps: float = 10.0, seed: int = 0,
                    *, speed: float | None = None, camera_offset=(0.1, 0.0, 0.3), camera_pitch_deg: float = 0.0,
                    clearance: float | None = None, max_tries: int = 100, **overrides) -> Trajectory:
    """Draw a collision-free trajectory of ``n_frames`` at ``fps`` through ``scene``.

    speed: m/s along the path (default: the scene's walking speed; 0.75 of it for a ground robot).
    camera_offset / camera_pitch_deg: the static base_link -> camera_link extrinsic (pitch positive = up).
    overrides (hand-held and orbit): height (m), yaw_noise_deg, pitch_noise_deg, roll_noise_deg, sway (m),
    radius (orbit, m), max_rate_deg (orbit: angular speed limit, default 15 deg/s); (route kinds) turn_radius (m,
    default 0.5), turn_rate_deg (deg/s, default 40).
    """
    if kind not in TRAJECTORY_KINDS:
        raise ValueError(f"unknown trajectory kind {kind!r}; expected one of {TRAJECTORY_KINDS}")
    if n_frames < 1 or fps <= 0:
        raise ValueError("need n_frames >= 1 and fps > 0")
    if speed is None:
        speed = scene.speed * (0.75 if kind in GROUND_KINDS else 1.0)
    if clearance is None:
        clearance = 0.2 if kind in GROUND_KINDS else 0.3
    T_base_camlink = make_transform(rot_y(-np.radians(camera_pitch_deg)), np.asarray(camera_offset, float))
    times = np.arange(n_frames, dtype=np.float64) / fps
    rng = np.random.default_rng([seed, TRAJECTORY_KINDS.index(kind), 7])
    for attempt in range(max_tries):
        params = {"speed": float(speed), "camera_offset": list(map(float, camera_offset)),
                  "camera_pitch_deg": float(camera_pitch_deg), "clearance": clearance, "attempt": attempt}
        T_world_cam = None
        if kind in GROUND_KINDS:
            if kind == "ground_robot":
                if overrides:
                    raise TypeError(f"unknown ground_robot trajectory parameter(s): {sorted(overrides)}")
                xy, yaw = _loop_motion(scene, rng, times, speed, params)
            else:
                xy, yaw = _route_motion(scene, kind, rng, times, speed, params, dict(overrides))
            T_world_base = make_transform(rot_z(yaw), np.c_[xy, np.zeros(len(times))])
            base_ok = ~scene.in_obstacle(np.c_[xy, np.full(len(xy), 0.1)], margin=0.25)
        else:
            T_world_cam = (_handheld if kind == "handheld" else _orbit)(scene, rng, times, speed, params,
                                                                        dict(overrides))
            T_world_base = T_world_cam @ np.linalg.inv(T_base_camlink @ T_CAMLINK_OPTICAL)
            base_ok = True
        traj = Trajectory(kind, float(fps), times, T_world_base, T_base_camlink, params)
        cam = (traj.T_world_cam if T_world_cam is None else T_world_cam)[:, :3, 3]
        if np.all(scene.camera_ok(cam, clearance) & base_ok):
            return traj
    raise RuntimeError(f"no collision-free {kind} trajectory of {n_frames} frames in this {scene.kind} scene "
                       f"after {max_tries} tries; try another seed, fewer frames or a lower speed")


# ---------------------------------------------------------------------------------------------------- helpers
def smooth_noise(rng: np.random.Generator, t: np.ndarray, amplitude: float, fmin: float = 0.03,
                 fmax: float = 0.12, n: int = 3) -> np.ndarray:
    """A smooth random signal bounded by +-amplitude: a weighted sum of n sinusoids of random frequency (Hz)."""
    f = rng.uniform(fmin, fmax, n)
    ph = rng.uniform(0, 2 * np.pi, n)
    w = rng.uniform(0.5, 1.0, n)
    w /= w.sum()
    return amplitude * (w * np.sin(2 * np.pi * f * t[:, None] + ph)).sum(axis=1)


def _closed_loop(scene: Scene, rng: np.random.Generator, n: int = 4096) -> np.ndarray:
    """A random smooth closed curve (n, 2) where the scene allows paths: a perturbed ellipse in the path rectangle
    ("inside" scenes) or a perturbed circle within the ring around the focus ("around" scenes); a scene with its
    own ``loop`` route (the office): that route with rounded corners."""
    if "loop" in scene.routes:
        return _route_curve(scene.routes["loop"], n)
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = 1.0 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * th + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    if scene.layout == "around":
        r_min, r_max = scene.ring
        r0 = rng.uniform(r_min + 0.1 * (r_max - r_min), r_max - 0.1 * (r_max - r_min))
        r = np.clip(r0 * wobble, r_min, r_max)
        return scene.focus[:2] + np.c_[r * np.cos(th), r * np.sin(th)]
    c = 0.5 * (scene.path_lo + scene.path_hi)
    half = 0.5 * (scene.path_hi - scene.path_lo)
    a, b = half * rng.uniform(0.55, 0.85, 2)
    return c + np.c_[a * np.cos(th), b * np.sin(th)] * wobble[:, None]


def _loop_motion(scene: Scene, rng: np.random.Generator, times: np.ndarray, speed: float, params: dict):
    """Constant-speed motion along a random closed loop: (xy (N, 2), heading yaw (N,) continuous)."""
    loop = _closed_loop(scene, rng)
    if rng.random() < 0.5:
        loop = loop[::-1]
    closed = np.vstack([loop, loop[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    s_knots = np.r_[0.0, np.cumsum(seg)]
    length = s_knots[-1]
    tangent = np.roll(loop, -1, axis=0) - np.roll(loop, 1, axis=0)
    tangent = np.vstack([tangent, tangent[:1]])
    s = (rng.uniform(0, length) + speed * times) % length
    xy = np.c_[np.interp(s, s_knots, closed[:, 0]), np.interp(s, s_knots, closed[:, 1])]
    tx, ty = np.interp(s, s_knots, tangent[:, 0]), np.interp(s, s_knots, tangent[:, 1])
    params["loop_length"] = float(length)
    return xy, np.unwrap(np.arctan2(ty, tx))


def _look_at_angles(pos: np.ndarray, target: np.ndarray):
    d = target - pos
    return np.arctan2(d[:, 1], d[:, 0]), np.arctan2(d[:, 2], np.linalg.norm(d[:, :2], axis=1))


def _handheld(scene, rng, times, speed, params, ov) -> np.ndarray:
    xy, heading = _loop_motion(scene, rng, times, speed, params)
    height = ov.pop("height", float(rng.uniform(1.2, 1.7)))
    yaw_amp = np.radians(ov.pop("yaw_noise_deg", 25.0))
    pitch_amp = np.radians(ov.pop("pitch_noise_deg", 8.0))
    roll_amp = np.radians(ov.pop("roll_noise_deg", 4.0))
    sway = ov.pop("sway", 0.15)
    if ov:
        raise TypeError(f"unknown trajectory parameter(s): {sorted(ov)}")
    params.update(height=height, yaw_noise_deg=float(np.degrees(yaw_amp)), sway=sway,
                  pitch_noise_deg=float(np.degrees(pitch_amp)), roll_noise_deg=float(np.degrees(roll_amp)))
    side = np.c_[-np.sin(heading), np.cos(heading)]
    pos = np.c_[xy + side * smooth_noise(rng, times, sway)[:, None],
                height + smooth_noise(rng, times, 0.08, 0.1, 0.4)]
    if scene.layout == "around":  # keep the objects in view
        yaw, pitch = _look_at_angles(pos, scene.focus)
    else:  # look roughly where one walks, with a downward tilt
        yaw, pitch = heading, np.full(len(times), -np.radians(8.0))
    yaw = yaw + smooth_noise(rng, times, yaw_amp)
    pitch = pitch + smooth_noise(rng, times, pitch_amp)
    roll = smooth_noise(rng, times, roll_amp)
    return make_transform(body_rotation(yaw, pitch, roll) @ R_CAMLINK_OPTICAL, pos)


def _orbit(scene, rng, times, speed, params, ov) -> np.ndarray:
    if scene.layout == "around":
        default_r = float(rng.uniform(*scene.ring))
        default_h = float(scene.focus[2] + rng.uniform(0.6, 1.4))
    else:
        half = 0.5 * (scene.path_hi - scene.path_lo)
        default_r = float(min(half) * rng.uniform(0.6, 0.9))
        default_h = float(rng.uniform(1.3, 1.7))
    radius = float(ov.pop("radius", default_r))
    height = float(ov.pop("height", default_h))
    max_rate_deg = float(ov.pop("max_rate_deg", 15.0))
    if ov:
        raise TypeError(f"unknown trajectory parameter(s): {sorted(ov)}")
    centre = scene.focus if scene.layout == "around" else np.r_[0.5 * (scene.path_lo + scene.path_hi),
                                                                 scene.focus[2]]
    direction = 1.0 if rng.random() < 0.5 else -1.0
    rate = min(speed / radius, np.radians(max_rate_deg))  # small circles (a corridor) turn no faster than this
    ang = rng.uniform(0, 2 * np.pi) + direction * rate * times
    pos = np.c_[centre[0] + radius * np.cos(ang), centre[1] + radius * np.sin(ang),
                height + smooth_noise(rng, times, 0.1, 0.05, 0.2)]
    yaw, pitch = _look_at_angles(pos, centre)
    params.update(radius=radius, height=height, centre=centre.tolist(), rate_deg=float(np.degrees(rate)))
    return make_transform(body_rotation(yaw, pitch, np.zeros_like(yaw)) @ R_CAMLINK_OPTICAL, pos)


# ---------------------------------------------------------------------------------------------------- routes
def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def route_pieces(points: np.ndarray, speed: float, turn_radius: float = 0.5, turn_rate: float = np.radians(40.0)):
    """A closed polyline (K, 2) (the last point joins the first) as pieces driven in order: a list of dicts with
    kind ("line" | "arc" | "turn"), start position p0 (2,), start heading h0 (rad, continuous), length (m), turn
    (signed rad) and duration (s). Corners: arcs where they fit (module docstring), else turns on the spot."""
    pts = np.asarray(points, np.float64)
    K = len(pts)
    seg = np.roll(pts, -1, axis=0) - pts
    length = np.linalg.norm(seg, axis=1)
    if np.any(length < 1e-9):
        raise ValueError("a route has two equal consecutive waypoints")
    heading = np.arctan2(seg[:, 1], seg[:, 0])
    dev = _wrap(heading - np.roll(heading, 1))  # turn at vertex i (from segment i-1 to segment i)
    tangent = np.zeros(K)
    arc = np.zeros(K, bool)
    for i in range(K):
        if abs(dev[i]) < 1e-9:
            continue
        L = turn_radius * np.tan(abs(dev[i]) / 2)
        if abs(dev[i]) <= np.radians(120.0) and L <= 0.5 * min(length[i - 1], length[i]):
            tangent[i], arc[i] = L, True
    arc_speed = min(speed, turn_radius * turn_rate)
    pieces, h = [], float(heading[0])
    for i in range(K):
        j = (i + 1) % K
        d = seg[i] / length[i]
        straight = length[i] - tangent[i] - tangent[j]
        pieces.append({"kind": "line", "p0": pts[i] + d * tangent[i], "h0": h, "length": straight, "turn": 0.0,
                       "duration": straight / speed})
        if abs(dev[j]) < 1e-9:
            continue
        if arc[j]:
            alen = turn_radius * abs(dev[j])
            pieces.append({"kind": "arc", "p0": pts[j] - d * tangent[j], "h0": h, "length": alen,
                           "turn": float(dev[j]), "duration": alen / arc_speed})
        else:
            pieces.append({"kind": "turn", "p0": pts[j].copy(), "h0": h, "length": 0.0, "turn": float(dev[j]),
                           "duration": abs(dev[j]) / turn_rate})
        h += float(dev[j])
    return pieces


def route_pose(pieces: list, times: np.ndarray):
    """(xy (N, 2), heading (N,) continuous) at times (s) along pieces driven repeatedly."""
    dur = np.array([p["duration"] for p in pieces])
    start = np.r_[0.0, np.cumsum(dur)]
    period = start[-1]
    total_turn = sum(p["turn"] for p in pieces)
    times = np.asarray(times, np.float64)
    lap, tm = np.divmod(times, period)
    idx = np.clip(np.searchsorted(start, tm, side="right") - 1, 0, len(pieces) - 1)
    xy, yaw = np.zeros((len(times), 2)), np.zeros(len(times))
    for k in np.unique(idx):
        sel = idx == k
        p = pieces[k]
        u = (tm[sel] - start[k]) / p["duration"] if p["duration"] > 0 else np.zeros(sel.sum())
        h0 = p["h0"]
        fwd = np.array([np.cos(h0), np.sin(h0)])
        if p["kind"] == "line":
            xy[sel] = p["p0"] + (u * p["length"])[:, None] * fwd
            yaw[sel] = h0
        elif p["kind"] == "turn":
            xy[sel] = p["p0"]
            yaw[sel] = h0 + u * p["turn"]
        else:
            r = p["length"] / abs(p["turn"])
            left = np.array([-fwd[1], fwd[0]]) * np.sign(p["turn"])
            centre = p["p0"] + r * left
            a = u * p["turn"]
            v = p["p0"] - centre
            xy[sel] = centre + np.c_[np.cos(a) * v[0] - np.sin(a) * v[1], np.sin(a) * v[0] + np.cos(a) * v[1]]
            yaw[sel] = h0 + a
    return xy, yaw + lap * total_turn


def _route_curve(points: np.ndarray, n: int) -> np.ndarray:
    """A closed route with rounded corners sampled at n points evenly in arc length (spots of turns merge)."""
    pieces = route_pieces(points, speed=1.0, turn_rate=1.0)  # speed = turn rate: duration = arc length
    for p in pieces:
        if p["kind"] == "turn":
            p["duration"] = 0.0
    pieces = [p for p in pieces if p["duration"] > 0]
    period = sum(p["duration"] for p in pieces)
    return route_pose(pieces, np.linspace(0, period, n, endpoint=False))[0]


def scene_route(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Waypoints (K, 2) of a route kind in this scene, as a closed polyline (out_and_back: out, then back)."""
    if kind in scene.routes:
        pts = np.asarray(scene.routes[kind], np.float64)
    elif scene.layout == "around":
        r_min, r_max = scene.ring
        if kind == "loop":
            th = np.linspace(0, 2 * np.pi, 48, endpoint=False) + rng.uniform(0, 2 * np.pi)
            pts = scene.focus[:2] + 0.5 * (r_min + r_max) * np.c_[np.cos(th), np.sin(th)]
        else:  # in a rectangle on the ring, beside the objects, at a random bearing
            lo, hi = np.array([-1.5, r_min + 0.2]), np.array([1.5, r_max - 0.2])
            a = rng.uniform(0, 2 * np.pi)
            R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            pts = scene.focus[:2] + _rect_route(kind, lo, hi) @ R.T
    else:  # in the path rectangle shrunk about its centre (its corners may be close to furniture)
        lo, hi = np.asarray(scene.path_lo, np.float64), np.asarray(scene.path_hi, np.float64)
        c, half = 0.5 * (lo + hi), 0.5 * (hi - lo) * rng.uniform(0.5, 0.8)
        pts = _rect_route(kind, c - half, c + half)
    reverse = rng.random() < 0.5  # the other direction (out_and_back: start at the other end)
    if kind == "out_and_back":
        pts = pts[::-1] if reverse else pts
        return np.vstack([pts, pts[-2:0:-1]])
    return np.roll(pts[::-1], 1, axis=0) if reverse else pts


def _rect_route(kind: str, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    c = 0.5 * (lo + hi)
    if kind == "loop":
        return np.array([(c[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1]), (lo[0], lo[1])])
    if kind == "figure_eight":  # a bow tie: the two diagonals cross at the centre
        return np.array([c, hi, (hi[0], lo[1]), (lo[0], hi[1]), lo])
    if hi[0] - lo[0] >= hi[1] - lo[1]:
        return np.array([(lo[0], c[1]), (hi[0], c[1])])
    return np.array([(c[0], lo[1]), (c[0], hi[1])])


def _route_motion(scene, kind, rng, times, speed, params, ov):
    turn_radius = float(ov.pop("turn_radius", 0.5))
    turn_rate_deg = float(ov.pop("turn_rate_deg", 40.0))
    if ov:
        raise TypeError(f"unknown {kind} trajectory parameter(s): {sorted(ov)}")
    pts = scene_route(scene, kind, rng)
    pieces = route_pieces(pts, speed, turn_radius, np.radians(turn_rate_deg))
    period = sum(p["duration"] for p in pieces)
    params.update(turn_radius=turn_radius, turn_rate_deg=turn_rate_deg, route=pts.tolist(),
                  route_length=float(sum(p["length"] for p in pieces)), period_s=float(period))
    return route_pose(pieces, times)
